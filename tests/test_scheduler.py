"""Scheduler state machine: feed events, compare the emitted (rank, message) lists with ``==``.

Every event goes through :meth:`Scheduler.handle`; the helper :class:`Fed` keeps the old
method names (``s.submit(spec)`` feeds the event, returns the sends) and collects the local
instructions (``s.completed``, ``s.freed``), checking that each event gives its sends first and at
most one instruction of each local kind.

Conventions: task ids are multiples of 10 (a task's return ids are ``task_id ..
task_id + num_returns - 1``); objects the scheduler did not make have ids >= 500; every object's
directory shard is on rank ``SHARD`` (or ``SHARD, SHARD2`` with replication); the scheduler is rank 0.
"""
from __future__ import annotations

import re
from concurrent.futures import CancelledError
from dataclasses import replace

import pytest

from hoplite_mpi.errors import ObjectDeletedError, RemoteTraceback
from hoplite_mpi.events import RankLost
from hoplite_mpi.ids import format_id
from hoplite_mpi.protocol import (DirAdd, DirCheck, DirDelete, DirLookup, Free, ObjectInfo,
                                  ObjectLost, Revoke, Revoked, RunTask, TaskBlocked, TaskDone,
                                  TaskExit, TaskSpec)
from hoplite_mpi.scheduler import (Cancel, Completed, Forget, FreeObjects, InvalidTransition,
                                   LookedUp, ObjectDeleted, ObjectKnown, Release, Scheduler,
                                   TaskCancelled, TaskState)
from hoplite_mpi.serialization import frame_sizes, local_error, rebuild_error, serialize_error, to_bytes

FN, FN_BLOB = b"fn-id", b"<fn blob>"
FIRST = ((FN, FN_BLOB),)  # RunTask.blobs of the first task of FN on a worker
SHARD, SHARD2 = 7, 8


