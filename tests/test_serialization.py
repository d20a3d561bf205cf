"""Serialization: frames with out-of-band numpy buffers, errors as payloads."""
from __future__ import annotations

import pickle
import socket
import threading
from concurrent.futures import CancelledError

import numpy as np
import pytest

from hoplite_mpi.errors import ObjectDeletedError, RemoteTraceback, SerializationError, TaskError
from hoplite_mpi.serialization import (deserialize, dumps, frame_sizes, loads, local_error,
                                       rebuild_error, serialize, serialize_error, to_bytes)


# --- values ---------------------------------------------------------------------------------

def test_plain_value_is_one_frame_and_round_trips():
    value = {"a": [1, 2.5, "x"], "b": (None, b"bytes")}
    frames = serialize(value)
    assert len(frames) == 1
    assert deserialize(frames) == value


def test_numpy_array_data_travels_out_of_band():
    array = np.arange(1000, dtype=np.float64)
    frames = serialize(array)
    assert len(frames) == 2
    assert frame_sizes(frames)[1] == array.nbytes
    assert frame_sizes(frames)[0] < 1000  # the pickle stream holds no data
    # no copy at serialize time: frame 1 is the array's own memory
    assert np.shares_memory(np.frombuffer(frames[1], dtype=np.uint8), array)


def test_several_arrays_give_one_frame_each():
    value = {"x": np.ones(10), "y": np.zeros((3, 4), dtype=np.int32), "n": 5}
    frames = serialize(value)
    assert frame_sizes(frames)[1:] == (80, 48)  # in pickling order: x, then y
    out = deserialize(frames)
    np.testing.assert_array_equal(out["x"], value["x"])
    np.testing.assert_array_equal(out["y"], value["y"])
    assert out["n"] == 5


def test_deserialize_is_zero_copy_and_read_only():
    array = np.arange(16, dtype=np.int64)
    frames = [bytes(f) if i == 0 else bytearray(f) for i, f in enumerate(serialize(array))]
    out = deserialize(frames)
    np.testing.assert_array_equal(out, array)
    assert not out.flags.writeable
    with pytest.raises(ValueError):
        out[0] = 99
    # the result is a view of the received frame: a change of the frame shows through
    received = np.frombuffer(frames[1], dtype=np.int64)
    assert np.shares_memory(out, received)
    frames[1][0:8] = (123).to_bytes(8, "little")
    assert out[0] == 123


def test_copy_true_isolates_the_frames_from_later_mutation():
    array = np.arange(8, dtype=np.int32)
    frames = serialize(array, copy=True)
    assert not np.shares_memory(np.asarray(frames[1]), array)
    array[:] = -1
    np.testing.assert_array_equal(deserialize(frames), np.arange(8, dtype=np.int32))


def test_copy_false_shares_memory_with_the_value():
    array = np.arange(8, dtype=np.int32)
    frames = serialize(array, copy=False)
    array[0] = 42
    assert deserialize(frames)[0] == 42


def test_frames_survive_conversion_to_bytes():
    array = np.linspace(0, 1, 33)
    frames = to_bytes(serialize(array))
    assert all(type(f) is bytes for f in frames)
    np.testing.assert_array_equal(deserialize(frames), array)
    assert frame_sizes(frames) == tuple(len(f) for f in frames)


def test_to_bytes_keeps_bytes_objects_as_they_are():
    blob = b"abc"
    assert to_bytes([blob])[0] is blob
    assert to_bytes([bytearray(b"x"), memoryview(b"yz"), np.array([1, 2], dtype=np.uint8)]) == (b"x", b"yz", b"\x01\x02")


def test_frame_sizes_counts_bytes_not_items():
    assert frame_sizes([b"", b"abc", np.zeros(3, dtype=np.float32), memoryview(b"12345")]) == (0, 3, 12, 5)


def test_lambdas_and_closures_are_serializable():
    k = 7
    fn = deserialize(serialize(lambda x: x + k))
    assert fn(1) == 8
    assert loads(dumps(lambda: k * 2, "fn"))() == 14


@pytest.mark.parametrize("op", ["serialize", "dumps"])
def test_unpicklable_value_gives_serialization_error_naming_what(op):
    value = {"lock": threading.Lock()}
    with pytest.raises(SerializationError) as info:
        serialize(value, what="argument 1 of f") if op == "serialize" else dumps(value, "argument 1 of f")
    assert "argument 1 of f" in str(info.value)
    assert isinstance(info.value.__cause__, TypeError)
    assert "lock" in str(info.value.__cause__)
    assert isinstance(info.value, TypeError)  # SerializationError is also a TypeError


