#!/usr/bin/env python
"""Collectives benchmark: hm.reduce / hm.broadcast / hm.allreduce vs MPI in one MPI job (issue 3).

    timeout 900 mpirun -n 4 --oversubscribe --allow-run-as-root python benchmarks/collectives.py \
        [--sizes 1K,4K,64K,256K,1M,16M,64M,256M] [--iters 5] [--warmup 1] [--delta 0.05] \
        [--stagger-sizes 16M,64M] [--flip small_collectives[,FIELD...]] [--json PATH] [--plot PATH.png]

Run it with plain ``mpirun`` (not ``python -m hoplite_mpi``).  The data are float32 numpy arrays
of the given sizes (K/M/G = KiB/MiB/GiB), one input per rank, all of the same shape.  OSU style:
each measurement is ``--warmup`` untimed runs, then ``--iters`` timed runs; the table shows the
median (min/max) of the runs, each run's time being the slowest rank's.

1. MPI, SPMD on ``MPI.COMM_WORLD`` (buffer API): ``Reduce`` (SUM, to root 0), ``Bcast`` (from
   root 0), ``Allreduce`` (SUM).  A barrier before each run; each rank times its own call; the
   maximum over ranks is the run's time.
2. hoplite_mpi, ``hm.Executor(comm=COMM_WORLD)`` (rank 0 drives, the others serve): one input per
   rank is put in the stores first (rank 0 with ``hm.put``, rank r >= 1 by a task pinned with
   ``.options(rank=r)`` that makes the array) and waited for.  Then, timed on rank 0:
   - reduce: ``hm.reduce(refs)`` until the result ref is done (``hm.wait``), and until the value is
     in hand (``+ hm.get``; the result lives on rank 0, so this is a local, zero-copy read);
   - broadcast: ``hm.broadcast(ref)`` of a *fresh* object each run (``hm.put`` outside the timed
     region), which returns when every rank holds a full copy;
   - allreduce: ``hm.allreduce(refs)`` until the result ref is done.
   Each object made in a run is freed with ``hm.delete`` after it.
3. Staggered arrival (``--stagger-sizes``): rank i's input becomes ready i*delta after a common
   start time (``--delta``, 50 ms).  MPI: every rank makes its array, then sleeps until
   start + i*delta, notes the time and calls ``Reduce``; the figure is (root's finish time) - (last
   rank's ready time).  hoplite: tasks pinned to ranks 1..N-1 make the array, sleep until
   start + i*delta and return it with ``time.time()`` (a second return value); rank 0's input is a
   ``hm.put`` made before the start; ``hm.reduce`` is called at once, before the inputs exist; the
   figure is (result done on rank 0) - (last input ready).  All ranks are on one host, so
   ``time.time()`` agrees between them.
4. Subset reduce: the same staggered inputs, ``hm.reduce(refs, num=n//2)``: the time from the
   start (and from the (n//2)-th input being ready) to the result.  ``hm.reduced_inputs(red)`` must
   name n//2 of the inputs and the result must be the sum of exactly those.  Shown next to MPI's
   full staggered reduce, measured from the start, which is what MPI can offer instead.

Every result is checked against numpy once per size and operation (assert for MPI; a hoplite
failure is recorded and printed, and the benchmark goes on with the next measurement).  The
inputs are a repeating 0..1020 pattern plus the rank, so float32 sums are exact and a misplaced
chunk is detected.  For broadcast and allreduce, a task pinned to each worker rank reports whether
the object was already in its store before it reads it, and a CRC of the bytes.

The machine load (CPU of this job, of other processes, steal) and the peak RSS of every rank are
reported for each phase, as in ``tasks.py``: a run that shares the cores with another job is
flagged.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import traceback
import zlib

import numpy as np
import psutil
from mpi4py import MPI

import hoplite_mpi as hm

from tasks import Noise, base_meta, job_probes   # the sibling benchmark (this script's folder is on sys.path)

OPS = ("reduce", "broadcast", "allreduce")
PATTERN = np.arange(1021, dtype=np.float32)   # prime length: chunk boundaries never line up
TARGETS = {16 << 20: 1.25, 64 << 20: 1.0, 256 << 20: 1.0}   # hm/MPI, for each of OPS
STAGGER_TARGET = 0.5


# --- data and tasks (module level: shipped to the workers by reference) ----------------------

def make_input(nelem: int, r: int) -> np.ndarray:
    """Rank r's input: the pattern repeated to ``nelem`` float32 values, plus r."""
    a = np.resize(PATTERN, nelem)
    a += np.float32(r)
    return a


