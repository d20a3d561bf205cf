"""The inline path of the reduce coordinator (collectives.py, ``small=True``): inputs that are
inline values are combined on the coordinator's rank and the result is an inline value, sent to
the ranks that must hold it in a ``Fetch`` that carries it; no ReduceStep at all.  Fed through
``handle`` only, with the helper of test_reduce_plan.py."""
from __future__ import annotations

import itertools
import pickle

import numpy as np
import pytest

from hoplite_mpi.collectives import ReduceCoordinator
from hoplite_mpi.protocol import (DirAdd, Fetch, Fetched, ObjectInfo, ReduceAbort, ReduceLate,
                                  ReduceStep, ReduceStepDone)
from hoplite_mpi.serialization import frame_sizes, rebuild_error, serialize, to_bytes

from test_reduce_plan import RESULT, Fed, info as big_info

SHARDS = (2,)


def small(oid, rank, value, dtype=np.float32, order="C", readonly=False):
    a = np.asarray(value, dtype=dtype, order=order)
    if readonly:
        a.flags.writeable = False
    frames = serialize(a)
    return ObjectInfo(oid, frame_sizes(frames), (rank,), to_bytes(frames))


def value_of(info: ObjectInfo):
    return pickle.loads(info.inline[0], buffers=info.inline[1:])


def coordinator(inputs, target=0, num=None, allreduce=False, op=np.add, small_path=True):
    ids = itertools.count(5000)
    return Fed(ReduceCoordinator(1, list(inputs), pickle.dumps(op), num or len(inputs), target,
                                 RESULT, lambda: next(ids), lambda nbytes: 0, allreduce,
                                 lambda oid: SHARDS, small=small_path, home=0))


def test_small_inputs_are_combined_here_with_no_tree():
    c = coordinator([10, 11, 12])
    assert c.begin() == []
    assert c.input_ready(small(10, 0, [1, 2])) == []
    assert c.input_ready(small(11, 1, [10, 20])) == []
    out = c.input_ready(small(12, 3, [100, 200]))
    assert c.done and c.used == [10, 11, 12]
    assert out == [(2, DirAdd(c.result))]            # registered; the target (here) has it
    assert c.result.holders == (0,) and c.result.inline is not None and not c.result.error
    got = value_of(c.result)
    assert got.dtype == np.float32 and got.tolist() == [111, 222]
    assert c.reduced.attempts == (1,)


def test_the_flag_off_keeps_the_tree():
    c = coordinator([10, 11], small_path=False)
    c.begin()
    out = c.input_ready(small(10, 0, [1])) + c.input_ready(small(11, 1, [2]))
    assert any(isinstance(m, ReduceStep) for _, m in out) and not c.done


def test_a_target_elsewhere_gets_the_result_and_answers():
    c = coordinator([10, 11], target=3)
    c.begin()
    c.input_ready(small(10, 1, [1.0]))
    out = c.input_ready(small(11, 2, [2.0]))
    assert out == [(2, DirAdd(c.coord.result)), (3, Fetch(RESULT, 1, info=c.coord.result))]
    assert not c.done and c.coord.result.holders == (3,)
    assert c.step_done(Fetched(1, 3)) == [] and c.done and value_of(c.result).tolist() == [3.0]


def test_allreduce_sends_the_result_to_each_contributor():
    c = coordinator([10, 11, 12], allreduce=True)
    c.begin()
    c.input_ready(small(10, 0, [1]))
    c.input_ready(small(11, 1, [1]))
    out = c.input_ready(small(12, 2, [1]))
    assert out[0] == (2, DirAdd(c.coord.result))
    assert out[1:] == [(1, Fetch(RESULT, 1, info=c.coord.result)), (2, Fetch(RESULT, 1, info=c.coord.result))]
    c.step_done(Fetched(1, 2))
    assert not c.done
    c.rank_lost(1)                     # a contributor that dies is not waited for
    assert c.done and value_of(c.result).tolist() == [3.0]