class Fed:
    """A Scheduler fed only through ``handle``: methods named as the events return the sends;
    ``completed``/``freed``/``cancelled`` collect the local instructions of every event so far.
    Other attributes are the scheduler's (white-box checks of its state)."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.completed: list = []
        self.freed: list = []
        self.cancelled: list = []
        self.not_cancelled: list = []    # cancels answered "it started" (placed ahead)

    def __getattr__(self, name):
        return getattr(self.sched, name)

    def __call__(self, event) -> list:
        sends, local = [], []
        for item in self.sched.handle(event):
            if type(item) is tuple:
                assert not local, f"a send after a local instruction: {item}"
                sends.append(item)
            else:
                assert type(item) not in map(type, local), f"two {type(item).__name__} in one event"
                local.append(item)
                if isinstance(item, Completed):
                    assert item.infos
                    self.completed += item.infos
                elif isinstance(item, FreeObjects):
                    assert item.ids
                    self.freed += item.ids
                else:
                    assert isinstance(item, TaskCancelled), item
                    (self.cancelled if item.cancelled else self.not_cancelled).append(item.task_id)
        return sends

    def submit(self, spec):
        return self(spec)

    def task_done(self, msg):
        return self(msg)

    def task_blocked(self, task_id, blocked):
        return self(TaskBlocked(task_id, blocked))

    def object_known(self, info):
        return self(ObjectKnown(info))

    def object_deleted(self, object_id):
        return self(ObjectDeleted(object_id))

    def object_lost(self, object_id, rank):
        return self(ObjectLost(object_id, rank))

    def forget(self, object_id):
        assert self(Forget(object_id)) == []

    def release(self, object_id):
        assert self(Release(object_id)) == []

    def cancel(self, task_id):
        n = len(self.cancelled)
        out = self(Cancel(task_id))
        return self.cancelled[n:] == [task_id], out

    def rank_lost(self, rank):
        return self(RankLost(rank))


def make(workers=(1, 2, 3), cap=16, shards=(SHARD,), shard_of=lambda oid: 0,
         ahead=False, threads=1) -> Fed:
    return Fed(Scheduler(list(workers), lambda oid: shards, tasks_per_worker=cap, rank=0,
                         shard_of=shard_of, worker_deps=ahead, worker_threads=threads))


def refused(s: Fed, spec: TaskSpec, exc_type: type, match: str = "") -> None:
    """Feed a submit the scheduler must refuse: each result becomes an error object raising
    ``exc_type`` (matching ``match``), registered at its shard and completed, nothing else."""
    n = len(s.completed)
    out = s.submit(spec)
    infos = s.completed[n:]
    assert [i.object_id for i in infos] == list(spec.return_ids)
    assert out == [(SHARD, DirAdd(i)) for i in infos]
    for info in infos:
        assert info.error and info.holders == ()
        exc = rebuild_error(info.inline)
        assert isinstance(exc, exc_type) and re.search(match, str(exc)), exc


def spec(task_id, *deps, num_returns=1, rank=None, allowed=None, fn_id=FN, fn_blob=None,
         init_id=None, init_blob=None) -> TaskSpec:
    return TaskSpec(task_id=task_id, num_returns=num_returns, fn_id=fn_id, fn_blob=fn_blob,
                    args_blob=b"<args>", deps=tuple(deps), owner=0, name=f"t{task_id}", rank=rank,
                    allowed=allowed, init_id=init_id, init_blob=init_blob)


def first(task_id, *deps, **kw) -> TaskSpec:
    """A spec that carries the function blob (the first task of FN)."""
    return spec(task_id, *deps, fn_blob=FN_BLOB, **kw)


def run(s: TaskSpec, deps=(), blobs=()) -> RunTask:
    """The RunTask the scheduler should send: function blobs move from the spec to ``blobs``."""
    return RunTask(replace(s, fn_blob=None, init_blob=None), tuple(deps), tuple(blobs))


def value(oid, rank, data=b"v") -> ObjectInfo:
    """A small (inline) object held by ``rank``."""
    return ObjectInfo(oid, (len(data),), (rank,), (data,))


def big(oid, rank, nbytes) -> ObjectInfo:
    """A large object (not inline) held by ``rank``."""
    return ObjectInfo(oid, (64, nbytes - 64), (rank,))


def done(s: TaskSpec, rank, *results) -> TaskDone:
    return TaskDone(s.task_id, rank, results or tuple(value(oid, rank) for oid in s.return_ids))


def task_error(oid, exc, rank) -> ObjectInfo:
    """The error result a worker reports for a task that raised ``exc``."""
    frames = to_bytes(serialize_error(exc, rank))
    return ObjectInfo(oid, frame_sizes(frames), (rank,), frames, True)


def failed(oid, frames) -> ObjectInfo:
    """The error object the scheduler makes for a result of a task it failed without running."""
    return ObjectInfo(oid, frame_sizes(frames), (), tuple(frames), True)


def deleted_error(oid) -> tuple:
    return to_bytes(local_error(ObjectDeletedError(format_id(oid))))


CANCELLED = to_bytes(local_error(CancelledError()))


# --- placement of independent tasks ---------------------------------------------------------

def test_task_without_deps_goes_to_the_least_loaded_worker():
    s = make(workers=(1, 2, 3), cap=2)
    a, b, c, d, e = first(10), spec(20), spec(30), spec(40), spec(50)
    assert s.submit(a) == [(1, run(a, blobs=FIRST))]
    assert s.submit(b) == [(2, run(b, blobs=FIRST))]
    assert s.submit(c) == [(3, run(c, blobs=FIRST))]
    assert s.submit(d) == [(1, run(d))]
    assert s.task_done(done(b, 2)) == []
    assert s.submit(e) == [(2, run(e))]
    assert s.inflight == {1: 2, 2: 1, 3: 1}
    assert s.completed == [value(20, 2)]


def test_tasks_per_worker_cap_holds_tasks_back_until_task_done():
    s = make(workers=(1,), cap=2)
    a, b, c, d = first(10), spec(20), spec(30), spec(40)
    assert s.submit(a) == [(1, run(a, blobs=FIRST))]
    assert s.submit(b) == [(1, run(b))]
    assert s.submit(c) == []
    assert s.submit(d) == []
    assert s.pending() == 4
    assert s.task_done(done(b, 1)) == [(1, run(c))]  # first in, first out
    assert s.task_done(done(a, 1)) == [(1, run(d))]
    assert s.task_done(done(c, 1)) == []
    assert s.task_done(done(d, 1)) == []
    assert s.pending() == 0
    assert s.completed == [value(20, 1), value(10, 1), value(30, 1), value(40, 1)]
    assert s.stats == {"submitted": 4, "done": 4, "errored": 0, "failed": 0, "retried": 0, "rebuilt": 0}


def test_duplicate_task_done_is_ignored():
    s = make(workers=(1,), cap=1)
    a, b, c = first(10), spec(20), spec(30)
    s.submit(a)
    assert s.task_done(done(a, 1)) == []
    assert s.task_done(done(a, 1)) == []
    assert s.completed == [value(10, 1)]
    assert s.inflight == {1: 0}
    assert s.submit(b) == [(1, run(b))]
    assert s.submit(c) == []  # the cap still holds


def test_scheduler_needs_a_worker():
    with pytest.raises(ValueError, match="at least one worker"):
        Scheduler([], lambda oid: (0,))


# --- dependencies ---------------------------------------------------------------------------

def test_dependency_chain_runs_b_after_a_with_a_result_info():
    s = make(workers=(1, 2), cap=4)
    a = first(10, num_returns=2)
    b = spec(20, 11)  # on A's second return value
    assert s.submit(a) == [(1, run(a, blobs=FIRST))]
    assert s.submit(b) == []  # no lookup for a pending result, not placed although there is room
    assert s.pending() == 2
    r10, r11 = value(10, 1, b"x"), value(11, 1, b"y")
    assert s.task_done(done(a, 1, r10, r11)) == [(1, run(b, deps=(r11,)))]
    assert s.completed == [r10, r11]
    r20 = value(20, 1)
    assert s.task_done(done(b, 1, r20)) == []
    assert s.completed == [r10, r11, r20]
    assert s.pending() == 0


def test_task_on_two_pending_results_waits_for_both():
    s = make(workers=(1, 2), cap=4)
    a, b, c = first(10), spec(20), spec(30, 20, 10)
    s.submit(a)
    s.submit(b)
    assert s.submit(c) == []
    ra, rb = value(10, 1), value(20, 2)
    assert s.task_done(done(a, 1, ra)) == []
    assert s.task_done(done(b, 2, rb)) == [(1, run(c, deps=(rb, ra)))]


def test_task_on_a_finished_result_is_placed_at_once():
    s = make(workers=(1,), cap=4)
    a, b = first(10), spec(20, 10)
    s.submit(a)
    ra = value(10, 1)
    s.task_done(done(a, 1, ra))
    assert s.submit(b) == [(1, run(b, deps=(ra,)))]


def test_unknown_dependency_triggers_exactly_one_lookup_to_the_primary_shard():
    s = make(workers=(1,), cap=4, shards=(SHARD, SHARD2))
    b = first(20, 500)
    c = spec(30, 500, 500)
    assert s.submit(b) == [(SHARD, DirLookup(500, 0))]
    assert s.submit(c) == []  # already asked
    assert s.pending() == 2
    x = value(500, 3, b"0123456789")
    assert s.object_known(x) == [(1, run(b, deps=(x,), blobs=FIRST)), (1, run(c, deps=(x, x)))]
    assert s.completed == []  # an object the scheduler did not make is not reported


def test_lookup_goes_to_the_shard_of_each_object():
    s = Fed(Scheduler([1], lambda oid: (100 + oid % 3,), tasks_per_worker=4, rank=0))
    b = first(20, 501, 502)
    assert s.submit(b) == [(100 + 501 % 3, DirLookup(501, 0)), (100 + 502 % 3, DirLookup(502, 0))]
    x = value(501, 2)
    assert s.object_known(x) == []  # still waits for 502
    y = value(502, 3)
    assert s.object_known(y) == [(1, run(b, deps=(x, y), blobs=FIRST))]


def test_known_object_needs_no_lookup():
    s = make(workers=(1,), cap=4)
    x = value(500, 2)
    assert s.object_known(x) == []
    b = first(20, 500)
    assert s.submit(b) == [(1, run(b, deps=(x,), blobs=FIRST))]


# --- failures -------------------------------------------------------------------------------

def test_error_result_propagates_to_dependents_as_error_objects():
    s = make(workers=(1,), cap=4, shards=(SHARD, SHARD2))
    a, b, c = first(10), spec(20, 10), spec(30, 20, num_returns=2)
    s.submit(a)
    s.submit(b)
    s.submit(c)
    ea = task_error(10, ValueError("boom"), rank=1)
    fb, fc0, fc1 = failed(20, ea.inline), failed(30, ea.inline), failed(31, ea.inline)
    assert s.task_done(done(a, 1, ea)) == [
        (SHARD, DirAdd(fb)), (SHARD2, DirAdd(fb)),
        (SHARD, DirAdd(fc0)), (SHARD2, DirAdd(fc0)),
        (SHARD, DirAdd(fc1)), (SHARD2, DirAdd(fc1)),
    ]
    assert s.completed == [ea, fb, fc0, fc1]
    exc = rebuild_error(s.completed[-1].inline)
    assert type(exc) is ValueError and exc.args == ("boom",)
    assert isinstance(exc.__cause__, RemoteTraceback) and exc.__cause__.rank == 1
    assert s.pending() == 0
    assert s.stats == {"submitted": 3, "done": 1, "errored": 1, "failed": 2, "retried": 0, "rebuilt": 0}


def test_task_submitted_on_a_failed_object_fails_at_once():
    s = make(workers=(1,), cap=4)
    a = first(10)
    s.submit(a)
    ea = task_error(10, KeyError("k"), rank=1)
    s.task_done(done(a, 1, ea))
    b = spec(20, 10)
    fb = failed(20, ea.inline)
    assert s.submit(b) == [(SHARD, DirAdd(fb))]
    assert s.completed == [ea, fb]
    assert s.pending() == 0


def test_error_object_from_the_directory_fails_dependents():
    s = make(workers=(1,), cap=4)
    b = first(20, 500)
    s.submit(b)
    ex = task_error(500, RuntimeError("elsewhere"), rank=3)
    fb = failed(20, ex.inline)
    assert s.object_known(ex) == [(SHARD, DirAdd(fb))]
    assert s.completed == [fb]


def test_deleted_dependency_fails_waiting_dependents_with_object_deleted_error():
    s = make(workers=(1,), cap=4)
    b, c = first(20, 500), spec(30, 20)
    assert s.submit(b) == [(SHARD, DirLookup(500, 0))]
    s.submit(c)
    fb, fc = failed(20, deleted_error(500)), failed(30, deleted_error(500))
    assert s.object_deleted(500) == [(SHARD, DirAdd(fb)), (SHARD, DirAdd(fc))]
    assert s.completed == [fb, fc]
    for info in s.completed:
        exc = rebuild_error(info.inline)
        assert type(exc) is ObjectDeletedError
        assert exc.object_id == format_id(500)
    assert s.pending() == 0


def test_deleted_object_stays_deleted():
    s = make(workers=(1,), cap=4)
    x = value(500, 2)
    s.object_known(x)
    assert s.object_deleted(500) == []
    assert s.object_known(x) == []  # a late reply does not bring it back
    assert 500 not in s.objects
    b = first(20, 500)
    fb = failed(20, deleted_error(500))
    assert s.submit(b) == [(SHARD, DirAdd(fb))]
    assert s.completed == [fb]


# --- placement constraints ------------------------------------------------------------------

def test_pinned_task_goes_to_its_rank_and_waits_for_room_there():
    s = make(workers=(1, 2), cap=1)
    p, q, r = first(10, rank=2), spec(20, rank=2), spec(30)
    assert s.submit(p) == [(2, run(p, blobs=FIRST))]
    assert s.submit(q) == []                          # rank 2 is full; rank 1 is not its rank
    assert s.submit(r) == [(1, run(r, blobs=FIRST))]  # not held behind the pinned task
    assert s.task_done(done(p, 2)) == [(2, run(q))]


def test_pinned_to_a_non_worker_rank_is_a_value_error():
    s = make(workers=(1, 2), cap=1)
    refused(s, first(10, rank=5), ValueError, "rank 5 is not a worker")


def test_rejected_submit_leaves_no_task_behind():
    s = make(workers=(1, 2), cap=1)
    refused(s, first(10, rank=5), ValueError)
    assert s.pending() == 0
    assert s.stats["submitted"] == 0


def test_pinned_to_a_non_worker_rank_is_rejected_even_with_missing_deps():
    s = make(workers=(1, 2), cap=1)
    refused(s, first(20, 500, rank=5), ValueError, "not a worker")
    # and nothing is left behind: another task on 500 runs when 500 arrives (a rejected task
    # once was accepted, object_known raised for it and task 30 was never woken)
    c = first(30, 500)
    s.submit(c)
    x = value(500, 1)
    assert s.object_known(x) == [(1, run(c, deps=(x,), blobs=FIRST))]


def test_allowed_ranks_restrict_placement():
    s = make(workers=(1, 2, 3), cap=2)
    a, b, c = first(10, allowed=(2, 3)), spec(20, allowed=(2, 3)), spec(30, allowed=(3,))
    assert s.submit(a) == [(2, run(a, blobs=FIRST))]
    assert s.submit(b) == [(3, run(b, blobs=FIRST))]
    assert s.submit(c) == [(3, run(c))]
    d = spec(40, allowed=(3,))
    assert s.submit(d) == []  # rank 3 full, ranks 1 and 2 not allowed
    assert s.task_done(done(c, 3)) == [(3, run(d))]


def test_allowed_non_worker_rank_is_a_value_error():
    s = make(workers=(1, 2), cap=1)
    refused(s, first(10, allowed=(5,)), ValueError, "not all worker ranks")


def test_locality_places_a_task_on_the_holder_of_its_largest_input():
    s = make(workers=(1, 2, 3), cap=2)
    large = big(500, rank=3, nbytes=1_000_000)
    medium = big(501, rank=2, nbytes=10_000)
    small = value(502, rank=2, data=b"0123456789")  # inline: travels with the task, no pull
    for info in (large, medium, small):
        assert s.object_known(info) == []
    t1, t2, t3, t4, t5 = first(10, 502), spec(20, 500, 501), spec(30, 500), spec(40, 500), spec(50, 500, 501)
    assert s.submit(t1) == [(1, run(t1, deps=(small,), blobs=FIRST))]   # inline input: least loaded
    assert s.submit(t2) == [(3, run(t2, deps=(large, medium), blobs=FIRST))]  # largest input wins
    assert s.submit(t3) == [(3, run(t3, deps=(large,)))]  # holder has room, though rank 2 is idle
    assert s.submit(t4) == [(2, run(t4, deps=(large,), blobs=FIRST))]  # holder full: least loaded
    assert s.inflight == {1: 1, 2: 1, 3: 2}
    assert s.submit(t5) == [(2, run(t5, deps=(large, medium)))]  # next-largest holder with room


def test_locality_sums_the_input_bytes_each_rank_holds():
    s = make(workers=(1, 2, 3), cap=2)
    a = big(500, rank=3, nbytes=1_000_000)
    b, c = big(501, rank=2, nbytes=600_000), big(502, rank=2, nbytes=600_000)
    for info in (a, b, c):
        s.object_known(info)
    t = first(10, 500, 501, 502)
    assert s.submit(t) == [(2, run(t, deps=(a, b, c), blobs=FIRST))]  # 1.2 MB on rank 2 > 1 MB on 3


def test_locality_respects_allowed_ranks():
    s = make(workers=(1, 2, 3), cap=2)
    large = big(500, rank=3, nbytes=1_000_000)
    s.object_known(large)
    t = first(10, 500, allowed=(1, 2))
    assert s.submit(t) == [(1, run(t, deps=(large,), blobs=FIRST))]


# --- nested tasks ---------------------------------------------------------------------------

def test_blocked_task_frees_its_slot_for_a_nested_task():
    s = make(workers=(1,), cap=1)
    parent, child = first(10), spec(20)
    assert s.submit(parent) == [(1, run(parent, blobs=FIRST))]
    assert s.submit(child) == []  # the only slot is taken by the parent: deadlock without blocking
    assert s.task_blocked(10, True) == [(1, run(child))]
    assert s.task_blocked(10, True) == []  # repeated: no second slot
    other = spec(30)
    assert s.submit(other) == []
    assert s.task_done(done(child, 1)) == [(1, run(other))]
    assert s.task_blocked(10, False) == []  # back to running: takes its slot again
    assert s.inflight == {1: 2}
    last = spec(40)
    assert s.submit(last) == []
    assert s.task_done(done(other, 1)) == []  # parent still holds the slot
    assert s.task_done(done(parent, 1)) == [(1, run(last))]


def test_task_done_while_blocked_does_not_free_a_second_slot():
    s = make(workers=(1,), cap=1)
    parent, child, later = first(10), spec(20), spec(30)
    s.submit(parent)
    s.submit(child)
    s.task_blocked(10, True)
    assert s.task_done(done(parent, 1)) == []
    assert s.inflight == {1: 1}  # the child
    assert s.submit(later) == []


def test_task_blocked_of_a_task_not_running_is_ignored():
    s = make(workers=(1,), cap=1)
    a, b = first(10), spec(20)
    s.submit(a)
    s.submit(b)  # READY, queued
    assert s.task_blocked(20, True) == []
    assert s.task_blocked(999, True) == []
    assert s.inflight == {1: 1}


# --- cancel ---------------------------------------------------------------------------------

def test_cancel_of_a_ready_task_fails_it_and_its_dependents():
    s = make(workers=(1,), cap=1)
    a, x, y = first(10), spec(20), spec(30, 20)
    s.submit(a)
    assert s.submit(x) == []  # READY, held by the cap
    assert s.submit(y) == []  # WAITING on x
    cancelled, out = s.cancel(20)
    fx, fy = failed(20, CANCELLED), failed(30, CANCELLED)
    assert cancelled is True
    assert out == [(SHARD, DirAdd(fx)), (SHARD, DirAdd(fy))]
    assert s.completed == [fy]  # x's own result is the caller's business
    assert type(rebuild_error(fy.inline)) is CancelledError
    assert s.task_done(done(a, 1)) == []  # the cancelled task is never placed
    assert s.pending() == 0


def test_cancel_of_a_waiting_task():
    s = make(workers=(1,), cap=4)
    b = first(20, 500)
    s.submit(b)
    assert s.cancel(20) == (True, [(SHARD, DirAdd(failed(20, CANCELLED)))])
    assert s.object_known(value(500, 2)) == []  # its input arrives: nothing to run
    assert s.pending() == 0 and s.completed == []


def test_cancel_of_a_placed_task_asks_its_worker_and_of_an_unknown_one_returns_false():
    s = make(workers=(1,), cap=4)
    a = first(10)
    s.submit(a)
    assert s.cancel(10) == (False, [(1, Revoke(10))])   # the answer comes from the worker
    assert s(Revoked(10, 1, False)) == [] and s.not_cancelled == [10]
    s.task_blocked(10, True)
    assert s.cancel(10) == (False, [])                   # blocked in a get: it has started
    s.task_blocked(10, False)
    assert s.cancel(999) == (False, [])
    assert s.task_done(done(a, 1)) == []
    assert s.cancel(10) == (False, [])
    assert s.completed == [value(10, 1)]


def test_task_submitted_on_a_cancelled_result_fails():
    s = make(workers=(1,), cap=1)
    a, x = first(10), spec(20)
    s.submit(a)
    s.submit(x)
    s.cancel(20)
    y = spec(30, 20)
    assert s.submit(y) == [(SHARD, DirAdd(failed(30, CANCELLED)))]


# --- function blobs -------------------------------------------------------------------------

def test_function_blob_is_sent_once_per_worker():
    s = make(workers=(1, 2), cap=4)
    t1, t2, t3, t4 = first(10), spec(20), spec(30), spec(40)
    assert s.submit(t1) == [(1, run(t1, blobs=FIRST))]
    assert s.submit(t2) == [(2, run(t2, blobs=FIRST))]
    assert s.submit(t3) == [(1, run(t3))]
    assert s.submit(t4) == [(2, run(t4))]
    g = spec(50, fn_id=b"g", fn_blob=b"<g>")
    assert s.submit(g) == [(1, run(g, blobs=((b"g", b"<g>"),)))]


def test_initializer_blob_is_sent_with_the_function_and_once():
    s = make(workers=(1,), cap=4)
    t1 = first(10, init_id=b"init", init_blob=b"<init>")
    t2 = spec(20, init_id=b"init")
    out = s.submit(t1)
    assert out == [(1, run(t1, blobs=((FN, FN_BLOB), (b"init", b"<init>"))))]
    assert out[0][1].spec.fn_blob is None and out[0][1].spec.init_blob is None
    assert s.submit(t2) == [(1, run(t2))]


@pytest.mark.parametrize("bad", [spec(10), spec(10, fn_blob=FN_BLOB, init_id=b"init")])
def test_task_of_a_function_never_sent_is_a_value_error(bad):
    s = make(workers=(1,), cap=4)
    refused(s, bad, ValueError, "never sent")
    assert s.pending() == 0 and s.stats["submitted"] == 0


# --- life cycle gate ------------------------------------------------------------------------

def test_task_done_of_a_task_not_running_is_an_invalid_transition():
    s = make(workers=(1,), cap=1)
    s.submit(first(10))
    s.submit(spec(20))  # READY, held by the cap
    with pytest.raises(InvalidTransition, match="ready -> done") as info:
        s.task_done(done(spec(20), 1))
    assert info.value.task_id == 20
    assert (info.value.old, info.value.new) == (TaskState.READY, TaskState.DONE)
    assert info.value.history == [TaskState.WAITING, TaskState.READY]


@pytest.mark.parametrize("old, new", [
    (TaskState.WAITING, TaskState.RUNNING),
    (TaskState.WAITING, TaskState.DONE),
    (TaskState.READY, TaskState.DONE),
    (TaskState.DONE, TaskState.FAILED),
    (TaskState.FAILED, TaskState.READY),
])
def test_illegal_moves_raise(old, new):
    s = make(workers=(1,), cap=1)
    s.submit(first(10))
    s.submit(spec(20, 500))  # WAITING
    task = s.tasks[20]
    path = {TaskState.WAITING: [], TaskState.READY: [TaskState.READY],
            TaskState.DONE: [TaskState.READY, TaskState.RUNNING, TaskState.DONE],
            TaskState.FAILED: [TaskState.FAILED]}[old]
    for state in path:
        task.move(state)
    with pytest.raises(InvalidTransition):
        task.move(new)
    assert task.state is old


# --- bugs -----------------------------------------------------------------------------------

def test_deleting_the_input_of_a_queued_ready_task_fails_it():
    s = make(workers=(1,), cap=1)
    a = first(10)
    s.submit(a)
    x = value(500, 2)
    s.object_known(x)
    b = spec(20, 500)
    assert s.submit(b) == []  # READY, held by the cap
    out = s.object_deleted(500) + s.task_done(done(a, 1))
    assert not any(isinstance(m, RunTask) for _, m in out)
    assert failed(20, deleted_error(500)) in s.completed


def test_failure_of_a_long_chain_does_not_recurse():
    s = make(workers=(1,), cap=1)
    n = 1000
    s.submit(first(10))
    for k in range(2, n + 1):
        s.submit(spec(10 * k, 10 * (k - 1)))
    recursed = False
    try:
        s.task_done(done(spec(10), 1, task_error(10, ValueError("head"), rank=1)))
    except RecursionError:  # caught here: pytest would take seconds to format its traceback
        recursed = True
    assert not recursed
    assert len(s.completed) == n
    assert s.pending() == 0


# --- driver-side reference counting -----------------------------------------------------------

def test_release_of_an_unused_object_frees_it_at_once():
    s = make()
    s.object_known(big(500, rank=1, nbytes=1_000_000))
    s.release(500)
    assert s.freed == [500] and not s.released


def test_released_input_is_freed_when_its_last_consumer_finishes():
    s = make(workers=(1,), cap=4)
    s.object_known(big(500, rank=1, nbytes=1_000_000))
    t1, t2 = first(10, 500), spec(20, 500)
    s.submit(t1)
    s.submit(t2)
    s.release(500)
    assert s.freed == [] and s.released == {500}
    s.task_done(done(t1, 1, value(10, 1)))
    assert s.freed == []                       # t2 still needs it
    s.task_done(done(t2, 1, value(20, 1)))
    assert s.freed == [500] and not s.dep_count


def test_released_result_of_a_pending_task_is_freed_when_it_is_done():
    s = make(workers=(1,), cap=4)
    t = first(10)
    s.submit(t)
    s.release(10)
    assert s.freed == []
    s.task_done(done(t, 1, big(10, 1, 1_000_000)))
    assert s.freed == [10]


def test_failed_and_cancelled_tasks_release_their_inputs():
    s = make(workers=(1,), cap=1)
    s.object_known(big(500, rank=1, nbytes=1_000_000))
    blocker, queued = first(10), spec(20, 500)
    s.submit(blocker)
    s.submit(queued)              # READY, held back by the cap
    s.release(500)
    assert s.freed == []
    assert s.cancel(20)[0]
    assert s.freed == [500]


# --- rank loss (issue 5): retries, pinned tasks, late reports ------------------------------------

def _lost(task_id, rank, attempts, why) -> str:
    """The RankLostError message carried by a lost task's error object."""
    from hoplite_mpi.errors import RankLostError
    return str(RankLostError(f"t{task_id} {format_id(task_id)}", rank, attempts, why))


