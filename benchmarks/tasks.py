#!/usr/bin/env python
"""Task benchmark: hoplite_mpi vs mpi4py.futures in one MPI job (issue 2).

    mpirun -n 4 --oversubscribe --allow-run-as-root python benchmarks/tasks.py \
        [--tasks 20000] [--chain 1000] [--repeat 3] [--idle 2] [--flip-worker-deps] [--json PATH]

Run it with plain ``mpirun`` (not ``python -m hoplite_mpi``): the script starts both runtimes
itself, one after the other, on ``MPI.COMM_WORLD``:

1. ``mpi4py.futures.MPICommExecutor(COMM_WORLD, root=0)``: rank 0 measures
   - no-op throughput: submit ``--tasks`` tasks, then ``.result()`` each;
   - chain latency: ``--chain`` tasks, each taking the previous result (submit, wait, submit next);
   - idle CPU: every rank's process CPU time over ``--idle`` seconds of doing nothing.
2. ``hoplite_mpi.Executor(comm=COMM_WORLD)`` (the other ranks serve until rank 0 leaves the
   block): the same with ``@hm.remote`` (submit all ``.remote()``, then ``hm.get`` each ref; a chain
   whose tasks take the previous task's ObjectRef, all submitted up front, then get the last) and
   with ``ex.submit`` (the same calls as for mpi4py.futures), then idle CPU of the runtime.

Idle CPU is measured by rank 0 with psutil over the pids of all ranks (same host), and, for
hoplite, cross-checked by each worker rank itself with a task pinned to it (``.options(rank=r)``)
reading ``getrusage(RUSAGE_SELF)`` before and after the idle period.

Every phase checks its results (assert).  Nothing is asserted about timings.  Each measurement is
preceded by a warm-up (function shipping, thread start-up, MPI connection set-up).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import socket
import statistics
import sys
import threading
import time

import psutil
from mpi4py import MPI
from mpi4py.futures import MPICommExecutor

import hoplite_mpi as hm


# --- tasks (module level: mpi4py.futures pickles functions by reference) ----------------------

def noop(x):
    return x


def inc(x):
    return x + 1


def self_cpu():
    """(pid, CPU seconds of this process, monotonic time): run pinned on a worker rank."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return os.getpid(), ru.ru_utime + ru.ru_stime, time.monotonic()


# --- measurement helpers ---------------------------------------------------------------------

class CpuProbe:
    """CPU seconds (user + system, all threads) of a set of processes, read with psutil."""

    def __init__(self, pids: list[int]) -> None:
        self.procs = [psutil.Process(pid) for pid in pids]

    def snapshot(self) -> tuple[float, list[float]]:
        now = time.monotonic()
        out = []
        for p in self.procs:
            t = p.cpu_times()
            out.append(t.user + t.system)
        return now, out

    @staticmethod
    def percent(before, after) -> list[float]:
        wall = after[0] - before[0]
        return [100.0 * (b - a) / wall for a, b in zip(before[1], after[1])]


class Noise:
    """CPU the rest of the machine used during a phase (other jobs disturb the figures)."""

    def __init__(self, probe, launchers: list[int]) -> None:
        self.probe = probe
        self.launchers = CpuProbe(launchers) if probe else None   # mpirun/prterun: not "other"

    def _own(self) -> float:
        return sum(self.probe.snapshot()[1]) + sum(self.launchers.snapshot()[1]) if self.probe else 0.0

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.sys0 = psutil.cpu_times()
        self.own0 = self._own()

    def stop(self) -> dict:
        wall = time.monotonic() - self.t0
        sys1 = psutil.cpu_times()
        own = self._own() - self.own0
        busy = sum(getattr(sys1, f) - getattr(self.sys0, f)
                   for f in ("user", "nice", "system", "irq", "softirq") if hasattr(sys1, f))
        steal = getattr(sys1, "steal", 0.0) - getattr(self.sys0, "steal", 0.0)
        return {"wall_s": round(wall, 2), "own_cores": round(own / wall, 2),
                "other_cores": round(max(0.0, busy - own) / wall, 2) if self.probe else None,
                "steal_cores": round(steal / wall, 2)}


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each thread of this process, by thread name (same names summed)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for th in psutil.Process().threads():
        name = names.get(th.id, "other (MPI/native)")
        out[name] = out.get(name, 0.0) + th.user_time + th.system_time
    return out