def expected_sum(nelem: int, ranks) -> np.ndarray:
    """Sum of the inputs of ``ranks``: exact in float32 (all values are small integers)."""
    ranks = list(ranks)
    a = np.resize(PATTERN, nelem)
    a *= np.float32(len(ranks))
    a += np.float32(sum(ranks))
    return a


def crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1))


def sleep_until(t: float) -> None:
    while True:
        left = t - time.time()
        if left <= 0:
            return
        time.sleep(min(left, 0.05) if left > 0.002 else 0)


def make_at(nelem: int, r: int, t_ready: float):
    """Pinned staggered input: make the array, sleep until ``t_ready``, return (array, time)."""
    a = make_input(nelem, r)
    sleep_until(t_ready)
    return a, time.time()


def copy_report(box: list):
    """Pinned on a worker: (rank, held here before this read?, CRC, shape, dtype) of box[0]."""
    ref = box[0]
    held = hm.is_local(ref)
    a = hm.get(ref)
    return hm.rank(), bool(held), crc(a), tuple(a.shape), str(a.dtype)


def ping(x):
    return x


# --- sizes, statistics -----------------------------------------------------------------------

def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    n = int(float(t[:-1] if t[-1:] in "KMG" else t) * mult)
    if n < 4 or n % 4:
        raise argparse.ArgumentTypeError(f"size {text!r}: must be a positive multiple of 4 bytes")
    return n


def size_label(nbytes: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift} {unit}"
    return f"{nbytes} B"


def iters_for(nbytes: int, iters: int) -> int:
    """Timed runs at one size: ``iters`` from 64 MiB up, more below (up to 10x), as OSU does,
    because small operations are noisy on shared cores and cheap to repeat."""
    return iters * max(1, min(10, (64 << 20) // nbytes))


def summary(times: list[float]) -> dict:
    """Median/min/max in ms, and every run."""
    if not times:
        return {}
    ms = [1e3 * t for t in times]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms),
            "runs_ms": [round(x, 3) for x in ms]}


class MemProbe:
    """Peak RSS of every rank (rank 0 samples all pids with psutil) and least available memory."""

    def __init__(self, probe, interval: float = 0.05) -> None:
        self.procs = probe.procs if probe else []
        self.interval = interval
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> None:
        self.peak = [0] * len(self.procs)
        self.min_avail = psutil.virtual_memory().available
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="bench-memprobe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for i, p in enumerate(self.procs):
                try:
                    self.peak[i] = max(self.peak[i], p.memory_info().rss)
                except psutil.Error:
                    pass
            self.min_avail = min(self.min_avail, psutil.virtual_memory().available)

    def stop(self) -> dict:
        self._stop.set()
        if self._thread:
            self._thread.join()
        return {"peak_rss_mib": [round(x / 2**20) for x in self.peak],
                "min_available_gib": round(self.min_avail / 2**30, 2)}


# --- MPI phase (SPMD) ------------------------------------------------------------------------

def mpi_timed(comm, call, runs: int, warmup: int, before=None) -> list[float]:
    """OSU-style loop: barrier, time ``call`` on every rank, max over ranks (root gets the list)."""
    out = []
    for it in range(warmup + runs):
        if before:
            before()
        comm.Barrier()
        t0 = time.perf_counter()
        call()
        dt = time.perf_counter() - t0
        slowest = comm.reduce(dt, op=MPI.MAX, root=0)
        if it >= warmup:
            out.append(slowest)
    return out


def check_all(comm, ok: bool, what: str) -> None:
    bad = comm.allgather(bool(ok))
    if not all(bad):
        raise AssertionError(f"MPI {what}: wrong result on rank(s) "
                             f"{[r for r, b in enumerate(bad) if not b]}")


def mpi_staggered(comm, nelem: int, delta: float, runs: int, warmup: int) -> dict:
    """Rank i calls Reduce i*delta after a common start; (root done) - (last ready)."""
    rank = comm.Get_rank()
    send = make_input(nelem, rank)
    recv = np.empty_like(send) if rank == 0 else None
    after_last, from_start, raw = [], [], []
    for it in range(warmup + runs):
        comm.Barrier()
        start = comm.bcast(time.time() + 0.05 if rank == 0 else None, root=0)
        sleep_until(start + rank * delta)
        ready = time.time()
        comm.Reduce(send, recv, op=MPI.SUM, root=0)
        done = time.time()
        got = comm.gather((ready, done), root=0)
        if rank == 0 and it >= warmup:
            last = max(r for r, _ in got)
            after_last.append(got[0][1] - last)
            from_start.append(got[0][1] - start)
            raw.append({"ready_after_start_ms": [round(1e3 * (r - start), 2) for r, _ in got]})
    if rank == 0:
        assert np.array_equal(recv, expected_sum(nelem, range(comm.Get_size()))), \
            "MPI staggered Reduce: wrong result"
        return {"after_last": summary(after_last), "from_start": summary(from_start), "runs": raw}
    return {}