def _error_text(s: Fed, oid) -> str:
    info = next(i for i in reversed(s.completed) if i.object_id == oid)
    assert info.error
    return str(rebuild_error(info.inline))


def test_a_running_task_of_a_dead_rank_is_re_run_elsewhere_first():
    s = make(workers=(1, 2), cap=1)
    a, b, c = first(10), spec(20), spec(30)
    assert s.submit(a) == [(1, run(a, blobs=FIRST))]
    assert s.submit(b) == [(2, run(b, blobs=FIRST))]
    assert s.submit(c) == []                                  # both workers full
    assert s.rank_lost(1) == []                               # rank 2 still busy with b
    assert s.stats["retried"] == 1 and s.workers == [2]
    assert s.task_done(done(b, 2)) == [(2, run(a))]          # the lost task goes before c
    assert s.task_done(done(a, 2)) == [(2, run(c))]
    assert s.task_done(done(c, 2)) == []
    assert [i.object_id for i in s.completed] == [20, 10, 30] and s.pending() == 0


def test_a_late_report_from_a_dead_rank_is_ignored():
    s = make(workers=(1, 2))
    a = first(10)
    assert s.submit(a) == [(1, run(a, blobs=FIRST))]
    assert s.rank_lost(1) == [(2, run(a, blobs=FIRST))]       # function blob sent to rank 2 too
    assert s.task_done(done(a, 1)) == []                      # the dead rank's result is gone
    assert s.completed == [] and s.pending() == 1
    assert s.task_done(done(a, 2)) == []
    assert s.completed == [value(10, 2)]


