#!/usr/bin/env python
"""Durable workflows benchmark (issue 14): the cost of checkpointing per task and per MiB, on
tmpfs and on local disk, against no checkpoint and against ``dd``; recovery time against
recomputation.

One phase per MPI job (the storage directory of a job cannot change while it runs)::

    mpirun -n 4 --oversubscribe python -m hoplite_mpi benchmarks/durable.py --phase PHASE \
        [--storage DIR] [options] --json OUT.json
    hoplite-mpi run -n 4 benchmarks/durable.py --phase PHASE ...          # the same, under ULFM

and a runner that starts every job of the issue's table one after the other (plain ``python``,
no MPI in the runner itself) and prints the table::

    python benchmarks/durable.py --runner [--quick] [--kill] [--reps 3] [--rounds 9] --json all.json
    python benchmarks/durable.py --report all.json          # the tables again, from the JSON

The runner makes its storage directories under /dev/shm (tmpfs) and ``--disk-dir`` (default
/var/tmp), runs: throughput without storage, then with storage on tmpfs and on disk, each
followed by a restore job on the same directory, and with ``HOPLITE_MPI_STORAGE_SYNC=0``;
bandwidth on tmpfs, disk and disk without fsync; dag-ab on tmpfs and disk; then ``--reps``
times per file system: recompute (no storage), full, rerun (all committed), first 80 %, rerun
(80 % committed), and with ``--kill`` the driver SIGKILLed at its 80 %-th TaskDone under ULFM
then a rerun.  It removes the directories afterwards (``--keep``: not).

Phases (each checks its results; nothing is asserted about timings):

``throughput``  no-op bursts (``--tasks`` tasks ``noop(nonce, i)``, ``hm.get`` of the list),
    the kinds alternated in every round (order reversed every other round), a fresh nonce per
    burst (fresh durable keys):

    - ``none``: storage detached for the burst (through the test hook: ``ctx.workflow = None``
      on rank 0, between bursts only; no keys, no checkpoints).  Without ``--storage`` this is
      the only kind, and the job is the true baseline (storage never attached).
    - ``plain``: storage attached, not checkpointed (the driver still computes a durable key
      per task: function key once, argument digest per call).
    - ``ckpt``: ``noop.options(checkpoint=True)``.  Two times: ``results`` (every result back on
      the driver) and ``durable`` (also every commit confirmed: the driver's durable counters,
      those of ``hm.stats()["durable"]``, count the workers' reports; read directly every 5 ms
      after the results, not through the engine, bounded).  The persister is asynchronous, so
      only ``durable`` is the honest cost.

    Each ckpt burst's writer time on the workers (their ``persist_us`` counters) is reported
    per commit, and every burst's CPU time per task by thread role (driver main thread and
    engine; the workers' engines, task threads and persisters, read with psutil by a task
    pinned to each rank before and after the burst).

``restore``  (same ``--storage`` as an earlier ``throughput`` job) ``restore`` bursts resubmit
    that job's checkpointed bursts (same nonces, so the same keys: refs ready at once, values
    read from storage), alternated with ``none`` and ``plain`` bursts.

``bandwidth``  in one task pinned to rank 1, for each ``--sizes`` MiB: ``storage.commit`` of a
    float64 array's frames as the runtime makes them (``serialization.serialize``, written as
    .npy, crc32, fsync unless ``HOPLITE_MPI_STORAGE_SYNC=0``) alternated with ``dd
    if=/dev/zero of=DIR/file bs=1M count=N`` (``conv=fsync`` when syncing) to the same
    directory, each ``--repeat`` times (order swapped every other time, the files removed after
    each pair).  dd's time is the one it prints itself (open to close, without its fork/exec).
    Each pair is followed by the parts of a commit: one crc32 pass over the data, and the data
    written as ``storage._write_file`` writes it (4 MiB slices, fsync) without crc32.  Then the
    real path, ``--repeat`` times per size: a checkpointed task pinned to rank 1 returning such
    an array, and the writer time its persister reported (``persist_us``).

``recovery``  a layered DAG of ``--tasks`` checkpointed tasks (``--width`` per layer, each
    taking two results of the layer before), each running ``--iters`` iterations of a numpy
    kernel (~20 ms; the runner calibrates it once and passes the same count to every job, so
    the keys match) and returning ``--result-kib`` KiB.  ``--fraction F`` submits only the first
    F of the tasks (to leave F of the workflow committed).  Timed from the first submission to
    every ref ready and the last layer's values read (``results``), to every commit confirmed
    (``durable``), and from before ``hm.init(storage=...)`` (which lists the committed steps);
    the runner also reports each job's wall time (mpirun start-up included).  Without
    ``--storage`` the same DAG is recomputed with no storage: the recomputation reference.

``dag-ab``  the recovery DAG with fresh keys each round, kinds ``none`` / ``plain`` / ``ckpt``
    (as in ``throughput``) alternated in one job: what checkpointing costs real tasks (~20 ms,
    256 KiB results), with the CPU per task by thread role.

Every phase reports the machine load: CPU used by this job's processes and by everything else
on the host during the phase (psutil), and the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
POLL = 0.005          # s between polls of the driver's durable counters
PERSIST_TIMEOUT = 600.0


# --- tasks (module level; the durable keys of __main__ functions are stable across runs) ------

def noop(nonce, i):
    return i


def getpid():
    return os.getpid(), os.getppid()


def worker_counters():
    import hoplite_mpi as hm
    s = hm.stats()
    return {k: s.get(k, 0) for k in ("persisted", "persist_dups", "persist_errors",
                                      "persist_bytes", "persist_us")}


def thread_cpu():
    """CPU seconds of each thread of this process by thread name (digits dropped: one entry
    per role), and ``other (MPI/native)`` for threads Python did not start."""
    import re
    import threading

    import psutil
    names = {t.native_id: re.sub(r"-\d+$", "", t.name) for t in threading.enumerate()}
    out: dict = {}
    for th in psutil.Process().threads():
        name = names.get(th.id, "other (MPI/native)")
        out[name] = out.get(name, 0.0) + th.user_time + th.system_time
    return out


def make_array(nonce, nbytes):
    import numpy as np
    return np.arange(nbytes // 8, dtype=np.float64)


def kernel(x, iters):
    import numpy as np
    for _ in range(iters):
        np.multiply(x, x, out=x)
        x += 1.0
        np.sqrt(x, out=x)
    return x


def step(i, iters, nbytes, salt, *inputs):
    """A recovery DAG step: ~``iters`` kernel iterations over ``nbytes`` of float64 (``salt``:
    fresh durable keys for each A/B round; "" in the recovery jobs)."""
    import numpy as np
    x = np.full(nbytes // 8, float(i % 97), dtype=np.float64)
    for inp in inputs:
        x += inp
    x *= 1e-3
    return kernel(x, iters)


def commit_vs_dd(root, size_mib, repeat, sync):
    """(task, on a worker) ``repeat`` pairs of (storage.commit of a size_mib MiB array as the
    runtime serializes it, dd of the same size to the same directory)."""
    import numpy as np

    from hoplite_mpi.durable import storage
    from hoplite_mpi.serialization import serialize
    nbytes = size_mib << 20
    arr = np.arange(nbytes // 8, dtype=np.float64)
    arr += 0.5                                   # (touched: no first-touch page faults inside)
    out = {"commit_s": [], "dd_s": [], "dd_wall_s": [], "serialize_s": [], "commit_bytes": None,
           "write_s": [], "crc32_s": []}
    view = memoryview(serialize(arr, "result")[1]).cast("B")
    ddfile = os.path.join(root, "tmp", f"dd-{os.getpid()}.bin")
    cmd = ["dd", "if=/dev/zero", f"of={ddfile}", "bs=1M", f"count={size_mib}"]
    if sync:
        cmd.append("conv=fsync")

    def do_commit():
        t0 = time.perf_counter()
        frames = serialize(arr, "result")
        t1 = time.perf_counter()
        key = "bw" + uuid.uuid4().hex[:30]
        committed, written = storage.commit(root, key, [frames], {"name": "bw"}, [arr], sync)
        t2 = time.perf_counter()
        assert committed and written >= nbytes
        out["serialize_s"].append(t1 - t0)
        out["commit_s"].append(t2 - t1)
        out["commit_bytes"] = written
        # remove the step (manifest and attempt directory) so the next one starts alike
        m = storage.manifest_path(root, key)
        sub = os.path.dirname(m)
        for e in os.listdir(sub):
            if e.startswith(key):
                p = os.path.join(sub, e)
                shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)

    def do_dd():
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - t0
        assert r.returncode == 0, r.stderr
        m = re.search(r"copied, ([0-9.e+-]+) s", r.stderr)
        out["dd_s"].append(float(m.group(1)) if m else wall)
        out["dd_wall_s"].append(wall)
        os.unlink(ddfile)

    def do_parts():
        """Where a commit's time goes: one crc32 pass over the data, and the data written the
        way storage._write_file writes it (4 MiB slices, fsync when syncing) without crc32."""
        import zlib
        t0 = time.perf_counter()
        zlib.crc32(view)
        out["crc32_s"].append(time.perf_counter() - t0)
        path = os.path.join(root, "tmp", f"w-{os.getpid()}.bin")
        t0 = time.perf_counter()
        storage._write_file(path, [view], sync, unsummed=1)     # (the commit's write, no crc32)
        out["write_s"].append(time.perf_counter() - t0)
        os.unlink(path)

    do_commit()          # warm-up (imports, the step's subdirectory, page cache of the code)
    do_dd()
    do_parts()
    for k in ("commit_s", "dd_s", "dd_wall_s", "serialize_s", "write_s", "crc32_s"):
        out[k].clear()
    for i in range(repeat):
        if i % 2 == 0:
            do_commit()
            do_dd()
        else:
            do_dd()
            do_commit()
        do_parts()
    out["fs"] = fs_type(root)
    return out


# --- helpers -------------------------------------------------------------------------------

def fs_type(path: str) -> str:
    """The file system type of ``path`` (from /proc/mounts, the longest matching mount point)."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt, typ = parts[1], parts[2]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, kind = mnt, typ
    except OSError:
        pass
    return f"{kind} ({best})"


