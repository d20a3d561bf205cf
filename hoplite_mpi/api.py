"""The public API: init/shutdown, ``@remote``, ``get``/``wait``/``put``/``delete``, ``ObjectRef``.

An :class:`ObjectRef` *is* a ``concurrent.futures.Future``: it completes when its object exists
somewhere (its value is fetched lazily by ``result()``/``get``), or fails with the producing task's
exception.  Refs are hashable and picklable; one ref object exists per object id per process.
"""
from __future__ import annotations

import atexit
import concurrent.futures as cf
import hashlib
import logging
import os
import pickle
import sys
import threading
import time
from typing import Any, Callable, Iterable, Optional, Sequence, Union, overload

import numpy as np

from . import debug
from .config import Config
from .errors import (HopliteError, NotInitializedError, ObjectDeletedError, RuntimeShutdownError,
                     SerializationError)
from .ids import format_id
from .protocol import ObjectInfo, TaskSpec
from .serialization import deserialize, dumps, rebuild_error, serialize
from .store import DELETED
from .worker import DepPlaceholder, current_task_id

log = logging.getLogger("hoplite_mpi")

_runtime = None          # the Runtime of this process, if any
_init_lock = threading.RLock()
_READY = object()        # the Future result of a ref whose object exists


# --- runtime lifecycle -----------------------------------------------------------------------

def _setup_logging(config: Config, rank: int) -> None:
    log.setLevel(config.log_level.upper())
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"[hoplite_mpi rank {rank}] %(levelname)s %(message)s"))
        log.addHandler(handler)


def _start(comm: Any, root: int, options: dict) -> Any:
    """Create and start the runtime on a private copy of ``comm`` (collective over ``comm``).

    The runtime is published as this process's (``_runtime``) before its engine starts: a task
    the engine runs at once may call the API (``hm.rank()``, ``hm.get``, ``f.remote``)."""
    global _runtime, _shut_down
    from mpi4py import MPI

    from .runtime import Runtime

    config = Config.from_sources(options)
    if MPI.Query_thread() < MPI.THREAD_SERIALIZED:
        raise RuntimeError("hoplite_mpi needs MPI initialised with thread level SERIALIZED or MULTIPLE "
                           "(mpi4py's default is MULTIPLE; do not lower mpi4py.rc.thread_level)")
    if comm is None:
        comm = MPI.COMM_WORLD
    if not 0 <= root < comm.Get_size():
        raise ValueError(f"root must be within 0..{comm.Get_size() - 1}, got {root}")
    # rank `root` of comm becomes rank 0 (the driver) of the runtime's communicator
    own = comm.Split(0, (comm.Get_rank() - root) % comm.Get_size())
    _setup_logging(config, own.Get_rank())
    rt = Runtime(own, config)
    if rt.rank == 0 and rt.size > 1 and not rt.transport.ft:
        from .transport.mpi import ulfm_status
        log.warning("rank-loss tolerance: %s", ulfm_status())
    with _init_lock:
        _runtime = rt
        _shut_down = False
    return rt.start()


def init(comm: Any = None, **options: Any) -> None:
    """Start hoplite_mpi on every rank of ``comm`` (default ``MPI.COMM_WORLD``); collective.

    Rank 0 returns (it is the driver).  Every other rank serves tasks until the driver calls
    :func:`shutdown` (or exits), then exits the process with status 0, so code after ``init()`` runs
    on rank 0 only.  Idempotent: a second call returns at once.

    Args:
        comm: an ``mpi4py.MPI.Comm``; the runtime works on a private copy (``comm.Split``).
        **options: fields of :class:`~hoplite_mpi.config.Config` (also ``HOPLITE_MPI_*`` env vars).

    Raises:
        TypeError / ValueError: an unknown option or a bad value (on every rank, before any
            communication).
        RuntimeError: MPI was initialised with a thread level below SERIALIZED.
    """
    global _runtime
    with _init_lock:
        if _runtime is not None:
            return
        rt = _start(comm, 0, options)
    debug.install(rt)        # kill -USR1 / -USR2 <pid>: where this rank is (hoplite_mpi/debug.py)
    if rt.rank == 0:
        atexit.register(_finalize_after_rank_loss)   # (runs after shutdown: atexit is LIFO)
        atexit.register(shutdown)
        return
    rt.serve()
    _runtime = None
    if rt.dead or rt.unclean:
        _exit_now(0)
    sys.exit(0)


