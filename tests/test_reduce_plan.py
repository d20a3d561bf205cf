"""The reduce planner (collectives.py) without MPI: topology formulas and the messages the
coordinator sends as inputs become ready, in particular the target's accumulator (ReduceLate).

Every event goes through :meth:`ReduceCoordinator.handle`; the helper :class:`Fed` keeps the
event names as methods (``c.input_ready(info)`` feeds ``InputReady(info)``, returns the sends) and
turns the local instructions into ``c.wants_inputs`` (the last event asked for the inputs again
after a re-plan), ``c.done``/``c.result`` (a ``Reduced`` came out), checking their order and
that a reduce reports its end once."""
from __future__ import annotations

import itertools
import pickle

import numpy as np
import pytest

from hoplite_mpi.collectives import (InputReady, ReduceCoordinator, Reduced, Replanned, Start,
                                     WatchInputs, chain_length, tree_chain, tree_depth)
from hoplite_mpi.events import RankLost
from hoplite_mpi.protocol import (DirAdd, Fetch, Fetched, Free, ObjectInfo, ReduceAbort, ReduceLate,
                                  ReduceResume, ReduceStep, ReduceStepDone)
from hoplite_mpi.serialization import frame_sizes, serialize

RESULT = 1000


def info(oid, rank, shape=(1 << 20,), dtype=np.float32, order="C"):
    frames = serialize(np.zeros(shape, dtype, order=order))
    return ObjectInfo(oid, frame_sizes(frames), (rank,), head=bytes(frames[0]))


class Fed:
    """A ReduceCoordinator fed only through ``handle`` (see the module docstring).  Other
    attributes are the coordinator's (white-box checks of its state)."""

    def __init__(self, coord: ReduceCoordinator) -> None:
        self.coord = coord
        self.wants_inputs = False
        self.done = False
        self.result = None
        self.reduced = None

    def __getattr__(self, name):
        return getattr(self.coord, name)

    def __call__(self, event) -> list:
        sends, local = [], []
        for item in self.coord.handle(event):
            if type(item) is tuple:
                assert not local, f"a send after a local instruction: {item}"
                sends.append(item)
            else:
                local.append(item)
        assert not self.done or (not sends and not local), "an event after the end gave output"
        kinds = [type(i) for i in local]
        self.wants_inputs = WatchInputs in kinds
        if self.wants_inputs:
            watch = local[kinds.index(WatchInputs)]
            assert watch.object_ids == tuple(dict.fromkeys(self.coord.inputs))
            if type(event) is not Start:     # (a re-plan) announced first, with the new attempt
                plan = local[kinds.index(WatchInputs) - 1]
                assert type(plan) is Replanned and plan.reduce_id == self.coord.reduce_id
                assert plan.start == self.coord.start and set(plan.dead) == self.coord.dead
        if Reduced in kinds:
            assert kinds[-1] is Reduced and kinds.count(Reduced) == 1 and not self.wants_inputs
            self.done, self.reduced = True, local[-1]
            self.result = self.reduced.result
            assert self.result.object_id == RESULT or self.result.object_id == self.coord.result_id
            assert self.reduced.used == tuple(self.coord.used)
            assert self.reduced.attempts == tuple(self.coord.attempts)
        return sends

    def begin(self, dead=()):
        return self(Start(frozenset(dead)))

    def input_ready(self, info):
        return self(InputReady(info))

    def step_done(self, msg):
        return self(msg)

    def fetched(self, rank, error):
        return self(Fetched(self.coord.attempts[0], rank, error))

    def rank_lost(self, rank):
        return self(RankLost(rank))

    def resume(self, reduce_id, progress):
        return self(ReduceResume(reduce_id, progress))


def coordinator(inputs, target=0, num=None, k=10**6, allreduce=False):
    ids = itertools.count(5000)
    return Fed(ReduceCoordinator(1, list(inputs), pickle.dumps(np.add), num or len(inputs), target,
                                 RESULT, lambda: next(ids), lambda nbytes: k, allreduce))


def steps(out):
    return [(rank, m) for rank, m in out if isinstance(m, ReduceStep)]


def test_formulas():
    assert chain_length(64 << 20, 1.5e9, 1e-4) == round((64 << 20) / 1.5e5)
    assert tree_depth(1, 0) == 0
    assert tree_depth(7, 0) == 3          # small objects: a binary tree
    assert tree_depth(7, 1000) == 0       # large ones: one chain
    parent, order = tree_chain(4, 0)
    assert parent == [None, 0, 1, 2] and order == [3, 2, 1, 0]
    parent, order = tree_chain(7, 2)
    assert parent[:3] == [None, 0, 0] and order[-1] == 0