def test_retries_are_bounded_by_max_retries():
    s = make(workers=(1, 2, 3))
    a = replace(first(10), max_retries=1)
    assert s.submit(a) == [(1, run(a, blobs=FIRST))]
    assert s.rank_lost(1) == [(2, run(a, blobs=FIRST))]       # attempt 2 of 2
    out = s.rank_lost(2)                                      # lost again: fails
    assert out == [(SHARD, DirAdd(s.completed[-1]))]
    assert _error_text(s, 10) == _lost(10, 2, 2, "max_retries=1")
    assert s.pending() == 0 and s.stats["retried"] == 1 and s.stats["failed"] == 1


def test_tasks_pinned_to_a_dead_rank_fail_and_their_dependents_too():
    s = make(workers=(1, 2), cap=1)
    a, b, c = first(10, rank=1), spec(20, rank=1), spec(30, 20)
    assert s.submit(a) == [(1, run(a, blobs=FIRST))]
    assert s.submit(b) == []                                  # ready, waits for rank 1
    assert s.submit(c) == []                                  # waits for b's result
    s.rank_lost(1)
    assert _error_text(s, 10) == _lost(10, 1, 1, "pinned to it")
    assert _error_text(s, 20) == _lost(20, 1, 0, "pinned to it")
    assert _error_text(s, 30) == _lost(20, 1, 0, "pinned to it")   # the dependent gets b's error
    assert s.pending() == 0
    from hoplite_mpi.errors import RankLostError
    refused(s, spec(40, rank=1), RankLostError, r"lost with rank 1 .*died before the task was submitted")


