"""The driver role (rank 0): the shell around the pure :class:`~hoplite_mpi.scheduler.Scheduler`.

It feeds the scheduler its events (submits, task completions, blocked tasks, objects known,
deleted or lost, rank losses, releases of refs) and carries out what comes back: messages to
send, objects completed (to the driver's refs), objects to free.  It also answers "tell me when
this object is ready" for the reduce coordinator (:meth:`Driver.when_ready`).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from .. import protocol as P
from ..context import Loss
from ..errors import ObjectDeletedError, RankLostError, WorkerCrashedError
from ..ids import format_id, shard_of
from ..protocol import ObjectInfo
from ..scheduler import Scheduler, TaskState
from ..serialization import frame_sizes, serialize_error, to_bytes

log = logging.getLogger("hoplite_mpi")


def error_infos(oids: Any, exc: BaseException, rank: int) -> tuple:
    """Error objects (ObjectInfo with ``error`` set) for ``oids``, all raising ``exc``."""
    error = to_bytes(serialize_error(exc, rank))
    return tuple(ObjectInfo(oid, frame_sizes(error), (), error, True) for oid in oids)


class Driver:
    """``scheduler``; ``ready_waiters``: object -> callbacks waiting for a task's result;
    ``stale_lookups``: object -> callbacks whose lookup named only dead holders."""

    def __init__(self, ctx: Any, worker_ranks: list[int]) -> None:
        self.ctx = ctx
        self.scheduler = Scheduler(worker_ranks, ctx.shard_ranks, ctx.config.tasks_per_worker)
        self.ready_waiters: dict[int, list[Callable]] = {}
        self.stale_lookups: dict[int, list[Callable]] = {}
        ctx.catalog.authority = self.scheduler.objects.get

    def scheduled(self, out: list) -> None:
        """Send a scheduler's messages and deliver the objects it completed to local refs."""
        ctx, sched = self.ctx, self.scheduler
        ctx.send_all(out)
        done = sched.completed
        if done:
            sched.completed = []
            ctx.refs.notify(done)
            if self.ready_waiters:
                for info in done:
                    for callback in self.ready_waiters.pop(info.object_id, ()):
                        callback(info)
        if sched.freed:
            freed, sched.freed = sched.freed, []
            ctx.stats["auto_freed"] += len(freed)
            ctx.freeing.free(freed, permanent=False)

    # --- events ------------------------------------------------------------------------------

    def submit(self, spec: P.TaskSpec) -> None:
        try:
            out = self.scheduler.submit(spec)
        except (ValueError, RankLostError) as exc:   # refused (nothing registered): results fail with exc
            infos = error_infos(spec.return_ids, exc, self.ctx.rank)
            for info in infos:
                self.ctx.publish(info)
            self.ctx.refs.notify(list(infos))
            for info in infos:   # (known here too: re-registered if their shard dies, and tasks
                self.scheduled(self.scheduler.object_known(info))   # using them fail at once;
            return                                                  # simulation seed 222)
        self.scheduled(out)

    def on_submit(self, source: int, msg: P.SubmitTask) -> None:
        self.submit(msg.spec)

    def on_task_done(self, source: int, msg: P.TaskDone) -> None:
        ctx = self.ctx
        self.scheduled(self.scheduler.task_done(msg))
        if not ctx.dead:
            return
        # a small result lives only in its shard (and here): if a rank of its shard died, the
        # worker's DirAdd may have gone to it after this rank rebuilt that shard: register it
        # (simulation seed 1796)
        n = len(ctx.shards)
        for info in msg.results:
            if info.inline is not None and ctx.dead.intersection(ctx.shards[shard_of(info.object_id, n)]):
                ctx.publish(info)

    def on_task_blocked(self, source: int, msg: P.TaskBlocked) -> None:
        self.scheduled(self.scheduler.task_blocked(msg.task_id, msg.blocked))

    def release(self, object_id: int) -> None:
        """The driver's last ref to the object was dropped."""
        self.scheduler.release(object_id)
        self.scheduled([])

    def cancel(self, task_id: int) -> bool:
        cancelled, out = self.scheduler.cancel(task_id)
        self.scheduled(out)
        return cancelled

    def object_known(self, info: ObjectInfo) -> None:
        self.scheduled(self.scheduler.object_known(info))

    def looked_up(self, object_id: int, info: Optional[ObjectInfo]) -> None:
        """A directory answer (DirReply) reached rank 0."""
        if info is None:
            self.scheduled(self.scheduler.object_deleted(object_id))
        elif object_id in self.scheduler.looked_up:
            self.scheduled(self.scheduler.object_known(info))

    def freed_here(self, oid: int, permanent: bool) -> None:
        """Rank 0 frees ``oid`` (hm.delete when ``permanent``, else an automatic free)."""
        if permanent:
            self._uncache(oid)
            self.scheduled(self.scheduler.object_deleted(oid))
        else:
            self.scheduler.forget(oid)

    def deleted_elsewhere(self, oid: int) -> None:
        """Another rank deleted ``oid`` (hm.delete in a task)."""
        self._uncache(oid)
        self.scheduled(self.scheduler.object_deleted(oid))

    def _uncache(self, oid: int) -> None:
        """(``hm.delete`` of a small object) Workers may hold its value in their cache of small
        values: tell every one now, ahead of any task placed after the delete (the scheduler's
        messages to a rank arrive in order), instead of through the shard, whose notice could
        arrive after such a task started."""
        ctx = self.ctx
        info = self.scheduler.objects.get(oid)
        if info is not None and info.inline is not None:
            for rank in range(1, ctx.size):
                if rank not in ctx.dead:
                    ctx.send(rank, P.Free(oid))

    def on_object_lost(self, source: int, msg: P.ObjectLost) -> None:
        self.scheduled(self.scheduler.object_lost(msg.object_id, msg.rank))
        for callback in self.stale_lookups.pop(msg.object_id, ()):
            self.when_ready(msg.object_id, callback)     # now being rebuilt, or an error

    def on_task_exit(self, source: int, msg: P.TaskExit) -> None:
        """A task called ``os._exit`` on ``source`` (which waits for this echo, then exits)."""
        ctx, sched = self.ctx, self.scheduler
        ctx.send(source, msg)
        task = sched.tasks.get(msg.task_id)
        name = f"{task.spec.name or 'task'} {format_id(msg.task_id)}" if task else format_id(msg.task_id)
        log.warning("rank 0: task %s called os._exit(%d) on rank %d: that rank is lost", name,
                    msg.status, source)
        ctx.stats["worker_crashes"] += 1
        if task is None or task.rank != source or task.state != TaskState.RUNNING:
            return
        # Not retried (unlike a rank's death): the exit is the task's own doing and would most
        # likely happen again, and a rank so ended cannot be replaced; retries would cost the
        # job one rank after another.  It fails now, as a task's exception does.
        infos = error_infos(task.spec.return_ids,
                            WorkerCrashedError(name, source, task.attempts, msg.status), ctx.rank)
        for info in infos:
            ctx.publish(info)
        self.scheduled(sched.task_done(P.TaskDone(msg.task_id, source, infos)))

    # --- readiness (for the reduce coordinator) ------------------------------------------------

    def when_ready(self, oid: int, callback: Callable[[ObjectInfo], None]) -> None:
        """``callback(info)`` once ``oid`` exists with a live copy (or as an error object)."""
        ctx = self.ctx
        info = ctx.catalog.info(oid)
        if info is not None and info.inline is None and info.holders and set(info.holders) <= ctx.dead:
            info = None     # its known copy died: ask the directory (copies elsewhere, or rebuilt)
        if info is None:
            entry = ctx.store.get(oid)
            if entry is not None and entry.complete:
                info = ctx.catalog.describe(oid, entry.frames, ctx.rank)
        if info is not None:
            callback(info)
        elif oid in self.scheduler.producer:
            self.ready_waiters.setdefault(oid, []).append(callback)
        else:
            ctx.lookups.lookup(oid, lambda info: self._looked_up_for(oid, info, callback))

    def _looked_up_for(self, oid: int, info: Optional[ObjectInfo], callback: Callable) -> None:
        ctx = self.ctx
        if info is None:
            info = error_infos((oid,), ObjectDeletedError(format_id(oid)), ctx.rank)[0]
        elif info.inline is None and info.holders and set(info.holders) <= ctx.dead:
            # a shard that had not heard of the death yet: once it has, it reports the object
            # lost (ObjectLost) and the rebuild (or the error) is waited for
            fresh = ctx.catalog.info(oid)
            if oid in self.scheduler.producer or (
                    fresh is not None and not set(fresh.holders) <= ctx.dead):
                self.when_ready(oid, callback)
            else:
                self.stale_lookups.setdefault(oid, []).append(callback)
            return
        callback(info)

    # --- rank loss ---------------------------------------------------------------------------

    def rank_lost(self, loss: Loss) -> None:
        """Re-register at moved shards what only the driver knows (small values, deletions),
        rebuild objects whose copies and shard both died, re-send lookups waiting at a dead
        primary, and let the scheduler retry the dead rank's tasks."""
        ctx, sched = self.ctx, self.scheduler
        n = len(ctx.shards)
        if loss.changed:
            for oid, info in list(sched.objects.items()):
                if shard_of(oid, n) not in loss.moved:
                    continue
                if info.inline is not None:
                    ctx.publish(info)
                elif info.holders and set(info.holders) <= ctx.dead:
                    # its copy and its shard died: rebuilt from lineage, else (a put, a reduce
                    # result) an ObjectLostError value; a copy made elsewhere (a replica, a
                    # broadcast) that registers with the new shard still wins there
                    # (directory.add; simulation seed 52)
                    self.scheduled(sched.object_lost(oid, loss.rank))
            for oid in sched.deleted:
                if shard_of(oid, n) in loss.moved:
                    for r in ctx.shard_ranks(oid):
                        ctx.send(r, P.DirDelete(oid, True))
            for oid in sched.looked_up:
                if shard_of(oid, n) in loss.changed and oid not in sched.objects:
                    ctx.send(ctx.shard_ranks(oid)[0], P.DirLookup(oid, ctx.rank))
        self.scheduled(sched.rank_lost(loss.rank))