def mpi_phase(comm, args) -> dict:
    """Root gets {size: {op: summary, "staggered": {...}}}; the other ranks {}."""
    rank, size = comm.Get_rank(), comm.Get_size()
    res: dict = {}
    for nbytes in args.sizes:
        nelem = nbytes // 4
        send = make_input(nelem, rank)
        recv = np.empty_like(send)
        expect = expected_sum(nelem, range(size))
        runs = iters_for(nbytes, args.iters)
        row = {}
        row["reduce"] = mpi_timed(comm, lambda: comm.Reduce(send, recv if rank == 0 else None,
                                                            op=MPI.SUM, root=0),
                                  runs, args.warmup)
        if rank == 0:
            assert np.array_equal(recv, expect), f"MPI Reduce {size_label(nbytes)}: wrong result"
        bbuf = send if rank == 0 else recv       # root sends its input, the others receive
        row["broadcast"] = mpi_timed(comm, lambda: comm.Bcast(bbuf, root=0), runs, args.warmup,
                                     before=(lambda: recv.fill(-1)) if rank else None)
        check_all(comm, np.array_equal(bbuf, make_input(nelem, 0)), f"Bcast {size_label(nbytes)}")
        row["allreduce"] = mpi_timed(comm, lambda: comm.Allreduce(send, recv, op=MPI.SUM),
                                     runs, args.warmup)
        check_all(comm, np.array_equal(recv, expect), f"Allreduce {size_label(nbytes)}")
        del send, recv, expect, bbuf
        if rank == 0:
            res[nbytes] = {op: summary(row[op]) for op in OPS}
            print(f"  MPI {size_label(nbytes):>8}: " + ", ".join(
                f"{op} {res[nbytes][op]['median_ms']:.3g} ms" for op in OPS), flush=True)
    for nbytes in args.stagger_sizes:
        st = mpi_staggered(comm, nbytes // 4, args.delta, args.iters, args.warmup)
        if rank == 0:
            res.setdefault(nbytes, {})["staggered"] = st
            print(f"  MPI {size_label(nbytes):>8}: staggered Reduce, last ready -> done "
                  f"{st['after_last']['median_ms']:.3g} ms", flush=True)
    return res


# --- hoplite phase (rank 0 drives) -----------------------------------------------------------

class HmError(Exception):
    pass


def wait_done(refs, timeout: float, what: str) -> None:
    ready, pending = hm.wait(refs, num_returns=len(refs), timeout=timeout)
    if pending:
        raise HmError(f"{what}: not done after {timeout} s")
    for r in ready:
        exc = r.exception(timeout=0)
        if exc is not None:
            raise exc


def report_copies(ref, workers, timeout: float) -> list:
    """Each worker's (rank, held before the read, crc, shape, dtype) of ``ref``, and rank 0's."""
    held0 = hm.is_local(ref)
    a = hm.get(ref, timeout=timeout)
    reports = [(0, bool(held0), crc(a), tuple(a.shape), str(a.dtype))]
    rcopy = hm.remote(copy_report)
    reports += hm.get([rcopy.options(rank=w).remote([ref]) for w in workers], timeout=timeout)
    return reports


def check_copies(reports, want: np.ndarray, what: str) -> list[int]:
    """Assert every rank read the right bytes; return the ranks that did NOT hold a copy."""
    want_crc = crc(want)
    for r, _, c, shape, dtype in reports:
        if (c, shape, dtype) != (want_crc, want.shape, str(want.dtype)):
            raise AssertionError(f"{what}: rank {r} read wrong data ({shape} {dtype} crc {c:#x})")
    return [r for r, held, *_ in reports if not held]


class Recorder:
    """One hoplite measurement: timed runs, the first error, extra facts."""

    def __init__(self, res: dict, key: str) -> None:
        self.res, self.key = res, key
        self.times: list[float] = []
        self.extra: dict = {}

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, et, exc, tb) -> bool:
        out = summary(self.times)
        out.update(self.extra)
        if exc is not None:
            out["error"] = f"{et.__name__}: {exc}"
            out["traceback"] = traceback.format_exception(et, exc, tb)[-6:]
            print(f"    hoplite {self.key}: FAILED {et.__name__}: {exc}", flush=True)
        self.res[self.key] = out
        return exc is not None and isinstance(exc, Exception)