def test_staggered_chain_ends_with_one_pull_by_the_target():
    # inputs 10 (on the target, rank 0), then 11, 12, 13 on ranks 1, 2, 3, one at a time
    c = coordinator([10, 11, 12, 13])
    assert steps(c.input_ready(info(10, 0))) == []            # the root waits for its children
    leaf = steps(c.input_ready(info(11, 1)))
    assert [r for r, _ in leaf] == [1] and leaf[0][1].children == ()
    out = c.input_ready(info(12, 2))
    (r2, s2), (r0, acc) = steps(out)
    assert r2 == 2 and s2.children == ((1, leaf[0][1].out_id),)
    # one input to come: the target starts now, pulling what exists, expecting one more
    assert r0 == 0 and acc.out_id == RESULT and acc.late == 1 and acc.final
    assert acc.input_info.object_id == 10 and acc.children == ((2, s2.out_id),)
    out = c.input_ready(info(13, 3))
    assert out == [(0, ReduceLate(1, RESULT, info(13, 3), 3))]   # no step on rank 3 at all
    c.step_done(ReduceStepDone(1, s2.out_id, 2, acc.sizes))
    done = c.step_done(ReduceStepDone(1, RESULT, 0, acc.sizes))
    assert c.done and c.used == [10, 11, 12, 13]
    assert sorted(m.object_id for _, m in done if isinstance(m, Free)) == sorted(
        [leaf[0][1].out_id, s2.out_id])


def test_target_without_an_input_accumulates_in_its_copy_step():
    c = coordinator([11, 12], target=0)
    (r1, leaf), (r0, acc) = steps(c.input_ready(info(11, 1)))
    assert r1 == 1 and r0 == 0 and acc.input_info is None and acc.late == 1
    assert acc.children == ((1, leaf.out_id),) and acc.head == c.head
    assert c.input_ready(info(12, 0)) == [(0, ReduceLate(1, RESULT, info(12, 0), 0))]


def test_every_input_on_the_target():
    c = coordinator([10, 11], target=2)
    (r, acc), = steps(c.input_ready(info(10, 2)))
    assert r == 2 and acc.input_info.object_id == 10 and acc.children == () and acc.late == 1
    assert c.input_ready(info(11, 2)) == [(2, ReduceLate(1, RESULT, info(11, 2), 2))]


def test_subset_the_late_slot_takes_the_next_arrival_only():
    c = coordinator([10, 11, 12, 13], num=2)
    c.input_ready(info(11, 1))
    assert c.input_ready(info(13, 3)) == [(0, ReduceLate(1, RESULT, info(13, 3), 3))]
    assert c.input_ready(info(12, 2)) == []           # beyond num: ignored
    assert c.used == [11, 13]


def test_allreduce_late_input_rank_is_told_to_fetch_the_result():
    c = coordinator([10, 11], target=0, allreduce=True)
    c.input_ready(info(10, 0))
    out = c.input_ready(info(11, 1))
    assert (1, Fetch(RESULT, 1)) in out and (0, ReduceLate(1, RESULT, info(11, 1), 1)) in out


def test_inputs_at_once_tree_keeps_bytes_moved():
    # small objects (k=0): a tree; every input but the last ends up pulled exactly once
    c = coordinator(list(range(10, 17)), k=0)
    sent = []
    for i, oid in enumerate(range(10, 17)):
        sent += c.input_ready(info(oid, i % 4, shape=(8,)))
    pulled = [child for _, m in steps(sent) for child in m.children]
    late = [m for _, m in sent if isinstance(m, ReduceLate)]
    assert len(pulled) + len(late) == 6 and len(set(pulled)) == len(pulled)


