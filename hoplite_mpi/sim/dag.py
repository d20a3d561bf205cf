"""The random DAG both random workloads build: the simulation's driver program
(:mod:`.workload`) and the real-MPI tester (``tests/mpi/random_workload.py``).

:class:`RandomDag` holds the objects made so far (:class:`Node`: a ref and its reference value
or expected error types), draws task options, and makes the operations whose generation is the
same in both: puts, tasks building values, ``apply`` tasks of existing objects, literal (large)
arguments, ``num_returns > 1`` (also a wrong count), tasks that raise, tasks returning refs; the
element type of a reduce; after a reduce, its reference value from the inputs it used; after a
broadcast, a task reading the object where it was sent.  Each operation draws from ``rng`` in the
same order in both, so a seed's workload is the one it was before this module existed.

What differs stays with each workload: how it waits (the simulation yields, the tester blocks
with timeouts), the operations only one of them has, and when a result may be a loss error
(:meth:`RandomDag.may_lose`: the simulation kills any ranks, the tester one victim).
"""
from __future__ import annotations

import functools
import random
from typing import Any, Callable, Optional

import numpy as np

from ..api import put
from ..errors import HopliteError, ObjectLostError, RankLostError
from .tasks import t_apply, t_build, t_multi, t_pack, t_raise
from .values import (EXCEPTIONS, REDUCIBLE, Mismatch, NodeRef, Specs, _dtype, apply, build,
                     compare, digest)

LOSS_ERRORS = (RankLostError, ObjectLostError, HopliteError)
UFUNCS = {"sum": "add", "prod": "multiply", "max": "maximum", "min": "minimum"}


class Node:
    """One object: its ref, its reference value or expected error type names (``errors``).

    ``deps``: nodes its task takes as arguments; ``nested``: nodes whose refs are nested in its
    arguments; ``users``: nodes whose tasks take this one; ``pinned``: the rank its task was
    pinned to; ``lossy``: no lineage can recompute it (a loss error is allowed under kills);
    ``reduce``: ``(op, num, inputs)`` of a reduce result, ``reduce_target`` its rank."""

    __slots__ = ("i", "ref", "ref_id", "value", "errors", "deps", "nested", "pinned", "deleted",
                 "dropped", "desc", "reduce_target", "users", "reduce", "lossy")

    def __init__(self, i, ref, desc, value=None, errors=None, deps=(), nested=(), pinned=None,
                 lossy=False):
        self.i, self.ref, self.ref_id, self.desc = i, ref, ref.id, desc
        self.value, self.errors = value, errors
        self.deps, self.nested, self.pinned, self.lossy = list(deps), list(nested), pinned, lossy
        self.deleted = self.dropped = False
        self.reduce_target = None
        self.users: list[int] = []
        self.reduce = None


