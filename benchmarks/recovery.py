#!/usr/bin/env python
"""Recovery benchmark (issue 5): a 64 MiB broadcast, or a 64 MiB reduce, on 4 ranks with one rank
killed mid-way, against the same operation without a failure, in one ULFM job (Hoplite §5.5
reports the latency of the step a failure hits).

    hoplite-mpi run -n 4 benchmarks/recovery.py [--op broadcast|reduce] [--size 64M] [--runs 5]

``--op broadcast`` (default): each failure-free run broadcasts a fresh object to every rank
(``hm.broadcast``), timed on the driver.  Then, once, a task pinned to the victim (rank 2, a
relay in the middle of the chain) arms ``faults`` so that it SIGKILLs itself after receiving half
of the object's chunks, and the same broadcast is timed; it returns when every *live* rank holds
a complete copy (the rank fed by the victim resumes from its byte offset from another holder).

``--op reduce``: 4 inputs (a ``put`` on rank 0 and 3 tasks on the workers, all complete before
timing) summed by ``hm.reduce`` to rank 0, timed until the result is complete.  Then the worker
holding the tree's inner slot (the input placed third) is armed to SIGKILL itself after it
combined half of the chunks; the reduce is re-planned without it (its input is rebuilt by
re-running its task) and must give the exact sum.  The new tree goes on from the bytes of the
result the target had already given out (reported as "going on from byte N").

Target: failed step <= detection + 2 x failure-free step; detection (SIGKILL ->
Comm.Get_failed on the others) was measured separately at 10-50 ms here (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

import hoplite_mpi as hm

T = 120


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


@hm.remote
def arm(spec: str) -> float:
    from hoplite_mpi import faults
    faults.arm(hm.rank(), spec)
    return time.time()


def timed_broadcast(nbytes: int) -> float:
    ref = hm.put(np.ones(nbytes // 4, np.float32))
    t0 = time.perf_counter()
    hm.broadcast(ref, timeout=T)
    dt = time.perf_counter() - t0
    hm.delete([ref])
    return dt


@hm.remote
def make(nelem: int, value: float):
    return np.full(nelem, value, np.float32)


def timed_reduce(nbytes: int, victim_spec: str | None = None) -> tuple[float, bool, int | None]:
    """(seconds, exact result?, rank armed) of one hm.reduce of 4 fresh inputs, all ready first."""
    n = nbytes // 4
    refs = [hm.put(np.full(n, 1.0, np.float32))] + [make.remote(n, float(v)) for v in (2, 3, 4)]
    hm.wait(refs, num_returns=len(refs), timeout=T)
    armed = None
    if victim_spec is not None:      # the rank of the input placed third holds the inner slot
        armed = hm.locations([refs[2]], timeout=T)[refs[2]][0]
        hm.get(arm.options(rank=armed).remote(f"{armed}:{victim_spec}"), timeout=T)
    t0 = time.perf_counter()
    red = hm.reduce(refs)
    hm.wait([red], timeout=T)
    dt = time.perf_counter() - t0
    value = hm.get(red, timeout=T)
    exact = bool(value.shape == (n,) and (value == 10.0).all())
    hm.delete(refs + [red])
    return dt, exact, armed


def run_reduce(args, nbytes: int, chunks: int) -> dict:
    timed_reduce(nbytes)                                   # warm-up
    free = [timed_reduce(nbytes) for _ in range(args.runs)]
    failed, exact, victim = timed_reduce(nbytes, f"combine:{chunks // 2}")
    after = timed_reduce(nbytes)
    median = statistics.median(t for t, _, _ in free)
    stats = hm.stats()
    victim_dead = victim in stats["dead_ranks"]
    ok = victim_dead and exact and all(e for _, e, _ in free) and after[1]
    print(f"recovery: {args.size} reduce of 4 inputs to rank 0 on {hm.world_size()} ranks, inner "
          f"slot rank {victim} SIGKILLed after combining {chunks // 2} of {chunks} chunks")
    print(f"  failure-free: median {median * 1e3:.1f} ms (min {min(t for t, _, _ in free) * 1e3:.1f}, "
          f"max {max(t for t, _, _ in free) * 1e3:.1f}) over {len(free)} runs")
    print(f"  with the kill: {failed * 1e3:.1f} ms ({failed / median:.2f}x), result exact: {exact}; "
          f"next reduce (3 ranks) {after[0] * 1e3:.1f} ms; victim seen dead: {victim_dead}; "
          f"re-planned: {stats['reduces_replanned']} (going on from byte "
          f"{stats['reduce_bytes_kept']} of {nbytes}), tasks re-run: {stats['scheduler']['rebuilt']}")
    return {"op": "reduce", "victim": victim, "free_s": [t for t, _, _ in free], "free_median_s": median,
            "failed_s": failed, "failed_exact": exact, "after_s": after[0], "victim_dead": victim_dead,
            "ratio_to_free": failed / median, "ok": ok,
            "reduces_replanned": stats["reduces_replanned"], "rebuilt": stats["scheduler"]["rebuilt"],
            "result_bytes_kept": stats["reduce_bytes_kept"]}


def run_broadcast(args, nbytes: int, chunks: int) -> dict:
    timed_broadcast(nbytes)                                # warm-up
    free = [timed_broadcast(nbytes) for _ in range(args.runs)]
    hm.get(arm.options(rank=args.victim).remote(f"{args.victim}:chunk:{chunks // 2}"), timeout=T)
    failed = timed_broadcast(nbytes)
    ok = args.victim in hm.dead_ranks()
    # every survivor must hold a correct copy of a new object broadcast after the failure
    after = timed_broadcast(nbytes)
    median = statistics.median(free)
    print(f"recovery: {args.size} broadcast on {hm.world_size()} ranks, relay rank {args.victim} "
          f"SIGKILLed after {chunks // 2} of {chunks} chunks")
    print(f"  failure-free: median {median * 1e3:.1f} ms (min {min(free) * 1e3:.1f}, "
          f"max {max(free) * 1e3:.1f}) over {len(free)} runs")
    print(f"  with the kill: {failed * 1e3:.1f} ms ({failed / median:.2f}x); next broadcast "
          f"{after * 1e3:.1f} ms; victim seen dead: {ok}")
    return {"op": "broadcast", "victim": args.victim, "free_s": free, "free_median_s": median,
            "failed_s": failed, "after_s": after, "victim_dead": ok, "ratio_to_free": failed / median,
            "ok": ok}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=("broadcast", "reduce"), default="broadcast")
    parser.add_argument("--size", default="64M")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--victim", type=int, default=2)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    hm.init()
    if hm.world_size() < 4 or not hm.stats()["rank_loss_tolerance"]:
        print("recovery: needs >= 4 ranks under ULFM (hoplite-mpi run -n 4 ...)", file=sys.stderr)
        return 2
    nbytes = parse_size(args.size)
    chunks = -(-nbytes // hm.current_config().chunk_size)
    out = (run_reduce if args.op == "reduce" else run_broadcast)(args, nbytes, chunks)
    out.update({"size": nbytes, "chunks": chunks, "ranks": hm.world_size(),
                "meta": {"commit": _commit(), "when": time.strftime("%Y-%m-%d %H:%M")}})
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0 if out["ok"] else 1


def _commit() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except Exception:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
