"""Placement ahead (tests/mpi/local_deps_checks.py) in ONE job of 4 ranks under
ULFM, where any MPI error used to be taken for a rank's death; each check is its own test."""
from __future__ import annotations

import json
import os
import sys

import pytest

from conftest import HERE, run_job

sys.path.insert(0, os.path.join(HERE, "mpi"))
import local_deps_checks  # noqa: E402  (only to list the check names; runs nothing)

SCRIPT = os.path.join(HERE, "mpi", "local_deps_checks.py")
_results: dict = {}


def results(tmp_path_factory) -> dict:
    if not _results:
        out = tmp_path_factory.mktemp("local_deps") / "results.json"
        proc = run_job(4, "-m", "hoplite_mpi", SCRIPT, "--json", str(out), timeout=300, ft=True)
        got = {r["check"]: r for r in json.loads(out.read_text())} if out.exists() else {}
        _results.update(checks=got, returncode=proc.returncode,
                        output=proc.stdout[-4000:] + proc.stderr[-4000:])
    return _results


@pytest.mark.parametrize("name", list(local_deps_checks.CHECKS))
def test_check(name, tmp_path_factory):
    res = results(tmp_path_factory)
    rec = res["checks"].get(name)
    assert rec is not None, f"check {name} did not run (rc={res['returncode']}):\n{res['output']}"
    assert rec["ok"], rec.get("error")


def test_job_exits_cleanly(tmp_path_factory):
    res = results(tmp_path_factory)
    assert res["returncode"] == 0, res["output"]