def test_allowed_ranks_shrink_and_fail_when_all_are_dead():
    s = make(workers=(1, 2, 3), cap=1)
    a = first(10, allowed=(1, 2))
    assert s.submit(a) == [(1, run(a, blobs=FIRST))]
    assert s.rank_lost(1) == [(2, run(a, blobs=FIRST))]
    s.rank_lost(2)
    assert _error_text(s, 10) == _lost(10, 2, 2, "pinned to it")
    from hoplite_mpi.errors import RankLostError
    refused(s, spec(20, allowed=(1, 2)), RankLostError, "every allowed rank")
    b = spec(30, allowed=(1, 3))                              # one of them still alive
    assert s.submit(b) == [(3, run(b, blobs=FIRST))]


def test_no_worker_left_fails_every_unfinished_task_and_rank_lost_is_idempotent():
    s = make(workers=(1,))
    a, b = first(10), spec(20, 500)                            # b waits for a lookup
    s.submit(a)
    s.submit(b)
    s.rank_lost(1)
    assert s.rank_lost(1) == []
    assert _error_text(s, 10) == _lost(10, 1, 1, "no worker rank left")
    assert _error_text(s, 20) == _lost(20, 1, 0, "no worker rank left")
    assert s.pending() == 0


# --- lost objects and lineage (issue 5) ------------------------------------------------------------

