"""``ObjectRef``: a ``concurrent.futures.Future`` for an object in the distributed store.

An :class:`ObjectRef` *is* a ``concurrent.futures.Future``: it completes when its object exists
somewhere (its value is fetched lazily by ``result()``/``get``), or fails with the producing task's
exception.  Refs are hashable and picklable; one ref object exists per object id per process.
The module functions below are how the API modules make and mark refs (the attributes they set
are this module's own).
"""
from __future__ import annotations

import concurrent.futures as cf
from typing import Any, Optional, Sequence

from . import session
from .errors import SerializationError
from .ids import format_id

_READY = object()        # the Future result of a ref whose object exists


class ObjectRef(cf.Future):
    """A future for an object in the distributed store (a task's result or a ``put`` value).

    ``done()`` means the object exists (or its task failed); ``result(timeout)`` fetches the value
    (seconds; raises ``TimeoutError``), raising the task's exception with the remote traceback as
    ``__cause__``, or :class:`~hoplite_mpi.errors.ObjectDeletedError` after :func:`delete`.
    Hashable (by object id) and picklable: a ref can travel inside task arguments and results.
    """

    # class-level defaults: __del__ must work on a ref whose __init__ did not run to the end
    _owner: Any = None
    _escaped = False
    _original_errors = False     # (Executor futures) fail with a pickling error's own exception
    _before_fail: Any = None     # (Executor futures) called with the exception before it is set

    def __init__(self, object_id: int, task_id: Optional[int] = None) -> None:
        super().__init__()
        self.id = object_id
        self._task_id = task_id
        self._owner: Any = None      # the driver's runtime, for refs the driver created
        self._escaped = False        # pickled into another object: never freed automatically

    def __del__(self) -> None:
        # Local reference counting on the driver (like Ray's owner-side counts): when the last
        # ref to an object the driver created goes away and was never pickled into another
        # object, the object is freed once no unfinished task uses it.
        owner = self._owner
        if owner is not None and not self._escaped:
            try:
                owner.release(self.id)
            except Exception:   # interpreter or runtime shutting down
                pass

    def __hash__(self) -> int:
        return hash(self.id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectRef) and other.id == self.id

    def __repr__(self) -> str:
        with self._condition:
            state = self._state.lower()
        return f"ObjectRef({format_id(self.id)}, {state})"

    def __reduce__(self):
        self._escaped = True
        return (_rebuild_ref, (self.id,))

    def hex(self) -> str:
        return format_id(self.id)

    # Completion, for the runtime (as Future.set_result / set_exception are for executors, not
    # for user code): refs.py on the notifier thread, values.put on the caller's.  Both raise
    # concurrent.futures.InvalidStateError if the ref is done already (a concurrent cancel).

    def set_ready(self) -> None:
        """The object exists: complete the ref (``result()`` then fetches its value)."""
        self.set_result(_READY)

    def set_ready_if_unobserved(self) -> bool:
        """Complete the ref now, in the calling thread, if no done-callback is registered (then
        nothing user-defined can run here; a callback added later runs in the adding thread, as
        for any completed future).  Returns False, changing nothing, if one is registered or the
        ref is already done: the caller completes it on the notifier thread instead."""
        with self._condition:      # (re-entrant: set_result takes it again)
            if self._done_callbacks or self.done():
                return False
            self.set_result(_READY)
        return True

    def set_failed(self, exc: BaseException) -> None:
        """The object is an error object or was deleted: fail the ref with ``exc`` (for an
        Executor's future, a pickling error's own exception: see ``new_refs``)."""
        if self._original_errors and isinstance(exc, SerializationError) and exc.original is not None:
            # a return value that could not be pickled: concurrent.futures gives the pickler's
            # own exception (the remote traceback stays attached as __cause__)
            exc.original.__cause__ = exc.__cause__
            exc = exc.original
        if self._before_fail is not None:
            self._before_fail(exc)     # (the executor marks itself broken before anyone can look)
        self.set_exception(exc)

    def result(self, timeout: Optional[float] = None) -> Any:
        from .values import get
        return get(self, timeout=timeout)

    def cancel(self) -> bool:
        """Cancel the task if it has not started yet (driver only; one placed on a worker is
        asked of that worker, a round trip).  Returns whether it is cancelled."""
        return cancel_refs([self])[0]

    def _cancelled_by_scheduler(self) -> bool:
        """The scheduler cancelled the task: end this future as cancelled."""
        if not super().cancel():
            return self.cancelled()
        # the task will never run: move to CANCELLED_AND_NOTIFIED at once (what an executor's
        # worker does when it takes a cancelled work item), else concurrent.futures.wait() and
        # as_completed() never see this future finish
        self.set_running_or_notify_cancel()
        return True


def cancel_refs(refs: Sequence[ObjectRef]) -> list[bool]:
    """Cancel the tasks of ``refs`` that have not started, in one call to the scheduler (so
    a slot that one cancel frees on a worker is not filled by a task cancelled next, as it
    would be one cancel at a time); returns whether each ref is cancelled.  Driver only."""
    todo = [i for i, ref in enumerate(refs) if not ref.done() and ref._task_id is not None]
    rt = session.current_or_none()
    answers = rt.cancel_many([refs[i]._task_id for i in todo]) if rt is not None and todo else []
    ok = {i: answer for i, answer in zip(todo, answers)}
    return [ref._cancelled_by_scheduler() if ok.get(i) else ref.cancelled()
            for i, ref in enumerate(refs)]


def _rebuild_ref(object_id: int) -> ObjectRef:
    rt = session.current_or_none()
    if rt is None:
        return ObjectRef(object_id)
    ref = ObjectRef(object_id)
    interned = rt.register_ref(ref)
    if interned is ref:
        rt.watch(object_id)
    return interned


def new_refs(rt: Any, first_id: int, n: int, task_id: Optional[int],
             original_errors: bool = False) -> list[ObjectRef]:
    """Refs of a new task's ``n`` return objects (ids ``first_id..``): owned by the driver on
    rank 0, else completed from a directory lookup."""
    refs = []
    for oid in range(first_id, first_id + n):
        ref = ObjectRef(oid, task_id)
        if original_errors:
            ref._original_errors = True
        ref = rt.register_ref(ref)
        if rt.scheduler is None:      # not the driver: learn readiness from the directory
            rt.watch(oid)
        else:
            ref._owner = rt
        refs.append(ref)
    return refs


def new_ref(rt: Any, object_id: int, inputs: Optional[Sequence[ObjectRef]] = None) -> ObjectRef:
    """The (interned) ref of a new object made on this rank (a ``put``, a reduce result); on the
    driver it owns the object (freed when its last ref goes).  ``inputs`` (a reduce's) stay
    alive, not auto-freed, while the ref lives (see :func:`inputs_of`)."""
    ref = rt.register_ref(ObjectRef(object_id))
    if inputs is not None:
        ref._inputs = list(inputs)
    if rt.scheduler is not None:
        ref._owner = rt
    return ref


def inputs_of(ref: ObjectRef) -> Sequence[ObjectRef]:
    """The input refs given to :func:`new_ref` (a reduce's), else ()."""
    return getattr(ref, "_inputs", ())


def check_refs(refs: Sequence[Any], what: str) -> None:
    """Raise TypeError naming ``what`` if an item of ``refs`` is not an ObjectRef."""
    for r in refs:
        if not isinstance(r, ObjectRef):
            raise TypeError(f"{what}() takes ObjectRefs, got {type(r).__name__}: {r!r}")
