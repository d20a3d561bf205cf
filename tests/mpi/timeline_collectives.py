"""A traced run of collectives for tests/test_timeline.py (4 ranks): three 4 MiB arrays made by
tasks pinned to ranks 1, 2 and 3 (waited for before recording starts), then, recorded:
``hm.object_info`` of the three (a DirLookup each from rank 0), an ``hm.reduce`` of them to rank
0, an ``hm.broadcast`` of the first (made on rank 1) to every rank, and a task pinned to rank 3
that reads the second (made on rank 2: a DirPull from rank 3); then ``hm.timeline(PATH)``.
Prints ``RESULT <json>``: the ids, bytes and chunks the test expects in the trace."""
from __future__ import annotations

import json
import sys

import numpy as np

import hoplite_mpi as hm
from hoplite_mpi.serialization import serialize
from hoplite_mpi.store import object_plan

N = 1 << 19        # float64 values: 4 MiB, several chunks of the default 1 MiB
T = 120            # seconds: bound of every wait


@hm.remote
def make(n: int, value: float) -> np.ndarray:
    return np.full(n, value, dtype=np.float64)


@hm.remote
def total(a: np.ndarray) -> float:
    return float(a.sum())


def main() -> None:
    path = sys.argv[1]
    refs = [make.options(rank=r).remote(N, float(r)) for r in (1, 2, 3)]
    ready, _ = hm.wait(refs, num_returns=3, timeout=T)
    assert len(ready) == 3
    hm.timeline()                                          # start recording on every rank
    where = hm.object_info(refs, timeout=T)
    red = hm.reduce(refs, "sum")
    assert float(hm.get(red, timeout=T)[0]) == 6.0
    hm.broadcast(refs[0], timeout=T)
    assert hm.get(total.options(rank=3).remote(refs[1]), timeout=T) == 2.0 * N
    events = hm.timeline(path)
    sizes = [memoryview(f).nbytes for f in serialize(np.zeros(N))]
    print("RESULT " + json.dumps({
        "events": events, "inputs": [r.hex() for r in refs], "result": red.hex(),
        "holders": [list(where[r].ranks) for r in refs],
        "nbytes": where[refs[0]].nbytes, "result_nbytes": hm.object_info(red)[red].nbytes,
        "chunks": len(object_plan(sizes, hm.current_config()))}), flush=True)


if __name__ == "__main__":
    main()
