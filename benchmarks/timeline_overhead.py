#!/usr/bin/env python
"""Timeline overhead (issue 15): what recording costs, and what the hooks cost while nothing
records.

One job (4 ranks) measures three workloads, each ``--reps`` times with the timeline off and
on, alternating (off/on, then on/off, ...; the first rep of each is a warm-up, not counted):

- ``noop``: 2000 no-op tasks submitted at once, then ``hm.get`` of all (tasks/s);
- ``reduce``: ``hm.reduce`` of three 64 MiB float64 arrays (made once by tasks pinned to ranks
  1-3) to rank 0, until the result is ready (s); the result is deleted after;
- ``broadcast``: ``hm.broadcast`` of a fresh 64 MiB array put on rank 0 to every rank (s; the
  put is outside the timed region); deleted after;
- ``chain``: 200 dependent small tasks (each takes the previous one's ref), submitted at once,
  ``hm.get`` of the last (s).

"On": ``hm.timeline()`` starts recording on every rank; after the workloads ``hm.timeline(path)``
gathers and writes the events (not timed).  "Off": ``hm.timeline(path, stop=True)`` writes them
and stops recording on every rank.

    # one job (prints RESULT <json>):
    mpirun -n 4 --oversubscribe python -m hoplite_mpi benchmarks/timeline_overhead.py [--reps 6]
    # A/B: jobs alternating between source trees (e.g. this branch and its base), then a table:
    python benchmarks/timeline_overhead.py --runner --trees new=/work/wt-tl,base=/tmp/base \\
        [--jobs 3] [--json OUT]

Run the jobs with a neutral working directory (the runner uses /tmp), so ``PYTHONPATH`` decides
which ``hoplite_mpi`` is imported; each job reports the file it imported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import hoplite_mpi as hm
from hoplite_mpi import tracing

NOOPS = 2000          # tasks
CHAIN = 200           # dependent tasks
BIG = 8 << 20         # float64 values: 64 MiB
T = 300               # seconds: bound of every wait in a job
WORKLOADS = ("noop", "reduce", "broadcast", "chain")


# --- the job -------------------------------------------------------------------------------

@hm.remote
def noop(x):
    return x


@hm.remote
def inc(x):
    return x + 1


@hm.remote
def make(n: int, value: float) -> np.ndarray:
    return np.full(n, value, dtype=np.float64)


def _noop() -> float:
    """No-op tasks per second."""
    t0 = time.perf_counter()
    got = hm.get([noop.remote(i) for i in range(NOOPS)], timeout=T)
    dt = time.perf_counter() - t0
    assert got == list(range(NOOPS))
    return NOOPS / dt


def _reduce(inputs) -> float:
    """Seconds from ``hm.reduce`` to the result ready on rank 0."""
    t0 = time.perf_counter()
    red = hm.reduce(inputs, "sum")
    ready, _ = hm.wait([red], timeout=T)
    dt = time.perf_counter() - t0
    assert ready and float(hm.get(red, timeout=T)[-1]) == 6.0
    hm.delete(red)
    return dt


def _broadcast() -> float:
    """Seconds of ``hm.broadcast`` of a fresh 64 MiB object to every rank."""
    ref = hm.put(np.ones(BIG))
    t0 = time.perf_counter()
    hm.broadcast(ref, timeout=T)
    dt = time.perf_counter() - t0
    hm.delete(ref)
    return dt


def _chain() -> float:
    """Seconds for ``CHAIN`` dependent tasks, submitted at once."""
    t0 = time.perf_counter()
    r = inc.remote(0)
    for _ in range(CHAIN - 1):
        r = inc.remote(r)
    got = hm.get(r, timeout=T)
    dt = time.perf_counter() - t0
    assert got == CHAIN
    return dt


def _set_recording(on: bool, path: str) -> int:
    """Start recording on every rank, or write what was recorded to ``path`` and stop it on
    every rank; returns the number of events written (0 when starting)."""
    if on:
        hm.timeline()
        return 0
    return hm.timeline(path, stop=True) if tracing.recorder is not None else 0


def _phase(fns: dict) -> dict:
    return {name: fn() for name, fn in fns.items()}


def job(reps: int, phases: list) -> dict:
    """(rank 0 of a job) ``reps`` alternating rounds of ``phases``; returns the samples."""
    inputs = [make.options(rank=r).remote(BIG, float(r)) for r in (1, 2, 3)]
    hm.wait(inputs, num_returns=3, timeout=T)
    fns = {"noop": _noop, "reduce": lambda: _reduce(inputs), "broadcast": _broadcast,
           "chain": _chain}
    samples: dict = {p: {w: [] for w in WORKLOADS} for p in phases}
    events: list = []
    path = os.path.join(tempfile.gettempdir(), f"timeline_overhead_{os.getpid()}.json")
    for rep in range(reps + 1):
        order = phases if rep % 2 == 0 else phases[::-1]
        for phase in order:
            _set_recording(phase == "on", path)
            got = _phase(fns)
            if phase == "on":
                events.append(_set_recording(False, path))
            if rep:                          # (rep 0: warm-up)
                for w in WORKLOADS:
                    samples[phase][w].append(got[w])
    if os.path.exists(path):
        os.unlink(path)
    return {"hoplite_mpi": hm.__file__, "samples": samples, "events_per_on_phase": events,
            "load": os.getloadavg()}


# --- the runner ----------------------------------------------------------------------------

def run_job(tree: str, reps: int, phases: list, timeout: float) -> dict:
    """One ``mpirun -n 4`` job with ``PYTHONPATH=tree``, from /tmp; its RESULT."""
    from hoplite_mpi.cli import mpirun_command
    cmd = mpirun_command(4, [os.path.abspath(__file__), "--reps", str(reps),
                             "--phases", ",".join(phases)], ft=False)
    env = dict(os.environ, PYTHONPATH=tree, PYTHONUNBUFFERED="1")
    env.pop("HOPLITE_MPI_TIMELINE", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd="/tmp")
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"job failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def _median(xs: list) -> float:
    return statistics.median(xs) if xs else float("nan")


def _time_ratio(w: str, a: list, b: list) -> float:
    """Median time of samples ``a`` over that of ``b`` (``noop`` samples are rates: inverted)."""
    ratio = _median(a) / _median(b)
    return 1 / ratio if w == "noop" else ratio


def table(results: dict) -> str:
    """Markdown: per tree and phase the median of every sample of every job; then time ratios
    (> 1: slower) of on over off per tree, and of the first tree over the second, off."""
    unit = {"noop": "tasks/s", "reduce": "s", "broadcast": "s", "chain": "s"}
    head = "| tree | phase | " + " | ".join(f"{w} ({unit[w]})" for w in WORKLOADS) + " |"
    rows = [head, "|" + "---|" * (2 + len(WORKLOADS))]
    pooled: dict = {}
    for tree, jobs in results.items():
        for phase in jobs[0]["samples"]:
            pooled[tree, phase] = {w: [x for j in jobs for x in j["samples"][phase][w]]
                                   for w in WORKLOADS}
            med = [_median(pooled[tree, phase][w]) for w in WORKLOADS]
            rows.append(f"| {tree} | {phase} | " + " | ".join(
                f"{m:.0f}" if w == "noop" else f"{m:.4f}" for w, m in zip(WORKLOADS, med)) + " |")
    for tree in results:
        if (tree, "on") in pooled and (tree, "off") in pooled:
            rows.append(f"| {tree} | on/off time | " + " | ".join(
                f"{_time_ratio(w, pooled[tree, 'on'][w], pooled[tree, 'off'][w]):.3f}"
                for w in WORKLOADS) + " |")
    trees = list(results)
    if len(trees) == 2 and all((t, "off") in pooled for t in trees):
        a, b = trees
        rows.append(f"| {a}/{b} | off time | " + " | ".join(
            f"{_time_ratio(w, pooled[a, 'off'][w], pooled[b, 'off'][w]):.3f}"
            for w in WORKLOADS) + " |")
    return "\n".join(rows)


def runner(args: argparse.Namespace) -> int:
    """Run ``--jobs`` jobs per tree, alternating trees (ABBA); print the table."""
    if args.tables:                 # (only the table of earlier runs' JSON files, pooled)
        runs = [json.load(open(path)) for path in args.tables.split(",")]
        print(table({tree: [j for run in runs for j in run[tree]] for tree in runs[0]}))
        return 0
    trees = dict(item.split("=", 1) for item in args.trees.split(","))
    results: dict = {name: [] for name in trees}
    t0 = time.monotonic()
    for k in range(args.jobs):
        names = list(trees) if k % 2 == 0 else list(trees)[::-1]
        for name in names:
            got = run_job(trees[name], args.reps, args.phases.split(","), args.timeout)
            results[name].append(got)
            print(f"job {k} {name}: {got['hoplite_mpi']}, load {got['load'][0]:.2f}, "
                  f"events per on phase {got['events_per_on_phase']}", flush=True)
    print(table(results))
    print(f"({time.monotonic() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=6, help="counted rounds of each phase per job")
    p.add_argument("--phases", default="off,on")
    p.add_argument("--runner", action="store_true", help="run jobs (see the module docstring)")
    p.add_argument("--trees", default=f"new={os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}")
    p.add_argument("--jobs", type=int, default=3, help="jobs per tree (runner)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per job (runner)")
    p.add_argument("--json")
    p.add_argument("--tables", metavar="A.json,B.json", help="(runner) print the pooled table "
                   "of earlier runs' --json files instead of running jobs")
    args = p.parse_args()
    if args.runner:
        return runner(args)
    if hm.rank() != 0:
        return 0
    got = job(args.reps, args.phases.split(","))
    print("RESULT " + json.dumps(got), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(got, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