def test_a_dead_participant_re_plans_the_reduce_and_the_new_result_is_adopted():
    c = coordinator([10, 11, 12, 13])
    first = []
    for oid, rank in ((10, 0), (11, 1), (12, 2)):
        first += c.input_ready(info(oid, rank))
    (_, acc), = [(r, m) for r, m in steps(first) if m.final]
    old = c.reduce_id
    out = c.rank_lost(2)
    # the target stops giving out its output first, then tells rank 1 (a step there), and says
    # how much of the result it gave out; the new tree waits for that answer
    assert out == [(0, ReduceAbort(old, (1,), RESULT))] and not c.wants_inputs and not c.done
    assert c.reduce_id != old and c.attempts == [old, c.reduce_id]
    assert c.resume(c.reduce_id, 5) == [] and not c.wants_inputs   # (not the attempt asked about)
    assert c.resume(old, 0) == [] and c.wants_inputs and c.start == 0
    # messages of the abandoned attempt are ignored
    assert c.step_done(ReduceStepDone(old, RESULT, 0, acc.sizes)) == [] and not c.result_done
    assert c.input_ready(info(12, 2)) == []            # a copy on the dead rank: not usable
    again = []
    for oid, rank in ((10, 0), (11, 1), (12, 3), (13, 3)):   # 12 rebuilt on rank 3
        again += c.input_ready(info(oid, rank))
    assert all(m.reduce_id == c.reduce_id for _, m in steps(again))
    assert all(2 not in (r, *[cr for cr, _ in m.children]) for r, m in steps(again))
    (r, final), = [(r, m) for r, m in steps(again) if m.final]
    assert r == 0 and final.out_id != RESULT and final.adopt == RESULT
    assert [m for _, m in again if isinstance(m, ReduceLate)][0].out_id == final.out_id
    done = c.step_done(ReduceStepDone(c.reduce_id, RESULT, 0, acc.sizes))
    assert c.done and c.result.object_id == RESULT and c.result.holders == (0,)
    freed = [(r, m.object_id) for r, m in done if isinstance(m, Free)]
    assert all(r != 2 for r, _ in freed) and len(freed) >= 3    # both attempts' intermediates


def test_a_step_reporting_a_lost_child_re_plans_like_rank_lost():
    c = coordinator([10, 11, 12])
    for oid, rank in ((10, 0), (11, 1), (12, 2)):
        c.input_ready(info(oid, rank))
    out = c.step_done(ReduceStepDone(c.reduce_id, 99, 0, error=(b"x",), lost=1))
    assert [type(m) for _, m in out] == [ReduceAbort] and c.dead == {1}
    c.resume(out[0][1].reduce_id, 0)
    assert c.wants_inputs


def test_a_re_plan_goes_on_from_the_bytes_the_result_gave_out():
    c = coordinator([10, 11, 12, 13])
    for oid, rank in ((10, 0), (11, 1), (12, 2), (13, 3)):
        c.input_ready(info(oid, rank))
    old = c.reduce_id
    c.rank_lost(3)
    assert c.resume(old, 3 << 20) == [] and c.start == 3 << 20
    again = []
    for oid, rank in ((10, 0), (11, 1), (12, 2), (13, 1)):      # 13 rebuilt on rank 1
        again += c.input_ready(info(oid, rank))
    assert again and all(m.start == 3 << 20 for _, m in steps(again))
    # a second loss before the tree is re-planned asks nobody (no step of the new attempt yet)
    # and a smaller answer never moves the start back
    old2 = c.reduce_id
    c.rank_lost(2)
    assert c.awaiting == old2 and c.resume(old2, 1 << 20) == [] and c.start == 3 << 20


def test_a_re_plan_without_a_step_on_the_target_asks_nothing():
    c = coordinator([11, 12, 13, 14], target=0)
    c.input_ready(info(11, 1))          # two leaves, on ranks 1 and 2: no step on the target yet
    c.input_ready(info(12, 2))
    out = c.rank_lost(2)
    assert out == [(1, ReduceAbort(c.attempts[0]))]
    assert c.wants_inputs and c.awaiting is None


def test_the_target_dying_fails_the_reduce_and_aborts_the_other_steps():
    c = coordinator([10, 11, 12], target=0)
    for oid, rank in ((10, 0), (11, 1), (12, 2)):
        c.input_ready(info(oid, rank))
    out = c.rank_lost(0)
    assert c.done and c.result.error and b"target rank 0 died" in b"".join(c.result.inline)
    assert (1, ReduceAbort(c.reduce_id)) in out


def test_a_rank_without_part_in_the_reduce_changes_nothing():
    c = coordinator([10, 11])
    c.input_ready(info(10, 0))
    assert c.rank_lost(3) == [] and not c.done and not c.wants_inputs