def med(xs):
    return statistics.median(xs) if xs else None


class Load:
    """CPU of this job's processes and of the rest of the host during a phase (cores)."""

    def __init__(self, pids: list[int]) -> None:
        import psutil
        self.psutil = psutil
        self.procs = []
        for pid in pids:
            try:
                self.procs.append(psutil.Process(pid))
            except psutil.Error:
                pass

    def _own(self) -> float:
        total = 0.0
        for p in self.procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except self.psutil.Error:
                pass
        return total

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.sys0 = self.psutil.cpu_times()
        self.own0 = self._own()
        self.load0 = os.getloadavg()

    def stop(self) -> dict:
        wall = time.monotonic() - self.t0
        sys1 = self.psutil.cpu_times()
        own = self._own() - self.own0
        busy = sum(getattr(sys1, f) - getattr(self.sys0, f)
                   for f in ("user", "nice", "system", "irq", "softirq") if hasattr(sys1, f))
        iowait = getattr(sys1, "iowait", 0.0) - getattr(self.sys0, "iowait", 0.0)
        return {"wall_s": round(wall, 2), "own_cores": round(own / wall, 2),
                "other_cores": round(max(0.0, busy - own) / wall, 2),
                "iowait_cores": round(iowait / wall, 2),
                "loadavg_start": [round(x, 2) for x in self.load0],
                "loadavg_end": [round(x, 2) for x in os.getloadavg()]}


