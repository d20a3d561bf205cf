"""hoplite_mpi/arrays.py: the cached array heads give exactly what pickle gives.

Generative: random dtypes, shapes, orders, strides and read-only flags (hypothesis), each value
serialized by :func:`serialize` and rebuilt by :func:`deserialize` twice (the second time from the
cache), against ``pickle.loads`` of cloudpickle's own frames.
"""
from __future__ import annotations

import pickle

import cloudpickle
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hoplite_mpi import arrays
from hoplite_mpi.arrays import array_frames, array_meta, array_of
from hoplite_mpi.serialization import deserialize, serialize

DTYPES = st.one_of(hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(), hnp.floating_dtypes(),
                   hnp.complex_number_dtypes(), hnp.boolean_dtypes(), hnp.datetime64_dtypes(),
                   hnp.byte_string_dtypes(max_len=4))


def reference(value):
    """What pickle alone gives for ``value`` (cloudpickle frames, plain ``pickle.loads``)."""
    buffers = []
    head = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    return pickle.loads(head, buffers=[bytes(b.raw()) for b in buffers])


def same(a, b) -> None:
    assert type(a) is type(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.flags.c_contiguous == b.flags.c_contiguous
    assert a.flags.f_contiguous == b.flags.f_contiguous
    assert a.flags.writeable == b.flags.writeable
    assert a.tobytes(order="A") == b.tobytes(order="A")


@settings(max_examples=300, deadline=None)
@given(arr=hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_dims=4, max_side=5)),
       layout=st.sampled_from(["C", "F", "strided", "readonly"]), copy=st.booleans())
def test_serialize_and_deserialize_agree_with_pickle(arr, layout, copy):
    if layout == "F":
        arr = np.asfortranarray(arr)
    elif layout == "strided" and arr.ndim and arr.shape[0] > 1:
        arr = arr[::2]
    elif layout == "readonly":
        arr = arr.copy()
        arr.flags.writeable = False
    expected = reference(arr)
    frames = serialize(arr, copy=copy)
    as_bytes = [bytes(f) for f in frames]
    for _ in range(2):      # the second time the head is known
        same(deserialize(frames), expected)
        same(deserialize(as_bytes), expected)
        if arr.dtype.isnative:      # (numpy's own pickle of a 0-d non-native datetime differs)
            assert deserialize(as_bytes).tobytes() == arr.tobytes()


def test_frames_of_other_values_are_left_to_pickle():
    assert array_frames(np.array([object(), 1], dtype=object)) is None
    assert array_frames(np.zeros(3, dtype=[("a", "i4"), ("b", "f8")])) is None
    assert array_frames(np.arange(10)[::3]) is None          # not contiguous
    assert array_frames(np.ma.masked_array([1, 2])) is None   # a subclass
    assert array_frames(np.zeros(0)) is None                  # no data frame to view
    assert array_frames([1, 2]) is None


def test_a_head_is_remembered_only_when_its_value_is_a_view_of_the_frame():
    arrays._HEADS.clear()
    # a value whose pickle has one buffer but is not an array over it: not remembered
    value = {"x": np.arange(4.0)}
    frames = serialize(value)
    assert len(frames) == 2 and deserialize(frames)["x"].tolist() == [0, 1, 2, 3]
    assert deserialize(frames)["x"].tolist() == [0, 1, 2, 3]
    assert arrays._HEADS == {}
    frames = serialize(np.arange(4.0))
    deserialize(frames)
    assert list(arrays._HEADS.values()) == [(np.dtype(float), (4,), "C", False)]


def test_a_read_only_head_gives_a_read_only_array_from_a_writable_frame():
    arrays._HEADS.clear()      # (learned first from a read-only frame, then met with writable ones)
    ro = np.arange(5.0)
    ro.flags.writeable = False
    frames = serialize(ro)
    for writable in (False, True, True, False, True):
        frame = bytearray(bytes(frames[1])) if writable else bytes(frames[1])
        got = array_of(bytes(frames[0]), [frame])
        want = pickle.loads(bytes(frames[0]), buffers=[frame])
        assert got.flags.writeable == want.flags.writeable == False
    w = np.arange(5.0)
    frames = serialize(w)
    for writable in (False, True, True):
        frame = bytearray(bytes(frames[1])) if writable else bytes(frames[1])
        got = array_of(bytes(frames[0]), [frame])
        want = pickle.loads(bytes(frames[0]), buffers=[frame])
        assert got.flags.writeable == want.flags.writeable == writable


