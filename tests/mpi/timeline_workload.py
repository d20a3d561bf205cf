"""A traced run for tests/test_timeline.py: a 1 MiB array put on the driver, 6 tasks that read
it (each worker pulls it once), then ``hm.timeline(PATH)``; prints ``RESULT <json>`` with the
array's bytes.  ``--stop``: the write stops recording on every rank (``stop=True``); RESULT
then also says whether each worker still records and what a later ``hm.timeline(path)`` raised."""
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


@hm.remote
def recording() -> bool:
    from hoplite_mpi import tracing
    return tracing.recorder is not None


def main() -> None:
    path = sys.argv[1]
    if "--start" in sys.argv:
        hm.timeline()                     # start recording now
    ref = hm.put(np.ones(1 << 17))
    got = hm.get([use.remote(ref, i) for i in range(6)], timeout=120)
    assert got == [float(1 << 17) + i for i in range(6)]
    stop = "--stop" in sys.argv
    n = hm.timeline(path, stop=stop)
    out = {"events": n, "nbytes": hm.object_info(ref)[ref].nbytes}
    if stop:
        out["recording"] = hm.get([recording.options(rank=r).remote()
                                   for r in range(1, hm.world_size())], timeout=120)
        try:
            hm.timeline(path + ".again")
        except RuntimeError as exc:
            out["again"] = str(exc)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