def thread_delta(before: dict, after: dict) -> dict[str, float]:
    """Per-thread CPU seconds between two snapshots (threads that ended in between are left out)."""
    return {k: round(after[k] - before.get(k, 0.0), 3) for k in sorted(after)
            if after[k] - before.get(k, 0.0) >= 0.0005}


def _group(name: str) -> str:
    # unnamed threads ("Thread-3 (_manager)": mpi4py.futures' manager) are summed as one
    return "unnamed threads" if name.startswith("Thread-") else name


def timed_throughput(submit_all, get_all, n: int, probe, detail: dict) -> float:
    """Run one throughput measurement; returns tasks/s and fills ``detail``."""
    c0 = probe.snapshot() if probe else None
    tc0 = thread_cpu()
    t0 = time.perf_counter()
    futs = submit_all()
    t1 = time.perf_counter()
    values = get_all(futs)
    t2 = time.perf_counter()
    c1 = probe.snapshot() if probe else None
    tc1 = thread_cpu()
    assert values == list(range(n)), "wrong results"
    detail.update(submit_s=round(t1 - t0, 4), wait_s=round(t2 - t1, 4), total_s=round(t2 - t0, 4),
                  rank0_thread_cpu_s=thread_delta(tc0, tc1))
    if probe:
        detail["cpu_pct_per_rank"] = [round(x, 1) for x in CpuProbe.percent(c0, c1)]
    return n / (t2 - t0)


def idle_cpu(probe, seconds: float, settle: float = 0.5) -> dict:
    time.sleep(settle)          # let back-off reach its longest sleep
    before = probe.snapshot()
    time.sleep(seconds)
    after = probe.snapshot()
    pct = CpuProbe.percent(before, after)
    return {"rank0_pct": round(pct[0], 2), "worker_pct": [round(x, 2) for x in pct[1:]],
            "worker_mean_pct": round(statistics.fmean(pct[1:]), 2),
            "worker_max_pct": round(max(pct[1:]), 2), "seconds": round(after[0] - before[0], 3)}


# --- phases ----------------------------------------------------------------------------------

class Runs:
    """Repeated measurements of named metrics: the median goes in the table, all runs in JSON."""

    def __init__(self) -> None:
        self.values: dict[str, list] = {}
        self.details: dict[str, list] = {}

    def add(self, key: str, measure) -> None:
        detail: dict = {}
        self.values.setdefault(key, []).append(measure(detail))
        self.details.setdefault(key, []).append(detail)

    def into(self, res: dict) -> None:
        for key, vals in self.values.items():
            med = statistics.median(vals)
            res[key] = med
            res[key + "_runs"] = [round(v, 4) for v in vals]
            # the detail of the run closest to the median
            i = min(range(len(vals)), key=lambda j: abs(vals[j] - med))
            if self.details[key][i]:
                res[key + "_detail"] = self.details[key][i]


def chain_wait(submit, length: int, detail: dict) -> float:
    """ms per task of a chain run the mpi4py.futures way: submit, wait, submit the next."""
    t0 = time.perf_counter()
    v = 0
    for _ in range(length):
        v = submit(inc, v).result()
    dt = time.perf_counter() - t0
    assert v == length, f"submit/result chain gave {v}, expected {length}"
    return 1e3 * dt / length


def chain_refs(rinc, length: int, detail: dict) -> float:
    """ms per task of a chain of ObjectRefs, all submitted up front, then get the last."""
    t0 = time.perf_counter()
    r = rinc.remote(0)
    for _ in range(length - 1):
        r = rinc.remote(r)
    t1 = time.perf_counter()
    v = hm.get(r)
    dt = time.perf_counter() - t0
    assert v == length, f"ref chain gave {v}, expected {length}"
    detail["submit_s"] = round(t1 - t0, 4)
    detail["total_s"] = round(dt, 4)
    return 1e3 * dt / length


class scheduler_flag:
    """``with scheduler_flag("worker_deps") as value:`` the scheduler on rank 0 runs with that
    boolean attribute flipped (``value``) for the body (``--flip-worker-deps``: the same job
    measures the ref chain with and without placement ahead).  Through the test hook: not an
    API."""

    def __init__(self, name: str) -> None:
        from hoplite_mpi import testing
        self.rt = testing.runtime()
        self.name = name

    def __enter__(self) -> bool:
        self.before = getattr(self.rt.scheduler, self.name)
        self.rt.call(setattr, self.rt.scheduler, self.name, not self.before)
        return not self.before

    def __exit__(self, *exc) -> None:
        self.rt.call(setattr, self.rt.scheduler, self.name, self.before)


