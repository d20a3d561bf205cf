"""Random-workload differential tester (issue 10, "Correct under any input").

    hoplite-mpi run -n 4 tests/mpi/random_workload.py --seed 123 [--seeds K] [--ops 60]
        [--include-known] [--json OUT]

Each seed builds a fresh random DAG (plain ``random.Random(seed)``) of puts, tasks (values of
every kind users pass: ints, floats, complex, str, bytes, None, lists/tuples/dicts with nested
refs, numpy arrays of every dtype, 0-d/empty/1-element/odd sizes around the inline threshold and
the chunk size, Fortran order, non-contiguous views, the argument itself returned), tasks with
``num_returns > 1``, nested tasks (tasks that submit, put and get), tasks that raise, deletes
followed by gets, broadcasts to subsets, reduce/allreduce with commutative ops and ``num=k``,
gets and waits with timeouts.  Every value is compared with a sequential reference: the driver
evaluates the same DAG with plain Python in the same job.  A failing seed prints a one-line
replay command.  ``--seeds K`` runs seeds S..S+K-1 one after another in one job.

Under ULFM with ``HOPLITE_MPI_KILL=RANK:POINT:N`` set (see hoplite_mpi/faults.py) the victim
rank is read from that variable: every result must still be exact, or a documented typed error
(RankLostError / ObjectLostError / HopliteError for a reduce whose target died) for results
whose lineage runs through the victim's pinned tasks or through freed objects.

Bugs already known (being fixed elsewhere) are only generated with ``--include-known``; see
KNOWN below.

The functions used by tasks live in this module, which worker ranks import by name as
``random_workload`` (the script's directory is on every rank's ``sys.path``), so they are
pickled by reference, not by value.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import hashlib
import json
import os
import random
import sys
import time
import traceback

import numpy as np

import hoplite_mpi as hm
from hoplite_mpi.errors import (HopliteError, ObjectDeletedError, ObjectLostError,
                                RankLostError)

T = 120.0   # seconds: the bound of every get/wait/broadcast that must succeed

# Known bugs, produced only with --include-known (name -> what it is)
KNOWN = {
    "identity_large_reduce": "a task returning its numpy argument, then reduced (MPI_ERR_TRUNCATE; "
                             "reported for > 64 KiB, seen here for 3 elements too: seed 13)",
    "reduce_empty": "reduce of empty arrays",
    "reduce_dup": "the same ref twice in one reduce ([a, a])",
    "reduce_noncommutative": "reduce with a non-commutative op (subtract)",
    "deleted_cached": "a deleted small object still readable by get in a task on a worker "
                      "that cached it",
    "api_right_after_init": "tasks calling the API right after init (NotInitializedError)",
    "reduce_target_dead": "ULFM: a reduce whose target rank is already dead never completes "
                          "(documented: HopliteError) -- found by this tester (seed 800)",
    "drop_before_end": "ULFM: refs dropped right before the end hang in MPI_Finalize",
}


# ==== values: built from a spec, deterministically, on any rank ==================================

INT_DTYPES = ["i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", ">i4", ">u2"]
FLOAT_DTYPES = ["f2", "f4", "f8", "g", ">f8"]
COMPLEX_DTYPES = ["c8", "c16", "G"]
OTHER_DTYPES = ["?", "S5", "U3", "M8[s]", "m8[ms]", "V6", "O",
                [("a", "<i4"), ("b", "<f8"), ("c", "S3")],
                [("x", ">u2"), ("y", "?", (2,))]]
REDUCIBLE = INT_DTYPES + FLOAT_DTYPES + COMPLEX_DTYPES + ["?"]


def _dtype(d):
    return np.dtype([tuple(f) for f in d]) if isinstance(d, list) else np.dtype(d)


def _array(dtype, n, seed, prod_safe=False):
    """A 1-d array of ``n`` elements of ``dtype`` with small exact values."""
    dt = _dtype(dtype)
    g = np.random.default_rng(seed)
    k = dt.kind
    if k in "iu":
        lo = 0 if k == "u" else -3
        return g.integers(lo, 4, size=n).astype(dt)
    if k == "f":
        vals = [-1.0, 1.0, 2.0, 0.5] if prod_safe else [-3, -2, -1, 0, 1, 2, 3]
        return np.asarray(g.choice(vals, size=n)).astype(dt)
    if k == "c":
        vals = [1, -1, 2, 0.5] if prod_safe else [-2, -1, 0, 1, 2]
        re, im = g.choice(vals, size=n), g.choice([0, 1, -1] if not prod_safe else [0], size=n)
        return (re + 1j * im).astype(dt)
    if k == "b":
        return g.integers(0, 2, size=n).astype(bool)
    if k == "O":
        return np.array([int(v) for v in g.integers(-9, 9, size=n)] if n else [], dtype=object)
    raw = g.integers(0, 256, size=n * dt.itemsize, dtype=np.uint8)
    if k in "SV" or dt.fields:
        if k == "S":
            raw = g.integers(97, 123, size=n * dt.itemsize, dtype=np.uint8)
        arr = raw.view(dt) if n else np.empty(0, dt)
        if dt.fields:   # no NaN payloads in float fields: keep them exact and comparable
            for name in dt.names:
                if _dtype(dt.fields[name][0]).kind == "f":
                    arr[name] = g.integers(-5, 5, size=(n,) + dt.fields[name][0].shape)
        return arr
    if k == "U":
        return np.array(["".join(chr(97 + int(c)) for c in g.integers(0, 26, size=3)) for _ in range(n)],
                        dtype=dt)
    if k in "Mm":
        return g.integers(0, 10**9, size=n).astype(np.int64).view(dt)
    raise ValueError(f"dtype {dt}")


def build(spec):
    """The value a spec stands for (the same on every rank)."""
    kind = spec[0]
    if kind == "lit":
        return spec[1]
    if kind == "bytes":
        return bytes(np.random.default_rng(spec[1]).integers(0, 256, size=spec[2], dtype=np.uint8))
    if kind == "str":
        g = np.random.default_rng(spec[1])
        return "".join(chr(int(c)) for c in g.choice([97, 98, 0xE9, 0x3B1, 0x1F600], size=spec[2]))
    if kind == "list":
        return [build(s) for s in spec[1]]
    if kind == "tuple":
        return tuple(build(s) for s in spec[1])
    if kind == "dict":
        return {k: build(s) for k, s in spec[1]}
    if kind == "npscalar":
        return _array(spec[1], 1, spec[2])[0]
    if kind == "nd":
        _, dtype, shape, order, seed, view, prod_safe = spec
        n = int(np.prod(shape))
        a = _array(dtype, n, seed, prod_safe).reshape(shape, order=order)
        if order == "F":
            a = np.asfortranarray(a)
        if view == "step" and a.ndim:
            a = a[::2]
        elif view == "rev" and a.ndim:
            a = a[::-1]
        elif view == "T":
            a = a.T
        elif view == "col" and a.ndim == 2:
            a = a[:, 1:]
        return a
    raise ValueError(f"spec {spec!r}")


# ==== what tasks do: the same function on the worker and in the reference ======================

class Boom(Exception):
    """A user exception defined in this module (raised by tasks)."""


EXCEPTIONS = {"KeyError": KeyError, "ValueError": ValueError, "ZeroDivisionError": ZeroDivisionError,
              "Boom": Boom, "RuntimeError": RuntimeError}


def canon(x, h):
    """Feed a canonical encoding of ``x`` into hash ``h`` (arrays: dtype, shape, bytes)."""
    if isinstance(x, np.ndarray):
        # byte order is not compared: numpy's own pickling of a non-contiguous non-native-order
        # array gives a native-order one (all pickle protocols), so values are what counts
        if x.dtype.kind != "O" and not x.dtype.isnative:
            x = x.astype(x.dtype.newbyteorder("="))
        if x.dtype.kind in "fc":
            # -0.0 == 0.0: the sign of a zero product depends on the reduce's (arrival) order
            x = x + x.dtype.type(0)
        h.update(b"nd" + x.dtype.str.encode() + repr(x.dtype.descr).encode() + repr(x.shape).encode())
        if x.dtype.kind == "O" or (x.dtype.kind in "fc" and x.dtype.itemsize > 8 and not x.dtype.fields):
            # objects; long doubles (x87: 10 of their 16 bytes are the value, the rest padding)
            for v in (x.ravel() if x.dtype.kind == "O" else x.ravel().tolist()):
                canon(v, h)
        else:
            h.update(np.ascontiguousarray(x).tobytes())
    elif isinstance(x, (list, tuple)):
        h.update(type(x).__name__.encode() + str(len(x)).encode())
        for v in x:
            canon(v, h)
    elif isinstance(x, dict):
        h.update(b"dict" + str(len(x)).encode())
        for k, v in x.items():
            canon(k, h)
            canon(v, h)
    elif isinstance(x, hm.ObjectRef):
        h.update(b"ref" + x.hex().encode())
    elif isinstance(x, NodeRef):          # the reference's stand-in for a nested ref
        h.update(b"ref" + x.hex.encode())
    else:
        h.update(type(x).__name__.encode() + repr(x).encode())


def digest(x):
    h = hashlib.sha256()
    canon(x, h)
    return h.hexdigest()[:16]


def apply(fname, args):
    """The plain function of an ``apply`` task."""
    if fname == "id":
        return args[0]
    if fname == "view":
        x = args[0]
        if isinstance(x, np.ndarray) and x.ndim >= 1:
            return x[::2] if x.ndim == 1 else x.T[1:]
        return x
    if fname == "add1":
        x = args[0]
        if isinstance(x, np.ndarray) and x.dtype.kind in "iufc" and x.dtype.kind != "O":
            return x + x.dtype.type(1)
        if isinstance(x, (bytes, str)):
            return x[::-1]
        if isinstance(x, (int, float, complex)) and not isinstance(x, bool):
            return x * 3 + 1
        return ("wrapped", x)
    if fname == "pair":
        return tuple(args)
    if fname == "digest":
        return digest(args[0])
    if fname == "rank_digest":
        return digest(args[0])
    raise ValueError(fname)


@hm.remote
def t_build(spec):
    return build(spec)


@hm.remote
def t_apply(fname, *args):
    return apply(fname, args)


@hm.remote
def t_sleep(seconds, x):
    time.sleep(seconds)
    return x


@hm.remote
def t_raise(exc_name, msg, *args):
    raise EXCEPTIONS[exc_name](msg)


@hm.remote
def t_multi(specs):
    return tuple(build(s) for s in specs)


@hm.remote
def t_pack(x, box):
    """Returns a container with refs inside (the refs stay refs)."""
    return [x, box]


@hm.remote
def t_deref(box):
    """Gets the refs nested in ``box`` inside the task; digest of their values."""
    return digest(hm.get(list(box["refs"]), timeout=T))


@hm.remote
def t_nested(prog, x):
    return run_prog(prog, x, remote=True)


def run_prog(prog, x, remote):
    """A small program run inside a task (``remote``: with tasks/puts/gets) or plainly."""
    vals = [x]
    for step in prog:
        op = step[0]
        if op == "build":
            vals.append(t_build.remote(step[1]) if remote else build(step[1]))
        elif op == "put":
            vals.append(hm.put(build(step[1])) if remote else build(step[1]))
        elif op == "apply":
            args = [vals[i] for i in step[2]]
            vals.append(t_apply.remote(step[1], *args) if remote else apply(step[1], args))
        elif op == "nested":
            vals.append(t_nested.remote(step[1], vals[step[2]]) if remote
                        else run_prog(step[1], vals[step[2]], False))
        else:
            raise ValueError(op)
    last = vals[-1]
    if remote and isinstance(last, hm.ObjectRef):
        return hm.get(last, timeout=T)
    return last


# ==== the generator ================================================================================

class Node:
    """One object of the DAG: its ref, its reference value or expected error types."""
    __slots__ = ("i", "ref", "value", "errors", "deps", "nested", "pinned", "deleted", "dropped",
                 "desc", "reduce_target", "users", "array", "ref_id")

    def __init__(self, i, ref, desc, value=None, errors=None, deps=(), nested=(), pinned=None):
        self.i, self.ref, self.desc = i, ref, desc
        self.value, self.errors = value, errors     # errors: None (a value) or set of type names
        self.deps, self.nested, self.pinned = list(deps), list(nested), pinned
        self.deleted = self.dropped = False
        self.reduce_target = None
        self.users = []      # nodes whose tasks use this one (top level or nested)
        self.array = None    # (dtype, shape) for reducible arrays


class NodeRef:
    """In a reference value: the ref of node ``i`` (a ref nested in a container)."""
    __slots__ = ("i", "hex")

    def __init__(self, i, hex_):
        self.i, self.hex = i, hex_


class Mismatch(Exception):
    pass


def compare(got, want, nodes, path="value"):
    """Raise Mismatch if ``got`` is not ``want`` (types, dtypes, shapes and bytes exactly)."""
    if isinstance(want, NodeRef):
        if not isinstance(got, hm.ObjectRef) or got.id != nodes[want.i].ref_id:
            raise Mismatch(f"{path}: expected the ref of node {want.i}, got {got!r}")
        return
    if type(got) is not type(want):
        raise Mismatch(f"{path}: type {type(got).__name__} != {type(want).__name__} ({got!r:.80} vs {want!r:.80})")
    if isinstance(want, np.ndarray):
        if (got.dtype.newbyteorder("=") != want.dtype.newbyteorder("=") or got.shape != want.shape):
            raise Mismatch(f"{path}: array {got.dtype}{got.shape} != {want.dtype}{want.shape}")
        if digest(got) != digest(want):
            bad = "?"
            if want.dtype.kind in "iufcb" and want.size:
                idx = np.flatnonzero(np.ascontiguousarray(got).ravel() != np.ascontiguousarray(want).ravel())
                bad = f"{idx.size} of {want.size} elements differ, first at {idx[:5]}"
            raise Mismatch(f"{path}: array values differ ({want.dtype}{want.shape}, "
                           f"C={got.flags.c_contiguous}/{want.flags.c_contiguous} "
                           f"F={got.flags.f_contiguous}/{want.flags.f_contiguous}): {bad}")
    elif isinstance(want, (list, tuple)):
        if len(got) != len(want):
            raise Mismatch(f"{path}: length {len(got)} != {len(want)}")
        for k, (g, w) in enumerate(zip(got, want)):
            compare(g, w, nodes, f"{path}[{k}]")
    elif isinstance(want, dict):
        if list(got) != list(want):
            raise Mismatch(f"{path}: keys {list(got)} != {list(want)}")
        for k in want:
            compare(got[k], want[k], nodes, f"{path}[{k!r}]")
    elif isinstance(want, np.generic):
        if digest(got) != digest(want):
            raise Mismatch(f"{path}: {got!r} != {want!r}")
    elif got != want and not (isinstance(want, float) and np.isnan(want) and np.isnan(got)):
        raise Mismatch(f"{path}: {got!r:.200} != {want!r:.200}")


def size_choices(cfg):
    """Byte sizes around the inline threshold and the chunk size (odd ones included)."""
    t, c = cfg.inline_threshold, cfg.chunk_size
    return ([0, 1, 7, 100, 4093] + [t + d for d in (-600, -200, -9, -1, 0, 1, 8, 300)]
            + [t // 4 + d for d in (-1, 1)]
            + [c + d for d in (-513, -1, 0, 1, 4097)] + [2 * c + 3, 3 * c - 7])


class Workload:
    def __init__(self, seed, ops, known, victim, cfg, big):
        self.rng = random.Random(seed)
        self.seed, self.ops, self.known, self.victim, self.cfg = seed, ops, known, victim, cfg
        self.big = big
        self.nodes: list[Node] = []
        self.failures: list[str] = []
        self.size = hm.world_size()
        self.workers = list(range(1, self.size)) or [0]
        self.counts: dict[str, int] = {}
        self.spec_seed = seed * 1000003
        self.T = T if victim is None else 40.0    # kills: recovery is quick; keep hangs cheap

    # --- helpers ---
    def fail(self, msg, node=None):
        if node is not None:
            msg += "\n    lineage: " + "\n             ".join(self.lineage(node))
        self.failures.append(msg)
        print(f"[seed {self.seed}] FAIL: {msg}", flush=True)
        if "TimeoutError" in msg:
            self.T = 10.0   # one hang found: do not spend T on each of its followers

    def lineage(self, node, seen=None):
        seen = set() if seen is None else seen
        out = []
        for d in node.deps + node.nested:
            if d not in seen:
                seen.add(d)
                out += self.lineage(self.nodes[d], seen)
        return out + [f"{node.i}: {node.desc[:300]}" + (" [deleted]" if node.deleted else "")]

    def next_seed(self):
        self.spec_seed += 1
        return self.spec_seed

    def add(self, ref, desc, value=None, errors=None, deps=(), nested=(), pinned=None):
        node = Node(len(self.nodes), ref, desc, value, errors, deps, nested, pinned)
        node.ref_id = ref.id   # noqa (slots: set below)
        self.nodes.append(node)
        for d in list(deps) + list(nested):
            self.nodes[d].users.append(node.i)
        return node

    def live(self, pred=lambda n: True):
        return [n for n in self.nodes if not n.deleted and not n.dropped and pred(n)]

    def task_options(self):
        opts = {}
        r = self.rng.random()
        if r < 0.25:
            opts["rank"] = self.rng.choice(self.workers)
        if self.rng.random() < 0.15:
            opts["inline_threshold"] = self.rng.choice([0, 100, self.cfg.inline_threshold])
        return opts

    def array_spec(self, dtype=None, nbytes=None, order=None, view=None, prod_safe=False, shape=None):
        rng = self.rng
        if dtype is None:
            dtype = rng.choice(INT_DTYPES + FLOAT_DTYPES + COMPLEX_DTYPES + OTHER_DTYPES)
        item = _dtype(dtype).itemsize or 1
        if shape is None:
            if nbytes is None:
                sizes = size_choices(self.cfg)
                if not self.big:
                    sizes = [s for s in sizes if s <= self.cfg.inline_threshold * 2]
                nbytes = rng.choice(sizes)
            n = max(0, nbytes // item)
            if _dtype(dtype).kind == "O":
                n = min(n, 3000)
            r = rng.random()
            if r < 0.1:
                shape = ()
            elif r < 0.5 and n >= 4:
                a = rng.choice([2, 3, 4, 5, 7])
                shape = (a, n // a)
            elif r < 0.55 and n >= 8:
                shape = (2, 2, n // 4)
            else:
                shape = (n,)
        if order is None:
            order = rng.choice(["C", "C", "F"])
        if view is None:
            view = rng.choice([None, None, None, "step", "rev", "T", "col"])
        return ("nd", dtype, tuple(shape), order, self.next_seed(), view, prod_safe)

    def value_spec(self, depth=0):
        rng = self.rng
        r = rng.random()
        if r < 0.4:
            return self.array_spec()
        if r < 0.5:
            return ("lit", rng.choice([0, -1, 7, 2**70, 1.5, float("inf"), -0.0, 1 + 2j, True, None,
                                       "", "x", b"", b"\x00\xff", (), [], {}]))
        if r < 0.6:
            return ("bytes", self.next_seed(), rng.choice(size_choices(self.cfg)[:12]))
        if r < 0.65:
            return ("str", self.next_seed(), rng.choice([0, 1, 5, 20000]))
        if r < 0.72:
            return ("npscalar", rng.choice(REDUCIBLE), self.next_seed())
        if depth < 2:
            kids = [self.value_spec(depth + 1) for _ in range(rng.randint(0, 3))]
            kind = rng.choice(["list", "tuple", "dict"])
            if kind == "dict":
                return ("dict", [(f"k{j}", s) for j, s in enumerate(kids)])
            return (kind, kids)
        return ("lit", rng.randint(-5, 5))

    def pick(self, pred=lambda n: True):
        cands = self.live(pred)
        return self.rng.choice(cands) if cands else None

    def expected_from(self, deps):
        """Expected error set from failed top-level deps, or None."""
        errs = set()
        for d in deps:
            n = self.nodes[d]
            if n.errors:
                errs |= n.errors
        return errs or None

    # --- operations ---
    def op_put(self):
        spec = self.value_spec()
        self.add(hm.put(build(spec)), f"put {spec!r:.120}", value=build(spec))

    def op_build(self):
        spec = self.value_spec()
        opts = self.task_options()
        ref = t_build.options(**opts).remote(spec)
        self.add(ref, f"t_build{opts} {spec!r:.120}", value=build(spec), pinned=opts.get("rank"))

    def op_apply(self):
        fname = self.rng.choice(["id", "id", "view", "add1", "pair", "digest"])
        k = 2 if fname == "pair" else 1
        args = [self.pick() for _ in range(k)]
        if any(a is None for a in args):
            return self.op_put()
        opts = self.task_options()
        ref = t_apply.options(**opts).remote(fname, *[a.ref for a in args])
        deps = [a.i for a in args]
        errs = self.expected_from(deps)
        value = None if errs else apply(fname, [a.value for a in args])
        self.add(ref, f"t_apply{opts} {fname} of {deps}", value=value, errors=errs, deps=deps,
                 pinned=opts.get("rank"))

    def op_literal_arg(self):
        """A task given a (possibly large) value directly: large ones become objects."""
        spec = self.value_spec()
        opts = self.task_options()
        ref = t_apply.options(**opts).remote("id", build(spec))
        self.add(ref, f"t_apply{opts} id of literal {spec!r:.100}", value=build(spec),
                 pinned=opts.get("rank"))

    def op_multi(self):
        k = self.rng.randint(2, 4)
        specs = [self.value_spec(1) for _ in range(k)]
        opts = self.task_options()
        wrong = self.rng.random() < 0.1
        refs = t_multi.options(num_returns=k + (1 if wrong else 0), **opts).remote(specs)
        for j, ref in enumerate(refs):
            self.add(ref, f"t_multi{opts} wrong={wrong} return {j}",
                     value=None if wrong else build(specs[j]),
                     errors={"ValueError"} if wrong else None, pinned=opts.get("rank"))

    def op_raise(self):
        exc = self.rng.choice(list(EXCEPTIONS))
        dep = self.pick() if self.rng.random() < 0.5 else None
        opts = self.task_options()
        deps = [dep.i] if dep else []
        ref = t_raise.options(**opts).remote(exc, f"seed {self.seed}", *([dep.ref] if dep else []))
        errs = self.expected_from(deps) or {exc}
        self.add(ref, f"t_raise{opts} {exc} after {deps}", errors=errs, deps=deps, pinned=opts.get("rank"))

    def op_pack(self):
        x = self.pick()
        inner = [self.pick() for _ in range(self.rng.randint(0, 3))]
        if x is None or any(n is None for n in inner):
            return self.op_build()
        box = {"refs": [n.ref for n in inner], "tag": self.rng.randint(0, 99)}
        opts = self.task_options()
        ref = t_pack.options(**opts).remote(x.ref, box)
        errs = self.expected_from([x.i])
        value = None if errs else [x.value, {"refs": [NodeRef(n.i, n.ref.hex()) for n in inner], "tag": box["tag"]}]
        self.add(ref, f"t_pack{opts} of {x.i} box {[n.i for n in inner]}", value=value, errors=errs,
                 deps=[x.i], nested=[n.i for n in inner], pinned=opts.get("rank"))

    def op_deref(self):
        inner = [self.pick() for _ in range(self.rng.randint(1, 3))]
        if any(n is None for n in inner):
            return self.op_build()
        opts = self.task_options()
        ref = t_deref.options(**opts).remote({"refs": [n.ref for n in inner]})
        errs = self.expected_from([n.i for n in inner])
        value = None if errs else digest([n.value for n in inner])
        self.add(ref, f"t_deref{opts} of {[n.i for n in inner]}", value=value, errors=errs,
                 nested=[n.i for n in inner], pinned=opts.get("rank"))

    def gen_prog(self, depth):
        prog, nvals = [], 1
        for _ in range(self.rng.randint(1, 4)):
            r = self.rng.random()
            if r < 0.3:
                prog.append(("build", self.value_spec(1)))
            elif r < 0.45:
                prog.append(("put", self.value_spec(1)))
            elif r < 0.85 or depth >= 2:
                fname = self.rng.choice(["id", "view", "add1", "digest", "pair"])
                k = 2 if fname == "pair" else 1
                prog.append(("apply", fname, [self.rng.randrange(nvals) for _ in range(k)]))
            else:
                prog.append(("nested", self.gen_prog(depth + 1), self.rng.randrange(nvals)))
            nvals += 1
        return prog

    def op_nested(self):
        x = self.pick()
        if x is None:
            return self.op_build()
        prog = self.gen_prog(1)
        opts = self.task_options()
        ref = t_nested.options(**opts).remote(prog, x.ref)
        errs = self.expected_from([x.i])
        value = None if errs else run_prog(prog, x.value, False)
        self.add(ref, f"t_nested{opts} of {x.i} prog {prog!r:.200}", value=value, errors=errs,
                 deps=[x.i], pinned=opts.get("rank"))

    def op_timeout(self):
        x = self.pick(lambda n: not n.errors)
        if x is None:
            return self.op_build()
        ref = t_sleep.remote(1.0, x.ref)
        node = self.add(ref, f"t_sleep 1 s of {x.i}", value=x.value, errors=x.errors, deps=[x.i])
        try:
            got = hm.get(ref, timeout=0.01)
            self.fail(f"node {node.i}: get(timeout=0.01) of a 1 s task returned {got!r:.80}", node=node)
        except cf.TimeoutError:
            pass
        except Exception as exc:  # noqa
            self.fail(f"node {node.i}: get(timeout=0.01) raised {type(exc).__name__}: {exc}", node=node)
        ready, pending = hm.wait([ref], timeout=0.01)
        if ready or pending != [ref]:
            self.fail(f"node {node.i}: wait(timeout=0.01) gave ready={ready} pending={pending}", node=node)

    def op_delete(self):
        x = self.pick(lambda n: not n.errors)
        if x is None:
            return
        self.wait_users(x)   # a task still to read x would see it deleted: wait for them first
        hm.delete(x.ref)
        x.deleted = True
        self.expect_deleted(x)

    def wait_users(self, x):
        users = list({self.nodes[u].ref: None for u in x.users
                      if not self.nodes[u].deleted and not self.nodes[u].dropped})
        if users:
            t0 = time.monotonic()
            ready, pending = hm.wait(users, num_returns=len(users), timeout=self.T)
            if pending:
                self.fail(f"node {x.i}: wait for its users timed out after {time.monotonic() - t0:.0f} s; "
                          f"pending {[self.nodes[u].i for u in x.users if self.nodes[u].ref in pending]}",
                          node=self.nodes[[u for u in x.users if self.nodes[u].ref in pending][0]])
                self.T = 10.0

    def expect_deleted(self, x):
        how = self.rng.choice(["get", "get", "task", "broadcast"])
        try:
            if how == "get":
                hm.get(x.ref, timeout=self.T)
            elif how == "task":
                hm.get(t_apply.remote("digest", x.ref), timeout=self.T)
            else:
                hm.broadcast(x.ref, timeout=self.T)
            self.fail(f"node {x.i} ({x.desc}): {how} after delete did not raise", node=x)
        except ObjectDeletedError:
            pass
        except Exception as exc:  # noqa
            if not self.may_lose(x):
                self.fail(f"node {x.i} ({x.desc}): {how} after delete raised {type(exc).__name__}: {exc}", node=x)

    def op_deleted_cached(self):
        """KNOWN: a small object read by a task on a worker, deleted, then read there again."""
        w = self.rng.choice(self.workers)
        x = self.add(hm.put(build(("lit", 12345))), "put small", value=12345)
        hm.get(t_deref.options(rank=w).remote({"refs": [x.ref]}), timeout=self.T)
        hm.delete(x.ref)
        x.deleted = True
        try:
            hm.get(t_deref.options(rank=w).remote({"refs": [x.ref]}), timeout=self.T)
            self.fail(f"node {x.i}: task get of a deleted small object cached on rank {w} did not raise", node=x)
        except ObjectDeletedError:
            pass

    def op_drop(self):
        x = self.pick()
        if x is None:
            return
        self.wait_users(x)
        x.dropped = True
        x.ref = None

    def op_broadcast(self):
        x = self.pick()
        if x is None:
            return
        ranks = None if self.rng.random() < 0.3 else sorted(self.rng.sample(range(self.size),
                                                                           self.rng.randint(1, self.size)))
        try:
            hm.broadcast(x.ref, ranks=ranks, timeout=self.T)
            if x.errors and not self.may_lose(x):
                self.fail(f"node {x.i} ({x.desc}): broadcast to {ranks} of a failed object returned", node=x)
        except Exception as exc:  # noqa
            if not self.error_ok(x, exc):
                self.fail(f"node {x.i} ({x.desc}): broadcast to {ranks} raised "
                          f"{type(exc).__name__}: {exc}", node=x)
            return
        # read it where it was sent
        targets = [r for r in (ranks or range(self.size)) if r in self.workers and r != 0]
        if targets:
            r = self.rng.choice(targets)
            ref = t_apply.options(rank=r).remote("digest", x.ref)
            self.add(ref, f"digest on rank {r} of broadcast node {x.i}",
                     value=None if x.errors else digest(x.value), errors=x.errors, deps=[x.i], pinned=r)

    def op_reduce(self):
        rng = self.rng
        op = rng.choice(["sum", "max", "min", "prod", "sum"])
        known = self.known
        dtype = rng.choice(REDUCIBLE)
        if op in ("max", "min") and _dtype(dtype).kind == "c":
            dtype = "f8"
        if op == "prod" and _dtype(dtype).kind == "f" and _dtype(dtype).itemsize == 2:
            dtype = "f4"
        spec0 = self.array_spec(dtype=dtype, view=None, prod_safe=(op == "prod"))
        shape = build(spec0).shape
        if not known and int(np.prod(shape)) == 0:
            shape = (3,)
        m = rng.randint(1, max(2, min(7, len(self.workers) + 3)))
        order = rng.choice(["C", "F"])
        inputs = []
        for j in range(m):
            spec = ("nd", dtype, shape, order, self.next_seed(), None, op == "prod")
            r = rng.random()
            if r < 0.3:
                n = self.add(hm.put(build(spec)), f"put array {spec}", value=build(spec))
            else:
                opts = self.task_options()
                opts.pop("inline_threshold", None) if rng.random() < 0.5 else None
                ref = t_build.options(**opts).remote(spec)
                n = self.add(ref, f"t_build{opts} array {spec}", value=build(spec), pinned=opts.get("rank"))
                # KNOWN identity_large_reduce: seen at every size (seed 13: complex256[3]); a
                # received array re-serialized has a 1-byte longer pickle head than the others
                if rng.random() < 0.3 and known:
                    ref2 = t_apply.options(**self.task_options()).remote("id", n.ref)
                    n = self.add(ref2, f"t_apply id of {n.i} (array)", value=n.value, deps=[n.i])
            inputs.append(n)
        if rng.random() < 0.1 and not inputs[0].errors:     # a failed input
            exc = rng.choice(list(EXCEPTIONS))
            inputs.append(self.add(t_raise.remote(exc, "reduce input"), f"t_raise {exc}", errors={exc}))
        if known and rng.random() < 0.3:
            inputs.append(inputs[0])
        if known and rng.random() < 0.2:
            op = "subtract"
        num = None if rng.random() < 0.5 else rng.randint(1, len(inputs))
        allred = rng.random() < 0.3
        target = None
        if not allred and rng.random() < 0.4:
            target = rng.choice([r for r in range(self.size) if known or r != self.victim])
        refs = [n.ref for n in inputs]
        if allred:
            red = hm.allreduce(refs, op=op, num=num)
        else:
            red = hm.reduce(refs, op=op, num=num, rank=target)
        node = self.add(red, f"{'allreduce' if allred else 'reduce'} {op} num={num} target={target} "
                             f"of {[n.i for n in inputs]} {dtype}{shape}{order}",
                        deps=[n.i for n in inputs])
        node.reduce_target = target
        node.array = (op, num, inputs)
        self.check_reduce(node)

    def check_reduce(self, node):
        op, num, inputs = node.array
        failing = [n for n in inputs if n.errors]
        try:
            used = hm.reduced_inputs(node.ref, timeout=self.T)
        except Exception as exc:  # noqa
            if failing and (type(exc).__name__ in set().union(*(n.errors for n in failing))):
                node.errors = set().union(*(n.errors for n in failing))
                return
            if self.error_ok(node, exc):
                node.errors = {type(exc).__name__}
                return
            self.fail(f"node {node.i} ({node.desc}): reduced_inputs raised {type(exc).__name__}: {exc}", node=node)
            node.errors = {type(exc).__name__}
            return
        ids = [u.id for u in used]
        by_id = {}
        for n in inputs:
            by_id.setdefault(n.ref.id, n)
        k = len(inputs) if num is None else num
        if len(used) != k or not all(i in by_id for i in ids):
            self.fail(f"node {node.i} ({node.desc}): reduced_inputs gave {len(used)} refs, expected {k} of the inputs", node=node)
            node.errors = {"?"}
            return
        if len(set(ids)) != len(ids) and len({n.ref.id for n in inputs}) == len(inputs):
            self.fail(f"node {node.i} ({node.desc}): reduced_inputs has duplicates", node=node)
        if failing and any(by_id[i].errors for i in ids):
            self.fail(f"node {node.i} ({node.desc}): reduce of a failed input gave a value", node=node)
        ufunc = getattr(np, {"sum": "add", "prod": "multiply", "max": "maximum", "min": "minimum"}.get(op, op))
        vals = [by_id[i].value for i in ids]
        node.value = functools.reduce(lambda a, b: ufunc(a, b), vals) if len(vals) > 1 else vals[0].copy()
        if isinstance(node.value, np.ndarray) and node.value.dtype != vals[0].dtype:
            node.value = node.value.astype(vals[0].dtype)
        if not isinstance(node.value, np.ndarray):
            node.value = np.asarray(node.value, dtype=vals[0].dtype)

    # --- failure semantics ---
    def may_lose(self, n, seen=None):
        """Under a kill: may this node's result be lost (typed error allowed)?"""
        if self.victim is None:
            return False
        if n.pinned == self.victim or n.reduce_target == self.victim:
            return True
        for d in n.deps + n.nested:
            dn = self.nodes[d]
            if dn.deleted or dn.dropped or self.may_lose(dn):
                return True
        return "nested" in n.desc or "pack" in n.desc or "put" in n.desc and n.pinned is not None

    def error_ok(self, n, exc):
        name = type(exc).__name__
        if n.errors and name in n.errors:
            return True
        if self.may_lose(n) and isinstance(exc, (RankLostError, ObjectLostError, HopliteError)):
            return True
        if (self.victim is not None and n.pinned == self.victim and isinstance(exc, ValueError)
                and "not a worker rank" in str(exc)):
            return True       # submitted after the death: "ValueError if it is not a worker rank"
        return False

    def check(self, nodes, grouped):
        """get every node of ``nodes`` and compare (a list get for the ones that must succeed)."""
        if grouped:
            ok = [n for n in nodes if not n.errors and not self.may_lose(n)]
            if ok:
                try:
                    got = hm.get([n.ref for n in ok], timeout=self.T)
                    for n, g in zip(ok, got):
                        self.compare(n, g)
                except Exception as exc:  # noqa
                    self.fail(f"list get of nodes {[n.i for n in ok]} raised {type(exc).__name__}: "
                              f"{str(exc)[:300]}")
            nodes = [n for n in nodes if n not in ok]
        for n in nodes:
            try:
                g = hm.get(n.ref, timeout=self.T)
            except Exception as exc:  # noqa
                if not self.error_ok(n, exc):
                    self.fail(f"node {n.i} ({n.desc}): get raised {type(exc).__name__}: {str(exc)[:300]}"
                              + (f" (expected {n.errors})" if n.errors else ""), node=n)
                continue
            if n.errors:
                self.fail(f"node {n.i} ({n.desc}): expected {n.errors}, got a value {g!r:.100}", node=n)
            else:
                self.compare(n, g)

    def compare(self, n, g):
        try:
            compare(g, n.value, self.nodes)
        except Mismatch as m:
            self.fail(f"node {n.i} ({n.desc}): {m}", node=n)

    def op_check(self):
        cands = self.live()
        if cands:
            self.check(self.rng.sample(cands, min(len(cands), self.rng.randint(1, 5))),
                       grouped=self.rng.random() < 0.5)

    def op_as_completed(self):
        cands = [n for n in self.live() if not n.errors and not self.may_lose(n)]
        if not cands:
            return
        sel = self.rng.sample(cands, min(len(cands), 4))
        by_ref = {n.ref: n for n in sel}
        try:
            for fut in cf.as_completed(list(by_ref), timeout=self.T):
                self.compare(by_ref[fut], fut.result(timeout=self.T))
        except Exception as exc:  # noqa
            self.fail(f"as_completed of {[n.i for n in sel]} raised {type(exc).__name__}: {exc}")

    OPS = {"put": 8, "build": 10, "apply": 14, "literal_arg": 4, "multi": 4, "raise": 4, "pack": 4,
           "deref": 4, "nested": 6, "timeout": 1, "delete": 4, "drop": 3, "broadcast": 4,
           "reduce": 7, "check": 8, "as_completed": 2}

    def run(self):
        ops, weights = zip(*self.OPS.items())
        if self.known:
            ops, weights = ops + ("deleted_cached",), weights + (1,)
        for step in range(self.ops):
            op = self.rng.choices(ops, weights)[0]
            self.counts[op] = self.counts.get(op, 0) + 1
            try:
                getattr(self, "op_" + op)()
            except Exception as exc:  # noqa
                self.fail(f"op {step} {op} raised {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        self.check(self.live(), grouped=self.rng.random() < 0.7)
        # clean up for the next seed: delete every object explicitly
        refs = [n.ref for n in self.live()]
        try:
            if not self.known:     # KNOWN drop_before_end: with --include-known, just dropped
                hm.delete(refs)
        except Exception as exc:  # noqa
            self.fail(f"final delete raised {type(exc).__name__}: {exc}")
        for n in self.nodes:
            n.ref = None
            n.value = None


def victim_from_env():
    spec = os.environ.get("HOPLITE_MPI_KILL", "")
    ranks = {int(item.split(":")[0]) for item in spec.split(",") if item.strip()}
    return min(ranks) if ranks else None


def replay_line(seed, ops, known, big, n, cfg):
    env = []
    default = hm.Config()
    for field in ("chunk_size", "inline_threshold", "tasks_per_worker", "worker_threads", "replication"):
        if getattr(cfg, field) != getattr(default, field):
            env.append(f"HOPLITE_MPI_{field.upper()}={getattr(cfg, field)}")
    if os.environ.get("HOPLITE_MPI_KILL"):
        env.append(f"HOPLITE_MPI_KILL={os.environ['HOPLITE_MPI_KILL']}")
    from hoplite_mpi.cli import ulfm_status
    ft = "" if ulfm_status() == "on" else " --no-ft"
    return (" ".join(env) + (" " if env else "") + f"hoplite-mpi run -n {n}{ft} tests/mpi/random_workload.py "
            f"--seed {seed} --ops {ops}" + (" --include-known" if known else "") + (" --big" if big else ""))


@hm.remote
def t_noop():
    return os.getpid()


@hm.remote
def t_rank():
    return hm.rank()


def warm_up(n):
    """Every worker has run a task, and the API works in tasks there (KNOWN api_right_after_init:
    a task calling the API right after init may see NotInitializedError)."""
    hm.get([t_noop.options(rank=w).remote() for w in range(1, n)], timeout=T)
    for w in range(1, n):
        for attempt in range(50):
            try:
                if hm.get(t_rank.options(rank=w).remote(), timeout=T) == w:
                    break
            except hm.NotInitializedError:
                time.sleep(0.1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--seeds", type=int, default=1, help="run seeds SEED..SEED+K-1 in this job")
    p.add_argument("--ops", type=int, default=60, help="operations per seed")
    p.add_argument("--include-known", action="store_true", help="also generate the KNOWN bugs")
    p.add_argument("--big", action="store_true", help="also arrays around the chunk size (1-3 MiB)")
    p.add_argument("--json", default=None, help="write per-seed results here")
    args = p.parse_args(argv)
    rt = hm.api._rt()
    cfg, n = rt.config, hm.world_size()
    victim = victim_from_env()
    if not args.include_known:
        # warm-up: every worker has run a task before tasks call the API (KNOWN api_right_after_init)
        warm_up(n)
    results, bad = [], 0
    t_all = time.monotonic()
    for seed in range(args.seed, args.seed + args.seeds):
        t0 = time.monotonic()
        w = Workload(seed, args.ops, args.include_known, victim, cfg, args.big)
        try:
            w.run()
        except Exception as exc:  # noqa
            w.fail(f"workload raised {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        dt = time.monotonic() - t0
        ok = not w.failures
        bad += not ok
        results.append({"seed": seed, "ok": ok, "seconds": round(dt, 2), "nodes": len(w.nodes),
                        "failures": w.failures[:20], "ops": w.counts})
        line = replay_line(seed, args.ops, args.include_known, args.big, n, cfg)
        print(f"SEED {seed} {'OK' if ok else 'FAIL'} ({len(w.nodes)} objects, {dt:.1f} s)"
              + ("" if ok else f"  replay: {line}"), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    dead = sorted(rt.dead) if hasattr(rt, "dead") else []
    print(f"DONE {len(results)} seeds, {bad} failed, {time.monotonic() - t_all:.1f} s, dead ranks {dead}",
          flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    # use this file's functions through the importable module, so tasks pickle them by reference
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import random_workload
    sys.exit(random_workload.main())
