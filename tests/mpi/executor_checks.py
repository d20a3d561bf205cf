"""Regression checks of ``hm.Executor`` (issue 10), run as ONE job by tests/test_executor.py:

    mpirun -n N python -m hoplite_mpi tests/mpi/executor_checks.py --json OUT [--only name,name]

Each check fails without its fix; every wait has a timeout, so a hang fails the check instead of
hanging the job.  Results: one JSON object per check, rewritten after each check.
"""
from __future__ import annotations

import concurrent.futures as cf
import gc
import threading
import time
import weakref

from mpi4py import MPI

import hoplite_mpi as hm

T = 60  # seconds: bound of every wait in these checks
CHECKS = {}


def check(fn):
    CHECKS[fn.__name__.removeprefix("check_")] = fn
    return fn


def _in_thread(fn, timeout):
    """Run ``fn`` in a daemon thread; AssertionError if it has not returned after ``timeout``."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:   # handed to the caller
            box["error"] = exc
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn} still running after {timeout} s (hang)"
    if "error" in box:
        raise box["error"]
    return box.get("value")


@check
def check_shutdown_cancel_futures_returns():
    # was: cancelled refs stayed CANCELLED (never CANCELLED_AND_NOTIFIED), so the wait in
    # shutdown(wait=True) never returned
    ex = hm.Executor()
    fs = [ex.submit(time.sleep, 0.1) for _ in range(50)]
    _in_thread(lambda: ex.shutdown(wait=True, cancel_futures=True), T)
    assert all(f.done() for f in fs)
    cancelled = [f for f in fs if f.cancelled()]
    assert cancelled, "nothing was cancelled"
    done, not_done = cf.wait(fs, timeout=T)
    assert not not_done
    for f in fs:
        if not f.cancelled():
            assert f.exception(timeout=T) is None


class Thing:
    def method(self):
        return 1


def _identity(x):
    return x


def _make_thing(_):
    return Thing()


@check
def check_no_references_kept():
    # was: Executor._fn_ids kept every submitted function (a bound method keeps its object)
    ex = hm.Executor()
    owner, arg = Thing(), Thing()
    gone = threading.Event()
    w_owner = weakref.ref(owner, lambda _: gone.set())
    w_arg = weakref.ref(arg)
    f1 = ex.submit(owner.method)
    f2 = ex.submit(_identity, arg)
    assert f1.result(timeout=T) == 1
    value = f2.result(timeout=T)
    w_value = weakref.ref(value)
    del owner, arg, value
    gc.collect()
    assert w_owner() is None, "the submitted function (a bound method) is still referenced"
    assert w_arg() is None, "the argument is still referenced"
    assert w_value() is None, "the result is still referenced"
    # map's iterator keeps no yielded result either
    for obj in ex.map(_make_thing, range(4)):
        w = weakref.ref(obj)
        del obj
        gc.collect()
        assert w() is None, "map's iterator keeps the result it yielded"
    ex.shutdown(wait=True)


class BadPickle:
    def __reduce__(self):
        raise ZeroDivisionError("no pickling")


@check
def check_unpicklable_argument_gives_original_error():
    # was: the future failed with hm.SerializationError
    ex = hm.Executor()
    f = ex.submit(_identity, BadPickle())
    exc = f.exception(timeout=T)
    assert type(exc) is ZeroDivisionError, repr(exc)
    try:
        f.result(timeout=T)
    except ZeroDivisionError:
        pass
    else:
        raise AssertionError("result() did not raise")
    f = ex.submit(_identity, threading.Lock())
    exc = f.exception(timeout=T)
    assert type(exc) is TypeError, repr(exc)       # (SerializationError is a TypeError subclass)
    assert ex.submit(abs, -4).result(timeout=T) == 4
    ex.shutdown()


class BadReturn:
    def __reduce__(self):
        raise ZeroDivisionError("cannot pickle this result")


def _bad_return():
    return BadReturn()


@check
def check_unpicklable_result_gives_original_error():
    # was: the future failed with hm.SerializationError (MPIPoolExecutor gives the pickler's error)
    ex = hm.Executor()
    exc = ex.submit(_bad_return).exception(timeout=T)
    assert type(exc) is ZeroDivisionError, repr(exc)
    assert isinstance(exc.__cause__, hm.RemoteTraceback), repr(exc.__cause__)
    assert ex.submit(abs, -4).result(timeout=T) == 4
    ex.shutdown()
    # @remote keeps its documented SerializationError
    ref = hm.remote(_bad_return).remote()
    try:
        hm.get(ref, timeout=T)
    except hm.SerializationError as err:
        assert isinstance(err.original, ZeroDivisionError), repr(err.original)
    else:
        raise AssertionError("get of an unpicklable result did not raise")


@check
def check_bootup_and_num_workers():
    ex = hm.Executor(max_workers=1)
    assert ex.bootup() is ex and ex.bootup(wait=True) is ex and ex.bootup(wait=False) is ex
    assert ex.num_workers == 1
    assert hm.Executor().num_workers == max(1, hm.world_size() - 1)
    ex.shutdown(wait=True)
    assert ex.num_workers == 0
    for wait in (True, False):
        try:
            ex.bootup(wait=wait)
        except RuntimeError:
            pass
        else:
            raise AssertionError("bootup after shutdown did not raise")


@check
def check_comm_executor_positional_and_nesting():
    # was: Executor(MPI.COMM_SELF) (MPICommExecutor's positional form) raised
    # "max_workers must be greater than 0"
    cm = hm.Executor(MPI.COMM_SELF)
    with cm as ex:
        assert ex is cm
        assert ex.submit(pow, 2, 5).result(timeout=T) == 32
        try:
            with cm:
                pass
        except RuntimeError:
            pass
        else:
            raise AssertionError("entering an entered executor did not raise")
    with cm as ex:               # a second block starts afresh
        assert ex.submit(pow, 3, 2).result(timeout=T) == 9
    with hm.Executor(MPI.COMM_SELF, 0) as ex:
        assert ex.submit(abs, -1).result(timeout=T) == 1
    for root in (-1, 1):
        try:
            hm.Executor(comm=MPI.COMM_SELF, root=root)
        except ValueError:
            pass
        else:
            raise AssertionError(f"root={root} accepted for COMM_SELF")


if __name__ == "__main__":
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import checkrun
    checkrun.main(CHECKS)