def job_load(hm) -> Load:
    """A Load over every rank of the job and their launchers (mpirun / prted)."""
    rpid = hm.remote(getpid)
    where = [(os.getpid(), os.getppid())] + hm.get(
        [rpid.options(rank=w).remote() for w in range(1, hm.world_size())])
    pids = {p for p, _ in where} | {pp for _, pp in where if pp > 1}
    return Load(sorted(pids))


def durable_counts(hm) -> dict:
    """The driver's durable counters, read directly (no call into the engine: polling it must
    not load the engine thread it measures); {} without storage."""
    from hoplite_mpi import testing
    wf = testing.runtime().workflow
    return wf.snapshot() if wf is not None else {}


def wait_persisted(hm, base: dict, n: int) -> tuple[bool, dict]:
    """Poll until ``n`` commit reports (persisted + dups + failed) arrived since ``base``."""
    deadline = time.monotonic() + PERSIST_TIMEOUT
    while True:
        d = durable_counts(hm)
        got = sum(d.get(k, 0) - base.get(k, 0) for k in ("persisted", "persist_dups", "persist_failed"))
        if got >= n:
            return True, d
        if time.monotonic() > deadline:
            return False, d
        time.sleep(POLL)


def workers_counters(hm) -> list[dict]:
    rc = hm.remote(worker_counters)
    return hm.get([rc.options(rank=w).remote() for w in range(1, hm.world_size())])


def job_thread_cpu(hm) -> dict:
    """CPU seconds by thread role: ``driver/<name>`` on rank 0, ``workers/<name>`` summed over
    the other ranks (read by a task pinned to each)."""
    out = {f"driver/{k}": v for k, v in thread_cpu().items()}
    rt = hm.remote(thread_cpu)
    for w in hm.get([rt.options(rank=r).remote() for r in range(1, hm.world_size())]):
        for k, v in w.items():
            out[f"workers/{k}"] = out.get(f"workers/{k}", 0.0) + v
    return out


def counters_delta(before: list[dict], after: list[dict]) -> dict:
    out = {}
    for k in before[0]:
        out[k] = sum(a[k] - b[k] for a, b in zip(after, before))
    return out


class detached:
    """``with detached(hm):`` rank 0 runs without its workflow (no keys, no checkpoints) for
    the body: the test hook, between bursts only (nothing checkpointed in flight)."""

    def __init__(self, hm) -> None:
        from hoplite_mpi import testing
        self.rt = testing.runtime()

    def __enter__(self):
        self.wf = self.rt.ctx.workflow
        self.rt.call(setattr, self.rt.ctx, "workflow", None)
        return self

    def __exit__(self, *exc) -> None:
        self.rt.call(setattr, self.rt.ctx, "workflow", self.wf)


# --- phases --------------------------------------------------------------------------------

def burst(hm, kind: str, nonce: str, n: int) -> dict:
    """One burst of ``n`` no-op tasks of ``kind``; seconds to the results and to the commits."""
    rnoop = hm.remote(noop)
    fn = rnoop.options(checkpoint=True) if kind in ("ckpt", "restore") else rnoop
    storage = hm.stats()["durable"] is not None
    base = durable_counts(hm) if storage else {}
    wbase = workers_counters(hm) if kind == "ckpt" else None
    cpu0 = job_thread_cpu(hm)
    ctx = detached(hm) if kind == "none" and storage else None
    if ctx:
        ctx.__enter__()
    try:
        t0 = time.perf_counter()
        refs = [fn.remote(nonce, i) for i in range(n)]
        t1 = time.perf_counter()
        values = hm.get(refs, timeout=PERSIST_TIMEOUT)
        t2 = time.perf_counter()
    finally:
        if ctx:
            ctx.__exit__(None, None, None)
    assert values == list(range(n)), f"{kind}: wrong results"
    out = {"kind": kind, "n": n, "submit_s": t1 - t0, "results_s": t2 - t0}
    if kind == "ckpt":
        ok, d = wait_persisted(hm, base, n)
        t3 = time.perf_counter()
        out["durable_s"] = t3 - t0
        out["persisted_ok"] = ok
        out["persisted"] = d.get("persisted", 0) - base.get("persisted", 0)
        assert d.get("checkpointed", 0) - base.get("checkpointed", 0) == n
        w = counters_delta(wbase, workers_counters(hm))
        out["writer_us_per_commit"] = w["persist_us"] / max(1, w["persisted"] + w["persist_dups"])
        out["writer_commits"] = w["persisted"]
    elif kind == "restore":
        d = durable_counts(hm)
        out["restored"] = d.get("restored", 0) - base.get("restored", 0)
        assert out["restored"] == n, f"restore burst: {out['restored']} of {n} restored"
    # CPU per task by thread role over the burst (up to every commit confirmed), in µs; the
    # pinned tasks reading it run after the timed region (their own cost is in the figures,
    # the same for every kind: ~4 tiny tasks per burst)
    cpu1 = job_thread_cpu(hm)
    out["cpu_us_per_task"] = {k: 1e6 * (cpu1[k] - cpu0.get(k, 0.0)) / n for k in sorted(cpu1)
                              if cpu1[k] - cpu0.get(k, 0.0) > 0}
    del refs, values
    return out


def key_cost(hm, n: int) -> float | None:
    """µs per task the driver spends on a durable key (value_digest of the arguments and the
    task key), measured in-process on rank 0 over ``n`` calls."""
    from hoplite_mpi import testing
    from hoplite_mpi.durable.keys import function_key
    wf = testing.runtime().workflow
    if wf is None:
        return None
    fk = function_key(noop)
    t0 = time.perf_counter()
    for i in range(n):
        wf.call_key(fk, ("keycost", i), {}, None)
    return 1e6 * (time.perf_counter() - t0) / n


