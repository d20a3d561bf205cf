"""End-to-end checks of the collectives (broadcast, reduce, allreduce), run as ONE job per rank
count by tests/test_collectives_mpi.py:

    mpirun -n N python -m hoplite_mpi tests/mpi/collective_checks.py --json OUT [--only name,name]

Each check raises AssertionError (or anything) on failure.  Every wait has a timeout, each check
runs under a watchdog (``--check-timeout``) and the job under a budget (``--budget``), so a hang
becomes a failure of that check instead of a hung job.  Results: one JSON object per check.

Where an object lives is read from the ranks' object stores (the test hook
``testing.runtime().store``: unlike ``hm.is_local``, a small value cached on the rank does not
count), in a task pinned to that rank (rank 0: the driver's own store).  Objects of up to
``inline_threshold`` (64 KiB) travel inline and are not put in stores, so store checks use larger
arrays; small ones are checked by reading them (``hm.get``) in a task pinned to the rank.  Store checks come before
any read of the object on that rank, because a read leaves a copy behind.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import hashlib
import json
import os
import sys
import threading
import time
import traceback

import numpy as np

import hoplite_mpi as hm
from hoplite_mpi import testing

T = 30           # seconds: bound of every wait in these checks
HOLD_WAIT = 10   # seconds: how long a ready object may take to show up in a rank's store
MiB = 1 << 20
CHECKS = {}

OPS = {"sum": np.add, "prod": np.multiply, "min": np.minimum, "max": np.maximum}
DTYPES = ("float32", "float64", "int64")


def check(fn):
    CHECKS[fn.__name__.removeprefix("check_")] = fn
    return fn


def workers():
    return list(range(1, hm.world_size())) or [0]


def all_ranks():
    return list(range(hm.world_size()))


# --- inputs: deterministic arrays, made by tasks pinned to a rank (or put by the driver) ---------

def build(shape, dtype, seed, kind="any", order="C"):
    """The array with these parameters (the driver rebuilds it to compute expected values).

    Floats are in [0.5, 1.5) (no cancellation in sums, no under/overflow in products); integers
    are in [-1000, 1000), or in {-2, -1, 1, 2} for products (exact, no overflow)."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        arr = rng.uniform(0.5, 1.5, size=shape)
    elif kind == "prod":
        arr = rng.choice(np.array([-2, -1, 1, 2]), size=shape)
    else:
        arr = rng.integers(-1000, 1000, size=shape)
    arr = np.asarray(arr).astype(dtype)
    return np.asfortranarray(arr) if order == "F" else np.ascontiguousarray(arr)


@hm.remote
def make(spec, delay=0.0):
    time.sleep(delay)
    return build(*spec)


def produce(r, spec, delay=0.0):
    """A ref of ``build(*spec)`` made on rank ``r``: by a task pinned there, or by ``put`` on the
    driver for rank 0 when rank 0 runs no tasks (then ``delay`` does not apply)."""
    if r == 0 and 0 not in workers():
        return hm.put(build(*spec))
    return make.options(rank=r).remote(spec, delay)


def produce_many(placement, shape, dtype, kind="any", delay=0.0, seed=0, order="C"):
    """One input per entry of ``placement`` (a rank each); returns (refs, expected arrays)."""
    refs, arrays = [], []
    for i, r in enumerate(placement):
        spec = (shape, dtype, seed + i, kind, order)
        refs.append(produce(r, spec, delay))
        arrays.append(build(*spec))
    return refs, arrays


def n_elems(nbytes, dtype):
    return nbytes // np.dtype(dtype).itemsize


def expected(arrays, op):
    ufunc = OPS.get(op, op)
    return functools.reduce(ufunc, arrays)


def assert_same(got, want, what="", rtol=None):
    got = np.asarray(got)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, expected {want.dtype}"
    if want.dtype.kind == "f":
        if rtol is None:
            rtol = 1e-5 if want.dtype == np.float32 else 1e-12
        np.testing.assert_allclose(got, want, rtol=rtol, err_msg=what)
    else:
        np.testing.assert_array_equal(got, want, err_msg=what)


def digest(arr):
    arr = np.asarray(arr)
    return (hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest(), arr.shape,
            arr.dtype.str)


# --- where objects live ------------------------------------------------------------------------

def _held_here(object_id):
    entry = testing.runtime().store.get(object_id)
    return entry is not None and entry.complete


@hm.remote
def held_task(object_id):
    return _held_here(object_id), hm.rank()


def holds(ref, r):
    """Whether rank ``r``'s store holds a complete copy of ``ref``'s object (reads nothing)."""
    if r == 0:
        return _held_here(ref.id)   # the driver's own store (also with one rank)
    held, where = hm.get(held_task.options(rank=r).remote(ref.id), timeout=T)
    assert where == r
    return held


