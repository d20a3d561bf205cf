"""A durable workflow for tests/test_durable_mpi.py: a seeded random DAG of checkpointed tasks
(fan-in and fan-out, numpy results of 1 KiB-16 MiB), run as
``python -m hoplite_mpi durable_workload.py --storage DIR --sidefx DIR --seed S --tasks N``.

Every execution of a task writes a side-effect file ``SIDEFX/<index>.<durable key>.<run>.<pid>``
(``<run>``: the environment variable ``DURABLE_RUN``, else ``SLURM_RESTART_COUNT``, else 0;
``DURABLE_TASK_SECONDS``: each task
sleeps that long after it, for the drain tests)
before it computes, so the test can count executions per task and per run.  The driver prints
nothing but writes ``--json``: the value and size of every task's result, checked against
:func:`reference` (a sequential computation of the same DAG), and ``hm.stats()["durable"]``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time

import numpy as np

import hoplite_mpi as hm

SIZES = (128, 8192, 131072)        # int64 elements: 1 KiB, 64 KiB, 1 MiB
BIG = 2 << 20                      # 16 MiB
PRIME = 1000003


def dag(seed: int, n: int) -> list[tuple[int, list[int]]]:
    """Per task: (elements of its result, indices of its inputs: earlier tasks)."""
    rng = random.Random(seed)
    out = []
    bigs = set(rng.sample(range(n), min(2, n)))
    for i in range(n):
        k = 0 if i == 0 else rng.choice((0, 1, 1, 2, 3))
        inputs = sorted(rng.sample(range(max(0, i - 40), i), min(k, i)))
        out.append((BIG if i in bigs else rng.choice(SIZES), inputs))
    return out


def value(i: int, inputs: list[int]) -> int:
    return (i * 7919 + sum(inputs)) % PRIME


def reference(seed: int, n: int) -> list[tuple[int, int]]:
    """(value, elements) of each task's result, computed sequentially."""
    got: list[tuple[int, int]] = []
    for i, (size, inputs) in enumerate(dag(seed, n)):
        got.append((value(i, [got[j][0] for j in inputs]), size))
    return got


@hm.remote(checkpoint=True)
def step(i: int, size: int, sidefx: str, *inputs: np.ndarray) -> np.ndarray:
    # (not an argument: it would change the keys; under SLURM, by default, the allocation)
    run = os.environ.get("DURABLE_RUN") or os.environ.get("SLURM_RESTART_COUNT", "0")
    with open(os.path.join(sidefx, f"{i}.{hm.task_key()}.{run}.{os.getpid()}"), "x"):
        pass
    time.sleep(float(os.environ.get("DURABLE_TASK_SECONDS", "0")))   # (a slow task)
    return np.full(size, value(i, [int(x[0]) for x in inputs]), dtype=np.int64)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--storage", required=True)
    p.add_argument("--sidefx", required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tasks", type=int, default=200)
    p.add_argument("--json", required=True)
    a = p.parse_args()
    hm.init(storage=a.storage)
    refs = []
    for i, (size, inputs) in enumerate(dag(a.seed, a.tasks)):
        refs.append(step.remote(i, size, a.sidefx, *(refs[j] for j in inputs)))
    results = []
    for ref in refs:
        arr = hm.get(ref, timeout=300)
        results.append((int(arr[0]), int(arr.size), bool((arr == arr[0]).all())))
    stats = hm.stats()
    with open(a.json, "w") as f:
        json.dump({"results": results, "durable": stats["durable"],
                   "reference": reference(a.seed, a.tasks)}, f)


if __name__ == "__main__":
    main()
