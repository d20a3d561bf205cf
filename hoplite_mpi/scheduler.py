"""The task scheduler of rank 0: a pure state machine (events in -> instructions out), no MPI.

Task life cycle (one gate per transition; an illegal one raises :class:`InvalidTransition`)::

    WAITING --inputs exist--> READY --placed--> RUNNING --TaskDone--> DONE
       |  <--input lost, rebuilt--|    <--its rank died--+ (attempt <= max_retries)
       +--input failed/deleted--+--cancel--> FAILED (its results become error objects)
                                     <--its rank died--  (pinned there, retries used up)

Placement (dynamic, dependency-aware): a pinned task goes to its rank; otherwise the rank holding
most bytes of the task's inputs if it has room, else the least loaded rank.  Each worker keeps up
to ``tasks_per_worker`` tasks in flight; tasks blocked in a nested ``get`` do not count, so nested
tasks can always be placed (no deadlock when every worker waits on children).

Placement ahead (``worker_deps``; Dask's worker-side dependency handling): a WAITING task whose
missing inputs are all made by tasks placed on one rank ``r`` (RUNNING there) is placed on ``r`` at
once, its RunTask naming those inputs ``None``; the worker starts it the moment they are made
there, without a round trip to rank 0 (a chain costs one local hand-off per link).  For rank 0 it
is RUNNING on ``r`` (rank loss re-queues it like a running task, so it is placed ahead only while
it has a retry left).  At most ``worker_threads`` tasks go ahead per missing
object (a fan-out still spreads over the workers once the object exists).

Cancel: a task not placed yet is cancelled at once.  A placed one (RUNNING here) may still wait
on its worker, for inputs or for a thread: the worker is asked (:class:`~hoplite_mpi.protocol.Revoke`)
and it is cancelled only if it has not started there, answered by a :class:`TaskCancelled`
instruction when the worker replies (or when its rank is lost: then rank 0 decides).

One entry point, as Dask's ``handle_stimulus``: :meth:`Scheduler.handle` takes one event and
returns one list of instructions, to be carried out in order.  An instruction is either a message
to send, a plain ``(rank, message)`` tuple, or a local :class:`Instruction` (tell them apart with
``type(item) is tuple``): :class:`Completed` (objects became ready or failed: deliver them to the
driver's refs), :class:`FreeObjects` (free these objects now), :class:`TaskCancelled`.  Local
instructions come after the messages of the same event.

Events: protocol messages as they arrive (a :class:`~hoplite_mpi.protocol.TaskSpec` is a new
task; :class:`~hoplite_mpi.protocol.TaskDone`, :class:`~hoplite_mpi.protocol.TaskBlocked`,
:class:`~hoplite_mpi.protocol.ObjectLost`, :class:`~hoplite_mpi.protocol.TaskExit`) and the
events defined here (:class:`ObjectKnown`, :class:`LookedUp`, :class:`ObjectDeleted`,
:class:`Forget`, :class:`Release`, :class:`Cancel`) and :class:`~hoplite_mpi.events.RankLost`.
What the shell may still ask is answered by query methods (:meth:`Scheduler.object_info`, :meth:`Scheduler.produces`,
:meth:`Scheduler.task_name`, :meth:`Scheduler.pending`).
"""
from __future__ import annotations

from collections import Counter, deque
from concurrent.futures import CancelledError
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Optional

from .errors import ObjectDeletedError, ObjectLostError, RankLostError, WorkerCrashedError
from .events import Instruction, Outbox, RankLost
from .ids import format_id
from .protocol import (DirAdd, DirCheck, DirDelete, DirLookup, ObjectInfo, ObjectLost, Revoke,
                       Revoked, RunTask, TaskBlocked, TaskDone, TaskExit, TaskSpec)
from .serialization import error_info, local_error, to_bytes


def _deleted_error(object_id: int) -> tuple:
    return to_bytes(local_error(ObjectDeletedError(format_id(object_id))))


# --- events (handle() takes one; protocol messages are events too, see the module docstring) ----

@dataclass(slots=True)
class Submitted:
    """New tasks submitted in one burst (``Config.submit_batch``): accepted in order as if each
    were its own :class:`~hoplite_mpi.protocol.TaskSpec` event, then placed in one pass."""

    specs: list


