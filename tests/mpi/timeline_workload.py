"""A traced run for tests/test_timeline.py: a 1 MiB array put on the driver, 6 tasks that read
it (each worker pulls it once), then ``hm.timeline(PATH)``; prints ``RESULT <json>`` with the
array's bytes."""
from __future__ import annotations

import json
import sys
import time

import numpy as np

import hoplite_mpi as hm


@hm.remote
def use(a: np.ndarray, i: int) -> float:
    time.sleep(0.01)
    return float(a.sum()) + i


def main() -> None:
    path = sys.argv[1]
    if "--start" in sys.argv:
        hm.timeline()                     # start recording now
    ref = hm.put(np.ones(1 << 17))
    got = hm.get([use.remote(ref, i) for i in range(6)], timeout=120)
    assert got == [float(1 << 17) + i for i in range(6)]
    n = hm.timeline(path)
    print("RESULT " + json.dumps({"events": n, "nbytes": hm.object_info(ref)[ref].nbytes}), flush=True)


if __name__ == "__main__":
    main()
