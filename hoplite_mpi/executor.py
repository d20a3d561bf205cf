"""``Executor``: a ``concurrent.futures.Executor`` over the hoplite_mpi runtime.

A drop-in for ``mpi4py.futures.MPIPoolExecutor`` under static launch (``python -m hoplite_mpi``)
and for ``MPICommExecutor`` inside an SPMD program (``with Executor(comm=comm, root=0) as ex``:
``ex`` is the executor on the root and ``None`` on the other ranks, which serve tasks until the
root leaves the block).  The futures it returns are :class:`~hoplite_mpi.api.ObjectRef`.
"""
from __future__ import annotations

import concurrent.futures as cf
import itertools
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Optional

import logging

from . import api
from .errors import SerializationError

log = logging.getLogger("hoplite_mpi")

# Constructor keywords of MPIPoolExecutor that only matter for dynamic process spawning; accepted
# (so code written for mpi4py runs unchanged) and ignored under static launch.
_SPAWN_KEYWORDS = {"python_exe", "python_args", "mpi_info", "globals", "main", "path", "wdir",
                   "env", "use_pkl5", "backoff", "max_tasks_per_child", "mp_context"}


def _apply_chunk(fn: Callable, chunk: list) -> list:
    return [fn(*args) for args in chunk]


class Executor(cf.Executor):
    """Run callables as hoplite_mpi tasks.

    Args:
        max_workers: use at most this many worker ranks (ranks 1..max_workers); None = all.
        initializer: called with ``*initargs`` once on each worker rank before its first task of
            this executor.  If it raises, that task and every later one fail with
            ``concurrent.futures.BrokenExecutor`` and ``submit`` raises it.
        comm, root: ``MPICommExecutor`` mode (use as a context manager on every rank of ``comm``).
        **kwargs: runtime options (see ``Config``) when this executor starts the runtime, and the
            spawn-only keywords of ``MPIPoolExecutor`` (accepted, ignored).

    Raises:
        ValueError: ``max_workers <= 0``.  TypeError: ``initializer`` not callable, unknown keyword.

    Several executors may be alive at once; ``shutdown()`` of one waits for (or cancels) its own
    futures only and leaves the runtime running, except in ``comm`` mode where the executor owns
    the runtime it started.
    """

    def __init__(self, max_workers: Optional[int] = None, initializer: Optional[Callable] = None,
                 initargs: tuple = (), *, comm: Any = None, root: int = 0, **kwargs: Any) -> None:
        if max_workers is not None:
            if not isinstance(max_workers, int) or max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._options = {k: v for k, v in kwargs.items() if k not in _SPAWN_KEYWORDS}
        from .config import Config
        Config.from_sources(self._options)   # unknown keywords / bad values fail here, on every rank
        self._max_workers = max_workers
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._comm = comm
        self._root = root
        self._lock = threading.Lock()
        self._pending: set = set()
        self._shutdown = False
        self._broken: Optional[str] = None
        self._owns_runtime = False
        self._entered_as_server = False
        self._init_identity: Optional[tuple[bytes, bytes]] = None
        self._fn_ids: dict = {}
        if comm is None:
            if api.is_initialized() and self._options:
                log.warning("Executor(%s): the runtime is already running; its options stay as they are",
                            ", ".join(f"{k}={v!r}" for k, v in self._options.items()))
            api.init(**self._options)   # serves and exits on non-driver ranks (static launch)

    # --- context manager (MPICommExecutor convention) ---------------------------------------

    def __enter__(self) -> Optional["Executor"]:
        if self._comm is None:
            return self
        with api._init_lock:
            if api._runtime is None:
                rt = api._start(self._comm, self._root, self._options)
                api._runtime = rt
                self._owns_runtime = True
            else:
                rt = api._runtime
        if rt.rank != 0:
            self._entered_as_server = True
            rt.serve()
            with api._init_lock:
                api._runtime = None
            return None
        return self

    def __exit__(self, *exc: Any) -> bool:
        if self._entered_as_server:
            return False
        self.shutdown(wait=True)
        if self._owns_runtime:
            api.shutdown()
        return False

    # --- submission -------------------------------------------------------------------------

    def _allowed(self, rt: Any) -> Optional[tuple[int, ...]]:
        if self._max_workers is None or self._max_workers >= len(rt.worker_ranks):
            return None
        return tuple(rt.worker_ranks[: self._max_workers])

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> "api.ObjectRef":
        """Submit ``fn(*args, **kwargs)``; returns an ObjectRef (a Future).

        Raises RuntimeError after shutdown, BrokenExecutor if the initializer failed, TypeError if
        ``fn`` is not callable.  A function/argument that cannot be pickled gives a future that
        fails with SerializationError (as ``concurrent.futures`` delivers pickling errors).
        """
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        with self._lock:
            if self._broken:
                raise cf.BrokenExecutor(self._broken)
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
        rt = api._rt()
        name = getattr(fn, "__name__", "task")
        try:
            identity = self._fn_ids.get(id(fn))
            if identity is None or identity[0] is not fn:
                identity = (fn, api._fn_identity(fn, f"function {name}"))
                self._fn_ids[id(fn)] = identity
            init = None
            if self._initializer is not None:
                if self._init_identity is None:
                    self._init_identity = api._fn_identity((self._initializer, self._initargs),
                                                           "the executor's initializer")
                init = self._init_identity
            ref = api.submit_task(rt, identity[1], name, args, kwargs, {}, self._allowed(rt), init)
        except SerializationError as exc:
            ref = api.ObjectRef(-1)
            ref.set_exception(exc)
            return ref
        with self._lock:
            self._pending.add(ref)
        ref.add_done_callback(self._finished)
        return ref

    def _finished(self, ref: "api.ObjectRef") -> None:
        with self._lock:
            self._pending.discard(ref)
        if not ref.cancelled() and isinstance(ref.exception(), cf.BrokenExecutor):
            with self._lock:
                self._broken = str(ref.exception())

    def map(self, fn: Callable, *iterables: Iterable, timeout: Optional[float] = None,
            chunksize: int = 1, unordered: bool = False) -> Iterator:
        """Like ``concurrent.futures.Executor.map``: results in input order (or completion order
        with ``unordered=True``, as in mpi4py.futures).  ``timeout`` (seconds, from this call)
        raises ``TimeoutError`` from the iterator; ``chunksize`` items go to one task."""
        if not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        deadline = None if timeout is None else time.monotonic() + timeout
        items = zip(*iterables)
        if chunksize == 1:
            futures = [self.submit(fn, *args) for args in items]
        else:
            futures = []
            while True:
                chunk = list(itertools.islice(items, chunksize))
                if not chunk:
                    break
                futures.append(self.submit(_apply_chunk, fn, chunk))

        def results() -> Iterator:
            try:
                order = cf.as_completed(futures, timeout=None if deadline is None else
                                        max(0.0, deadline - time.monotonic())) if unordered else iter(futures)
                for fut in order:
                    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                    value = fut.result(remaining)
                    if chunksize == 1:
                        yield value
                    else:
                        yield from value
            finally:
                for fut in futures:
                    fut.cancel()
        return results()

    def starmap(self, fn: Callable, iterable: Iterable, timeout: Optional[float] = None,
                chunksize: int = 1, unordered: bool = False) -> Iterator:
        """``map`` with argument tuples (as ``mpi4py.futures``)."""
        return self.map(fn, *zip(*iterable), timeout=timeout, chunksize=chunksize, unordered=unordered)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; with ``cancel_futures`` cancel those not placed yet; with ``wait``
        wait until this executor's futures are done.  The runtime keeps running."""
        with self._lock:
            self._shutdown = True
            pending = list(self._pending)
        if cancel_futures:
            for ref in pending:
                ref.cancel()
        if wait and pending and api._runtime is not None:
            cf.wait(pending)

    @property
    def num_workers(self) -> int:
        """Worker ranks this executor may use."""
        rt = api._rt()
        allowed = self._allowed(rt)
        return len(allowed) if allowed else len(rt.worker_ranks)