def hm_inputs(nelem: int, workers, timeout: float) -> list:
    rmake = hm.remote(make_input)
    refs = [hm.put(make_input(nelem, 0))] + [rmake.options(rank=w).remote(nelem, w) for w in workers]
    wait_done(refs, timeout, "making the inputs")
    return refs


def hm_size(nbytes: int, args, workers, nranks: int) -> dict:
    nelem = nbytes // 4
    res: dict = {}
    timeout = args.op_timeout
    runs = args.warmup + iters_for(nbytes, args.iters)
    try:
        refs = hm_inputs(nelem, workers, timeout)
    except Exception as exc:
        print(f"    hoplite inputs {size_label(nbytes)}: FAILED {type(exc).__name__}: {exc}", flush=True)
        return {op: {"error": f"inputs: {type(exc).__name__}: {exc}"} for op in OPS}
    expect = expected_sum(nelem, range(nranks))

    with Recorder(res, "reduce") as rec:
        with_get = []
        for it in range(runs):
            t0 = time.perf_counter()
            red = hm.reduce(refs)
            wait_done([red], timeout, "reduce")
            t1 = time.perf_counter()
            value = hm.get(red, timeout=timeout)
            t2 = time.perf_counter()
            if it == 0:
                assert np.array_equal(value, expect), f"hm.reduce {size_label(nbytes)}: wrong result"
                rec.extra["result_held_by_rank0"] = hm.is_local(red)
            if it >= args.warmup:
                rec.times.append(t1 - t0)
                with_get.append(t2 - t0)
            del value
            hm.delete([red])
            del red
        res["reduce_get"] = summary(with_get)

    with Recorder(res, "broadcast") as rec:
        base = make_input(nelem, 0)
        for it in range(runs):
            ref = hm.put(base)                      # a fresh object: every run moves the data
            t0 = time.perf_counter()
            hm.broadcast(ref, timeout=timeout)
            t1 = time.perf_counter()
            if it >= args.warmup:
                rec.times.append(t1 - t0)
            if it == runs - 1:
                missing = check_copies(report_copies(ref, workers, timeout), base,
                                       f"hm.broadcast {size_label(nbytes)}")
                rec.extra["ranks_without_copy"] = missing
            hm.delete([ref])
            del ref
        del base

    with Recorder(res, "allreduce") as rec:
        for it in range(runs):
            t0 = time.perf_counter()
            out = hm.allreduce(refs)
            wait_done([out], timeout, "allreduce")
            t1 = time.perf_counter()
            if it >= args.warmup:
                rec.times.append(t1 - t0)
            if it == runs - 1:
                missing = check_copies(report_copies(out, workers, timeout), expect,
                                       f"hm.allreduce {size_label(nbytes)}")
                rec.extra["ranks_without_copy"] = missing
            hm.delete([out])
            del out

    hm.delete(refs)
    return res


def set_config_field(name: str, value) -> bool:
    """(a task pinned to a worker, or rank 0) Set Config field ``name`` of this rank's runtime."""
    import dataclasses
    from hoplite_mpi import testing
    rt = testing.runtime()
    rt.call(setattr, rt.ctx, "config", dataclasses.replace(rt.ctx.config, **{name: value}),
            timeout=60)
    return True


class flipped:
    """``with flipped(names) as value:`` every rank runs with the boolean Config field(s)
    ``names`` (comma-separated) set to the opposite of rank 0's value of the first (``value``)
    for the body, then as before.  Rank 0 chooses most collective paths (the reduce
    coordinator, the broadcasting rank), but some settings must agree on every rank
    (``adaptive_chunks``: both ends of a transfer cut the object alike), so each worker is set
    too, by a task pinned to it, between measurements (nothing is in flight then).  Through the
    test hook: not an API."""

    def __init__(self, names: str) -> None:
        from hoplite_mpi import testing
        self.rt = testing.runtime()
        self.names = [n.strip() for n in names.split(",") if n.strip()]

    def _set_all(self, value) -> None:
        rset = hm.remote(set_config_field)
        for name in self.names:
            hm.get([rset.options(rank=w).remote(name, value) for w in range(1, hm.world_size())],
                   timeout=60)
            set_config_field(name, value)

    def __enter__(self) -> bool:
        self.before = getattr(self.rt.ctx.config, self.names[0])
        value = not self.before
        self._set_all(value)
        return value

    def __exit__(self, *exc) -> None:
        self._set_all(self.before)


