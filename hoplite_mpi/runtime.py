"""One rank's runtime: the components of the rank's roles, composed over a progress
:class:`~.engine.Engine`, and the public face the API layer uses.

Roles: rank 0 runs the driver (the user's program) with the scheduler and the reduce coordinator;
ranks 1..N-1 run tasks; with one rank, rank 0 runs tasks too.  Every rank has an object store, a
directory shard, and the object plane (catalog, lookups, fetch, serve, broadcast, reduce steps,
freeing).  Which file handles which message: the table in :meth:`Runtime._wire`.

The engine thread owns all state and all transport calls; other threads (the driver, task
threads) hand it work with :meth:`Runtime.call_soon`.  Rank loss: :meth:`Runtime.rank_lost`
tells every component, in order.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Optional

from . import faults, malloc, rankstats
from . import tracing as timeline
from . import protocol as P
from .config import Config
from .context import Context, Loss
from .debug import engine_state
from .directory import shard_map
from .engine import Engine
from .errors import RuntimeShutdownError
from .ids import IdGenerator
from .objects.broadcast import Broadcasts
from .objects.catalog import Catalog
from .objects.fetch import Fetcher
from .objects.free import Freeing
from .objects.lookup import Lookups
from .objects.reduce_node import ReduceSteps
from .objects.serve import Server
from .refs import Refs
from .roles.coordinator import Coordination
from .roles.driver import Driver
from .output import Output
from .roles.drain import DrainRole
from .roles.gather import Gather
from .roles.stall import StallRole
from .roles.stragglers import EVERY as STRAGGLER_CHECK
from .roles.timeline_role import WAIT as TIMELINE_WAIT, TimelineRole
from .roles.membership import Membership
from .roles.shard import ShardRole
from .roles.shutdown import Shutdown
from .roles.tasks import TaskRole
from .store import ObjectStore
from .worker import Worker, current_task_name, guard_exit

log = logging.getLogger("hoplite_mpi")


class Runtime:
    """The runtime of one rank over communicator ``comm`` (which it owns: pass a ``Dup``).

    ``transport``: default an MPI transport over ``comm``.  For tests and simulation
    (:mod:`hoplite_mpi.sim`): ``clock`` (seconds, monotonic), ``threads=False`` (no engine and
    notifier threads: the caller drives :meth:`step` and reads :meth:`take_ready`), ``worker``
    (a factory with :class:`~.worker.Worker`'s signature) and ``exit_process`` (called where a
    rank must end: declared dead, or the driver lost).
    """

    def __init__(self, comm: Any, config: Config, transport: Any = None, *,
                 clock: Callable[[], float] = time.monotonic, threads: bool = True,
                 worker: Optional[Callable[..., Any]] = None,
                 exit_process: Callable[[int], None] = os._exit) -> None:
        self.started = (time.perf_counter(), time.process_time())   # (stats: wall_s, cpu_s)
        if transport is None:
            from .transport.mpi import MPITransport
            transport = MPITransport(comm, config.window)
        self.comm = comm
        malloc.tune(config.malloc_mmap_threshold)     # (before the first large buffers)
        self.engine = engine = Engine(transport, clock, config.backoff_max, config.hot_window,
                                             config.hot_yield)
        rank, size = transport.rank, transport.size
        if threads:
            faults.arm(rank)
        # the components, in the context they share (the runtime reads them there too)
        self.ctx = ctx = Context(engine, config, ObjectStore(), IdGenerator(rank),
                                 shard_map(size, min(config.replication, size)))
        ctx.rank_lost = self.rank_lost
        ctx.engine_state = lambda: engine_state(self)
        # the object plane (every rank)
        ctx.catalog = Catalog(ctx)
        ctx.lookups = Lookups(ctx)
        ctx.fetcher = Fetcher(ctx)
        ctx.server = Server(ctx)
        ctx.broadcasts = Broadcasts(ctx)
        ctx.steps = ReduceSteps(ctx)
        ctx.freeing = Freeing(ctx)
        ctx.refs = Refs(ctx)
        # roles
        ctx.shard = ShardRole(ctx)
        self.membership = Membership(ctx, exit_process)
        if rank == 0:
            ctx.driver = Driver(ctx, self.worker_ranks)
            ctx.coordinator = Coordination(ctx)
            if config.storage:
                self.attach_storage(config.storage, config.storage_sync)
            self.drain = DrainRole(ctx, exit_process)
        if rank in self.worker_ranks:
            ctx.tasks = TaskRole(ctx, worker or Worker)
            if rank != 0 and threads and config.forward_output:
                ctx.output = Output(ctx)
                ctx.output.install(current_task_name)
            if rank != 0 and threads:
                guard_exit(ctx.tasks.task_exits)
        self.shutdown_role = Shutdown(ctx, ctx.tasks.close if ctx.tasks else lambda: None)
        self.gather = Gather(ctx)         # (rank 0 asks every rank: roles/gather.py)
        self.gather.answerers["stats"] = lambda arg: rankstats.snapshot(self)
        self.stall = StallRole(ctx, self.gather)
        self.trace = TimelineRole(ctx, self.gather)
        if config.timeline and threads:
            timeline.start(rank)      # (the whole run: written when the driver shuts down)
        self.sent_blobs: set = set()   # function ids already sent to the scheduler from here
        self.stopped = threading.Event()   # the engine thread has ended
        self.closed = False
        self._wire()
        if rank == 0 and threads:
            self.drain.install()      # (watches the drain file and the job's end time)
            self.stall.install()      # (a stall report after Config.stall_timeout)
            engine.timers.every(STRAGGLER_CHECK, ctx.driver.stragglers.check)
        # the engine thread and the notifier thread (none with threads=False)
        ctx.refs.direct = bool(threads) and config.ready_on_engine
        self._threads: tuple[threading.Thread, ...] = () if not threads else (
            threading.Thread(target=self._run, name=f"hoplite-engine-{rank}", daemon=True),
            threading.Thread(target=ctx.refs.run, name="hoplite-notify", daemon=True))

    def _wire(self) -> None:
        """Who handles which message (one handler per type)."""
        ctx, engine = self.ctx, self.engine
        on = engine.on
        fetcher, server, steps, shard = ctx.fetcher, ctx.server, ctx.steps, ctx.shard
        on(P.DirAdd, shard.on_message)                     # roles/shard.py
        on(P.DirLookup, shard.on_message)
        on(P.DirPull, shard.on_message)
        on(P.DirPartial, shard.on_message)
        on(P.DirCheck, shard.on_message)
        on(P.DirDelete, ctx.freeing.on_dir_delete)         # objects/free.py
        on(P.Free, ctx.freeing.on_free)
        on(P.DirReply, ctx.lookups.on_reply)               # objects/lookup.py
        on(P.DirSender, fetcher.on_sender)                 # objects/fetch.py
        on(P.PullRefused, fetcher.on_pull_refused)
        on(P.Pull, server.on_pull)                         # objects/serve.py
        on(P.StreamCancel, lambda src, m: self.transport.stop_send_stream(src, m.mpi_tag))
        on(P.Fetch, ctx.broadcasts.on_fetch)               # objects/broadcast.py
        on(P.Fetched, ctx.broadcasts.on_fetched)
        on(P.ReduceStep, steps.on_step)                    # objects/reduce_node.py
        on(P.ReduceLate, steps.on_late)
        on(P.ReduceAbort, steps.on_abort)
        on(P.Ask, self.gather.on_ask)                      # roles/gather.py
        on(P.Heartbeat, lambda src, m: None)               # (any message is a sign of life)
        engine.quiet.add(P.Heartbeat)
        on(P.MemberDown, self.membership.on_member_down)   # roles/membership.py
        on(P.Shutdown, self.shutdown_role.on_last_message)      # roles/shutdown.py
        on(P.ShutdownAck, self.shutdown_role.on_last_message)
        driver, coordinator, tasks = ctx.driver, ctx.coordinator, ctx.tasks
        if driver is not None:                             # roles/driver.py, roles/coordinator.py
            on(P.SubmitTask, driver.on_submit)
            on(P.TaskDone, driver.on_task_done)
            on(P.TaskBlocked, driver.on_task_blocked)
            on(P.Revoked, driver.on_revoked)
            on(P.ObjectLost, driver.on_object_lost)
            on(P.TaskExit, driver.on_task_exit)
            on(P.Persisted, driver.on_persisted)
            on(P.Output, Output.on_output)                 # output.py
            on(P.Answer, self.gather.on_answer)
            on(P.ReduceRequest, coordinator.on_request)
            on(P.ReduceStepDone, coordinator.on_step_done)
            on(P.ReduceResume, coordinator.on_resume)
        if tasks is not None:                              # roles/tasks.py
            on(P.RunTask, tasks.on_run_task)
            on(P.Revoke, tasks.on_revoke)
            if driver is None:
                on(P.TaskExit, tasks.on_task_exit_echo)
        engine.peers.on_failure(self.rank_lost)
        engine.on_leftover = self.shutdown_role.note_goodbye
        engine.peers.track_heard = driver is not None
        if self.transport.ft:
            config = ctx.config
            engine.timers.every(min(config.heartbeat, config.heartbeat_timeout / 4),
                                self.membership.heartbeat)

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> "Runtime":
        for thread in self._threads:
            thread.start()
        return self

    def step(self) -> bool:
        """(``threads=False``) One iteration of the engine loop; returns whether anything
        happened.  After shutdown began, one round of quiescence (roles/shutdown.py)."""
        if self.stopped.is_set():
            return False
        if not self.engine.closing:
            return self.engine.step()
        active, done = self.shutdown_role.step()
        if done:
            self.stopped.set()
        return active

    def take_ready(self) -> list:
        """(``threads=False``) What completed since the last call (see :meth:`Refs.take_ready`)."""
        return self.ctx.refs.take_ready()

    def _run(self) -> None:
        """The engine thread: the loop, then shutdown's quiescence."""
        try:
            self.engine.run()
            self.shutdown_role.quiesce()
        except BaseException:
            log.exception("rank %d: progress engine failed", self.rank)
            self.shutdown_role.unclean = True
            raise
        finally:
            self.stopped.set()

    @property
    def unclean(self) -> bool:
        """The engine did not quiesce: MPI_Finalize could hang, exit without it."""
        return self.shutdown_role.unclean

    def serve(self) -> None:
        """Block until the driver shuts the runtime down (worker ranks)."""
        self.stopped.wait()
        self.close()

    def shutdown(self) -> None:
        """Driver: stop every rank; returns once this rank has quiesced (roles/shutdown.py) or
        after ``Config.shutdown_timeout``.  Threads waiting on this runtime get
        RuntimeShutdownError."""
        if self.closed:
            return
        if self.rank == 0:
            try:
                self.call(self.ctx.driver.stragglers.check, 0.0, timeout=5.0)   # (the last look)
            except Exception:
                pass
        if self.rank == 0 and self.config.print_stats:
            try:
                per_rank, silent = self.gather_stats()
                sys.__stderr__.write(rankstats.table(per_rank, silent))
                sys.__stderr__.flush()
            except Exception as exc:       # (the job's end must not depend on it)
                log.warning("the job's stats could not be gathered: %s", exc)
        if self.rank == 0 and self.config.timeline and timeline.recorder is not None:
            try:
                self.write_timeline(self.config.timeline)
            except Exception as exc:       # (the job's end must not depend on it)
                log.warning("the timeline could not be written to %s: %s", self.config.timeline, exc)
        try:
            self.call_soon(self.shutdown_role.begin)
        except RuntimeShutdownError:
            pass
        self.close()

    def close(self) -> None:
        """Wait for the engine to end, fail what still waits, free the communicator."""
        if self.closed:
            return
        self.closed = True
        self.membership.closed = True
        if self._threads:
            engine_thread = self._threads[0]
            engine_thread.join(timeout=self.config.shutdown_timeout + 10)
            if engine_thread.is_alive():    # still in MPI: finalizing now could hang or crash
                log.warning("rank %d: the progress engine did not stop", self.rank)
                self.shutdown_role.unclean = True
        self.ctx.refs.stop()
        self.ctx.refs.fail_waiters()
        if self.ctx.output is not None:      # (the rank's own streams back: Executor mode)
            self.ctx.output.uninstall()
        if self.ctx.workflow is not None:    # (its run record: ended, or drained)
            self.ctx.workflow.close("drained" if self.drain.reason is not None else "ended")
        if self.unclean:
            return
        self.transport.close()
        try:
            self.comm.Free()
        except Exception:
            pass

    # --- rank loss -----------------------------------------------------------------------------

    def rank_lost(self, rank: int) -> None:
        """(engine) ``rank`` died (ULFM) or was declared dead: every component is told, in order
        (shard entries first, so that what they re-register reaches the new shards before the
        requests sent again)."""
        ctx = self.ctx
        dead = ctx.dead
        if rank in dead or rank == ctx.rank:
            return
        if rank == 0:
            self.membership.driver_lost()
            return
        if timeline.recorder is not None:
            timeline.recorder.instant(f"rank {rank} lost", "rank-loss", {"rank": rank})
        log.warning("rank %d: rank %d died; going on without it", ctx.rank, rank)
        ctx.stats["ranks_lost"] += 1
        n = len(ctx.shards)
        primary = [ctx.shard_primary(s) for s in range(n)]
        moved = {s for s, ranks in enumerate(ctx.shards) if not set(ranks) - dead - {rank}}
        dead.add(rank)
        self.transport.exclude(rank)     # (ULFM-reported ranks are excluded already; hung ones not)
        loss = Loss(rank, moved, {s for s in range(n) if primary[s] == rank})
        for component in (ctx.shard, ctx.lookups, ctx.fetcher, ctx.server, ctx.driver,
                          ctx.coordinator, ctx.broadcasts):
            if component is not None:
                component.rank_lost(loss)

    # --- the API layer's calls ------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def size(self) -> int:
        return self.ctx.size

    @property
    def transport(self) -> Any:
        return self.engine.transport

    @property
    def config(self) -> Config:
        return self.ctx.config

    @property
    def store(self) -> ObjectStore:
        return self.ctx.store

    @property
    def ids(self) -> IdGenerator:
        return self.ctx.ids

    @property
    def worker_ranks(self) -> list[int]:
        """The ranks that run tasks: 1..N-1 (rank 0 alone in a job of one rank)."""
        return list(range(1, self.size)) or [0]

    @property
    def dead(self) -> set[int]:
        return self.ctx.dead

    @property
    def stats(self) -> Any:
        return self.ctx.stats

    @property
    def scheduler(self) -> Any:
        """The driver's scheduler (rank 0), else None."""
        return self.ctx.driver.scheduler if self.ctx.driver is not None else None

    @property
    def directory(self) -> Any:
        return self.ctx.shard.directory

    @property
    def reduced(self) -> dict:
        """(rank 0) result id -> the input ids a reduce used."""
        return self.ctx.coordinator.reduced if self.ctx.coordinator is not None else {}

    def call_soon(self, fn: Callable, *args: Any) -> None:
        """Run ``fn(*args)`` on the engine thread (thread-safe, returns at once).  Raises
        RuntimeShutdownError once the runtime is shutting down (the engine runs no more calls)."""
        if self.closed:
            raise RuntimeShutdownError("the hoplite_mpi runtime is shut down")
        self.engine.call_soon(fn, *args)

    def call(self, fn: Callable, *args: Any, timeout: float | None = None) -> Any:
        """Run ``fn(*args)`` on the engine thread and wait for its return value (raises
        RuntimeShutdownError if the runtime shuts down first, TimeoutError after ``timeout``)."""
        fut = self.waiter()

        def run() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:
                fut.set_exception(exc)
        self.call_soon(run)
        return fut.result(timeout)

    def waiter(self) -> Any:
        """A Future failed with RuntimeShutdownError if the runtime shuts down first."""
        return self.ctx.refs.waiter()

    def send(self, dest: int, msg: Any) -> None:
        """(engine thread) Queue a message."""
        self.ctx.send(dest, msg)

    def shard_ranks(self, object_id: int) -> tuple[int, ...]:
        return self.ctx.shard_ranks(object_id)

    def register_ref(self, ref: Any) -> Any:
        """Intern ``ref`` (one ObjectRef per id per process); returns the interned one."""
        return self.ctx.refs.register(ref)

    def watch(self, object_id: int) -> None:
        """Complete the local ref of ``object_id`` once the object exists (directory lookup)."""
        self.call_soon(self.ctx.refs.watch, object_id)

    def info(self, object_id: int) -> Any:
        """What this rank knows of the object (ObjectInfo) or None; a hint from other threads."""
        return self.ctx.catalog.info(object_id)

    def is_deleted(self, object_id: int) -> bool:
        return object_id in self.ctx.catalog.deleted

    def local_frames(self, object_id: int) -> Any:
        return self.ctx.catalog.local_frames(object_id)

    def fetch(self, object_id: int, callback: Callable[[Any], None]) -> None:
        """(engine) See :meth:`Fetcher.fetch`."""
        self.ctx.fetcher.fetch(object_id, callback)

    def write_timeline(self, path: Optional[str], timeout: float = 60.0, stop: bool = False) -> int:
        """(driver) Gather every rank's timeline events and write them to ``path`` (None: drop
        them); ``stop``: every rank stops recording too.  Returns the number of events written.
        Raises RuntimeError if recording is off (tracing.py)."""
        if timeline.recorder is None:
            raise RuntimeError("the timeline is not being recorded: set HOPLITE_MPI_TIMELINE=path "
                               "or call hm.timeline() first")
        per_rank, offsets = self._timeline("stop" if stop else "take", timeout)
        return 0 if path is None else timeline.write(path, per_rank, offsets)

    def gather_stats(self, timeout: float = 30.0) -> tuple[dict, list[int]]:
        """(driver) Every live rank's ``hm.stats()`` dict (rank -> dict), and the ranks that did
        not answer within ``min(timeout, 10)`` seconds.  Raises concurrent.futures.TimeoutError
        if the engine did not finish gathering within ``timeout``."""
        answers = self.ask_all("stats", None, min(timeout, 10.0), timeout)
        return answers.payloads, answers.silent

    def start_timeline(self, timeout: float = 60.0) -> None:
        """(driver) Start recording the timeline on every rank."""
        self._timeline("start", timeout)

    def _timeline(self, what: str, timeout: float) -> tuple[dict, dict]:
        """(driver) Ask every rank "timeline" ``what`` (roles/timeline_role.py); returns rank ->
        events (on the rank's clock; [] if it could not answer) and rank -> clock offset."""
        answers = self.ask_all("timeline", what, TIMELINE_WAIT, timeout)
        events = {r: e if isinstance(e, list) else [] for r, e in answers.payloads.items()}
        return events, answers.offsets

    def ask_all(self, what: str, arg: Any, wait: float, timeout: float) -> Any:
        """(driver, any thread but the engine's) Ask every live rank ``what`` (roles/gather.py:
        answers within ``wait`` seconds count); returns the :class:`Answers`.  Raises
        concurrent.futures.TimeoutError after ``timeout`` seconds, RuntimeShutdownError if the
        runtime shuts down first."""
        fut = self.waiter()
        self.call_soon(self.gather.ask, what, arg, wait, fut.set_result)
        return fut.result(timeout)

    @property
    def workflow(self) -> Any:
        """(driver) The durable workflow (``Config.storage``, :meth:`attach_storage`), else None."""
        return self.ctx.workflow

    def attach_storage(self, root: str, sync: bool = True) -> Any:
        """(driver) Use durable storage ``root`` from now on (``hm.init(storage=...)`` in a
        program run by ``python -m hoplite_mpi``); returns the Workflow.  Raises ValueError if
        another directory is attached, StorageError if ``root`` is not usable."""
        from .durable.workflow import attach
        if self.rank != 0:
            raise ValueError("durable storage is attached on the driver (rank 0)")
        return attach(self.ctx.workflow, root, sync, lambda wf: setattr(self.ctx, "workflow", wf))

    def put(self, frames: list, object_id: int | None = None) -> int:
        """Store a serialized value as a new object on this rank (any thread).  Returns its id."""
        return self.ctx.catalog.put(frames, object_id)

    def delete(self, object_ids: list[int]) -> None:
        """Free objects everywhere (any thread).  Later fetches raise ObjectDeletedError."""
        self.ctx.freeing.delete(object_ids)

    def submit(self, spec: P.TaskSpec) -> None:
        """Hand a task to the scheduler (any thread).  With ``Config.submit_batch``, a burst of
        submissions is one engine call (:meth:`~.engine.Engine.call_batched`) and, on the
        driver, one scheduler event."""
        if self.ctx.config.submit_batch:
            if self.closed:
                raise RuntimeShutdownError("the hoplite_mpi runtime is shut down")
            self.engine.call_batched(self._submitted, spec)
        elif self.ctx.driver is not None:
            self.call_soon(self.ctx.driver.submit, spec)
        else:
            self.call_soon(self.send, 0, P.SubmitTask(spec))

    def _submitted(self, specs: list) -> None:
        """(engine) A burst of submissions: one scheduler event on the driver, else one
        SubmitTask each (they leave in one batch)."""
        if self.ctx.driver is not None:
            self.ctx.driver.submit_many(specs)
        else:
            send = self.send
            for spec in specs:
                send(0, P.SubmitTask(spec))

    def release(self, object_id: int) -> None:
        """Driver (any thread, also a GC finaliser): the last ref to the object was dropped."""
        if not self.closed and self.ctx.driver is not None:
            self.call_soon(self.ctx.driver.release, object_id)

    def cancel_many(self, task_ids: list[int]) -> list[bool]:
        """Cancel tasks not started yet (driver), in one engine call; whether each was.  A task
        placed on a worker is asked of that worker: one round trip for all of them
        (RuntimeShutdownError if the runtime shuts down meanwhile)."""
        if self.ctx.driver is None or self.closed:
            return [False] * len(task_ids)
        fut = self.waiter()
        self.call_soon(self.ctx.driver.cancel_many, list(task_ids), fut.set_result)
        return fut.result()

    def set_blocked(self, blocked: bool) -> None:
        """The calling task thread enters/leaves a blocking wait (nested get/wait)."""
        if self.ctx.tasks is not None:
            self.ctx.tasks.set_blocked(blocked)

    def start_broadcast(self, object_id: int, ranks: list[int], done: Callable[[dict], None]) -> None:
        """(engine) See :meth:`Broadcasts.start`."""
        self.ctx.broadcasts.start(object_id, ranks, done)

    def start_reduce(self, reduce_id: int, inputs: list[int], op: bytes, num: int, target: int,
                     result_id: int, allreduce: bool) -> None:
        """(engine, rank 0) See :meth:`Coordination.start`."""
        self.ctx.coordinator.start(reduce_id, inputs, op, num, target, result_id, allreduce)