def test_first_k_takes_the_first_ready_and_ignores_the_rest():
    c = coordinator([10, 11, 12, 13], num=2)
    c.begin()
    c.input_ready(small(12, 2, [5]))
    c.input_ready(small(10, 0, [7]))
    assert c.done and c.reduced.used == (12, 10) and value_of(c.result).tolist() == [12]
    assert c.coord.handle(__import__("hoplite_mpi.collectives", fromlist=["InputReady"])
                          .InputReady(small(11, 1, [1]))) == []


def test_a_repeated_input_counts_once_per_occurrence():
    c = coordinator([10, 10, 11])
    c.begin()
    c.input_ready(small(10, 1, [3]))
    c.input_ready(small(11, 2, [1]))
    assert c.done and value_of(c.result).tolist() == [7]


def test_mismatched_shapes_and_error_inputs_fail():
    c = coordinator([10, 11])
    c.begin()
    c.input_ready(small(10, 1, [1, 2]))
    out = c.input_ready(small(11, 2, [1, 2, 3]))
    assert c.done and c.result.error and out == [(2, DirAdd(c.coord.result))]
    exc = rebuild_error(c.result.inline)
    assert isinstance(exc, ValueError) and "shape" in str(exc)

    from hoplite_mpi.serialization import error_info, local_error
    c = coordinator([10, 11])
    c.begin()
    c.input_ready(small(10, 1, [1]))
    bad = error_info(11, to_bytes(local_error(KeyError("boom"))))
    c.input_ready(bad)
    assert c.done and c.result.error and isinstance(rebuild_error(c.result.inline), KeyError)


def test_an_op_that_fails_on_the_values_fails_the_reduce():
    c = coordinator([10, 11], op=np.gcd)
    c.begin()
    c.input_ready(small(10, 1, [4, 6], dtype=np.int64))
    c.input_ready(small(11, 2, [6, 9], dtype=np.int64))
    assert c.done and value_of(c.result).tolist() == [2, 3]
    c = coordinator([10, 11], op=np.bitwise_and)
    c.begin()
    c.input_ready(small(10, 1, [1.5]))
    assert c.done and isinstance(rebuild_error(c.result.inline), TypeError)


def test_fortran_and_readonly_inputs_combine_by_element():
    a = np.arange(6, dtype=np.float64).reshape(2, 3)
    c = coordinator([10, 11, 12])
    c.begin()
    c.input_ready(small(10, 1, a, dtype=np.float64, order="F"))
    c.input_ready(small(11, 2, a, dtype=np.float64, readonly=True))
    c.input_ready(small(12, 3, a, dtype=np.float64))
    got = value_of(c.result)
    assert c.done and got.flags.c_contiguous and np.array_equal(got, 3 * a)


def test_an_input_that_is_not_inline_moves_the_placed_ones_into_a_tree():
    c = coordinator([10, 11, 12])
    c.begin()
    c.input_ready(small(10, 0, np.zeros(1 << 20, np.float32)))
    out = c.input_ready(big_info(11, 1))      # (same shape and dtype, but chunked)
    assert not c.done and c.used == [10, 11] and c.path == "tree"
    assert out and all(isinstance(m, (ReduceStep, ReduceLate)) for _, m in out)
    out = c.input_ready(small(12, 2, np.zeros(1 << 20, np.float32)))
    assert not c.done and c.used == [10, 11, 12] and out


def test_the_target_dead_before_the_result_fails_and_after_does_not():
    c = coordinator([10, 11], target=3)
    c.begin()
    c.input_ready(small(10, 1, [1]))
    c.rank_lost(3)
    assert c.done and c.result.error and b"target rank 3 died" in b"".join(c.result.inline)
    c = coordinator([10, 11], target=3)
    c.begin()
    c.input_ready(small(10, 1, [1]))
    c.input_ready(small(11, 2, [1]))
    c.rank_lost(3)                     # the inline result does not die with its rank
    assert c.done and not c.result.error and value_of(c.result).tolist() == [2]


