"""End-to-end checks of the runtime, run as ONE job per rank count by tests/test_runtime_mpi.py:

    mpirun -n N python -m hoplite_mpi tests/mpi/checks.py --json OUT [--only name,name]

Each check raises AssertionError (or anything) on failure; every wait has a timeout, so a hang
becomes a failure of that check instead of a hung job.  Results: one JSON object per check.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import os
import threading
import time
import traceback

import numpy as np

import hoplite_mpi as hm
from hoplite_mpi import testing

T = 120  # seconds: bound of every wait in these checks
CHECKS = {}


def check(fn):
    CHECKS[fn.__name__.removeprefix("check_")] = fn
    return fn


def workers():
    n = hm.world_size()
    return list(range(1, n)) or [0]


# --- the seeds' workload (Hoplite Go prototype): hoplite_mpi.examples.seed_tasks ----------------

@check
def check_seed_workload():
    from hoplite_mpi.examples import seed_tasks

    # 50 Task-1 refs + 50 dependents submitted before their inputs exist; fetched concurrently,
    # compared with the sequential run, then deleted: each get must raise ObjectDeletedError
    out = seed_tasks.run(n_lists=50, seed=7, timeout=T, magnitude=10**9)
    assert out["tasks"] == 100


# --- tasks and dependencies ------------------------------------------------------------------

@hm.remote
def inc(x):
    return x + 1


@hm.remote
def square(x):
    return x * x


@hm.remote
def nested_parent(k):
    children = [square.remote(k * 10 + i) for i in range(10)]
    return sum(hm.get(children, timeout=T))


@check
def check_nested_all_workers_busy():
    # more parents than the scheduler keeps in flight on all workers together: every worker is
    # full of parents blocked in get() while their children still have to be placed
    cfg = hm.current_config()
    n = len(workers()) * cfg.tasks_per_worker * cfg.worker_threads + 5
    refs = [nested_parent.remote(k) for k in range(n)]
    got = hm.get(refs, timeout=T)
    assert got == [sum((k * 10 + i) ** 2 for i in range(10)) for k in range(n)]


@check
def check_chain_1000():
    ref = hm.put(0)
    for _ in range(1000):
        ref = inc.remote(ref)
    assert hm.get(ref, timeout=T) == 1000


@check
def check_submit_before_input_exists():
    @hm.remote
    def slow_value():
        time.sleep(0.3)
        return 41

    src = slow_value.remote()
    dep = inc.remote(src)         # submitted while src is still running
    assert not src.done() or True
    assert hm.get(dep, timeout=T) == 42


@check
def check_refs_nested_in_containers_stay_refs():
    @hm.remote
    def inspect(arg, box):
        assert not isinstance(arg, hm.ObjectRef)
        inner = box["r"]
        assert isinstance(inner, hm.ObjectRef), type(inner)
        return arg + hm.get(inner, timeout=T)

    a, b = hm.put(1), hm.put(2)
    assert hm.get(inspect.remote(a, {"r": b}), timeout=T) == 3


@check
def check_num_returns_and_kwargs():
    @hm.remote(num_returns=3)
    def three(x, *, y=0):
        return x, x + y, x * y

    r1, r2, r3 = three.remote(2, y=5)
    assert hm.get([r1, r2, r3], timeout=T) == [2, 7, 10]
    bad = three.options(num_returns=2).remote(1)
    try:
        hm.get(bad[0], timeout=T)
    except ValueError as exc:
        assert "num_returns=2" in str(exc)
    else:
        raise AssertionError("wrong number of returns not reported")


@check
def check_pinned_rank():
    @hm.remote
    def where():
        return hm.rank()

    for r in workers():
        assert hm.get(where.options(rank=r).remote(), timeout=T) == r
    try:
        where.options(rank=hm.world_size() + 3).remote()
    except ValueError:
        pass
    else:
        raise AssertionError("bad rank accepted")


# --- object plane ----------------------------------------------------------------------------

@hm.remote
def make_big(nbytes, seed):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 2**63 - 1, size=nbytes // 8, dtype=np.int64)
    return arr


@hm.remote
def digest(arr):
    return hashlib.sha256(memoryview(np.ascontiguousarray(arr)).cast("B")).hexdigest(), hm.rank(), arr.nbytes


@hm.remote
def digest_of_seed(nbytes, seed):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 2**63 - 1, size=nbytes // 8, dtype=np.int64)
    return hashlib.sha256(memoryview(arr).cast("B")).hexdigest()


@check
def check_big_array_worker_to_worker():
    nbytes = 256 << 20
    ws = workers()
    src, dst = ws[0], ws[-1] if len(ws) > 1 else ws[0]
    big = make_big.options(rank=src).remote(nbytes, 11)
    want = digest_of_seed.options(rank=dst).remote(nbytes, 11)
    got, where, size = hm.get(digest.options(rank=dst).remote(big), timeout=T)
    assert where == dst and size == nbytes
    assert got == hm.get(want, timeout=T)
    hm.delete([big])


@check
def check_put_get_numpy_roundtrip():
    arrays = [np.arange(0, dtype=np.float32), np.arange(1, dtype=np.int64),
              np.random.default_rng(1).random((300, 301)), np.arange(10**6, dtype=np.float32)[::3]]
    refs = [hm.put(a) for a in arrays]
    for a, got in zip(arrays, hm.get(refs, timeout=T)):
        assert got.dtype == a.dtype and got.shape == a.shape and np.array_equal(got, a)
    # mutation after put does not change the stored object
    a = np.ones(100000)
    r = hm.put(a)
    a[:] = 5
    assert hm.get(r, timeout=T).sum() == 100000
    # a worker reads the driver's object (inline and chunked sizes)
    for arr in (np.ones(10), np.ones(3 << 20)):
        assert hm.get(square.remote(hm.put(arr)), timeout=T).sum() == arr.size


@hm.remote
def _total(arr):
    return int(arr.sum())


@hm.remote
def _dirpulls_and_pulls():
    s = hm.stats()
    return s["messages"].get("DirPull", 0), s["pulls"]


def _all_dirpulls_and_pulls():
    """(DirPull messages handled, chunked copies fetched) summed over every rank."""
    s = hm.stats()
    mine = (s["messages"].get("DirPull", 0), s["pulls"])
    got = hm.get([_dirpulls_and_pulls.options(rank=r).remote() for r in range(1, hm.world_size())],
                 timeout=T)
    return tuple(map(sum, zip(mine, *got)))


@check
def check_task_inputs_of_one_chunk_are_pulled_from_their_holder():
    # Config.direct_args: the worker pulls a one-chunk input from the holder its RunTask names,
    # without asking the object's shard (no DirPull); an input of several chunks asks the shard
    # (its chain of partial copies pipelines the chunks)
    if hm.world_size() < 2:
        return
    cfg = hm.current_config()
    assert cfg.direct_args and cfg.inline_threshold < cfg.chunk_size // 2
    w = workers()[-1]
    for chunks, direct in ((0.5, True), (3, False)):
        arr = np.arange(int(cfg.chunk_size * chunks) // 8, dtype=np.int64)
        ref = hm.put(arr)
        before = _all_dirpulls_and_pulls()
        assert hm.get(_total.options(rank=w).remote(ref), timeout=T) == int(arr.sum())
        after = _all_dirpulls_and_pulls()
        assert after[1] - before[1] == 1, (chunks, before, after)     # one chunked copy made
        dirpulls = after[0] - before[0]
        assert (dirpulls == 0) if direct else (dirpulls >= 1), (chunks, before, after)
        hm.delete(ref)


def _kept():
    """Worker-side state shared by the two tasks below (functions from __main__ are pickled by
    value with their globals, so a module-level dict would not be shared)."""
    import builtins
    return builtins.__dict__.setdefault("_hoplite_checks_kept", {})


@hm.remote
def make_and_keep(n, how):
    _KEPT = _kept()
    arr = np.full(n, 1.0)
    if how == "global":
        _KEPT["a"] = arr                 # the task keeps the array it returns
    elif how == "view":
        _KEPT["a"] = arr[: n // 2]       # ... or a view of it
    elif how == "tuple":
        out = (arr, np.full(n, 2.0))
        _KEPT["a"] = out                 # ... or the tuple it returns
        return out
    return arr


@hm.remote
def mutate_kept():
    kept = _kept().pop("a")
    for a in kept if isinstance(kept, tuple) else (kept,):
        a[:] = -7.0
    return True


@hm.remote
def make_fresh(n, pair):
    out = (np.full(n, 1.0), np.full(n, 2.0)) if pair else np.full(n, 1.0)
    _kept()["addresses"] = [a.ctypes.data for a in (out if pair else (out,))]
    return out


@hm.remote
def stored_at_returned_address(box):
    """On the producing rank: is each stored object's data the very memory its task returned?"""
    addresses = _kept().pop("addresses")
    rt = testing.runtime()                # (the stored frames' memory: an internal)
    frames = [rt.local_frames(ref.id) for ref in box]
    return [f is not None and np.frombuffer(f[1], np.uint8).ctypes.data == a
            for f, a in zip(frames, addresses)]