def mpi4py_phase(ex, args, probe) -> dict:
    res: dict = {}
    n, length = args.tasks, args.chain
    # warm-up
    futs = [ex.submit(noop, i) for i in range(args.warmup)]
    assert [f.result() for f in futs] == list(range(args.warmup))
    chain_wait(ex.submit, 50, {})

    runs = Runs()
    for _ in range(args.repeat):
        runs.add("throughput", lambda d: timed_throughput(
            lambda: [ex.submit(noop, i) for i in range(n)],
            lambda fs: [f.result() for f in fs], n, probe, d))
        runs.add("chain_ms", lambda d: chain_wait(ex.submit, length, d))
    runs.into(res)

    if probe:
        res["idle"] = idle_cpu(probe, args.idle)
    return res


def hoplite_phase(ex, args, probe) -> dict:
    res: dict = {}
    n, length = args.tasks, args.chain
    rnoop, rinc = hm.remote(noop), hm.remote(inc)
    # warm-up: ship the functions, start task threads, set up every connection
    refs = [rnoop.remote(i) for i in range(args.warmup)]
    assert [hm.get(r) for r in refs] == list(range(args.warmup))
    futs = [ex.submit(noop, i) for i in range(args.warmup)]
    assert [f.result() for f in futs] == list(range(args.warmup))
    chain_refs(rinc, 50, {})
    chain_wait(ex.submit, 50, {})
    del refs, futs

    runs = Runs()
    for _ in range(args.repeat):
        runs.add("throughput_remote", lambda d: timed_throughput(
            lambda: [rnoop.remote(i) for i in range(n)],
            lambda refs: [hm.get(r) for r in refs], n, probe, d))
        runs.add("throughput_remote_batch", lambda d: timed_throughput(
            lambda: [rnoop.remote(i) for i in range(n)], hm.get, n, probe, d))
        runs.add("throughput_submit", lambda d: timed_throughput(
            lambda: [ex.submit(noop, i) for i in range(n)],
            lambda fs: [f.result() for f in fs], n, probe, d))
        runs.add("chain_refs_ms", lambda d: chain_refs(rinc, length, d))
        if args.flip_worker_deps:
            with scheduler_flag("worker_deps") as value:
                runs.add("chain_refs_flipped_ms", lambda d: chain_refs(rinc, length, d))
            res["flipped"] = f"worker_deps={value}"
        runs.add("chain_submit_ms", lambda d: chain_wait(ex.submit, length, d))
    runs.into(res)

    # idle cost: psutil from rank 0, cross-checked by each worker about itself
    pinned = hm.remote(self_cpu)
    workers = list(range(1, hm.world_size()))
    first = hm.get([pinned.options(rank=w).remote() for w in workers])
    if probe:
        res["idle"] = idle_cpu(probe, args.idle)
    else:
        time.sleep(args.idle + 0.5)
    last = hm.get([pinned.options(rank=w).remote() for w in workers])
    self_pct = [100.0 * (b[1] - a[1]) / (b[2] - a[2]) for a, b in zip(first, last)]
    res["idle_self_report"] = {"worker_pct": [round(x, 2) for x in self_pct],
                               "worker_mean_pct": round(statistics.fmean(self_pct), 2),
                               "worker_max_pct": round(max(self_pct), 2),
                               "seconds": round(statistics.fmean(b[2] - a[2] for a, b in zip(first, last)), 3),
                               "pids": [a[0] for a in first]}
    res["rank0_stats"] = hm.stats()
    return res


# --- report ----------------------------------------------------------------------------------

def fmt(x, unit=""):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        s = f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}" if abs(x) >= 1 else f"{x:.2f}"
    else:
        s = str(x)
    return s + unit


