"""The task scheduler of rank 0: a pure state machine (event in -> messages out), no MPI.

Task life cycle (one gate per transition; an illegal one raises :class:`InvalidTransition`)::

    WAITING --inputs exist--> READY --placed--> RUNNING --TaskDone--> DONE
       |  <--input lost, rebuilt--|    <--its rank died--+ (attempt <= max_retries)
       +--input failed/deleted--+--cancel--> FAILED (its results become error objects)
                                     <--its rank died--  (pinned there, retries used up)

Placement (dynamic, dependency-aware): a pinned task goes to its rank; otherwise the rank holding
most bytes of the task's inputs if it has room, else the least loaded rank.  Each worker keeps up
to ``tasks_per_worker`` tasks in flight; tasks blocked in a nested ``get`` do not count, so nested
tasks can always be placed (no deadlock when every worker waits on children).

Every event method returns a list of ``(rank, message)`` to send.  Objects that became known on
the way (task results, failures) are appended to :attr:`Scheduler.completed` for the runtime to
deliver to the driver's futures.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import CancelledError
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Optional

from .errors import ObjectDeletedError, ObjectLostError, RankLostError
from .ids import format_id
from .protocol import DirAdd, DirLookup, ObjectInfo, RunTask, TaskDone, TaskSpec
from .serialization import frame_sizes, local_error, to_bytes

Outbox = list


def _deleted_error(object_id: int) -> tuple:
    return to_bytes(local_error(ObjectDeletedError(format_id(object_id))))


class TaskState:
    """Task states (plain strings: compared and hashed on the hot path)."""

    WAITING = "waiting"
    READY = "ready"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


_ALLOWED = {
    TaskState.WAITING: {TaskState.READY, TaskState.FAILED},
    TaskState.READY: {TaskState.RUNNING, TaskState.FAILED, TaskState.WAITING},
    TaskState.RUNNING: {TaskState.DONE, TaskState.FAILED, TaskState.READY},
    TaskState.DONE: set(),
    TaskState.FAILED: set(),
}


class InvalidTransition(RuntimeError):
    """A task was moved along an edge the life cycle does not have; carries the task's history."""

    def __init__(self, task_id: int, old: str, new: str, history: list) -> None:
        super().__init__(f"task {format_id(task_id)}: {old} -> {new} is not allowed "
                         f"(history: {history})")
        self.task_id, self.old, self.new, self.history = task_id, old, new, list(history)


@dataclass
class _Task:
    spec: TaskSpec
    state: str = TaskState.WAITING
    missing: set = field(default_factory=set)
    rank: Optional[int] = None
    blocked: bool = False
    attempts: int = 0
    history: list = field(default_factory=list)

    def move(self, new: TaskState) -> None:
        if new not in _ALLOWED[self.state]:
            raise InvalidTransition(self.spec.task_id, self.state, new, self.history + [self.state])
        self.history.append(self.state)
        self.state = new