def test_a_chosen_subset_stays_chosen_after_a_re_plan():
    c = coordinator([10, 11, 12, 13], num=2)
    c.input_ready(info(11, 1))
    c.input_ready(info(13, 3))
    c.rank_lost(1)
    assert c.inputs == [11, 13]
    assert c.input_ready(info(12, 2)) == []       # a backup is not taken: 11 and 13 were given out
    c2 = coordinator([10, 11, 12, 13], num=2)
    c2.input_ready(info(11, 1))
    c2.rank_lost(1)                               # still choosing: a backup may take the place
    assert c2.inputs == [10, 11, 12, 13]
    c2.input_ready(info(12, 2))
    assert c2.used == [12]


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_any_arrival_order_places_every_input_once(order):
    c = coordinator([10, 11, 12, 13], target=0)
    sent = []
    for i in order:
        sent += c.input_ready(info(10 + i, i))
    placed = [m.input_info.object_id for _, m in steps(sent) if m.input_info is not None]
    placed += [m.info.object_id for _, m in sent if isinstance(m, ReduceLate)]
    assert sorted(placed) == [10, 11, 12, 13]
    finals = [m for _, m in steps(sent) if m.final]
    assert len(finals) == 1 and finals[0].out_id == RESULT


def test_late_fortran_input_is_made_c_ordered_on_its_rank_first():
    c = coordinator([10, 11], target=0)
    c.input_ready(info(10, 0, shape=(512, 512)))
    late = info(11, 1, shape=(512, 512), order="F")
    out = c.input_ready(late)
    (r, leaf), = steps(out)
    assert r == 1 and leaf.input_info == late and leaf.children == ()
    notes = [m for _, m in out if isinstance(m, ReduceLate)]
    assert len(notes) == 1 and notes[0].info.object_id == leaf.out_id and notes[0].rank == 1
    assert (1, leaf.out_id) in c.intermediates


# --- issue 10: inputs given twice, read-only headers, ops that depend on order or dtype ------

def test_the_same_input_twice_fills_two_slots():
    c = coordinator([10, 10, 11])
    out = c.input_ready(info(10, 1))
    assert c.used == [10, 10]
    out += c.input_ready(info(11, 2))
    assert c.used == [10, 10, 11]
    assert c.input_ready(info(10, 1)) == []       # (delivered again: nothing more to place)
    placed = [m.input_info.object_id for _, m in steps(out) if m.input_info is not None]
    late = [m.info.object_id for _, m in out if isinstance(m, ReduceLate)]
    assert sorted(placed + late) == [10, 10, 11]


def test_a_late_input_whose_header_differs_is_normalised_by_a_leaf_step():
    # a read-only array (e.g. a task that returns its argument) pickles a byte longer
    # (READONLY_BUFFER): the accumulator must not pull it raw with the canonical chunk plan
    arr = np.zeros(1 << 20, np.float32)
    arr.flags.writeable = False
    frames = serialize(arr)
    ro = ObjectInfo(12, frame_sizes(frames), (3,), head=bytes(frames[0]))
    c = coordinator([10, 11, 12])
    c.input_ready(info(10, 0))
    c.input_ready(info(11, 1))
    assert ro.sizes[0] == c.sizes[0] + 1
    out = c.input_ready(ro)
    (rank, leaf), = steps(out)
    assert rank == 3 and leaf.input_info == ro and leaf.children == () and leaf.sizes == c.sizes
    (late,) = [m for _, m in out if isinstance(m, ReduceLate)]
    assert late.info.object_id == leaf.out_id and late.info.sizes == c.sizes


@pytest.mark.parametrize("op", [np.subtract, np.divide, np.power, np.true_divide, np.arctan2,
                                np.left_shift, np.copysign])
def test_order_dependent_ops_are_refused(op):
    from hoplite_mpi.collectives import resolve_op
    with pytest.raises(ValueError, match="commutative"):
        resolve_op(op)


@pytest.mark.parametrize("op", ["sum", "prod", "min", "max", np.add, np.logical_xor, np.gcd,
                                np.bitwise_or, np.fmax, np.logaddexp, np.hypot])
def test_commutative_ops_are_accepted(op):
    from hoplite_mpi.collectives import resolve_op
    assert isinstance(resolve_op(op), np.ufunc)


def test_an_op_that_cannot_combine_the_dtype_fails_the_reduce_at_its_first_input():
    ids = itertools.count(5000)
    c = Fed(ReduceCoordinator(1, [10, 11], pickle.dumps(np.bitwise_and), 2, 0, RESULT,
                              lambda: next(ids), lambda nbytes: 10**6))
    out = c.input_ready(info(10, 1, dtype=np.float64))
    assert c.done and c.result.error and not steps(out)
    from hoplite_mpi.serialization import rebuild_error
    exc = rebuild_error(c.result.inline)
    assert isinstance(exc, TypeError) and "bitwise_and" in str(exc)