_ranks_died = False   # the driver saw a rank die, or did not shut down cleanly (set by shutdown)
_shut_down = False    # shutdown() ended this process's runtime (API calls: RuntimeShutdownError)


def _exit_now(status: int) -> None:
    """Leave without MPI_Finalize.  After a rank loss every survivor does so: Open MPI's finalize
    fence with a dead rank sometimes never completes under ULFM (1 run in ~20 here), and a rank
    that finalizes while others do not waits for them for ever."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(status)


def _finalize_after_rank_loss() -> None:
    """(atexit, driver) After a rank loss, exit without MPI_Finalize: status 1 if the program
    ended with an uncaught exception, else 0 (an explicit ``sys.exit(n)`` cannot be seen from an
    atexit handler; ``python -m hoplite_mpi`` passes the script's status on itself)."""
    if _ranks_died:
        _exit_now(1 if getattr(sys, "last_value", None) is not None else 0)


def shutdown() -> None:
    """Driver: stop the runtime on every rank.  Refs of this runtime can no longer be resolved.

    Idempotent; does nothing on a rank that is not the driver or without a runtime.
    """
    global _runtime, _shut_down
    with _init_lock:
        rt = _runtime
        if rt is None or rt.rank != 0:
            return
        _runtime = None
        _shut_down = True
    rt.shutdown()
    global _ranks_died
    _ranks_died = _ranks_died or bool(rt.dead) or rt.unclean


def is_initialized() -> bool:
    """Whether this process has a running runtime."""
    return _runtime is not None


def _rt() -> Any:
    rt = _runtime
    if rt is None:
        if _shut_down:
            raise RuntimeShutdownError("the hoplite_mpi runtime was shut down (hoplite_mpi.shutdown())")
        raise NotInitializedError("hoplite_mpi is not initialised: call hoplite_mpi.init() first "
                                  "(or run the script with `python -m hoplite_mpi`)")
    return rt


def rank() -> int:
    """This process's rank in the runtime (0 = driver)."""
    return _rt().rank


def world_size() -> int:
    """Number of ranks of the runtime."""
    return _rt().size


# --- ObjectRef -------------------------------------------------------------------------------

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

    # called by the runtime (notifier thread)
    def _set_ready(self) -> None:
        self.set_result(_READY)

    def _set_failed(self, exc: BaseException) -> None:
        if self._original_errors and isinstance(exc, SerializationError) and exc.original is not None:
            # a return value that could not be pickled: concurrent.futures gives the pickler's
            # own exception (the remote traceback stays attached as __cause__)
            exc.original.__cause__ = exc.__cause__
            exc = exc.original
        self.set_exception(exc)

    def result(self, timeout: Optional[float] = None) -> Any:
        return get(self, timeout=timeout)

    def cancel(self) -> bool:
        """Cancel the task if it has not been placed on a worker yet (driver only)."""
        if self.done() or self._task_id is None:
            return self.cancelled()
        rt = _runtime
        if rt is None or not rt.cancel(self._task_id):
            return False
        if not super().cancel():
            return self.cancelled()
        # the task will never run: move to CANCELLED_AND_NOTIFIED at once (what an executor's
        # worker does when it takes a cancelled work item), else concurrent.futures.wait() and
        # as_completed() never see this future finish
        self.set_running_or_notify_cancel()
        return True


def _rebuild_ref(object_id: int) -> ObjectRef:
    rt = _runtime
    if rt is None:
        return ObjectRef(object_id)
    ref = ObjectRef(object_id)
    interned = rt.register_ref(ref)
    if interned is ref:
        rt.watch(object_id)
    return interned


def _new_refs(rt: Any, first_id: int, n: int, task_id: Optional[int],
              original_errors: bool = False) -> list[ObjectRef]:
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


# --- objects ---------------------------------------------------------------------------------

def put(value: Any) -> ObjectRef:
    """Store ``value`` in this rank's object store; returns a ready ref.

    numpy arrays are kept as raw buffers (copied, so later changes to ``value`` do not show).
    Raises :class:`SerializationError` if ``value`` cannot be pickled (nothing is stored).
    """
    rt = _rt()
    if isinstance(value, ObjectRef):
        raise TypeError("put() of an ObjectRef is not allowed; pass the ref itself instead")
    frames = serialize(value, "the value given to put()", copy=True)
    oid = rt.put(frames)
    ref = rt.register_ref(ObjectRef(oid))
    if rt.scheduler is not None:
        ref._owner = rt
    ref._set_ready()
    return ref


def delete(refs: Union[ObjectRef, Iterable[ObjectRef]]) -> None:
    """Free the objects of ``refs`` on every rank.  A later ``get`` raises ObjectDeletedError."""
    rt = _rt()
    refs = [refs] if isinstance(refs, ObjectRef) else list(refs)
    _check_refs(refs, "delete")
    rt.delete([r.id for r in refs])


def _check_refs(refs: Sequence[Any], what: str) -> None:
    for r in refs:
        if not isinstance(r, ObjectRef):
            raise TypeError(f"{what}() takes ObjectRefs, got {type(r).__name__}: {r!r}")


class _Blocking:
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


def _remaining(deadline: Optional[float]) -> Optional[float]:
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
    _check_refs(items, "get")
    rt = _rt()
    deadline = None if timeout is None else time.monotonic() + timeout
    with _Blocking(rt, items):
        for ref in items:
            if rt.is_deleted(ref.id):
                raise ObjectDeletedError(format_id(ref.id))
            try:
                cf.Future.result(ref, _remaining(deadline))  # readiness (or the task's error)
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
                    got = fut.result(_remaining(deadline))
                except cf.TimeoutError:
                    raise cf.TimeoutError(f"get() timed out after {timeout} s fetching "
                                          f"{format_id(ref.id)}") from None
            values.append(_value(ref.id, got))
    return values[0] if single else values


def _value(object_id: int, got: Any) -> Any:
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
    _check_refs(refs, "wait")
    if len(set(refs)) != len(refs):
        raise ValueError("wait() got duplicate ObjectRefs")
    if not 0 <= num_returns <= len(refs):
        raise ValueError(f"num_returns must be within 0..{len(refs)}, got {num_returns}")
    rt = _rt()
    deadline = None if timeout is None else time.monotonic() + timeout
    with _Blocking(rt, refs):
        done: set = {r for r in refs if r.done()}
        while len(done) < num_returns:
            remaining = _remaining(deadline)
            if remaining == 0:
                break
            more, _ = cf.wait([r for r in refs if r not in done], remaining,
                              return_when=cf.FIRST_COMPLETED)
            done |= more
    if rt.closed:
        raise RuntimeShutdownError("the hoplite_mpi runtime was shut down while wait() waited")
    ready = [r for r in refs if r in done][:num_returns]
    chosen = set(ready)
    return ready, [r for r in refs if r not in chosen]


# --- tasks -----------------------------------------------------------------------------------

_TASK_OPTIONS = ("num_returns", "max_retries", "rank", "name", "inline_threshold", "replicas",
                 "strict_rank")


def _check_options(options: dict) -> None:
    """Types and ranges of task options (the pinned rank is checked against the runtime at submit)."""
    unknown = set(options) - set(_TASK_OPTIONS)
    if unknown:
        raise TypeError(f"unknown task option(s) {sorted(unknown)}; known: {list(_TASK_OPTIONS)}")
    n = options.get("num_returns", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"num_returns must be an int >= 1, got {n!r}")
    r = options.get("max_retries", 3)
    if not isinstance(r, int) or isinstance(r, bool) or r < 0:
        raise ValueError(f"max_retries must be an int >= 0, got {r!r}")
    rank_ = options.get("rank")
    if rank_ is not None:
        if not isinstance(rank_, int) or isinstance(rank_, bool):
            raise TypeError(f"rank must be an int, got {rank_!r}")
    if not isinstance(options.get("strict_rank", False), bool):
        raise TypeError(f"strict_rank must be a bool, got {options['strict_rank']!r}")
    t = options.get("inline_threshold")
    if t is not None and (not isinstance(t, int) or isinstance(t, bool) or t < 0):
        raise ValueError(f"inline_threshold must be an int >= 0 (bytes), got {t!r}")
    c = options.get("replicas")
    if c is not None and (not isinstance(c, int) or isinstance(c, bool) or c < 1):
        raise ValueError(f"replicas must be an int >= 1 (copies of each result), got {c!r}")


def _fn_identity(fn: Callable, what: str) -> tuple[bytes, bytes]:
    blob = dumps(fn, what)
    return hashlib.blake2b(blob, digest_size=16).digest(), blob


_PLAIN = frozenset({int, float, str, bytes, bool, type(None), DepPlaceholder})


def _pack_args(rt: Any, name: str, args: tuple, kwargs: dict, keep: list
               ) -> tuple[bytes, tuple[int, ...]]:
    """Pickle (args, kwargs), top-level refs replaced by placeholders; large values become
    objects of their own (``put``; their refs are appended to ``keep``, which the caller holds
    until the task is submitted, else they would be freed at once).  Raises SerializationError."""
    deps: list[int] = []

    def sub(value: Any) -> Any:
        if isinstance(value, ObjectRef):
            deps.append(value.id)
            return DepPlaceholder(len(deps) - 1)
        return value

    packed_args = [sub(a) for a in args]
    packed_kwargs = {k: sub(v) for k, v in kwargs.items()}
    if all(type(a) in _PLAIN for a in packed_args) and all(type(v) in _PLAIN for v in packed_kwargs.values()):
        # fast path (most fine-grained tasks): the C pickler gives the same bytes for these types
        # as cloudpickle, without building a cloudpickle Pickler per task
        blob = pickle.dumps((packed_args, packed_kwargs), protocol=5)
        if len(blob) <= rt.config.inline_threshold:
            return blob, tuple(deps)
    try:
        blob = dumps((packed_args, packed_kwargs), "arguments")
    except SerializationError:
        for i, a in enumerate(args):
            dumps(a, f"argument {i} of {name}")          # raises, naming the culprit
        for k, v in kwargs.items():
            dumps(v, f"keyword argument {k!r} of {name}")
        raise
    if len(blob) > rt.config.inline_threshold:
        def big(value: Any) -> Any:
            if isinstance(value, DepPlaceholder):
                return value
            if len(dumps(value, "argument")) > rt.config.inline_threshold // 4:
                keep.append(put(value))
                return sub(keep[-1])
            return value
        packed_args = [big(a) for a in packed_args]
        packed_kwargs = {k: big(v) for k, v in packed_kwargs.items()}
        blob = dumps((packed_args, packed_kwargs), "arguments")
    return blob, tuple(deps)


class RemoteFunction:
    """A function made remote with :func:`remote`.  ``f.remote(*args, **kwargs)`` submits a task."""

    def __init__(self, fn: Callable, options: dict) -> None:
        if not callable(fn):
            raise TypeError(f"remote() needs a callable, got {fn!r}")
        _check_options(options)
        self._fn = fn
        self._options = dict(options)
        self._identity: Optional[tuple[bytes, bytes]] = None
        self.__name__ = getattr(fn, "__name__", "task")
        self.__doc__ = getattr(fn, "__doc__", None)
        self.__wrapped__ = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"remote function {self.__name__} cannot be called directly: use "
                        f"{self.__name__}.remote(...)")

    def options(self, **options: Any) -> "RemoteFunction":
        """A copy with other task options: ``num_returns``, ``max_retries``, ``rank``, ``name``,
        ``inline_threshold`` (bytes; results up to this size travel in-band through the
        scheduler on rank 0 to the tasks that use them, larger ones stay in the worker's store
        and move worker-to-worker; ``0`` keeps every result off rank 0, e.g. a shuffle's
        intermediate data; default ``Config.inline_threshold``), ``replicas`` (copies of each
        chunked result, made in the background on other ranks and re-made when a holder dies;
        losing ``replicas - 1`` ranks then re-runs nothing; default ``Config.replication``;
        ValueError at submit if more than the ranks of the job), ``strict_rank`` (with ``rank``:
        default False, pinning is placement: when every copy of a finished result is lost with
        its rank, lineage re-runs the task on another rank; True: the task may only ever run on
        ``rank``, and such a result raises ObjectLostError instead).  A pinned task whose rank
        dies *while it runs* fails with RankLostError either way."""
        _check_options(options)
        other = RemoteFunction(self._fn, {**self._options, **options})
        other._identity = self._identity
        return other

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Submit a task; returns an ObjectRef at once (a list of them if ``num_returns > 1``).

        Raises (at call time, nothing submitted): SerializationError naming the function or the
        argument that cannot be pickled; ValueError for a ``rank`` that is not a worker rank.
        """
        if self._identity is None:
            self._identity = _fn_identity(self._fn, f"function {self.__name__}")
        return submit_task(_rt(), self._identity, self.__name__, args, kwargs, self._options)


def submit_task(rt: Any, identity: tuple[bytes, bytes], name: str, args: tuple, kwargs: dict,
                options: dict, allowed: Optional[tuple[int, ...]] = None,
                init: Optional[tuple[bytes, bytes]] = None, original_errors: bool = False) -> Any:
    """Build a TaskSpec and hand it to the scheduler; returns the ref(s).  ``options`` were
    checked by :func:`_check_options` already; only the pinned rank is checked here.
    ``original_errors`` (Executor): a return value that cannot be pickled fails the ref with
    the pickler's own exception instead of SerializationError."""
    pinned = options.get("rank")
    if pinned is not None and pinned not in rt.worker_ranks:
        raise ValueError(f"rank={pinned} is not a worker rank (worker ranks: {list(rt.worker_ranks)})")
    copies = options.get("replicas")
    if copies is not None and copies > rt.size:
        raise ValueError(f"replicas={copies} exceeds the number of ranks ({rt.size})")
    fn_id, fn_blob = identity
    keep: list = []   # refs of arguments stored as objects: alive until the task is submitted
    args_blob, deps = _pack_args(rt, name, args, kwargs, keep)
    num_returns = options.get("num_returns", 1)
    task_id = rt.ids.next(num_returns)
    sent = rt.sent_blobs
    spec = TaskSpec(
        task_id=task_id, num_returns=num_returns, fn_id=fn_id,
        fn_blob=None if fn_id in sent else fn_blob, args_blob=args_blob, deps=deps,
        owner=rt.rank, name=options.get("name", name), rank=options.get("rank"), allowed=allowed,
        max_retries=options.get("max_retries", 3),
        inline_threshold=options.get("inline_threshold"), replicas=options.get("replicas"),
        strict_rank=bool(options.get("strict_rank", False)),
        init_id=init[0] if init else None,
        init_blob=init[1] if init and init[0] not in sent else None)
    sent.add(fn_id)
    if init:
        sent.add(init[0])
    refs = _new_refs(rt, task_id, num_returns, task_id, original_errors)
    rt.submit(spec)
    del keep   # released after the submit: the scheduler now counts the task's use of them
    return refs[0] if num_returns == 1 else refs