def test_a_lost_result_is_rebuilt_by_running_its_task_again():
    s = make(workers=(1, 2))
    a = first(10)
    s.submit(a)
    s.task_done(done(a, 1, big(10, 1, 1 << 20)))
    b = spec(20, 10)
    assert s.submit(b) == [(1, run(b, deps=[big(10, 1, 1 << 20)]))]      # locality: rank 1
    # b is re-run on rank 2 at once (its fetch of 10 will wait in the directory) ...
    assert s.rank_lost(1) == [(2, run(b, deps=[big(10, 1, 1 << 20)], blobs=FIRST))]
    assert s.object_lost(10, 1) == [(2, run(a))]            # ... and a rebuilds 10
    assert s.object_lost(10, 1) == []                        # already being rebuilt
    assert s.stats["retried"] == 2
    s.task_done(done(a, 2, big(10, 2, 1 << 20)))
    assert s.completed[-1] == big(10, 2, 1 << 20)


def test_a_ready_task_whose_input_is_being_rebuilt_waits_for_it():
    s = make(workers=(1,), cap=1)
    a = first(10)
    s.submit(a)
    s.task_done(done(a, 1, big(10, 1, 1 << 20)))
    blocker, b = spec(30), spec(20, 10)
    assert s.submit(blocker) == [(1, run(blocker))]
    assert s.submit(b) == []                                 # READY, held by the cap
    s.object_lost(10, 1)                                     # a is queued behind b
    assert s.task_done(done(blocker, 1)) == [(1, run(a))]   # b went back to WAITING
    assert s.task_done(done(a, 1, big(10, 1, 1 << 20))) == [(1, run(b, deps=[big(10, 1, 1 << 20)]))]