def test_portable_error_keeps_the_builtin_type():
    from hoplite_mpi.collectives import portable_error
    try:
        np.add(np.zeros(1, np.int64), np.ones(1), out=np.zeros(1, np.int64))
    except Exception as exc:
        err = portable_error(exc, "ctx")
    assert type(err) is TypeError and str(err).startswith("ctx: ")
    assert type(pickle.loads(pickle.dumps(err))) is TypeError


# --- the entry point: Start, instructions, unknown events ----------------------------------------

def test_start_asks_for_each_distinct_input_once():
    c = coordinator([10, 11, 10])
    assert c.begin(dead={3}) == [] and c.wants_inputs and not c.done
    assert c.coord.handle(Start()) == [WatchInputs((10, 11))]     # (no Replanned: not a re-plan)


def test_start_with_a_dead_target_fails_the_reduce_at_once():
    c = coordinator([10, 11], target=2)
    out = c.begin(dead={2})
    assert c.done and out == [(0, DirAdd(c.result))] and not c.wants_inputs
    assert c.result.error and b"target rank 2 died" in b"".join(c.result.inline)
    assert c.reduced.used == () and c.reduced.attempts == (1,)


def test_reduced_names_every_attempt_and_the_inputs_of_the_last():
    c = coordinator([10, 11], target=0)
    c.input_ready(info(10, 0))
    c.input_ready(info(11, 1))
    first = c.reduce_id
    c.rank_lost(1)
    c.resume(first, 0)
    assert c.wants_inputs
    out = c.input_ready(info(11, 2)) + c.input_ready(info(10, 0))
    final = next(m for _, m in steps(out) if m.final)
    assert final.adopt == RESULT
    c.step_done(ReduceStepDone(c.reduce_id, RESULT, 0, final.sizes))
    assert c.done and c.reduced.attempts == (first, c.reduce_id)
    assert c.reduced.used == (11, 10) and c.result.holders == (0,)


def test_an_allreduce_ends_when_every_rank_fetched_the_result():
    c = coordinator([10, 11], target=0, allreduce=True)
    out = c.input_ready(info(10, 0)) + c.input_ready(info(11, 1))
    assert (1, Fetch(RESULT, 1)) in out
    final = next(m for _, m in steps(out) if m.final)
    assert c.step_done(ReduceStepDone(1, RESULT, 0, final.sizes)) == [] and not c.done
    assert c.fetched(1, None) == [] and c.done          # (no intermediates to free)


def test_an_unknown_event_is_a_type_error_and_changes_nothing():
    c = coordinator([10, 11])
    with pytest.raises(TypeError, match="no event ObjectInfo"):
        c.coord.handle(info(10, 0))
    assert c.used == []
    c.input_ready(info(10, 0))
    assert c.used == [10]


def test_a_reduce_failing_while_it_awaits_the_resume_names_every_attempt():
    # (simulation seed 120) a re-planned reduce is still filed under its earlier attempt's id by
    # the shell until the target answers; if it fails meanwhile, Reduced must name that id too
    c = coordinator([10, 11, 12], target=0)
    for oid, rank in ((10, 0), (11, 1), (12, 2)):
        c.input_ready(info(oid, rank))
    old = c.reduce_id
    c.rank_lost(2)
    assert c.awaiting == old and not c.done
    c.rank_lost(0)
    assert c.done and c.result.error and c.reduced.attempts == (old, c.reduce_id)


def test_host_order_groups_inputs_by_host_with_the_targets_host_last():
    from hoplite_mpi.collectives import host_order
    hosts = ["A", "B", "C", "A", "B", "C"]            # ranks round robin over three hosts
    infos = [ObjectInfo(100 + r, (10, 10), (r,)) for r in range(6)]
    got = [i.holders[0] for i in host_order(infos, hosts, target=0)]
    assert got == [1, 4, 2, 5, 0, 3]                  # B, C, then A (the target's) last
    crossings = sum(hosts[a] != hosts[b] for a, b in zip(got, got[1:]))
    assert crossings == 2                              # (input order: 5)
    # an inline value (no holder) counts as on the target's host; ties keep input order
    inline = ObjectInfo(200, (10,), (), (b"x",))
    assert host_order([inline, infos[1], infos[3]], hosts, target=3)[-2:] == [inline, infos[3]]