def phase_throughput(hm, args) -> dict:
    storage = hm.stats()["durable"] is not None
    if args.phase == "restore":
        assert storage, "--phase restore needs --storage (the directory of a throughput job)"
        kinds = ["none", "plain", "restore"]
    else:
        kinds = ["none", "plain", "ckpt"] if storage else ["none"]
    if args.kinds:
        kinds = [k for k in kinds if k in args.kinds.split(",")]
    # warm-up: ship the function, start the persisters, make the 256 step subdirectories
    for kind in kinds:
        nonce = "warm-ckpt" if kind in ("ckpt", "restore") else f"warm-{kind}-{args.phase}"
        burst(hm, kind, nonce, args.tasks)
    rounds: list[dict] = []
    load = job_load(hm)
    load.start()
    for r in range(args.rounds):
        order = kinds if r % 2 == 0 else kinds[::-1]
        for kind in order:
            nonce = f"ckpt-{r}" if kind in ("ckpt", "restore") else f"{kind}-{args.phase}-{r}"
            res = burst(hm, kind, nonce, args.tasks)
            res["round"] = r
            rounds.append(res)
            print(f"  round {r} {kind:8s} results {args.tasks / res['results_s']:8.0f}/s"
                  + (f"  durable {args.tasks / res['durable_s']:8.0f}/s  writer "
                     f"{res['writer_us_per_commit']:.0f} us/commit" if "durable_s" in res else ""),
                  flush=True)
    machine = load.stop()
    out: dict = {"rounds": rounds, "machine": machine, "kinds": kinds}
    summary = {}
    for kind in kinds:
        rs = [x for x in rounds if x["kind"] == kind]
        summary[kind] = {"results_per_s": [args.tasks / x["results_s"] for x in rs]}
        if kind == "ckpt":
            summary[kind]["durable_per_s"] = [args.tasks / x["durable_s"] for x in rs]
            summary[kind]["writer_us_per_commit"] = [x["writer_us_per_commit"] for x in rs]
    # per-round ratios against the plain / none burst of the same round (same conditions)
    for base in ("none", "plain"):
        for kind, key in (("ckpt", "results_s"), ("ckpt", "durable_s"), ("plain", "results_s"),
                          ("restore", "results_s")):
            if base not in kinds or kind not in kinds or base == kind:
                continue
            ratios = []
            for r in range(args.rounds):
                a = next(x for x in rounds if x["round"] == r and x["kind"] == kind)
                b = next(x for x in rounds if x["round"] == r and x["kind"] == base)
                ratios.append(a[key] / b["results_s"])
            summary[f"{kind}_{key[:-2]}_over_{base}"] = ratios
    # CPU µs per task by thread role, median over the rounds
    for kind in kinds:
        rs = [x["cpu_us_per_task"] for x in rounds if x["kind"] == kind]
        roles = sorted({k for r in rs for k in r})
        summary[kind]["cpu_us_per_task"] = {k: med([r.get(k, 0.0) for r in rs]) for k in roles}
        summary[kind]["cpu_us_per_task_total"] = med([sum(r.values()) for r in rs])
    out["summary"] = summary
    out["key_us_per_task"] = key_cost(hm, 2000) if storage else None
    return out


def phase_bandwidth(hm, args) -> dict:
    assert hm.stats()["durable"] is not None, "--phase bandwidth needs --storage"
    root = hm.stats()["durable"]["root"]
    sync = hm.current_config().storage_sync
    load = job_load(hm)
    load.start()
    rc = hm.remote(commit_vs_dd).options(rank=1)
    sizes = {}
    for size in args.sizes:
        r = hm.get(rc.remote(root, size, args.repeat, sync), timeout=3600)
        mib = size
        r["commit_mib_s"] = [mib / s for s in r["commit_s"]]
        r["dd_mib_s"] = [mib / s for s in r["dd_s"]]
        r["ratio"] = [d / c for c, d in zip(r["commit_s"], r["dd_s"])]   # commit MiB/s over dd MiB/s
        r["write_mib_s"] = [mib / s for s in r["write_s"]]
        r["crc32_mib_s"] = [mib / s for s in r["crc32_s"]]
        # the real path: a checkpointed task returning the array, its persister's writer time
        base = durable_counts(hm)
        wbase = workers_counters(hm)
        mk = hm.remote(make_array).options(rank=1, checkpoint=True)
        real = []
        for i in range(args.repeat):
            ref = mk.remote(f"bw-{uuid.uuid4().hex}", size << 20)
            hm.wait([ref], timeout=600)
            ok, _ = wait_persisted(hm, base, i + 1)
            assert ok
            w = workers_counters(hm)
            d = counters_delta(wbase, w)
            wbase = w
            real.append(d["persist_us"] / 1e6)
            hm.delete([ref])
            del ref
        r["persister_s"] = real
        r["persister_mib_s"] = [mib / s for s in real]
        sizes[str(size)] = r
        print(f"  {size:3d} MiB on {r['fs']}, sync={sync}: commit {med(r['commit_mib_s']):7.0f} MiB/s"
              f"  dd {med(r['dd_mib_s']):7.0f} MiB/s  ratio {med(r['ratio']):.2f}"
              f"  (persister {med(r['persister_mib_s']):.0f} MiB/s; parts: write "
              f"{med(r['write_mib_s']):.0f} MiB/s, crc32 {med(r['crc32_mib_s']):.0f} MiB/s)",
              flush=True)
    return {"sizes": sizes, "sync": sync, "root": root, "machine": load.stop()}


def dag(n: int, width: int) -> list[list[int]]:
    """Inputs of each task of the layered DAG: positions p and p+1 of the layer before."""
    out = []
    for i in range(n):
        layer, p = divmod(i, width)
        if layer == 0:
            out.append([])
        else:
            prev = (layer - 1) * width
            out.append(sorted({prev + p, prev + (p + 1) % width}))
    return out