def test_inline_inputs_of_dead_makers_still_count():
    c = coordinator([10, 11])
    c.begin()
    c.rank_lost(1)
    c.input_ready(small(10, 1, [1]))
    c.input_ready(small(11, 2, [1]))
    assert c.done and value_of(c.result).tolist() == [2]


# --- the star (mid-size objects, star_cheaper) ---------------------------------------------------

def mid(oid, rank, order="C"):
    return big_info(oid, rank, shape=(128, 128), order=order)      # 64 KiB of float32


def star_coordinator(inputs, target=0, num=None, allreduce=False, small_path=True, k=0):
    ids = itertools.count(5000)
    return Fed(ReduceCoordinator(1, list(inputs), pickle.dumps(np.add), num or len(inputs), target,
                                 RESULT, lambda: next(ids), lambda nbytes: k, allreduce,
                                 lambda oid: SHARDS, small=small_path, home=0))


def test_star_cost_model():
    from hoplite_mpi.collectives import star_cheaper
    assert not star_cheaper(2, 0)                     # (two inputs: the same as a chain)
    assert star_cheaper(4, 0) and star_cheaper(16, 0)
    assert not star_cheaper(4, 2) and not star_cheaper(4, 7)
    # chunk-aware (Config.chunk_aware_plan): one chunk per object is not pipelined by a chain
    assert star_cheaper(4, 7, 1) and not star_cheaper(4, 7, 2) and not star_cheaper(4, 28, 4)
    assert star_cheaper(4, 0, 1) and not star_cheaper(2, 7, 1)


def test_a_star_target_pulls_every_input_itself():
    c = star_coordinator([10, 11, 12, 13], target=0)
    c.begin()
    out = c.input_ready(mid(10, 0))
    (r, acc), (r2, late) = out
    assert r == 0 and isinstance(acc, ReduceStep) and acc.late == 4 and acc.final
    assert acc.input_info is None and acc.children == () and acc.out_id == RESULT
    assert (r2, late) == (0, ReduceLate(1, RESULT, mid(10, 0), 0))
    assert c.input_ready(mid(11, 1)) == [(0, ReduceLate(1, RESULT, mid(11, 1), 1))]
    assert c.input_ready(mid(12, 2)) == [(0, ReduceLate(1, RESULT, mid(12, 2), 2))]
    assert c.input_ready(mid(13, 3)) == [(0, ReduceLate(1, RESULT, mid(13, 3), 3))]
    assert not c.done
    c.step_done(ReduceStepDone(1, RESULT, 0, acc.sizes))
    assert c.done and c.used == [10, 11, 12, 13]


def test_a_star_input_in_fortran_order_gets_a_leaf_step_first():
    c = star_coordinator([10, 11, 12])
    c.begin()
    c.input_ready(mid(10, 1))
    out = c.input_ready(mid(11, 2, order="F"))
    (r, leaf), (r0, late) = out
    assert r == 2 and leaf.children == () and not leaf.final and leaf.input_info == mid(11, 2, order="F")
    assert r0 == 0 and late.info.object_id == leaf.out_id and late.rank == 2


def test_a_star_is_replanned_when_an_input_rank_dies():
    c = star_coordinator([10, 11, 12], target=0)
    c.begin()
    c.input_ready(mid(10, 1))
    c.input_ready(mid(11, 2))
    out = c.rank_lost(2)
    assert any(isinstance(m, ReduceAbort) for _, m in out)
    c.resume(1, 0)
    assert c.wants_inputs and c.reduce_id != 1
    out = c.input_ready(mid(10, 1))
    acc = [m for _, m in out if isinstance(m, ReduceStep)][0]
    assert acc.late == 3 and acc.reduce_id == c.reduce_id


def test_the_flag_off_or_a_large_object_keeps_the_tree_chain():
    for c in (star_coordinator([10, 11, 12, 13], small_path=False),
              star_coordinator([10, 11, 12, 13], k=7)):
        c.begin()
        out = c.input_ready(mid(10, 1)) + c.input_ready(mid(11, 2))
        assert not any(isinstance(m, ReduceStep) and m.late == 4 for _, m in out)
