"""Values <-> frames: cloudpickle protocol 5 with out-of-band buffers.

A serialized value is a list of *frames*: frame 0 is the pickle stream, frames 1.. are the raw
out-of-band buffers (for a C-contiguous numpy array: its data, never pickled or copied by pickle).
Frames are what the object store keeps and what transfers move chunk by chunk.  Deserialization
is zero-copy: numpy arrays are views of the received frames (read-only, like Ray's object store).
"""
from __future__ import annotations

import pickle
import socket
import sys
import traceback
from typing import Any, Iterable, Sequence

import cloudpickle
import numpy as np

from .arrays import array_frames, array_of
from .errors import RemoteTraceback, SerializationError, TaskError
from .protocol import ObjectInfo

PROTOCOL = 5
Frames = list  # list of bytes-like objects (bytes, bytearray, memoryview, uint8 ndarray)
_SCALARS = frozenset({int, float, complex, str, bytes, bool, type(None)})


def serialize(value: Any, what: str = "value", copy: bool = False) -> Frames:
    """Pickle ``value`` into frames.

    Args:
        value: any cloudpickle-able object.
        what: how to name the value in an error message (e.g. ``"return value of f"``).
        copy: copy the out-of-band buffers, so that later mutation of ``value`` (e.g. of a numpy
            array given to ``put``) cannot change the stored object.

    Raises:
        SerializationError: ``value`` cannot be pickled; the pickling error is the ``__cause__``.
    """
    if type(value) in _SCALARS:
        # (fine-grained tasks' usual values: the C pickler gives cloudpickle's bytes for these,
        # without building a cloudpickle Pickler per value; no out-of-band buffers)
        return [pickle.dumps(value, protocol=PROTOCOL)]
    if type(value) is np.ndarray:       # (the head pickled once per dtype, shape and order)
        frames = array_frames(value, copy)
        if frames is not None:
            return frames
    buffers: list[pickle.PickleBuffer] = []
    try:
        head = cloudpickle.dumps(value, protocol=PROTOCOL, buffer_callback=buffers.append)
    except Exception as exc:  # pickle raises TypeError, PicklingError, AttributeError, ...
        raise SerializationError(f"could not serialize {what}: {exc}") from exc
    frames: Frames = [head]
    for buf in buffers:
        raw = buf.raw()
        frames.append(np.frombuffer(raw, dtype=np.uint8).copy() if copy else raw)
    return frames


def _held(value: Any) -> int:
    return sys.getrefcount(value)


def _sole_count() -> int:
    value = np.empty(1)       # held by this one variable, as the caller of sole_owner holds its value
    return _held(value)


_SOLE = _sole_count()   # getrefcount of a value one variable holds, seen inside a callee


def held_only_by_caller(value: Any, containers: int = 0) -> bool:
    """Whether nothing references ``value`` but the caller's one variable (and ``containers``
    containers).  Calibrated with :data:`_SOLE`, so it holds on interpreters that count differently."""
    return sys.getrefcount(value) <= _SOLE + containers


def sole_owner(value: Any, containers: int = 0) -> bool:
    """Whether ``value`` is a numpy array whose memory nothing else can reach: held by the caller's
    one variable (and ``containers`` containers, e.g. the tuple a task returned), owning its data
    or a view of arrays referenced only by their views.  Then serializing it without a copy is
    safe: nobody can mutate the stored bytes afterwards.  (A task's freshly computed result is the
    common case; copying it cost 13-17 ms per 64 MiB here.)  Conservative: False when unsure."""
    if type(value) is not np.ndarray or not held_only_by_caller(value, containers + 1):
        return False     # (+1: the reference of held_only_by_caller's own parameter)
    base = value.base
    while base is not None:
        # a base array held by exactly one view (ours): refs = the view + `base` + getrefcount
        if type(base) is not np.ndarray or sys.getrefcount(base) > 3:
            return False
        base = base.base
    return True


def deserialize(frames: Sequence[Any]) -> Any:
    """Rebuild a value from its frames (zero-copy for out-of-band buffers; a numpy array of a
    head seen before without running pickle: :func:`hoplite_mpi.arrays.array_of`)."""
    return array_of(frames[0], [memoryview(f).toreadonly() for f in frames[1:]])


def frame_sizes(frames: Iterable[Any]) -> tuple[int, ...]:
    """Byte length of each frame."""
    return tuple(memoryview(f).nbytes for f in frames)


def to_bytes(frames: Iterable[Any]) -> tuple[bytes, ...]:
    """Frames as ``bytes`` (for sending inside a control message)."""
    return tuple(bytes(f) if not isinstance(f, bytes) else f for f in frames)


def dumps(value: Any, what: str) -> bytes:
    """In-band cloudpickle of ``value`` (functions, small args).  Raises SerializationError."""
    try:
        return cloudpickle.dumps(value, protocol=PROTOCOL)
    except Exception as exc:
        raise SerializationError(f"could not serialize {what}: {exc}") from exc


def loads(blob: bytes) -> Any:
    return pickle.loads(blob)


# --- errors ---------------------------------------------------------------------------------

class _ErrorPayload:
    """A task exception as shipped between ranks: the exception itself when picklable, else its
    type name and message; always the formatted traceback, rank and host."""

    __slots__ = ("exc_blob", "type_name", "message", "tb", "rank", "host")

    def __init__(self, exc_blob, type_name, message, tb, rank, host):
        self.exc_blob, self.type_name, self.message = exc_blob, type_name, message
        self.tb, self.rank, self.host = tb, rank, host

    def __reduce__(self):
        return (_ErrorPayload, (self.exc_blob, self.type_name, self.message, self.tb, self.rank,
                                self.host))


def serialize_error(exc: BaseException, rank: int) -> Frames:
    """Frames of an error object for ``exc`` raised on ``rank`` (keeps type and traceback)."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    exc_blob: bytes | None
    try:
        exc_blob = cloudpickle.dumps(exc, protocol=PROTOCOL)   # (tracebacks are not pickled)
        pickle.loads(exc_blob)  # must also be rebuildable (custom __init__ signatures may not be)
    except Exception:
        exc_blob = None
    payload = _ErrorPayload(exc_blob, f"{type(exc).__module__}.{type(exc).__qualname__}",
                            str(exc), tb, rank, socket.gethostname())
    return [pickle.dumps(payload, protocol=PROTOCOL)]


def rebuild_error(frames: Sequence[Any]) -> BaseException:
    """The exception of an error object, with the remote traceback as ``__cause__``."""
    payload = pickle.loads(frames[0])
    if isinstance(payload, BaseException):  # an error object created locally (e.g. cancel)
        return payload
    exc: BaseException
    if payload.exc_blob is not None:
        exc = pickle.loads(payload.exc_blob)
    else:
        exc = TaskError(payload.message, payload.type_name)
    exc.__cause__ = RemoteTraceback(payload.tb, payload.rank, payload.host)
    return exc


def error_info(object_id: int, error: Iterable[Any]) -> ObjectInfo:
    """The ObjectInfo of an error object: no holder, ``error`` (the frames of a pickled
    exception, e.g. :func:`local_error`'s) inline; ``get`` raises that exception."""
    error = to_bytes(error)
    return ObjectInfo(object_id, frame_sizes(error), (), error, True)


def local_error(exc: BaseException) -> Frames:
    """Frames of an error object created by the runtime itself (no remote traceback)."""
    return [cloudpickle.dumps(exc, protocol=PROTOCOL)]
