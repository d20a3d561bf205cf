"""A rank's background writer of checkpointed results (issue 14): the task's executor thread
hands over the result's frames (the store's own buffers, which are final once serialized) and
goes on; one writer thread commits them (:func:`.storage.commit`) in order and reports each
outcome through ``done``.  Off the critical path: a task's successors start as soon as its
result exists, not when it is durable (ExoFlow's asynchronous checkpoint).

Back-pressure: at most ``limit`` bytes wait; a task thread handing over more blocks until the
writer catches up.  :meth:`Persister.flush` waits (bounded) until everything handed over is
committed: a worker calls it before it exits, when the driver died or the job ends.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable, Optional, Sequence

from . import storage

log = logging.getLogger("hoplite_mpi")


class Persister:
    """``done(task_id, key, ok, committed, nbytes, seconds)`` is called on the writer thread
    after each attempt (``ok`` False: an OSError, logged; ``committed`` False: another attempt
    committed the key first)."""

    def __init__(self, done: Callable[..., None], limit: int = 1 << 30, sync: bool = True) -> None:
        self.done = done
        self.limit = limit
        self.sync = sync
        self._queue: collections.deque = collections.deque()
        self._queued_bytes = 0
        self._busy = False
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="hoplite-persist", daemon=True)
        self._thread.start()

    def submit(self, task_id: int, root: str, key: str, returns: Sequence[Sequence[Any]],
               meta: dict, values: Optional[Sequence[Any]] = None,
               sync: Optional[bool] = None) -> None:
        """(any thread) Queue a step's results for commit (``sync``: fsync it; None: this
        persister's default); blocks while more than ``limit`` bytes wait (unless nothing
        waits)."""
        nbytes = sum(memoryview(f).nbytes for frames in returns for f in frames)
        with self._cond:
            while self._queue and self._queued_bytes + nbytes > self.limit and not self._closed:
                self._cond.wait(1.0)
            self._queue.append((task_id, root, key, returns, meta, values, nbytes,
                                self.sync if sync is None else sync))
            self._queued_bytes += nbytes
            self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until every queued step is committed (or failed), at most ``timeout`` seconds;
        returns whether the queue is empty."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    @property
    def pending(self) -> int:
        """Steps queued or being written."""
        with self._cond:
            return len(self._queue) + int(self._busy)

    def close(self, timeout: float) -> bool:
        """Flush (bounded), then stop the writer; returns whether everything was written."""
        flushed = self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        return flushed

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                item = self._queue.popleft()
                self._busy = True
            task_id, root, key, returns, meta, values, nbytes, sync = item
            t0 = time.perf_counter()
            ok, committed, written = True, False, 0
            try:
                committed, written = storage.commit(root, key, returns, meta, values, sync)
            except Exception:
                ok = False
                log.exception("checkpoint of task %s (key %s) to %s failed; the task's result is "
                              "not durable", meta.get("name"), key, root)
            seconds = time.perf_counter() - t0
            item = returns = values = None       # (drop the frames before waiting again)
            with self._cond:
                self._busy = False
                self._queued_bytes -= nbytes
                self._cond.notify_all()
            try:
                self.done(task_id, key, ok, committed, written, seconds)
            except Exception:
                log.exception("checkpoint report failed")
