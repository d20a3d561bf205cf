"""Run other projects' executor test suites against one executor, inside an MPI job.

    mpirun -n 3 python -m hoplite_mpi   adapter.py --executor hoplite --json OUT --cpython DIR --mpi4py DIR
    mpirun -n 3 python -m mpi4py.futures adapter.py --executor mpi4py  --json OUT --cpython DIR --mpi4py DIR
    mpirun -n 3 python adapter.py --spmd --executor hoplite|mpi4py --json OUT --mpi4py DIR

DIR for ``--cpython`` holds CPython's ``test_concurrent_futures.py`` (3.11, one file); DIR for
``--mpi4py`` is ``demo/futures`` of an unpacked mpi4py sdist (its ``test_futures.py`` finds
``test/mpitestutil.py`` two levels up).  Both directories must also be on ``PYTHONPATH`` so that
worker ranks can import the suites' helper functions by name.

The same test classes run for both executors (so the counts can be compared): CPython's generic
executor mixins (``ExecutorTest``, ``WaitTests``, ...), combined with a mixin whose
``executor_type`` is the executor under test, and mpi4py's ``ProcessPool*`` / ``MPICommExecutor``
tests, with ``mpi4py.futures.MPIPoolExecutor`` / ``MPICommExecutor`` replaced by
``hoplite_mpi.Executor`` for ``--executor hoplite``.  With ``--spmd`` every rank runs mpi4py's
``MPICommExecutorTest`` (``MPICommExecutor(comm, root)`` blocks entered by every rank of
``COMM_WORLD``, so also its root/communicator tests that a shared pool skips).  Tests that only make sense for the stdlib's
pools or read mpi4py's private state are skipped as "excluded: <reason>" in both runs
(:data:`EXCLUDED`).  Each test's outcome is written to OUT (JSON) as soon as it ends, and a test
that runs longer than ``--test-timeout`` seconds ends the job (its threads' stacks go to stderr)
and is reported as "hung", so a hang costs one test, not the report.
"""
from __future__ import annotations

import argparse
import faulthandler
import importlib
import json
import os
import sys
import time
import types
import unittest

# test id ("<suite>:<Class>.<method>", or "<suite>:<Class>" for a whole class) -> reason.
EXCLUDED = {
    # --- CPython test_concurrent_futures (3.11) ---
    "cpython:ExecutorShutdownTest.test_interpreter_shutdown":
        "starts a fresh `python -c` that imports the executor class by name from "
        "concurrent.futures: only the stdlib's pools can be made that way (no MPI job)",
    "cpython:ExecutorShutdownTest.test_submit_after_interpreter_shutdown":
        "same: a fresh `python -c` importing the executor from concurrent.futures",
    "cpython:ExecutorShutdownTest.test_hang_gh83386":
        "same: a fresh `python -c` importing the executor from concurrent.futures",
    "cpython:ProcessPoolExecutorTest.test_killed_child":
        "kills one of ProcessPoolExecutor._processes (stdlib process pool internals)",
    "cpython:ProcessPoolExecutorTest.test_traceback":
        "expects concurrent.futures.process._RemoteTraceback, the stdlib process pool's class",
    "cpython:ProcessPoolExecutorTest.test_ressources_gced_in_workers":
        "needs a multiprocessing manager (mp_context) shared with forked workers",
    "cpython:ProcessPoolExecutorTest.test_saturation":
        "counts ProcessPoolExecutor._processes",
    "cpython:ProcessPoolExecutorTest.test_idle_process_reuse_one":
        "counts ProcessPoolExecutor._processes",
    "cpython:ProcessPoolExecutorTest.test_idle_process_reuse_multiple":
        "counts ProcessPoolExecutor._processes",
    "cpython:ProcessPoolExecutorTest.test_max_tasks_per_child":
        "max_tasks_per_child restarts worker processes: a ProcessPoolExecutor feature",
    "cpython:ProcessPoolExecutorTest.test_max_tasks_per_child_defaults_to_spawn_context":
        "reads ProcessPoolExecutor._mp_context",
    "cpython:ProcessPoolExecutorTest.test_max_tasks_early_shutdown":
        "max_tasks_per_child: a ProcessPoolExecutor feature",
    "cpython:ProcessPoolExecutorTest.test_max_workers_too_large":
        "Windows-only limit of ProcessPoolExecutor",
    # --- mpi4py demo/futures/test_futures.py ---
    "mpi4py:ProcessPoolShutdownTest.test_shutdown": "reads MPIPoolExecutor._pool (private)",
    "mpi4py:ProcessPoolShutdownTest.test_shutdown_cancel": "calls MPIPoolExecutor._pool.cancel()",
    "mpi4py:ProcessPoolShutdownTest.test_init_bootup_shutdown": "reads MPIPoolExecutor._pool",
    "mpi4py:ProcessPoolShutdownTest.test_context_manager_shutdown":
        "reads MPIPoolExecutor._pool.thread/queue/event",
    "mpi4py:ProcessPoolShutdownTest.test_del_shutdown":
        "reads MPIPoolExecutor._pool.thread/queue/event",
    "mpi4py:ProcessPoolBootupTest.test_bootup_shutdown_nowait": "joins MPIPoolExecutor._pool",
    "mpi4py:ProcessPoolInitTest.test_get_comm_workers":
        "mpi4py.futures.get_comm_workers() is mpi4py's API for tasks (the pool's communicator)",
    "mpi4py:MPICommExecutorTest.test_get_comm_workers": "mpi4py.futures.get_comm_workers()",
    "mpi4py-spmd:MPICommExecutorTest.test_get_comm_workers": "mpi4py.futures.get_comm_workers()",
    "mpi4py:ProcessPoolInitTest.test_run_name":
        "checks mpi4py's name for the main module on workers (futures._core.MAIN_RUN_NAME)",
    "mpi4py:ProcessPoolPickleTest.test_exc_unpickle":
        "asserts that the error's __cause__ is an instance of mpi4py.futures._core.RemoteTraceback, "
        "mpi4py's private class (hoplite_mpi attaches hoplite_mpi.RemoteTraceback)",
    "mpi4py:ProcessPoolSubmitTest.test_mpi_serialized_support":
        "swaps mpi4py.futures._core.serialized.lock (mpi4py internals)",
    "mpi4py:ThreadPoolTest": "tests the stdlib ThreadPoolExecutor, not an MPI executor",
    "mpi4py:ThenTest": "tests mpi4py.futures.aplus futures, not an executor",
    "mpi4py:CollectTest": "tests mpi4py.futures.collect on plain futures, not an executor",
    "mpi4py:ComposeTest": "tests mpi4py.futures.compose on plain futures, not an executor",
}


