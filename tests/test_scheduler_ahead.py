"""Placement ahead (``Config.worker_deps``): the scheduler places a task on the rank that makes
its missing inputs before they exist; the worker holds it (hoplite_mpi.local_deps).  Pure state
machine tests, fed only through ``Scheduler.handle``; the worker side is tested below on
:class:`~hoplite_mpi.local_deps.LocalDeps` and end to end in tests/test_local_deps_mpi.py."""
from __future__ import annotations

from concurrent.futures import CancelledError

from hoplite_mpi.errors import RankLostError
from hoplite_mpi.local_deps import LocalDeps
from hoplite_mpi.protocol import DirAdd, Revoke, Revoked, RunTask
from hoplite_mpi.serialization import rebuild_error

from test_scheduler import (CANCELLED, FIRST, SHARD, done, failed, first, make, run, spec,
                            task_error, value)


def test_a_chain_is_placed_ahead_on_the_rank_of_its_first_task_up_to_the_cap():
    s = make(workers=(1, 2), cap=3, ahead=True)
    a, b, c, d = first(10), spec(20, 10), spec(30, 20), spec(40, 30)
    assert s.submit(a) == [(1, run(a, blobs=FIRST))]
    assert s.submit(b) == [(1, run(b, deps=(None,)))]
    assert s.submit(c) == [(1, run(c, deps=(None,)))]
    assert s.submit(d) == []                       # rank 1 is full (3 in flight)
    assert s.inflight == {1: 3, 2: 0}
    # a's TaskDone: room on rank 1, and c is still being made there: d goes ahead too
    assert s.task_done(done(a, 1)) == [(1, run(d, deps=(None,)))]
    for t in (b, c, d):
        assert s.task_done(done(t, 1)) == []
    assert s.pending() == 0
    assert [i.object_id for i in s.completed] == [10, 20, 30, 40]


def test_without_worker_deps_a_dependent_waits_for_its_input():
    s = make(workers=(1, 2), ahead=False)
    a, b = first(10), spec(20, 10)
    s.submit(a)
    assert s.submit(b) == []
    assert s.task_done(done(a, 1)) == [(1, run(b, deps=(value(10, 1),)))]


def test_known_inputs_travel_and_only_the_missing_ones_are_none():
    s = make(workers=(1, 2), ahead=True)
    a, b = first(10), spec(20, 500, 10, 500)
    s.object_known(value(500, 2))
    s.submit(a)
    assert s.submit(b) == [(1, run(b, deps=(value(500, 2), None, value(500, 2))))]


def test_inputs_made_on_two_ranks_wait_on_rank_0():
    s = make(workers=(1, 2), ahead=True)
    a, b, c = first(10), spec(20), spec(30, 10, 20)
    s.submit(a)
    s.submit(b)                       # on rank 2
    assert s.submit(c) == []
    s.task_done(done(a, 1))
    assert s.task_done(done(b, 2)) == [(1, run(c, deps=(value(10, 1), value(20, 2))))]


def test_an_input_not_placed_yet_or_unknown_keeps_the_task_on_rank_0():
    s = make(workers=(1,), cap=1, ahead=True)
    a, b, c = first(10), spec(20), spec(30, 20)
    s.submit(a)
    assert s.submit(b) == []          # READY, held by the cap
    assert s.submit(c) == []          # its maker is not placed: c waits here
    # b placed when a is done; then c goes ahead behind it? no room (cap 1): later
    assert s.task_done(done(a, 1)) == [(1, run(b))]
    assert s.task_done(done(b, 1)) == [(1, run(c, deps=(value(20, 1),)))]
    d = spec(40, 999)                 # unknown input: a lookup, nothing ahead
    out = s.submit(d)
    assert [type(m).__name__ for _, m in out] == ["DirLookup"]


def test_a_fan_out_places_only_worker_threads_tasks_ahead_per_input():
    s = make(workers=(1, 2, 3), ahead=True, threads=1)
    a = first(10)
    s.submit(a)
    users = [spec(20 + i, 10) for i in range(4)]
    outs = [s.submit(u) for u in users]
    assert outs[0] == [(1, run(users[0], deps=(None,)))]
    assert outs[1:] == [[], [], []]
    sent = s.task_done(done(a, 1))    # the others spread once the input exists
    assert sorted(r for r, _ in sent) == [1, 2, 3]
    assert all(m.deps == (value(10, 1),) for _, m in sent)


