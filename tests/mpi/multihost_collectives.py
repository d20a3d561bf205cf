"""Collectives across simulated hosts (run by tests/test_multihost.py under one mpirun):

    python -m hoplite_mpi tests/mpi/multihost_collectives.py --sizes 1K,64K,1M,16M,64M --json OUT

For each size (float32 arrays, one input per rank, made by a task pinned to that rank; rank 0's
by ``put``): ``hm.reduce`` to rank 0, ``hm.allreduce`` and ``hm.broadcast`` of a fresh object to
every rank.  Values are small integers, so float32 sums are exact; every rank's copy is compared
by a SHA-256 of its bytes, read by a task pinned to that rank.  Writes ``{"results": [...],
"hosts": {rank: hostname}, "udp_bells": {rank: [ranks it rings by UDP]}}``; exits 1 on any mismatch.  Every wait has a timeout.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import socket
import sys

import numpy as np

import hoplite_mpi as hm

T = 120   # seconds: bound of every wait
PATTERN = np.arange(1021, dtype=np.float32)   # a prime length: chunk boundaries never line up


def size_of(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def make(nbytes: int, r: int) -> np.ndarray:
    a = np.resize(PATTERN, nbytes // 4)
    a += np.float32(r)
    return a


def digest(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


@hm.remote
def made(nbytes, r):
    return make(nbytes, r)


@hm.remote
def digest_here(a):
    return digest(a)


@hm.remote
def where():
    return socket.gethostname()


@hm.remote
def rung_by_udp():
    from hoplite_mpi import testing
    return testing.runtime().transport.bell.remote_ranks


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="1K,64K,1M,16M,64M")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    n = hm.world_size()
    ranks = range(1, n)
    hosts = {0: socket.gethostname()}
    hosts.update(zip(ranks, hm.get([where.options(rank=r).remote() for r in ranks], timeout=T)))
    from hoplite_mpi import testing
    udp = {0: testing.runtime().transport.bell.remote_ranks}
    udp.update(zip(ranks, hm.get([rung_by_udp.options(rank=r).remote() for r in ranks], timeout=T)))
    results, ok = [], True
    for label in args.sizes.split(","):
        nbytes = size_of(label)
        refs = [hm.put(make(nbytes, 0))] + [made.options(rank=r).remote(nbytes, r) for r in ranks]
        want = sum(make(nbytes, r) for r in range(n))
        for what in ("reduce", "allreduce", "broadcast"):
            if what == "broadcast":
                ref = hm.put(make(nbytes, 7))
                hm.broadcast(ref, timeout=T)
                expect = digest(make(nbytes, 7))
            else:
                ref = hm.reduce(refs) if what == "reduce" else hm.allreduce(refs)
                expect = digest(want)
            got = digest(hm.get(ref, timeout=T))
            on = [0] if what == "reduce" else list(range(n))
            seen = [got] + hm.get([digest_here.options(rank=r).remote(ref) for r in on if r], timeout=T)
            good = all(d == expect for d in seen)
            ok &= good
            results.append({"size": label, "op": what, "ok": good, "ranks": on})
            print(f"{label:>5} {what:9s} {'ok' if good else 'MISMATCH'}", flush=True)
            hm.delete([ref])
        hm.delete(refs)
    with open(args.json, "w") as fh:
        json.dump({"results": results, "hosts": hosts, "udp_bells": udp}, fh)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