@dataclass(slots=True)
class ObjectKnown:
    """The object exists now (a ``put``, a reduce result): tasks waiting for it may run."""

    info: ObjectInfo


@dataclass(slots=True)
class LookedUp:
    """The directory answered a lookup (``DirReply``): ``info`` is None when the object was
    deleted.  An answer to a lookup the scheduler did not ask for is ignored unless it says
    deleted."""

    object_id: int
    info: Optional[ObjectInfo]


@dataclass(slots=True)
class ObjectDeleted:
    """``hm.delete`` of the object (here or on another rank): tasks waiting for it fail with
    ObjectDeletedError.  ``uncache``: the delete was made on this rank, and if the object is a
    small value the scheduler knows, every live worker drops its cached copy and records the
    deletion (``DirDelete``), sent ahead of any task placed later."""

    object_id: int
    uncache: bool = False


@dataclass(slots=True)
class Forget:
    """The object was freed automatically (no ref to it is left): drop it, no tombstone."""

    object_id: int


@dataclass(slots=True)
class Release:
    """The driver dropped its last ref to the object (it never escaped into another object): it
    is freed (:class:`FreeObjects`) once no unfinished task makes or uses it."""

    object_id: int


@dataclass(slots=True)
class Cancel:
    """Cancel the task if it has not been placed yet (then :class:`TaskCancelled` comes out; its
    own results are not in :class:`Completed`, the caller cancels them; its dependents fail with
    CancelledError).  A task already placed, finished or unknown: nothing comes out."""

    task_id: int


@dataclass(slots=True)
class Drain:
    """Stop starting tasks (durable workflows, issue 14: the job is about to end): from now on
    no task is placed, and every placed task that may not have started on its worker is
    revoked (a Revoke; the worker drops it unstarted, as for :class:`Cancel`).  Tasks that have
    started run to their end.  Irreversible."""


# --- local instructions (in handle()'s output beside the (rank, message) sends) -----------------

@dataclass(slots=True)
class Completed(Instruction):
    """These objects became ready, or failed (error objects), in this event: deliver them to the
    driver's refs and to whoever waits for them.  A task's results, in the order reported."""

    infos: list


@dataclass(slots=True)
class FreeObjects(Instruction):
    """Free these objects now on every rank (not permanent: no tombstone, the ids are unused)."""

    ids: list