def until_held(ref, r, timeout=HOLD_WAIT):
    deadline = time.monotonic() + timeout
    while not holds(ref, r):
        if time.monotonic() > deadline:
            raise AssertionError(f"rank {r} holds no complete copy of {ref.hex()} "
                                 f"within {timeout} s")
        time.sleep(0.05)


@hm.remote
def read_task(box):
    # box: [ref] (a nested ref stays a ref): read it here with get
    return digest(hm.get(box[0], timeout=T)), hm.rank()


def digest_on(ref, r):
    """Digest of ``ref``'s value as ``get`` returns it on rank ``r``."""
    if r == 0 and 0 not in workers():
        return digest(hm.get(ref, timeout=T))
    got, where = hm.get(read_task.options(rank=r).remote([ref]), timeout=T)
    assert where == r
    return got


class Background:
    """``fn(*args, **kwargs)`` started in a daemon thread; ``result(limit)`` waits (bounded)."""

    def __init__(self, fn, *args, **kwargs):
        self.name = getattr(fn, "__name__", repr(fn))
        self.box = {}

        def run():
            try:
                self.box["value"] = fn(*args, **kwargs)
            except BaseException as exc:   # noqa: BLE001 - re-raised by result()
                self.box["error"] = exc
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self, limit=T + 5):
        self.thread.join(limit)
        if self.thread.is_alive():
            raise AssertionError(f"{self.name} did not return within {limit} s")
        if "error" in self.box:
            raise self.box["error"]
        return self.box.get("value")


def bounded(fn, *args, limit=T + 5, **kwargs):
    """``fn(*args, **kwargs)``, failing if it does not return within ``limit`` seconds."""
    return Background(fn, *args, **kwargs).result(limit)


def ready(refs, timeout=T):
    """Wait until every ref is ready (without reading it: reads leave copies); raise a failure."""
    _, pending = hm.wait(refs, num_returns=len(refs), timeout=timeout)
    assert not pending, f"not ready within {timeout} s: {pending}"
    for ref in refs:
        exc = cf.Future.exception(ref, 0)
        if exc is not None:
            raise exc


