"""``Executor``: a ``concurrent.futures.Executor`` over the hoplite_mpi runtime.

A drop-in for ``mpi4py.futures.MPIPoolExecutor`` under static launch (``python -m hoplite_mpi``)
and for ``MPICommExecutor`` inside an SPMD program (``with Executor(comm=comm, root=0) as ex``:
``ex`` is the executor on the root and ``None`` on the other ranks, which serve tasks until the
root leaves the block).  The futures it returns are :class:`~hoplite_mpi.api.ObjectRef`.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import itertools
import threading
import time
import traceback
import weakref
from typing import Any, Callable, Iterable, Iterator, Optional

import logging

from . import session
from .errors import SerializationError
from .objectref import ObjectRef, cancel_refs
from .progressbars import counting
from .remote_functions import fn_identity, submit_task

log = logging.getLogger("hoplite_mpi")

# Constructor keywords of MPIPoolExecutor that only matter for dynamic process spawning; accepted
# (so code written for mpi4py runs unchanged) and ignored under static launch.
_SPAWN_KEYWORDS = {"python_exe", "python_args", "mpi_info", "globals", "main", "path", "wdir",
                   "env", "use_pkl5", "backoff", "max_tasks_per_child", "mp_context"}


def _apply_chunk(fn: Callable, chunk: list) -> list:
    return [fn(*args) for args in chunk]


def _left(deadline: Optional[float]) -> Optional[float]:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _take(fut: cf.Future, deadline: Optional[float], chunksize: int) -> list:
    """The results of one map task, last first (popped one by one, so none is kept)."""
    value = fut.result(_left(deadline))
    values = [value] if chunksize == 1 else value[::-1]
    del value
    return values


def _is_comm(obj: Any) -> bool:
    try:
        from mpi4py import MPI
    except ImportError:   # pragma: no cover (mpi4py is a dependency)
        return False
    return isinstance(obj, MPI.Comm)


class _CommMode:
    """An Executor's ``MPICommExecutor`` mode: the communicator and root it was given, and the
    state of its current ``with`` block (``owns_runtime``: the block started the runtime and
    shuts it down at its end; ``as_server``: this rank serves tasks in the block)."""

    def __init__(self, comm: Any, root: int) -> None:
        self.comm, self.root = comm, root
        self.owns_runtime = False
        self.entered = False
        self.as_server = False


class Executor(cf.Executor):
    """Run callables as hoplite_mpi tasks.

    Args:
        max_workers: use at most this many worker ranks (ranks 1..max_workers); None = all.
        initializer: called with ``*initargs`` once on each worker rank before its first task of
            this executor.  If it raises, that task and every later one fail with
            ``concurrent.futures.BrokenExecutor`` and ``submit`` raises it.
        comm, root: ``MPICommExecutor`` mode (use as a context manager on every rank of ``comm``);
            ``Executor(comm, root)``, MPICommExecutor's positional form, means the same.
        **kwargs: runtime options (see ``Config``) when this executor starts the runtime, and the
            spawn-only keywords of ``MPIPoolExecutor`` (accepted, ignored).

    Raises:
        ValueError: ``max_workers <= 0``; ``comm`` not an intracommunicator or ``root`` not one
            of its ranks.  TypeError: ``initializer`` not callable, unknown keyword.
        Nothing is started when the constructor raises.

    Several executors may be alive at once; ``shutdown()`` of one waits for (or cancels) its own
    futures only and leaves the runtime running, except in ``comm`` mode where the executor owns
    the runtime it started.
    """

    def __init__(self, max_workers: Optional[int] = None, initializer: Optional[Callable] = None,
                 initargs: tuple = (), *, comm: Any = None, root: int = 0, **kwargs: Any) -> None:
        if comm is None and _is_comm(max_workers):
            # Executor(comm[, root]): MPICommExecutor's positional form
            comm, max_workers = max_workers, None
            if isinstance(initializer, int) and not isinstance(initializer, bool):
                root, initializer = initializer, None
        if max_workers is not None:
            if not isinstance(max_workers, int) or max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if comm is not None:
            if not _is_comm(comm) or comm.Is_inter():
                raise ValueError(f"comm must be an MPI intracommunicator, got {comm!r}")
            if not isinstance(root, int) or not 0 <= root < comm.Get_size():
                raise ValueError(f"root must be within 0..{comm.Get_size() - 1}, got {root!r}")
        self._options = {k: v for k, v in kwargs.items() if k not in _SPAWN_KEYWORDS}
        from .config import Config
        Config.from_sources(self._options)   # unknown keywords / bad values fail here, on every rank
        self._max_workers = max_workers
        self._init = (initializer, tuple(initargs)) if initializer is not None else None
        self._init_identity: Optional[tuple[bytes, bytes]] = None    # (pickled at first submit)
        self._comm_mode = _CommMode(comm, root) if comm is not None else None
        self._lock = threading.Lock()
        self._pending: set = set()
        self._shutdown = False
        self._broken: Optional[str] = None
        self._breaking = False       # the initializer's failure was logged (once)
        # function -> its pickled identity; weak keys, so the executor does not keep submitted
        # functions (and what they reference, e.g. a bound method's object) alive
        self._fn_ids: "weakref.WeakKeyDictionary[Callable, tuple[bytes, bytes]]" = \
            weakref.WeakKeyDictionary()
        if comm is None:
            if session.is_initialized() and self._options:
                log.warning("Executor(%s): the runtime is already running; its options stay as they are",
                            ", ".join(f"{k}={v!r}" for k, v in self._options.items()))
            session.init(**self._options)   # serves and exits on non-driver ranks (static launch)

    # --- context manager (MPICommExecutor convention) ---------------------------------------

    def __enter__(self) -> Optional["Executor"]:
        """Pool mode: returns this executor.  ``comm`` mode (collective over ``comm``): starts
        the runtime on ``comm`` unless one is running, returns this executor on ``root`` and
        ``None`` on the other ranks once the root has left the block (they serve tasks until
        then).  Each block starts afresh (not shut down, not broken).

        Raises RuntimeError (``comm`` mode) if this executor is already inside a ``with`` block."""
        mode = self._comm_mode
        if mode is None:
            return self
        if mode.entered:
            raise RuntimeError("this executor is already entered (a with block inside its own with block)")
        rt, mode.owns_runtime = session.start_or_join(mode.comm, mode.root, self._options)
        mode.entered = True
        with self._lock:
            self._shutdown = False
            self._broken = None
            self._breaking = False
        if rt.rank != 0:
            mode.as_server = True
            try:
                rt.serve()
            finally:
                session.served(rt)
                mode.entered = False
            return None
        mode.as_server = False
        return self

    def __exit__(self, *exc: Any) -> bool:
        mode = self._comm_mode
        if mode is not None and mode.as_server:
            return False
        try:
            self.shutdown(wait=True)
            if mode is not None and mode.owns_runtime:
                session.shutdown()
                mode.owns_runtime = False
        finally:
            if mode is not None:
                mode.entered = False
        return False

    def bootup(self, wait: bool = True) -> "Executor":
        """Make the executor ready to run tasks and return it (as ``MPIPoolExecutor.bootup``).

        The runtime is started when the executor is made (or entered, in ``comm`` mode), so this
        only checks the state: ``wait`` is accepted for compatibility and changes nothing.
        Raises RuntimeError after ``shutdown()``; leaves the executor as it was."""
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot bootup after shutdown")
        return self

    # --- submission -------------------------------------------------------------------------

    def _allowed(self, rt: Any) -> Optional[tuple[int, ...]]:
        if self._max_workers is None or self._max_workers >= len(rt.worker_ranks):
            return None
        return tuple(rt.worker_ranks[: self._max_workers])

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> ObjectRef:
        """Submit ``fn(*args, **kwargs)``; returns an ObjectRef (a Future).

        Raises RuntimeError after shutdown, BrokenExecutor if the initializer failed, TypeError if
        ``fn`` is not callable; nothing is submitted then.  If ``fn`` or an argument cannot be
        pickled, nothing is submitted and the returned future is already failed with the
        exception pickling raised (as ``concurrent.futures`` / ``mpi4py.futures`` deliver it);
        a return value that cannot be pickled fails the future with the pickler's exception
        too (remote traceback as ``__cause__``).
        The executor keeps no reference to ``fn``, the arguments or the result once the future
        is done.
        """
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        with self._lock:
            if self._broken:
                raise cf.BrokenExecutor(self._broken)
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
        rt = session.current()
        name = getattr(fn, "__name__", "task")
        try:
            identity = self._identity(fn, name)
            init = None
            if self._init is not None:
                if self._init_identity is None:
                    self._init_identity = fn_identity(self._init, "the executor's initializer")
                init = self._init_identity
            ref = submit_task(rt, identity, name, args, kwargs, {}, self._allowed(rt), init,
                                  original_errors=True)
        except SerializationError as exc:
            ref = ObjectRef(-1)
            # the pickler's own exception (SerializationError wraps it as __cause__)
            ref.set_exception(exc.__cause__ if exc.__cause__ is not None else exc)
            return ref
        with self._lock:
            self._pending.add(ref)
        ref._before_fail = self._failing
        ref.add_done_callback(self._finished)
        return ref

    def _identity(self, fn: Callable, name: str) -> tuple[bytes, bytes]:
        try:
            identity = self._fn_ids.get(fn)
        except TypeError:          # not weak-referenceable / not hashable: no cache
            identity = None
        if identity is None:
            identity = fn_identity(fn, f"function {name}")
            try:
                self._fn_ids[fn] = identity
            except TypeError:
                pass
        return identity

    def _finished(self, ref: ObjectRef) -> None:
        with self._lock:
            self._pending.discard(ref)

    def _failing(self, exc: BaseException) -> None:
        """(notifier thread) A future of this executor is about to fail with ``exc``: an
        initializer's failure breaks the executor first, so that whoever sees the future fail
        finds it broken (and the failure logged)."""
        if isinstance(exc, cf.BrokenExecutor):
            with self._lock:
                first = not self._breaking
                self._breaking = True
            if first:
                # as the stdlib pools do when an initializer raises; logged before the executor
                # is seen broken (CPython's test_initializer checks the log once it is)
                cause = exc.__cause__ if exc.__cause__ is not None else exc
                logging.getLogger("concurrent.futures").critical(
                    "Exception in initializer:\n%s",
                    "".join(traceback.format_exception(type(cause), cause, cause.__traceback__)))
            with self._lock:
                self._broken = str(exc)

    def map(self, fn: Callable, *iterables: Iterable, timeout: Optional[float] = None,
            chunksize: int = 1, buffersize: Optional[int] = None, unordered: bool = False,
            progress: Optional[bool] = None) -> Iterator:
        """Like ``concurrent.futures.Executor.map``: results in input order (or completion order
        with ``unordered=True``, as in mpi4py.futures).  ``timeout`` (seconds, from this call)
        raises ``TimeoutError`` from the iterator; ``chunksize`` items go to one task;
        ``buffersize`` (Python 3.14 / mpi4py 4.1) submits at most that many tasks (chunks) ahead
        of the results taken from the iterator, reading ``iterables`` lazily.  ``progress``: a
        tqdm bar of the results taken (None: only when stderr is a terminal; hoplite_mpi.progress).

        Raises (at call time) ValueError for ``chunksize < 1``, ``buffersize < 1`` or
        ``buffersize`` with ``unordered``; TypeError for a non-int ``buffersize``; the errors of
        :meth:`submit`.  When the iterator is closed or raises, the tasks not started yet are
        cancelled.  The iterator keeps no reference to a result it has yielded."""
        if not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None:
            if not isinstance(buffersize, int) or isinstance(buffersize, bool):
                raise TypeError("buffersize must be an integer or None")
            if buffersize < 1:
                raise ValueError("buffersize must be None or > 0")
            if unordered:
                raise ValueError("buffersize cannot be used with unordered=True")
        deadline = None if timeout is None else time.monotonic() + timeout
        items = zip(*iterables)
        if chunksize == 1:
            tasks: Iterator = (self.submit(fn, *args) for args in items)
        else:
            tasks = (self.submit(_apply_chunk, fn, chunk)
                     for chunk in iter(lambda: list(itertools.islice(items, chunksize)), []))
        futures = collections.deque(tasks if buffersize is None else itertools.islice(tasks, buffersize))

        def results() -> Iterator:
            try:
                if unordered:
                    for fut in cf.as_completed(list(futures), timeout=_left(deadline)):
                        futures.remove(fut)
                        values = _take(fut, deadline, chunksize)
                        del fut
                        while values:
                            yield values.pop()
                    return
                while futures:
                    values = _take(futures.popleft(), deadline, chunksize)
                    if buffersize is not None:
                        futures.extend(itertools.islice(tasks, 1))
                    while values:
                        yield values.pop()
            finally:
                cancel_refs(list(futures))
        total = None
        if all(hasattr(it, "__len__") for it in iterables) and iterables:
            total = min(len(it) for it in iterables)     # type: ignore[arg-type]
        return counting(results(), progress, getattr(fn, "__name__", "map"), total)

    def starmap(self, fn: Callable, iterable: Iterable, timeout: Optional[float] = None,
                chunksize: int = 1, buffersize: Optional[int] = None,
                unordered: bool = False, progress: Optional[bool] = None) -> Iterator:
        """``map`` with argument tuples (as ``mpi4py.futures``)."""
        return self.map(fn, *zip(*iterable), timeout=timeout, chunksize=chunksize,
                        buffersize=buffersize, unordered=unordered, progress=progress)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks (later ``submit`` raises RuntimeError); with ``cancel_futures``
        cancel this executor's tasks not placed on a worker yet (their futures end cancelled);
        with ``wait`` return once every future of this executor is done or cancelled.  Running
        tasks are never interrupted.  The runtime keeps running (in ``comm`` mode it stops when
        the ``with`` block ends).  Idempotent; raises nothing."""
        with self._lock:
            self._shutdown = True
            pending = list(self._pending)
        if cancel_futures:
            cancel_refs(pending)
        if wait and pending and session.is_initialized():
            cf.wait(pending)

    @property
    def num_workers(self) -> int:
        """Worker ranks this executor may use; 0 once it is shut down or broken (as
        ``MPIPoolExecutor.num_workers``)."""
        with self._lock:
            if self._shutdown or self._broken:
                return 0
        rt = session.current()
        allowed = self._allowed(rt)
        return len(allowed) if allowed else len(rt.worker_ranks)