def _load_cpython(executor_type) -> list[type]:
    mod = importlib.import_module("test_concurrent_futures")

    class ExecutorUnderTest(mod.ExecutorMixin):
        pass
    ExecutorUnderTest.executor_type = executor_type
    classes = []
    for mixin in (mod.ExecutorShutdownTest, mod.WaitTests, mod.AsCompletedTests,
                  mod.ExecutorTest, mod.ProcessPoolExecutorTest,
                  mod.InitializerMixin, mod.FailingInitializerMixin):
        classes.append(type(mixin.__name__, (mixin, ExecutorUnderTest, mod.BaseTestCase),
                            {"__module__": "cpython"}))
    return classes


class _FuturesProxy(types.ModuleType):
    """``mpi4py.futures`` with MPIPoolExecutor/MPICommExecutor replaced."""

    def __init__(self, real, **replaced) -> None:
        super().__init__(real.__name__)
        self._real = real
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(self._real, name)


def _load_mpi4py(which: str, spmd: bool = False) -> list[type]:
    from mpi4py import futures
    real_pool = futures._core.SharedPool
    if which == "hoplite" and not spmd:
        # run mpi4py's tests as under `python -m mpi4py.futures` (a shared pool): their skip
        # conditions then match the MPIPoolExecutor run exactly
        futures._core.SharedPool = object()
    try:
        mod = importlib.import_module("test_futures")
    finally:
        futures._core.SharedPool = real_pool
    if which == "hoplite":
        import hoplite_mpi as hm

        def comm_executor(comm=None, root=0, **kwargs):
            # MPICommExecutor(comm=None, root=0, **kwargs) spelled with hoplite_mpi
            from mpi4py import MPI
            return hm.Executor(comm=MPI.COMM_WORLD if comm is None else comm, root=root, **kwargs)

        mod.futures = _FuturesProxy(futures, MPIPoolExecutor=hm.Executor,
                                    MPICommExecutor=comm_executor)
        for cls_name in ("ProcessPoolMixin", "SharedPoolInitTest"):   # (deleted in SPMD runs)
            if hasattr(mod, cls_name):
                getattr(mod, cls_name).executor_type = hm.Executor
        mod.MPICommExecutorTest.MPICommExecutor = staticmethod(comm_executor)
    if spmd:
        return [type("MPICommExecutorTest", (mod.MPICommExecutorTest,), {"__module__": "mpi4py-spmd"})]
    out = []
    for name, obj in vars(mod).items():
        if isinstance(obj, type) and issubclass(obj, unittest.TestCase) and obj.__module__ == mod.__name__:
            out.append(type(name, (obj,), {"__module__": "mpi4py"}))
    return out