def test_pinned_and_allowed_ranks_are_respected():
    s = make(workers=(1, 2), ahead=True)
    a = first(10)
    s.submit(a)
    assert s.submit(spec(20, 10, rank=2)) == []
    assert s.submit(spec(30, 10, allowed=(2,))) == []
    assert s.submit(spec(40, 10, allowed=(1, 2))) == [(1, run(spec(40, 10, allowed=(1, 2)), deps=(None,)))]


def test_a_task_without_a_retry_left_is_not_placed_ahead():
    s = make(workers=(1, 2), ahead=True)
    a = first(10)
    s.submit(a)
    from dataclasses import replace
    b = replace(spec(20, 10), max_retries=0)
    assert s.submit(b) == []


def test_rank_loss_requeues_a_task_waiting_ahead_and_places_it_again_behind_its_rebuilt_input():
    s = make(workers=(1, 2), ahead=True)
    a, b = first(10), spec(20, 10)
    s.submit(a)
    s.submit(b)
    out = s.rank_lost(1)
    # a runs again on rank 2 first (lost work first), b goes ahead behind it there
    assert out == [(2, run(a, blobs=FIRST)), (2, run(b, deps=(None,)))]
    assert s.tasks[20].attempts == 2 and s.stats["retried"] == 2
    s.task_done(done(a, 2))
    s.task_done(done(b, 2))
    assert s.pending() == 0


def test_an_error_result_finishes_the_waiting_task_through_the_worker():
    s = make(workers=(1,), ahead=True)
    a, b = first(10), spec(20, 10)
    s.submit(a)
    s.submit(b)
    err = task_error(10, ValueError("boom"), 1)
    assert s.task_done(done(a, 1, err)) == []        # b runs ahead: the worker fails it
    b_err = task_error(20, ValueError("boom"), 1)
    assert s.task_done(done(b, 1, b_err)) == []
    assert s.pending() == 0 and s.completed == [err, b_err]


# --- cancel of a task placed ahead: asked of the worker ---------------------------------------

def _cancel_asked(workers):
    """A scheduler with task a running and b (on a's result) placed ahead behind it on rank 1,
    and a cancel of b asked of rank 1."""
    s = make(workers=workers, ahead=True)
    a, b = first(10), spec(20, 10)
    s.submit(a)
    assert s.submit(b) == [(1, run(b, deps=(None,)))]
    assert s.cancel(20) == (False, [(1, Revoke(20))])
    return s, a, b


def test_cancel_of_a_task_waiting_ahead_asks_its_worker_and_fails_it_if_dropped():
    s = make(workers=(1,), ahead=True)
    a, b, c = first(10), spec(20, 10), spec(30, 20)
    s.submit(a)
    s.submit(b)
    s.submit(c)
    assert s.cancel(20) == (False, [(1, Revoke(20))])
    assert s.revoking_task(20)
    assert s.cancel(20) == (False, [])                # asked once
    out = s(Revoked(20, 1, True))
    assert s.cancelled == [20] and not s.revoking_task(20)
    assert out == [(SHARD, DirAdd(failed(20, CANCELLED)))]   # c fails on the worker (ahead)
    assert s.inflight == {1: 2}
    assert s.task_done(done(a, 1)) == []
    fc = failed(30, CANCELLED)
    assert s.task_done(done(c, 1, fc)) == []
    assert s.pending() == 0


def test_cancel_of_a_task_that_started_on_its_worker_is_refused():
    s, a, b = _cancel_asked((1,))
    assert s(Revoked(20, 1, False)) == []
    assert s.not_cancelled == [20] and s.cancelled == []
    s.task_done(done(a, 1))
    s.task_done(done(b, 1))
    assert s.pending() == 0


def test_a_cancel_pending_at_a_rank_that_dies_is_answered_by_rank_0():
    s, a, b = _cancel_asked((1, 2))
    out = s.rank_lost(1)
    assert s.cancelled == [20]
    assert (2, run(a, blobs=FIRST)) in out and not any(
        isinstance(m, RunTask) and m.spec.task_id == 20 for _, m in out if isinstance(m, RunTask))
    assert s(Revoked(20, 1, True)) == []              # a late answer: ignored
    assert s.task_done(done(a, 2)) == []
    assert s.pending() == 0