def hm_staggered(nbytes: int, args, workers, nranks: int, num=None) -> dict:
    """Staggered inputs, hm.reduce submitted before they exist (``num``: the subset variant)."""
    nelem = nbytes // 4
    timeout = args.op_timeout
    rmake = hm.remote(make_at).options(num_returns=2)
    base0 = make_input(nelem, 0)
    after_last, after_kth, from_start, raw = [], [], [], []
    res: dict = {}
    key = "staggered" if num is None else "subset"
    with Recorder(res, key) as rec:
        for it in range(args.warmup + args.iters):
            r0 = hm.put(base0)
            t_put = time.time()
            # lead time: the pinned tasks must be running (array made) before rank 1's turn
            start = time.time() + 0.15 + 2e-9 * nbytes
            pairs = [rmake.options(rank=w).remote(nelem, w, start + w * args.delta) for w in workers]
            refs = [r0] + [p[0] for p in pairs]
            known = [t_put] + [None] * len(pairs)   # when rank 0 learns that input i exists
            for i, p in enumerate(pairs, 1):
                p[0].add_done_callback(lambda f, i=i: known.__setitem__(i, time.time()))
            red = hm.reduce(refs) if num is None else hm.reduce(refs, num=num)
            t_called = time.time()
            wait_done([red], timeout + nranks * args.delta, key)
            done = time.time()
            ready = [t_put] + hm.get([p[1] for p in pairs], timeout=timeout)
            wait_done(refs, timeout, "inputs")
            late = [round(1e3 * (t - (start + w * args.delta)), 1) for w, t in enumerate(ready) if w]
            if it >= args.warmup:
                order = sorted(ready)
                after_last.append(done - order[-1])
                from_start.append(done - start)
                if num is not None:
                    after_kth.append(done - order[num - 1])
                last = max(range(nranks), key=lambda j: ready[j])
                lag = (known[last] - ready[last]) if known[last] else None
                raw.append({"reduce_called_before_start_ms": round(1e3 * (start - t_called), 1),
                            "workers_late_ms": late,
                            # the last input: from its task's return to its ref being done on rank 0
                            # (result serialization + TaskDone + notification), then to the result
                            "last_input_known_after_ms": None if lag is None else round(1e3 * lag, 1),
                            "result_after_last_known_ms": None if lag is None else
                            round(1e3 * (done - known[last]), 1)})
            if it == 0:
                if num is None:
                    value = hm.get(red, timeout=timeout)
                    assert np.array_equal(value, expected_sum(nelem, range(nranks))), \
                        f"staggered hm.reduce {size_label(nbytes)}: wrong result"
                else:
                    used = list(hm.reduced_inputs(red))
                    assert len(used) == num and len(set(used)) == num, \
                        f"hm.reduced_inputs gave {len(used)} refs, expected {num}"
                    index = {r: i for i, r in enumerate(refs)}
                    assert all(u in index for u in used), "hm.reduced_inputs names a ref not given"
                    chosen = sorted(index[u] for u in used)
                    value = hm.get(red, timeout=timeout)
                    assert np.array_equal(value, expected_sum(nelem, chosen)), \
                        f"subset hm.reduce {size_label(nbytes)}: not the sum of inputs {chosen}"
                    rec.extra["reduced_ranks_first_run"] = chosen
                del value
            hm.delete([red] + refs + [p[1] for p in pairs])
            del red, refs, pairs, r0
        rec.times = after_last
    out = res[key]
    out.update(after_last=summary(after_last), from_start=summary(from_start), runs=raw)
    if num is not None:
        out.update(num=num, after_kth=summary(after_kth))
    return out


