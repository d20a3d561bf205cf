"""Tasks waiting on a worker for inputs made on that worker (``Config.worker_deps``).

The scheduler places a task *ahead* on rank ``r`` when every input it lacks is being made by a
task placed on ``r`` before it; its RunTask names those inputs ``None``.  This table keeps such a
task until the last of them is made here, then hands it back complete (Dask's worker state
machine: a task waits on the worker, not on the scheduler, so a chain of tasks costs one local
hand-off per link instead of a round trip to rank 0).

No MPI and no runtime: :class:`~hoplite_mpi.roles.tasks.TaskRole` feeds it and starts what comes
out.  Thread-safe (one lock): the engine thread adds tasks and every result, an executor thread
may hand its own task's small results at once (``made``), before the engine has reported them.
"""
from __future__ import annotations

import threading
from typing import Iterable, Optional

from .protocol import ObjectInfo, RunTask

# results made here kept for tasks placed ahead whose RunTask comes after the result was made
# (rank 0 had not seen that TaskDone yet when it placed them): at most this many, and at most
# MADE_BYTES of in-band values; past that, a task that misses one asks its shard (``add``
# returns those ids)
MADE_KEPT = 4096
MADE_BYTES = 16 << 20


class Waiting:
    """A task placed ahead: its RunTask, its inputs so far (None: not made yet), the missing ids."""

    __slots__ = ("msg", "deps", "missing")

    def __init__(self, msg: RunTask) -> None:
        self.msg = msg
        self.deps: list = list(msg.deps)
        self.missing = {oid for oid, info in zip(msg.spec.deps, msg.deps) if info is None}

    def fill(self, info: ObjectInfo) -> None:
        oid = info.object_id
        self.missing.discard(oid)
        for i, dep in enumerate(self.msg.spec.deps):
            if dep == oid:
                self.deps[i] = info

    def run_task(self) -> RunTask:
        """The complete RunTask (no ``None`` input; the function blobs went with the first)."""
        return RunTask(self.msg.spec, tuple(self.deps), ())

    def failed_input(self) -> Optional[ObjectInfo]:
        """An input that is an error object (the task then fails with it, unrun), or None."""
        return next((info for info in self.deps if info.error), None)


def _inline_bytes(info: ObjectInfo) -> int:
    return info.nbytes if info.inline is not None else 0


class LocalDeps:
    """Tasks placed ahead on this rank, by the ids they wait for.

    Attributes:
        waiting: task id -> :class:`Waiting`.
        forgot: results have been dropped from the kept ones (a miss may be an old result).
    """

    def __init__(self, kept: int = MADE_KEPT, kept_bytes: int = MADE_BYTES) -> None:
        self.kept, self.kept_bytes = kept, kept_bytes
        self._bytes = 0                              # in-band bytes of the kept results
        self.waiting: dict[int, Waiting] = {}
        self.forgot = False
        self._awaited: dict[int, list[int]] = {}    # object id -> task ids waiting for it
        self._made: dict[int, ObjectInfo] = {}      # the last ``kept`` results, oldest first
        self._lock = threading.Lock()

    def add(self, msg: RunTask) -> tuple[Optional[Waiting], list[int]]:
        """A RunTask with ``None`` inputs: ``(entry, [])`` if every such input was made here
        already (start it), else ``(None, ids)``: it waits; ``ids`` are inputs to ask their
        shard about as well (results possibly made here long ago, see :data:`MADE_KEPT`)."""
        entry = Waiting(msg)
        task_id = msg.spec.task_id
        ask = []
        with self._lock:
            for oid in list(entry.missing):
                info = self._made.get(oid)
                if info is not None:
                    entry.fill(info)
                    continue
                self._awaited.setdefault(oid, []).append(task_id)
                if self.forgot:
                    ask.append(oid)
            if not entry.missing:
                return entry, []
            self.waiting[task_id] = entry
        return None, ask

    def made(self, infos: Iterable[ObjectInfo]) -> list[Waiting]:
        """Objects made here (or error objects for them): the waiting tasks now complete, taken
        out of the table (start each; one with an error input fails with it).  Idempotent per
        object: a task is handed out once."""
        ready = []
        with self._lock:
            made, awaited, waiting = self._made, self._awaited, self.waiting
            for info in infos:
                oid = info.object_id
                old = made.pop(oid, None)
                if old is not None:
                    self._bytes -= _inline_bytes(old)
                made[oid] = info
                self._bytes += _inline_bytes(info)
                while len(made) > self.kept or (self._bytes > self.kept_bytes and len(made) > 1):
                    self._bytes -= _inline_bytes(made.pop(next(iter(made))))
                    self.forgot = True
                for task_id in awaited.pop(oid, ()):
                    entry = waiting.get(task_id)
                    if entry is not None and oid in entry.missing:
                        entry.fill(info)
                        if not entry.missing:
                            del waiting[task_id]
                            ready.append(entry)
        return ready

    def revoke(self, task_id: int) -> Optional[Waiting]:
        """Take the task out if it still waits (a cancel); None if it has started or is unknown."""
        with self._lock:
            return self.waiting.pop(task_id, None)
