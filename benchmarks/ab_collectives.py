#!/usr/bin/env python
"""Interleaved A/B of boolean Config fields for hm.reduce / hm.broadcast / hm.allreduce (issue 12).

    timeout 900 mpirun -n 4 --oversubscribe --allow-run-as-root python benchmarks/ab_collectives.py \
        --size 1M --seconds 10 --ops reduce,broadcast,allreduce \
        --flip adaptive_chunks,chunk_aware_plan,broadcast_direct [--block 1]

On a shared, loaded host the load drifts within seconds, so ``collectives.py --flip`` (all runs
of one setting, then all of the other) can show a 2x difference that is only the drift.  Here the
setting alternates every ``--block`` runs (set on every rank by a task pinned to it, then on rank
0, between runs: nothing is in flight), for ``--seconds`` per op, and the medians of each setting
are compared.  ``False`` is every field set False, ``True`` every field True.  MPI's time for the
same op and size (Reduce/Bcast/Allreduce, max over ranks, median) is measured first, before the
executor starts, so its ratio is a rough one (not interleaved).  Every op's result is checked once
per setting.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import numpy as np
from mpi4py import MPI

import hoplite_mpi as hm

from collectives import make_input, parse_size   # the sibling benchmark

TIMEOUT = 120.0


def set_fields(names: list, value: bool) -> bool:
    """(rank 0, or a task pinned to a worker) Set the Config fields ``names`` on this rank."""
    from hoplite_mpi import testing
    rt = testing.runtime()
    config = dataclasses.replace(rt.ctx.config, **{n: value for n in names})
    rt.call(setattr, rt.ctx, "config", config, timeout=TIMEOUT)
    return True


def mpi_times(comm, nbytes: int, ops: list, seconds: float) -> dict:
    out = {}
    for op in ops:
        a = make_input(nbytes // 4, comm.Get_rank())
        res = np.empty_like(a)
        ts = []
        end = comm.bcast(time.time() + seconds)
        while True:
            comm.Barrier()
            t0 = time.perf_counter()
            if op == "reduce":
                comm.Reduce(a, res, op=MPI.SUM, root=0)
            elif op == "broadcast":
                comm.Bcast(a, root=0)
            else:
                comm.Allreduce(a, res, op=MPI.SUM)
            ts.append(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
            if comm.bcast(time.time() > end):
                break
        out[op] = statistics.median(ts)
    return out


def run_op(op: str, refs: list, base: np.ndarray) -> tuple[float, object]:
    if op == "broadcast":
        r = hm.put(base)
        t0 = time.perf_counter()
        hm.broadcast(r, timeout=TIMEOUT)
    else:
        t0 = time.perf_counter()
        r = hm.reduce(refs) if op == "reduce" else hm.allreduce(refs)
        ready, _ = hm.wait([r], timeout=TIMEOUT)
        if not ready:
            raise TimeoutError(f"{op} not done after {TIMEOUT} s")
    return time.perf_counter() - t0, r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="1M")
    p.add_argument("--seconds", type=float, default=10.0, help="per op and setting pair")
    p.add_argument("--ops", default="reduce,broadcast,allreduce")
    p.add_argument("--flip", required=True, help="comma-separated boolean Config fields")
    p.add_argument("--block", type=int, default=1, help="runs per setting before switching")
    args = p.parse_args()
    nbytes, ops = parse_size(args.size), args.ops.split(",")
    names = [n for n in args.flip.split(",") if n]
    comm = MPI.COMM_WORLD
    mpi = mpi_times(comm, nbytes, ops, args.seconds / 2)
    with hm.Executor(comm=comm):
        if comm.Get_rank() != 0:
            return 0
        n = comm.Get_size()
        rset = hm.remote(set_fields)

        def set_all(value: bool) -> None:
            hm.get([rset.options(rank=w).remote(names, value) for w in range(1, n)], timeout=TIMEOUT)
            set_fields(names, value)
        before = {name: getattr(hm.current_config(), name) for name in names}
        rmake = hm.remote(make_input)
        refs = [hm.put(make_input(nbytes // 4, 0))] + [
            rmake.options(rank=w).remote(nbytes // 4, w) for w in range(1, n)]
        hm.wait(refs, num_returns=len(refs), timeout=TIMEOUT)
        base = make_input(nbytes // 4, 0)
        expect = sum(make_input(nbytes // 4, r) for r in range(n))
        print(f"{args.size} on {n} ranks; load {open('/proc/loadavg').read().split()[:3]}", flush=True)
        for op in ops:
            ts: dict = {False: [], True: []}
            checked: set = set()
            value, end = False, time.time() + args.seconds
            while time.time() < end:
                set_all(value)
                for _ in range(args.block):
                    dt, r = run_op(op, refs, base)
                    ts[value].append(dt)
                    if value not in checked:
                        checked.add(value)
                        got = hm.get(r, timeout=TIMEOUT)
                        assert np.array_equal(got, base if op == "broadcast" else expect), (op, value)
                        del got
                    hm.delete([r])
                value = not value
            a, b = statistics.median(ts[False]), statistics.median(ts[True])
            m = mpi[op]
            print(f"{op:9s} MPI {1e3 * m:8.2f} ms | False {1e3 * a:8.2f} ms (n={len(ts[False])}, "
                  f"{a / m:.2f}x MPI) | True {1e3 * b:8.2f} ms (n={len(ts[True])}, {b / m:.2f}x MPI) "
                  f"| True/False {b / a:.2f}", flush=True)
        for k, v in before.items():        # (as they were)
            hm.get([rset.options(rank=w).remote([k], v) for w in range(1, n)], timeout=TIMEOUT)
            set_fields([k], v)
        print(f"load {open('/proc/loadavg').read().split()[:3]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
