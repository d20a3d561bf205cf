"""The simulated driver program: a random workload checked against a sequential reference.

Like ``tests/mpi/random_workload.py`` (whose value generators it shares, :mod:`.values`), but a
generator that yields where the real program would block (:mod:`.driver`).  Operations: puts,
tasks building values of every kind around the inline threshold and the chunk size, tasks of
existing objects, literal (large) arguments, ``num_returns > 1`` (also a wrong count), tasks that
raise, tasks returning refs, tasks that start child tasks and puts (:func:`.tasks.t_spawn`),
deletes (then a get, a task or a broadcast must raise ObjectDeletedError), dropped refs
(automatic freeing), broadcasts to subsets, reduce/allreduce with ``num=k`` and a target rank,
and gets along the way; at the end every live object is checked.

Every result is compared exactly with the reference; when ranks were killed, a result whose
lineage runs through a killed rank's pinned task, a reduce target that died, a child's put, or a
freed object may instead be one of the documented typed errors (RankLostError, ObjectLostError,
HopliteError).  ``failures`` collects what did not match.
"""
from __future__ import annotations

import functools
import random
from typing import Any, Iterator

import numpy as np

from .. import api
from ..errors import HopliteError, ObjectLostError, RankLostError
from .driver import Broadcast, Get, Ready, Sleep
from .tasks import Spawned, run_prog, t_apply, t_build, t_multi, t_pack, t_raise, t_spawn
from .values import (EXCEPTIONS, REDUCIBLE, Mismatch, NodeRef, Specs, _dtype, apply, build, compare,
                     digest)

LOSS_ERRORS = (RankLostError, ObjectLostError, HopliteError)


class Node:
    """One object: its ref, its reference value or expected error type names."""

    __slots__ = ("i", "ref", "ref_id", "value", "errors", "deps", "pinned", "deleted", "dropped",
                 "desc", "reduce_target", "users", "reduce", "lossy")

    def __init__(self, i, ref, desc, value=None, errors=None, deps=(), pinned=None, lossy=False):
        self.i, self.ref, self.ref_id, self.desc = i, ref, ref.id, desc
        self.value, self.errors = value, errors
        self.deps, self.pinned, self.lossy = list(deps), pinned, lossy
        self.deleted = self.dropped = False
        self.reduce_target = None
        self.users: list[int] = []
        self.reduce = None     # (op, num, inputs) of a reduce result