def test_the_caches_stay_bounded():
    arrays._HEADS.clear()
    arrays._MADE.clear()
    for n in range(1, 2 * arrays.CACHE_SIZE + 10):
        deserialize(serialize(np.zeros(n, np.uint8)))
    assert 0 < len(arrays._HEADS) <= arrays.CACHE_SIZE
    assert 0 < len(arrays._MADE) <= arrays.CACHE_SIZE


def test_array_meta_reads_no_data():
    frames = serialize(np.arange(12, dtype=np.int16).reshape(3, 4))
    for _ in range(2):
        blank = array_meta(bytes(frames[0]), 24)
        assert blank.shape == (3, 4) and blank.dtype == np.int16


def test_array_of_a_long_head_is_never_looked_up():
    value = ["x" * 5000, np.arange(3)]
    frames = serialize(value)
    assert len(frames[0]) > arrays.MAX_HEAD
    got = array_of(frames[0], frames[1:])
    assert got[0] == value[0] and got[1].tolist() == [0, 1, 2]


@pytest.mark.parametrize("op", ["sum", "max"])
def test_the_inline_reduce_result_unpickles_with_plain_pickle(op):
    # the coordinator's result frames (array_frames of its accumulator) are read by any rank
    # with plain pickle: the cached head must be the one pickle writes
    from hoplite_mpi.collectives import InputReady, ReduceCoordinator, Reduced, Start, op_blob, resolve_op
    from hoplite_mpi.protocol import ObjectInfo

    inputs = [np.arange(6, dtype=np.float32).reshape(2, 3) * (r + 1) for r in range(3)]
    infos = []
    for r, a in enumerate(inputs):
        frames = tuple(bytes(f) for f in serialize(a))
        infos.append(ObjectInfo(100 + r, tuple(len(f) for f in frames), (r,), frames))
    ids = iter(range(1000, 2000))
    for _ in range(2):
        coord = ReduceCoordinator(1, [100, 101, 102], op_blob(resolve_op(op)), 3, 0, 2,
                                  lambda: next(ids), lambda n: 0, small=True, home=0)
        out = coord.handle(Start(frozenset()))
        for info in infos:
            out = coord.handle(InputReady(info))
        reduced = [i for i in out if isinstance(i, Reduced)]
        assert len(reduced) == 1
        frames = reduced[0].result.inline
        got = pickle.loads(frames[0], buffers=frames[1:])
        want = np.sum(inputs, axis=0) if op == "sum" else np.max(inputs, axis=0)
        assert got.dtype == np.float32 and got.shape == (2, 3) and np.array_equal(got, want)


def test_an_inline_reduce_of_empty_arrays():
    # (found by the simulation, seeds 18, 52, 56, 65, 67: an empty array has no data frame for
    # array_frames; the coordinator's result took None for its frames)
    from hoplite_mpi.collectives import InputReady, ReduceCoordinator, Reduced, Start, op_blob, resolve_op
    from hoplite_mpi.protocol import ObjectInfo

    infos = []
    for r in range(2):
        frames = tuple(bytes(f) for f in serialize(np.zeros(0, np.float64)))
        infos.append(ObjectInfo(100 + r, tuple(len(f) for f in frames), (r,), frames))
    coord = ReduceCoordinator(1, [100, 101], op_blob(resolve_op("sum")), 2, 0, 2,
                              iter(range(1000, 2000)).__next__, lambda n: 0, small=True, home=0)
    out = coord.handle(Start(frozenset()))
    for info in infos:
        out = coord.handle(InputReady(info))
    (reduced,) = [i for i in out if isinstance(i, Reduced)]
    assert not reduced.result.error
    got = deserialize(reduced.result.inline)
    assert got.shape == (0,) and got.dtype == np.float64
