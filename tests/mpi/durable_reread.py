"""A lost result of a committed checkpointed task is read back from storage, not recomputed
(tests/test_durable_mpi.py; 3 ranks under ULFM).  The task makes a 4 MiB array on rank 1 (its
only copy), its step is committed, rank 1 is SIGKILLed; the driver's get then returns the
value, ``hm.stats()["durable"]["reread"]`` is 1, and the task's side-effect file is alone."""
from __future__ import annotations

import json
import os
import signal
import sys
import time

import numpy as np

import hoplite_mpi as hm


@hm.remote(checkpoint=True)
def make(n: int, sidefx: str) -> np.ndarray:
    with open(os.path.join(sidefx, f"make.{os.getpid()}.{time.time_ns()}"), "x"):
        pass
    time.sleep(float(os.environ.get("REREAD_TASK_SECONDS", "0")))   # (the cost of recomputing)
    return np.arange(n, dtype=np.int64)


@hm.remote(max_retries=0)
def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    storage, sidefx, out = sys.argv[1:4]
    if storage != "-":             # ("-": no storage, lineage re-runs the task: the comparison)
        hm.init(storage=storage)
    ref = make.options(rank=1).remote(1 << 19, sidefx)
    hm.wait([ref], timeout=120)
    deadline = time.monotonic() + 60
    while storage != "-" and hm.stats()["durable"]["persisted"] < 1:     # its step is committed
        if time.monotonic() > deadline:
            raise TimeoutError("the checkpoint was not committed within 60 s")
        time.sleep(0.05)
    try:
        hm.get(die.options(rank=1).remote(), timeout=60)
    except Exception as exc:      # (the rank died under it)
        print("die:", type(exc).__name__, file=sys.stderr)
    t0 = time.perf_counter()
    value = hm.get(ref, timeout=120)
    seconds = time.perf_counter() - t0
    with open(out, "w") as f:
        json.dump({"ok": bool((value == np.arange(1 << 19)).all()), "get_s": seconds,
                   "durable": hm.stats()["durable"], "dead": hm.dead_ranks()}, f)


if __name__ == "__main__":
    main()
