"""The collectives (broadcast, reduce, allreduce) end to end under mpirun with 1, 2, 3 and 4
ranks (see tests/mpi/collective_checks.py).

One job per rank count runs every check; each check is reported as its own test here.
"""
from __future__ import annotations

import os
import sys

import pytest

from conftest import HERE, assert_check_ok, check_results

sys.path.insert(0, os.path.join(HERE, "mpi"))
import collective_checks  # noqa: E402  (only to list the check names; runs nothing)

RANKS = (1, 2, 3, 4)
SCRIPT = os.path.join(HERE, "mpi", "collective_checks.py")
JOB_TIMEOUT = 220   # the script's own budget is 150 s (+ a hung check's 60 s watchdog)
_results: dict[int, dict] = {}


def results_for(n: int, tmp_path_factory) -> dict:
    return check_results(SCRIPT, n, tmp_path_factory, _results, JOB_TIMEOUT)


@pytest.mark.parametrize("n", RANKS)
@pytest.mark.parametrize("name", list(collective_checks.CHECKS))
def test_check(name, n, tmp_path_factory):
    assert_check_ok(results_for(n, tmp_path_factory), name)


@pytest.mark.parametrize("n", RANKS)
def test_job_exits_cleanly(n, tmp_path_factory):
    res = results_for(n, tmp_path_factory)
    assert res["returncode"] == 0, res["output"]