def _test_id(test: unittest.TestCase) -> str:
    cls = type(test)
    return f"{cls.__module__}:{cls.__name__}.{test._testMethodName}"


def _exclusion(test_id: str):
    return EXCLUDED.get(test_id) or EXCLUDED.get(test_id.rsplit(".", 1)[0])


class _Recorder(unittest.TestResult):
    def __init__(self, path: str, executor: str, test_timeout: float) -> None:
        super().__init__()
        self.path = path
        self.state = {"executor": executor, "results": {}, "running": None, "finished": False}
        self.test_timeout = test_timeout
        self.t0 = 0.0

    def write(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f, indent=1)
        os.replace(tmp, self.path)

    def _put(self, test, outcome: str, detail: str = "") -> None:
        self.state["results"][_test_id(test)] = {
            "outcome": outcome, "detail": detail[-3000:],
            "seconds": round(time.monotonic() - self.t0, 3)}

    def startTest(self, test) -> None:
        super().startTest(test)
        self.t0 = time.monotonic()
        self.state["running"] = _test_id(test)
        self.write()
        print(f"--- {_test_id(test)}", file=sys.stderr, flush=True)
        faulthandler.dump_traceback_later(self.test_timeout, exit=True)

    def stopTest(self, test) -> None:
        faulthandler.cancel_dump_traceback_later()
        self.state["running"] = None
        if _test_id(test) not in self.state["results"]:
            self._put(test, "pass")
        self.write()
        super().stopTest(test)

    def addError(self, test, err) -> None:
        super().addError(test, err)
        self._put(test, "error", self._exc_info_to_string(err, test))

    def addFailure(self, test, err) -> None:
        super().addFailure(test, err)
        self._put(test, "fail", self._exc_info_to_string(err, test))

    def addSkip(self, test, reason) -> None:
        super().addSkip(test, reason)
        excluded = reason.startswith("excluded: ")
        self._put(test, "excluded" if excluded else "skip", reason)

    def addExpectedFailure(self, test, err) -> None:
        super().addExpectedFailure(test, err)
        self._put(test, "pass", "expected failure")

    def addUnexpectedSuccess(self, test) -> None:
        super().addUnexpectedSuccess(test)
        self._put(test, "fail", "unexpected success")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--executor", choices=("hoplite", "mpi4py"), required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--cpython", help="directory holding test_concurrent_futures.py")
    ap.add_argument("--mpi4py", help="demo/futures directory of the mpi4py sdist")
    ap.add_argument("--test-timeout", type=float, default=90.0)
    ap.add_argument("-k", action="append", default=[], help="only tests whose id contains this")
    ap.add_argument("--spmd", action="store_true",
                    help="every rank runs mpi4py's MPICommExecutorTest (plain `mpirun python "
                         "adapter.py`, no pool launcher); each rank writes JSON.rank<r>")
    args = ap.parse_args()
    if args.spmd:
        from mpi4py import MPI
        args.json = f"{args.json}.rank{MPI.COMM_WORLD.Get_rank()}"
    for d in (args.cpython, args.mpi4py):
        if d and d not in sys.path:
            sys.path.insert(0, d)
    if args.executor == "hoplite":
        import hoplite_mpi as hm
        executor_type = hm.Executor
    else:
        from mpi4py.futures import MPIPoolExecutor as executor_type
    classes = []
    if args.cpython and not args.spmd:
        classes += _load_cpython(executor_type)
    if args.mpi4py:
        classes += _load_mpi4py(args.executor, args.spmd)
    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    for cls in classes:
        for test in loader.loadTestsFromTestCase(cls):
            tid = _test_id(test)
            if args.k and not any(k in tid for k in args.k):
                continue
            reason = _exclusion(tid)
            if reason:
                setattr(test, test._testMethodName,
                        unittest.skip(f"excluded: {reason}")(getattr(test, test._testMethodName)))
            suite.addTest(test)
    result = _Recorder(args.json, args.executor, args.test_timeout)
    suite.run(result)
    result.state["finished"] = True
    result.write()
    counts: dict[str, int] = {}
    for rec in result.state["results"].values():
        counts[rec["outcome"]] = counts.get(rec["outcome"], 0) + 1
    print(f"{args.executor}: {counts}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
