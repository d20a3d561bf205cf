"""The runtime end to end under mpirun with 1, 2 and 4 ranks (see tests/mpi/checks.py).

One job per rank count runs every check; each check is reported as its own test here.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

from conftest import HERE, run_job

sys.path.insert(0, os.path.join(HERE, "mpi"))
import checks  # noqa: E402  (only to list the check names; runs nothing)

RANKS = (1, 2, 4)
_results: dict[int, dict] = {}


def results_for(n: int, tmp_path_factory) -> dict:
    if n not in _results:
        out = tmp_path_factory.mktemp(f"ranks{n}") / "results.json"
        proc = run_job(n, "-m", "hoplite_mpi", os.path.join(HERE, "mpi", "checks.py"),
                       "--json", str(out), timeout=900)
        got = {}
        if out.exists():
            got = {r["check"]: r for r in json.loads(out.read_text())}
        _results[n] = {"checks": got, "returncode": proc.returncode,
                       "output": proc.stdout[-4000:] + proc.stderr[-4000:]}
    return _results[n]


@pytest.mark.parametrize("n", RANKS)
@pytest.mark.parametrize("name", list(checks.CHECKS))
def test_check(name, n, tmp_path_factory):
    res = results_for(n, tmp_path_factory)
    rec = res["checks"].get(name)
    assert rec is not None, f"check {name} did not run (job rc={res['returncode']}):\n{res['output']}"
    assert rec["ok"], rec.get("error")


@pytest.mark.parametrize("n", RANKS)
def test_job_exits_cleanly(n, tmp_path_factory):
    res = results_for(n, tmp_path_factory)
    assert res["returncode"] == 0, res["output"]