def run_dag(hm, rstep, args, n: int, salt: str) -> tuple[float, float]:
    """Submit the first ``n`` tasks of the DAG, wait for all, read the last layer's values;
    ``(seconds, checksum)``."""
    nbytes = args.result_kib << 10
    inputs = dag(args.tasks, args.width)
    t0 = time.perf_counter()
    refs: list = []
    for i in range(n):
        refs.append(rstep.remote(i, args.iters, nbytes, salt, *(refs[j] for j in inputs[i])))
    hm.wait(refs, num_returns=len(refs), timeout=3600)
    last = refs[-min(args.width, len(refs)):]
    check = float(sum(float(v[:16].sum()) for v in hm.get(last, timeout=600)))
    return time.perf_counter() - t0, check


def phase_dag_ab(hm, args) -> dict:
    """The recovery DAG (fresh keys each round) with and without checkpoints, alternated in one
    job: the cost of checkpointing real tasks, and where its CPU goes."""
    assert hm.stats()["durable"] is not None, "--phase dag-ab needs --storage"
    rstep = hm.remote(step)
    fns = {"none": rstep, "plain": rstep, "ckpt": rstep.options(checkpoint=True)}
    kinds = ["none", "plain", "ckpt"]
    run_dag(hm, fns["ckpt"], args, 2 * args.width, "warm")
    wait_persisted(hm, {}, durable_counts(hm)["checkpointed"])
    rounds = []
    load = job_load(hm)
    load.start()
    for r in range(args.rounds):
        for kind in (kinds if r % 2 == 0 else kinds[::-1]):
            base = durable_counts(hm)
            cpu0 = job_thread_cpu(hm)
            ctx = detached(hm) if kind == "none" else None
            if ctx:
                ctx.__enter__()
            try:
                t0 = time.perf_counter()
                dt, _ = run_dag(hm, fns[kind], args, args.tasks, f"{kind}-{r}")
            finally:
                if ctx:
                    ctx.__exit__(None, None, None)
            res = {"kind": kind, "round": r, "results_s": dt}
            if kind == "ckpt":
                ok, d = wait_persisted(hm, base, args.tasks)
                res["durable_s"] = time.perf_counter() - t0
                assert ok and d["checkpointed"] - base["checkpointed"] == args.tasks
            cpu1 = job_thread_cpu(hm)
            res["cpu_ms"] = {k: 1e3 * (cpu1[k] - cpu0.get(k, 0.0)) for k in sorted(cpu1)
                             if cpu1[k] - cpu0.get(k, 0.0) > 0}
            rounds.append(res)
            print(f"  round {r} {kind:6s} results {dt:.2f} s"
                  + (f" durable {res['durable_s']:.2f} s" if "durable_s" in res else "")
                  + f"  cpu {sum(res['cpu_ms'].values()) / 1e3:.2f} s", flush=True)
    summary: dict = {}
    for kind in kinds:
        rs = [x for x in rounds if x["kind"] == kind]
        roles = sorted({k for x in rs for k in x["cpu_ms"]})
        summary[kind] = {"results_s": [x["results_s"] for x in rs],
                         "cpu_ms_per_task": {k: med([x["cpu_ms"].get(k, 0.0) for x in rs]) / args.tasks
                                             for k in roles},
                         "cpu_ms_per_task_total": med([sum(x["cpu_ms"].values()) for x in rs]) / args.tasks}
        if kind == "ckpt":
            summary[kind]["durable_s"] = [x["durable_s"] for x in rs]
    for kind, key in (("ckpt", "durable_s"), ("ckpt", "results_s"), ("plain", "results_s")):
        for base in ("none", "plain"):
            if base == kind:
                continue
            summary[f"{kind}_{key[:-2]}_over_{base}"] = [
                next(x for x in rounds if x["round"] == r and x["kind"] == kind)[key]
                / next(x for x in rounds if x["round"] == r and x["kind"] == base)["results_s"]
                for r in range(args.rounds)]
    return {"rounds": rounds, "summary": summary, "kinds": kinds, "machine": load.stop()}


def phase_recovery(hm, args, t_start: float, t_attach: float) -> dict:
    storage = hm.stats()["durable"] is not None
    rstep = hm.remote(step)
    if storage:
        rstep = rstep.options(checkpoint=True)
    n = args.tasks if args.fraction >= 1 else int(round(args.tasks * args.fraction))
    base = durable_counts(hm) if storage else {}
    load = job_load(hm)
    load.start()
    t0 = time.perf_counter()
    dt, check = run_dag(hm, rstep, args, n, "")
    t1 = t0 + dt
    out = {"tasks": n, "of": args.tasks, "results_s": t1 - t0,
           "results_from_start_s": t1 - t_start, "attach_s": t_attach, "check": check}
    if storage:
        d = durable_counts(hm)
        executed = d.get("checkpointed", 0) - base.get("checkpointed", 0)
        ok, d = wait_persisted(hm, base, executed)
        t2 = time.perf_counter()
        out.update(durable_s=t2 - t0, durable_from_start_s=t2 - t_start, persisted_ok=ok,
                   restored=d.get("restored", 0), executed=executed,
                   committed_at_start=d.get("committed_at_start", 0),
                   persisted=d.get("persisted", 0))
    out["machine"] = load.stop()
    print(f"  recovery {n}/{args.tasks} tasks: results {out['results_s']:.2f} s"
          + (f", durable {out['durable_s']:.2f} s, restored {out['restored']}, executed "
             f"{out['executed']}" if storage else " (no storage)"), flush=True)
    return out