@check
def check_fresh_task_results_are_stored_without_a_copy():
    # the other side of the snapshot rule: a result nothing else holds is not copied (a 64 MiB
    # copy costs ~20 ms here), for a single return value and for each of a returned tuple
    n = 1 << 18
    w = workers()[0]
    for pair in (False, True):
        ref = make_fresh.options(rank=w, num_returns=2 if pair else 1).remote(n, pair)
        refs = ref if isinstance(ref, list) else [ref]
        hm.wait(refs, num_returns=len(refs), timeout=T)
        same = hm.get(stored_at_returned_address.options(rank=w).remote(refs), timeout=T)
        assert same == [True] * len(refs), (pair, same)
        hm.delete(refs)


@check
def check_task_results_are_snapshots():
    # A result is stored without a copy only when nothing else can reach its memory; a task that
    # keeps (a view of) what it returned and changes it later must not change the stored result.
    n = 1 << 18                                     # 2 MiB: stored out of band, chunked
    w = workers()[0]
    for how in ("fresh", "global", "view", "tuple"):
        ref = make_and_keep.options(rank=w, num_returns=2 if how == "tuple" else 1).remote(n, how)
        refs = ref if isinstance(ref, list) else [ref]
        hm.wait(refs, num_returns=len(refs), timeout=T)
        if how != "fresh":
            assert hm.get(mutate_kept.options(rank=w).remote(), timeout=T)
        sums = [float(v.sum()) for v in hm.get(refs, timeout=T)]
        assert sums == [n * 1.0, n * 2.0][:len(refs)], (how, sums)
        assert float(hm.get(square.options(rank=w).remote(refs[0]), timeout=T).sum()) == n, how
        hm.delete(refs)


