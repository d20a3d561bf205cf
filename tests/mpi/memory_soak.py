"""Issue 10: a long driver's memory.  N no-op tasks (submit a batch, get it, drop the refs);
every rank's RSS is sampled after each 5 % of them; prints one JSON line with the samples (MiB)
and the driver's CPU time per task in each tenth (microseconds: time.process_time, all threads)."""
from __future__ import annotations

import json
import sys
import time

import psutil

import hoplite_mpi as hm

T = 120


@hm.remote
def noop(i):
    return i


@hm.remote
def rss():
    return psutil.Process().memory_info().rss / 2**20


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    batch = n // 40
    hm.init()
    ranks = list(range(1, hm.world_size()))
    samples, cpu = [], []
    c0 = time.process_time()
    for k in range(1, n // batch + 1):
        refs = [noop.remote(i) for i in range(batch)]
        assert hm.get(refs, timeout=T) == list(range(batch))
        del refs
        done = k * batch
        if done % (n // 20) == 0:
            samples.append([done, psutil.Process().memory_info().rss / 2**20]
                           + hm.get([rss.options(rank=r).remote() for r in ranks], timeout=T))
        if done % (n // 10) == 0:
            c1 = time.process_time()
            cpu.append((c1 - c0) * 1e6 / (n // 10))
            c0 = c1
    print(json.dumps({"samples": samples, "cpu_us_per_task": cpu}), flush=True)


if __name__ == "__main__":
    main()
