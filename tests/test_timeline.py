"""The timeline (hoplite_mpi/tracing.py, issue 15) of real jobs: a Chrome trace-event file with
events from every rank, one task event per task, transfer events whose bytes add up to what
was pulled; ``python -m hoplite_mpi.trace summary`` reads it; HOPLITE_MPI_TIMELINE records a
whole run."""
from __future__ import annotations

import bisect
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import HERE, ROOT, run_job

from hoplite_mpi.config import Config
from hoplite_mpi.serialization import serialize
from hoplite_mpi.store import chunk_ends, object_plan

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


def test_stop_ends_recording_on_every_rank(tmp_path):
    """hm.timeline(path, stop=True): the file as before, then no rank records (the hooks are off
    again) and a later hm.timeline(path) is a RuntimeError."""
    path = str(tmp_path / "trace.json")
    proc = run_job(3, "-m", "hoplite_mpi", WORKLOAD, path, "--start", "--stop", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    _check(path, got["nbytes"])
    assert got["recording"] == [False, False]
    assert got["again"].startswith("the timeline is not being recorded")
    assert not os.path.exists(path + ".again")


# --- collectives and directory requests (tests/mpi/timeline_collectives.py) -------------------

COLLECTIVES = os.path.join(HERE, "mpi", "timeline_collectives.py")


def _run_collectives(tmp_path) -> tuple[list, dict]:
    path = str(tmp_path / "collectives.json")
    proc = run_job(4, "-m", "hoplite_mpi", COLLECTIVES, path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    return json.load(open(path))["traceEvents"], got


def _of(events: list, cat: str, prefix: str) -> list:
    return [e for e in events if e.get("cat") == cat and e["name"].startswith(prefix)]


def test_reduce_broadcast_and_directory_events(tmp_path):
    events, got = _run_collectives(tmp_path)
    nbytes, chunks, inputs = got["nbytes"], got["chunks"], got["inputs"]
    assert got["result_nbytes"] == nbytes and chunks >= 4 and got["holders"] == [[1], [2], [3]]

    # the reduce, as coordinated on rank 0: one attempt, over the three inputs, to rank 0
    (whole,) = [e for e in _of(events, "collective", "reduce ") if "result" in e["args"]
                and "step" not in e["args"]]
    assert whole["pid"] == 0 and whole["args"]["result"] == got["result"]
    assert whole["args"]["path"] == "tree" and sorted(whole["args"]["used"]) == sorted(inputs)
    (attempt,) = whole["args"]["attempts"]
    # its steps: every input combined exactly once; rank 0 (the target, holding no input) has
    # the final step; each stream moved the whole object (the mechanism makes this exact)
    steps = [e for e in _of(events, "collective", "reduce ") if "step" in e["args"]]
    assert steps and all(e["args"]["reduce"] == attempt and e["args"]["outcome"] == "done"
                         for e in steps)
    assert sorted(i for e in steps for i in e["args"]["inputs"]) == sorted(inputs)
    (final,) = [e for e in steps if "result" in e["args"]]
    assert final["pid"] == 0 and final["args"]["result"] == got["result"]
    assert {e["pid"] for e in steps} <= {0, 1, 2, 3}
    assert sum(len(e["args"]["peers"]) for e in steps) == 3   # n inputs, none on the target
    for e in steps:
        streams = len(e["args"]["peers"])
        assert e["args"]["bytes"] == streams * nbytes and e["args"]["chunks"] == streams * chunks, e
        assert e["args"]["step"] != "leaf" or e["args"]["bytes"] == 0
    # the streams of the steps are transfers of their rank too (a child's or a late input's
    # stream, flagged; a copy step's pull of a step's output), adding up to the same bytes
    outs = {e["args"]["out"] for e in steps}
    for rank in range(4):
        pulled = [e for e in _of(events, "transfer", "pull ") if e["pid"] == rank
                  and (e["args"].get("reduce") or e["args"]["object"] in outs)]
        assert sum(e["args"]["bytes"] for e in pulled) == \
            sum(e["args"]["bytes"] for e in steps if e["pid"] == rank), rank

    # the broadcast of the first input (made on rank 1): rank 0 records it whole; every rank a
    # copy: rank 1 held it, each other rank received the whole object once, from another rank
    (bcast,) = _of(events, "collective", "broadcast " + inputs[0])
    assert bcast["pid"] == 0 and bcast["args"] == {"object": inputs[0], "targets": 4, "errors": 0}
    copies = {e["pid"]: e["args"] for e in _of(events, "collective", "broadcast copy ")}
    assert set(copies) == {0, 1, 2, 3}
    assert copies[1]["path"] == "held" and copies[1]["bytes"] == 0 and copies[1]["peer"] is None
    for rank in (0, 2, 3):
        c = copies[rank]
        assert c["object"] == inputs[0] and c["root"] == 0 and not c["error"], c
        assert c["path"] == "directory" and c["bytes"] == nbytes and c["chunks"] == chunks, c
        assert c["peer"] in {0, 1, 2, 3} - {rank}, c
    assert sum(c["bytes"] for c in copies.values()) == 3 * nbytes

    # directory requests: the driver's three DirLookups (object_info), rank 3's DirPull of the
    # second input for its task (its only holder is rank 2)
    looked = {e["args"]["object"]: e for e in _of(events, "directory", "DirLookup ")}
    assert set(looked) >= set(inputs)
    for oid, holders in zip(inputs, got["holders"]):
        e = looked[oid]
        assert e["pid"] == 0 and e["args"]["answer"] == "holders" and e["args"]["holders"] == holders
        assert e["args"]["shard"] in range(4) and e["dur"] >= 0
    pulls = [e for e in _of(events, "directory", "DirPull " + inputs[1]) if e["pid"] == 3]
    assert len(pulls) == 1 and pulls[0]["args"]["answer"] == "sender"
    assert pulls[0]["args"]["sender"] == 2

    # the summary counts collective time in a column of its own
    path = str(tmp_path / "collectives.json")
    out = subprocess.run([sys.executable, "-m", "hoplite_mpi.trace", "summary", path],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    header, *lines = out.stdout.splitlines()
    assert header.split()[8:10] == ["coll", "%"]     # the 6th column: rank tasks task% ...
    rows = {int(x.split()[0]): x.split() for x in lines if x.split() and x.split()[0].isdigit()}
    assert set(rows) == {0, 1, 2, 3} and float(rows[0][5]) > 0.0


def test_a_replanned_reduce_is_an_instant_event(tmp_path):
    """Rank 2 SIGKILLs itself as its first reduce step starts (ULFM; the fault-injection
    workload of tests/test_faults.py with a short chain): rank 0's whole-run trace has one
    "replan" instant per re-plan, naming the dead rank and the new attempt, whose steps end
    the reduce."""
    from test_faults import WORKLOAD as FAULTS, _no_ulfm
    if _no_ulfm():
        pytest.skip(_no_ulfm())
    trace, out = tmp_path / "trace.json", tmp_path / "out.json"
    proc = run_job(4, "-m", "hoplite_mpi", FAULTS, "--json", str(out), "--chain", "10",
                   timeout=150, ft=True,
                   env={"HOPLITE_MPI_KILL": "2:reduce:1", "HOPLITE_MPI_TIMELINE": str(trace)})
    assert proc.returncode == 0 and out.exists(), proc.stderr[-3000:]
    got = json.loads(out.read_text())
    if got["dead"] == []:
        pytest.skip("this run placed no reduce step on rank 2")
    assert got["dead"] == [2] and got["reduce_ok"] is True, got
    events = json.load(open(trace))["traceEvents"]
    replans = [e for e in events if e.get("cat") == "replan"]
    assert len(replans) == got["reduces_replanned"] >= 1, (replans, got)
    wholes = {e["args"]["result"]: e for e in events
              if e.get("cat") == "collective" and "attempts" in e.get("args", {})}
    steps = [e for e in events if e.get("cat") == "collective" and "step" in e.get("args", {})]
    for e in replans:
        args = e["args"]
        assert e["pid"] == 0 and e["ph"] == "i" and args["dead"] == [2], e
        assert args["bytes_kept"] >= 0 and args["inputs"] >= args["num"] >= 1, e
        whole = wholes[args["result"]]
        assert not whole["args"]["error"] and args["reduce"] in whole["args"]["attempts"][1:]
        assert whole["ts"] <= e["ts"] <= whole["ts"] + whole["dur"]
        (final,) = [s for s in steps if s["args"].get("result") == args["result"]
                    and s["args"]["reduce"] == whole["args"]["attempts"][-1]]
        assert final["pid"] == 0 and final["args"]["outcome"] == "done", final
    # the new attempts' steps pulled only the chunks after the bytes kept, each stream exactly
    # (the fault workload's inputs: 1 << 20 int64 values)
    ends = chunk_ends(object_plan([memoryview(f).nbytes for f in
                                   serialize(np.zeros(1 << 20, np.int64))], Config()))
    for e in replans:
        first = bisect.bisect_right(ends, e["args"]["bytes_kept"])
        offset = ends[first - 1] if first else 0
        new = [s for s in steps if s["args"]["reduce"] == e["args"]["reduce"]]
        assert new and first < len(ends)
        for s in new:
            streams = len(s["args"]["peers"])
            assert s["args"]["bytes"] == streams * (ends[-1] - offset), (e, s)
            assert s["args"]["chunks"] == streams * (len(ends) - first), (e, s)
    # the abandoned attempts' steps ended failed or aborted, never as the final result
    old = {a for w in wholes.values() for a in w["args"]["attempts"][:-1]}
    assert old and all(s["args"]["outcome"] != "done" for s in steps
                       if s["args"]["reduce"] in old and "result" in s["args"])