def test_a_cancel_pending_when_the_task_fails_on_rank_loss_is_refused():
    s, a, b = _cancel_asked((1,))
    s.rank_lost(1)                                     # no worker left: everything fails
    assert s.not_cancelled == [20]
    exc = rebuild_error(next(i for i in s.completed if i.object_id == 20).inline)
    assert isinstance(exc, RankLostError)


# --- the worker side ---------------------------------------------------------------------------

def _ahead(task_id, *deps_infos, deps=None):
    sp = spec(task_id, *(deps or [i.object_id if i is not None else None for i in deps_infos]))
    return RunTask(sp, tuple(deps_infos), ())


def test_local_deps_hands_a_task_out_once_its_last_input_is_made():
    t = LocalDeps()
    msg = RunTask(spec(30, 10, 500, 20, 10), (None, value(500, 2), None, None), ())
    assert t.add(msg) == (None, [])
    assert t.made([value(10, 1)]) == []
    (entry,) = t.made([value(20, 1)])
    assert entry.run_task() == RunTask(msg.spec, (value(10, 1), value(500, 2), value(20, 1), value(10, 1)), ())
    assert entry.failed_input() is None
    assert t.made([value(20, 1)]) == [] and not t.waiting


def test_local_deps_starts_at_once_what_was_made_before_the_run_task_came():
    t = LocalDeps()
    t.made([value(10, 1)])
    entry, ask = t.add(RunTask(spec(20, 10), (None,), ()))
    assert ask == [] and entry.run_task().deps == (value(10, 1),)


def test_local_deps_asks_the_shard_once_it_has_forgotten_results():
    t = LocalDeps(kept=2)
    t.made([value(1, 1), value(2, 1), value(3, 1)])
    assert t.forgot
    assert t.add(RunTask(spec(20, 1), (None,), ())) == (None, [1])
    entry, ask = t.add(RunTask(spec(30, 3), (None,), ()))
    assert entry is not None and ask == []


def test_local_deps_keeps_a_bounded_number_of_in_band_bytes():
    t = LocalDeps(kept_bytes=10)
    t.made([value(1, 1, b"x" * 6), value(2, 1, b"y" * 6)])   # 12 bytes: the oldest goes
    assert t.forgot
    assert t.add(RunTask(spec(20, 1), (None,), ())) == (None, [1])
    entry, _ = t.add(RunTask(spec(30, 2), (None,), ()))
    assert entry is not None


def test_local_deps_revoke_takes_a_waiting_task_out():
    t = LocalDeps()
    t.add(RunTask(spec(20, 10), (None,), ()))
    assert t.revoke(20).msg.spec.task_id == 20
    assert t.revoke(20) is None
    assert t.made([value(10, 1)]) == []


def test_local_deps_reports_an_error_input():
    t = LocalDeps()
    t.add(RunTask(spec(20, 10), (None,), ()))
    err = failed(10, CANCELLED)
    (entry,) = t.made([err])
    assert entry.failed_input() == err
    assert type(rebuild_error(err.inline)) is CancelledError


# --- a burst of submissions (Config.submit_batch): one event, one placement pass -------------

def test_a_burst_is_accepted_in_order_and_placed_in_one_pass():
    from hoplite_mpi.scheduler import Submitted
    s = make(workers=(1, 2), cap=2, ahead=True)
    a, b, c, d = first(10), spec(20, 10), spec(30), spec(40)
    out = s(Submitted([a, b, c, d]))
    # the ready tasks first, in order (least loaded rank); b would go ahead behind a, but rank
    # 1 is full (cap 2): it waits for room there, or for its input
    assert out == [(1, run(a, blobs=FIRST)), (2, run(c, blobs=FIRST)), (1, run(d))]
    assert s.task_done(done(d, 1)) == [(1, run(b, deps=(None,)))]    # room on rank 1: ahead
    for t, r in ((a, 1), (c, 2), (b, 1)):
        s.task_done(done(t, r))
    assert s.pending() == 0


def test_a_task_of_a_burst_using_a_refused_one_fails_without_a_lookup():
    from hoplite_mpi.scheduler import Submitted
    s = make(workers=(1, 2), ahead=True)
    bad, user = first(10, rank=9), spec(20, 10)
    out = s(Submitted([bad, user]))
    assert all(type(m).__name__ == "DirAdd" for _, m in out), out
    assert [i.object_id for i in s.completed] == [10, 20]
    assert all(i.error for i in s.completed) and s.pending() == 0