@overload
def remote(fn: Callable) -> RemoteFunction: ...
@overload
def remote(**options: Any) -> Callable[[Callable], RemoteFunction]: ...


def remote(fn: Optional[Callable] = None, **options: Any) -> Any:
    """Make ``fn`` a remote function: ``@remote`` or ``@remote(num_returns=2, max_retries=3)``.

    Options: ``num_returns`` (int >= 1), ``max_retries`` (int >= 0: re-runs after the loss of the
    worker rank running the task; takes effect with rank-loss tolerance, not yet implemented),
    ``rank`` (pin to a worker rank), ``name``.  Raises TypeError/ValueError for unknown options or
    bad values.
    """
    if fn is not None:
        if options:
            raise TypeError("use @remote or @remote(**options), not both")
        return RemoteFunction(fn, {})
    _check_options(options)
    return lambda f: RemoteFunction(f, options)


# --- collectives (Hoplite) ---------------------------------------------------------------------

def broadcast(ref: ObjectRef, ranks: Optional[Sequence[int]] = None, timeout: Optional[float] = None) -> None:
    """Block until every rank of ``ranks`` (default: all) holds a complete copy of ``ref``'s object.

    Receiver-driven (Hoplite §3.3): each target asks the object's directory shard for a sender and
    is given the tail of the shortest chain of complete or partial copies, so simultaneous
    receivers form a pipeline and finished ones serve later ones; no rank sends N copies.  The ref
    may still be computing.  Dead ranks (ULFM) are not waited for; a receiver whose sender dies
    resumes from its byte offset from another holder.  Raises TypeError/ValueError for bad
    arguments, TimeoutError after ``timeout`` seconds (copies made so far stay),
    ObjectDeletedError, the task's error if the object is an error object, or HopliteError
    naming the ranks whose copy failed otherwise (e.g. a TransferError); copies made stay.
    """
    _check_refs([ref], "broadcast")
    rt = _rt()
    if ranks is None:
        targets = list(range(rt.size))
    else:
        targets = list(dict.fromkeys(ranks))
        for r in targets:
            if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < rt.size:
                raise ValueError(f"broadcast target {r!r} is not a rank (0..{rt.size - 1})")
    fut = rt.waiter()
    deadline = None if timeout is None else time.monotonic() + timeout
    rt.call_soon(rt.start_broadcast, ref.id, targets, fut.set_result)
    with _Blocking(rt, [ref]):
        try:
            errors = fut.result(timeout)
            if not errors:   # the object exists: its ref completes too (the notifier may lag)
                exc = cf.Future.exception(ref, _remaining(deadline))
        except cf.TimeoutError:
            raise cf.TimeoutError(f"broadcast of {ref.hex()} not complete after {timeout} s") from None
    if errors:
        if all(e == "deleted" for e in errors.values()):
            raise ObjectDeletedError(ref.hex())
        raise HopliteError(f"broadcast of {ref.hex()} failed on ranks {errors}")
    if exc is not None:      # an error object: every target holds it, the call raises it
        raise exc


