"""Task execution on a rank: a bounded number of running tasks, threads spawned on demand.

The engine thread appends :class:`~hoplite_mpi.protocol.RunTask` messages to a queue; executor
threads take them from it while holding one of ``worker_threads`` slots.  A task blocked in a nested
``get``/``wait`` gives its slot back (and the scheduler is told, so it places more tasks here): a
task that submits tasks and waits for them never deadlocks, even when every worker is busy that way
(Ray does the same with CPU resources).

The executor thread loads the function, resolves the arguments (fetching large inputs from their
holders), runs the task and serializes the return values; the engine then stores them and reports.
A task's exception becomes an error object; the worker goes on.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any, Callable, Optional

from . import faults
from . import tracing as timeline
from .ids import format_id
from .protocol import ObjectInfo, RunTask, TaskSpec
from .serialization import (deserialize, held_only_by_caller, loads, rebuild_error, serialize,
                            serialize_error, sole_owner)

log = logging.getLogger("hoplite_mpi")

_context = threading.local()


def current_task_id() -> int | None:
    """Id of the task the calling thread runs, or None outside tasks."""
    return getattr(_context, "task_id", None)


def current_task_name() -> str | None:
    """Name of the task the calling thread runs (its ``name`` option, else its function's
    name), or None outside tasks; still set while its result is reported."""
    return getattr(_context, "name", None)


def last_task_seconds() -> float:
    """(executor thread, while a finished task is reported) The seconds its function ran (not
    the fetch of its inputs, nor pickling its result); 0 if it failed before running."""
    return getattr(_context, "seconds", 0.0)


def task_key() -> str | None:
    """The durable key (32 hex digits) of the checkpointed task the calling thread runs, or
    None (not in a task, or a task without a checkpoint).  The same in every run of the
    program: an idempotency token for the task's side effects (a task may run again until its
    result is committed; see ``hoplite_mpi.durable``)."""
    return getattr(_context, "key", None)


def guard_exit(notify: Callable[[int, int], None]) -> None:
    """Make ``os._exit`` called by a task on this (worker) rank a reported, prompt rank loss.

    The task's ``os._exit(status)`` first calls ``notify(task_id, status)`` (which tells rank 0
    that the task, not the rank, is the cause) and then exits with status 0.  Why 0: PRRTE tells
    the surviving ranks (ULFM) at once about a process that ended with status 0 without
    MPI_Finalize, but never about one that ended with a non-zero status (measured: a plain mpi4py
    job under ``--with-ft ulfm``, ``os._exit(0)`` seen by the others after ~50 ms,
    ``os._exit(3)`` not within 20 s: only the runtime's heartbeat found it, 11 s later), and
    mpirun then returns that status as the job's although the driver ended normally.  Calls from
    other threads (the runtime's own exits) are passed on unchanged.
    """
    real = getattr(os._exit, "__wrapped__", os._exit)

    def _exit(status: int = 0) -> None:
        task_id = current_task_id()
        if task_id is not None:
            try:
                notify(task_id, int(status))
            except BaseException:     # (the rank ends anyway)
                pass
            status = 0
        real(status)
    _exit.__wrapped__ = real
    os._exit = _exit


class DepPlaceholder:
    """Stands for the i-th top-level ObjectRef argument inside a pickled ``(args, kwargs)``."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __reduce__(self):
        return (DepPlaceholder, (self.index,))


class BusyClock:
    """When this rank runs tasks (thread-safe): ``busy_s``, wall seconds with at least one task
    running; ``idle_cpu_s``, this process's CPU seconds (every thread: polling, serving,
    messages) while none ran, i.e. what the runtime costs a rank that has nothing to do."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._busy = 0.0
        self._idle_cpu = 0.0
        self._since = time.perf_counter()        # start of the current busy period
        self._cpu_mark = time.process_time()     # start of the current idle period

    def begin(self) -> None:
        with self._lock:
            if not self._running:
                self._idle_cpu += time.process_time() - self._cpu_mark
                self._since = time.perf_counter()
            self._running += 1

    def end(self) -> None:
        with self._lock:
            self._running -= 1
            if not self._running:
                self._busy += time.perf_counter() - self._since
                self._cpu_mark = time.process_time()

    def read(self) -> tuple[float, float]:
        """(busy_s, idle_cpu_s) up to now."""
        with self._lock:
            if self._running:
                return self._busy + time.perf_counter() - self._since, self._idle_cpu
            return self._busy, self._idle_cpu + time.process_time() - self._cpu_mark


class Functions:
    """The functions and executor initializers sent to this rank (``RunTask.blobs``), each
    loaded, or run, once (thread-safe)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self._blobs: dict[bytes, bytes] = {}
        self._loaded: dict[bytes, Any] = {}
        self._inits: dict[bytes, BaseException | None] = {}
        self._lock = threading.Lock()

    def add(self, blobs: tuple) -> None:
        """(engine thread) ``(key, blob)`` pairs of a RunTask."""
        for key, blob in blobs:
            self._blobs[key] = blob

    def function(self, fn_id: bytes) -> Any:
        fn = self._loaded.get(fn_id)
        if fn is None:
            with self._lock:
                fn = self._loaded.get(fn_id)
                if fn is None:
                    fn = self._loaded[fn_id] = loads(self._blobs[fn_id])
        return fn

    def initialize(self, init_id: bytes) -> None:
        """Run an Executor's initializer once on this rank; if it raised, every task of that
        executor fails with BrokenExecutor (as in concurrent.futures / mpi4py.futures)."""
        from concurrent.futures import BrokenExecutor

        with self._lock:
            if init_id not in self._inits:
                try:
                    initializer, initargs = loads(self._blobs[init_id])
                    initializer(*initargs)
                    self._inits[init_id] = None
                except BaseException as exc:
                    log.error("rank %d: executor initializer failed: %r", self.rank, exc)
                    self._inits[init_id] = exc
            error = self._inits[init_id]
        if error is not None:
            raise BrokenExecutor(f"the executor's initializer raised {error!r} on rank {self.rank}") from error


class TaskRunner:
    """Runs one task on the calling thread: loads its function, resolves its arguments, runs it,
    serializes its return values and hands them to ``finished``.  :class:`Worker` runs tasks on
    executor threads; the simulation's ``SimWorker`` runs them inline.

    Args:
        rank: this rank.
        threads: tasks run at the same time (``Config.worker_threads``).
        fetch: ``fetch(info) -> frames``, blocking, called from executor threads to get an input.
        finished: ``finished(spec, results)`` called on an executor thread when a task ends;
            ``results`` is a list of ``(frames, is_error)`` per return value.
        held: ``held(object_id) -> bool``, thread-safe: whether this rank has the object already.
    """

    def __init__(self, rank: int, threads: int, fetch: Callable[[ObjectInfo], list],
                 finished: Callable[[TaskSpec, list], None],
                 held: Callable[[int], bool] = lambda oid: False) -> None:
        self.rank = rank
        self.threads = threads
        self.functions = Functions(rank)
        self.executed = 0
        self.clock = BusyClock()
        self._fetch = fetch
        self._held = held
        self._finished = finished

    def block(self) -> None:
        """The calling thread waits on other tasks (see :meth:`Worker.block`)."""
        raise NotImplementedError

    def revoke(self, task_id: int) -> Optional[RunTask]:
        """(engine thread) Drop a queued task that has not started (a cancel): its RunTask, or
        None if it has started, finished or is unknown (then it runs to its end)."""
        return None

    def unblock(self) -> None:
        """The calling thread goes on (see :meth:`Worker.unblock`)."""
        raise NotImplementedError

    def _execute(self, msg: RunTask) -> None:
        faults.reached("task")
        spec = msg.spec
        _context.task_id = spec.task_id
        _context.name = spec.name or "task"
        _context.key = spec.durable[1] if spec.durable is not None else None
        _context.blocked = False
        _context.seconds = 0.0
        started = time.perf_counter()
        self.clock.begin()
        try:
            results = self._run(spec, msg.deps)
        except BaseException as exc:  # the task's own error, or a failure to load/resolve it
            error = serialize_error(exc, self.rank)
            results = [(error, True)] * spec.num_returns
        finally:
            _context.task_id = _context.key = None
            self.clock.end()
        self.executed += 1
        rec = timeline.recorder
        if rec is not None:
            rec.complete(spec.name or "task", "task", started, time.perf_counter(),
                         {"task": format_id(spec.task_id), "error": any(e for _, e in results)})
        try:
            self._finished(spec, results)
        finally:
            _context.name = None

    def _run(self, spec: TaskSpec, deps: tuple[ObjectInfo, ...]) -> list:
        if spec.init_id is not None:
            self.functions.initialize(spec.init_id)
        fn = self.functions.function(spec.fn_id)
        values = []
        waited = time.perf_counter()
        for info in deps:
            frames = info.inline if info.inline is not None else self._fetch_unslotted(info)
            if info.error:
                raise rebuild_error(frames)
            values.append(deserialize(frames))
        rec = timeline.recorder
        if rec is not None and any(info.inline is None for info in deps):
            rec.complete("inputs", "wait", waited, time.perf_counter(),
                         {"task": format_id(spec.task_id)})
        args, kwargs = loads(spec.args_blob)
        if values:
            args = [values[a.index] if type(a) is DepPlaceholder else a for a in args]
            kwargs = {k: values[v.index] if type(v) is DepPlaceholder else v for k, v in kwargs.items()}
        computing = time.perf_counter()
        result = fn(*args, **kwargs)
        _context.seconds = time.perf_counter() - computing
        name = spec.name or getattr(fn, "__name__", "task")
        del args, kwargs, values     # the task's own references to its arguments
        # (sole_owner is asked in a statement of its own: while serialize's arguments are being
        # evaluated, the value is also on the interpreter's stack and would look shared)
        if spec.num_returns == 1:
            copy = not sole_owner(result, 0)
            return [(serialize(result, f"return value of {name}", copy=copy), False)]
        if not isinstance(result, (tuple, list)) or len(result) != spec.num_returns:
            raise ValueError(f"{name} was declared with num_returns={spec.num_returns} but returned "
                             f"{type(result).__name__} {'of length ' + str(len(result)) if hasattr(result, '__len__') else ''}".rstrip())
        # elements may go uncopied only if nothing else holds the returned tuple/list itself
        own = held_only_by_caller(result)
        results = []
        for i in range(len(result)):    # (not enumerate: its reused pair tuple also holds r)
            r = result[i]
            copy = not (own and sole_owner(r, 1))
            results.append((serialize(r, f"return value {i} of {name}", copy=copy), False))
        return results

    def _fetch_unslotted(self, info: ObjectInfo) -> list:
        """Fetch an argument without holding an executor slot: the argument may have to be made
        again (lineage, after a rank loss) by a task queued behind this one on this rank.  One
        that is here already is read with the slot kept (no queued task overtakes this one)."""
        if self._held(info.object_id):
            return self._fetch(info)
        self.block()
        try:
            return self._fetch(info)
        finally:
            self.unblock()


class _ExecutorThreads:
    """The executor threads of a :class:`Worker`: they take tasks from a queue and run each
    with ``run(msg)`` while holding one of ``slots`` slots; an idle thread holds none."""

    def __init__(self, slots: int, run: Callable[[RunTask], None], name: str) -> None:
        self.closed = False
        self._run = run
        self._name = name
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._slots = threading.Semaphore(slots)
        self._lock = threading.Lock()       # guards the two counters and the table
        self._queued: dict[int, RunTask] = {}   # task id -> queued, not started (one revoked is
                                                # out of it: skipped when dequeued)
        self._idle = 0
        self._count = 0
        for _ in range(slots):
            self.spawn()

    def put(self, msg: RunTask) -> None:
        with self._lock:
            self._queued[msg.spec.task_id] = msg
        self._tasks.put(msg)

    def revoke(self, task_id: int) -> Optional[RunTask]:
        """Take a queued task out before a thread starts it (see :meth:`TaskRunner.revoke`)."""
        with self._lock:
            return self._queued.pop(task_id, None)

    def close(self) -> None:
        """Idle threads exit (running tasks finish on their own)."""
        self.closed = True
        with self._lock:
            n = self._count
        for _ in range(n):
            self._tasks.put(None)

    def spawn(self) -> None:
        with self._lock:
            self._count += 1
        threading.Thread(target=self._main, daemon=True, name=self._name).start()

    def _main(self) -> None:
        # An idle thread holds no slot (else a task leaving a nested get could wait for ever).
        while True:
            with self._lock:
                self._idle += 1
            msg = self._tasks.get()
            with self._lock:
                self._idle -= 1
            if msg is None or self.closed:
                return
            with self._slots:
                # (a task taken from the queue may wait here for a slot: it is revocable until
                # it has one)
                with self._lock:
                    revoked = self._queued.pop(msg.spec.task_id, None) is None
                if revoked:
                    continue
                self._run(msg)

    def block(self) -> None:
        """Give the calling thread's slot to another thread, starting one if none is idle."""
        with self._lock:
            spawn = self._idle == 0
        if spawn:
            self.spawn()
        self._slots.release()

    def unblock(self) -> None:
        self._slots.acquire()


class Worker(TaskRunner):
    """The task-executing role of one rank (arguments: :class:`TaskRunner`'s).

    Executor threads take tasks straight from a queue (the engine only appends), each holding one
    of ``threads`` slots while it runs a task; a task blocked in a nested ``get``/``wait`` gives its
    slot back and a new executor thread is started if none is idle.
    """

    def __init__(self, rank: int, threads: int, fetch: Callable[[ObjectInfo], list],
                 finished: Callable[[TaskSpec, list], None],
                 held: Callable[[int], bool] = lambda oid: False) -> None:
        super().__init__(rank, threads, fetch, finished, held)
        self._threads = _ExecutorThreads(threads, self._execute, f"hoplite-task-{rank}")

    def enqueue(self, msg: RunTask) -> None:
        """Queue a task (engine thread)."""
        self.functions.add(msg.blobs)
        self._threads.put(msg)

    def close(self) -> None:
        """Stop taking tasks; idle executor threads exit (running tasks finish on their own)."""
        self._threads.close()

    def revoke(self, task_id: int) -> Optional[RunTask]:
        return self._threads.revoke(task_id)

    def block(self) -> None:
        """The calling executor thread waits on other tasks: give its slot to another thread,
        starting one if no thread is idle (so queued tasks, e.g. its children, can run)."""
        self._threads.block()

    def unblock(self) -> None:
        """The calling executor thread goes on: take a slot back (waits for one)."""
        self._threads.unblock()
