"""The simulated driver program: a random workload checked against a sequential reference.

Like ``tests/mpi/random_workload.py`` (whose values, :mod:`.values`, and operations of the same
draws, :mod:`.dag`, it shares), but a generator that yields where the real program would block
(:mod:`.driver`).  Operations: puts,
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

import random
from typing import Any, Iterator

import numpy as np

from .. import api
from .dag import LOSS_ERRORS, Node, RandomDag
from .driver import Broadcast, Get, Ready, Sleep
from .tasks import Spawned, run_prog, t_apply, t_build, t_spawn
from .values import Specs, build


class Workload(RandomDag):
    """The driver program of one seed (``run()`` is the generator the simulator drives)."""

    OPS = {"put": 8, "build": 10, "apply": 14, "literal_arg": 3, "multi": 4, "raise": 4, "pack": 3,
           "spawn": 6, "delete": 4, "drop": 3, "broadcast": 5, "reduce": 7, "check": 6}
    REPLICAS = True
    raise_msg = "sim"
    PROG_MIN, CHILD, CHILD_PLAIN = 0, "spawn", False     # (a spawn step's value is [ref])

    def __init__(self, rng: random.Random, sim: Any, ops: int) -> None:
        cfg = sim.config
        specs = Specs(rng, cfg, rng.randrange(1 << 30), max_bytes=max(8192, 2 * cfg.inline_threshold),
                      max_str=2000, max_objects=300)
        super().__init__(rng, sim.size, specs)
        self.sim, self.ops = sim, ops
        self.pending_reduces: list[Node] = []

    def add(self, ref, desc, value=None, errors=None, deps=(), nested=(), pinned=None,
            lossy=False) -> Node:
        """As :meth:`RandomDag.add`; ``nested`` is not recorded: no simulated task reads the refs
        nested in its arguments (they are only compared), so a delete need not wait for it."""
        spec = self.sim.submitted.get(getattr(ref, "_task_id", None))
        if spec is not None and set(spec.deps) - {self.nodes[d].ref_id for d in deps}:
            # a large literal argument became a hidden put, freed once the task ended: no
            # lineage for the result after that (Scheduler.object_lost: "an input was freed")
            lossy = True
        return super().add(ref, desc, value, errors, deps, (), pinned, lossy)

    def usable(self, n: Node) -> bool:
        """Not a spawned ``[ref]`` (no lineage), not a reduce still unchecked (no value yet)."""
        return not n.lossy and (n.reduce is None or n.value is not None or n.errors)

    # --- failure semantics ---
    def may_lose(self, n: Node, seen: set | None = None) -> bool:
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
        self.compare(n, got, want)

    def wait_users(self, x: Node) -> Iterator:
        users = [self.nodes[u].ref for u in x.users
                 if not self.nodes[u].deleted and not self.nodes[u].dropped]
        if users:
            yield Ready(users)

    # --- operations only the simulation has, or that wait (generators) ---
    def op_spawn(self) -> None:
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
        self.read_where_sent(x, ranks)

    def op_reduce(self) -> Iterator:
        rng = self.rng
        op, dtype, spec0 = self.reduce_kind()
        shape = build(spec0).shape
        if not shape:        # (asfortranarray makes a 0-d array 1-d: shapes would differ)
            shape = (1,)
        if int(np.prod(shape)) == 0 and rng.random() < 0.7:
            shape = (rng.randint(1, 3000),)
        inputs = []
        for _ in range(rng.randint(1, max(2, min(7, len(self.workers) + 3)))):
            spec = ("nd", dtype, shape, rng.choice(["C", "F"]), self.specs.next_seed(), None,
                    op == "prod")
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
        if rng.random() < 0.1:
            inputs.append(self.failed_input())
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
        exc = node.ref.exception(0)
        if exc is not None:
            self.reduce_failed(node, exc)
        else:
            self.reduce_done(node, self.sim.rt0.reduced.get(node.ref_id))

    def op_check(self) -> Iterator:
        cands = self.live(lambda n: n.reduce is None or n.value is not None or n.errors)
        if cands:
            yield from self.check(self.rng.sample(cands, min(len(cands), self.rng.randint(1, 5))))

    # --- the program ---
    def run(self) -> Iterator:
        """The driver program (a generator of waitables)."""
        ops, weights = zip(*self.OPS.items())
        for _ in range(self.ops):
            op = self.rng.choices(ops, weights)[0]
            self.counts[op] = self.counts.get(op, 0) + 1
            yield from getattr(self, "op_" + op)() or ()     # (None: it waits for nothing)
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
