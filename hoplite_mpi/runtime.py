"""One rank's runtime: roles by rank over a progress :class:`~.engine.Engine`, and shutdown.

Roles: rank 0 runs the driver (the user's program) and the :class:`~.scheduler.Scheduler`; ranks
1..N-1 run tasks (:class:`~.worker.Worker`); with one rank, rank 0 runs tasks too.  Every rank has
an :class:`~.store.ObjectStore` and a :class:`~.directory.DirectoryShard`.

The engine thread owns all state and all transport calls (see :mod:`.engine` for the loop and its
idle policy).  Other threads (the driver, task threads) hand it work with :meth:`Runtime.call_soon`.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Any, Callable, Optional

from . import faults
from . import protocol as P
from .config import Config
from .directory import DirectoryShard, shard_map
from .errors import ObjectDeletedError, RankLostError, RuntimeShutdownError, WorkerCrashedError
from .ids import IdGenerator, format_id, shard_of
from .protocol import ObjectInfo
from .scheduler import Scheduler, TaskState
from .serialization import frame_sizes, rebuild_error, serialize_error, to_bytes
from .collectives import ReduceCoordinator, chain_length
from .engine import Engine
from .plane import ObjectPlane
from .store import ObjectStore
from .worker import Worker, _context, current_task_id, guard_exit

log = logging.getLogger("hoplite_mpi")


class Runtime(ObjectPlane):
    """The runtime of one rank over communicator ``comm`` (which it owns: pass a ``Dup``)."""

    def __init__(self, comm: Any, config: Config, transport: Any = None, *,
                 clock: Callable[[], float] = time.monotonic, threads: bool = True,
                 worker: Optional[Callable[..., Any]] = None,
                 exit_process: Callable[[int], None] = os._exit) -> None:
        """``transport``: default an MPI transport over ``comm``.  For tests and simulation
        (:mod:`hoplite_mpi.sim`): ``clock`` (seconds, monotonic), ``threads=False`` (no engine
        and notifier threads: the caller drives :meth:`step` and reads :attr:`ready`),
        ``worker`` (a factory with :class:`~.worker.Worker`'s signature) and ``exit_process``
        (called where a rank must end: declared dead, or the driver lost)."""
        if transport is None:
            from .transport.mpi import MPITransport
            transport = MPITransport(comm, config.window)
        self.comm = comm
        self.config = config
        self.transport = transport
        self.rank = self.transport.rank
        self.size = self.transport.size
        self.clock = clock
        self.threads = threads
        self.exit_process = exit_process
        self.engine = engine = Engine(transport, clock, config.backoff_max)
        self.send = engine.send
        self._send_all = engine.send_all
        self._flush = engine.flush
        self._guarded = engine.guarded
        self.ids = IdGenerator(self.rank)
        if threads:
            faults.arm(self.rank)
        self.dead = engine.dead                            # ranks lost (ULFM)
        self.store = ObjectStore()
        self.shards = shard_map(self.size, min(config.replication, self.size))
        self.directory = DirectoryShard(self.rank)
        self.worker_ranks = list(range(1, self.size)) or [0]
        self.scheduler: Optional[Scheduler] = None
        if self.rank == 0:
            self.scheduler = Scheduler(self.worker_ranks, self.shard_ranks, config.tasks_per_worker)
        self.worker: Optional[Worker] = None
        if self.rank in self.worker_ranks:
            self.worker = (worker or Worker)(self.rank, config.worker_threads, self.fetch_info,
                                             self._task_finished,
                                             lambda oid: self.local_frames(oid) is not None)
            if self.rank != 0 and threads:
                guard_exit(self._task_exits)
        self._exit_noted = threading.Event()     # (worker) rank 0 took note of a TaskExit
        # engine state (engine thread only)
        self._known: dict[int, ObjectInfo] = {}
        self._deleted: set[int] = set()
        self._lookups: dict[int, list[Callable]] = {}
        self._fetching: dict[int, list[Callable]] = {}   # object id -> callbacks (DirPull sent)
        self._producing: dict[int, list[Callable]] = {}  # object id -> callbacks (made here)
        self._deferred: dict[int, list] = {}               # object id -> Pulls to serve later
        self._receiving: dict[int, int] = {}               # object id -> rank streaming it here
        self._replicated: set[int] = set()                 # (primary shard) replicas requested
        self._want: dict[int, int] = {}                     # (primary shard) copies, if not config
        self._freed_here: set[int] = set()
        self._broadcasts: dict[int, tuple] = {}
        self._reduces: dict[int, ReduceCoordinator] = {}   # rank 0: reduces in progress
        self._reduce_steps: dict[int, Any] = {}             # reduce steps running here, by output
        self._aborted_reduces: set[int] = set()             # abandoned reduce attempts
        self._stale_lookups: dict[int, list] = {}           # rank 0: answered with dead holders
        self._ready_waiters: dict[int, list[Callable]] = {}
        self.reduced: dict[int, list[int]] = {}            # rank 0: result id -> inputs used
        self._next_tag = 0
        self.sent_blobs: set = set()   # function ids already sent to the scheduler from here
        self._goodbyes: set[int] = set()   # ranks whose last message (Shutdown/ShutdownAck) came
        self._quiesce_deadline: Optional[float] = None
        self.stopped = threading.Event()   # the engine thread has ended
        self.closed = False
        self.unclean = False    # the engine did not quiesce: MPI_Finalize could hang, exit without
        self._waiters: "weakref.WeakSet[Future]" = weakref.WeakSet()   # failed at shutdown
        self.stats = engine.stats
        # refs of this process, to complete when their object becomes ready
        self._refs: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
        self._refs_lock = threading.Lock()
        self._notify: queue.SimpleQueue = queue.SimpleQueue()
        handlers = {
            P.SubmitTask: lambda src, m: self._submit(m.spec),
            P.RunTask: lambda src, m: self.worker.enqueue(m),
            P.TaskDone: lambda src, m: self._scheduled(self.scheduler.task_done(m)),
            P.TaskBlocked: lambda src, m: self._scheduled(self.scheduler.task_blocked(m.task_id, m.blocked)),
            P.DirAdd: self._on_directory,
            P.DirLookup: self._on_directory,
            P.DirPull: self._on_directory,
            P.DirPartial: self._on_directory,
            P.Fetch: self._on_fetch,
            P.Fetched: self._on_fetched,
            P.ReduceStep: self._on_reduce_step,
            P.ReduceLate: self._on_reduce_late,
            P.ReduceAbort: self._on_reduce_abort,
            P.ReduceResume: self._on_reduce_resume,
            P.ReduceStepDone: self._on_reduce_step_done,
            P.ReduceRequest: lambda src, m: self.start_reduce(m.reduce_id, list(m.inputs), m.op, m.num,
                                                              m.target, m.reduce_id + 1, m.allreduce),
            P.DirDelete: self._on_delete,
            P.DirReply: self._on_dir_reply,
            P.Free: self._on_free,
            P.Pull: self._on_pull,
            P.PullRefused: self._on_pull_refused,
            P.StreamCancel: lambda src, m: self.transport.stop_send_stream(src, m.mpi_tag),
            P.ObjectLost: self._on_object_lost,
            P.Heartbeat: lambda src, m: None,          # (any message counts as a sign of life)
            P.MemberDown: self._on_member_down,
            P.TaskExit: self._on_task_exit,
            P.Shutdown: lambda src, m: self._begin_close(),
            P.ShutdownAck: lambda src, m: self._begin_close(),
        }
        for msg_type, handler in handlers.items():
            engine.on(msg_type, handler)
        engine.on_peer_failure(self._rank_lost)
        engine.on_leftover = self._note_goodbye
        engine.track_heard = self.scheduler is not None
        if self.transport.ft:
            engine.every(min(config.heartbeat, config.heartbeat_timeout / 4), self._heartbeat)
        self._engine = threading.Thread(target=self._run, name=f"hoplite-engine-{self.rank}", daemon=True)
        self._notifier = threading.Thread(target=self._notify_loop, name="hoplite-notify", daemon=True)

    @property
    def _closing(self) -> bool:
        return self.engine.closing

    def start(self) -> "Runtime":
        if self.threads:
            self._engine.start()
            self._notifier.start()
        return self

    def step(self) -> bool:
        """(``threads=False``) One iteration of the engine loop; returns whether anything
        happened.  After shutdown began, one step of quiescence (see :meth:`_quiesce`)."""
        if self.stopped.is_set():
            return False
        if not self.engine.closing:
            return self.engine.step()
        if self._quiesce_deadline is None:
            self._quiesce_deadline = self.clock() + self.config.shutdown_timeout
        active, done = self._quiesce_step()
        if done:
            self.stopped.set()
        return active

    # --- threads -> engine -------------------------------------------------------------------

    def call_soon(self, fn: Callable, *args: Any) -> None:
        """Run ``fn(*args)`` on the engine thread (thread-safe, returns at once).  Raises
        RuntimeShutdownError once the runtime is shutting down (the engine runs no more calls)."""
        if self.closed:
            raise RuntimeShutdownError("the hoplite_mpi runtime is shut down")
        self.engine.call_soon(fn, *args)

    def call(self, fn: Callable, *args: Any, timeout: float | None = None) -> Any:
        """Run ``fn(*args)`` on the engine thread and wait for its return value (raises
        RuntimeShutdownError if the runtime shuts down first)."""
        fut = self.waiter()

        def run():
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:
                fut.set_exception(exc)
        self.call_soon(run)
        return fut.result(timeout)

    def waiter(self) -> Future:
        """A Future that a thread may wait on without a timeout: if the runtime shuts down
        before it completes, it fails with RuntimeShutdownError (so the thread returns)."""
        fut: Future = Future()
        self._waiters.add(fut)
        return fut

    def shard_ranks(self, object_id: int) -> tuple[int, ...]:
        """Live ranks of the object's directory shard; when all its replicas died, the next live
        rank after them takes the shard over (rebuilt by :meth:`_rank_lost`)."""
        ranks = self.shards[shard_of(object_id, len(self.shards))]
        if not self.dead:
            return ranks
        live = tuple(r for r in ranks if r not in self.dead)
        if live:
            return live
        return (next(r % self.size for r in range(ranks[-1] + 1, ranks[-1] + self.size)
                     if r % self.size not in self.dead),)

    # --- engine loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        """The engine thread: the loop, then shutdown's quiescence."""
        try:
            self.engine.run()
            self._quiesce()
        except BaseException:
            log.exception("rank %d: progress engine failed", self.rank)
            self.unclean = True
            raise
        finally:
            self.stopped.set()

    def _scheduled(self, out: list) -> None:
        """Send a scheduler's messages and deliver the objects it completed to local refs."""
        self._send_all(out)
        done = self.scheduler.completed
        if done:
            self.scheduler.completed = []
            self._notify.put(done)
            if self._ready_waiters:
                for info in done:
                    for callback in self._ready_waiters.pop(info.object_id, ()):
                        callback(info)
        if self.scheduler.freed:
            freed, self.scheduler.freed = self.scheduler.freed, []
            self.stats["auto_freed"] += len(freed)
            self._delete(freed, permanent=False)

    def release(self, object_id: int) -> None:
        """Driver (any thread, also a GC finaliser): the last ref to the object was dropped."""
        if not self.closed and self.scheduler is not None:
            self.call_soon(self._release, object_id)

    def _release(self, object_id: int) -> None:
        self.scheduler.release(object_id)
        self._scheduled([])

    # --- futures (ObjectRef) -------------------------------------------------------------------

    def register_ref(self, ref: Any) -> Any:
        """Intern ``ref`` (one ObjectRef per id per process); returns the interned one."""
        with self._refs_lock:
            existing = self._refs.get(ref.id)
            if existing is not None:
                return existing
            self._refs[ref.id] = ref
        return ref

    def watch(self, object_id: int) -> None:
        """Complete the local ref of ``object_id`` once the object exists (directory lookup)."""
        self.call_soon(self._watch, object_id)

    def _watch(self, object_id: int) -> None:
        info = self._info(object_id)
        if info is not None:
            self._notify.put([info])
        elif object_id in self._deleted:
            self._notify.put([object_id])
        else:
            self._lookup(object_id, lambda info: self._notify.put([info if info is not None else object_id]))

    def take_ready(self) -> list:
        """(``threads=False``) What completed since the last call, in order: an ObjectInfo per
        object that became ready (``error`` set for an error object), an object id per object
        found deleted.  (With threads, the notifier thread completes the refs instead.)"""
        out: list = []
        while True:
            try:
                batch = self._notify.get_nowait()
            except queue.Empty:
                return out
            if batch is not None:
                out.extend(batch)

    def _notify_loop(self) -> None:
        """Completes futures outside the engine thread (user callbacks may block or call get)."""
        while True:
            batch = self._notify.get()
            if batch is None:
                return
            for item in batch:
                self._deliver(item)

    def _deliver(self, item: Any) -> None:
        # (a function of its own: no local variable may keep the last ref alive between batches,
        # or the driver's reference counting would not see it dropped)
        oid = item if isinstance(item, int) else item.object_id
        ref = self._refs.get(oid)
        if ref is None or ref.done():
            return
        try:
            if isinstance(item, int):
                ref._set_failed(ObjectDeletedError(format_id(oid)))
            elif item.error:
                ref._set_failed(rebuild_error(item.inline))
            else:
                ref._set_ready()
        except Exception:  # a concurrent cancel() won the race: nothing to deliver
            log.debug("ref %s already completed", format_id(oid))

    # --- directory -----------------------------------------------------------------------------

    def _on_directory(self, source: int, msg: Any) -> None:
        add = type(msg) is P.DirAdd
        if add:
            faults.reached("dir")
        self._send_all(self.directory.handle(source, msg))
        if add:
            oid = msg.info.object_id
            if msg.replicas and msg.replicas != self.config.replication:
                self._want[oid] = msg.replicas      # (every replica of the shard keeps it)
            if self._want.get(oid, self.config.replication) > 1 and self.shard_ranks(oid)[0] == self.rank:
                self._replicate(oid)

    def _replicate(self, oid: int) -> None:
        """(primary shard) Give a chunked object its missing copies (``replicas`` of its task,
        else ``Config.replication``), on the live ranks after its first holder: each is sent a
        Fetch and pulls the object like a broadcast target (relayed, in the background), then
        registers as a holder.  Also run when a holder died (copies are re-made)."""
        info = self.directory.info(oid)
        if (info is None or info.inline is not None or info.error or not info.holders
                or oid in self._replicated):
            return
        self._replicated.add(oid)
        if len(self._replicated) > 1 << 16:
            self._replicated.clear()     # (a bound: a re-add after this only adds spare copies)
        first = info.holders[0]
        others = [(first + k) % self.size for k in range(1, self.size)]
        need = self._want.get(oid, self.config.replication) - len(info.holders)
        for rank in [r for r in others if r not in info.holders and r not in self.dead][:max(0, need)]:
            self.stats["replicas"] += 1
            self.send(rank, P.Fetch(oid, P.REPLICA_TOKEN))

    def _lookup(self, object_id: int, callback: Callable) -> None:
        """Ask the object's shard for its info; ``callback(info | None)`` (None: deleted)."""
        waiting = self._lookups.get(object_id)
        if waiting is not None:
            waiting.append(callback)
            return
        self._lookups[object_id] = [callback]
        self.send(self.shard_ranks(object_id)[0], P.DirLookup(object_id, self.rank))

    def _on_free(self, source: int, msg: P.Free) -> None:
        held = self.store.delete(msg.object_id) is not None
        self._refuse_deferred(msg.object_id, held)
        if self.scheduler is None:    # a cached small value (rank 0's copies are the scheduler's)
            self._known.pop(msg.object_id, None)

    def _on_dir_reply(self, source: int, msg: P.DirReply) -> None:
        if msg.pull:
            self._on_sender(msg.object_id, msg.info)
            return
        if msg.info is not None and msg.info.inline is not None:
            self._known[msg.object_id] = msg.info
        elif msg.info is None:
            self._deleted.add(msg.object_id)
        if self.scheduler is not None:
            if msg.info is None:
                self._scheduled(self.scheduler.object_deleted(msg.object_id))
            elif msg.object_id in self.scheduler.looked_up:
                self._scheduled(self.scheduler.object_known(msg.info))
        for callback in self._lookups.pop(msg.object_id, ()):
            callback(msg.info)

    def delete(self, object_ids: list[int]) -> None:
        """Free objects everywhere (any thread).  Later fetches raise ObjectDeletedError."""
        self._deleted.update(object_ids)   # visible to this rank's readers at once
        self.call_soon(self._delete, list(object_ids))

    def _delete(self, object_ids: list[int], permanent: bool = True) -> None:
        """(engine) Free objects here and tell their shards (which tell the holders).

        ``permanent``: ``hm.delete`` (tombstones answer later lookups); otherwise automatic
        freeing of objects no ref points to any more (no tombstone kept)."""
        for oid in object_ids:
            held = self.store.delete(oid) is not None
            self._refuse_deferred(oid, held)
            self._known.pop(oid, None)
            if self.scheduler is not None:   # before any later submit is handled
                if permanent:
                    self._uncache(oid)
                    self._scheduled(self.scheduler.object_deleted(oid))
                else:
                    self.scheduler.forget(oid)
            for rank in set(self.shard_ranks(oid)) | ({0} if self.scheduler is None else set()):
                self.send(rank, P.DirDelete(oid, permanent))

    def _on_delete(self, source: int, msg: P.DirDelete) -> None:
        self._known.pop(msg.object_id, None)
        self._replicated.discard(msg.object_id)
        self._want.pop(msg.object_id, None)
        if self.rank in self.shard_ranks(msg.object_id):
            self._send_all(self.directory.delete(msg.object_id, msg.permanent))
        if not msg.permanent:
            return
        self._deleted.add(msg.object_id)
        if self.scheduler is not None:
            self._uncache(msg.object_id)
            self._scheduled(self.scheduler.object_deleted(msg.object_id))

    def _uncache(self, oid: int) -> None:
        """(rank 0, ``hm.delete`` of a small object) Workers may hold its value in their cache
        of small values: tell every one now, ahead of any task placed after the delete (the
        scheduler's messages to a rank arrive in order), instead of through the shard, whose
        notice could arrive after such a task started."""
        info = self.scheduler.objects.get(oid)
        if info is not None and info.inline is not None:
            for rank in range(1, self.size):
                if rank not in self.dead:
                    self.send(rank, P.Free(oid))

    # --- tasks -----------------------------------------------------------------------------

    def submit(self, spec: P.TaskSpec) -> None:
        """Hand a task to the scheduler (any thread)."""
        self.call_soon(self._submit, spec)

    def _submit(self, spec: P.TaskSpec) -> None:
        if self.scheduler is None:
            self.send(0, P.SubmitTask(spec))
            return
        try:
            out = self.scheduler.submit(spec)
        except (ValueError, RankLostError) as exc:   # refused (nothing registered): results fail with exc
            error = to_bytes(serialize_error(exc, self.rank))
            infos = [ObjectInfo(oid, frame_sizes(error), (), error, True) for oid in spec.return_ids]
            self._send_all([(r, P.DirAdd(i)) for i in infos for r in self.shard_ranks(i.object_id)])
            self._notify.put(infos)
            return
        self._scheduled(out)

    def _task_finished(self, spec: P.TaskSpec, results: list) -> None:
        """Executor thread: a task ended; ``results`` = [(frames, is_error)] per return value."""
        infos = []
        stored = []
        for oid, (frames, is_error) in zip(spec.return_ids, results):
            if is_error:
                infos.append(ObjectInfo(oid, frame_sizes(frames), (self.rank,), to_bytes(frames), True))
                continue
            info = self.describe(oid, frames, self.rank, spec.inline_threshold)
            infos.append(info)
            if info.inline is None:
                stored.append((oid, frames))
        try:
            self.call_soon(self._report, spec, tuple(infos), stored)
        except RuntimeShutdownError:    # the job ended while the task ran: nobody wants it
            pass

    def _report(self, spec: P.TaskSpec, infos: tuple, stored: list) -> None:
        for oid, frames in stored:
            self.store.put(oid, frames)
            self._serve_deferred(oid)
        for info in infos:
            for rank in self.shard_ranks(info.object_id):
                self.send(rank, P.DirAdd(info, spec.replicas or 0))
        self.send(0, P.TaskDone(spec.task_id, self.rank, infos))

    def set_blocked(self, blocked: bool) -> None:
        """The calling task thread enters/leaves a blocking wait (nested get/wait)."""
        task_id = current_task_id()
        if task_id is None or _context.blocked == blocked:
            return
        _context.blocked = blocked
        if blocked:
            self.worker.block()
        self.call_soon(self.send, 0, P.TaskBlocked(task_id, blocked))
        if not blocked:
            self.worker.unblock()

    def cancel(self, task_id: int) -> bool:
        """Cancel a task not placed yet (driver).  Returns whether it was cancelled."""
        if self.scheduler is None or self.closed:
            return False
        cancelled, out = self.call(self.scheduler.cancel, task_id)
        if out:
            self.call_soon(self._scheduled, out)
        return cancelled

    # --- reduce coordination (rank 0) ------------------------------------------------------

    def start_reduce(self, reduce_id: int, inputs: list[int], op: bytes, num: int, target: int,
                     result_id: int, allreduce: bool) -> None:
        """(engine, rank 0) Coordinate a reduce: inputs are placed as they become ready."""
        def k_of(nbytes: int) -> int:
            return chain_length(nbytes, self.config.link_bandwidth, self.config.link_latency)
        coord = ReduceCoordinator(reduce_id, inputs, op, num, target, result_id, self.ids.next, k_of,
                                  allreduce, self.shard_ranks)
        self._reduces[reduce_id] = coord
        if target in self.dead:       # (the target died before the reduce was asked for)
            self._coordinated(coord, coord.rank_lost(target))
            return
        for oid in dict.fromkeys(inputs):
            self._when_ready(oid, lambda info, c=coord: self._coordinated(c, c.input_ready(info)))

    def _when_ready(self, oid: int, callback: Callable[[ObjectInfo], None]) -> None:
        info = self._info(oid)
        if info is not None and info.inline is None and info.holders and set(info.holders) <= self.dead:
            info = None     # its known copy died: ask the directory (copies elsewhere, or rebuilt)
        if info is None:
            entry = self.store.get(oid)
            if entry is not None and entry.complete:
                info = self.describe(oid, entry.frames, self.rank)
        if info is not None:
            callback(info)
        elif oid in self.scheduler.producer:
            self._ready_waiters.setdefault(oid, []).append(callback)
        else:
            def looked_up(info: Optional[ObjectInfo]) -> None:
                if info is None:
                    error = to_bytes(serialize_error(ObjectDeletedError(format_id(oid)), self.rank))
                    info = ObjectInfo(oid, frame_sizes(error), (), error, True)
                elif info.inline is None and info.holders and set(info.holders) <= self.dead:
                    # a shard that had not heard of the death yet: once it has, it reports the
                    # object lost (ObjectLost) and the rebuild (or the error) is waited for
                    fresh = self._info(oid)
                    if oid in self.scheduler.producer or (
                            fresh is not None and not set(fresh.holders) <= self.dead):
                        self._when_ready(oid, callback)
                    else:
                        self._stale_lookups.setdefault(oid, []).append(callback)
                    return
                callback(info)
            self._lookup(oid, looked_up)

    def _on_object_lost(self, source: int, msg: P.ObjectLost) -> None:
        self._scheduled(self.scheduler.object_lost(msg.object_id, msg.rank))
        for callback in self._stale_lookups.pop(msg.object_id, ()):
            self._when_ready(msg.object_id, callback)     # now being rebuilt, or an error

    def _on_reduce_step_done(self, source: int, msg: P.ReduceStepDone) -> None:
        if msg.lost >= 0 and msg.lost not in self.dead and self.transport.ft:
            # a step saw ``lost`` die (ULFM) before this rank did: act on it now (every reduce
            # it takes part in is re-planned; this message's attempt is then an old one)
            self._rank_lost(msg.lost)
        coord = self._reduces.get(msg.reduce_id)
        if coord is not None:
            self._coordinated(coord, coord.step_done(msg))

    def _on_reduce_resume(self, source: int, msg: P.ReduceResume) -> None:
        coord = self._reduces.get(msg.reduce_id)
        if coord is not None:
            self._coordinated(coord, coord.resume(msg.reduce_id, msg.progress))

    def _coordinated(self, coord: ReduceCoordinator, out: list) -> None:
        self._send_all(out)
        if coord.wants_inputs and not coord.done:     # re-planned after a rank loss
            coord.wants_inputs = False
            self.stats["reduces_replanned"] += 1
            self.stats["reduce_bytes_kept"] += coord.start    # result bytes not computed again
            log.warning("rank 0: reduce %s re-planned without the dead rank(s) %s (from byte %d)",
                        format_id(coord.result_id), sorted(coord.dead), coord.start)
            self._reduces[coord.reduce_id] = coord
            for oid in dict.fromkeys(coord.inputs):
                self._when_ready(oid, lambda info, c=coord: self._coordinated(c, c.input_ready(info)))
        if coord.done and self._reduces.pop(coord.reduce_id, None) is not None:
            for rid in coord.attempts:
                self._reduces.pop(rid, None)
            self.reduced[coord.result_id] = list(coord.used)
            self._notify.put([coord.result])
            self._scheduled(self.scheduler.object_known(coord.result))

    # --- rank loss (ULFM) ------------------------------------------------------------------

    def _heartbeat(self, now: float) -> None:
        """Workers: tell rank 0 they are alive.  Rank 0: declare dead a worker not heard of for
        ``Config.heartbeat_timeout`` seconds (MPI only reports ranks that died)."""
        if not self.transport.ft:
            return
        if self.rank != 0:
            self.send(0, P.Heartbeat())
            return
        if self.closed:
            return
        for rank in range(1, self.size):
            heard = self.engine.heard.setdefault(rank, now)
            if rank not in self.dead and now - heard > self.config.heartbeat_timeout:
                log.warning("rank 0: no message from rank %d for %.1f s: declaring it dead",
                            rank, now - heard)
                for other in range(1, self.size):
                    if other not in self.dead:
                        self.send(other, P.MemberDown(rank))   # (the hung rank too: it exits)
                self._flush()                     # before the hung rank is excluded from sends
                self._rank_lost(rank)

    def _task_exits(self, task_id: int, status: int) -> None:
        """(task thread, worker) The task called ``os._exit(status)``: tell rank 0 and wait (up
        to 2 s) until it has taken note, so that it learns this before it learns of the death."""
        try:
            self.call_soon(self.send, 0, P.TaskExit(task_id, self.rank, status))
        except RuntimeShutdownError:
            return
        self._exit_noted.wait(2.0)

    def _on_task_exit(self, source: int, msg: P.TaskExit) -> None:
        if self.scheduler is None:      # (worker) rank 0's echo: exit now
            self._exit_noted.set()
            return
        self.send(source, msg)
        sched = self.scheduler
        task = sched.tasks.get(msg.task_id)
        name = f"{task.spec.name or 'task'} {format_id(msg.task_id)}" if task else format_id(msg.task_id)
        log.warning("rank 0: task %s called os._exit(%d) on rank %d: that rank is lost", name,
                    msg.status, source)
        self.stats["worker_crashes"] += 1
        if task is None or task.rank != source or task.state != TaskState.RUNNING:
            return
        spec = task.spec
        # Not retried (unlike a rank's death): the exit is the task's own doing and would most
        # likely happen again, and a rank so ended cannot be replaced; retries would cost the
        # job one rank after another.  It fails now, as a task's exception does.
        error = to_bytes(serialize_error(
            WorkerCrashedError(name, source, task.attempts, msg.status), self.rank))
        infos = tuple(ObjectInfo(oid, frame_sizes(error), (), error, True) for oid in spec.return_ids)
        self._send_all([(r, P.DirAdd(i)) for i in infos for r in self.shard_ranks(i.object_id)])
        self._scheduled(sched.task_done(P.TaskDone(msg.task_id, source, infos)))

    def _on_member_down(self, source: int, msg: P.MemberDown) -> None:
        if msg.rank == self.rank:
            log.error("rank %d: rank 0 declared this rank dead (no heartbeat for %.0f s); exiting",
                      self.rank, self.config.heartbeat_timeout)
            logging.shutdown()
            self.exit_process(0)
        self._rank_lost(msg.rank)

    def _rank_lost(self, rank: int) -> None:
        """(engine) ``rank`` died.  Every live rank runs this when its transport reports it."""
        if rank in self.dead or rank == self.rank:
            return
        if rank == 0:
            log.error("rank %d: rank 0 (the driver) died; exiting", self.rank)
            logging.shutdown()
            self.exit_process(1)
        log.warning("rank %d: rank %d died; going on without it", self.rank, rank)
        self.stats["ranks_lost"] += 1
        n = len(self.shards)
        primary = [self._shard_primary(s) for s in range(n)]
        moved = [s for s, ranks in enumerate(self.shards) if not set(ranks) - self.dead - {rank}]
        self.dead.add(rank)
        self.transport.exclude(rank)     # (ULFM-reported ranks are excluded already; hung ones not)
        changed = {s for s in range(n) if primary[s] == rank}   # its requests must go elsewhere
        # this rank's own shard entries: forget the dead rank, report objects left without a copy
        thinned: list[int] = []
        for oid in self.directory.rank_lost(rank, thinned):
            self.send(0, P.ObjectLost(oid, rank))
        # shards whose every replica is dead moved to a live rank: re-register what we hold there;
        # requests waiting at a dead primary go to the next replica or the successor
        if changed:
            self._rebuild_shards(set(moved), changed, rank)
        for oid in thinned:     # copies to re-make (this rank is the shard's primary now)
            if self._want.get(oid, self.config.replication) > 1 and \
                    self._shard_primary(shard_of(oid, n)) == self.rank:
                self._replicated.discard(oid)
                self._replicate(oid)
        for oid, pulls in list(self._deferred.items()):
            self._deferred[oid] = [(src, m) for src, m in pulls if src != rank]
        if self.scheduler is not None:
            self._scheduled(self.scheduler.rank_lost(rank))
            for coord in {id(c): c for c in self._reduces.values()}.values():
                self._coordinated(coord, coord.rank_lost(rank))
            for token, (remaining, errors, done) in list(self._broadcasts.items()):
                if rank in remaining:
                    self._on_fetched(rank, P.Fetched(token, rank))   # a dead target needs nothing

    def _shard_primary(self, shard: int) -> int:
        """The rank that answers requests for ``shard`` now (-1 if all its ranks are dead)."""
        return next((r for r in self.shards[shard] if r not in self.dead), -1)

    def _rebuild_shards(self, moved: set[int], changed: set[int], dead: int) -> None:
        """Shards ``moved`` lost all their replicas: tell their new ranks what this rank knows
        (its complete copies; on rank 0 also small values, errors and deletions).  Requests that
        were waiting at the dead primary of a shard in ``changed`` are sent again."""
        n = len(self.shards)
        for oid in self.store.ids():
            entry = self.store.get(oid)
            if shard_of(oid, n) in moved and entry.complete and oid not in self._deleted:
                info = self.describe(oid, entry.frames, self.rank)
                for r in self.shard_ranks(oid):
                    self.send(r, P.DirAdd(info))
        # small values known here (put here, or read): a worker's put lives only in its own
        # cache and its shard, so a put whose shard died would be lost for good (a lookup of it
        # waited for ever in the new shard; found by the random-workload tester)
        for oid, info in list(self._known.items()):
            if shard_of(oid, n) in moved and oid not in self._deleted:
                for r in self.shard_ranks(oid):
                    self.send(r, P.DirAdd(info))
        for oid in list(self._lookups):
            if shard_of(oid, n) in changed:
                self.send(self.shard_ranks(oid)[0], P.DirLookup(oid, self.rank))
        for oid in list(self._fetching):
            # a DirPull may have gone to the dead shard (e.g. after a stream from it failed before
            # the failure was known here): ask the new shard, unless a live sender streams to us
            if shard_of(oid, n) in changed and oid not in self._receiving:
                self._ask_sender(oid)
        sched = self.scheduler
        if sched is None:
            return
        for oid, info in list(sched.objects.items()):
            if shard_of(oid, n) not in moved:
                continue
            if info.inline is not None:
                for r in self.shard_ranks(oid):
                    self.send(r, P.DirAdd(info))
            elif set(info.holders) <= self.dead and oid in sched.lineage:
                self._scheduled(sched.object_lost(oid, dead))   # its copy and its shard died
        for oid in sched.deleted:
            if shard_of(oid, n) in moved:
                for r in self.shard_ranks(oid):
                    self.send(r, P.DirDelete(oid, True))
        for oid in sched.looked_up:
            if shard_of(oid, n) in changed and oid not in sched.objects:
                self.send(self.shard_ranks(oid)[0], P.DirLookup(oid, self.rank))

    # --- shutdown --------------------------------------------------------------------------
    #
    # A rank may free the communicator (and later call MPI_Finalize) only when no message to it
    # is still on its way and none of its own is unfinished: under ULFM, a message that arrives
    # for a communicator its receiver has already freed (e.g. a Free that a shard sent while
    # handling a deletion just before its Shutdown) left MPI_Finalize's barrier hanging on
    # every rank.  So shutdown is a barrier-free handshake over the runtime's communicator:
    #
    #   driver:  Shutdown -> every live rank, then quiesce
    #   others:  on Shutdown, ShutdownAck -> every other live rank, then quiesce
    #   quiesce: send nothing more; cancel posted receives; receive and drop every message (any
    #            tag) until each live peer's last message (its Shutdown/ShutdownAck) has come and
    #            every own send has completed
    #
    # MPI's non-overtaking order (one source, one communicator, a receive matching any tag) means
    # nothing from a peer can follow its last message.  Ranks that die meanwhile are not waited
    # for.  If a peer never answers (hung), the rank gives up after ``Config.shutdown_timeout``
    # and is marked ``unclean`` (the process then exits without MPI_Finalize).

    def serve(self) -> None:
        """Block until the driver shuts the runtime down (worker ranks)."""
        self.stopped.wait()
        self._close()

    def shutdown(self) -> None:
        """Driver: stop every rank; returns once this rank has quiesced (see above) or after
        ``Config.shutdown_timeout``.  Threads waiting on this runtime get RuntimeShutdownError."""
        if self.closed:
            return
        try:
            self.call_soon(self._begin_close)
        except RuntimeShutdownError:
            pass
        self._close()

    def _begin_close(self) -> None:
        """(engine) The driver ends the job (rank 0: the user called shutdown; others: its
        Shutdown, or a peer's ShutdownAck that overtook it, arrived): send this rank's last
        message to every live peer and stop the engine loop (:meth:`_quiesce` follows)."""
        if self._closing:
            return
        last = P.Shutdown() if self.rank == 0 else P.ShutdownAck(self.rank)
        for rank in range(self.size):
            if rank != self.rank and rank not in self.dead:
                self.send(rank, last)
        self.engine.discard_local()
        if self.worker is not None:
            self.worker.close()
        self._flush()
        self.engine.stop()

    def _note_goodbye(self, source: int, batch: list) -> None:
        if any(type(m) in (P.Shutdown, P.ShutdownAck) for m in batch):
            self._goodbyes.add(source)

    def _quiesce(self) -> None:
        """(engine thread, after :meth:`_begin_close`) Drop whatever still arrives until every
        live peer has sent its last message and this rank's sends have completed."""
        self._quiesce_deadline = self.clock() + self.config.shutdown_timeout
        delay = 2.5e-5
        while True:
            active, done = self._quiesce_step()
            if done:
                return
            delay = 2.5e-5 if active else min(0.01, delay * 2)
            self.transport.wait(delay)

    def _quiesce_step(self) -> tuple[bool, bool]:
        """One round of quiescence: (whether anything happened, whether it is over)."""
        transport = self.transport
        active = False
        for source, batch in transport.drain():
            active = True
            self._note_goodbye(source, batch)
        for rank in transport.failures():
            self.dead.add(rank)        # (nothing to repair: only not to wait for it)
        if transport.quiesce():
            active = True
        waiting = set(range(self.size)) - {self.rank} - self.dead - self._goodbyes
        if not waiting and transport.idle():
            return active, True
        if self.clock() > self._quiesce_deadline:
            log.warning("rank %d: shutdown: no last message from rank(s) %s after %.0f s "
                        "(or own sends unfinished); leaving without MPI_Finalize",
                        self.rank, sorted(waiting), self.config.shutdown_timeout)
            self.unclean = True
            return active, True
        return active, False

    def _fail_waiters(self) -> None:
        """Threads blocked in get/wait/result/broadcast/call return with RuntimeShutdownError."""
        error = RuntimeShutdownError("the hoplite_mpi runtime was shut down while this call waited")
        with self._refs_lock:
            refs = list(self._refs.values())
        for fut in refs + list(self._waiters):
            try:
                if not fut.done():
                    fut.set_exception(error)
            except Exception:     # completed meanwhile (notifier thread)
                pass

    def _close(self) -> None:
        """Wait for the engine to end, fail what still waits, free the communicator."""
        if self.closed:
            return
        self.closed = True
        if self.threads:
            self._engine.join(timeout=self.config.shutdown_timeout + 10)
        if self._engine.is_alive():     # still in MPI: finalizing now could hang or crash
            log.warning("rank %d: the progress engine did not stop", self.rank)
            self.unclean = True
        self._notify.put(None)
        self._fail_waiters()
        if self.unclean:
            return
        self.transport.close()
        try:
            self.comm.Free()
        except Exception:
            pass
