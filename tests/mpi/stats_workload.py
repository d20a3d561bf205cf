"""Every rank's stats (tests/test_stats.py): the driver puts a 4 MiB array (chunked) and runs
tasks pinned to each worker that take it (each worker pulls it), plus a 0.3 s task on rank 1
and a task that raises on rank 2; then prints ``RESULT <json>`` with ``hm.stats(all_ranks=
True)`` and what it expects.  Run it with ``hoplite-mpi run --stats`` to get the table too."""
from __future__ import annotations

import json
import time

import numpy as np

import hoplite_mpi as hm


@hm.remote
def total(x: np.ndarray) -> float:
    return float(x.sum())


@hm.remote
def nap(seconds: float) -> None:
    time.sleep(seconds)


@hm.remote(max_retries=0)
def fail() -> None:
    raise ValueError("meant to fail")


@hm.remote
def all_stats() -> None:
    hm.stats(all_ranks=True)


def main() -> None:
    ranks = list(range(1, hm.world_size()))           # (4 ranks: 1, 2, 3)
    data = hm.put(np.ones(1 << 19))                     # 4 MiB: chunked, pulled by each worker
    per_rank = {r: 3 for r in ranks}
    refs = [total.options(rank=r).remote(data) for r in ranks for _ in range(3)]
    refs.append(nap.options(rank=1).remote(0.3))
    per_rank[1] += 1
    errors = [fail.options(rank=2).remote(), all_stats.options(rank=3).remote()]
    per_rank[2] += 1
    per_rank[3] += 1
    got = hm.get(refs[:-1], timeout=120)
    hm.wait(refs + errors, num_returns=len(refs) + len(errors), timeout=120)
    caught = []
    for ref in errors:
        try:
            hm.get(ref, timeout=60)
        except Exception as exc:
            caught.append(f"{type(exc).__name__}: {exc}")
    stats = hm.stats(all_ranks=True, timeout=60)
    print("RESULT " + json.dumps({"sums": got, "expected_tasks": per_rank, "errors": caught,
                                  "nbytes": 1 << 22, "stats": stats}), flush=True)


if __name__ == "__main__":
    main()
