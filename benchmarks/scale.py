#!/usr/bin/env python
"""How the runtime's costs grow with the number of ranks (issue 13, "32 ranks").

    hoplite-mpi run -n N benchmarks/scale.py [--tasks 3000] [--chain 300] [--idle 3] [--json PATH]

One job of N ranks measures, on rank 0 (the driver):

- start-up: seconds from rank 0's process start to ``hm.init()`` returning (imports, MPI init,
  the runtime's start on every rank), and the job's first task round trip to every worker;
- throughput: ``--tasks`` no-op tasks submitted at once, then ``get`` of all: tasks/s, and rank
  0's process CPU per task (psutil, all its threads);
- chain latency: ``--chain`` dependent tasks, each taking the previous one's ref, all submitted
  up front: milliseconds per task;
- directory shard load: control messages each rank received during the throughput run, per
  task (``hm.stats()["messages"]`` on every rank, before and after), the largest and the
  median over ranks;
- idle CPU: every rank's process CPU over ``--idle`` seconds of nothing (psutil on rank 0; the
  ranks may be on other hosts of one machine, as with simulated hosts, or this is skipped).

Nothing is asserted about timings; every result is checked (assert).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import psutil

import hoplite_mpi as hm


@hm.remote
def noop(x):
    return x


@hm.remote
def inc(x):
    return x + 1


@hm.remote
def messages_here():
    return hm.stats()["messages"], os.getpid()


def message_counts(ranks):
    got = hm.get([messages_here.options(rank=r).remote() for r in ranks], timeout=300)
    return {r: sum(m.values()) for r, (m, _) in zip(ranks, got)}, [pid for _, pid in got]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", type=int, default=3000)
    p.add_argument("--chain", type=int, default=300)
    p.add_argument("--idle", type=float, default=3.0)
    p.add_argument("--json", default="")
    args = p.parse_args()
    me = psutil.Process()
    startup = time.time() - me.create_time()     # (hm.init ran before this script: -m hoplite_mpi)
    n = hm.world_size()
    workers = list(range(1, n)) or [0]
    t0 = time.perf_counter()
    assert hm.get([noop.options(rank=r).remote(r) for r in workers], timeout=300) == workers
    first_round = time.perf_counter() - t0
    before, pids = message_counts(workers)
    own0 = hm.stats()["messages"]
    cpu0 = sum(me.cpu_times()[:2])
    t0 = time.perf_counter()
    refs = [noop.remote(i) for i in range(args.tasks)]
    assert hm.get(refs, timeout=600) == list(range(args.tasks))
    wall = time.perf_counter() - t0
    cpu = sum(me.cpu_times()[:2]) - cpu0
    after, _ = message_counts(workers)
    own1 = hm.stats()["messages"]
    del refs
    per_rank = {r: (after[r] - before[r]) / args.tasks for r in workers}
    per_rank[0] = (sum(own1.values()) - sum(own0.values())) / args.tasks
    t0 = time.perf_counter()
    ref = hm.put(0)
    for _ in range(args.chain):
        ref = inc.remote(ref)
    assert hm.get(ref, timeout=600) == args.chain
    chain = (time.perf_counter() - t0) / args.chain
    idle = None
    try:
        procs = [me] + [psutil.Process(pid) for pid in pids if pid != me.pid]
        c0 = [sum(pr.cpu_times()[:2]) for pr in procs]
        time.sleep(args.idle)      # (the measurement itself: the job does nothing meanwhile)
        idle = [100 * (sum(pr.cpu_times()[:2]) - c) / args.idle for pr, c in zip(procs, c0)]
    except psutil.Error:
        pass
    loads = sorted(per_rank.values())
    out = {"ranks": n, "startup_s": startup, "first_round_s": first_round,
           "tasks_per_s": args.tasks / wall, "rank0_cpu_us_per_task": 1e6 * cpu / args.tasks,
           "chain_ms_per_task": 1e3 * chain,
           "messages_per_task_max_rank": max(loads), "messages_per_task_median_rank": statistics.median(loads),
           "messages_per_task_rank0": per_rank[0],
           "idle_cpu_percent": idle}
    print(f"{n:3d} ranks: start-up {startup:5.2f} s (first round to every worker {first_round:5.2f} s); "
          f"{out['tasks_per_s']:7.0f} no-op tasks/s, rank 0 CPU {out['rank0_cpu_us_per_task']:5.0f} us/task; "
          f"chain {out['chain_ms_per_task']:6.2f} ms/task; messages received per task: rank 0 "
          f"{per_rank[0]:.2f}, busiest other {max(v for r, v in per_rank.items() if r):.2f}, median "
          f"{statistics.median(loads):.2f}; idle CPU % per rank: "
          + ("n/a" if idle is None else f"max {max(idle):.1f}, median {statistics.median(idle):.1f}"), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