def raises(exc_types, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except exc_types as exc:
        return exc
    raise AssertionError(f"{getattr(fn, '__name__', fn)}(*{args!r}, **{kwargs!r}) did not raise "
                         f"{exc_types}")


# --- reduce: every op and dtype against numpy --------------------------------------------------

def _reduce_op_check(op, dtype):
    # one input per rank plus one more per worker: at least two inputs, several ranks involved
    placement = all_ranks() + workers()
    kind = "prod" if op == "prod" else "any"
    refs, arrays = produce_many(placement, (100_003,), dtype, kind, seed=11)
    red = hm.reduce(refs, op=op)
    assert isinstance(red, hm.ObjectRef), type(red)
    assert_same(hm.get(red, timeout=T), expected(arrays, op), f"reduce {op} {dtype}")


for _op in OPS:
    for _dt in DTYPES:
        CHECKS[f"reduce_{_op}_{_dt}"] = functools.partial(_reduce_op_check, _op, _dt)


def _reduce_ufunc_check(ufunc, dtype, rtol=None):
    placement = all_ranks() + workers()
    refs, arrays = produce_many(placement, (50_001,), dtype, seed=23)
    red = hm.reduce(refs, op=ufunc)
    assert_same(hm.get(red, timeout=T), expected(arrays, ufunc), f"reduce {ufunc.__name__}",
                rtol=rtol)
    small_refs, small_arrays = produce_many(placement, (17,), dtype, seed=29)
    assert_same(hm.get(hm.reduce(small_refs, op=ufunc), timeout=T),
                expected(small_arrays, ufunc), f"reduce {ufunc.__name__} (inline)", rtol=rtol)


CHECKS["reduce_ufunc_maximum_float64"] = functools.partial(_reduce_ufunc_check, np.maximum,
                                                            "float64")
CHECKS["reduce_ufunc_add_float32"] = functools.partial(_reduce_ufunc_check, np.add, "float32")
CHECKS["reduce_ufunc_bitwise_xor_int64"] = functools.partial(_reduce_ufunc_check,
                                                              np.bitwise_xor, "int64")
CHECKS["reduce_ufunc_bitwise_or_int64"] = functools.partial(_reduce_ufunc_check, np.bitwise_or,
                                                             "int64")
CHECKS["reduce_ufunc_logaddexp_float64"] = functools.partial(_reduce_ufunc_check, np.logaddexp,
                                                              "float64", rtol=1e-10)


# --- reduce: sizes and shapes ------------------------------------------------------------------

def _reduce_shapes(shapes, dtypes=DTYPES, ops=("sum", "max")):
    placement = all_ranks() + workers()
    for shape in shapes:
        for dtype in dtypes:
            for op in ops:
                refs, arrays = produce_many(placement, shape, dtype,
                                            "prod" if op == "prod" else "any", seed=31)
                assert_same(hm.get(hm.reduce(refs, op=op), timeout=T), expected(arrays, op),
                            f"reduce {op} {dtype} {shape}")


@check
def check_reduce_empty_arrays():
    _reduce_shapes([(0,), (3, 0)], ops=("sum", "prod", "min", "max"))


@check
def check_reduce_one_element():
    _reduce_shapes([(1,), ()], ops=("sum", "prod", "min", "max"))


@check
def check_reduce_below_inline_threshold():
    _reduce_shapes([(1000,), (7000,)])      # at most 56000 bytes


@check
def check_reduce_at_inline_threshold():
    # 64 KiB of data: the serialized object is just above the threshold; one element less/more
    _reduce_shapes([(n_elems(64 << 10, "float64") + d,) for d in (-1, 0, 1)], dtypes=("float64",))


@check
def check_reduce_above_inline_threshold():
    _reduce_shapes([(20_000,)])


@check
def check_reduce_not_chunk_multiple():
    # 3 MiB + 12345 bytes worth of elements: the last chunk of each transfer is partial
    placement = all_ranks() + workers()
    for dtype in DTYPES:
        shape = (n_elems(3 * MiB + 12345, dtype),)
        refs, arrays = produce_many(placement, shape, dtype, seed=37)
        assert_same(hm.get(hm.reduce(refs, op="sum"), timeout=T), expected(arrays, "sum"),
                    f"reduce sum {dtype} {shape}")


@check
def check_reduce_32mib():
    placement = all_ranks() if hm.world_size() > 1 else [0, 0]
    shape = (n_elems(32 * MiB, "float64") + 3,)
    refs, arrays = produce_many(placement, shape, "float64", seed=41)
    assert_same(hm.get(hm.reduce(refs, op="sum"), timeout=T), expected(arrays, "sum"),
                "reduce sum 32 MiB float64")


@check
def check_reduce_multidim():
    placement = all_ranks() + workers()
    for shape, dtype, op in [((300, 257), "float64", "sum"), ((3, 4, 5), "int64", "prod"),
                             ((2, 3, 1 << 16), "float32", "max"), ((1, 1, 1), "int64", "min")]:
        refs, arrays = produce_many(placement, shape, dtype, "prod" if op == "prod" else "any",
                                    seed=43)
        assert_same(hm.get(hm.reduce(refs, op=op), timeout=T), expected(arrays, op),
                    f"reduce {op} {dtype} {shape}")


@check
def check_reduce_mixed_memory_layout():
    # same shape and dtype, but C- and Fortran-ordered buffers: element-wise, not byte-wise
    placement = all_ranks() + workers()
    for shape in ((200, 301), (30, 40)):          # above and below the inline threshold
        refs, arrays = [], []
        for i, r in enumerate(placement):
            spec = (shape, "float64", 47 + i, "any", "F" if i % 2 else "C")
            refs.append(produce(r, spec))
            arrays.append(build(*spec))
        assert_same(hm.get(hm.reduce(refs, op="sum"), timeout=T), expected(arrays, "sum"),
                    f"reduce sum of C and F arrays {shape}")


# --- reduce: where the inputs are and when they exist ------------------------------------------

def _reduce_placement(placement, delay=0.0, shape=(n_elems(MiB + 999, "float64"),),
                      op="sum", dtype="float64"):
    refs, arrays = produce_many(placement, shape, dtype, delay=delay, seed=53)
    red = hm.reduce(refs, op=op)
    if delay:
        assert not all(r.done() for r in refs), "inputs finished before reduce returned"
    assert_same(hm.get(red, timeout=T), expected(arrays, op), f"reduce over {placement}")
    return refs, red


@check
def check_reduce_inputs_not_ready():
    # every input comes from a task still running when reduce is called (rank 0: put)
    placement = all_ranks() + workers()
    _reduce_placement(placement, delay=0.4)
    _reduce_placement(placement, delay=0.3, shape=(100,), op="max")       # inline inputs


def _staggered(placement, delays, rank=None, num=None, shape=(n_elems(MiB + 999, "float64"),),
               op="sum", dtype="float64"):
    """Inputs made on ``placement`` after ``delays`` (s): the arrival order the reduce sees."""
    refs = [make.options(rank=r).remote((shape, dtype, 61 + i, "any", "C"), d)
            for i, (r, d) in enumerate(zip(placement, delays))]
    arrays = [build(shape, dtype, 61 + i) for i in range(len(placement))]
    red = hm.reduce(refs, op=op, rank=rank, num=num)
    index = {ref: i for i, ref in enumerate(refs)}
    used = sorted(index[u] for u in hm.reduced_inputs(red, timeout=T))
    assert len(used) == (num or len(refs)), used
    assert_same(hm.get(red, timeout=T), expected([arrays[i] for i in used], op),
                f"reduce over {placement} after {delays} to rank {rank}")
    return used


@check
def check_reduce_staggered_arrival():
    # Once one input is still to come, the target accumulates the others and then adds the last
    # one itself (ReduceLate): the last input on another rank, on the target (combined locally),
    # a target holding no input, a target holding every input, small inline inputs, first-k.
    w = workers()
    last = w[-1]
    ranks = (w * 3)[:3]
    _staggered(ranks, [0.0, 0.15, 0.3], rank=0)                   # last one pulled by the target
    _staggered(ranks, [0.0, 0.15, 0.3], rank=last)                # the target made the last one
    _staggered(ranks, [0.3, 0.15, 0.0], rank=last)                # ... the first one
    _staggered([last, w[0], last], [0.3, 0.0, 0.15], rank=last)   # ... and one before it
    _staggered([last, last], [0.0, 0.2], rank=last)               # nothing to pull at all
    _staggered([last, last, last], [0.2, 0.0, 0.1], rank=last, op="max")
    _staggered(ranks, [0.0, 0.15, 0.3], rank=0, shape=(33,), op="min", dtype="int64")   # inline
    _staggered(ranks, [0.0, 0.15, 0.3], rank=last, shape=(33,), dtype="int64")
    _staggered(ranks + ranks, [0.0, 0.1, 0.2, 0.5, 0.5, 0.5], num=3)
    _staggered(ranks * 2, [0.0, 0.0, 0.0, 0.0, 0.0, 0.0], rank=last)  # at once: same plan


@check
def check_reduce_one_input_per_rank():
    _reduce_placement(all_ranks())
    _reduce_placement(all_ranks(), shape=(7,), op="min", dtype="int64")


@check
def check_reduce_several_inputs_per_rank():
    _reduce_placement(all_ranks() * 3)
    _reduce_placement(workers() * 4, op="max", dtype="float32")


@check
def check_reduce_inputs_all_on_one_rank():
    for r in (workers()[-1], 0):
        _reduce_placement([r] * 5)


@check
def check_reduce_result_rank():
    placement = all_ranks() + workers()
    refs, arrays = produce_many(placement, (n_elems(2 * MiB + 4321, "float64"),), "float64",
                                seed=59)
    want = expected(arrays, "sum")
    reds = {r: hm.reduce(refs, op="sum", rank=r) for r in all_ranks()}
    default = hm.reduce(refs, op="sum")            # the caller's rank: 0
    ready(list(reds.values()) + [default])
    for r, red in reds.items():
        until_held(red, r)
    until_held(default, 0)
    for r, red in reds.items():
        assert_same(hm.get(red, timeout=T), want, f"reduce with rank={r}")
    assert_same(hm.get(default, timeout=T), want, "reduce with the default rank")


@hm.remote
def reduce_in_task(box, op):
    red = hm.reduce(box, op=op)
    hm.wait([red], timeout=T)
    deadline = time.monotonic() + HOLD_WAIT
    while not _held_here(red.id) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [red], _held_here(red.id), hm.rank()


@check
def check_reduce_called_in_task():
    # the default result rank is the caller's: a task's reduce puts the result on its rank
    placement = all_ranks() + workers()
    refs, arrays = produce_many(placement, (n_elems(MiB + 5, "float64"),), "float64", seed=61)
    w = workers()[-1]
    box, held, where = hm.get(reduce_in_task.options(rank=w).remote(refs, "sum"), timeout=T)
    assert where == w
    assert held, f"the result of a reduce called on rank {w} is not in rank {w}'s store"
    assert_same(hm.get(box[0], timeout=T), expected(arrays, "sum"), "reduce called in a task")


@hm.remote
def total(arr):
    return float(np.sum(arr))


@check
def check_reduce_result_used_as_input():
    placement = all_ranks() + workers()
    refs, arrays = produce_many(placement, (50_000,), "float64", seed=67)
    red = hm.reduce(refs, op="sum")
    want = expected(arrays, "sum")
    # a task and another reduce take the result before it exists
    s = total.remote(red)
    red2 = hm.reduce([red, refs[0]], op="max")
    np.testing.assert_allclose(hm.get(s, timeout=T), want.sum(), rtol=1e-9)
    assert_same(hm.get(red2, timeout=T), np.maximum(want, arrays[0]), "reduce of a reduce")


# --- reduce: num=k and reduced_inputs ----------------------------------------------------------

def _subset(placement, k, delays, op="sum", dtype="int64", shape=(100_000,)):
    refs, arrays = [], []
    for i, (r, delay) in enumerate(zip(placement, delays)):
        spec = (shape, dtype, 71 + i, "any", "C")
        refs.append(produce(r, spec, delay))
        arrays.append(build(*spec))
    red = hm.reduce(refs, op=op, num=k)
    used = bounded(hm.reduced_inputs, red)          # blocks until the reduce is done
    used = list(used)
    assert len(used) == k, f"num={k}: reduced_inputs has {len(used)} refs: {used}"
    assert all(isinstance(u, hm.ObjectRef) for u in used), used
    assert len(set(used)) == k, f"duplicates in reduced_inputs: {used}"
    index = {ref: i for i, ref in enumerate(refs)}
    assert all(u in index for u in used), f"reduced_inputs names refs that are not inputs: {used}"
    chosen = sorted(index[u] for u in used)
    want = expected([arrays[i] for i in chosen], op)
    assert_same(hm.get(red, timeout=T), want, f"num={k}: value is not the {op} of inputs {chosen}")
    return chosen


@check
def check_reduce_subset_num():
    ranks = all_ranks()
    placement = [ranks[i % len(ranks)] for i in range(6)]
    delays = [0.6, 0.0, 0.6, 0.0, 0.6, 0.0]        # the fast ones are likely the first 3
    chosen = _subset(placement, 3, delays)
    fast = [i for i, (r, d) in enumerate(zip(placement, delays))
            if d == 0 or (r == 0 and 0 not in workers())]    # rank 0's inputs are puts
    print(f"  num=3 reduced inputs {chosen} (ready at once: {fast})", flush=True)
    _subset(placement, 1, delays, op="max", dtype="float64")
    _subset(placement, 2, delays, shape=(50,))     # inline inputs


@check
def check_reduce_num_all_and_reduced_inputs():
    placement = all_ranks() + workers()
    assert _subset(placement, len(placement), [0.1] * len(placement)) == list(range(len(placement)))
    # without num every input is reduced, and reduced_inputs names them all
    refs, arrays = produce_many(placement, (30_000,), "int64", seed=73)
    red = hm.reduce(refs, op="sum")
    used = bounded(hm.reduced_inputs, red)
    assert sorted(refs, key=lambda r: r.id) == sorted(used, key=lambda r: r.id), (refs, used)
    assert_same(hm.get(red, timeout=T), expected(arrays, "sum"), "reduce without num")


@hm.remote
def fail_task():
    raise KeyError("input failed")


@hm.remote
def sum_task(arr):
    return float(np.asarray(arr, dtype=np.float64).sum())


@check
def check_reduce_now_on_the_driver():
    """Inline inputs known on rank 0 (puts, small results of worker tasks): the reduce is combined
    on the calling thread (Config.reduce_now) and its ref is ready when reduce() returns; the
    result is published like a put (a worker task reads it); anything else takes the engine."""
    rt = testing.runtime()
    assert rt.config.reduce_now and rt.config.small_collectives
    placement = all_ranks() + workers()
    refs, arrays = produce_many(placement, (37,), "float64", seed=211)
    ready(refs)
    want = expected(arrays, "sum")
    for allreduce in (False, True):
        red = (hm.allreduce if allreduce else hm.reduce)(refs)
        fast = not allreduce or set(placement) == {0}
        # (an allreduce of worker-made inputs copies the result to them: a round trip)
        assert red.done() == fast, f"allreduce={allreduce}: ready at once {red.done()}"
        assert_same(hm.get(red, timeout=T), want, f"reduce_now allreduce={allreduce}")
        assert bounded(hm.reduced_inputs, red) == refs
        assert bounded(hm.get, sum_task.options(rank=workers()[-1]).remote(red)) == \
            float(want.sum())
    puts = [hm.put(a) for a in arrays]
    red = hm.allreduce(puts, op="max")
    assert red.done(), "allreduce of the driver's own puts is not ready at once"
    assert_same(hm.get(red, timeout=T), expected(arrays, "max"), "allreduce of puts")
    sub = hm.reduce(puts, num=2)
    assert sub.done() and len(bounded(hm.reduced_inputs, sub)) == 2
    assert_same(hm.get(sub, timeout=T), arrays[0] + arrays[1], "num=2 of ready puts")
    hm.delete(sub)
    raises(hm.ObjectDeletedError, hm.get, sub, timeout=T)
    # a subset: the first num inputs ready at call time (in input order) are combined at once
    three = [build((37,), "float64", 300 + i) for i in range(3)]
    ps = [hm.put(a) for a in three]
    slow = make.options(rank=workers()[0]).remote(((37,), "float64", 999), 1.0)
    sub = hm.reduce([slow, ps[2], ps[1], ps[0]], num=2)
    assert sub.done() and bounded(hm.reduced_inputs, sub) == [ps[2], ps[1]]
    assert_same(hm.get(sub, timeout=T), three[2] + three[1], "num=2, one input not ready")
    whole = hm.reduce([slow, ps[0]])
    assert not whole.done(), "a reduce waiting for an input was ready at once"
    assert_same(hm.get(whole, timeout=T), build((37,), "float64", 999) + three[0], "waiting")
    # not for this path: a shape mismatch (the engine fails the ref), a failed input
    bad = hm.reduce(puts + [hm.put(np.zeros(3))])
    assert "shape" in str(raises(ValueError, hm.get, bad, timeout=T))
    failed = fail_task.remote()
    hm.wait([failed], timeout=T)
    raises(KeyError, hm.get, hm.reduce(puts + [failed]), timeout=T)
    deleted = hm.put(arrays[0])
    hm.delete(deleted)
    raises(hm.ObjectDeletedError, hm.get, hm.reduce([puts[0], deleted]), timeout=T)


# --- allreduce ---------------------------------------------------------------------------------

def _allreduce(placement, shape, dtype="float64", op="sum", delay=0.0, seed=79):
    refs, arrays = produce_many(placement, shape, dtype, "prod" if op == "prod" else "any",
                                delay=delay, seed=seed)
    out = hm.allreduce(refs, op=op)
    assert isinstance(out, hm.ObjectRef), type(out)
    if delay:
        assert not all(r.done() for r in refs), "inputs finished before allreduce returned"
    ready([out])
    big = np.prod(shape, dtype=np.int64) * np.dtype(dtype).itemsize > 64 << 10
    producers = sorted(set(placement))
    if big:    # stores first: a read below leaves a copy behind
        for r in producers:
            until_held(out, r)
    got = hm.get(out, timeout=T)
    assert_same(got, expected(arrays, op), f"allreduce {op} {dtype} {shape} over {placement}")
    for r in producers:
        assert digest_on(out, r) == digest(got), f"rank {r} reads another value"
    return out


@check
def check_allreduce_one_input_per_rank():
    _allreduce(all_ranks(), (n_elems(2 * MiB + 777, "float64"),))


@check
def check_allreduce_several_inputs_per_rank():
    _allreduce(all_ranks() * 2, (300_001,), "float32", op="max")
    _allreduce(workers() * 3, (40_000,), "int64", op="prod")


@check
def check_allreduce_inputs_not_ready():
    _allreduce(all_ranks() + workers(), (n_elems(MiB + 1, "float64"),), delay=0.4)


@check
def check_allreduce_small_inline():
    _allreduce(all_ranks() + workers(), (100,), "int64")
    _allreduce(all_ranks(), (1,), "float64", op="min")


@check
def check_allreduce_ufunc():
    _allreduce(all_ranks() + workers(), (70_000,), "int64", op=np.bitwise_xor)


@check
def check_allreduce_subset_of_ranks():
    # inputs on only some ranks: the producing ones hold the result
    ws = workers()
    _allreduce(ws[-1:] * 2 + ws[:1], (n_elems(MiB, "float32") + 11,), "float32")


# --- broadcast ---------------------------------------------------------------------------------

def _broadcast(src_rank, targets, spec, delay=0.0):
    src = produce(src_rank, spec, delay)
    if delay and src_rank in workers():
        assert not src.done(), "source finished before broadcast was called"
    kwargs = {} if targets is None else {"ranks": list(targets)}
    assert bounded(hm.broadcast, src, timeout=T, **kwargs) is None   # blocks until done
    dests = all_ranks() if targets is None else list(targets)
    want = digest(build(*spec))
    big = build(*spec).nbytes > 64 << 10
    if big:
        for r in all_ranks():
            expect = r in dests or r == src_rank
            got = holds(src, r)
            assert got == expect, (f"broadcast from rank {src_rank} to {dests}: rank {r} "
                                   f"{'holds' if got else 'does not hold'} a complete copy")
    for r in dests:
        assert digest_on(src, r) == want, f"rank {r} reads another value"
    return src


def _big_spec(seed, nbytes=5 * MiB + 333 * 8, dtype="float64", shape=None):
    return (shape or (n_elems(nbytes, dtype),), dtype, seed, "any", "C")


@check
def check_broadcast_all_ranks():
    _broadcast(workers()[0], None, _big_spec(83))
    _broadcast(workers()[-1], None, _big_spec(89, 3 * MiB + 12345, "float32"))


@check
def check_broadcast_from_driver():
    _broadcast(0, None, _big_spec(97, 2 * MiB))


@check
def check_broadcast_explicit_all_ranks():
    _broadcast(workers()[0], all_ranks(), _big_spec(101, MiB + 8))


@check
def check_broadcast_subset():
    n = hm.world_size()
    src = workers()[0]
    others = [r for r in all_ranks() if r != src]
    cases = [(src, [src])]                                   # only the source: nothing moves
    if len(others) >= 2:
        cases.append((src, others[:-1]))                     # the last rank left out
    elif others:
        cases.append((src, others))
    if n >= 3:
        cases.append((src, [r for r in workers() if r != src]))   # the driver left out
    if n >= 2:
        cases.append((0, workers()[-1:]))                    # from the driver to one worker
    for i, (s, targets) in enumerate(cases):
        _broadcast(s, targets, _big_spec(103 + i, 2 * MiB + 40))


@check
def check_broadcast_while_computing():
    _broadcast(workers()[-1], None, _big_spec(107, 4 * MiB + 24), delay=0.5)
    if hm.world_size() >= 3:
        _broadcast(workers()[0], workers()[1:], _big_spec(109, 2 * MiB), delay=0.5)


@check
def check_broadcast_small_repeated():
    # the shard's inline answer can reach a target before the driver's Fetch (it once hung)
    base = np.ones(256, np.float32)
    for i in range(200):
        ref = hm.put(base * i)
        hm.broadcast(ref, timeout=T)
        hm.delete([ref])


@check
def check_broadcast_small_inline():
    _broadcast(workers()[0], None, ((1000,), "float64", 113, "any", "C"))
    _broadcast(workers()[-1], workers()[:1], ((3,), "int64", 127, "any", "C"), delay=0.3)


@hm.remote
def is_local_task(box):
    return hm.is_local(box[0]), hm.rank()


def local_on(ref, r):
    """``hm.is_local`` on rank ``r`` (a small value counts: no store entry for it)."""
    if r == 0:
        return hm.is_local(ref)
    held, where = hm.get(is_local_task.options(rank=r).remote([ref]), timeout=T)
    assert where == r
    return held


@check
def check_small_collectives_hold_where_said():
    # inline inputs (Config.small_collectives): combined on rank 0, the result sent to the
    # target / the contributors in the Fetch itself; a broadcast sends the value the same way
    refs, arrays = produce_many(all_ranks(), (100,), "float64", seed=131)
    want = expected(arrays, "sum")
    for r in all_ranks():
        red = hm.reduce(refs, rank=r)
        ready([red])
        assert local_on(red, r), f"small reduce with rank={r}: not local there when done"
        assert hm.locations(red, timeout=T)[red] == [r]
        assert_same(hm.get(red, timeout=T), want, f"small reduce with rank={r}")
    every = hm.allreduce(refs)
    ready([every])
    for r in all_ranks():
        assert local_on(every, r), f"small allreduce: rank {r} (a contributor) has no copy"
    k = min(2, len(refs))
    first = hm.reduce(refs, num=k)
    used = hm.reduced_inputs(first, timeout=T)
    assert len(used) == k
    assert_same(hm.get(first, timeout=T), expected([arrays[refs.index(u)] for u in used], "sum"),
                "small first-k reduce")
    value = hm.put(np.arange(50.0))
    hm.broadcast(value, timeout=T)
    for r in all_ranks():
        assert local_on(value, r), f"small broadcast: rank {r} has no copy when it returned"


@check
def check_broadcast_32mib():
    _broadcast(workers()[0], None, _big_spec(131, 32 * MiB + 8))


@hm.remote
def make_bytes(n, delay=0.0):
    time.sleep(delay)
    return bytes(range(256)) * (n // 256) + b"x" * (n % 256)


@check
def check_broadcast_non_array_object():
    ref = make_bytes.options(rank=workers()[0]).remote(2 * MiB + 5, 0.2)
    assert bounded(hm.broadcast, ref, timeout=T) is None
    for r in all_ranks():
        assert holds(ref, r), f"rank {r} holds no complete copy of the bytes object"
    want = make_bytes.__wrapped__(2 * MiB + 5)
    assert hm.get(ref, timeout=T) == want


# --- collectives running at the same time ------------------------------------------------------

@check
def check_two_reduces_and_a_broadcast_at_once():
    ws = workers()
    refs_a, arrays_a = produce_many(all_ranks() * 2, (n_elems(MiB + 3, "float64"),), "float64",
                                    delay=0.3, seed=137)
    refs_b, arrays_b = produce_many(ws * 2, (n_elems(MiB + 5, "float32"),), "float32",
                                    delay=0.3, seed=139)
    spec = _big_spec(149, 4 * MiB + 8)
    src = produce(ws[-1], spec, delay=0.3)
    # start all three, then check all three
    ra = hm.reduce(refs_a, op="sum")
    rb = hm.reduce(refs_b, op="max", rank=ws[0])
    bcast = Background(hm.broadcast, src, timeout=T)
    assert not all(r.done() for r in refs_a + refs_b + [src]), "inputs finished too early"
    ready([ra, rb])
    until_held(rb, ws[0])
    assert_same(hm.get(ra, timeout=T), expected(arrays_a, "sum"), "first reduce")
    assert_same(hm.get(rb, timeout=T), expected(arrays_b, "max"), "second reduce")
    assert bcast.result() is None
    for r in all_ranks():
        assert holds(src, r), f"rank {r} holds no complete copy after the broadcast"
    want = digest(build(*spec))
    for r in all_ranks():
        assert digest_on(src, r) == want


# --- errors ------------------------------------------------------------------------------------

def _mismatch(collective, good_spec, bad_spec, **kwargs):
    """Two good inputs and a slower bad one between them: the bad one is the offender."""
    ws = workers()
    good1 = produce(ws[0], good_spec)
    bad = produce(ws[-1], bad_spec, delay=0.3)
    good2 = hm.put(build(*good_spec[:2], good_spec[2] + 1, *good_spec[3:]))   # ready at once
    red = collective([good1, bad, good2], **kwargs)
    exc = raises(ValueError, hm.get, red, timeout=T)
    assert bad.hex() in str(exc), f"the error does not name {bad.hex()}: {exc!r}"
    return exc


@check
def check_reduce_shape_mismatch():
    for good, bad in [((1000,), (1001,)), ((20, 50), (50, 20)), ((100_000,), (100_001,))]:
        _mismatch(hm.reduce, (good, "float64", 151, "any", "C"), (bad, "float64", 157, "any", "C"))
    # the runtime still reduces afterwards
    refs, arrays = produce_many(all_ranks(), (10,), "int64", seed=163)
    assert_same(hm.get(hm.reduce(refs), timeout=T), expected(arrays, "sum"), "after errors")


@check
def check_reduce_dtype_mismatch():
    for good, bad, shape in [("float64", "float32", (1000,)), ("float64", "int64", (1000,)),
                             ("int64", "float64", (100_000,))]:
        _mismatch(hm.reduce, (shape, good, 167, "any", "C"), (shape, bad, 173, "any", "C"))


@check
def check_allreduce_mismatch():
    _mismatch(hm.allreduce, ((100_000,), "float64", 179, "any", "C"),
              ((100_001,), "float64", 181, "any", "C"))
    _mismatch(hm.allreduce, ((1000,), "float64", 191, "any", "C"),
              ((1000,), "float32", 193, "any", "C"))


@hm.remote
def make_value(value, delay=0.0):
    time.sleep(delay)
    return value


@check
def check_reduce_non_numeric_dtype():
    ws = workers()
    values = [np.array([{"a": 1}, None, 3], dtype=object),
              np.array(["ab", "cd", "ef"]),
              np.array(["x" * 10] * 10_000)]           # 400 KB of str: above the threshold
    for value in values:
        refs = [make_value.options(rank=ws[0]).remote(value), hm.put(value)]
        for collective in (hm.reduce, hm.allreduce):
            red = collective(refs, op="sum")
            raises(TypeError, hm.get, red, timeout=T)


@check
def check_call_time_errors():
    a, b = hm.put(np.ones(10)), hm.put(np.ones(10))
    slow = make.options(rank=workers()[-1]).remote(((10,), "float64", 1, "any", "C"), 0.2)
    for collective in (hm.reduce, hm.allreduce):
        name = collective.__name__
        raises(ValueError, collective, [a, b], op="avg")
        raises(ValueError, collective, [a, b], op="")
        for op in (lambda x, y: x + y, np.negative, np.sqrt, 3, max):
            raises((ValueError, TypeError), collective, [a, b], op=op)
        for num in (0, -1, 3, 4):
            raises(ValueError, collective, [a, b], num=num)
        raises(ValueError, collective, [])
        raises(TypeError, collective, [a, np.ones(10)])
        raises(TypeError, collective, [a, 5])
        raises(TypeError, collective, [a, "b"])
        # good calls still work afterwards
        assert_same(hm.get(collective([a, b, slow], op="sum"), timeout=T),
                    np.ones(10) * 2 + build((10,), "float64", 1), f"{name} after errors")
        assert_same(hm.get(collective([a, b, slow], num=3), timeout=T),
                    np.ones(10) * 2 + build((10,), "float64", 1), f"{name} num=3")


# --- running -----------------------------------------------------------------------------------

def _run_one(fn, timeout):
    """Run a check in a daemon thread; on a hang, report the stack where it is stuck."""
    box = {}

    def run():
        try:
            fn()
        except BaseException:   # noqa: BLE001
            box["error"] = traceback.format_exc()
    th = threading.Thread(target=run, name="check", daemon=True)
    th.start()
    th.join(timeout)
    if th.is_alive():
        frame = sys._current_frames().get(th.ident)
        stack = "".join(traceback.format_stack(frame)) if frame else ""
        return f"check did not finish within {timeout} s; stuck at:\n{stack}"
    return box.get("error")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", required=True)
    parser.add_argument("--only", default="")
    parser.add_argument("--check-timeout", type=float, default=60.0)
    parser.add_argument("--budget", type=float, default=150.0,
                        help="seconds for the whole job; checks not started by then fail")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        parser.error(f"unknown checks: {unknown}")
    results = []
    start = time.monotonic()
    for name in names:
        t0 = time.monotonic()
        if t0 - start > args.budget:
            error = f"not run: the job's budget of {args.budget} s was used up"
        else:
            error = _run_one(CHECKS[name], args.check_timeout)
        rec = {"check": name, "ok": error is None, "seconds": time.monotonic() - t0}
        if error is not None:
            rec["error"] = error
        results.append(rec)
        print(f"{name}: {'ok' if rec['ok'] else 'FAILED'} ({rec['seconds']:.2f} s)", flush=True)
        tmp = args.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(results, fh)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
