"""A mixed workload for the fault-injection suite (tests/test_faults.py), run under ULFM:

    hoplite-mpi run -n 4 tests/mpi/fault_workload.py --json OUT

with ``HOPLITE_MPI_KILL=RANK:POINT:N`` set to SIGKILL one rank somewhere on the way.  It writes
the results (which must equal a failure-free run's) and the runtime's retry counters to OUT:

- a 200-task dependency chain (inline values);
- 6 tasks each making a 2 MiB array, and 6 tasks using them (worker-to-worker pulls);
- a 16 MiB object put on the driver and broadcast to every live rank, then read by a task on
  each live worker;
- a reduce of 6 arrays of 8 MiB (int64, made by unpinned tasks on the workers) to rank 0 and an
  allreduce of 3 of them, both called before their inputs exist; a participant that dies makes
  the reduce re-plan (the result must be exact);
- with ``--victim``: once every array has ``Config.replication`` complete copies, a task pinned
  to the rank that made the first array SIGKILLs it, and the arrays are read and summed again
  (tasks re-run to rebuild a lost array are counted: ``rebuilt``).
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
def make_int(n, seed):
    return np.full(n, seed, dtype=np.int64)


@hm.remote
def total(a):
    return float(a.sum())


@hm.remote
def crc(a):
    return zlib.crc32(memoryview(a).cast("B")), hm.rank()


@hm.remote
def pid():
    import os
    return os.getpid()


@hm.remote
def stop():
    import os
    import signal
    os.kill(os.getpid(), signal.SIGSTOP)


@hm.remote
def suicide():
    import os
    import signal
    os.kill(os.getpid(), signal.SIGKILL)


def _wait_for_replicas(refs, copies: int, bound: float = 30.0) -> None:
    """Poll (bounded) until every object of ``refs`` is complete on ``copies`` ranks (as the
    directory records them: a copy registers once it is complete)."""
    deadline = time.monotonic() + bound
    while True:
        counts = {ref.hex(): len(ranks) for ref, ranks in hm.locations(refs, timeout=T).items()}
        if min(counts.values()) >= copies:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"replicas not complete after {bound} s: {counts}")


def _exact(ref, n: int, value: int) -> bool | str:
    """True if ``ref`` is ``n`` int64 elements all equal to ``value``, else what it is."""
    try:
        got = hm.get(ref, timeout=T)
    except Exception as exc:          # (reported, so that the test shows it)
        return f"{type(exc).__name__}: {exc}"
    ok = got.shape == (n,) and got.dtype == np.int64 and bool((got == value).all())
    return ok or f"shape {got.shape} dtype {got.dtype} values {np.unique(got)[:5]}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", required=True)
    parser.add_argument("--chain", type=int, default=200)
    parser.add_argument("--hang", type=int, default=None,
                        help="before the chain, SIGSTOP this rank (a hang without death); it "
                             "is SIGCONTed at the end and must then exit by itself")
    parser.add_argument("--replicas", type=int, default=None,
                        help="make the arrays with .options(replicas=R)")
    parser.add_argument("--victim", action="store_true",
                        help="after the arrays exist and have all their replicas, kill the rank "
                             "that made the first one; then read the arrays again")
    args = parser.parse_args()
    hm.init()
    t0 = time.monotonic()
    hung_pid = None
    remade = None
    if args.hang is not None:
        hung_pid = hm.get(pid.options(rank=args.hang).remote(), timeout=T)
        stop.options(rank=args.hang).remote()     # never completes: the rank is declared dead
    r = hm.put(0)
    for _ in range(args.chain):
        r = inc.remote(r)
    maker = make.options(replicas=args.replicas) if args.replicas else make
    bigs = [maker.remote(1 << 18, s) for s in range(6)]
    sums = [total.remote(b) for b in bigs]
    chain = hm.get(r, timeout=T)
    sums = hm.get(sums, timeout=T)
    firsts = [float(x[0]) for x in hm.get(bigs, timeout=T)]
    if args.victim:
        # objects deleted while their background replicas are still arriving (must not hurt
        # the receiving rank: it once crashed its engine on the next chunk)
        for _ in range(10):
            churn = [make.remote(1 << 20, s) for s in range(3)]
            hm.wait(churn, num_returns=len(churn), timeout=T)
            hm.delete(churn)
        copies = args.replicas or hm.current_config().replication
        _wait_for_replicas(bigs, copies)
        victim = hm.locations(bigs[0], timeout=T)[bigs[0]][0]   # the rank that made it (first holder)
        try:
            hm.get(suicide.options(rank=victim).remote(), timeout=T)
        except hm.RankLostError:
            pass
        # read every array again, on the survivors: no producer may have to run again
        sums = hm.get([total.remote(b) for b in bigs], timeout=T)
        firsts = [float(x[0]) for x in hm.get(bigs, timeout=T)]
        if copies > 1:      # the copies that died with the victim are made again elsewhere
            _wait_for_replicas(bigs, copies)
            remade = True
    n = 1 << 20                                   # 8 MiB of int64 per input: 8 chunks
    ints = [make_int.remote(n, s + 1) for s in range(6)]
    red = hm.reduce(ints)
    allred = hm.allreduce(ints[:3], op="max")
    reduce_ok = _exact(red, n, 21)
    allreduce_ok = _exact(allred, n, 3)
    data = np.arange(4 << 20, dtype=np.float32)
    ref = hm.put(data)
    hm.broadcast(ref, timeout=T)
    live = [w for w in range(1, hm.world_size()) if w not in hm.dead_ranks()] or [0]
    crcs = {}
    for w, r in [(w, crc.options(rank=w).remote(ref)) for w in live]:
        try:
            crcs[w] = hm.get(r, timeout=T)
        except hm.RankLostError:      # w died while (or before) running it: pinned, not re-run
            pass
    expect_crc = zlib.crc32(memoryview(data).cast("B"))
    survivors = [w for w in live if w not in hm.dead_ranks()]
    broadcast_ok = (sorted(crcs) == survivors or sorted(crcs) == live) and \
        all(c == expect_crc and where == w for w, (c, where) in crcs.items())
    stats = hm.stats()
    out = {
        "chain": chain, "sums": sums, "firsts": firsts,
        "broadcast_ok": broadcast_ok,
        "reduce_ok": reduce_ok, "allreduce_ok": allreduce_ok, "copies_remade": remade,
        "reduces_replanned": stats["reduces_replanned"],
        "seconds": time.monotonic() - t0,
        "dead": stats["dead_ranks"],
        "retried": stats["scheduler"]["retried"],
        "rebuilt": stats["scheduler"]["rebuilt"],
        "ranks_lost": stats["ranks_lost"],
    }
    with open(args.json, "w") as fh:
        json.dump(out, fh)
    if hung_pid is not None:
        import os
        import signal
        os.kill(hung_pid, signal.SIGCONT)   # it learns it was declared dead and exits
    hm.shutdown()


if __name__ == "__main__":
    main()
