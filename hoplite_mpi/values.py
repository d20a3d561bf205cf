"""Objects' values: ``put``, ``get``, ``wait``, ``delete``."""
from __future__ import annotations

import concurrent.futures as cf
import time
from typing import Any, Iterable, Optional, Sequence, Union

from . import session, tracing
from .errors import ObjectDeletedError, RuntimeShutdownError
from .ids import format_id
from .objectref import ObjectRef, check_refs, new_ref
from .protocol import ObjectInfo
from .serialization import deserialize, rebuild_error, serialize
from .store import DELETED
from .worker import current_task_id


def put(value: Any) -> ObjectRef:
    """Store ``value`` in this rank's object store; returns a ready ref.

    numpy arrays are kept as raw buffers (copied, so later changes to ``value`` do not show).
    Raises :class:`SerializationError` if ``value`` cannot be pickled (nothing is stored).
    """
    rt = session.current()
    if isinstance(value, ObjectRef):
        raise TypeError("put() of an ObjectRef is not allowed; pass the ref itself instead")
    frames = serialize(value, "the value given to put()", copy=True)
    oid = rt.put(frames)
    if rt.rank == 0 and rt.workflow is not None:
        rt.workflow.put(oid, value)       # (its durable key: the digest of its content)
    ref = new_ref(rt, oid)
    ref.set_ready()
    return ref


def delete(refs: Union[ObjectRef, Iterable[ObjectRef]]) -> None:
    """Free the objects of ``refs`` on every rank.  A later ``get`` raises ObjectDeletedError."""
    rt = session.current()
    refs = [refs] if isinstance(refs, ObjectRef) else list(refs)
    check_refs(refs, "delete")
    rt.delete([r.id for r in refs])


class Blocking:
    """Marks the calling task as blocked (slot released) while it waits for other tasks."""

    def __init__(self, rt: Any, refs: Sequence[ObjectRef]) -> None:
        self.rt = rt
        self.active = current_task_id() is not None and not all(r.done() for r in refs)

    def __enter__(self) -> None:
        if self.active:
            self.rt.set_blocked(True)

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            self.rt.set_blocked(False)


def remaining(deadline: Optional[float]) -> Optional[float]:
    """Seconds left until ``deadline`` (``time.monotonic``), at least 0; None without one."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def get(refs: Union[ObjectRef, Sequence[ObjectRef]], timeout: Optional[float] = None) -> Any:
    """The value of a ref, or the list of values of a list of refs (fetched concurrently).

    Args:
        refs: one ObjectRef or a list/tuple of them.
        timeout: seconds to wait in all; None waits for ever.

    Raises:
        concurrent.futures.TimeoutError: (the builtin ``TimeoutError`` from Python 3.11) not all
            values arrived in time; nothing is lost, call again.
        the task's exception: with a ``RemoteTraceback`` (rank, host, traceback) as ``__cause__``.
        ObjectDeletedError: an object was freed with :func:`delete`.
        concurrent.futures.CancelledError: the task was cancelled.
    """
    single = isinstance(refs, ObjectRef)
    items = [refs] if single else list(refs)
    check_refs(items, "get")
    rt = session.current()
    deadline = None if timeout is None else time.monotonic() + timeout
    began = time.perf_counter()
    with Blocking(rt, items), rt.ctx.refs.awaiting([r.id for r in items]):
        for ref in items:
            if rt.is_deleted(ref.id):
                raise ObjectDeletedError(format_id(ref.id))
            try:
                cf.Future.result(ref, remaining(deadline))  # readiness (or the task's error)
            except cf.TimeoutError:
                raise cf.TimeoutError(f"get() timed out after {timeout} s waiting for "
                                      f"{format_id(ref.id)}") from None
        # fetch every value not held locally, all at once
        pending = {}
        for ref in items:
            if rt.local_frames(ref.id) is None and ref.id not in pending:
                fut = rt.waiter()
                pending[ref.id] = fut
                rt.call_soon(rt.fetch, ref.id, fut.set_result)
        values = []
        for ref in items:
            got = rt.local_frames(ref.id)
            if got is None:
                fut = pending.get(ref.id)
                if fut is None:   # held here a moment ago: its copy was lost (being rebuilt)
                    fut = pending[ref.id] = rt.waiter()
                    rt.call_soon(rt.fetch, ref.id, fut.set_result)
                try:
                    got = fut.result(remaining(deadline))
                except cf.TimeoutError:
                    raise cf.TimeoutError(f"get() timed out after {timeout} s fetching "
                                          f"{format_id(ref.id)}") from None
            values.append(value_of(ref.id, got))
    rec = tracing.recorder
    if rec is not None:
        rec.complete("get", "wait", began, time.perf_counter(), {"objects": len(items)})
    return values[0] if single else values


def value_of(object_id: int, got: Any) -> Any:
    """The value of what a fetch gave (frames, an ObjectInfo with the value inline, or DELETED).

    Raises:
        ObjectDeletedError: deleted.  The task's exception: an error object.
    """
    if got is DELETED:
        raise ObjectDeletedError(format_id(object_id))
    if isinstance(got, ObjectInfo):
        if got.error:
            raise rebuild_error(got.inline)
        return deserialize(got.inline)
    return deserialize(got)


def wait(refs: Sequence[ObjectRef], num_returns: int = 1, timeout: Optional[float] = None
         ) -> tuple[list[ObjectRef], list[ObjectRef]]:
    """Wait until ``num_returns`` of ``refs`` are ready (exist or failed), or ``timeout`` seconds.

    Returns ``(ready, pending)``, both in the order of ``refs``; ``ready`` has at most
    ``num_returns`` refs.  Raises TypeError for a non-ref, ValueError for duplicate refs or a
    ``num_returns`` outside ``0..len(refs)``.
    """
    refs = list(refs)
    check_refs(refs, "wait")
    if len(set(refs)) != len(refs):
        raise ValueError("wait() got duplicate ObjectRefs")
    if not 0 <= num_returns <= len(refs):
        raise ValueError(f"num_returns must be within 0..{len(refs)}, got {num_returns}")
    rt = session.current()
    deadline = None if timeout is None else time.monotonic() + timeout
    with Blocking(rt, refs), rt.ctx.refs.awaiting([r.id for r in refs]):
        done: set = {r for r in refs if r.done()}
        while len(done) < num_returns:
            left = remaining(deadline)
            if left == 0:
                break
            more, _ = cf.wait([r for r in refs if r not in done], left,
                              return_when=cf.FIRST_COMPLETED)
            done |= more
    if rt.closed:
        raise RuntimeShutdownError("the hoplite_mpi runtime was shut down while wait() waited")
    ready = [r for r in refs if r in done][:num_returns]
    chosen = set(ready)
    return ready, [r for r in refs if r not in chosen]