def test_an_object_without_lineage_becomes_an_object_lost_error():
    from hoplite_mpi.errors import ObjectLostError
    s = make(workers=(1, 2))
    s.object_known(big(500, 1, 1 << 20))                     # e.g. a put's object
    b = first(20, 500)
    s.submit(b)
    out = s.object_lost(500, 1)
    err = s.completed[-1]
    assert err.object_id == 500 and err.error and (SHARD, DirAdd(err)) in out
    exc = rebuild_error(err.inline)
    assert isinstance(exc, ObjectLostError) and exc.rank == 1 and "dead rank 1" in str(exc)


def test_a_result_whose_task_input_was_freed_cannot_be_rebuilt():
    from hoplite_mpi.errors import ObjectLostError
    s = make(workers=(1, 2))
    s.object_known(big(500, 1, 1 << 20))
    a = first(10, 500)
    s.submit(a)
    s.task_done(done(a, 2, big(10, 2, 1 << 20)))
    s.forget(500)                                            # the input was freed since
    s.object_lost(10, 2)
    assert isinstance(rebuild_error(s.completed[-1].inline), ObjectLostError)
    assert 10 not in s.lineage


def test_a_result_of_a_task_strictly_pinned_to_a_dead_rank_cannot_be_rebuilt():
    from hoplite_mpi.errors import ObjectLostError
    s = make(workers=(1, 2))
    a = replace(first(10, rank=1), strict_rank=True)
    s.submit(a)
    s.task_done(done(a, 1, big(10, 1, 1 << 20)))
    s.rank_lost(1)
    s.object_lost(10, 1)
    assert isinstance(rebuild_error(s.completed[-1].inline), ObjectLostError)
    assert s.pending() == 0


def test_a_shard_reporting_a_loss_before_rank_lost_does_not_rerun_a_task_pinned_there():
    from hoplite_mpi.errors import ObjectLostError
    s = make(workers=(1, 2))
    a = replace(first(10, rank=1), strict_rank=True)
    s.submit(a)
    s.task_done(done(a, 1, big(10, 1, 1 << 20)))
    assert s.object_lost(10, 1)[-1][0] == SHARD              # only the error object's DirAdd
    assert isinstance(rebuild_error(s.completed[-1].inline), ObjectLostError)


def test_a_lost_result_of_a_pinned_task_is_rebuilt_on_another_rank():
    # (issue 10.4) pinning is placement: a finished result whose copies all died (e.g. its
    # replica was still in flight) is made again elsewhere, unless strict_rank
    s = make(workers=(1, 2))
    a = first(10, rank=1)
    s.submit(a)
    s.task_done(done(a, 1, big(10, 1, 1 << 20)))
    s.rank_lost(1)
    out = s.object_lost(10, 1)
    (rank, msg), = out
    assert rank == 2 and msg.spec.task_id == 10 and msg.spec.rank is None
    s.task_done(done(msg.spec, 2, big(10, 2, 1 << 20)))
    assert s.completed[-1] == big(10, 2, 1 << 20) and s.stats["rebuilt"] == 1


def test_a_refused_first_task_still_registers_its_function():
    # (issue 10, found by the random-workload tester) the submitter sends a function with its
    # first task only; if that task is refused (pinned to a dead rank), the next task of the
    # same function failed with "function was never sent"
    from hoplite_mpi.errors import RankLostError
    s = make(workers=(1, 2))
    s.rank_lost(1)
    refused(s, first(10, rank=1), RankLostError)
    b = spec(20)                                  # no blob: it was sent with the refused task
    assert s.submit(b) == [(2, run(b, blobs=FIRST))]


# --- the entry point: instructions, queries, events the shell used to do itself ---------------------

def test_one_event_gives_its_sends_then_completed_then_frees():
    s = Scheduler([1], lambda oid: (SHARD,), tasks_per_worker=1)
    a, b = first(10, 500), spec(20)
    s.handle(ObjectKnown(big(500, 1, 1 << 20)))
    s.handle(a)
    s.handle(b)                                  # held back by the cap
    assert s.handle(Release(500)) == []          # a still uses it
    assert s.handle(done(a, 1)) == [(1, run(b)), Completed([value(10, 1)]), FreeObjects([500])]


def test_an_unknown_event_is_a_type_error_and_changes_nothing():
    s = make()
    with pytest.raises(TypeError, match="no event ObjectInfo"):
        s.sched.handle(value(500, 1))
    assert s.object_info(500) is None and s.pending() == 0


def test_queries_answer_what_the_shell_asks():
    s = make(workers=(1,))
    a = first(10, 500)
    s.submit(a)
    assert s.produces(10) and not s.produces(500)
    assert s.task_name(10) == f"t10 {format_id(10)}" and s.task_name(99) == format_id(99)
    x = value(500, 1)
    s.object_known(x)
    assert s.object_info(500) == x and s.object_info(10) is None
    s.task_done(done(a, 1))
    assert not s.produces(10) and s.object_info(10) == value(10, 1)


def test_a_directory_answer_counts_only_if_asked_for_but_a_deletion_always():
    s = make(workers=(1,))
    b = first(20, 500)
    assert s.submit(b) == [(SHARD, DirLookup(500, 0))]
    assert s(LookedUp(501, value(501, 1))) == [] and s.object_info(501) is None   # not asked
    x = value(500, 1)
    assert s(LookedUp(500, x)) == [(1, run(b, deps=(x,), blobs=FIRST))]
    c = spec(30, 502)
    s.submit(c)
    assert s(LookedUp(502, None)) == [(SHARD, DirAdd(failed(30, deleted_error(502))))]


def test_deleting_a_small_value_here_uncaches_it_on_every_live_worker_first():
    s = make(workers=(1, 2, 3))
    s.object_known(value(500, 1))
    s.object_known(big(501, 1, 1 << 20))
    s.rank_lost(2)
    b = first(20, 503)
    s.submit(b)
    assert s(ObjectDeleted(500, uncache=True)) == [(1, DirDelete(500, True)), (3, DirDelete(500, True))]
    assert s(ObjectDeleted(501, uncache=True)) == []          # not cached: a chunked object
    assert s(ObjectDeleted(503, uncache=True)) == [(SHARD, DirAdd(failed(20, deleted_error(503))))]
    assert s.object_info(500) is None and 500 in s.deleted