def _collective(refs: Sequence[ObjectRef], op: Any, num: Optional[int], rank_: Optional[int],
                allreduce: bool) -> ObjectRef:
    from .collectives import resolve_op

    refs = list(refs)
    what = "allreduce" if allreduce else "reduce"
    if not refs:
        raise ValueError(f"{what}() needs at least one input ref")
    _check_refs(refs, what)
    ufunc = resolve_op(op)
    n = len(refs)
    num = n if num is None else num
    if not isinstance(num, int) or isinstance(num, bool) or not 1 <= num <= n:
        raise ValueError(f"num must be an int within 1..{n}, got {num!r}")
    rt = _rt()
    target = rt.rank if rank_ is None else rank_
    if not isinstance(target, int) or isinstance(target, bool) or not 0 <= target < rt.size:
        raise ValueError(f"rank must be within 0..{rt.size - 1}, got {target!r}")
    _check_op_now(rt, refs, ufunc, what)
    reduce_id = rt.ids.next(2)
    result_id = reduce_id + 1
    op_blob = pickle.dumps(ufunc)
    ref = rt.register_ref(ObjectRef(result_id))
    ref._inputs = refs      # inputs stay alive (not auto-freed) while the result ref lives
    inputs = [r.id for r in refs]
    if rt.scheduler is not None:
        ref._owner = rt
        rt.call_soon(rt.start_reduce, reduce_id, inputs, op_blob, num, target, result_id, allreduce)
    else:
        from .protocol import ReduceRequest
        rt.call_soon(rt.send, 0, ReduceRequest(reduce_id, tuple(inputs), op_blob, num, target, allreduce))
        rt.watch(result_id)
    return ref


