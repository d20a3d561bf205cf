"""Asynchronous SGD with hoplite_mpi (Hoplite's subset reduce) against synchronous MPI_Allreduce SGD.

    hoplite-mpi run -n 4 -m hoplite_mpi.examples.async_sgd [--straggler 3] [--json PATH]
    mpirun -n 4 python -m hoplite_mpi.examples.async_sgd [...]        # plain SPMD launch
    hoplite-mpi run -n 4 -m hoplite_mpi.examples.async_sgd --quick     # small, ~20 s

Both runs train the same numpy MLP (64 -> ``--hidden`` ReLU -> 10, softmax cross-entropy; all
parameters in ONE flat float32 vector, the layers are views of it; ``--hidden 56000`` gives 4.2 M
parameters, 16.8 MB per gradient) on scikit-learn's bundled digits (80/20 stratified split with
``--seed``, features standardised with the training statistics).  Ranks 1..N-1 are the *workers*;
worker i owns the training shard ``X[i::N-1]`` and draws minibatches of ``--batch`` samples from it.
Learning-rate rule (both runs): ``w -= lr * mean(gradients applied in this step)``.

1. **MPI sync** (the baseline): the N-1 worker ranks, and only they, run data-parallel SGD on a
   communicator of their own (``COMM_WORLD.Create_group``): every step each computes a gradient,
   ``comm.Allreduce`` (buffer API, SUM) adds them, every rank applies the mean.  Rank 0 computes no
   gradient in either run, so both runs have N-1 gradient-computing ranks; in the baseline it waits
   without spinning (it would otherwise take a core from the workers).  With ``--mpi-wait poll``
   (default) each worker first waits for the slowest one in an ``Ibarrier`` polled with 0.5 ms
   sleeps and then calls ``Allreduce``, so that on oversubscribed cores a rank that is done does
   not spin inside ``Allreduce`` while the others still compute (hoplite's ranks back off too);
   ``--mpi-wait spin`` calls ``Allreduce`` at once.  Under ``hoplite-mpi run``
   (the runtime is already up when this module runs) the baseline runs inside one task pinned to
   each worker rank; under plain ``mpirun`` it runs SPMD before the runtime starts
   (``hm.Executor(comm=COMM_WORLD)``), as in ``benchmarks/collectives.py``.
2. **hoplite async** (the asynchronous SGD of the Hoplite paper): each worker has one outstanding gradient
   task pinned to its rank, given the weights ref current when it was submitted.  Each step the
   driver calls ``hm.reduce(outstanding, num=k)`` (default ``k = max(1, (N-1)//2)``), gets the sum,
   asks ``hm.reduced_inputs`` which gradients went in, applies ``lr * sum / k``, ``hm.put``s the new
   weights and resubmits tasks only for the ranks whose gradients were used, with the new weights
   ref as their argument; then it issues the next step's reduce at once, and only after that
   frees what is no longer needed and takes snapshots.  The other gradients stay outstanding and
   are applied in a later step (stale).  The weights reach a resubmitted worker by its task's own
   fetch of its argument (``--weights pull``, the default), while the driver goes on; with
   ``--weights broadcast`` the driver first ``hm.broadcast``s them to those ranks and waits for
   the copies, as before (the same bytes move either way: one rank-0 -> worker copy per used
   gradient; busy workers get nothing, they compute on older weights).  A gradient of at most
   ``--grad-inline`` bytes (default 1 MiB: ``--quick``'s 0.33 MB, not the default model's 16.8 MB)
   is returned in-band with its task's completion report (task option ``inline_threshold``), so
   the reduce combines it on rank 0 (``Config.small_collectives``) without a tree or a transfer;
   a larger one stays on its worker and goes through the reduce tree.
   Gradients, reduce results and weights no task needs any more are freed with ``hm.delete``.

``--straggler F``: the last worker rank sleeps ``(F-1) x`` its measured gradient time after each
gradient, in both runs.

Stopping rule: each run trains for ``--seconds`` of wall time (checked after every update) or
``--steps`` updates, whichever comes first.  The clock starts after a warm-up (data loaded, one
untimed gradient per worker).  Every ``--eval-every`` seconds the rank that holds the weights keeps
a copy (a snapshot); held-out accuracy is computed for the snapshots *after* the run, off the clock,
so evaluation costs neither run anything.  Figures per run:

- samples/s: samples whose gradients were applied to the weights / training wall time;
- time to target: time of the first snapshot with held-out accuracy >= ``--target``;
- final held-out accuracy (of the weights after the last update).

Exit status 0 when both runs end with held-out accuracy >= ``--target``, 1 otherwise.  numpy is
limited to one BLAS thread per rank (threadpoolctl, and OMP/OPENBLAS/MKL_NUM_THREADS=1 for
processes that import numpy later), because the ranks share the cores.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")   # only effective if numpy is not imported yet

import argparse
import dataclasses
import functools
import json
import socket
import sys
import time
from typing import Optional

import numpy as np

try:   # numpy may already be loaded (hoplite_mpi imports it): limit the live BLAS pools too
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=1)
except ImportError:   # pragma: no cover - threadpoolctl comes with scikit-learn
    pass

import hoplite_mpi as hm

D_IN, CLASSES = 64, 10
GROUP_TAG = 7301    # Create_group tag of the baseline's worker communicator
RESULT_TAG = 7302  # SPMD mode: baseline result, worker rank 1 -> rank 0
WARMUP = 1 << 30   # minibatch counter of the untimed warm-up gradient


# --- the model ---------------------------------------------------------------------------------

class MLP:
    """64 -> hidden (ReLU) -> 10, softmax cross-entropy.  Parameters live in one flat float32
    vector ``w`` (``W1`` (64 x H), ``b1``, ``W2`` (H x 10), ``b2``); :meth:`views` gives the layers
    as views of it, so a gradient is one array too."""

    def __init__(self, hidden: int, d_in: int = D_IN, classes: int = CLASSES) -> None:
        self.d_in, self.hidden, self.classes = d_in, hidden, classes
        self.size = d_in * hidden + hidden + hidden * classes + classes

    def views(self, w: np.ndarray):
        d, h, c = self.d_in, self.hidden, self.classes
        o1 = d * h
        o2 = o1 + h
        o3 = o2 + h * c
        return w[:o1].reshape(d, h), w[o1:o2], w[o2:o3].reshape(h, c), w[o3:o3 + c]

    def init(self, seed: int) -> np.ndarray:
        """He-initialised first layer, 1/sqrt(H) second layer, zero biases."""
        rng = np.random.default_rng(seed)
        w = np.zeros(self.size, np.float32)
        W1, _, W2, _ = self.views(w)
        W1[:] = rng.standard_normal(W1.shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / self.d_in))
        W2[:] = rng.standard_normal(W2.shape, dtype=np.float32) * np.float32(np.sqrt(1.0 / self.hidden))
        return w

    def _forward(self, w: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(hidden activations ``z``, logits) for the batch ``X``."""
        W1, b1, W2, b2 = self.views(w)
        z = X @ W1
        z += b1
        np.maximum(z, 0, out=z)
        out = z @ W2
        out += b2
        return z, out

    def logits(self, w: np.ndarray, X: np.ndarray) -> np.ndarray:
        return self._forward(w, X)[1]

    def loss(self, w: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
        return float(_xent(self.logits(w, X).astype(np.float64), y)[0])

    def loss_and_grad(self, w: np.ndarray, X: np.ndarray, y: np.ndarray,
                      out: Optional[np.ndarray] = None) -> tuple[float, np.ndarray]:
        """Mean cross-entropy over the batch and its gradient (a flat vector like ``w``)."""
        g = np.empty(self.size, w.dtype) if out is None else out
        _, _, W2, _ = self.views(w)
        gW1, gb1, gW2, gb2 = self.views(g)
        z, logits = self._forward(w, X)
        loss, p = _xent(logits, y)            # p: d loss / d logits
        np.matmul(z.T, p, out=gW2)
        gb2[:] = p.sum(0)
        dz = p @ W2.T
        dz *= z > 0
        np.matmul(X.T, dz, out=gW1)
        gb1[:] = dz.sum(0)
        return loss, g

    def accuracy(self, w: np.ndarray, X: np.ndarray, y: np.ndarray, rows: int = 512) -> float:
        hits = 0
        for i in range(0, len(y), rows):
            hits += int((self.logits(w, X[i:i + rows]).argmax(1) == y[i:i + rows]).sum())
        return hits / len(y)


def _xent(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean softmax cross-entropy and its gradient with respect to ``logits``."""
    p = logits - logits.max(1, keepdims=True)
    np.exp(p, out=p)
    p /= p.sum(1, keepdims=True)
    rows = np.arange(len(y))
    loss = float(-np.log(np.maximum(p[rows, y], 1e-30)).mean())
    p[rows, y] -= 1
    p /= len(y)
    return loss, p


# --- data and configuration ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Config:
    hidden: int = 56000
    batch: int = 256
    lr: float = 0.03
    seconds: float = 20.0
    steps: int = 0               # 0: no step limit
    k: int = 0                   # 0: max(1, workers // 2)
    straggler: float = 1.0
    target: float = 0.9
    eval_every: float = 0.5
    seed: int = 0
    timeout: float = 300.0       # for each blocking hoplite call
    mpi_wait: str = "poll"       # baseline: "poll" (non-spinning barrier first) or "spin"
    weights: str = "pull"        # hoplite: "pull" (each task fetches its weights) or "broadcast"
    grad_inline: int = 1 << 20   # hoplite: gradients of at most this many bytes come in-band
    storage: str = ""            # hoplite: durable storage; resume from the latest weights there
    checkpoint_every: int = 10   # hoplite, with storage: steps between checkpoints of the weights

    def num(self, workers: int) -> int:
        return self.k or max(1, workers // 2)


@functools.lru_cache(maxsize=4)
def load_data(seed: int):
    """(X_train, y_train, X_test, y_test): digits, 80/20 stratified split, standardised, float32."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(Xtr)
    return (scaler.transform(Xtr).astype(np.float32), ytr.astype(np.int64),
            scaler.transform(Xte).astype(np.float32), yte.astype(np.int64))


@functools.lru_cache(maxsize=4)
def shard(seed: int, wid: int, workers: int):
    Xtr, ytr, _, _ = load_data(seed)
    return np.ascontiguousarray(Xtr[wid::workers]), ytr[wid::workers]


@functools.lru_cache(maxsize=4)
def model_of(hidden: int) -> MLP:
    return MLP(hidden)


def minibatch(cfg: Config, wid: int, workers: int, count: int):
    """Worker ``wid``'s ``count``-th minibatch (the same sequence in both runs)."""
    X, y = shard(cfg.seed, wid, workers)
    rng = np.random.default_rng([cfg.seed, wid, count])
    idx = rng.choice(len(y), cfg.batch, replace=cfg.batch > len(y))
    return X[idx], y[idx]


def worker_gradient(w: np.ndarray, cfg: Config, wid: int, workers: int, count: int,
                    out: Optional[np.ndarray] = None):
    """Gradient of worker ``wid``'s ``count``-th minibatch; the straggler (the last worker) then
    sleeps ``(straggler - 1) x`` the measured compute time.  Returns (gradient, loss, compute s,
    sleep s)."""
    X, y = minibatch(cfg, wid, workers, count)
    t0 = time.perf_counter()
    loss, g = model_of(cfg.hidden).loss_and_grad(w, X, y, out)
    dt = time.perf_counter() - t0
    slept = 0.0
    if wid == workers - 1 and cfg.straggler > 1:
        slept = (cfg.straggler - 1) * dt
        time.sleep(slept)
    return g, loss, dt, slept


class Snapshots:
    """Weights copies every ``every`` seconds of training; evaluated after the run (off the clock)."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.items: list[tuple[float, int, int, np.ndarray]] = []   # (t, step, samples, w)
        self.next_t = 0.0

    def maybe(self, t: float, step: int, samples: int, w: np.ndarray, force: bool = False) -> None:
        if force or t >= self.next_t:
            self.items.append((t, step, samples, w.copy()))
            self.next_t = t + self.every

    def evaluate(self, cfg: Config) -> dict:
        """Held-out accuracy of every snapshot; time/samples/step at which ``cfg.target`` was hit."""
        _, _, Xte, yte = load_data(cfg.seed)
        model = model_of(cfg.hidden)
        curve = [(round(t, 3), step, samples, model.accuracy(w, Xte, yte))
                 for t, step, samples, w in self.items]
        self.items.clear()
        hit = next((c for c in curve if c[3] >= cfg.target), None)
        return {"curve": [{"t_s": t, "step": s, "samples": n, "accuracy": a} for t, s, n, a in curve],
                "final_accuracy": curve[-1][3],
                "time_to_target_s": hit[0] if hit else None,
                "samples_to_target": hit[2] if hit else None,
                "steps_to_target": hit[1] if hit else None}


class MachineLoad:
    """CPU use during a run (Linux /proc; None elsewhere): all cores busy, this job's ranks
    (``pids``, all on this host), and the rest (other programs sharing the cores)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids

    @staticmethod
    def _busy():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        return (sum(v) - v[3] - (v[4] if len(v) > 4 else 0)) / os.sysconf("SC_CLK_TCK")

    def _job(self):
        total = 0.0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                return None
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def start(self) -> None:
        self.t0, self.busy0, self.job0, self.load0 = time.monotonic(), self._busy(), self._job(), os.getloadavg()[0]

    def stop(self) -> dict:
        dt = time.monotonic() - self.t0
        busy, job = self._busy(), self._job()
        out = {"load1_before": self.load0, "load1_after": os.getloadavg()[0],
               "machine_busy_cores": None, "job_cores": None, "other_cores": None}
        if busy is not None and self.busy0 is not None and dt > 0:
            out["machine_busy_cores"] = round((busy - self.busy0) / dt, 2)
        if job is not None and self.job0 is not None and dt > 0:
            out["job_cores"] = round((job - self.job0) / dt, 2)
            if out["machine_busy_cores"] is not None:
                out["other_cores"] = round(max(0.0, out["machine_busy_cores"] - out["job_cores"]), 2)
        out["peak_rss_mib"] = [self._peak_mib(pid) for pid in self.pids]
        return out

    @staticmethod
    def _peak_mib(pid: int) -> Optional[int]:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) // 1024
        except OSError:
            pass
        return None


# --- 1. MPI sync baseline (worker ranks only) -----------------------------------------------

def mpi_sync_train(wcomm, cfg: Config, pids: list[int]) -> Optional[dict]:
    """Synchronous data-parallel SGD on ``wcomm`` (the worker ranks; ``wcomm`` rank i is worker i).

    Every step: own gradient, ``Allreduce`` (SUM), ``w -= lr * sum / workers``.  Rank 0 of
    ``wcomm`` keeps the clock, the snapshots and decides when to stop (a 1-int ``Bcast`` per step).
    Returns the run's figures on ``wcomm`` rank 0, None on the others.
    """
    from mpi4py import MPI

    wid, workers = wcomm.Get_rank(), wcomm.Get_size()
    model = model_of(cfg.hidden)
    w = model.init(cfg.seed)
    g = np.empty_like(w)
    gsum = np.empty_like(w)
    flag = np.zeros(1, np.int32)
    worker_gradient(w, cfg, wid, workers, WARMUP, g)     # warm-up (data, caches), untimed
    lead = wid == 0
    snaps = Snapshots(cfg.eval_every)
    compute = sleep = comm_s = 0.0
    wcomm.Barrier()
    load = MachineLoad(pids)
    load.start()
    t0 = time.perf_counter()
    if lead:
        snaps.maybe(0.0, 0, 0, w)
    step = 0
    while True:
        _, _, dt, slept = worker_gradient(w, cfg, wid, workers, step, g)
        compute += dt
        sleep += slept
        t1 = time.perf_counter()
        if cfg.mpi_wait == "poll":    # wait for the slowest rank without spinning, then add
            poll_sleep(wcomm.Ibarrier().Test, 0.0005)
        wcomm.Allreduce(g, gsum, op=MPI.SUM)
        comm_s += time.perf_counter() - t1
        w -= np.float32(cfg.lr / workers) * gsum
        step += 1
        if lead:
            t = time.perf_counter() - t0
            flag[0] = t >= cfg.seconds or (cfg.steps and step >= cfg.steps)
            snaps.maybe(t, step, step * workers * cfg.batch, w, force=bool(flag[0]))
        wcomm.Bcast(flag, root=0)
        if flag[0]:
            break
    wall = time.perf_counter() - t0
    machine = load.stop()
    stats = wcomm.gather((compute, sleep, comm_s), root=0)
    if not lead:
        return None
    samples = step * workers * cfg.batch
    out = {"steps": step, "samples": samples, "wall_s": wall, "samples_per_s": samples / wall,
           "gradients_per_worker": [step] * workers,
           "compute_s_per_worker": [c for c, _, _ in stats], "sleep_s_per_worker": [s for _, s, _ in stats],
           "wait_allreduce_s_per_worker": [a for _, _, a in stats], "machine": machine}
    out.update(snaps.evaluate(cfg))
    return out


def worker_group_comm(world, ranks: list[int]):
    """A communicator of ``ranks`` of ``world`` (collective over ``ranks`` only)."""
    return world.Create_group(world.Get_group().Incl(ranks), tag=GROUP_TAG)


def mpi_sync_task(cfg: Config, ranks: list[int], pids: list[int]) -> Optional[dict]:
    """Hosted mode: the baseline inside a task pinned to each worker rank (on COMM_WORLD, not the
    runtime's private communicator)."""
    from mpi4py import MPI

    wcomm = worker_group_comm(MPI.COMM_WORLD, ranks)
    try:
        return mpi_sync_train(wcomm, cfg, pids)
    finally:
        wcomm.Free()


def poll_sleep(test, interval: float = 0.01) -> None:
    """Wait for ``test()`` to be true without spinning in MPI (the ranks share the cores)."""
    while not test():
        time.sleep(interval)


def mpi_sync_spmd(world, cfg: Config) -> Optional[dict]:
    """SPMD mode (plain mpirun, no runtime yet): ranks 1..N-1 train, rank 0 waits (not spinning).
    Returns the figures on rank 0."""
    rank, size = world.Get_rank(), world.Get_size()
    pids = world.allgather(os.getpid())
    if rank == 0:
        poll_sleep(lambda: world.Iprobe(source=1, tag=RESULT_TAG))
        res = world.recv(source=1, tag=RESULT_TAG)
    else:
        wcomm = worker_group_comm(world, list(range(1, size)))
        res = mpi_sync_train(wcomm, cfg, pids)
        wcomm.Free()
        if rank == 1:
            world.send(res, dest=0, tag=RESULT_TAG)
    req = world.Ibarrier()
    poll_sleep(req.Test)
    return res if rank == 0 else None


# --- 2. hoplite async ---------------------------------------------------------------------------

def _gradient_task(w: np.ndarray, cfg: Config, wid: int, workers: int, count: int):
    g, loss, dt, slept = worker_gradient(w, cfg, wid, workers, count)
    return g, (loss, dt, slept)


gradient_task = hm.remote(num_returns=2)(_gradient_task)
sync_task = hm.remote(mpi_sync_task)


def _warm(cfg: Config, wid: int, workers: int) -> int:
    model = model_of(cfg.hidden)
    worker_gradient(model.init(cfg.seed), cfg, wid, workers, WARMUP)
    return hm.rank()


warm_task = hm.remote(_warm)


def _keep(w: np.ndarray) -> np.ndarray:
    """A checkpoint of the weights: the identity, run on a worker, whose result its persister
    commits to storage (a named step: ``sgd/<model>/w/<step>``)."""
    return w


keep_task = hm.remote(_keep)


def _prefix(cfg: Config) -> str:
    """Checkpoint names of this model (size and seed: another model never resumes from them)."""
    return f"sgd/h{cfg.hidden}-s{cfg.seed}/w/"


def resume(cfg: Config) -> tuple[int, Optional[np.ndarray]]:
    """(``--storage``) The latest checkpointed weights of this model and their step, else (0,
    None)."""
    hm.init(storage=cfg.storage)          # (attaches the storage to the running runtime)
    steps = [int(name.rsplit("/", 1)[1]) for name in hm.checkpoints(_prefix(cfg))]
    if not steps:
        return 0, None
    step = max(steps)
    w = np.array(hm.get(hm.lookup(f"{_prefix(cfg)}{step}"), timeout=cfg.timeout))  # (writable)
    print(f"resumed from step {step} (checkpoint {_prefix(cfg)}{step} in {cfg.storage})", flush=True)
    return step, w
pid_task = hm.remote(os.getpid)


def job_pids(timeout: float) -> list[int]:
    """Process ids of every rank (driver first), for :class:`MachineLoad`."""
    return [os.getpid()] + hm.get([pid_task.options(rank=r).remote() for r in range(1, hm.world_size())],
                                  timeout=timeout)


def hoplite_async(cfg: Config, pids: list[int]) -> dict:
    """The driver's loop (see the module docstring).  Returns the run's figures.  ``driver_s``:
    the driver's time per phase of its steps: ``reduce_get`` (waiting for the reduce and getting
    it), ``update``, ``put``, ``broadcast`` (``--weights broadcast`` only), ``submit`` (the new
    tasks and the next reduce), ``bookkeeping`` (deletes, snapshots)."""
    n = hm.world_size()
    ranks = list(range(1, n))
    workers = len(ranks)
    k = cfg.num(workers)
    if not 1 <= k <= workers:
        raise ValueError(f"--k must be in 1..{workers}")
    model = model_of(cfg.hidden)
    w = model.init(cfg.seed)
    step0 = 0
    if cfg.storage:
        step0, stored = resume(cfg)
        if stored is not None:
            w = stored
    hm.get([warm_task.options(rank=r).remote(cfg, i, workers) for i, r in enumerate(ranks)],
           timeout=cfg.timeout)

    wrefs: dict[int, hm.ObjectRef] = {}     # weights version -> ref
    users: dict[int, int] = {}              # weights version -> outstanding tasks using it
    version = 0
    count = [step0] * workers               # gradients submitted per worker (minibatch seeds)
    outstanding: list[tuple] = []           # (grad ref, info ref, worker index, version), oldest first
    infos: list[tuple] = []                 # (worker index, staleness, info ref) of applied gradients

    # a small gradient travels in-band with its task's completion report to rank 0, where the
    # reduce combines such inputs itself (no tree, no transfer); a large one stays on its worker
    # and the reduce tree pulls it (the task option inline_threshold; the gradient's pickle is a
    # few hundred bytes larger than its data)
    nbytes = model.size * np.dtype(np.float32).itemsize
    grad_opts = {"inline_threshold": nbytes + 4096} if nbytes <= cfg.grad_inline else {}

    def submit(i: int) -> None:
        g, info = gradient_task.options(rank=ranks[i], name=f"grad-w{i}", **grad_opts).remote(
            wrefs[version], cfg, i, workers, count[i])
        count[i] += 1
        users[version] = users.get(version, 0) + 1
        outstanding.append((g, info, i, version))

    def release(v: int) -> None:
        users[v] -= 1
        if users[v] == 0 and v != version:
            hm.delete(wrefs.pop(v))
            del users[v]

    snaps = Snapshots(cfg.eval_every)
    load = MachineLoad(pids)
    load.start()
    t0 = time.perf_counter()
    wrefs[version] = hm.put(w)
    if cfg.weights == "broadcast":
        hm.broadcast(wrefs[version], ranks=ranks, timeout=cfg.timeout)
    for i in range(workers):
        submit(i)
    snaps.maybe(0.0, step0, 0, w)
    step, samples = step0, 0
    scale = np.float32(cfg.lr / k)
    phases = dict.fromkeys(("reduce_get", "update", "put", "broadcast", "submit", "bookkeeping"), 0.0)
    tick = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        phases[name] += now - tick
        tick = now

    red = hm.reduce([o[0] for o in outstanding], num=k)
    while True:
        total = hm.get(red, timeout=cfg.timeout)
        used = {r.id for r in hm.reduced_inputs(red, timeout=cfg.timeout)}
        lap("reduce_get")
        w -= scale * total
        del total
        consumed = [o for o in outstanding if o[0].id in used]
        outstanding = [o for o in outstanding if o[0].id not in used]
        step += 1
        samples += k * cfg.batch
        for _, info, i, v in consumed:
            infos.append((i, version - v, info))   # staleness: updates since its weights
        lap("update")
        version += 1
        wrefs[version] = hm.put(w)
        users[version] = 0
        t = time.perf_counter() - t0
        stop = t >= cfg.seconds or bool(cfg.steps and step >= cfg.steps)
        if cfg.storage and step % cfg.checkpoint_every == 0:
            # committed by the worker that runs it, off the driver's path; the ref is dropped
            keep_task.options(name=f"{_prefix(cfg)}{step}", checkpoint=True).remote(wrefs[version])
        lap("put")
        if not stop:
            # the critical path first: new tasks for the workers whose gradients went in, then
            # the next reduce; the bookkeeping below overlaps with them
            if cfg.weights == "broadcast":
                hm.broadcast(wrefs[version], ranks=sorted({ranks[o[2]] for o in consumed}),
                             timeout=cfg.timeout)
                lap("broadcast")
            for o in consumed:
                submit(o[2])
            red_next = hm.reduce([o[0] for o in outstanding], num=k)
            lap("submit")
        hm.delete([red] + [o[0] for o in consumed])
        for o in consumed:
            release(o[3])
        if users.get(version - 1) == 0:       # the previous version has no task left
            hm.delete(wrefs.pop(version - 1))
            del users[version - 1]
        snaps.maybe(t, step, samples, w, force=stop)
        lap("bookkeeping")
        if stop:
            break
        red = red_next
    wall = time.perf_counter() - t0
    machine = load.stop()

    # the gradients still in flight are not applied; wait for them (off the clock) and free all
    ready, pending = hm.wait([o[0] for o in outstanding], num_returns=len(outstanding), timeout=cfg.timeout)
    if pending:
        raise TimeoutError(f"{len(pending)} gradient tasks did not finish within {cfg.timeout} s")
    hm.delete([o[0] for o in outstanding] + [o[1] for o in outstanding] + list(wrefs.values()))
    details = hm.get([x[2] for x in infos], timeout=cfg.timeout)
    hm.delete([x[2] for x in infos])
    per_worker = [0] * workers
    compute = [0.0] * workers
    slept = [0.0] * workers
    stale = [s for _, s, _ in infos]
    for (i, _, _), (_, dt, sl) in zip(infos, details):
        per_worker[i] += 1
        compute[i] += dt
        slept[i] += sl
    out = {"steps": step, "resumed_from": step0, "samples": samples, "wall_s": wall,
           "samples_per_s": samples / wall, "k": k,
           "gradients_per_worker": per_worker, "compute_s_per_worker": compute,
           "sleep_s_per_worker": slept,
           "driver_s": phases,
           "staleness_mean": float(np.mean(stale)) if stale else None,
           "staleness_max": int(max(stale)) if stale else None,
           "machine": machine}
    out.update(snaps.evaluate(cfg))
    return out


# --- driver --------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Config()
    p.add_argument("--hidden", type=int, default=None, help=f"hidden units (default {d.hidden}: "
                   f"{MLP(d.hidden).size / 1e6:.1f} M parameters; --quick: 1024)")
    p.add_argument("--batch", type=int, default=None, help=f"minibatch per gradient (default {d.batch}; --quick: 64)")
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate (w -= lr * mean gradient)")
    p.add_argument("--seconds", type=float, default=None,
                   help=f"training wall time per run (default {d.seconds}; --quick: 4)")
    p.add_argument("--steps", type=int, default=0, help="also stop after this many updates (0: no limit)")
    p.add_argument("--k", type=int, default=0, help="gradients per async step (default max(1, workers // 2))")
    p.add_argument("--straggler", type=float, default=1.0, metavar="FACTOR",
                   help="the last worker computes FACTOR times slower (both runs)")
    p.add_argument("--target", type=float, default=None, help="held-out accuracy target (default 0.9)")
    p.add_argument("--eval-every", type=float, default=None,
                   help="seconds between weight snapshots (default 0.5; --quick: 0.25)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--mpi-wait", choices=("poll", "spin"), default=d.mpi_wait,
                   help="baseline: 'poll' waits for the slowest rank in an Ibarrier polled with "
                        "0.5 ms sleeps before each Allreduce (default; ranks share the cores, and "
                        "a rank spinning in Allreduce slows the ones still computing), 'spin' calls "
                        "Allreduce at once")
    p.add_argument("--weights", choices=("pull", "broadcast"), default=d.weights,
                   help="hoplite: how new weights reach the workers whose gradients were used: "
                        "'pull' (default): the resubmitted task's weights ref is its argument and "
                        "the worker fetches it when the task arrives, while the driver goes on; "
                        "'broadcast': hm.broadcast to those ranks first (the driver waits for the copies)")
    p.add_argument("--grad-inline", type=int, default=d.grad_inline, metavar="BYTES",
                   help="hoplite: a gradient of at most BYTES (default 1 MiB: --quick's 0.33 MB, "
                        "not the default model's 16.8 MB) is returned in-band with its task's "
                        "completion (task option inline_threshold) and reduced on rank 0; a larger "
                        "one stays on its worker and goes through the reduce tree; 0: never in-band")
    p.add_argument("--storage", default="", metavar="DIR",
                   help="hoplite run: durable storage (issue 14); the weights are checkpointed "
                        "every --checkpoint-every steps and a later run with the same DIR resumes "
                        "from the latest checkpoint (after the driver was killed, or a drain)")
    p.add_argument("--checkpoint-every", type=int, default=Config.checkpoint_every, metavar="STEPS")
    p.add_argument("--runs", default="mpi,hoplite", help="which runs (mpi, hoplite)")
    p.add_argument("--quick", action="store_true", help="small model, 4 s per run (tests, smoke runs)")
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    p.add_argument("--timeout", type=float, default=d.timeout, help="seconds for any blocking call")
    args = p.parse_args(argv)
    quick = args.quick
    args.hidden = args.hidden or (1024 if quick else d.hidden)
    args.batch = args.batch or (64 if quick else d.batch)
    args.seconds = args.seconds if args.seconds is not None else (4.0 if quick else d.seconds)
    args.eval_every = args.eval_every or (0.25 if quick else d.eval_every)
    args.target = args.target if args.target is not None else d.target
    args.runs = {r.strip() for r in args.runs.split(",") if r.strip()}
    if not args.runs or not args.runs <= {"mpi", "hoplite"}:
        p.error("--runs takes mpi, hoplite or both")
    if args.hidden < 1 or args.batch < 1 or args.seconds <= 0 or args.straggler < 1:
        p.error("need --hidden >= 1, --batch >= 1, --seconds > 0, --straggler >= 1")
    return args


def config_of(args: argparse.Namespace) -> Config:
    return Config(hidden=args.hidden, batch=args.batch, lr=args.lr, seconds=args.seconds,
                  steps=args.steps, k=args.k, straggler=args.straggler, target=args.target,
                  eval_every=args.eval_every, seed=args.seed, timeout=args.timeout,
                  mpi_wait=args.mpi_wait, weights=args.weights, grad_inline=args.grad_inline,
                  storage=args.storage, checkpoint_every=max(1, args.checkpoint_every))


def report(cfg: Config, runs: dict, n: int, mode: str, json_path: Optional[str]) -> int:
    """Print the figures (and write the JSON); returns the exit status."""
    workers = n - 1
    print(f"async_sgd: {n} ranks ({workers} workers), MLP 64-{cfg.hidden}-10 = "
          f"{MLP(cfg.hidden).size / 1e6:.2f} M float32 parameters, batch {cfg.batch}, lr {cfg.lr}, "
          f"straggler x{cfg.straggler:g}, {cfg.seconds:g} s per run, target {cfg.target:.0%} ({mode})")
    names = {"mpi_sync": "MPI sync (Allreduce)", "hoplite_async": f"hoplite async (k={cfg.num(workers)})"}
    print(f"  {'run':<22} {'samples/s':>9} {'steps':>6} {'samples':>8} {'to ' + format(cfg.target, '.0%'):>9} "
          f"{'final acc':>9}  {'gradients/worker':<18} {'other load':>10}")
    for key, r in runs.items():
        ttt = f"{r['time_to_target_s']:.2f} s" if r["time_to_target_s"] is not None else "never"
        other = r["machine"]["other_cores"]
        other = "?" if other is None else f"{other:.2f} cores"
        print(f"  {names[key]:<22} {r['samples_per_s']:9.0f} {r['steps']:6d} {r['samples']:8d} {ttt:>9} "
              f"{r['final_accuracy']:9.3f}  {str(r['gradients_per_worker']):<18} {other:>10}")
    ratio = {}
    if len(runs) == 2:
        a, m = runs["hoplite_async"], runs["mpi_sync"]
        ratio["samples_per_s"] = a["samples_per_s"] / m["samples_per_s"]
        if a["time_to_target_s"] and m["time_to_target_s"]:
            ratio["time_to_target"] = m["time_to_target_s"] / a["time_to_target_s"]
        print(f"  hoplite / MPI: samples/s x{ratio['samples_per_s']:.2f}" +
              (f", time to target x{ratio['time_to_target']:.2f} shorter" if "time_to_target" in ratio else ""))
    ok = all(r["final_accuracy"] >= cfg.target for r in runs.values())
    if not ok:
        print(f"FAILED: a run ended below the {cfg.target:.0%} held-out accuracy target", file=sys.stderr)
    if json_path:
        meta = {"ranks": n, "workers": workers, "cores": os.cpu_count(), "host": socket.gethostname(),
                "launch": mode, "parameters": MLP(cfg.hidden).size, "numpy": np.__version__,
                "hoplite_mpi": hm.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with open(json_path, "w") as f:
            json.dump({"config": dataclasses.asdict(cfg), "meta": meta, "runs": runs, "ratio": ratio,
                       "ok": ok}, f, indent=1)
    return 0 if ok else 1


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    cfg = config_of(args)
    runs: dict = {}
    if hm.is_initialized():
        # hoplite-mpi run / python -m hoplite_mpi: this is rank 0, the runtime is up
        n = hm.world_size()
        if n < 2:
            print("async_sgd needs at least 2 ranks (rank 0 drives, the others compute)", file=sys.stderr)
            return 2
        mode = "hoplite-mpi run: MPI baseline in tasks pinned to the workers"
        ranks = list(range(1, n))
        if "mpi" in args.runs:
            pids = job_pids(cfg.timeout)
            res = hm.get([sync_task.options(rank=r, name="mpi-sync").remote(cfg, ranks, pids) for r in ranks],
                         timeout=cfg.timeout + 4 * cfg.seconds)
            runs["mpi_sync"] = res[0]
        if "hoplite" in args.runs:
            runs["hoplite_async"] = hoplite_async(cfg, job_pids(cfg.timeout))
        return report(cfg, runs, n, mode, args.json)

    from mpi4py import MPI   # plain mpirun: SPMD baseline first, then the runtime

    world = MPI.COMM_WORLD
    n = world.Get_size()
    if n < 2:
        print("async_sgd needs at least 2 ranks (rank 0 drives, the others compute)", file=sys.stderr)
        return 2
    if "mpi" in args.runs:
        res = mpi_sync_spmd(world, cfg)
        if res is not None:
            runs["mpi_sync"] = res
    status = 0
    if "hoplite" in args.runs:
        with hm.Executor(comm=world) as ex:
            if ex is not None:
                runs["hoplite_async"] = hoplite_async(cfg, job_pids(cfg.timeout))
    if world.Get_rank() == 0:
        status = report(cfg, runs, n, "mpirun SPMD: MPI baseline before the runtime starts", args.json)
    return world.bcast(status, root=0)


if __name__ == "__main__":
    # run the importable module's main, so that the task functions pickle by reference
    from hoplite_mpi.examples.async_sgd import main as _main

    sys.exit(_main())
