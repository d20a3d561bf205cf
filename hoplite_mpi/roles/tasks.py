"""The task role of a worker rank: the shell around :class:`~hoplite_mpi.worker.Worker` (which
runs tasks on executor threads).  Results are stored and registered here, on the engine thread,
and reported to the scheduler (``TaskDone``).

Tasks placed ahead (``Config.worker_deps``: a ``None`` input in their RunTask, made by a task
placed here before) wait in :class:`~hoplite_mpi.local_deps.LocalDeps`, off the executor, and
start the moment their last such input is made here: a small result is handed over on the
executor thread that made it, before the engine has even reported it.  If one of those inputs
is an error object the task fails with it without running, as the scheduler fails a waiting
task.  A :class:`~hoplite_mpi.protocol.Revoke` (a cancel) drops a waiting task; tasks waiting
here for its results then fail with CancelledError.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import CancelledError
from typing import Any, Iterable, Optional

from .. import protocol as P
from ..arrays import array_of
from ..durable.persister import Persister
from ..errors import ObjectDeletedError, RuntimeShutdownError
from ..ids import format_id
from ..local_deps import LocalDeps, Waiting
from ..protocol import ObjectInfo
from ..serialization import error_info, frame_sizes, local_error, serialize_error, to_bytes
from ..worker import _context, current_task_id, last_task_seconds

log = logging.getLogger("hoplite_mpi")


class TaskRole:
    """``worker``: the executor; ``deps``: tasks placed ahead waiting here; ``exit_noted``: rank
    0 took note of a task's ``os._exit``."""

    def __init__(self, ctx: Any, make_worker: Any) -> None:
        self.ctx = ctx
        catalog = ctx.catalog
        self.worker = make_worker(ctx.rank, ctx.config.worker_threads, ctx.fetcher.fetch_info,
                                  self.task_finished, lambda oid: catalog.local_frames(oid) is not None)
        self.deps = LocalDeps()
        self.exit_noted = threading.Event()

    def on_run_task(self, source: int, msg: P.RunTask) -> None:
        if None not in msg.deps:
            self.worker.enqueue(msg)
            return
        self.worker.functions.add(msg.blobs)    # (later RunTasks of that function lack them)
        self.ctx.stats["tasks_ahead"] += 1
        entry, ask = self.deps.add(msg)
        for oid in ask:      # (made here long ago, or not yet: whichever answers first)
            self.ctx.lookups.lookup(oid, lambda info, oid=oid: self._looked_up(oid, info))
        if entry is not None:
            self._start((entry,))

    def on_revoke(self, source: int, msg: P.Revoke) -> None:
        """Rank 0 cancels a task placed here: drop it if it has not started (waiting for its
        inputs, or queued for an executor thread); its results become CancelledError for the
        tasks waiting here on them (rank 0 registers them)."""
        entry = self.deps.revoke(msg.task_id)
        run = entry.msg if entry is not None else self.worker.revoke(msg.task_id)
        self.ctx.send(source, P.Revoked(msg.task_id, self.ctx.rank, run is not None))
        if run is not None:
            error = to_bytes(local_error(CancelledError()))
            self._start(self.deps.made(error_info(oid, error) for oid in run.spec.return_ids))

    def _looked_up(self, oid: int, info: Optional[ObjectInfo]) -> None:
        if info is None:      # deleted
            info = error_info(oid, serialize_error(ObjectDeletedError(format_id(oid)), self.ctx.rank))
        self._start(self.deps.made((info,)))

    def _start(self, entries: Iterable[Waiting]) -> None:
        """(any thread) Start tasks whose inputs are all here; one with an error input fails
        with it, unrun (reported by the engine, one step later: a failure passing down a chain
        of waiting tasks recurses no deeper)."""
        for entry in entries:
            failed = entry.failed_input()
            if failed is None:
                self.worker.enqueue(entry.run_task())
                continue
            spec, rank = entry.msg.spec, self.ctx.rank
            infos = tuple(ObjectInfo(oid, failed.sizes, (rank,), failed.inline, True)
                          for oid in spec.return_ids)
            try:
                self.ctx.call_soon(self._report, spec, infos, [])
            except RuntimeShutdownError:
                return

    def task_finished(self, spec: P.TaskSpec, results: list) -> None:
        """(executor thread) A task ended; ``results`` = [(frames, is_error)] per return value.
        Tasks waiting here for its small results start at once, from this thread."""
        ctx = self.ctx
        if ctx.output is not None:
            ctx.output.task_ended()      # (its last partial lines leave before its TaskDone)
        infos = []
        stored = []
        for oid, (frames, is_error) in zip(spec.return_ids, results):
            if is_error:
                infos.append(ObjectInfo(oid, frame_sizes(frames), (ctx.rank,), to_bytes(frames), True))
                continue
            info = ctx.catalog.describe(oid, frames, ctx.rank, spec.inline_threshold)
            infos.append(info)
            if info.inline is None:
                stored.append((oid, frames))
        infos = tuple(infos)
        handed = not stored    # (a chunked result waits for the engine: its users read the store)
        try:
            ctx.call_soon(self._report, spec, infos, stored, handed, last_task_seconds())
        except RuntimeShutdownError:    # the job ended while the task ran: nobody wants it
            return
        if spec.durable is not None and not any(is_error for _, is_error in results):
            # (after the TaskDone is queued: the Persisted report then reaches rank 0 after it)
            self._persist(spec, [frames for frames, _ in results])
        if handed:
            self._start(self.deps.made(infos))

    def _persist(self, spec: P.TaskSpec, returns: list) -> None:
        """(executor thread) Hand a checkpointed task's results to this rank's persister (made
        at the first one); the frames are final, shared with the store, not copied."""
        ctx = self.ctx
        if ctx.persister is None:
            with _persister_lock:
                if ctx.persister is None:
                    ctx.persister = Persister(self._persisted, sync=ctx.config.storage_sync)
        root, key, named, sync = spec.durable    # (sync: the driver's choice, not this rank's)
        ctx.persister.submit(spec.task_id, root, key, returns,
                             {"name": spec.name, "named": named, "rank": ctx.rank},
                             _ArrayValues(returns), sync)

    def _persisted(self, task_id: int, key: str, ok: bool, committed: bool, nbytes: int,
                   seconds: float) -> None:
        """(persister thread) Count the attempt and tell rank 0."""
        def report() -> None:
            stats = self.ctx.stats
            stats["persisted" if ok and committed else "persist_dups" if ok else "persist_errors"] += 1
            stats["persist_bytes"] += nbytes
            stats["persist_us"] += int(seconds * 1e6)
            self.ctx.send(0, P.Persisted(task_id, key, ok, committed, nbytes))
        try:
            self.ctx.call_soon(report)
        except RuntimeShutdownError:
            pass

    def _report(self, spec: P.TaskSpec, infos: tuple, stored: list, handed: bool = False,
                seconds: float = 0.0) -> None:
        """(engine) Store, register and report a task's results; unless ``handed`` (by the
        executor thread that made them), start the tasks waiting here for them."""
        ctx = self.ctx
        for oid, frames in stored:
            ctx.store.put(oid, frames)
            ctx.server.serve_deferred(oid)
        for info in infos:
            ctx.publish(info, spec.replicas or 0)
        ctx.send(0, P.TaskDone(spec.task_id, ctx.rank, infos, seconds))
        if not handed:
            self._start(self.deps.made(infos))

    def set_blocked(self, blocked: bool) -> None:
        """(task thread) The calling task enters/leaves a blocking wait (nested get/wait)."""
        task_id = current_task_id()
        if task_id is None or _context.blocked == blocked:
            return
        _context.blocked = blocked
        if blocked:
            self.worker.block()
        self.ctx.call_soon(self.ctx.send, 0, P.TaskBlocked(task_id, blocked))
        if not blocked:
            self.worker.unblock()

    def task_exits(self, task_id: int, status: int) -> None:
        """(task thread, worker) The task called ``os._exit(status)``: tell rank 0 and wait (up
        to 2 s) until it has taken note, so that it learns this before it learns of the death."""
        try:
            self.ctx.call_soon(self.ctx.send, 0, P.TaskExit(task_id, self.ctx.rank, status))
        except RuntimeShutdownError:
            return
        self.exit_noted.wait(2.0)

    def on_task_exit_echo(self, source: int, msg: P.TaskExit) -> None:
        """(worker) Rank 0's echo of our TaskExit: the task thread may exit now."""
        self.exit_noted.set()

    def close(self) -> None:
        self.worker.close()
        self.flush_checkpoints()

    def flush_checkpoints(self) -> None:
        """Wait (at most ``Config.shutdown_timeout``) until the checkpoints handed over are
        committed: before this process exits (the job ends, or the driver died)."""
        persister = self.ctx.persister
        if persister is not None and not persister.close(self.ctx.config.shutdown_timeout):
            log.warning("rank %d: %d checkpoint(s) not written within %.0f s", self.ctx.rank,
                        persister.pending, self.ctx.config.shutdown_timeout)


class _ArrayValues:
    """Per return value, the numpy array its frames hold if it is one plain array (written as
    ``.npy``), else None; computed on the persister thread when asked (storage.commit)."""

    def __init__(self, returns: list) -> None:
        self.returns = returns

    def __getitem__(self, i: int) -> Any:
        frames = self.returns[i]
        if len(frames) != 2 or memoryview(frames[0]).nbytes > 1024:
            return None
        try:
            return array_of(bytes(frames[0]), frames[1:])
        except Exception:
            return None


_persister_lock = threading.Lock()