def _check_op_now(rt: Any, refs: Sequence[ObjectRef], ufunc: Any, what: str) -> None:
    """Raise TypeError at call time if an input known here already has a dtype that ``ufunc``
    cannot combine in place (otherwise the coordinator fails the result at the first input)."""
    from .collectives import check_op_dtype
    for ref in refs:
        info = rt.info(ref.id) if ref.done() else None   # (a read of engine state: a hint)
        head = None if info is None or info.error else (
            info.inline[0] if info.inline is not None else info.head)
        if head is None or len(info.sizes) != 2:
            continue
        try:
            arr = pickle.loads(head, buffers=[np.empty(info.sizes[1], np.uint8)])
        except Exception:
            continue
        if isinstance(arr, np.ndarray):
            why = check_op_dtype(ufunc, arr.dtype)
            if why is not None:
                raise TypeError(f"{what}() input {ref.hex()}: {why}")
        return


def reduce(refs: Sequence[ObjectRef], op: Any = "sum", num: Optional[int] = None,
           rank: Optional[int] = None) -> ObjectRef:
    """Element-wise reduce of numpy arrays; returns a ref at once (Hoplite §3.4 tree-chain).

    Args:
        refs: refs of C-contiguous numpy arrays of one shape and numeric dtype; they may still be
            computing.
        op: "sum", "prod", "min", "max", or any binary numpy ufunc.
        num: reduce the first ``num`` inputs to become ready (subset reduce, for asynchronous
            SGD); the others are not waited for.  Default: all.
        rank: where the result lives (default: the calling rank).

    The tree is built at run time in arrival order; every slot combines chunk ``i`` of its
    children while chunk ``i+1`` is still arriving; once one input is still to come, the result's
    rank accumulates the others and then adds the last one itself.  Raises (at call time)
    ValueError for an empty list, a bad ``num``/``rank`` or unknown op name, TypeError for
    non-refs or a non-ufunc op.  The returned ref fails with ValueError (naming the offending
    input) for a shape/dtype mismatch, TypeError for non-numeric inputs, or an input task's
    exception.  Under ULFM, a rank holding an input or a tree step that dies makes the reduce
    re-plan without it (lost inputs rebuilt from lineage; a ``num`` subset already chosen is
    kept; the new tree computes only the chunks after those the result had given out); the
    result is the failure-free one.  If ``rank`` itself dies the ref fails with
    HopliteError; an input that cannot be rebuilt fails it with ObjectLostError.
    """
    return _collective(refs, op, num, rank, allreduce=False)


def allreduce(refs: Sequence[ObjectRef], op: Any = "sum", num: Optional[int] = None) -> ObjectRef:
    """Like :func:`reduce` (result on the calling rank), and every rank that produced a reduced
    input also holds the result when the ref completes: the copies chain on the result as it is
    being produced (pipelined, not reduce-then-broadcast)."""
    return _collective(refs, op, num, None, allreduce=True)


def reduced_inputs(red: ObjectRef, timeout: Optional[float] = None) -> list[ObjectRef]:
    """The input refs that went into the reduce ``red`` (waits until it completes; driver only).

    Raises the reduce's error if it failed, TimeoutError, or HopliteError off the driver."""
    _check_refs([red], "reduced_inputs")
    rt = _rt()
    cf.Future.result(red, timeout)
    used = rt.reduced.get(red.id) if rt.scheduler is not None else None
    if used is None:
        raise HopliteError(f"{red.hex()} is not the result of a reduce made on this driver")
    by_id = {r.id: r for r in getattr(red, "_inputs", ())}
    return [by_id[oid] for oid in used]