@check
def check_large_arguments_by_value():
    @hm.remote
    def size_of(x, *, y=b""):
        return len(x) + len(y)

    # larger than the in-band threshold: stored as objects of their own, fetched by the worker
    assert hm.get(size_of.remote(b"x" * (1 << 20), y=b"z" * 100000), timeout=T) == (1 << 20) + 100000
    assert hm.get(size_of.remote(np.ones(1 << 18)), timeout=T) == 1 << 18
    assert hm.get(size_of.remote("y" * 300000), timeout=T) == 300000


@check
def check_delete_then_get_raises():
    small, large = hm.put(1), hm.put(np.zeros(1 << 20))
    on_worker = make_big.remote(1 << 20, 3)
    hm.get(on_worker, timeout=T)
    hm.delete([small, large, on_worker])
    for ref in (small, large, on_worker):
        try:
            ref.result(timeout=T)
        except hm.ObjectDeletedError:
            pass
        else:
            raise AssertionError("deleted object still readable")
    # a task depending on a deleted object fails with the same error
    try:
        hm.get(inc.remote(small), timeout=T)
    except hm.ObjectDeletedError:
        pass
    else:
        raise AssertionError("task on deleted input ran")


@hm.remote
def store_bytes():
    return hm.stats()["store_bytes"]


def _bytes_everywhere():
    return [hm.stats()["store_bytes"]] + hm.get([store_bytes.options(rank=r).remote() for r in workers()
                                           if r != 0], timeout=T)