def build_rows(h: dict, m: dict) -> list[dict]:
    """(metric, hoplite, mpi4py, ratio) rows; ratio > 1 always means hoplite is better."""
    rows = []

    def rate(metric, hv, mv):
        rows.append({"metric": metric, "hoplite": hv, "mpi4py": mv,
                     "ratio": hv / mv if hv and mv else None})

    def cost(metric, hv, mv):
        rows.append({"metric": metric, "hoplite": hv, "mpi4py": mv,
                     "ratio": mv / hv if hv and mv else None})

    rate("no-op tasks/s: @remote, hm.get each", h["throughput_remote"], m["throughput"])
    rate("no-op tasks/s: @remote, hm.get(list)", h["throughput_remote_batch"], m["throughput"])
    rate("no-op tasks/s: ex.submit, .result() each", h["throughput_submit"], m["throughput"])
    cost("chain ms/task: refs submitted up front", h["chain_refs_ms"], m["chain_ms"])
    if "chain_refs_flipped_ms" in h:
        cost(f"chain ms/task: refs up front, {h['flipped']}", h["chain_refs_flipped_ms"], m["chain_ms"])
    cost("chain ms/task: submit, result, submit", h["chain_submit_ms"], m["chain_ms"])
    if "idle" in h:
        cost("idle CPU %/core, worker rank (mean)", h["idle"]["worker_mean_pct"],
             m.get("idle", {}).get("worker_mean_pct"))
        cost("idle CPU %/core, worker rank (max)", h["idle"]["worker_max_pct"],
             m.get("idle", {}).get("worker_max_pct"))
        cost("idle CPU %/core, rank 0", h["idle"]["rank0_pct"], m.get("idle", {}).get("rank0_pct"))
    rows.append({"metric": "idle CPU %/core, worker (self-report)",
                 "hoplite": h["idle_self_report"]["worker_mean_pct"], "mpi4py": None, "ratio": None})
    return rows


def print_table(rows: list[dict], meta: dict) -> None:
    w = max(len(r["metric"]) for r in rows) + 2
    print()
    print(f"hoplite_mpi vs mpi4py.futures: {meta['ranks']} ranks on {meta['cores']} cores "
          f"({meta['cpu']}), {meta['mpi']}, hoplite_mpi {meta['hoplite_rev'] or meta['hoplite_mpi']}, "
          f"--tasks {meta['tasks']} --chain {meta['chain']}, median of {meta['repeat']}")
    head = f"{'metric':<{w}}{'hoplite':>12}{'mpi4py.futures':>16}{'ratio':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(f"{r['metric']:<{w}}{fmt(r['hoplite']):>12}{fmt(r['mpi4py']):>16}{ratio:>9}")
    print("ratio > 1 means hoplite is better: hoplite/mpi4py for tasks/s, mpi4py/hoplite for ms "
          "and CPU %")


def print_details(h: dict, m: dict) -> None:
    print("\ndetails (rank 0 CPU seconds by thread during each throughput run; "
          "CPU % of a core per rank, rank 0 first):")
    for label, d in (("mpi4py.futures submit", m["throughput_detail"]),
                     ("hoplite @remote get each", h["throughput_remote_detail"]),
                     ("hoplite @remote get(list)", h["throughput_remote_batch_detail"]),
                     ("hoplite ex.submit", h["throughput_submit_detail"])):
        threads = {}
        for k, v in d["rank0_thread_cpu_s"].items():
            threads[_group(k)] = round(threads.get(_group(k), 0.0) + v, 3)
        print(f"  {label:<27} submit {d['submit_s']:.2f}s + wait {d['wait_s']:.2f}s; "
              f"threads {threads}; cpu% {d.get('cpu_pct_per_rank', 'n/a')}")
    d = h["chain_refs_ms_detail"]
    print(f"  hoplite ref chain: {d['submit_s']:.2f}s of the {d['total_s']:.2f}s spent submitting")
    print("  all runs (the table shows the median):")
    for label, res in (("mpi4py.futures", m), ("hoplite", h)):
        for key in sorted(k for k in res if k + "_runs" in res):
            print(f"    {label} {key}: " + ", ".join(fmt(float(v)) for v in res[key + "_runs"]))
    if "idle" in h:
        print(f"  idle hoplite (psutil): {h['idle']}")
    print(f"  idle hoplite (self-report): {h['idle_self_report']}")
    if "idle" in m:
        print(f"  idle mpi4py.futures (psutil): {m['idle']}")
    print("machine load during each phase, in cores (this job / other processes / steal): "
          + "; ".join(f"{name} {d['own_cores']} / {d['other_cores']} / {d['steal_cores']}"
                      for name, d in (("mpi4py.futures", m["machine_load"]),
                                      ("hoplite", h["machine_load"]))))
    other = max(d["other_cores"] or 0.0 for d in (m["machine_load"], h["machine_load"]))
    if other > 0.1:
        print(f"WARNING: other processes used up to {other:.2f} cores during the run: "
              "the figures are disturbed, run again on a quiet machine")