# --- errors ---------------------------------------------------------------------------------

def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:  # noqa: BLE001
        return caught


def test_error_payload_keeps_type_and_args_and_attaches_remote_traceback():
    frames = serialize_error(_raised(ValueError("bad input", 3)), rank=5)
    assert len(frames) == 1
    exc = rebuild_error(to_bytes(frames))
    assert type(exc) is ValueError
    assert exc.args == ("bad input", 3)
    cause = exc.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert cause.rank == 5
    assert cause.host == socket.gethostname()
    assert "ValueError: ('bad input', 3)" in cause.tb
    assert "_raised" in cause.tb  # the frame that raised it
    assert "rank 5" in str(cause)


def test_error_payload_keeps_attributes_of_picklable_exception():
    exc = rebuild_error(serialize_error(_raised(ObjectDeletedError("0:7")), rank=2))
    assert type(exc) is ObjectDeletedError
    assert exc.object_id == "0:7"
    assert exc.__cause__.rank == 2


class _NeedsTwoArgs(Exception):
    def __init__(self, a, b):  # pickle calls cls(*args) with args == (a,): cannot be rebuilt
        super().__init__(a)
        self.b = b


class _HoldsALock(Exception):
    def __init__(self, msg):
        super().__init__(msg)
        self.lock = threading.Lock()


@pytest.mark.parametrize("exc, type_name, message", [
    (_NeedsTwoArgs("first", "second"), f"{__name__}._NeedsTwoArgs", "first"),
    (_HoldsALock("locked"), f"{__name__}._HoldsALock", "locked"),
])
def test_unpicklable_or_unrebuildable_exception_becomes_task_error(exc, type_name, message):
    rebuilt = rebuild_error(serialize_error(_raised(exc), rank=4))
    assert type(rebuilt) is TaskError
    assert rebuilt.original_type == type_name
    assert str(rebuilt) == f"{type_name}: {message}"
    assert isinstance(rebuilt.__cause__, RemoteTraceback)
    assert rebuilt.__cause__.rank == 4
    assert type(exc).__name__ in rebuilt.__cause__.tb


def test_exception_of_a_locally_defined_class_is_rebuilt_by_value():
    class Local(Exception):
        pass

    rebuilt = rebuild_error(serialize_error(_raised(Local("x")), rank=1))
    assert type(rebuilt).__name__ == "Local"
    assert rebuilt.args == ("x",)


def test_local_error_rebuilds_without_remote_traceback():
    exc = rebuild_error(to_bytes(local_error(CancelledError())))
    assert type(exc) is CancelledError
    assert exc.__cause__ is None


def test_error_payload_is_plain_pickle_readable_anywhere():
    # frame 0 can be unpickled without cloudpickle-specific state (the payload class is importable)
    payload = pickle.loads(serialize_error(_raised(KeyError("k")), rank=0)[0])
    assert payload.type_name == "builtins.KeyError"
    assert payload.rank == 0


def test_serialize_error_leaves_the_exception_unchanged():
    exc = _raised(RuntimeError("boom"))
    assert exc.__traceback__ is not None
    serialize_error(exc, rank=1)
    assert exc.__traceback__ is not None


# --- sole_owner: when a task result may be stored without a copy -------------------------------

def test_sole_owner_of_a_fresh_array_and_of_a_view_of_a_temporary():
    from hoplite_mpi.serialization import sole_owner
    fresh = np.arange(10.0)
    assert sole_owner(fresh)
    view = np.arange(10.0).reshape(2, 5)     # its base is referenced only by the view
    assert sole_owner(view)


def test_sole_owner_is_false_when_anything_else_can_reach_the_memory():
    from hoplite_mpi.serialization import sole_owner
    arr = np.arange(10.0)
    keep = [arr]
    assert not sole_owner(arr)                # another reference
    del keep
    base = np.arange(10.0)
    assert not sole_owner(base[2:])           # a view of an array someone holds
    assert not sole_owner(np.frombuffer(bytearray(16), np.uint8))   # memory owned by a bytearray
    assert not sole_owner([1, 2])             # not an array
    assert not sole_owner(np.ma.masked_array([1.0]))                  # a subclass


def test_sole_owner_counts_the_containers_the_caller_names():
    from hoplite_mpi.serialization import sole_owner
    pair = (np.arange(3.0), np.arange(4.0))
    for element in pair:
        assert sole_owner(element, 1)         # the tuple + the loop variable
        assert not sole_owner(element, 0)
