"""A mixed workload for the fault-injection suite (tests/test_faults.py), run under ULFM:

    hoplite-mpi run -n 4 tests/mpi/fault_workload.py --json OUT

with ``HOPLITE_MPI_KILL=RANK:POINT:N`` set to SIGKILL one rank somewhere on the way.  It writes
the results (which must equal a failure-free run's) and the runtime's retry counters to OUT:

- a 200-task dependency chain (inline values);
- 6 tasks each making a 2 MiB array, and 6 tasks using them (worker-to-worker pulls);
- a 16 MiB object put on the driver and broadcast to every live rank, then read by a task on
  each live worker;
- a task that returns a driver-made ref's value doubled (lineage through a put).
"""
from __future__ import annotations

import argparse
import json
import time
import zlib

import numpy as np

import hoplite_mpi as hm

T = 90   # seconds: bound of every wait


@hm.remote
def inc(x):
    return x + 1


@hm.remote
def make(n, seed):
    return np.full(n, seed, dtype=np.float64)


@hm.remote
def total(a):
    return float(a.sum())


@hm.remote
def crc(a):
    return zlib.crc32(memoryview(a).cast("B")), hm.rank()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", required=True)
    parser.add_argument("--chain", type=int, default=200)
    args = parser.parse_args()
    hm.init()
    rt = hm.api._rt()
    t0 = time.monotonic()
    r = hm.put(0)
    for _ in range(args.chain):
        r = inc.remote(r)
    bigs = [make.remote(1 << 18, s) for s in range(6)]
    sums = [total.remote(b) for b in bigs]
    chain = hm.get(r, timeout=T)
    sums = hm.get(sums, timeout=T)
    firsts = [float(x[0]) for x in hm.get(bigs, timeout=T)]
    data = np.arange(4 << 20, dtype=np.float32)
    ref = hm.put(data)
    hm.broadcast(ref, timeout=T)
    live = [w for w in range(1, hm.world_size()) if w not in rt.dead] or [0]
    crcs = hm.get([crc.options(rank=w).remote(ref) for w in live], timeout=T)
    expect_crc = zlib.crc32(memoryview(data).cast("B"))
    out = {
        "chain": chain, "sums": sums, "firsts": firsts,
        "broadcast_ok": all(c == expect_crc for c, _ in crcs) and sorted(w for _, w in crcs) == live,
        "seconds": time.monotonic() - t0,
        "dead": sorted(rt.dead),
        "retried": rt.scheduler.stats["retried"],
        "ranks_lost": rt.stats["ranks_lost"],
    }
    with open(args.json, "w") as fh:
        json.dump(out, fh)
    hm.shutdown()


if __name__ == "__main__":
    main()
