"""Regression checks of issue 10 (tests/mpi/issue10_checks.py) in ONE job of 4 ranks under
ULFM, where any MPI error used to be taken for a rank's death; each check is its own test."""
from __future__ import annotations

import os
import sys

import pytest

from conftest import HERE, assert_check_ok, check_results

sys.path.insert(0, os.path.join(HERE, "mpi"))
import issue10_checks  # noqa: E402  (only to list the check names; runs nothing)

SCRIPT = os.path.join(HERE, "mpi", "issue10_checks.py")
_results: dict = {}


def results(tmp_path_factory) -> dict:
    return check_results(SCRIPT, 4, tmp_path_factory, _results, 300, ft=True)


@pytest.mark.parametrize("name", list(issue10_checks.CHECKS))
def test_check(name, tmp_path_factory):
    assert_check_ok(results(tmp_path_factory), name)


def test_job_exits_cleanly(tmp_path_factory):
    res = results(tmp_path_factory)
    assert res["returncode"] == 0, res["output"]