def base_meta(comm) -> dict:
    """Machine and software of a benchmark run (shared with collectives.py)."""
    import mpi4py
    import subprocess
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    rev = None
    try:
        src = os.path.dirname(os.path.dirname(os.path.abspath(hm.__file__)))
        rev = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip() or None
        # "-dirty" only when the package itself differs from the commit (not the benchmarks)
        if rev and subprocess.run(["git", "-C", src, "status", "--porcelain", "--", "hoplite_mpi"],
                                  capture_output=True, text=True, timeout=10).stdout.strip():
            rev += "-dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": socket.gethostname(), "ranks": comm.Get_size(), "cores": os.cpu_count(),
            "cpu": cpu, "mpi": MPI.Get_library_version().strip().splitlines()[0].split(",")[0],
            "mpi4py": mpi4py.__version__, "hoplite_mpi": hm.__version__, "hoplite_rev": rev,
            "hoplite_path": os.path.dirname(os.path.abspath(hm.__file__)),
            "python": platform.python_version(), "ulfm": os.environ.get("OMPI_MCA_mpi_ft_enable", "off"),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()], "argv": sys.argv}


def machine_meta(comm, args) -> dict:
    return {**base_meta(comm), "tasks": args.tasks, "chain": args.chain, "repeat": args.repeat,
            "idle_s": args.idle, "warmup": args.warmup}


def job_probes(comm, script: str):
    """Collective start-up of a benchmark job: ``(probe, launchers)``, or None (after a message on
    rank 0) with fewer than 2 ranks.  ``probe`` is a :class:`CpuProbe` over every rank's pid on
    rank 0 when all ranks share this host (else None); ``launchers`` are the ranks' parent pids
    (mpirun/prted), whose CPU :class:`Noise` counts as this job's."""
    rank, size = comm.Get_rank(), comm.Get_size()
    if size < 2:
        if rank == 0:
            print(f"{script} needs at least 2 ranks (rank 0 drives, the others run tasks)", file=sys.stderr)
        return None
    where = comm.allgather((socket.gethostname(), os.getpid(), os.getppid()))
    probe = None
    if rank == 0 and len({h for h, _, _ in where}) == 1:
        probe = CpuProbe([pid for _, pid, _ in where])
    return probe, sorted({ppid for _, _, ppid in where} - {1})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20000, help="no-op tasks per throughput run")
    parser.add_argument("--chain", type=int, default=1000, help="length of the dependent chain")
    parser.add_argument("--idle", type=float, default=2.0, help="seconds of idle CPU measurement")
    parser.add_argument("--warmup", type=int, default=500, help="no-op warm-up tasks per API")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each throughput/chain measurement; the table shows the median")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--flip-worker-deps", action="store_true",
                        help="also measure the ref chain with Config.worker_deps flipped on rank 0")
    args = parser.parse_args()
    for name in ("tasks", "chain", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.idle <= 0 or args.warmup < 1:
        parser.error("--idle must be > 0 and --warmup >= 1")

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    job = job_probes(comm, "tasks.py")
    if job is None:
        return 2
    probe, launchers = job
    meta = machine_meta(comm, args) if rank == 0 else {}

    m = h = None
    noise = Noise(probe, launchers)
    with MPICommExecutor(comm, root=0) as ex:
        if ex is not None:
            noise.start()
            m = mpi4py_phase(ex, args, probe)
            m["machine_load"] = noise.stop()
            print(f"mpi4py.futures phase: {m['machine_load']['wall_s']:.1f} s", flush=True)

    with hm.Executor(comm=comm) as ex:
        if ex is not None:
            noise.start()
            h = hoplite_phase(ex, args, probe)
            h["machine_load"] = noise.stop()
            print(f"hoplite_mpi phase: {h['machine_load']['wall_s']:.1f} s", flush=True)

    if rank != 0:
        return 0
    rows = build_rows(h, m)
    print_table(rows, meta)
    print_details(h, m)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "hoplite": h, "mpi4py_futures": m}, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
