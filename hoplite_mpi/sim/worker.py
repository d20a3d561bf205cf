"""A worker that runs tasks inline, when the simulator says so (no threads, nothing blocks).

A :class:`~hoplite_mpi.protocol.RunTask`'s chunked arguments are fetched at once through the
engine without blocking (``Fetcher.fetch_from`` with a callback, as the real worker's
``fetch_info`` does from its thread, holding no slot meanwhile); then the task waits for one of
``threads`` slots and runs for a random virtual duration:
at its end the simulator calls :meth:`SimWorker.run`, which executes it exactly as the real
worker does (:class:`~hoplite_mpi.worker.TaskRunner`: function loading, argument errors, return-value checks) and
reports with ``finished``.  A rank killed meanwhile never runs it.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable

from .. import session
from ..errors import ObjectDeletedError
from ..ids import format_id
from ..protocol import ObjectInfo, RunTask
from ..serialization import rebuild_error
from ..store import DELETED
from ..worker import TaskRunner


class SimWorker(TaskRunner):
    """The task role of one simulated rank (same constructor as :class:`~.worker.Worker`, plus
    ``host``: the simulator's rank, which gives ``rt`` (its Runtime, set after construction) and
    ``task_ready(worker, msg)`` (schedules :meth:`run` after the task's virtual duration))."""

    def __init__(self, rank: int, threads: int, fetch: Callable, finished: Callable,
                 held: Callable[[int], bool] = lambda oid: False, *, host: Any) -> None:
        super().__init__(rank, threads, fetch, finished, held)
        self.host = host
        self._closed = False
        self._ready: deque = deque()          # (RunTask, fetched arguments) waiting for a slot
        self._running = 0
        self._args: dict[int, Any] = {}      # (the task being run) object id -> fetched value

    def enqueue(self, msg: RunTask) -> None:
        self.functions.add(msg.blobs)
        self._resolve(msg)

    def close(self) -> None:
        self._closed = True
        self._ready.clear()

    def _resolve(self, msg: RunTask) -> None:
        """Fetch the chunked arguments (engine callbacks; as the real worker, a task holds no
        slot while it fetches: an argument may have to be made again by a task queued behind it),
        then queue the task for a slot."""
        need = {info.object_id: info for info in msg.deps if info.inline is None}
        got: dict[int, Any] = {}
        if not need:
            self._queued(msg, got)
            return
        rt = self.host.rt

        def arrived(oid: int, value: Any) -> None:
            got[oid] = value
            if len(got) == len(need):
                self._queued(msg, got)
        for oid, info in need.items():
            rt.engine.call_soon(rt.ctx.fetcher.fetch_from, info, lambda v, oid=oid: arrived(oid, v))

    def _queued(self, msg: RunTask, got: dict) -> None:
        self._ready.append((msg, got))
        self._pump()

    def _pump(self) -> None:
        while self._ready and self._running < self.threads and not self._closed:
            msg, got = self._ready.popleft()
            self._running += 1
            self.host.task_ready(self, msg, got)

    def run(self, msg: RunTask, got: dict[int, Any]) -> None:
        """Execute the task now (its arguments are in ``got``) and report its results."""
        self._running -= 1
        if self._closed:
            return
        previous = session.install(self.host.rt)
        self._args = got
        try:
            self._execute(msg)
        finally:
            self._args = {}
            session.install(previous)
        self._pump()

    def _fetch_unslotted(self, info: ObjectInfo) -> list:
        """The fetched argument, as the real worker's blocking ``fetch_info`` returns it."""
        got = self._args[info.object_id]
        if got is DELETED:
            raise ObjectDeletedError(format_id(info.object_id))
        if isinstance(got, ObjectInfo):
            if got.error:
                raise rebuild_error(got.inline)
            return got.inline
        return got

    def block(self) -> None:      # (tasks never block in a simulation)
        raise RuntimeError("a simulated task cannot block")

    def unblock(self) -> None:
        raise RuntimeError("a simulated task cannot block")
