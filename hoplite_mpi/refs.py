"""The futures (ObjectRefs) of this process: interning, completing them when their object becomes
ready (on a notifier thread, since user callbacks may block or call ``get``), and failing every
waiting thread at shutdown.

Thread rule: ``notify`` is called on the engine thread; refs complete on the notifier thread (or,
without threads, are handed out by :meth:`Refs.take_ready`); ``register``/``waiter`` from any thread.
A ref whose object is ready and that has no done-callback completes at once on the engine thread
(``direct``, with the notifier thread): nothing user-defined runs there, and the thread waiting in
``get`` is woken one thread hand-off sooner (~0.1 ms here under load).
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import weakref
from concurrent.futures import Future
from typing import Any, Iterator, Optional

from .errors import ObjectDeletedError, RuntimeShutdownError
from .ids import format_id
from .serialization import rebuild_error

log = logging.getLogger("hoplite_mpi")


class Refs:
    """``refs``: object id -> the interned ObjectRef (weak); ``waiters``: other futures to fail
    at shutdown (weak)."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.refs: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
        self.lock = threading.Lock()
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.waiters: "weakref.WeakSet[Future]" = weakref.WeakSet()
        self.direct = False      # set when the notifier thread runs (see the module docstring)
        self.drained: Optional[BaseException] = None   # draining: what failed refs raise
        self.notified = 0        # objects delivered so far (the stall report's progress count)
        self.awaited: dict[int, int] = {}   # object id -> threads in get/wait for it (stall report)

    @contextlib.contextmanager
    def awaiting(self, ids: list) -> Iterator[None]:
        """Note that the calling thread waits for ``ids`` (get/wait), for the stall report."""
        with self.lock:
            for oid in ids:
                self.awaited[oid] = self.awaited.get(oid, 0) + 1
        try:
            yield
        finally:
            with self.lock:
                for oid in ids:
                    left = self.awaited.get(oid, 0) - 1
                    if left > 0:
                        self.awaited[oid] = left
                    else:
                        self.awaited.pop(oid, None)

    def register(self, ref: Any) -> Any:
        """Intern ``ref`` (one ObjectRef per id per process); returns the interned one."""
        with self.lock:
            existing = self.refs.get(ref.id)
            if existing is not None:
                return existing
            self.refs[ref.id] = ref
        return ref

    def waiter(self) -> Future:
        """A Future that a thread may wait on without a timeout: if the runtime shuts down
        before it completes, it fails with RuntimeShutdownError (so the thread returns)."""
        fut: Future = Future()
        self.waiters.add(fut)
        return fut

    def notify(self, items: list) -> None:
        """(engine) Objects ready (ObjectInfo; ``error`` set for an error object) or found
        deleted (object id): complete their refs."""
        self.notified += len(items)
        if self.direct:
            items = [item for item in items if not self._ready_here(item)]
            if not items:
                return
        self.queue.put(items)

    def _ready_here(self, item: Any) -> bool:
        """(engine) Complete the ref of a ready (not error) object at once if nothing observes
        it (see :meth:`ObjectRef.set_ready_if_unobserved`); whether nothing is left to do."""
        if isinstance(item, int) or item.error:
            return False
        ref = self.refs.get(item.object_id)
        return ref is None or ref.set_ready_if_unobserved()

    def watch(self, object_id: int) -> None:
        """(engine) Complete the local ref of ``object_id`` once the object exists (a directory
        lookup on ranks without the scheduler)."""
        ctx = self.ctx
        info = ctx.catalog.info(object_id)
        if info is not None:
            self.notify([info])
        elif object_id in ctx.catalog.deleted:
            self.notify([object_id])
        else:
            ctx.lookups.lookup(object_id, lambda info: self.notify([info if info is not None else object_id]))

    def take_ready(self) -> list:
        """(without threads) What completed since the last call, in order: an ObjectInfo per
        object that became ready, an object id per object found deleted."""
        out: list = []
        while True:
            try:
                batch = self.queue.get_nowait()
            except queue.Empty:
                return out
            if batch is not None:
                out.extend(batch)

    def run(self) -> None:
        """The notifier thread: completes refs until :meth:`stop`."""
        while True:
            batch = self.queue.get()
            if batch is None:
                return
            for item in batch:
                self.deliver(item)

    def stop(self) -> None:
        self.queue.put(None)

    def deliver(self, item: Any) -> None:
        """Complete the ref of one ready item (see :meth:`notify`), if it still exists."""
        # (a function of its own: no local variable may keep the last ref alive between batches,
        # or the driver's reference counting would not see it dropped)
        oid = item if isinstance(item, int) else item.object_id
        ref = self.refs.get(oid)
        if ref is None or ref.done():
            return
        try:
            if isinstance(item, int):
                ref.set_failed(ObjectDeletedError(format_id(oid)))
            elif item.error:
                ref.set_failed(self.drained or rebuild_error(item.inline))
            else:
                ref.set_ready()
        except Exception:  # a concurrent cancel() won the race: nothing to deliver
            log.debug("ref %s already completed", format_id(oid))

    def fail_waiters(self, error: Optional[BaseException] = None) -> None:
        """Threads blocked in get/wait/result/broadcast/call return with ``error`` (default
        RuntimeShutdownError)."""
        error = error or RuntimeShutdownError("the hoplite_mpi runtime was shut down while this call waited")
        with self.lock:
            refs = list(self.refs.values())
        for fut in refs + list(self.waiters):
            try:
                if not fut.done():
                    fut.set_exception(error)
            except Exception:     # completed meanwhile (notifier thread)
                pass
