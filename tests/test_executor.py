"""``hm.Executor`` regressions (issue 10): the MPI checks in tests/mpi/executor_checks.py, one
job per rank count, each check its own test; and two that need no job."""
from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest

from conftest import HERE, ROOT, assert_check_ok, check_results

sys.path.insert(0, os.path.join(HERE, "mpi"))
import executor_checks  # noqa: E402  (only to list the check names; runs nothing)

RANKS = (1, 3)
SCRIPT = os.path.join(HERE, "mpi", "executor_checks.py")
JOB_TIMEOUT = 300
_results: dict[int, dict] = {}


@pytest.mark.parametrize("n", RANKS)
@pytest.mark.parametrize("name", list(executor_checks.CHECKS))
def test_check(name, n, tmp_path_factory):
    assert_check_ok(check_results(SCRIPT, n, tmp_path_factory, _results, JOB_TIMEOUT), name)


@pytest.mark.parametrize("n", RANKS)
def test_job_exits_cleanly(n, tmp_path_factory):
    res = check_results(SCRIPT, n, tmp_path_factory, _results, JOB_TIMEOUT)
    assert res["returncode"] == 0, res["output"]


def test_comm_self_executor_in_a_plain_process():
    """``Executor(MPI.COMM_SELF)`` without mpirun: one process that runs the tasks itself."""
    code = ("from mpi4py import MPI\nimport hoplite_mpi as hm\n"
            "with hm.Executor(MPI.COMM_SELF) as ex:\n"
            "    assert ex is not None and ex.num_workers == 1\n"
            "    assert ex.submit(pow, 2, 5).result(timeout=60) == 32\n"
            "    assert list(ex.map(abs, [-1, -2], timeout=60)) == [1, 2]\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def test_objectref_del_after_failed_construction():
    """A ref whose __init__ did not finish is collected silently (was: AttributeError '_owner'
    printed by __del__)."""
    from hoplite_mpi.api import ObjectRef

    seen = []
    hook, sys.unraisablehook = sys.unraisablehook, seen.append
    try:
        with pytest.raises(TypeError):
            ObjectRef()            # missing object_id: __init__ never runs
        gc.collect()
    finally:
        sys.unraisablehook = hook
    assert not seen, [(u.exc_type, u.exc_value) for u in seen]
