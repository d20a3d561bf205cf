"""The remote functions of the simulated workload (importable: pickled by reference).

None of them blocks: a task that starts others (:func:`t_spawn`) returns their refs instead of
waiting for them (a simulated rank runs its tasks inline, on the simulator's thread).
"""
from __future__ import annotations

from ..api import ObjectRef, put, remote
from .values import EXCEPTIONS, apply, build


class Spawned:
    """Reference value of an object made by a task's child: ``[ref]`` whose value is ``value``."""

    __slots__ = ("value",)

    def __init__(self, value) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Spawned({self.value!r:.80})"


@remote
def t_build(spec):
    return build(spec)


@remote
def t_apply(fname, *args):
    return apply(fname, args)


@remote
def t_raise(exc_name, msg, *args):
    raise EXCEPTIONS[exc_name](msg)


@remote
def t_multi(specs):
    return tuple(build(s) for s in specs)


@remote
def t_pack(x, box):
    """A container with refs inside (the refs stay refs)."""
    return [x, box]


@remote
def t_spawn(prog, x):
    """Run ``prog`` with child tasks and puts; returns ``[ref]`` of its last value."""
    return run_prog(prog, x, remote_=True)


def run_prog(prog, x, remote_):
    """``prog``: steps ``("build", spec)``, ``("put", spec)``, ``("apply", fname, [i, ...])``,
    ``("spawn", prog, i)`` over the values so far (``x`` first).  Remote: every step makes an
    object (children, puts on this rank) and the result is ``[ref]`` of the last one.  Plain
    (the reference): the values themselves, a spawn step's value being that object's value
    (:class:`Spawned` for a ``[ref]``)."""
    vals = [x]
    for step in prog:
        op = step[0]
        if op == "build":
            vals.append(t_build.remote(step[1]) if remote_ else build(step[1]))
        elif op == "put":
            vals.append(put(build(step[1])) if remote_ else build(step[1]))
        elif op == "apply":
            args = [vals[i] for i in step[2]]
            vals.append(t_apply.remote(step[1], *args) if remote_ else apply(step[1], args))
        elif op == "spawn":
            vals.append(t_spawn.remote(step[1], vals[step[2]]) if remote_
                        else run_prog(step[1], vals[step[2]], False))
        else:
            raise ValueError(op)
    if not prog:
        return x
    if remote_:
        assert isinstance(vals[-1], ObjectRef)
        return [vals[-1]]
    return Spawned(vals[-1])