def _until(predicate, what, timeout=30.0):
    """Wait (bounded) for a condition that other ranks reach asynchronously."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s: {what}")
        time.sleep(0.05)


@check
def check_dropped_refs_are_freed_once_unused():
    import gc

    rt = testing.runtime()                # (for the failure message's scheduler tables)
    base = sum(_bytes_everywhere())
    freed_before = hm.stats()["auto_freed"]
    # a chain of 8 MiB arrays: each intermediate ref is dropped while its consumer still runs
    ref = make_big.remote(8 << 20, 1)
    for _ in range(5):
        ref = square.remote(ref)
    kept = hm.put(np.ones(1 << 17))            # 1 MiB, still referenced: must survive
    escaped = hm.put(np.ones(1 << 17))
    box = hm.put({"inner": escaped})            # pickled into another object: never auto-freed
    assert hm.get(ref, timeout=T).nbytes == 8 << 20
    del ref, escaped
    gc.collect()
    _until(lambda: hm.stats()["auto_freed"] - freed_before >= 6, "6 objects freed")
    _until(lambda: sum(_bytes_everywhere()) <= base + (2 << 20) + 4096,
           f"stores back near {base} bytes (+kept, +escaped): {_bytes_everywhere()} "
           f"{rt.store.ids()} released={rt.scheduler.snapshot()['released']} "
           f"deps={rt.scheduler.snapshot()['dep_count']}")
    assert hm.get(kept, timeout=T).sum() == 1 << 17
    assert hm.get(hm.get(box, timeout=T)["inner"], timeout=T).sum() == 1 << 17


# --- introspection: hm.stats, hm.locations, hm.object_info, hm.is_local, ... -----------------

@hm.remote
def make_array(n):
    return np.ones(n)


@hm.remote
def seen_from_a_task(ref_box):
    """On a worker: (is_local before a read, locations, is_local after, stats' rank and
    scheduler, pulls counted)."""
    ref = ref_box[0]
    before = hm.is_local(ref)
    where = hm.locations([ref], timeout=T)[ref]
    pulls = hm.stats()["pulls"]
    hm.get(ref, timeout=T)
    after = hm.stats()
    return before, where, hm.is_local(ref), after["rank"], after["scheduler"], after["pulls"] - pulls


@check
def check_introspection():
    w = workers()[-1]
    big = make_array.options(rank=w).remote(1 << 17)            # 1 MiB: chunked, held on w
    small = hm.put(41)                                          # inline, made on the driver
    got = hm.object_info([big, small, big], timeout=T)
    assert list(got) == [big, small], got                       # distinct refs, in order
    assert got[big].ranks[0] == w and not got[big].inline and not got[big].error, got
    assert got[big].nbytes >= 1 << 20 and got[small].inline and got[small].ranks == (0,), got
    assert hm.locations(big, timeout=T) == {big: list(got[big].ranks)}
    assert hm.is_local(small) and hm.is_local(big) == (w == 0)
    s = hm.stats()
    assert s["rank"] == 0 and s["dead_ranks"] == [] and s["engine_errors"] == 0, s
    assert s["scheduler"]["submitted"] >= 1 and s["scheduler"]["done"] >= 1, s
    assert all(isinstance(s[k], int) for k in ("pulls", "serves", "auto_freed", "store_bytes")), s
    assert isinstance(s["messages"], dict) and isinstance(s["rank_loss_tolerance"], bool), s
    assert hm.dead_ranks() == [] and hm.current_config().chunk_size > 0
    pulls = s["pulls"]
    hm.get(big, timeout=T)
    assert hm.is_local(big) and hm.stats()["pulls"] >= pulls + (w != 0)
    assert 0 in hm.locations(big, timeout=T)[big] or w == 0     # rank 0 registered its copy
    if w != 0:
        other = make_array.options(rank=w).remote(1 << 17)
        hm.wait([other], timeout=T)
        before, where, after, rank, sched, pulled = hm.get(
            seen_from_a_task.options(rank=w if w == 1 else 1).remote([other]), timeout=T)
        reader = w if w == 1 else 1
        assert where == [w] and after and rank == reader and sched is None, (where, after, rank, sched)
        assert before == (reader == w) and (pulled >= 1) == (reader != w), (before, pulled)
        hm.delete(other)
    failed = hm.remote(lambda: 1 / 0).remote()
    assert hm.object_info(failed, timeout=T)[failed].error
    hm.delete([small])
    for call, exc in ((lambda: hm.locations(small, timeout=T), hm.ObjectDeletedError),
                      (lambda: hm.is_local(small), None),
                      (lambda: hm.locations([1], timeout=T), TypeError),
                      (lambda: hm.is_local("x"), TypeError)):
        try:
            out = call()
        except Exception as e:          # noqa: BLE001
            assert exc is not None and isinstance(e, exc), repr(e)
        else:
            assert exc is None and out is False, (out, exc)
    hm.delete([big])


# --- errors ----------------------------------------------------------------------------------

class CustomError(Exception):
    pass


@hm.remote
def fails(msg):
    raise CustomError(msg)


@check
def check_exception_type_and_remote_traceback():
    ref = fails.remote("boom")
    try:
        hm.get(ref, timeout=T)
    except CustomError as exc:
        cause = exc.__cause__
        assert isinstance(cause, hm.RemoteTraceback)
        assert "boom" in cause.tb and "fails" in cause.tb
        assert cause.rank in workers()
    else:
        raise AssertionError("no exception")
    assert isinstance(ref.exception(timeout=T), CustomError)
    dep = inc.remote(ref)                      # depends on the failed task: fails with it
    try:
        hm.get(dep, timeout=T)
    except CustomError:
        pass
    else:
        raise AssertionError("dependent did not fail")
    # the workers survive
    assert hm.get([inc.remote(i) for i in range(20)], timeout=T) == list(range(1, 21))


@check
def check_unpicklable_argument_and_function():
    lock = threading.Lock()
    try:
        inc.remote(lock)
    except hm.SerializationError as exc:
        assert "argument 0 of inc" in str(exc) and "lock" in str(exc)
    else:
        raise AssertionError("unpicklable argument accepted")

    @hm.remote
    def uses_lock():
        return lock.locked()

    try:
        uses_lock.remote()
    except hm.SerializationError as exc:
        assert "uses_lock" in str(exc)
    else:
        raise AssertionError("unpicklable function accepted")
    with hm.Executor() as ex:
        fut = ex.submit(len, [lock])
        # the pickler's own error, as concurrent.futures / mpi4py.futures (issue 10)
        exc = fut.exception(timeout=T)
        assert type(exc) is TypeError and "lock" in str(exc), repr(exc)
        assert ex.submit(len, [1, 2]).result(timeout=T) == 2


@check
def check_unpicklable_return_value():
    @hm.remote
    def returns_lock():
        return threading.Lock()

    try:
        hm.get(returns_lock.remote(), timeout=T)
    except hm.SerializationError as exc:
        assert "return value of returns_lock" in str(exc)
    else:
        raise AssertionError("unpicklable result accepted")
    assert hm.get(inc.remote(1), timeout=T) == 2


# --- futures ---------------------------------------------------------------------------------

@check
def check_concurrent_futures_wait_and_as_completed():
    refs = [square.remote(i) for i in range(30)]
    done, not_done = cf.wait(refs, timeout=T)
    assert not not_done and len(done) == 30
    assert sorted(f.result() for f in cf.as_completed([square.remote(i) for i in range(20)],
                                                        timeout=T)) == [i * i for i in range(20)]
    seen = []
    ev = threading.Event()
    r = square.remote(9)
    r.add_done_callback(lambda f: (seen.append(f.result()), ev.set()))
    assert ev.wait(T) and seen == [81]
    ready, pending = hm.wait([square.remote(i) for i in range(5)], num_returns=5, timeout=T)
    assert len(ready) == 5 and not pending
    assert isinstance(hash(r), int) and r in {r}


@check
def check_wait_timeout_and_get_timeout():
    @hm.remote
    def sleepy(t):
        time.sleep(t)
        return t

    r = sleepy.remote(3.0)
    t0 = time.monotonic()
    ready, pending = hm.wait([r], num_returns=1, timeout=0.2)
    assert ready == [] and pending == [r] and time.monotonic() - t0 < 2.5
    try:
        hm.get(r, timeout=0.2)
    except TimeoutError:
        pass
    else:
        raise AssertionError("no timeout")
    assert hm.get(r, timeout=T) == 3.0


@check
def check_refs_travel_in_results():
    @hm.remote
    def make_ref():
        return {"ref": hm.put(np.arange(5))}

    box = hm.get(make_ref.remote(), timeout=T)
    assert isinstance(box["ref"], hm.ObjectRef)
    assert list(hm.get(box["ref"], timeout=T)) == [0, 1, 2, 3, 4]


# --- Executor --------------------------------------------------------------------------------

def slow_identity(x):
    time.sleep(0.05 if x % 7 == 0 else 0)
    return x


@check
def check_executor_map_order_and_timeout():
    with hm.Executor() as ex:
        assert list(ex.map(slow_identity, range(50))) == list(range(50))
        assert list(ex.map(pow, range(20), range(20), chunksize=6)) == [i ** i for i in range(20)]
        assert sorted(ex.map(slow_identity, range(10), unordered=True)) == list(range(10))
        it = ex.map(time.sleep, [5.0, 5.0], timeout=0.3)
        t0 = time.monotonic()
        try:
            list(it)
        except TimeoutError:
            assert time.monotonic() - t0 < 3
        else:
            raise AssertionError("map timeout not raised")
        try:
            ex.map(abs, [1], chunksize=0)
        except ValueError:
            pass
        else:
            raise AssertionError("chunksize=0 accepted")


@check
def check_executor_arguments_and_lifecycle():
    for bad in (0, -1):
        try:
            hm.Executor(max_workers=bad)
        except ValueError as exc:
            assert "max_workers must be greater than 0" in str(exc)
        else:
            raise AssertionError("bad max_workers accepted")
    try:
        hm.Executor(initializer=3)
    except TypeError:
        pass
    else:
        raise AssertionError("bad initializer accepted")
    a, b = hm.Executor(max_workers=1), hm.Executor()
    assert a.num_workers == 1
    assert a.submit(pow, 2, 5).result(timeout=T) == 32
    a.shutdown()
    try:
        a.submit(abs, 1)
    except RuntimeError:
        pass
    else:
        raise AssertionError("submit after shutdown accepted")
    assert b.submit(abs, -3).result(timeout=T) == 3      # the other executor still works
    assert hm.get(inc.remote(1), timeout=T) == 2          # and so does the runtime
    b.shutdown()


def _init_global(value):
    # functions of __main__ are pickled by value (each with its own globals), so the initializer
    # leaves its mark in the process environment, which every task of the rank sees
    os.environ["HM_CHECK_INITIALIZED"] = value


def _read_global():
    return os.environ.get("HM_CHECK_INITIALIZED")


def _bad_init():
    raise RuntimeError("initializer failed")


@check
def check_executor_initializer():
    with hm.Executor(initializer=_init_global, initargs=("yes",)) as ex:
        assert set(ex.map(lambda _: _read_global(), range(10))) == {"yes"}
    ex = hm.Executor(initializer=_bad_init)
    f = ex.submit(abs, 1)
    assert isinstance(f.exception(timeout=T), cf.BrokenExecutor)
    try:
        ex.submit(abs, 1)
    except cf.BrokenExecutor:
        pass
    else:
        raise AssertionError("broken executor accepted work")


@check
def check_cancel_pending():
    @hm.remote
    def sleepy(t):
        time.sleep(t)
        return t

    cfg = hm.current_config()
    blockers = [sleepy.remote(0.1) for _ in range(len(workers()) * cfg.tasks_per_worker)]
    queued = sleepy.remote(0.0)   # cannot be placed: every worker is full
    assert queued.cancel() and queued.cancelled()
    try:
        queued.result(timeout=T)
    except cf.CancelledError:
        pass
    else:
        raise AssertionError("cancelled ref has a value")
    assert hm.get(blockers, timeout=T) == [0.1] * len(blockers)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", required=True)
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(CHECKS)
    results = []
    for name in names:
        t0 = time.monotonic()
        try:
            CHECKS[name]()
            results.append({"check": name, "ok": True, "seconds": time.monotonic() - t0})
        except BaseException:
            results.append({"check": name, "ok": False, "seconds": time.monotonic() - t0,
                            "error": traceback.format_exc()})
        print(f"{name}: {'ok' if results[-1]['ok'] else 'FAILED'} ({time.monotonic() - t0:.2f} s)",
              flush=True)
        with open(args.json, "w") as fh:
            json.dump(results, fh)


if __name__ == "__main__":
    main()