def test_a_task_that_exits_its_rank_fails_with_worker_crashed_error_and_is_not_retried():
    from hoplite_mpi.errors import WorkerCrashedError
    s = make(workers=(1, 2), cap=1)
    a, b = first(10, num_returns=2), spec(20)
    s.submit(a)
    s.submit(b)
    assert s(TaskExit(10, 2, 3)) == []                        # not on rank 2: ignored
    out = s(TaskExit(10, 1, 3))
    errors = s.completed[-2:]
    assert [i.object_id for i in errors] == [10, 11] and all(i.error for i in errors)
    assert out == [(SHARD, DirAdd(errors[0])), (SHARD, DirAdd(errors[1]))]
    exc = rebuild_error(errors[0].inline)
    assert type(exc) is WorkerCrashedError and exc.status == 3 and exc.rank == 1
    assert s.stats["retried"] == 0 and s.pending() == 1
    assert s(TaskExit(10, 1, 3)) == []                        # once


def test_rank_lost_registers_again_what_only_rank_0_knows_at_moved_shards():
    # shard of an object: its id % 2; shard 1 moved (all its replicas died), shard 0 did not
    s = make(workers=(1, 2, 3), shard_of=lambda oid: oid % 2)
    small, other = value(501, 2), value(500, 2)
    for info in (small, other):
        s.object_known(info)
    s(ObjectDeleted(503))
    s(ObjectDeleted(502))
    a = first(11)                                  # its result 11 (chunked) on rank 3 only
    s.submit(a)
    result = big(11, 3, 1 << 20)
    s.task_done(done(a, 3, result))
    c = spec(30, 505)                              # waits for a lookup at shard 1
    assert s.submit(c) == [(SHARD, DirLookup(505, 0))]
    out = s(RankLost(3, moved=frozenset({1}), changed=frozenset({1}), dead=frozenset({3})))
    # the small value and the deletion again, the lookup again, and 11 (copy and shard gone) is
    # rebuilt: its task runs again, elsewhere (the runs of a lost rank come after)
    assert out == [(SHARD, DirAdd(small)), (1, run(a)), (SHARD, DirDelete(503, True)),
                   (SHARD, DirLookup(505, 0))]
    assert s.produces(11) and s.stats["rebuilt"] == 1
    assert s(RankLost(3, moved=frozenset({1}), changed=frozenset({1}),
                      dead=frozenset({3}))) == [(SHARD, DirAdd(small)), (SHARD, DirDelete(503, True)),
                                                (SHARD, DirLookup(505, 0))]   # (idempotent otherwise)


def test_a_refused_tasks_results_are_known_so_their_users_fail_at_once():
    # (simulation seed 222) the scheduler knows the error objects of a refused task: a task
    # using one fails at once (no lookup), and they are re-registered if their shard moves
    s = make(workers=(1, 2))
    refused(s, first(10, rank=5), ValueError)
    err = s.object_info(10)
    assert err.error and s.submit(spec(20, 10)) == [(SHARD, DirAdd(failed(20, err.inline)))]
    assert s(RankLost(2, moved=frozenset({0}), changed=frozenset({0}))) == [
        (SHARD, DirAdd(err)), (SHARD, DirAdd(failed(20, err.inline)))]


def test_rank_lost_asks_the_shard_about_results_whose_maker_died():
    # (simulation seeds 192, 22089, 30385) a maker that dies after its TaskDone reached rank 0
    # but before its DirAdd reached the shard leaves the result unknown to every live rank: the
    # scheduler asks the shard (DirCheck), which reports the loss if it never had the object
    s = make(workers=(1, 2, 3), shard_of=lambda oid: oid % 2)
    a, b = first(11), first(12)
    s.submit(a)
    s.submit(b)
    s.task_done(done(a, 3, big(11, 3, 1 << 20)))
    s.task_done(done(b, 3, big(12, 3, 1 << 20)))
    out = s(RankLost(3, moved=frozenset({1}), changed=frozenset({1}), dead=frozenset({3})))
    # 12's shard did not move: checked there; 11's moved with its copy: rebuilt at once
    assert (SHARD, DirCheck(12, 3)) in out and not any(isinstance(m, DirCheck) and m.object_id == 11
                                                       for _, m in out)
    assert s.produces(11) and not s.produces(12)
    assert s(RankLost(2, dead=frozenset({2, 3}))) == []          # not its maker: nothing to ask


def test_drain_places_nothing_more_and_revokes_what_may_not_have_started():
    """Durable workflows (issue 14): after Drain no task is placed; placed tasks are revoked
    (a blocked one has started: left alone); a task finishing afterwards still completes; one
    its worker dropped unstarted fails as cancelled."""
    from hoplite_mpi.scheduler import Drain
    s = make(workers=(1, 2), cap=1)
    a, b, c = first(10), spec(20), spec(30)
    assert s.submit(a) == [(1, run(a, blobs=FIRST))]
    assert s.submit(b) == [(2, run(b, blobs=FIRST))]
    assert s.submit(c) == []                          # no room: ready, queued here
    assert s.task_blocked(20, True) == [(2, run(c))]  # b waits in a get: its slot goes to c
    assert s(Drain()) == [(1, Revoke(10)), (2, Revoke(30))]
    assert s.running() == 3
    assert s(Revoked(10, 1, False)) == []             # a had started: its result counts
    assert s.task_done(done(a, 1)) == []
    assert s.completed == [value(10, 1)] and s.running() == 2
    assert s(Revoked(30, 2, True)) == [(SHARD, DirAdd(failed(30, CANCELLED)))]
    d = spec(40)
    assert s.submit(d) == []                          # nothing is placed any more
    s.task_blocked(20, False)
    assert s.task_done(done(b, 2)) == [] and s.running() == 0
    assert s.pending() == 1 and s.tasks[40].state is TaskState.READY