def job_main(args) -> int:
    import hoplite_mpi as hm
    t_start = time.perf_counter()
    if args.storage:
        hm.init(storage=args.storage)
    else:
        hm.init()
    t_attach = time.perf_counter() - t_start
    if hm.world_size() < 2:
        print("durable.py needs >= 2 ranks", file=sys.stderr)
        return 2
    meta = {"phase": args.phase, "ranks": hm.world_size(), "storage": args.storage or None,
            "fs": fs_type(args.storage) if args.storage else None,
            "sync": hm.current_config().storage_sync if args.storage else None,
            "host": socket.gethostname(), "nproc": os.cpu_count(), "argv": sys.argv,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": _commit(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}
    print(f"durable.py --phase {args.phase}: {meta['ranks']} ranks, storage {meta['storage']} "
          f"{meta['fs'] or ''} sync={meta['sync']}, load {meta['loadavg_at_start']}", flush=True)
    if args.phase in ("throughput", "restore"):
        res = phase_throughput(hm, args)
    elif args.phase == "bandwidth":
        res = phase_bandwidth(hm, args)
    elif args.phase == "dag-ab":
        res = phase_dag_ab(hm, args)
    else:
        res = phase_recovery(hm, args, t_start, t_attach)
    res["meta"] = meta
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return "?"


# --- runner (plain python: starts the jobs) -----------------------------------------------------

def calibrate(work_ms: float, result_kib: int) -> int:
    """Kernel iterations for ~``work_ms`` ms on one core of this machine (the fastest of 5
    tries: the least disturbed by other jobs)."""
    import numpy as np
    x = np.full((result_kib << 10) // 8, 0.5)
    kernel(x, 20)
    per = []
    for _ in range(5):
        t0 = time.perf_counter()
        kernel(x, 200)
        per.append((time.perf_counter() - t0) / 200)
    return max(1, int(round(work_ms / 1e3 / min(per))))


class Runner:
    def __init__(self, args) -> None:
        self.args = args
        self.out_dir = tempfile.mkdtemp(prefix="hm-durable-bench-json-")
        self.jobs: list[dict] = []
        self.mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
        if not os.path.exists(self.mpirun):
            self.mpirun = shutil.which("mpirun") or "mpirun"

    def job(self, label: str, phase: str, storage: str | None, extra: list[str],
            env: dict | None = None, ft: bool = False, expect_ok: bool = True) -> dict | None:
        out = os.path.join(self.out_dir, f"{len(self.jobs):03d}-{label}.json")
        cmd = [self.mpirun, "-n", str(self.args.ranks), "--oversubscribe"]
        if os.getuid() == 0:
            cmd.append("--allow-run-as-root")
        if ft:
            cmd += ["--with-ft", "ulfm"]
        cmd += [sys.executable, "-m", "hoplite_mpi", os.path.abspath(__file__), "--phase", phase,
                "--json", out] + (["--storage", storage] if storage else []) + extra
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        shown = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        print(f"\n[{label}] {shown} {' '.join(cmd[len([self.mpirun]):])}".replace(self.out_dir, "OUT"),
              flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=self.args.job_timeout)
        wall = time.perf_counter() - t0
        text = "\n".join(line for line in proc.stdout.splitlines()
                         if "rank-loss tolerance: off" not in line)
        print(text, flush=True)
        res = None
        if os.path.exists(out):
            with open(out) as f:
                res = json.load(f)
        elif expect_ok:
            raise SystemExit(f"job {label} failed (exit {proc.returncode})")
        rec = {"label": label, "phase": phase, "storage": storage, "env": env or {}, "ft": ft,
               "exit": proc.returncode, "job_wall_s": wall, "result": res}
        self.jobs.append(rec)
        print(f"[{label}] exit {proc.returncode}, job {wall:.1f} s", flush=True)
        return rec

    def run(self) -> dict:
        a = self.args
        shm = tempfile.mkdtemp(prefix="hm-durable-bench-", dir="/dev/shm")
        disk = tempfile.mkdtemp(prefix="hm-durable-bench-", dir=a.disk_dir)
        tp = ["--tasks", str(a.tasks), "--rounds", str(a.rounds)]
        no_sync = {"HOPLITE_MPI_STORAGE_SYNC": "0"}
        try:
            if "throughput" in a.parts:
                self.job("nostorage", "throughput", None, tp)
                self.job("tmpfs", "throughput", os.path.join(shm, "tp"), tp)
                self.job("tmpfs-restore", "restore", os.path.join(shm, "tp"), tp)
                self.job("tmpfs-nosync", "throughput", os.path.join(shm, "tp-ns"), tp, no_sync)
                self.job("disk", "throughput", os.path.join(disk, "tp"), tp)
                self.job("disk-restore", "restore", os.path.join(disk, "tp"), tp)
                self.job("disk-nosync", "throughput", os.path.join(disk, "tp-ns"), tp, no_sync)
            if "bandwidth" in a.parts:
                bw = ["--sizes", ",".join(map(str, a.sizes)), "--repeat", str(a.repeat)]
                self.job("bw-tmpfs", "bandwidth", os.path.join(shm, "bw"), bw)
                self.job("bw-disk", "bandwidth", os.path.join(disk, "bw"), bw)
                self.job("bw-disk-nosync", "bandwidth", os.path.join(disk, "bw-ns"), bw, no_sync)
            iters = a.iters
            if ("recovery" in a.parts or "dag-ab" in a.parts) and not iters:
                iters = calibrate(a.work_ms, a.result_kib)
                print(f"\nrecovery kernel: {iters} iterations for ~{a.work_ms} ms "
                      f"({a.result_kib} KiB), calibrated here", flush=True)
            rp = ["--tasks", str(a.rec_tasks), "--width", str(a.width), "--iters", str(iters),
                  "--result-kib", str(a.result_kib)]
            if "dag-ab" in a.parts:
                for where, root in (("tmpfs", shm), ("disk", disk)):
                    if where in a.rec_fs:
                        self.job(f"dag-ab-{where}", "dag-ab", os.path.join(root, "ab"),
                                 rp + ["--rounds", str(a.ab_rounds)])
            if "recovery" in a.parts:
                for rep in range(a.reps):
                    for where, root in (("tmpfs", shm), ("disk", disk)):
                        if where not in a.rec_fs:
                            continue
                        full = os.path.join(root, f"rec-full-{rep}")
                        part = os.path.join(root, f"rec-80-{rep}")
                        self.job(f"rec-{where}-recompute-{rep}", "recovery", None, rp)
                        self.job(f"rec-{where}-full-{rep}", "recovery", full, rp)
                        self.job(f"rec-{where}-rerun100-{rep}", "recovery", full, rp)
                        self.job(f"rec-{where}-first80-{rep}", "recovery", part,
                                 rp + ["--fraction", "0.8"])
                        self.job(f"rec-{where}-rerun80-{rep}", "recovery", part, rp)
                        if a.kill:
                            killed = os.path.join(root, f"rec-kill-{rep}")
                            k = int(a.rec_tasks * 0.8)
                            self.job(f"rec-{where}-killed-{rep}", "recovery", killed, rp,
                                     {"HOPLITE_MPI_KILL": f"0:done:{k}"}, ft=True, expect_ok=False)
                            self.job(f"rec-{where}-rerunkilled-{rep}", "recovery", killed, rp,
                                     ft=True)
        finally:
            if not a.keep:
                shutil.rmtree(shm, ignore_errors=True)
                shutil.rmtree(disk, ignore_errors=True)
        return {"meta": runner_meta(a), "jobs": self.jobs}


def runner_meta(a) -> dict:
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = f.readline().split(":")[1].strip()
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "memory": mem, "host": socket.gethostname(),
            "tmpfs": fs_type("/dev/shm"), "disk": fs_type(a.disk_dir), "commit": _commit(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_end": os.getloadavg(),
            "argv": sys.argv}


def report(doc: dict) -> None:
    """Print the tables (markdown) from the runner's JSON."""
    jobs = {j["label"]: j for j in doc["jobs"]}
    print("\n## Summary\n")
    m = doc["meta"]
    print(f"nproc {m['nproc']}, memory {m['memory']}, tmpfs {m['tmpfs']}, disk {m['disk']}, "
          f"commit {m['commit']}\n")
    if "nostorage" in jobs:
        print("| job | kind | tasks/s results | tasks/s durable | ratio to `none` (same job) | "
              "ratio to `plain` | writer µs/commit | other cores | load avg |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---|")
        for label in ("nostorage", "tmpfs", "tmpfs-restore", "tmpfs-nosync", "disk",
                      "disk-restore", "disk-nosync"):
            j = jobs.get(label)
            if not j:
                continue
            r = j["result"]
            s = r["summary"]
            mach = r["machine"]
            for kind in r["kinds"]:
                res = s[kind]["results_per_s"]
                dur = s[kind].get("durable_per_s")
                key = "results" if kind != "ckpt" else "durable"
                rn = s.get(f"{kind}_{key}_over_none")
                rp = s.get(f"{kind}_{key}_over_plain")
                wus = s[kind].get("writer_us_per_commit")

                def rng(xs, f="{:.0f}"):
                    return f"{f.format(med(xs))} ({f.format(min(xs))}-{f.format(max(xs))})" if xs else ""
                print(f"| {label} | {kind} | {rng(res)} | {rng(dur)} | {rng(rn, '{:.2f}')} | "
                      f"{rng(rp, '{:.2f}')} | {rng(wus)} | {mach['other_cores']} | "
                      f"{mach['loadavg_start'][0]}-{mach['loadavg_end'][0]} |")
            if r.get("key_us_per_task"):
                print(f"| {label} | (key: µs per task on the driver) | "
                      f"{r['key_us_per_task']:.1f} µs | | | | | | |")
    tp = [lab for lab in ("nostorage", "tmpfs", "tmpfs-restore", "tmpfs-nosync", "disk",
                          "disk-restore", "disk-nosync") if lab in jobs]
    if tp:
        roles = ("driver/MainThread", "driver/hoplite-engine", "workers/hoplite-engine",
                 "workers/hoplite-task", "workers/hoplite-persist")
        print("\nCPU µs per task by thread (median over the rounds; up to every commit confirmed)\n")
        print("| job | kind | total | " + " | ".join(roles) + " | other threads |")
        print("|---|---|---:|" + "---:|" * (len(roles) + 1))
        for label in tp:
            r = jobs[label]["result"]
            for kind in r["kinds"]:
                c = r["summary"][kind]["cpu_us_per_task"]
                total = r["summary"][kind]["cpu_us_per_task_total"]
                rest = sum(v for k, v in c.items() if k not in roles)
                print(f"| {label} | {kind} | {total:.0f} | "
                      + " | ".join(f"{c.get(k, 0.0):.0f}" for k in roles) + f" | {rest:.0f} |")
    bw = [(lab, jobs[lab]) for lab in ("bw-tmpfs", "bw-disk", "bw-disk-nosync") if lab in jobs]
    if bw:
        print("\n| storage | sync | MiB | commit MiB/s | dd MiB/s | commit / dd | persister MiB/s | "
              "write only MiB/s | crc32 MiB/s |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for lab, j in bw:
            r = j["result"]
            for size, x in r["sizes"].items():
                def rng(xs, f="{:.0f}"):
                    return f"{f.format(med(xs))} ({f.format(min(xs))}-{f.format(max(xs))})"
                print(f"| {lab} {x['fs']} | {r['sync']} | {size} | {rng(x['commit_mib_s'])} | "
                      f"{rng(x['dd_mib_s'])} | {rng(x['ratio'], '{:.2f}')} | "
                      f"{rng(x['persister_mib_s'])} | {rng(x.get('write_mib_s') or [0])} | "
                      f"{rng(x.get('crc32_mib_s') or [0])} |")
    ab = [j for j in doc["jobs"] if j["phase"] == "dag-ab"]
    if ab:
        roles = ("driver/MainThread", "driver/hoplite-engine", "workers/hoplite-engine",
                 "workers/hoplite-task", "workers/hoplite-persist")
        print("\n| job | kind | s per DAG, median (min-max) | ratio to `none` | ratio to `plain` | "
              "CPU ms/task total | " + " | ".join(roles) + " |")
        print("|---|---|---:|---:|---:|---:|" + "---:|" * len(roles))
        for j in ab:
            r = j["result"]
            s = r["summary"]
            for kind in r["kinds"]:
                key = "durable" if kind == "ckpt" else "results"
                xs = s[kind][f"{key}_s"]
                rn, rp = s.get(f"{kind}_{key}_over_none"), s.get(f"{kind}_{key}_over_plain")

                def rng(v, f="{:.2f}"):
                    return f"{f.format(med(v))} ({f.format(min(v))}-{f.format(max(v))})" if v else ""
                c = s[kind]["cpu_ms_per_task"]
                print(f"| {j['label']} | {kind} | {rng(xs)} | {rng(rn)} | {rng(rp)} | "
                      f"{s[kind]['cpu_ms_per_task_total']:.2f} | "
                      + " | ".join(f"{c.get(k, 0.0):.2f}" for k in roles) + " |")
    rec = [j for j in doc["jobs"] if j["phase"] == "recovery"]
    if rec:
        print("\n| job | tasks run | restored | executed | results s | durable s | "
              "from before attach s | job wall s | other cores |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for j in rec:
            r = j["result"]
            if r is None:
                print(f"| {j['label']} | (killed: exit {j['exit']}) | | | | | | {j['job_wall_s']:.1f} | |")
                continue
            print(f"| {j['label']} | {r['tasks']}/{r['of']} | {r.get('restored', '')} | "
                  f"{r.get('executed', r['tasks'])} | {r['results_s']:.2f} | "
                  f"{r['durable_s']:.2f} | " if "durable_s" in r else
                  f"| {j['label']} | {r['tasks']}/{r['of']} | | {r['tasks']} | {r['results_s']:.2f} | | ",
                  end="")
            print(f"{r['results_from_start_s']:.2f} | {j['job_wall_s']:.1f} | "
                  f"{r['machine']['other_cores']} |")
        groups: dict = {}
        for j in rec:
            if j["result"] is None:
                continue
            name = re.sub(r"-\d+$", "", j["label"])
            groups.setdefault(name, []).append(j)
        print("\n| step | results s, median (min-max) | job wall s, median | vs recompute (same rep) |")
        print("|---|---:|---:|---:|")
        reps = {}
        for j in rec:
            if j["result"] is not None:
                reps[j["label"]] = j
        for name, js in groups.items():
            xs = [j["result"]["results_s"] for j in js]
            ratios = []
            for j in js:
                where, rep = j["label"].split("-")[1], j["label"].rsplit("-", 1)[1]
                base = reps.get(f"rec-{where}-recompute-{rep}")
                if base:
                    ratios.append(j["result"]["results_s"] / base["result"]["results_s"])
            print(f"| {name} | {med(xs):.2f} ({min(xs):.2f}-{max(xs):.2f}) | "
                  f"{med([j['job_wall_s'] for j in js]):.1f} | "
                  f"{med(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", choices=("throughput", "restore", "bandwidth", "recovery", "dag-ab"))
    p.add_argument("--storage", help="durable storage directory (none: storage never attached)")
    p.add_argument("--tasks", type=int, default=2000, help="no-op tasks per burst / DAG tasks")
    p.add_argument("--rounds", type=int, default=5, help="throughput rounds (all kinds in each)")
    p.add_argument("--sizes", default="1,16,64", help="bandwidth sizes in MiB")
    p.add_argument("--repeat", type=int, default=5, help="bandwidth pairs per size")
    p.add_argument("--width", type=int, default=6, help="recovery DAG width")
    p.add_argument("--iters", type=int, default=0, help="recovery kernel iterations per task")
    p.add_argument("--result-kib", type=int, default=256)
    p.add_argument("--fraction", type=float, default=1.0)
    p.add_argument("--kinds", help="throughput/restore: only these kinds (e.g. for a profile)")
    p.add_argument("--json", metavar="PATH")
    # runner
    p.add_argument("--runner", action="store_true", help="run every job (plain python, no MPI)")
    p.add_argument("--report", metavar="JSON", help="print the tables of a runner's JSON")
    p.add_argument("--parts", default="throughput,bandwidth,dag-ab,recovery")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--disk-dir", default="/var/tmp")
    p.add_argument("--rec-tasks", type=int, default=300)
    p.add_argument("--rec-fs", default="tmpfs,disk")
    p.add_argument("--work-ms", type=float, default=20.0)
    p.add_argument("--reps", type=int, default=3, help="recovery repetitions")
    p.add_argument("--ab-rounds", type=int, default=4, help="dag-ab rounds")
    p.add_argument("--kill", action="store_true",
                   help="recovery: also kill the driver at 80 %% of the TaskDones (ULFM)")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    p.add_argument("--keep", action="store_true", help="keep the storage directories")
    p.add_argument("--job-timeout", type=float, default=3600)
    args = p.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.parts = args.parts.split(",")
    args.rec_fs = args.rec_fs.split(",")
    if args.report:
        with open(args.report) as f:
            report(json.load(f))
        return 0
    if args.runner:
        if args.quick:
            args.tasks, args.rounds, args.sizes, args.repeat = 300, 2, [1, 4], 2
            args.rec_tasks, args.reps = 36, 1
        doc = Runner(args).run()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=1)
            print(f"\nwrote {args.json}")
        report(doc)
        return 0
    if not args.phase:
        p.error("--phase is needed (or --runner)")
    return job_main(args)


if __name__ == "__main__":
    sys.exit(main())
