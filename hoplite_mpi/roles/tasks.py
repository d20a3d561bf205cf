"""The task role of a worker rank: the shell around :class:`~hoplite_mpi.worker.Worker` (which
runs tasks on executor threads).  Results are stored and registered here, on the engine thread,
and reported to the scheduler (``TaskDone``)."""
from __future__ import annotations

import threading
from typing import Any

from .. import protocol as P
from ..errors import RuntimeShutdownError
from ..protocol import ObjectInfo
from ..serialization import frame_sizes, to_bytes
from ..worker import _context, current_task_id


class TaskRole:
    """``worker``: the executor; ``exit_noted``: rank 0 took note of a task's ``os._exit``."""

    def __init__(self, ctx: Any, make_worker: Any) -> None:
        self.ctx = ctx
        catalog = ctx.catalog
        self.worker = make_worker(ctx.rank, ctx.config.worker_threads, ctx.fetcher.fetch_info,
                                  self.task_finished, lambda oid: catalog.local_frames(oid) is not None)
        self.exit_noted = threading.Event()

    def on_run_task(self, source: int, msg: P.RunTask) -> None:
        self.worker.enqueue(msg)

    def task_finished(self, spec: P.TaskSpec, results: list) -> None:
        """(executor thread) A task ended; ``results`` = [(frames, is_error)] per return value."""
        ctx = self.ctx
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
        try:
            ctx.call_soon(self._report, spec, tuple(infos), stored)
        except RuntimeShutdownError:    # the job ended while the task ran: nobody wants it
            pass

    def _report(self, spec: P.TaskSpec, infos: tuple, stored: list) -> None:
        ctx = self.ctx
        for oid, frames in stored:
            ctx.store.put(oid, frames)
            ctx.server.serve_deferred(oid)
        for info in infos:
            ctx.publish(info, spec.replicas or 0)
        ctx.send(0, P.TaskDone(spec.task_id, ctx.rank, infos))

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