class Scheduler:
    """Rank 0's view of tasks and of the objects they make.

    Args:
        workers: ranks that execute tasks (``[0]`` when the job has one rank).
        shard_ranks: maps an object id to the ranks of its directory shard.
        tasks_per_worker: in-flight limit per worker (``Config.tasks_per_worker``).
        rank: the rank the scheduler runs on (0).
    """

    def __init__(self, workers: Iterable[int], shard_ranks: Callable[[int], tuple[int, ...]],
                 tasks_per_worker: int = 16, rank: int = 0) -> None:
        self.workers = list(workers)
        if not self.workers:
            raise ValueError("the scheduler needs at least one worker rank")
        self.rank = rank
        self.shard_ranks = shard_ranks
        self.tasks_per_worker = tasks_per_worker
        self.tasks: dict[int, _Task] = {}
        self.objects: dict[int, ObjectInfo] = {}       # ready objects (and error objects)
        self.producer: dict[int, int] = {}             # pending return id -> task id
        self.dependents: dict[int, list[int]] = {}     # missing object id -> waiting task ids
        self.looked_up: set[int] = set()               # ids asked of the directory
        self.deleted: set[int] = set()
        self.ready: dict[object, deque] = {}           # constraint key -> ready task ids
        self.inflight: dict[int, int] = {r: 0 for r in self.workers}
        self.blobs: dict[bytes, bytes] = {}            # function / initializer id -> blob
        self.sent_blobs: dict[int, set] = {r: set() for r in self.workers}
        self.completed: list[ObjectInfo] = []
        self._cascade: deque = deque()                 # object arrivals not yet applied
        self.dep_count: dict[int, int] = {}            # object id -> unfinished tasks using it
        self.released: set[int] = set()                # driver dropped its ref; free when unused
        self.freed: list[int] = []                     # to free now (drained by the runtime)
        self.lost_ranks: set[int] = set()
        self.lineage: dict[int, TaskSpec] = {}          # live chunked result -> the task that made it
        self.stats = {"submitted": 0, "done": 0, "failed": 0, "retried": 0, "rebuilt": 0}

    # --- events --------------------------------------------------------------------------

    def submit(self, spec: TaskSpec) -> Outbox:
        """A new task.

        Raises:
            RankLostError: pinned to a rank that died (or every allowed rank died) before, or
                no worker rank is left.
            ValueError: a pinned/allowed rank that never was a worker, or a function never sent.
            Nothing is registered then, but the function itself (a submitter sends it with its
            first task only, so later tasks of it must still find it).
        """
        for key, blob in ((spec.fn_id, spec.fn_blob), (spec.init_id, spec.init_blob)):
            if key is not None and blob is not None:
                self.blobs[key] = blob
        name = f"{spec.name or 'task'} {format_id(spec.task_id)}"
        if spec.rank is not None and spec.rank not in self.inflight:
            if spec.rank in self.lost_ranks:
                raise RankLostError(name, spec.rank, 0, "pinned to it; it died before the task was submitted")
            raise ValueError(f"rank {spec.rank} is not a worker rank (workers: {self.workers})")
        if spec.allowed is not None and (not spec.allowed or not set(spec.allowed) <= self.inflight.keys() | self.lost_ranks):
            raise ValueError(f"allowed ranks {spec.allowed} are not all worker ranks (workers: {self.workers})")
        if spec.allowed is not None and not set(spec.allowed) - self.lost_ranks:
            raise RankLostError(name, max(spec.allowed), 0,
                                f"every allowed rank {spec.allowed} died before the task was submitted")
        if spec.fn_id not in self.blobs or (spec.init_id is not None and spec.init_id not in self.blobs):
            raise ValueError(f"task {format_id(spec.task_id)}: function was never sent")
        if not self.workers:
            raise RankLostError(name, max(self.lost_ranks, default=-1), 0,
                                "no worker rank left when the task was submitted")
        if spec.fn_blob is not None or spec.init_blob is not None:
            spec = replace(spec, fn_blob=None, init_blob=None)
        task = _Task(spec)
        self.tasks[spec.task_id] = task
        self.stats["submitted"] += 1
        for oid in spec.deps:
            self.dep_count[oid] = self.dep_count.get(oid, 0) + 1
        for oid in spec.return_ids:
            self.producer[oid] = spec.task_id
        out: Outbox = []
        for oid in spec.deps:
            info = self.objects.get(oid)
            if info is not None and info.error:
                self._fail(task, info.inline, out)
                return self._drain(out)
            if oid in self.deleted:
                self._fail(task, _deleted_error(oid), out)
                return self._drain(out)
            if info is None:
                task.missing.add(oid)
                self.dependents.setdefault(oid, []).append(spec.task_id)
                if oid not in self.producer and oid not in self.looked_up:
                    self.looked_up.add(oid)
                    out.append((self.shard_ranks(oid)[0], DirLookup(oid, self.rank)))
        if not task.missing:
            self._make_ready(task)
        return out + self.dispatch()

    def object_known(self, info: ObjectInfo) -> Outbox:
        """An object now exists (a ``put``, a directory reply, a result); wake its dependents."""
        self._cascade.append(info)
        out: Outbox = []
        return self._drain(out)

    def _drain(self, out: Outbox) -> Outbox:
        """Apply queued object arrivals; failures cascade through dependents iteratively (a chain
        of any length fails without recursion).  Returns ``out`` plus the dispatches."""
        cascade = self._cascade
        while cascade:
            info = cascade.popleft()
            if info.object_id in self.deleted:
                continue
            self.objects[info.object_id] = info
            for task_id in self.dependents.pop(info.object_id, ()):
                task = self.tasks.get(task_id)
                if task is None or task.state is not TaskState.WAITING:
                    continue
                if info.error:
                    self._fail(task, info.inline, out)
                    continue
                task.missing.discard(info.object_id)
                if not task.missing:
                    self._make_ready(task)
        return out + self.dispatch()

    def object_deleted(self, object_id: int) -> Outbox:
        """The object was deleted; tasks waiting for it fail with ObjectDeletedError (a ready task
        that still holds it fails when it would be placed, see :meth:`_run`)."""
        self.deleted.add(object_id)
        self.objects.pop(object_id, None)
        self.lineage.pop(object_id, None)
        out: Outbox = []
        for task_id in self.dependents.pop(object_id, ()):
            task = self.tasks.get(task_id)
            if task is not None and task.state is TaskState.WAITING:
                self._fail(task, _deleted_error(object_id), out)
        return self._drain(out)

    def forget(self, object_id: int) -> None:
        """Drop an automatically freed object (no tombstone: no ref to it exists any more)."""
        self.objects.pop(object_id, None)
        self.lineage.pop(object_id, None)
        self.looked_up.discard(object_id)

    def rank_lost(self, rank: int) -> Outbox:
        """Worker ``rank`` died (ULFM).  It gets no more tasks; each task running there goes back
        to the ready queue (counted in ``stats["retried"]``) unless it has been started
        ``max_retries + 1`` times; a task pinned to ``rank`` (running or not), or left with no
        allowed rank, fails with :class:`RankLostError`, and so do all unfinished tasks if no
        worker is left.  Objects that were only on ``rank`` are the directory's business
        (:meth:`object_lost`).  Idempotent."""
        if rank not in self.inflight:
            return []
        self.lost_ranks.add(rank)
        self.workers.remove(rank)
        del self.inflight[rank]
        self.sent_blobs.pop(rank, None)
        out: Outbox = []
        requeue = []
        for task in list(self.tasks.values()):
            spec = task.spec
            pinned = self._no_rank_left(spec, self.lost_ranks)
            if task.state is TaskState.RUNNING and task.rank == rank:
                if pinned or task.attempts > spec.max_retries or not self.workers:
                    why = "pinned to it" if pinned else ("no worker rank left" if not self.workers
                                                        else f"max_retries={spec.max_retries}")
                    self._fail(task, self._lost_error(task, rank, why), out)
                else:
                    task.move(TaskState.READY)
                    task.rank, task.blocked = None, False
                    self.stats["retried"] += 1
                    requeue.append(task)
            elif task.state in (TaskState.WAITING, TaskState.READY) and (pinned or not self.workers):
                if task.state is TaskState.READY:
                    self._queue(spec).remove(spec.task_id)
                why = "pinned to it" if pinned else "no worker rank left"
                self._fail(task, self._lost_error(task, rank, why), out)
        for task in reversed(requeue):          # lost work first: it was placed earliest
            self._queue(task.spec).appendleft(task.spec.task_id)
        self.ready.pop(("rank", rank), None)
        return self._drain(out)

    @staticmethod
    def _no_rank_left(spec: TaskSpec, dead: set) -> bool:
        """Whether ``spec`` is pinned to a dead rank or all its allowed ranks are dead."""
        return spec.rank in dead or (spec.allowed is not None and not set(spec.allowed) - dead)

    def _wait_for(self, task: _Task, missing: set) -> None:
        """``task`` (WAITING) waits for the objects ``missing``."""
        task.missing = missing
        for oid in missing:
            self.dependents.setdefault(oid, []).append(task.spec.task_id)

    @staticmethod
    def _lost_error(task: _Task, rank: int, why: str) -> tuple:
        name = f"{task.spec.name or 'task'} {format_id(task.spec.task_id)}"
        return to_bytes(local_error(RankLostError(name, rank, task.attempts, why)))

    def task_done(self, msg: TaskDone) -> Outbox:
        """A worker finished a task (successfully or with an error object as result)."""
        task = self.tasks.get(msg.task_id)
        if task is None or msg.rank in self.lost_ranks:   # (a dead rank's late report: its
            return []                                    # results died with it; re-run anyway)
        task.move(TaskState.DONE)
        del self.tasks[msg.task_id]
        if not task.blocked:
            self.inflight[task.rank] -= 1
        self.stats["done"] += 1
        for info in msg.results:
            self.producer.pop(info.object_id, None)
            self.completed.append(info)
            self._cascade.append(info)
            if info.inline is None and not info.error:   # (inline values live in the directory)
                self.lineage[info.object_id] = task.spec
        self._finished(task)
        return self._drain([])

    def object_lost(self, object_id: int, rank: int) -> Outbox:
        """The directory found no complete copy of ``object_id`` left after ``rank`` died.

        Lineage: the task that made it runs again (same return ids, counted as a retry; its lost
        inputs are reported and rebuilt the same way, and a fetch of the object waits in the
        directory until the new copy is added).  Without lineage (a ``put``, a reduce result),
        when an input of that task was freed since, or when the task was pinned with
        ``strict_rank`` to a rank that is dead now, the object becomes an error object carrying
        :class:`ObjectLostError` (raised by ``get``).  Idempotent while the re-run is pending.
        """
        if object_id in self.producer or object_id in self.deleted:
            return []
        spec = self.lineage.get(object_id)
        out: Outbox = []
        gone = None if spec is None else next(
            (d for d in spec.deps if d not in self.objects and d not in self.producer), None)
        # (a shard may report the loss before rank_lost has run here)
        pinned_dead = spec is not None and self._no_rank_left(spec, self.lost_ranks | {rank})
        if pinned_dead and not spec.strict_rank:
            # pinning is placement, not identity: the finished result is rebuilt elsewhere
            spec = replace(spec, rank=None, allowed=None)
            pinned_dead = False
        if spec is None or gone is not None or pinned_dead or not self.workers:
            self.lineage.pop(object_id, None)
            error = to_bytes(local_error(ObjectLostError(format_id(object_id), rank)))
            info = ObjectInfo(object_id, frame_sizes(error), (), tuple(error), True)
            self.completed.append(info)
            self._cascade.append(info)
            out += [(r, DirAdd(info)) for r in self.shard_ranks(object_id)]
            return self._drain(out)
        task = _Task(spec)
        self.tasks[spec.task_id] = task
        self.stats["retried"] += 1
        self.stats["rebuilt"] += 1
        for oid in spec.return_ids:
            self.lineage.pop(oid, None)
            self.producer[oid] = spec.task_id
            self.objects.pop(oid, None)
        for oid in spec.deps:
            self.dep_count[oid] = self.dep_count.get(oid, 0) + 1
        self._wait_for(task, {d for d in spec.deps if d not in self.objects})   # being rebuilt
        if not task.missing:
            self._make_ready(task)
        # tasks running with the lost object as an input now wait for its rebuild: their places
        # are given up as in a nested get (else they can hold every place the rebuild could take)
        rebuilt = set(spec.return_ids)
        for other in self.tasks.values():
            if other.state is TaskState.RUNNING and not other.blocked and rebuilt & set(other.spec.deps):
                other.blocked = True
                self.inflight[other.rank] -= 1
        return out + self.dispatch()

    def release(self, object_id: int) -> None:
        """The driver dropped its last ref to the object (it never escaped into another object):
        free it once no unfinished task produces or uses it (appended to :attr:`freed`)."""
        if self.dep_count.get(object_id) or object_id in self.producer:
            self.released.add(object_id)
        else:
            self.freed.append(object_id)

    def _finished(self, task: _Task) -> None:
        """A task left the scheduler (done, failed, cancelled): its inputs may be freed now, and
        results already released."""
        for oid in task.spec.deps:
            left = self.dep_count[oid] - 1
            if left:
                self.dep_count[oid] = left
                continue
            del self.dep_count[oid]
            if oid in self.released:
                self.released.discard(oid)
                self.freed.append(oid)
        for oid in task.spec.return_ids:
            if oid in self.released and not self.dep_count.get(oid):
                self.released.discard(oid)
                self.freed.append(oid)

    def task_blocked(self, task_id: int, blocked: bool) -> Outbox:
        """A running task entered (``blocked``) or left a nested get/wait."""
        task = self.tasks.get(task_id)
        if task is None or task.state is not TaskState.RUNNING or task.blocked == blocked:
            return []
        task.blocked = blocked
        self.inflight[task.rank] += -1 if blocked else 1
        return self.dispatch() if blocked else []

    def cancel(self, task_id: int) -> tuple[bool, Outbox]:
        """Cancel a task that has not been placed yet.  Returns (cancelled, messages).

        The task's own results are not reported in :attr:`completed` (the caller cancels them);
        its dependents fail with ``CancelledError``.
        """
        task = self.tasks.get(task_id)
        if task is None or task.state not in (TaskState.WAITING, TaskState.READY):
            return False, []
        if task.state is TaskState.READY:
            self._queue(task.spec).remove(task_id)
        out: Outbox = []
        self._fail(task, to_bytes(local_error(CancelledError())), out, report=False)
        return True, self._drain(out)

    # --- placement -----------------------------------------------------------------------

    def dispatch(self) -> Outbox:
        """Place ready tasks on workers with room; returns the RunTask messages."""
        out: Outbox = []
        failed: Outbox = []
        for key, queue in self.ready.items():
            while queue:
                task = self.tasks[queue[0]]
                gone = next((oid for oid in task.spec.deps if oid not in self.objects), None)
                if gone is not None:   # an input was deleted or lost after the task became ready
                    queue.popleft()
                    if gone in self.producer:      # being rebuilt from lineage: wait for it
                        task.move(TaskState.WAITING)
                        self._wait_for(task, {d for d in task.spec.deps if d not in self.objects})
                        continue
                    self._fail(task, _deleted_error(gone), failed)
                    continue
                rank = self._place(task.spec)
                if rank is None:
                    break
                queue.popleft()
                out.append((rank, self._run(task, rank)))
        if failed:
            out += self._drain(failed)
        return out

    def _place(self, spec: TaskSpec) -> Optional[int]:
        limit = self.tasks_per_worker
        if spec.rank is not None:
            return spec.rank if self.inflight[spec.rank] < limit else None
        candidates = [r for r in spec.allowed if r in self.inflight] if spec.allowed else self.workers
        local: dict[int, int] = {}   # rank -> bytes of this task's (chunked) inputs it holds
        for oid in spec.deps:
            info = self.objects.get(oid)
            if info is not None and info.inline is None:
                for holder in info.holders:
                    local[holder] = local.get(holder, 0) + info.nbytes
        if local:
            for holder in sorted(local, key=local.__getitem__, reverse=True):
                if holder in candidates and self.inflight.get(holder, limit) < limit:
                    return holder
        if not candidates:
            return None
        rank = min(candidates, key=self.inflight.__getitem__)
        return rank if self.inflight[rank] < limit else None

    def _run(self, task: _Task, rank: int) -> RunTask:
        task.move(TaskState.RUNNING)
        task.rank = rank
        task.attempts += 1
        self.inflight[rank] += 1
        spec = task.spec
        sent = self.sent_blobs[rank]
        blobs = tuple((key, self.blobs[key]) for key in (spec.fn_id, spec.init_id)
                      if key is not None and key not in sent)
        sent.update(key for key, _ in blobs)
        return RunTask(spec, tuple(self.objects[oid] for oid in spec.deps), blobs)

    def _queue(self, spec: TaskSpec) -> deque:
        key = ("rank", spec.rank) if spec.rank is not None else spec.allowed
        queue = self.ready.get(key)
        if queue is None:
            queue = self.ready[key] = deque()
        return queue

    def _make_ready(self, task: _Task) -> None:
        spec = task.spec
        task.move(TaskState.READY)
        self._queue(spec).append(spec.task_id)

    def _fail(self, task: _Task, error: tuple, out: Outbox, report: bool = True) -> None:
        """Fail a task without running it: every result becomes the error object ``error``
        (its frames); the results are queued on the cascade, the DirAdds appended to ``out``."""
        task.move(TaskState.FAILED)
        self.tasks.pop(task.spec.task_id, None)
        self.stats["failed"] += 1
        sizes = frame_sizes(error)
        for oid in task.spec.return_ids:
            self.producer.pop(oid, None)
            info = ObjectInfo(oid, sizes, (), tuple(error), True)
            if report:
                self.completed.append(info)
            out += [(rank, DirAdd(info)) for rank in self.shard_ranks(oid)]
            self._cascade.append(info)
        self._finished(task)

    # --- introspection -------------------------------------------------------------------

    def pending(self) -> int:
        """Tasks not finished yet."""
        return len(self.tasks)