@dataclass(slots=True)
class TaskCancelled(Instruction):
    """The answer to a :class:`Cancel`: ``cancelled``, the task will not run; else it has
    started (or finished) on its worker.  Only a placed task gets a negative answer, later (see
    :meth:`Scheduler.revoking_task`); a cancel of a task not placed is answered at once, and of
    one not known (finished) not at all."""

    task_id: int
    cancelled: bool = True


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
        shard_of: maps an object id to its shard's index (as in
            :class:`~hoplite_mpi.events.RankLost`).
        worker_deps: place tasks ahead (module docstring; ``Config.worker_deps``).
        worker_threads: tasks placed ahead per missing object (``Config.worker_threads``).
    """

    def __init__(self, workers: Iterable[int], shard_ranks: Callable[[int], tuple[int, ...]],
                 tasks_per_worker: int = 16, rank: int = 0,
                 shard_of: Callable[[int], int] = lambda oid: 0,
                 worker_deps: bool = False, worker_threads: int = 1) -> None:
        self.workers = list(workers)
        if not self.workers:
            raise ValueError("the scheduler needs at least one worker rank")
        self.rank = rank
        self.shard_ranks = shard_ranks
        self.shard_of = shard_of
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
        self._completed: list[ObjectInfo] = []         # this event's, for the Completed instruction
        self._cascade: deque = deque()                 # object arrivals not yet applied
        self.dep_count: dict[int, int] = {}            # object id -> unfinished tasks using it
        self.released: set[int] = set()                # driver dropped its ref; free when unused
        self._freed: list[int] = []                    # this event's, for the FreeObjects instruction
        self.lost_ranks: set[int] = set()
        self.lineage: dict[int, TaskSpec] = {}          # live chunked result -> the task that made it
        self.worker_deps, self.worker_threads = worker_deps, worker_threads
        self.candidates: list[int] = []                 # WAITING tasks that may go ahead now
        self.ahead_later: dict[int, deque] = {}         # rank -> tasks to place ahead when it has room
        self.ahead_count: dict[int, int] = {}           # missing object -> tasks placed ahead on it
        self.revoking: set[int] = set()                 # placed tasks whose cancel was asked of the worker
        self.draining = False                           # Drain: no task is placed any more
        # done: finished on a worker ("errored": of those, with an exception as result);
        # failed: failed without running (a dependency's error, a dead pinned rank, ...)
        self.stats = {"submitted": 0, "done": 0, "errored": 0, "failed": 0, "retried": 0,
                      "rebuilt": 0}
        self._handlers: dict[type, Callable] = {
            TaskSpec: self._submit, Submitted: self._submit_many, TaskDone: self._task_done, TaskBlocked: self._task_blocked,
            ObjectLost: self._object_lost, TaskExit: self._task_exit,
            ObjectKnown: self._object_known, LookedUp: self._looked_up,
            ObjectDeleted: self._object_deleted, Forget: self._forget, Release: self._release,
            Cancel: self._cancel, Revoked: self._revoked, RankLost: self._rank_lost,
            Drain: self._drain_job}

    def handle(self, event: object) -> list:
        """Apply one event; returns the instructions, in order: ``(rank, message)`` sends, then
        the local :class:`Instruction` s (see the module docstring).

        Raises:
            TypeError: not an event of the scheduler (nothing changed).
            InvalidTransition: a bug (a task moved along an edge its life cycle lacks); the state
                is undefined then.
        """
        try:
            handler = self._handlers[event.__class__]
        except KeyError:
            raise TypeError(f"the scheduler has no event {type(event).__name__}") from None
        out = handler(event)
        if self._completed:
            out.append(Completed(self._completed))
            self._completed = []
        if self._freed:
            out.append(FreeObjects(self._freed))
            self._freed = []
        return out

    # --- queries -------------------------------------------------------------------------

    def object_info(self, object_id: int) -> Optional[ObjectInfo]:
        """What rank 0 knows of a ready object (error objects too), else None.  Any thread
        (one dict read)."""
        return self.objects.get(object_id)

    def produces(self, object_id: int) -> bool:
        """Whether an unfinished task makes ``object_id`` (submitted, or re-run from lineage)."""
        return object_id in self.producer

    def task_name(self, task_id: int) -> str:
        """``"name id"`` of an unfinished task, else just its id (for logs)."""
        task = self.tasks.get(task_id)
        return f"{task.spec.name or 'task'} {format_id(task_id)}" if task else format_id(task_id)

    def pending(self) -> int:
        """Tasks not finished yet."""
        return len(self.tasks)

    def snapshot(self, max_tasks: int = 60) -> dict:
        """A copy of the state, for diagnostics (debug.py's summary, tests): ``states`` (unfinished
        tasks per state), ``inflight`` (tasks placed per worker), ``lost_ranks``, ``stats``,
        ``released`` (objects freed once no task uses them), ``dep_count`` (object id ->
        unfinished tasks using it), and ``tasks``: up to ``max_tasks`` unfinished tasks as
        ``(task_id, name, state, rank, attempts, missing ids)``.  Any thread: read without a lock
        while the engine runs, so a copy may raise RuntimeError (a table changed under it)."""
        tasks = list(self.tasks.items())
        return {"states": dict(Counter(t.state for _, t in tasks)), "inflight": dict(self.inflight),
                "lost_ranks": sorted(self.lost_ranks), "stats": dict(self.stats),
                "released": set(self.released), "dep_count": dict(self.dep_count),
                "tasks": [(tid, t.spec.name, t.state, t.rank, t.attempts, tuple(t.missing))
                          for tid, t in tasks[:max_tasks]]}

    # --- events --------------------------------------------------------------------------

    def _refusal(self, spec: TaskSpec) -> Optional[BaseException]:
        """Why a new task cannot be accepted, or None."""
        name = f"{spec.name or 'task'} {format_id(spec.task_id)}"
        if spec.rank is not None and spec.rank not in self.inflight:
            if spec.rank in self.lost_ranks:
                return RankLostError(name, spec.rank, 0, "pinned to it; it died before the task was submitted")
            return ValueError(f"rank {spec.rank} is not a worker rank (workers: {self.workers})")
        if spec.allowed is not None and (not spec.allowed or not set(spec.allowed) <= self.inflight.keys() | self.lost_ranks):
            return ValueError(f"allowed ranks {spec.allowed} are not all worker ranks (workers: {self.workers})")
        if spec.allowed is not None and not set(spec.allowed) - self.lost_ranks:
            return RankLostError(name, max(spec.allowed), 0,
                                 f"every allowed rank {spec.allowed} died before the task was submitted")
        if spec.fn_id not in self.blobs or (spec.init_id is not None and spec.init_id not in self.blobs):
            return ValueError(f"task {format_id(spec.task_id)}: function was never sent")
        if not self.workers:
            return RankLostError(name, max(self.lost_ranks, default=-1), 0,
                                 "no worker rank left when the task was submitted")
        return None

    def _submit(self, spec: TaskSpec) -> Outbox:
        """(event: a TaskSpec) A new task (see :meth:`_accept`)."""
        out: Outbox = []
        self._accept(spec, out)
        return self._drain(out)

    def _submit_many(self, event: Submitted) -> Outbox:
        """(event: Submitted) New tasks, accepted in order, then placed in one pass."""
        out: Outbox = []
        for spec in event.specs:
            self._accept(spec, out)
        return self._drain(out)

    def _accept(self, spec: TaskSpec, out: Outbox) -> None:
        """A new task, not placed yet; its messages are appended to ``out`` (refused or failed
        ones leave error objects on the cascade: the caller drains it).

        Refused (pinned to a rank that died before, every allowed rank died, or no worker rank is left:
        RankLostError; a
        pinned/allowed rank that never was a worker, or a function never sent: ValueError): its
        results become error objects raising that error (registered at their shards and
        :class:`Completed`), and nothing else is kept but the function itself (a submitter sends
        it with its first task only, so later tasks of it must still find it).
        """
        for key, blob in ((spec.fn_id, spec.fn_blob), (spec.init_id, spec.init_blob)):
            if key is not None and blob is not None:
                self.blobs[key] = blob
        if (spec.rank is not None or spec.allowed is not None or spec.fn_id not in self.blobs
                or spec.init_id is not None or not self.workers):
            refused = self._refusal(spec)
            if refused is not None:
                self._error_objects(spec.return_ids, to_bytes(local_error(refused)), out)
                self._apply(out)     # (a later task of the burst may use these results)
                return
        if spec.fn_blob is not None or spec.init_blob is not None:
            spec = replace(spec, fn_blob=None, init_blob=None)
        task = _Task(spec)
        self.tasks[spec.task_id] = task
        self.stats["submitted"] += 1
        for oid in spec.deps:
            self.dep_count[oid] = self.dep_count.get(oid, 0) + 1
        for oid in spec.return_ids:
            self.producer[oid] = spec.task_id
        for oid in spec.deps:
            info = self.objects.get(oid)
            if info is not None and info.error:
                self._fail(task, info.inline, out)
                self._apply(out)
                return
            if oid in self.deleted:
                self._fail(task, _deleted_error(oid), out)
                self._apply(out)
                return
            if info is None:
                task.missing.add(oid)
                self.dependents.setdefault(oid, []).append(spec.task_id)
                if oid not in self.producer and oid not in self.looked_up:
                    self.looked_up.add(oid)
                    out.append((self.shard_ranks(oid)[0], DirLookup(oid, self.rank)))
        if not task.missing:
            self._make_ready(task)
        elif self.worker_deps:
            self.candidates.append(spec.task_id)

    def _object_known(self, event: ObjectKnown) -> Outbox:
        self._cascade.append(event.info)
        return self._drain([])

    def _looked_up(self, event: LookedUp) -> Outbox:
        if event.info is None:
            return self._object_deleted(ObjectDeleted(event.object_id))
        if event.object_id in self.looked_up:
            self._cascade.append(event.info)
            return self._drain([])
        return []

    def _drain(self, out: Outbox) -> Outbox:
        """Apply queued object arrivals (:meth:`_apply`); returns ``out`` plus the dispatches."""
        self._apply(out)
        return out + self._dispatch()

    def _apply(self, out: Outbox) -> None:
        """Apply queued object arrivals; failures cascade through dependents iteratively (a chain
        of any length fails without recursion); their messages are appended to ``out``."""
        cascade = self._cascade
        while cascade:
            info = cascade.popleft()
            if info.object_id in self.deleted:
                continue
            self.objects[info.object_id] = info
            self.ahead_count.pop(info.object_id, None)
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

    def _object_deleted(self, event: ObjectDeleted) -> Outbox:
        """Tasks waiting for the object fail with ObjectDeletedError (a ready task that still
        holds it fails when it would be placed, see :meth:`_dispatch`)."""
        object_id = event.object_id
        out: Outbox = []
        if event.uncache:
            info = self.objects.get(object_id)
            if info is not None and info.inline is not None:
                # a DirDelete, not a Free: the worker then knows the object is deleted before any
                # task placed after the delete runs there, and answers its reads without the
                # shard (whose own DirDelete may arrive after such a read's lookup: MPI orders
                # messages per pair only; found by a real-MPI soak, seed 500062)
                out += [(rank, DirDelete(object_id, True)) for rank in self.workers if rank != self.rank]
        self.deleted.add(object_id)
        self.objects.pop(object_id, None)
        self.lineage.pop(object_id, None)
        for task_id in self.dependents.pop(object_id, ()):
            task = self.tasks.get(task_id)
            if task is not None and task.state is TaskState.WAITING:
                self._fail(task, _deleted_error(object_id), out)
        return self._drain(out)

    def _forget(self, event: Forget) -> Outbox:
        object_id = event.object_id
        self.objects.pop(object_id, None)
        self.lineage.pop(object_id, None)
        self.looked_up.discard(object_id)
        return []

    def _rank_lost(self, event: RankLost) -> Outbox:
        """Results of tasks whose maker was ``rank`` are checked at their shards (:class:`DirCheck`).
        What only rank 0 knows goes again to shards that moved (small values, deletions,
        and objects whose copies died with the shard are rebuilt as by :class:`ObjectLost`), and
        lookups waiting at a dead primary are sent again.  Then, if ``rank`` was a worker: it
        gets no more tasks; each task running there goes back to the ready queue (counted in
        ``stats["retried"]``) unless it has been started ``max_retries + 1`` times; a task pinned
        to ``rank`` (running or not), or left with no allowed rank, fails with
        :class:`RankLostError`, and so do all unfinished tasks if no worker is left.  Objects
        that were only on ``rank`` are the directory's business (:class:`ObjectLost`).
        Idempotent."""
        out: Outbox = []
        moved = event.moved if event.changed else frozenset()
        shard_of, shard_ranks = self.shard_of, self.shard_ranks
        for oid, info in list(self.objects.items()):
            here = shard_of(oid) in moved
            if info.inline is not None:
                if here:
                    out += [(r, DirAdd(info)) for r in shard_ranks(oid)]
            elif info.holders and set(info.holders) <= event.dead:
                if here:
                    # its copy and its shard died: rebuilt from lineage, else (a put, a reduce
                    # result) an ObjectLostError value; a copy made elsewhere (a replica, a
                    # broadcast) that registers with the new shard still wins there
                    # (directory.add; simulation seed 52)
                    out += self._object_lost(ObjectLost(oid, event.rank))
                elif event.rank in info.holders and not info.error:
                    # a result whose maker died: its shard may never have had its DirAdd (sent
                    # beside the TaskDone); the shard tells (DirCheck; simulation seed 192)
                    out += [(r, DirCheck(oid, event.rank)) for r in shard_ranks(oid)]
        if event.changed:
            for oid in self.deleted:
                if shard_of(oid) in moved:
                    out += [(r, DirDelete(oid, True)) for r in shard_ranks(oid)]
            for oid in self.looked_up:
                if shard_of(oid) in event.changed and oid not in self.objects:
                    out.append((shard_ranks(oid)[0], DirLookup(oid, self.rank)))
        rank = event.rank
        if rank not in self.inflight:
            return out
        self.lost_ranks.add(rank)
        self.workers.remove(rank)
        del self.inflight[rank]
        self.sent_blobs.pop(rank, None)
        self.ahead_later.pop(rank, None)
        self.ahead_count.clear()    # (counts of tasks re-queued now; a stale count only holds
                                    # back placement ahead until the object exists)
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
        # cancels the dead rank can no longer answer: the tasks are rank 0's again
        answers = []
        for task_id in [t for t in self.revoking if self._revocable(t) is None]:
            self.revoking.discard(task_id)
            for item in self._cancel(Cancel(task_id)):
                (answers if item.__class__ is TaskCancelled else out).append(item)
            if not answers or answers[-1].task_id != task_id:
                answers.append(TaskCancelled(task_id, False))
        return self._drain(out) + answers     # (local instructions after the sends)

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

    def _task_done(self, msg: TaskDone) -> Outbox:
        """A worker finished a task (successfully or with an error object as result).  A report
        of an unknown task, or from a rank already lost, is ignored."""
        task = self.tasks.get(msg.task_id)
        if task is None or msg.rank in self.lost_ranks:   # (a dead rank's late report: its
            return []                                    # results died with it; re-run anyway)
        task.move(TaskState.DONE)
        del self.tasks[msg.task_id]
        if not task.blocked:
            self.inflight[task.rank] -= 1
        self.stats["done"] += 1
        if msg.results and msg.results[0].error:
            self.stats["errored"] += 1
        for info in msg.results:
            self.producer.pop(info.object_id, None)
            self._completed.append(info)
            self._cascade.append(info)
            if info.inline is None and not info.error:   # (inline values live in the directory)
                self.lineage[info.object_id] = task.spec
        self._finished(task)
        return self._drain([])

    def _object_lost(self, msg: ObjectLost) -> Outbox:
        """The directory found no complete copy of ``object_id`` left after ``rank`` died.

        Lineage: the task that made it runs again (same return ids, counted as a retry; its lost
        inputs are reported and rebuilt the same way, and a fetch of the object waits in the
        directory until the new copy is added).  Without lineage (a ``put``, a reduce result),
        when an input of that task was freed since, or when the task was pinned with
        ``strict_rank`` to a rank that is dead now, the object becomes an error object carrying
        :class:`ObjectLostError` (raised by ``get``).  Idempotent while the re-run is pending.
        """
        object_id, rank = msg.object_id, msg.rank
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
            self._error_objects((object_id,), error, out)
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
        return out + self._dispatch()

    def _release(self, event: Release) -> Outbox:
        object_id = event.object_id
        if self.dep_count.get(object_id) or object_id in self.producer:
            self.released.add(object_id)
        else:
            self._freed.append(object_id)
        return []

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
                self._freed.append(oid)
        for oid in task.spec.return_ids:
            if oid in self.released and not self.dep_count.get(oid):
                self.released.discard(oid)
                self._freed.append(oid)

    def _task_blocked(self, msg: TaskBlocked) -> Outbox:
        """A running task entered (``blocked``) or left a nested get/wait: its slot is freed or
        taken again.  Of a task not running, or repeated: ignored."""
        task, blocked = self.tasks.get(msg.task_id), msg.blocked
        if task is None or task.state is not TaskState.RUNNING or task.blocked == blocked:
            return []
        task.blocked = blocked
        self.inflight[task.rank] += -1 if blocked else 1
        return self._dispatch() if blocked else []

    def revoking_task(self, task_id: int) -> bool:
        """Whether a cancel of the task waits for its worker's answer (a TaskCancelled comes
        out of a later event: the worker's Revoked, or the loss of its rank)."""
        return task_id in self.revoking

    def _revocable(self, task_id: int) -> Optional[_Task]:
        """The task if it is placed (RUNNING) and may not have started on its worker (waiting
        there for inputs or queued for a thread; not blocked in a nested get), else None."""
        task = self.tasks.get(task_id)
        return task if (task is not None and task.state is TaskState.RUNNING
                        and not task.blocked) else None

    def _cancel(self, event: Cancel) -> Outbox:
        task_id = event.task_id
        task = self.tasks.get(task_id)
        if self._revocable(task_id) is not None:
            if task_id in self.revoking:
                return []
            self.revoking.add(task_id)
            return [(task.rank, Revoke(task_id))]
        if task is None or task.state not in (TaskState.WAITING, TaskState.READY):
            return []
        if task.state is TaskState.READY:
            self._queue(task.spec).remove(task_id)
        out: Outbox = []
        self._fail(task, to_bytes(local_error(CancelledError())), out, report=False)
        out = self._drain(out)
        out.append(TaskCancelled(task_id))
        return out

    def _revoked(self, msg: Revoked) -> Outbox:
        """The worker's answer to a :class:`Revoke`: if it dropped the task before it started,
        the task fails with CancelledError as by :class:`Cancel` (its dependents placed ahead
        on that worker fail there, the others here).  Either way a :class:`TaskCancelled`
        answers the cancel."""
        task_id = msg.task_id
        if task_id not in self.revoking:
            return []
        self.revoking.discard(task_id)
        task = self._revocable(task_id)
        if not msg.dropped or task is None or task.rank != msg.rank:
            return [TaskCancelled(task_id, False)]
        if not task.blocked:
            self.inflight[task.rank] -= 1
        out: Outbox = []
        self._fail(task, to_bytes(local_error(CancelledError())), out, report=False)
        out = self._drain(out)
        out.append(TaskCancelled(task_id))
        return out

    def _task_exit(self, msg: TaskExit) -> Outbox:
        """The task called ``os._exit`` on ``msg.rank``.  Not retried (unlike a rank's death): the
        exit is the task's own doing and would most likely happen again, and a rank so ended
        cannot be replaced; retries would cost the job one rank after another.  It fails now,
        as a task's exception does: its results become WorkerCrashedError objects (registered at
        their shards).  A task not running on that rank (any more): ignored."""
        task = self.tasks.get(msg.task_id)
        if task is None or task.rank != msg.rank or task.state is not TaskState.RUNNING:
            return []
        exc = WorkerCrashedError(self.task_name(msg.task_id), msg.rank, task.attempts, msg.status)
        error = to_bytes(local_error(exc))
        infos = tuple(error_info(oid, error) for oid in task.spec.return_ids)
        out = [(rank, DirAdd(info)) for info in infos for rank in self.shard_ranks(info.object_id)]
        return out + self._task_done(TaskDone(msg.task_id, msg.rank, infos))

    # --- placement -----------------------------------------------------------------------

    def running(self) -> int:
        """Tasks placed on a worker and not finished (started there or not)."""
        return sum(1 for task in self.tasks.values() if task.state is TaskState.RUNNING)

    def _drain_job(self, event: Drain) -> Outbox:
        self.draining = True
        self.candidates = []
        self.ahead_later = {}
        out: Outbox = []
        for task_id, task in self.tasks.items():
            if self._revocable(task_id) is not None and task_id not in self.revoking:
                self.revoking.add(task_id)
                out.append((task.rank, Revoke(task_id)))
        return out

    def _dispatch(self) -> Outbox:
        """Place ready tasks on workers with room; returns the RunTask messages (and the DirAdds
        of tasks whose inputs went away meanwhile).  Nothing once draining."""
        inflight = self.inflight
        if self.draining:
            return []
        if not inflight or min(inflight.values()) >= self.tasks_per_worker:
            # no room anywhere: nothing can be placed (the common case under a burst; a ready
            # task whose input went away fails when it would be placed, candidates to go ahead
            # wait in self.candidates)
            return []
        out: Outbox = []
        failed: Outbox = []
        ahead = self.worker_deps
        candidates = self.candidates
        for key, queue in self.ready.items():
            while queue:
                task = self.tasks[queue[0]]
                gone = next((oid for oid in task.spec.deps if oid not in self.objects), None)
                if gone is not None:   # an input was deleted or lost after the task became ready
                    queue.popleft()
                    if gone in self.producer:      # being rebuilt from lineage: wait for it
                        task.move(TaskState.WAITING)
                        self._wait_for(task, {d for d in task.spec.deps if d not in self.objects})
                        if ahead:
                            candidates.append(task.spec.task_id)
                        continue
                    self._fail(task, _deleted_error(gone), failed)
                    continue
                rank = self._place(task.spec)
                if rank is None:
                    break
                queue.popleft()
                out.append((rank, self._run(task, rank)))
                if ahead:
                    self._add_dependents(task.spec, candidates)
        if ahead and (candidates or self.ahead_later):
            self._place_ahead(out)
        if failed:
            out += self._drain(failed)
        return out

    def _add_dependents(self, spec: TaskSpec, candidates: list) -> None:
        dependents = self.dependents
        for oid in spec.return_ids:
            waiting = dependents.get(oid)
            if waiting and self.ahead_count.get(oid, 0) < self.worker_threads:
                candidates.extend(waiting)

    def _place_ahead(self, out: Outbox) -> None:
        """Place ahead the candidates that can go (module docstring), appending their RunTasks
        to ``out``; tasks placed ahead make their own dependents candidates."""
        limit, inflight = self.tasks_per_worker, self.inflight
        todo = deque(self.candidates)
        self.candidates = []
        for rank in list(self.ahead_later):
            if inflight[rank] < limit:
                todo.extend(self.ahead_later.pop(rank))
        while todo:
            task = self.tasks.get(todo.popleft())
            if task is None or task.state is not TaskState.WAITING:
                continue
            rank = self._ahead_rank(task)
            if rank is None:
                continue
            if inflight[rank] >= limit:
                self.ahead_later.setdefault(rank, deque()).append(task.spec.task_id)
                continue
            for oid in task.missing:
                self.ahead_count[oid] = self.ahead_count.get(oid, 0) + 1
            task.move(TaskState.READY)
            out.append((rank, self._run(task, rank)))
            self._add_dependents(task.spec, todo)

    def _ahead_rank(self, task: _Task) -> Optional[int]:
        """The rank ``task`` (WAITING) may be placed ahead on, or None."""
        spec = task.spec
        # (a loss while it waits must leave a retry; a pending cancel's answer must find it)
        if task.attempts >= spec.max_retries or spec.task_id in self.revoking:
            return None
        rank = None
        for oid in task.missing:
            if self.ahead_count.get(oid, 0) >= self.worker_threads:
                return None
            maker_id = self.producer.get(oid)
            maker = None if maker_id is None else self.tasks.get(maker_id)
            if (maker is None or maker.state is not TaskState.RUNNING or maker_id in self.revoking
                    or (rank is not None and maker.rank != rank)):
                return None
            rank = maker.rank
        if rank is None or rank not in self.inflight:
            return None
        if (spec.rank is not None and spec.rank != rank) or (spec.allowed is not None and rank not in spec.allowed):
            return None
        return rank

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
        """Move ``task`` (READY) to RUNNING on ``rank``; its RunTask (an input not made yet is
        ``None`` in ``deps``: the task is placed ahead)."""
        task.move(TaskState.RUNNING)
        task.rank = rank
        task.attempts += 1
        self.inflight[rank] += 1
        spec = task.spec
        sent = self.sent_blobs[rank]
        if spec.fn_id in sent and (spec.init_id is None or spec.init_id in sent):
            blobs: tuple = ()
        else:
            blobs = tuple((key, self.blobs[key]) for key in (spec.fn_id, spec.init_id)
                          if key is not None and key not in sent)
            sent.update(key for key, _ in blobs)
        objects = self.objects
        return RunTask(spec, tuple([objects.get(oid) for oid in spec.deps]) if spec.deps else (),
                       blobs)

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
        for oid in task.spec.return_ids:
            self.producer.pop(oid, None)
        self._error_objects(task.spec.return_ids, error, out, report)
        self._finished(task)

    def _error_objects(self, oids: Iterable[int], error: tuple, out: Outbox,
                       report: bool = True) -> None:
        """The objects ``oids`` become the error object ``error`` (its frames): queued on the
        cascade, :class:`Completed` unless not ``report``, their DirAdds appended to ``out``."""
        for oid in oids:
            info = error_info(oid, error)
            if report:
                self._completed.append(info)
            out += [(rank, DirAdd(info)) for rank in self.shard_ranks(oid)]
            self._cascade.append(info)