def hoplite_phase(args) -> dict:
    nranks = hm.world_size()
    workers = list(range(1, nranks))
    res: dict = {"sizes": {}}
    # warm-up: ship the functions, start the task threads, set up the connections
    rping = hm.remote(ping)
    assert hm.get([rping.options(rank=w).remote(w) for w in workers]) == workers
    for name in ("reduce", "broadcast", "allreduce", "reduced_inputs"):
        if not hasattr(hm, name):
            print(f"  note: hm.{name} does not exist in this hoplite_mpi", flush=True)
    for nbytes in args.sizes:
        res["sizes"][nbytes] = hm_size(nbytes, args, workers, nranks)
        r = res["sizes"][nbytes]
        print(f"  hm  {size_label(nbytes):>8}: " + ", ".join(
            f"{op} {r[op]['median_ms']:.3g} ms" if "median_ms" in r.get(op, {}) else f"{op} n/a"
            for op in OPS), flush=True)
        if args.flip:
            with flipped(args.flip) as value:
                r["flipped"] = hm_size(nbytes, args, workers, nranks)
                r["flipped"]["setting"] = f"{args.flip}={value}"
            f = r["flipped"]
            print(f"  hm  {size_label(nbytes):>8} {args.flip}={value}: " + ", ".join(
                f"{op} {f[op]['median_ms']:.3g} ms" if "median_ms" in f.get(op, {}) else f"{op} n/a"
                for op in OPS), flush=True)
    k = max(1, nranks // 2)
    for nbytes in args.stagger_sizes:
        d = res["sizes"].setdefault(nbytes, {})
        d["staggered"] = hm_staggered(nbytes, args, workers, nranks)
        d["subset"] = hm_staggered(nbytes, args, workers, nranks, num=k)
        for key in ("staggered", "subset"):
            s = d[key].get("after_last" if key == "staggered" else "from_start", {})
            if s:
                print(f"  hm  {size_label(nbytes):>8}: {key} "
                      f"{'last ready' if key == 'staggered' else 'start'} -> done "
                      f"{s['median_ms']:.3g} ms", flush=True)
    res["rank0_stats"] = hm.stats()
    return res


# --- report ----------------------------------------------------------------------------------

def fmt_ms(s: dict) -> str:
    if not s or "median_ms" not in s:
        return "n/a"
    return f"{s['median_ms']:.3g} ({s['min_ms']:.3g}/{s['max_ms']:.3g})"


def build_rows(m: dict, h: dict, args, nranks: int) -> list[dict]:
    rows = []

    def add(nbytes, op, ms: dict, hs: dict, target=None, note=""):
        ratio = (hs["median_ms"] / ms["median_ms"]) if hs and ms and "median_ms" in hs \
            and "median_ms" in ms and ms["median_ms"] > 0 else None
        met = None if target is None or ratio is None else ratio <= target
        err = (hs or {}).get("error", "")
        rows.append({"size": nbytes, "op": op, "mpi": ms, "hm": hs, "ratio": ratio, "target": target,
                     "met": met, "note": note or (err.split(":")[0] if err else "")})

    ms_all, hs_all = m.get("sizes", {}), h.get("sizes", {})
    for nbytes in args.sizes:
        ms, hs = ms_all.get(nbytes, {}), hs_all.get(nbytes, {})
        t = TARGETS.get(nbytes)
        add(nbytes, "reduce", ms.get("reduce"), hs.get("reduce"), t)
        add(nbytes, "reduce + get", ms.get("reduce"), hs.get("reduce_get"))
        add(nbytes, "broadcast", ms.get("broadcast"), hs.get("broadcast"), t)
        add(nbytes, "allreduce", ms.get("allreduce"), hs.get("allreduce"), t)
        fs = hs.get("flipped")
        if fs:
            flag = fs.get("setting", args.flip)
            add(nbytes, f"reduce [{flag}]", ms.get("reduce"), fs.get("reduce"))
            add(nbytes, f"broadcast [{flag}]", ms.get("broadcast"), fs.get("broadcast"))
            add(nbytes, f"allreduce [{flag}]", ms.get("allreduce"), fs.get("allreduce"))
    k = max(1, nranks // 2)
    for nbytes in args.stagger_sizes:
        ms, hs = ms_all.get(nbytes, {}).get("staggered", {}), hs_all.get(nbytes, {})
        add(nbytes, "staggered reduce: last ready->done", ms.get("after_last"),
            hs.get("staggered", {}).get("after_last"), STAGGER_TARGET)
        add(nbytes, "staggered reduce: start->done", ms.get("from_start"),
            hs.get("staggered", {}).get("from_start"))
        add(nbytes, f"subset num={k} (MPI: all {nranks}): start->done", ms.get("from_start"),
            hs.get("subset", {}).get("from_start"))
    return rows


def print_table(rows: list[dict], meta: dict) -> None:
    print()
    print(f"collectives, hoplite_mpi vs MPI: {meta['ranks']} ranks on {meta['cores']} cores "
          f"({meta['cpu']}), {meta['mpi']}, hoplite_mpi {meta['hoplite_rev'] or meta['hoplite_path']}, "
          f"float32, median (min/max) of {meta['iters']} runs (more below 64 MiB) after "
          f"{meta['warmup']} warm-up, "
          f"max over ranks; stagger delta {1e3 * meta['delta_s']:.0f} ms")
    w = max(len(r["op"]) for r in rows) + 2
    head = (f"{'size':>8}  {'op':<{w}}{'MPI ms':>24}{'hoplite ms':>24}{'hm/MPI':>8}"
            f"{'target':>8}  ok")
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        target = "" if r["target"] is None else f"<={r['target']:g}"
        met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
        note = f"  {r['note'][:60]}" if r["note"] else ""
        print(f"{size_label(r['size']):>8}  {r['op']:<{w}}{fmt_ms(r['mpi']):>24}{fmt_ms(r['hm']):>24}"
              f"{ratio:>8}{target:>8}  {met}{note}")
    print("hm/MPI < 1 means hoplite is faster.  hoplite 'reduce' = until the result ref is done; "
          "'reduce + get' = until the value is in hand on rank 0")


def print_details(m: dict, h: dict, rows: list[dict]) -> None:
    print("\ndetails:")
    for r in rows:
        if r["hm"] and r["hm"].get("error"):
            print(f"  {size_label(r['size'])} hoplite {r['op']} FAILED: {r['hm']['error']}")
    for nbytes, d in sorted(h.get("sizes", {}).items()):
        for op in OPS:
            missing = d.get(op, {}).get("ranks_without_copy")
            if missing:
                print(f"  {size_label(nbytes)} hm.{op}: ranks {missing} did not hold a copy when "
                      "the call/ref was done (they fetched it when asked)")
        for key in ("staggered", "subset"):
            s = d.get(key)
            if not s:
                continue
            lates = [max(x["workers_late_ms"]) for x in s.get("runs", []) if x["workers_late_ms"]]
            early = [x["reduce_called_before_start_ms"] for x in s.get("runs", [])]
            extra = f", reduced ranks {s['reduced_ranks_first_run']}" if "reduced_ranks_first_run" in s else ""
            if "after_kth" in s and s["after_kth"]:
                extra += f", input #{s['num']} ready -> done {fmt_ms(s['after_kth'])} ms"
            lags = [x["last_input_known_after_ms"] for x in s.get("runs", [])
                    if x.get("last_input_known_after_ms") is not None]
            rest = [x["result_after_last_known_ms"] for x in s.get("runs", [])
                    if x.get("result_after_last_known_ms") is not None]
            if lags and key == "staggered":
                extra += (f"; last input ready -> its ref done on rank 0: median {statistics.median(lags):.1f} ms, "
                          f"then -> result done: median {statistics.median(rest):.1f} ms")
            if lates:
                print(f"  {size_label(nbytes)} hm {key}: hm.reduce returned >= {min(early):.0f} ms "
                      f"before the start; inputs late by up to {max(lates):.1f} ms{extra}")
    for nbytes, d in sorted(m.get("sizes", {}).items()):
        st = d.get("staggered")
        if st and st.get("runs"):
            print(f"  {size_label(nbytes)} MPI staggered: ready times after start (ms), first run: "
                  f"{st['runs'][0]['ready_after_start_ms']}")
    print("  all runs (ms):")
    shown = set()
    for r in rows:
        for label, s in (("MPI", r["mpi"]), ("hm ", r["hm"])):
            if s and s.get("runs_ms") and id(s) not in shown:
                shown.add(id(s))
                print(f"    {size_label(r['size']):>8} {r['op']:<40} {label}: "
                      + ", ".join(f"{x:.3g}" for x in s["runs_ms"]))
    print("machine load during each phase, in cores (this job / other processes / steal); "
          "peak RSS per rank (MiB); least available memory (GiB): ")
    for name, d in (("MPI", m.get("machine_load")), ("hoplite", h.get("machine_load"))):
        if d:
            mem = d.get("memory", {})
            print(f"  {name}: {d['own_cores']} / {d['other_cores']} / {d['steal_cores']} over "
                  f"{d['wall_s']} s; RSS {mem.get('peak_rss_mib')}; available >= {mem.get('min_available_gib')}")
    loads = [d for d in (m.get("machine_load"), h.get("machine_load")) if d]
    other = max([d["other_cores"] or 0.0 for d in loads] or [0.0])
    if other > 0.1:
        print(f"WARNING: other processes used up to {other:.2f} cores during the run: "
              "the figures are disturbed, run again on a quiet machine")


def plot(path: str, rows: list[dict], meta: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), sharey=True)
    for ax, op in zip(axes, OPS):
        for label, key, style, ops in (("MPI", "mpi", "o-", (op,)), ("hoplite", "hm", "s-", (op,)),
                                       ("hoplite + get", "hm", "s--", ("reduce + get",) if op == "reduce" else ())):
            pts = [(r["size"], r[key]) for r in rows if r["op"] in ops and r[key] and "median_ms" in r[key]]
            if not pts:
                continue
            x = [p[0] for p in pts]
            y = [p[1]["median_ms"] for p in pts]
            lo = [p[1]["median_ms"] - p[1]["min_ms"] for p in pts]
            hi = [p[1]["max_ms"] - p[1]["median_ms"] for p in pts]
            ax.errorbar(x, y, yerr=[lo, hi], fmt=style, capsize=3, label=label,
                        alpha=0.8 if "get" in label else 1.0)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(op)
        ax.set_xlabel("message size (float32 array)")
        sizes = sorted({r["size"] for r in rows if r["op"] == op})
        ax.set_xticks(sizes, [size_label(s) for s in sizes], rotation=45, ha="right")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("latency, ms (median, min/max bars)")
    fig.suptitle(f"hoplite_mpi vs {meta['mpi']}: {meta['ranks']} ranks on {meta['cores']} cores, "
                 f"hoplite_mpi {meta['hoplite_rev'] or meta['hoplite_path']}, {meta['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def machine_meta(comm, args) -> dict:
    return {**base_meta(comm), "numpy": np.__version__,
            "sizes": args.sizes, "stagger_sizes": args.stagger_sizes, "iters": args.iters,
            "warmup": args.warmup, "delta_s": args.delta,
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flip", metavar="FIELD", default="",
                        help="also measure every size with this boolean Config field (or several, "
                             "comma-separated) flipped on every rank (e.g. small_collectives: "
                             "before/after pairs in one job)")
    parser.add_argument("--sizes", default="1K,4K,64K,256K,1M,16M,64M,256M",
                        help="comma-separated sizes in bytes, K/M/G suffixes (default %(default)s)")
    parser.add_argument("--stagger-sizes", default="16M,64M",
                        help="sizes of the staggered and subset reduce runs ('' for none)")
    parser.add_argument("--iters", type=int, default=5,
                        help="timed runs per measurement from 64 MiB up and of the staggered runs; "
                             "smaller sizes get up to 10x more (64 MiB / size)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    parser.add_argument("--delta", type=float, default=0.05, help="staggered arrival step, seconds")
    parser.add_argument("--phases", default="mpi,hm", help="which phases to run (mpi, hm)")
    parser.add_argument("--op-timeout", type=float, default=120.0,
                        help="seconds before a hoplite operation counts as hung")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="also draw latency vs size (PNG, needs matplotlib)")
    args = parser.parse_args()
    try:
        args.sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
        args.stagger_sizes = [parse_size(s) for s in args.stagger_sizes.split(",") if s.strip()]
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    if not args.sizes or args.iters < 1 or args.warmup < 0 or args.delta < 0 or not phases <= {"mpi", "hm"}:
        parser.error("need sizes, --iters >= 1, --warmup >= 0, --delta >= 0, --phases from mpi,hm")

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    job = job_probes(comm, "collectives.py")
    if job is None:
        return 2
    probe, launchers = job
    meta = machine_meta(comm, args) if rank == 0 else {}
    if rank == 0:
        need = size * 6 * max(args.sizes + args.stagger_sizes)
        avail = psutil.virtual_memory().available
        if need > avail:
            print(f"WARNING: this run may need ~{need / 2**30:.1f} GiB ({size} ranks x ~6 copies of "
                  f"the largest size); {avail / 2**30:.1f} GiB is available", flush=True)

    noise, mem = Noise(probe, launchers), MemProbe(probe)
    m: dict = {}
    h: dict = {}
    if "mpi" in phases:
        if rank == 0:
            print("MPI phase", flush=True)
            noise.start()
            mem.start()
        m = {"sizes": mpi_phase(comm, args)}
        comm.Barrier()
        if rank == 0:
            m["machine_load"] = noise.stop()
            m["machine_load"]["memory"] = mem.stop()
            print(f"MPI phase: {m['machine_load']['wall_s']:.1f} s", flush=True)

    if "hm" in phases:
        with hm.Executor(comm=comm) as ex:
            if ex is not None:
                print("hoplite_mpi phase", flush=True)
                noise.start()
                mem.start()
                try:
                    h = hoplite_phase(args)
                except Exception as exc:     # keep the MPI figures
                    traceback.print_exc()
                    h = {"error": f"{type(exc).__name__}: {exc}"}
                h["machine_load"] = noise.stop()
                h["machine_load"]["memory"] = mem.stop()
                print(f"hoplite_mpi phase: {h['machine_load']['wall_s']:.1f} s", flush=True)

    if rank != 0:
        return 0
    rows = build_rows(m, h, args, size)
    print_table(rows, meta)
    print_details(m, h, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows,
                       "mpi": {**m, "sizes": {str(k): v for k, v in m.get("sizes", {}).items()}},
                       "hoplite": {**h, "sizes": {str(k): v for k, v in h.get("sizes", {}).items()}}},
                      f, indent=2, default=str)
        print(f"\nwrote {args.json}")
    if args.plot:
        try:
            plot(args.plot, rows, meta)
        except ImportError:
            print("--plot needs matplotlib: pip install -e '.[bench]'", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