class Workload:
    """The driver program of one seed (``run()`` is the generator the simulator drives)."""

    OPS = {"put": 8, "build": 10, "apply": 14, "literal_arg": 3, "multi": 4, "raise": 4, "pack": 3,
           "spawn": 6, "delete": 4, "drop": 3, "broadcast": 5, "reduce": 7, "check": 6}

    def __init__(self, rng: random.Random, sim: Any, ops: int) -> None:
        self.rng, self.sim, self.ops = rng, sim, ops
        self.cfg = sim.config
        self.size = sim.size
        self.workers = list(range(1, self.size)) or [0]
        self.nodes: list[Node] = []
        self.failures: list[str] = []
        self.counts: dict[str, int] = {}
        self.specs = Specs(rng, self.cfg, rng.randrange(1 << 30),
                           max_bytes=max(8192, 2 * self.cfg.inline_threshold), max_str=2000,
                           max_objects=300)
        self.value_spec, self.array_spec, self.next_seed = \
            self.specs.value, self.specs.array, self.specs.next_seed

    # --- helpers ---
    def fail(self, msg: str, node: Node | None = None) -> None:
        if node is not None:
            msg += "\n    lineage: " + "\n             ".join(self.lineage(node))
        self.failures.append(msg)

    def lineage(self, node: Node, seen: set | None = None) -> list[str]:
        seen = set() if seen is None else seen
        out = []
        for d in node.deps:
            if d not in seen:
                seen.add(d)
                out += self.lineage(self.nodes[d], seen)
        return out + [f"{node.i} ({node.ref_id:#x}): {node.desc[:200]}"
                      + (" [deleted]" if node.deleted else "") + (" [dropped]" if node.dropped else "")]

    def add(self, ref, desc, value=None, errors=None, deps=(), pinned=None, lossy=False) -> Node:
        spec = self.sim.submitted.get(getattr(ref, "_task_id", None))
        if spec is not None and set(spec.deps) - {self.nodes[d].ref_id for d in deps}:
            # a large literal argument became a hidden put, freed once the task ended: no
            # lineage for the result after that (Scheduler.object_lost: "an input was freed")
            lossy = True
        node = Node(len(self.nodes), ref, desc, value, errors, deps, pinned, lossy)
        self.nodes.append(node)
        for d in deps:
            self.nodes[d].users.append(node.i)
        return node

    def live(self, pred=lambda n: True) -> list[Node]:
        return [n for n in self.nodes if not n.deleted and not n.dropped and pred(n)]

    def pick(self, pred=lambda n: True) -> Node | None:
        """A random live node usable as an argument (its reference value is known: not a
        spawned ``[ref]``, not a reduce still unchecked) that satisfies ``pred``."""
        cands = self.live(lambda n: not n.lossy and (n.reduce is None or n.value is not None
                                                      or n.errors) and pred(n))
        return self.rng.choice(cands) if cands else None

    def task_options(self) -> dict:
        opts: dict = {}
        if self.rng.random() < 0.25:
            opts["rank"] = self.rng.choice(self.workers)
        if self.rng.random() < 0.15:
            opts["inline_threshold"] = self.rng.choice([0, 100, self.cfg.inline_threshold])
        if self.rng.random() < 0.1 and self.size > 1:
            opts["replicas"] = self.rng.randint(1, min(3, self.size))
        return opts

    def expected_from(self, deps) -> set | None:
        errs: set = set()
        for d in deps:
            errs |= self.nodes[d].errors or set()
        return errs or None

    # --- failure semantics ---
    def may_lose(self, n: Node, seen: set | None = None) -> bool:
        """Under kills: may this node's result be a typed loss error instead of its value?"""
        victims = self.sim.lost()
        if not victims:
            return False
        if n.lossy or n.pinned in victims or n.reduce_target in victims or set(self.workers) <= victims:
            return True
        seen = set() if seen is None else seen
        for d in n.deps:
            if d in seen:
                continue
            seen.add(d)
            dn = self.nodes[d]
            if dn.deleted or dn.dropped or self.may_lose(dn, seen):
                return True
        return False

    def error_ok(self, n: Node, exc: BaseException) -> bool:
        if n.errors and type(exc).__name__ in n.errors:
            return True
        return self.may_lose(n) and isinstance(exc, LOSS_ERRORS)

    # --- checks (generators) ---
    def check(self, nodes: list[Node]) -> Iterator:
        gets = [Get(n.ref) for n in nodes]
        if gets:
            yield gets
        for n, g in zip(nodes, gets):
            yield from self.check_result(n, g.result, n.value)

    def check_result(self, n: Node, result: tuple, want: Any) -> Iterator:
        status, got = result
        if status == "error":
            if not self.error_ok(n, got):
                self.fail(f"node {n.i} ({n.desc[:200]}): get raised {type(got).__name__}: "
                          f"{str(got)[:300]}" + (f" (expected {n.errors})" if n.errors else ""), n)
            return
        if n.errors:
            self.fail(f"node {n.i} ({n.desc[:200]}): expected {n.errors}, got a value {got!r:.100}", n)
            return
        if isinstance(want, Spawned):
            if not (isinstance(got, list) and len(got) == 1 and isinstance(got[0], api.ObjectRef)):
                self.fail(f"node {n.i}: a spawned value is not [ref]: {got!r:.100}", n)
                return
            g = Get(got[0])
            yield g
            yield from self.check_result(n, g.result, want.value)
            return
        try:
            compare(got, want, self.nodes)
        except Mismatch as m:
            self.fail(f"node {n.i} ({n.desc[:200]}): {m}", n)

    def wait_users(self, x: Node) -> Iterator:
        users = [self.nodes[u].ref for u in x.users
                 if not self.nodes[u].deleted and not self.nodes[u].dropped]
        if users:
            yield Ready(users)

    # --- operations (generators) ---
    def op_put(self) -> Iterator:
        spec = self.value_spec()
        self.add(api.put(build(spec)), f"put {spec!r:.120}", value=build(spec))
        return iter(())

    def op_build(self) -> Iterator:
        spec, opts = self.value_spec(), self.task_options()
        ref = t_build.options(**opts).remote(spec)
        self.add(ref, f"t_build{opts} {spec!r:.120}", value=build(spec), pinned=opts.get("rank"))
        return iter(())

    def op_apply(self) -> Iterator:
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
        return iter(())

    def op_literal_arg(self) -> Iterator:
        spec, opts = self.value_spec(), self.task_options()
        ref = t_apply.options(**opts).remote("id", build(spec))
        self.add(ref, f"t_apply{opts} id of literal {spec!r:.100}", value=build(spec),
                 pinned=opts.get("rank"))
        return iter(())

    def op_multi(self) -> Iterator:
        k = self.rng.randint(2, 4)
        specs = [self.value_spec(1) for _ in range(k)]
        opts = self.task_options()
        wrong = self.rng.random() < 0.1
        refs = t_multi.options(num_returns=k + wrong, **opts).remote(specs)
        for j, ref in enumerate(refs):
            self.add(ref, f"t_multi{opts} wrong={wrong} return {j}",
                     value=None if wrong else build(specs[j]),
                     errors={"ValueError"} if wrong else None, pinned=opts.get("rank"))
        return iter(())

    def op_raise(self) -> Iterator:
        exc = self.rng.choice(list(EXCEPTIONS))
        dep = self.pick() if self.rng.random() < 0.5 else None
        opts = self.task_options()
        deps = [dep.i] if dep else []
        ref = t_raise.options(**opts).remote(exc, "sim", *([dep.ref] if dep else []))
        self.add(ref, f"t_raise{opts} {exc} after {deps}", errors=self.expected_from(deps) or {exc},
                 deps=deps, pinned=opts.get("rank"))
        return iter(())

    def op_pack(self) -> Iterator:
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
                 deps=[x.i], pinned=opts.get("rank"))
        return iter(())

    def gen_prog(self, depth: int) -> list:
        prog, plain = [], [0]     # indices of values that are not a spawn step's [ref]
        for _ in range(self.rng.randint(0, 4)):
            r = self.rng.random()
            if r < 0.3:
                prog.append(("build", self.value_spec(1)))
            elif r < 0.45:
                prog.append(("put", self.value_spec(1)))
            elif r < 0.85 or depth >= 2:
                fname = self.rng.choice(["id", "view", "add1", "digest", "pair"])
                prog.append(("apply", fname, [self.rng.choice(plain)
                                              for _ in range(2 if fname == "pair" else 1)]))
            else:
                prog.append(("spawn", self.gen_prog(depth + 1), self.rng.choice(plain)))
                continue
            plain.append(len(prog))
        return prog

    def op_spawn(self) -> Iterator:
        x = self.pick()
        if x is None:
            return self.op_build()
        prog, opts = self.gen_prog(1), self.task_options()
        ref = t_spawn.options(**opts).remote(prog, x.ref)
        errs = self.expected_from([x.i])
        value = None if errs else run_prog(prog, x.value, False)
        # a child's put lives only on the task's rank (no lineage): lost with it
        self.add(ref, f"t_spawn{opts} of {x.i} prog {prog!r:.200}", value=value, errors=errs,
                 deps=[x.i], pinned=opts.get("rank"), lossy=True)
        return iter(())

    def op_delete(self) -> Iterator:
        x = self.pick(lambda n: not n.errors)
        if x is None:
            return
        yield from self.wait_users(x)    # a task still to read x would see it deleted
        if x.deleted or x.dropped:
            return
        api.delete(x.ref)
        x.deleted = True
        how = self.rng.choice(["get", "get", "task", "broadcast"])
        if how == "get":
            g = Get(x.ref)
            yield g
            status, got = g.result
        elif how == "task":
            g = Get(t_apply.remote("digest", x.ref))
            yield g
            status, got = g.result
        else:
            b = Broadcast(self.sim, x.ref, list(range(self.size)))
            yield b
            status, got = ("error", b.result) if b.result is not None else ("ok", None)
        if status == "ok" or type(got).__name__ != "ObjectDeletedError":
            if not (status == "error" and self.may_lose(x) and isinstance(got, LOSS_ERRORS)):
                self.fail(f"node {x.i} ({x.desc[:200]}): {how} after delete gave "
                          f"{status} {type(got).__name__}: {str(got)[:200]}", x)

    def op_drop(self) -> Iterator:
        x = self.pick(lambda n: True) if self.rng.random() < 0.5 else \
            (self.rng.choice(self.live()) if self.live() else None)
        if x is None:
            return
        yield from self.wait_users(x)
        x.dropped = True
        x.ref = None

    def op_broadcast(self) -> Iterator:
        x = self.pick()
        if x is None:
            return
        rng = self.rng
        ranks = list(range(self.size)) if rng.random() < 0.3 else \
            sorted(rng.sample(range(self.size), rng.randint(1, self.size)))
        b = Broadcast(self.sim, x.ref, ranks)
        yield b
        exc = b.result
        if exc is None and x.errors and not self.may_lose(x):
            self.fail(f"node {x.i} ({x.desc[:200]}): broadcast to {ranks} of a failed object returned", x)
        if exc is not None:
            if not self.error_ok(x, exc):
                self.fail(f"node {x.i} ({x.desc[:200]}): broadcast to {ranks} raised "
                          f"{type(exc).__name__}: {str(exc)[:300]}", x)
            return
        targets = [r for r in ranks if r in self.workers and r != 0]
        if targets:     # read it where it was sent
            r = rng.choice(targets)
            ref = t_apply.options(rank=r).remote("digest", x.ref)
            self.add(ref, f"digest on rank {r} of broadcast node {x.i}",
                     value=None if x.errors else digest(x.value), errors=x.errors, deps=[x.i], pinned=r)

    def op_reduce(self) -> Iterator:
        rng = self.rng
        op = rng.choice(["sum", "max", "min", "prod", "sum"])
        dtype = rng.choice(REDUCIBLE)
        if op in ("max", "min") and _dtype(dtype).kind == "c":
            dtype = "f8"
        if op == "prod" and _dtype(dtype).kind == "f" and _dtype(dtype).itemsize == 2:
            dtype = "f4"
        shape = build(self.array_spec(dtype=dtype, prod_safe=(op == "prod"))).shape
        if not shape:        # (asfortranarray makes a 0-d array 1-d: shapes would differ)
            shape = (1,)
        if int(np.prod(shape)) == 0 and rng.random() < 0.7:
            shape = (rng.randint(1, 3000),)
        inputs = []
        for _ in range(rng.randint(1, max(2, min(7, len(self.workers) + 3)))):
            spec = ("nd", dtype, shape, rng.choice(["C", "F"]), self.next_seed(), None, op == "prod")
            if rng.random() < 0.3:
                n = self.add(api.put(build(spec)), f"put array {spec}", value=build(spec))
            else:
                opts = self.task_options()
                opts.pop("inline_threshold", None)
                n = self.add(t_build.options(**opts).remote(spec), f"t_build{opts} array {spec}",
                             value=build(spec), pinned=opts.get("rank"))
                if rng.random() < 0.3:       # a task returning its (received) argument
                    opts = self.task_options()
                    ref2 = t_apply.options(**opts).remote("id", n.ref)
                    n = self.add(ref2, f"t_apply{opts} id of {n.i} (array)", value=n.value,
                                 deps=[n.i], pinned=opts.get("rank"))
            inputs.append(n)
        if rng.random() < 0.1:     # a failed input
            exc = rng.choice(list(EXCEPTIONS))
            inputs.append(self.add(t_raise.remote(exc, "reduce input"), f"t_raise {exc}", errors={exc}))
        if rng.random() < 0.2:
            inputs.append(inputs[0])
        num = None if rng.random() < 0.5 else rng.randint(1, len(inputs))
        allred = rng.random() < 0.3
        target = None if allred or rng.random() < 0.6 else rng.randrange(self.size)
        refs = [n.ref for n in inputs]
        red = api.allreduce(refs, op=op, num=num) if allred else \
            api.reduce(refs, op=op, num=num, rank=target)
        node = self.add(red, f"{'allreduce' if allred else 'reduce'} {op} num={num} target={target} "
                             f"of {[n.i for n in inputs]} {dtype}{shape}", deps=[n.i for n in inputs])
        node.reduce_target = target
        node.reduce = (op, num, inputs)
        if rng.random() < 0.5:
            yield from self.check_reduce(node)
        else:
            self.pending_reduces.append(node)

    def check_reduce(self, node: Node) -> Iterator:
        """Wait for a reduce and set its reference value from the inputs it used."""
        yield Ready([node.ref])
        op, num, inputs = node.reduce
        failing = [n for n in inputs if n.errors]
        exc = node.ref.exception(0)
        if exc is not None:
            if failing and type(exc).__name__ in set().union(*(n.errors for n in failing)):
                node.errors = set().union(*(n.errors for n in failing))
            elif self.error_ok(node, exc):
                node.errors = {type(exc).__name__}
            else:
                self.fail(f"node {node.i} ({node.desc}): reduce failed with {type(exc).__name__}: "
                          f"{str(exc)[:300]}", node)
                node.errors = {type(exc).__name__}
            return
        used = self.sim.rt0.reduced.get(node.ref_id)
        by_id: dict = {}
        for n in inputs:
            by_id.setdefault(n.ref_id, n)
        k = len(inputs) if num is None else num
        if used is None or len(used) != k or not all(i in by_id for i in used):
            self.fail(f"node {node.i} ({node.desc}): reduce used {used}, expected {k} of the inputs", node)
            node.errors = {"?"}
            return
        if any(by_id[i].errors for i in used):
            self.fail(f"node {node.i} ({node.desc}): reduce of a failed input gave a value", node)
            node.errors = {"?"}
            return
        ufunc = getattr(np, {"sum": "add", "prod": "multiply", "max": "maximum", "min": "minimum"}[op])
        vals = [by_id[i].value for i in used]
        value = functools.reduce(lambda a, b: ufunc(a, b), vals) if len(vals) > 1 else vals[0].copy()
        node.value = np.asarray(value, dtype=vals[0].dtype).astype(vals[0].dtype)

    def op_check(self) -> Iterator:
        cands = self.live(lambda n: n.reduce is None or n.value is not None or n.errors)
        if cands:
            yield from self.check(self.rng.sample(cands, min(len(cands), self.rng.randint(1, 5))))

    # --- the program ---
    def run(self) -> Iterator:
        """The driver program (a generator of waitables)."""
        self.pending_reduces: list[Node] = []
        ops, weights = zip(*self.OPS.items())
        for _ in range(self.ops):
            op = self.rng.choices(ops, weights)[0]
            self.counts[op] = self.counts.get(op, 0) + 1
            yield from getattr(self, "op_" + op)()
            if self.rng.random() < 0.4:
                yield Sleep(self.rng.uniform(0, 2e-3))
        for node in self.pending_reduces:
            if not node.dropped and not node.deleted:
                yield from self.check_reduce(node)
        yield from self.check(self.live())
        live = [n.ref for n in self.live()]
        if live and self.rng.random() < 0.5:
            api.delete(live)
        for n in self.nodes:
            n.ref = None
        del live
