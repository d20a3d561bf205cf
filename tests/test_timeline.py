"""The timeline (hoplite_mpi/tracing.py, issue 15) of real jobs: a Chrome trace-event file with
events from every rank, one task event per task, transfer events whose bytes add up to what
was pulled; ``python -m hoplite_mpi.trace summary`` reads it; HOPLITE_MPI_TIMELINE records a
whole run."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from conftest import HERE, ROOT, run_job

WORKLOAD = os.path.join(HERE, "mpi", "timeline_workload.py")


def _check(path: str, nbytes: int) -> dict:
    doc = json.load(open(path))
    events = doc["traceEvents"]
    assert {e["pid"] for e in events} == {0, 1, 2}               # every rank
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {"rank 0", "rank 1", "rank 2"}
    tasks = [e for e in events if e.get("cat") == "task" and e["name"] == "use"]
    assert len(tasks) == 6 and all(e["pid"] in (1, 2) and e["dur"] >= 9000 for e in tasks)
    pulls = [e for e in events if e.get("cat") == "transfer"]
    moved = [e for e in pulls if e["args"]["bytes"] == nbytes]
    assert {e["pid"] for e in moved} == {1, 2}                  # each worker pulled it once
    assert len(moved) == 2 and all(e["args"]["peer"] in (0, 1, 2) for e in moved)
    assert all(e["ph"] in ("X", "i", "M") for e in events)
    return doc


def test_hm_timeline_writes_a_trace_of_every_rank(tmp_path):
    path = str(tmp_path / "trace.json")
    proc = run_job(3, "-m", "hoplite_mpi", WORKLOAD, path, "--start", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    _check(path, got["nbytes"])
    png = str(tmp_path / "summary.png")
    plot = importlib.util.find_spec("matplotlib") is not None      # (the [bench] extra)
    out = subprocess.run([sys.executable, "-m", "hoplite_mpi.trace", "summary", path]
                         + (["--png", png] if plot else []),
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = {int(line.split()[0]): line.split() for line in out.stdout.splitlines()[1:]
            if line.strip() and line.split()[0].isdigit()}
    assert set(rows) == {0, 1, 2} and sum(int(r[1]) for r in rows.values()) >= 6
    if plot:
        assert os.path.getsize(png) > 1000


def test_the_whole_run_with_the_environment_variable(tmp_path):
    """HOPLITE_MPI_TIMELINE: recording from the start, written again at shutdown (the
    workload's own hm.timeline call takes the events so far; the shutdown file gets the rest)."""
    mid, end = str(tmp_path / "mid.json"), str(tmp_path / "end.json")
    proc = run_job(3, "-m", "hoplite_mpi", WORKLOAD, mid, timeout=240,
                   env={"HOPLITE_MPI_TIMELINE": end})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    _check(mid, got["nbytes"])
    assert json.load(open(end))["traceEvents"]                 # written at shutdown
