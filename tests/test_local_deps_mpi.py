"""Placement ahead and cancel of placed tasks (tests/mpi/local_deps_checks.py) in ONE job of 4
ranks under ULFM (two checks kill a rank); each check is its own test."""
from __future__ import annotations

import os
import sys

import pytest

from conftest import HERE, assert_check_ok, check_results

sys.path.insert(0, os.path.join(HERE, "mpi"))
import local_deps_checks  # noqa: E402  (only to list the check names; runs nothing)

SCRIPT = os.path.join(HERE, "mpi", "local_deps_checks.py")
_results: dict = {}


def results(tmp_path_factory) -> dict:
    return check_results(SCRIPT, 4, tmp_path_factory, _results, 300, ft=True)


@pytest.mark.parametrize("name", list(local_deps_checks.CHECKS))
def test_check(name, tmp_path_factory):
    assert_check_ok(results(tmp_path_factory), name)


def test_job_exits_cleanly(tmp_path_factory):
    res = results(tmp_path_factory)
    assert res["returncode"] == 0, res["output"]