class RandomDag:
    """The objects of one workload and the operations both workloads make.

    Args:
        rng: the workload's random source (every draw of an operation comes from it).
        size: ranks in the job (ranks 1.. run tasks; rank 0 alone: it does).
        specs: the value specs drawn (:class:`~.values.Specs` over ``rng`` and the job's
            config, whose inline threshold task options use too).

    A subclass says whether task options may ask for replicas (``REPLICAS``), what message the
    exceptions of ``t_raise`` tasks carry (``raise_msg``), and how its programs of child tasks
    look (:meth:`gen_prog`: ``PROG_MIN``, ``CHILD``, ``CHILD_PLAIN``).
    """

    REPLICAS = False
    raise_msg = "raised by a test task"
    PROG_MIN = 1            # steps of a program at least (at most 4)
    CHILD = "nested"        # the step kind of a child running its own program
    CHILD_PLAIN = True      # whether a child's value is plain (usable by later steps)

    def __init__(self, rng: random.Random, size: int, specs: Specs) -> None:
        self.rng, self.size, self.specs = rng, size, specs
        self.nodes: list[Node] = []
        self.failures: list[str] = []
        self.counts: dict[str, int] = {}

    @property
    def workers(self) -> list[int]:
        """The ranks that run tasks."""
        return list(range(1, self.size)) or [0]

    # --- the nodes ---
    def fail(self, msg: str, node: Optional[Node] = None) -> None:
        """Record a failure (with ``node``'s lineage)."""
        if node is not None:
            msg += "\n    lineage: " + "\n             ".join(self.lineage(node))
        self.failures.append(msg)

    def lineage(self, node: Node, seen: Optional[set] = None) -> list[str]:
        seen = set() if seen is None else seen
        out = []
        for d in node.deps + node.nested:
            if d not in seen:
                seen.add(d)
                out += self.lineage(self.nodes[d], seen)
        return out + [f"{node.i} ({node.ref_id:#x}): {node.desc[:200]}"
                      + (" [deleted]" if node.deleted else "") + (" [dropped]" if node.dropped else "")]

    def add(self, ref, desc, value=None, errors=None, deps=(), nested=(), pinned=None,
            lossy=False) -> Node:
        node = Node(len(self.nodes), ref, desc, value, errors, deps, nested, pinned, lossy)
        self.nodes.append(node)
        for d in list(deps) + list(nested):
            self.nodes[d].users.append(node.i)
        return node

    def live(self, pred: Callable[[Node], bool] = lambda n: True) -> list[Node]:
        return [n for n in self.nodes if not n.deleted and not n.dropped and pred(n)]

    def usable(self, n: Node) -> bool:
        """Whether a live node may be an argument (its reference value is known)."""
        return True

    def pick(self, pred: Callable[[Node], bool] = lambda n: True) -> Optional[Node]:
        """A random usable live node that satisfies ``pred`` (None: there is none)."""
        cands = self.live(lambda n: self.usable(n) and pred(n))
        return self.rng.choice(cands) if cands else None

    def task_options(self) -> dict:
        opts: dict = {}
        if self.rng.random() < 0.25:
            opts["rank"] = self.rng.choice(self.workers)
        if self.rng.random() < 0.15:
            opts["inline_threshold"] = self.rng.choice([0, 100, self.specs.cfg.inline_threshold])
        if self.REPLICAS and self.rng.random() < 0.1 and self.size > 1:
            opts["replicas"] = self.rng.randint(1, min(3, self.size))
        return opts

    def expected_from(self, deps) -> Optional[set]:
        """The error types a task of ``deps`` must fail with (those of its failed deps), or None."""
        errs: set = set()
        for d in deps:
            errs |= self.nodes[d].errors or set()
        return errs or None

    # --- failure semantics ---
    def may_lose(self, n: Node) -> bool:
        """Under kills: may this node's result be a typed loss error instead of its value?"""
        raise NotImplementedError

    def error_ok(self, n: Node, exc: BaseException) -> bool:
        if n.errors and type(exc).__name__ in n.errors:
            return True
        return self.may_lose(n) and isinstance(exc, LOSS_ERRORS)

    def compare(self, n: Node, got: Any, want: Any) -> None:
        """Fail unless ``got`` is exactly ``want`` (the reference value of ``n``)."""
        try:
            compare(got, want, self.nodes)
        except Mismatch as m:
            self.fail(f"node {n.i} ({n.desc[:200]}): {m}", n)

    # --- operations (the same draws in both workloads) ---
    def op_put(self) -> None:
        spec = self.specs.value()
        self.add(put(build(spec)), f"put {spec!r:.120}", value=build(spec))

    def op_build(self) -> None:
        spec, opts = self.specs.value(), self.task_options()
        ref = t_build.options(**opts).remote(spec)
        self.add(ref, f"t_build{opts} {spec!r:.120}", value=build(spec), pinned=opts.get("rank"))

    def op_apply(self) -> None:
        fname = self.rng.choice(["id", "id", "view", "add1", "pair", "digest"])
        args = [self.pick() for _ in range(2 if fname == "pair" else 1)]
        if any(a is None for a in args):
            return self.op_put()
        opts = self.task_options()
        ref = t_apply.options(**opts).remote(fname, *[a.ref for a in args])
        deps = [a.i for a in args]
        errs = self.expected_from(deps)
        value = None if errs else apply(fname, [a.value for a in args])
        self.add(ref, f"t_apply{opts} {fname} of {deps}", value=value, errors=errs, deps=deps,
                 pinned=opts.get("rank"))

    def op_literal_arg(self) -> None:
        """A task given a (possibly large) value directly: large ones become objects."""
        spec, opts = self.specs.value(), self.task_options()
        ref = t_apply.options(**opts).remote("id", build(spec))
        self.add(ref, f"t_apply{opts} id of literal {spec!r:.100}", value=build(spec),
                 pinned=opts.get("rank"))

    def op_multi(self) -> None:
        k = self.rng.randint(2, 4)
        specs = [self.specs.value(1) for _ in range(k)]
        opts = self.task_options()
        wrong = self.rng.random() < 0.1
        refs = t_multi.options(num_returns=k + wrong, **opts).remote(specs)
        for j, ref in enumerate(refs):
            self.add(ref, f"t_multi{opts} wrong={wrong} return {j}",
                     value=None if wrong else build(specs[j]),
                     errors={"ValueError"} if wrong else None, pinned=opts.get("rank"))

    def op_raise(self) -> None:
        exc = self.rng.choice(list(EXCEPTIONS))
        dep = self.pick() if self.rng.random() < 0.5 else None
        opts = self.task_options()
        deps = [dep.i] if dep else []
        ref = t_raise.options(**opts).remote(exc, self.raise_msg, *([dep.ref] if dep else []))
        self.add(ref, f"t_raise{opts} {exc} after {deps}", errors=self.expected_from(deps) or {exc},
                 deps=deps, pinned=opts.get("rank"))

    def op_pack(self) -> None:
        x = self.pick()
        inner = [self.pick() for _ in range(self.rng.randint(0, 3))]
        if x is None or any(n is None for n in inner):
            return self.op_build()
        box = {"refs": [n.ref for n in inner], "tag": self.rng.randint(0, 99)}
        opts = self.task_options()
        ref = t_pack.options(**opts).remote(x.ref, box)
        errs = self.expected_from([x.i])
        value = None if errs else [x.value, {"refs": [NodeRef(n.i, n.ref.hex()) for n in inner],
                                             "tag": box["tag"]}]
        self.add(ref, f"t_pack{opts} of {x.i} box {[n.i for n in inner]}", value=value, errors=errs,
                 deps=[x.i], nested=[n.i for n in inner], pinned=opts.get("rank"))

    def gen_prog(self, depth: int) -> list:
        """A program for a task that starts children: steps ``("build", spec)``, ``("put",
        spec)``, ``("apply", fname, [i, ...])`` over the plain values so far (the task's
        argument first), and below ``depth`` 2 ``(CHILD, program, i)``."""
        prog, plain = [], [0]     # indices of the values later steps may use
        for _ in range(self.rng.randint(self.PROG_MIN, 4)):
            r = self.rng.random()
            if r < 0.3:
                prog.append(("build", self.specs.value(1)))
            elif r < 0.45:
                prog.append(("put", self.specs.value(1)))
            elif r < 0.85 or depth >= 2:
                fname = self.rng.choice(["id", "view", "add1", "digest", "pair"])
                prog.append(("apply", fname, [self.rng.choice(plain)
                                              for _ in range(2 if fname == "pair" else 1)]))
            else:
                prog.append((self.CHILD, self.gen_prog(depth + 1), self.rng.choice(plain)))
                if not self.CHILD_PLAIN:
                    continue
            plain.append(len(prog))
        return prog

    def read_where_sent(self, x: Node, ranks) -> None:
        """After a broadcast of ``x`` to ``ranks``: a task on one of them digests it."""
        targets = [r for r in ranks if r in self.workers and r != 0]
        if targets:
            r = self.rng.choice(targets)
            ref = t_apply.options(rank=r).remote("digest", x.ref)
            self.add(ref, f"digest on rank {r} of broadcast node {x.i}",
                     value=None if x.errors else digest(x.value), errors=x.errors, deps=[x.i], pinned=r)

    # --- reduce ---
    def reduce_kind(self) -> tuple[str, str, tuple]:
        """A reduce's op and dtype (one the op is exact for), and an array spec of that dtype."""
        rng = self.rng
        op = rng.choice(["sum", "max", "min", "prod", "sum"])
        dtype = rng.choice(REDUCIBLE)
        if op in ("max", "min") and _dtype(dtype).kind == "c":
            dtype = "f8"
        if op == "prod" and _dtype(dtype).kind == "f" and _dtype(dtype).itemsize == 2:
            dtype = "f4"
        return op, dtype, self.specs.array(dtype=dtype, prod_safe=(op == "prod"))

    def failed_input(self) -> Node:
        """A reduce input whose task raises."""
        exc = self.rng.choice(list(EXCEPTIONS))
        return self.add(t_raise.remote(exc, "reduce input"), f"t_raise {exc}", errors={exc})

    def reduce_failed(self, node: Node, exc: BaseException) -> None:
        """The reduce of ``node`` raised ``exc``: its expected errors are those of its failed
        inputs if ``exc`` is one of them, else ``exc``'s type (a failure unless allowed)."""
        failing = set().union(*(n.errors for n in node.reduce[2] if n.errors))
        if type(exc).__name__ in failing:
            node.errors = failing
            return
        if not self.error_ok(node, exc):
            self.fail(f"node {node.i} ({node.desc}): reduce failed with {type(exc).__name__}: "
                      f"{str(exc)[:300]}", node)
        node.errors = {type(exc).__name__}

    def reduce_done(self, node: Node, used: Optional[list]) -> None:
        """The reduce of ``node`` completed with the inputs of ids ``used``: check that they are
        as many as asked of its inputs, none failed, and set its reference value."""
        op, num, inputs = node.reduce
        by_id: dict = {}
        for n in inputs:
            by_id.setdefault(n.ref_id, n)
        k = len(inputs) if num is None else num
        if used is None or len(used) != k or not all(i in by_id for i in used):
            self.fail(f"node {node.i} ({node.desc}): reduce used {used}, expected {k} of the inputs", node)
            node.errors = {"?"}
            return
        if len(set(used)) != len(used) and len(by_id) == len(inputs):
            self.fail(f"node {node.i} ({node.desc}): reduce used an input twice: {used}", node)
        if any(by_id[i].errors for i in used):
            self.fail(f"node {node.i} ({node.desc}): reduce of a failed input gave a value", node)
            node.errors = {"?"}
            return
        ufunc = getattr(np, UFUNCS[op])
        vals = [by_id[i].value for i in used]
        value = functools.reduce(lambda a, b: ufunc(a, b), vals) if len(vals) > 1 else vals[0].copy()
        node.value = np.asarray(value, dtype=vals[0].dtype).astype(vals[0].dtype)
