"""Issue 10.4: with replication=2, three 32 MiB results of tasks pinned to ranks 1-3 are waited
for, then rank 2 is SIGKILLed at once (its result's replica is usually still in flight).  The
reduce of the three must still be exact: a lost result of a pinned task is rebuilt on another
rank (pinning is placement); prints one JSON line."""
from __future__ import annotations

import json
import os
import signal
import sys

import numpy as np

import hoplite_mpi as hm

T = 90
N = 4 << 20      # float64 elements: 32 MiB


@hm.remote
def pid():
    return os.getpid()


@hm.remote
def full(v):
    return np.full(N, float(v))


def main():
    hm.init(replication=2)
    pids = {r: hm.get(pid.options(rank=r).remote(), timeout=T) for r in (1, 2, 3)}
    refs = [full.options(rank=r).remote(r) for r in (1, 2, 3)]
    ready, _ = hm.wait(refs, num_returns=3, timeout=T)
    assert len(ready) == 3
    os.kill(pids[2], signal.SIGKILL)
    out = hm.get(hm.reduce(refs, "sum"), timeout=T)
    stats = hm.stats()
    print(json.dumps({"exact": bool((out == 6.0).all()), "dead": stats["dead_ranks"],
                      "rebuilt": stats["scheduler"]["rebuilt"]}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
