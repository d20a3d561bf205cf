"""The driver role (rank 0): the shell around the pure :class:`~hoplite_mpi.scheduler.Scheduler`.

It feeds the scheduler its events through its one entry point (submits, task completions,
blocked tasks, objects known, deleted or lost, rank losses, releases of refs; see
:meth:`Scheduler.handle <hoplite_mpi.scheduler.Scheduler.handle>`) and carries out the
instructions that come back (:meth:`Driver.scheduled`): messages to send, objects completed (to
the driver's refs and readiness waiters), objects to free.  It also answers "tell me when this
object is ready" for the reduce coordinator (:meth:`Driver.when_ready`).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from .. import faults
from .. import protocol as P
from ..context import Loss
from ..durable import storage
from .stragglers import Stragglers
from ..errors import ObjectDeletedError
from ..events import RankLost
from ..ids import format_id, shard_of
from ..protocol import ObjectInfo
from ..scheduler import (Cancel, Completed, Forget, FreeObjects, LookedUp, ObjectDeleted,
                         ObjectKnown, Release, Scheduler, Submitted, TaskCancelled)
from ..serialization import error_info, serialize_error

log = logging.getLogger("hoplite_mpi")


class Driver:
    """``scheduler``; ``ready_waiters``: object -> callbacks waiting for a task's result;
    ``stale_lookups``: object -> callbacks whose lookup named only dead holders."""

    def __init__(self, ctx: Any, worker_ranks: list[int]) -> None:
        self.ctx = ctx
        config = ctx.config
        self.scheduler = Scheduler(worker_ranks, ctx.shard_ranks, config.tasks_per_worker,
                                   shard_of=lambda oid: shard_of(oid, len(ctx.shards)),
                                   worker_deps=config.worker_deps,
                                   worker_threads=config.worker_threads)
        self.ready_waiters: dict[int, list[Callable]] = {}
        self.stale_lookups: dict[int, list[Callable]] = {}
        self.cancels: dict[int, list[Callable[[bool], None]]] = {}   # task -> cancel() answers
        self.succeeded = 0      # TaskDones without an error result (a drain's summary)
        self.stragglers = Stragglers()
        self.read_back: set[int] = set()    # lost objects read back from storage (_reread)
        ctx.catalog.authority = self.scheduler.object_info
        self._local = {Completed: self._completed, FreeObjects: self._free,
                       TaskCancelled: self._cancel_answered}

    def scheduled(self, out: list) -> None:
        """Carry out a scheduler's instructions in order: send the ``(rank, message)`` tuples,
        apply the local ones (:meth:`_completed`, :meth:`_free`; a TaskCancelled is read by
        :meth:`cancel`)."""
        send = self.ctx.send
        for item in out:
            if item.__class__ is tuple:
                send(item[0], item[1])
            else:
                self._local[item.__class__](item)

    def _completed(self, instruction: Completed) -> None:
        """Deliver the objects to local refs and to readiness waiters."""
        done = instruction.infos
        self.ctx.refs.notify(done)
        if self.ready_waiters or self.stale_lookups:
            for info in done:
                for callback in self.ready_waiters.pop(info.object_id, ()):
                    callback(info)
                # a lookup that named only dead holders after the rebuild had started (the
                # ObjectLost was handled before it) is answered by the rebuilt copy (seed 53649)
                for callback in self.stale_lookups.pop(info.object_id, ()):
                    callback(info)

    def _free(self, instruction: FreeObjects) -> None:
        ctx = self.ctx
        ctx.stats["auto_freed"] += len(instruction.ids)
        ctx.freeing.free(instruction.ids, permanent=False)

    # --- events ------------------------------------------------------------------------------

    def submit(self, spec: P.TaskSpec) -> None:
        """A new task (a refused one's results become error objects, see the scheduler)."""
        self.scheduled(self.scheduler.handle(spec))

    def submit_many(self, specs: list) -> None:
        """New tasks submitted in one burst (``Config.submit_batch``): one scheduler event."""
        self.scheduled(self.scheduler.handle(Submitted(specs)))

    def on_submit(self, source: int, msg: P.SubmitTask) -> None:
        self.submit(msg.spec)

    def on_persisted(self, source: int, msg: P.Persisted) -> None:
        """A worker's report of a checkpoint commit (durable workflows: counters only; the
        commit itself is the storage's link, not this message)."""
        if self.ctx.workflow is not None:
            self.ctx.workflow.persisted(msg.task_id, msg.key, msg.ok, msg.committed)

    def on_task_done(self, source: int, msg: P.TaskDone) -> None:
        ctx = self.ctx
        faults.reached("done")
        task = self.scheduler.tasks.get(msg.task_id)
        if task is not None and msg.seconds:
            self.stragglers.note(task.spec.fn_id, task.spec.name, msg.rank, msg.seconds)
        ok = not any(info.error for info in msg.results)
        self.succeeded += ok
        if ctx.workflow is not None:
            ctx.workflow.task_done(msg.task_id, ok)
        self.scheduled(self.scheduler.handle(msg))
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
        self.scheduled(self.scheduler.handle(msg))

    def release(self, object_id: int) -> None:
        """The driver's last ref to the object was dropped."""
        self.scheduled(self.scheduler.handle(Release(object_id)))

    def cancel(self, task_id: int, answer: Callable[[bool], None]) -> None:
        """Cancel a task not started yet; ``answer(cancelled)`` at once, or for a task placed on
        a worker once that worker has answered (or died)."""
        self.cancels.setdefault(task_id, []).append(answer)
        self.scheduled(self.scheduler.handle(Cancel(task_id)))
        if task_id in self.cancels and not self.scheduler.revoking_task(task_id):
            for callback in self.cancels.pop(task_id):
                callback(False)

    def cancel_many(self, task_ids: list[int], answer: Callable[[list], None]) -> None:
        """:meth:`cancel` each task, all in this engine step (no Revoked answer, which frees a
        worker's slot for a ready task, can come in between); ``answer([cancelled, ...])`` once
        every one is answered."""
        got: list = [None] * len(task_ids)
        left = [len(task_ids)]

        def one(i: int, cancelled: bool) -> None:
            got[i] = cancelled
            left[0] -= 1
            if not left[0]:
                answer(got)
        if not task_ids:
            answer([])
        for i, task_id in enumerate(task_ids):
            self.cancel(task_id, lambda cancelled, i=i: one(i, cancelled))

    def _cancel_answered(self, instruction: TaskCancelled) -> None:
        for callback in self.cancels.pop(instruction.task_id, ()):
            callback(instruction.cancelled)

    def on_revoked(self, source: int, msg: P.Revoked) -> None:
        self.scheduled(self.scheduler.handle(msg))

    def object_known(self, info: ObjectInfo) -> None:
        self.scheduled(self.scheduler.handle(ObjectKnown(info)))

    def looked_up(self, object_id: int, info: Optional[ObjectInfo]) -> None:
        """A directory answer (DirReply) reached rank 0."""
        self.scheduled(self.scheduler.handle(LookedUp(object_id, info)))

    def freed_here(self, oid: int, permanent: bool) -> None:
        """Rank 0 frees ``oid`` (hm.delete when ``permanent``, else an automatic free).  After an
        hm.delete of a small value, workers may hold it in their cache of small values: the
        scheduler tells every one now (``uncache``), ahead of any task placed after the delete
        (its messages to a rank arrive in order), instead of through the shard, whose notice
        could arrive after such a task started."""
        if permanent:
            self.scheduled(self.scheduler.handle(ObjectDeleted(oid, uncache=True)))
        else:
            self.scheduled(self.scheduler.handle(Forget(oid)))

    def deleted_elsewhere(self, oid: int) -> None:
        """Another rank deleted ``oid`` (hm.delete in a task)."""
        self.scheduled(self.scheduler.handle(ObjectDeleted(oid, uncache=True)))

    def on_object_lost(self, source: int, msg: P.ObjectLost) -> None:
        if self._reread(msg.object_id):
            return
        self.scheduled(self.scheduler.handle(msg))
        for callback in self.stale_lookups.pop(msg.object_id, ()):
            self.when_ready(msg.object_id, callback)     # now being rebuilt, or an error

    def _reread(self, oid: int) -> bool:
        """Durable workflows: a lost result of a checkpointed task whose step is committed is
        read back from storage (memory-mapped) and stored here, under its id, instead of
        running the task again (lineage); the directory entry then names this rank and the
        pulls waiting for it go on.  Returns whether it did (or had: a loss is reported by each
        shard rank and again after a DirCheck, so a second ObjectLost can follow the read-back;
        a CI run counted 2 read-backs of one object)."""
        workflow, sched = self.ctx.workflow, self.scheduler
        spec = sched.lineage.get(oid)
        if (workflow is None or spec is None or spec.durable is None or oid in sched.producer
                or oid in sched.deleted):
            return False
        if oid in self.read_back:
            return True             # read back already (the copy here is the one registered)
        try:
            stored = storage.load(spec.durable[0], spec.durable[1])
        except (OSError, storage.StorageError) as exc:
            log.warning("lost object %s: its checkpoint cannot be read (%s); lineage re-runs "
                        "its task", format_id(oid), exc)
            return False
        i = oid - spec.task_id
        if stored is None or i >= len(stored):
            return False
        workflow.stats["reread"] += 1
        self.read_back.add(oid)
        log.warning("rank 0: object %s was lost; read back from its checkpoint %s (not re-run)",
                    format_id(oid), spec.durable[1])
        self.ctx.catalog.put(list(stored[i]), oid)
        return True

    def on_task_exit(self, source: int, msg: P.TaskExit) -> None:
        """A task called ``os._exit`` on ``source`` (which waits for this echo, then exits); the
        scheduler fails it (not retried)."""
        ctx = self.ctx
        ctx.send(source, msg)
        log.warning("rank 0: task %s called os._exit(%d) on rank %d: that rank is lost",
                    self.scheduler.task_name(msg.task_id), msg.status, source)
        ctx.stats["worker_crashes"] += 1
        self.scheduled(self.scheduler.handle(msg))

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
        elif self.scheduler.produces(oid):
            self.ready_waiters.setdefault(oid, []).append(callback)
        else:
            ctx.lookups.lookup(oid, lambda info: self._looked_up_for(oid, info, callback))

    def _looked_up_for(self, oid: int, info: Optional[ObjectInfo], callback: Callable) -> None:
        ctx = self.ctx
        if info is None:
            info = error_info(oid, serialize_error(ObjectDeletedError(format_id(oid)), ctx.rank))
        elif info.inline is None and info.holders and set(info.holders) <= ctx.dead:
            # a shard that had not heard of the death yet: once it has, it reports the object
            # lost (ObjectLost) and the rebuild (or the error) is waited for
            fresh = ctx.catalog.info(oid)
            if self.scheduler.produces(oid) or (
                    fresh is not None and not set(fresh.holders) <= ctx.dead):
                self.when_ready(oid, callback)
            else:
                self.stale_lookups.setdefault(oid, []).append(callback)
            return
        callback(info)

    # --- rank loss ---------------------------------------------------------------------------

    def rank_lost(self, loss: Loss) -> None:
        """The scheduler re-registers at moved shards what only the driver knows (small values,
        deletions), rebuilds objects whose copies and shard both died, asks shards about results
        whose maker died (DirCheck), re-sends lookups waiting at a dead primary, and retries the
        dead rank's tasks (see its RankLost event)."""
        self.scheduled(self.scheduler.handle(RankLost(loss.rank, frozenset(loss.moved),
                                                      frozenset(loss.changed),
                                                      frozenset(self.ctx.dead))))
