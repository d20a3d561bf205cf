"""Numpy arrays <-> frames without running pickle per array (the small-object fast path).

A contiguous numeric numpy array pickles (protocol 5, out-of-band buffer) to a *head* that names
only ``numpy.core.numeric._frombuffer`` with the array's dtype, shape and order, plus one data
frame; the head does not depend on the data.  Unpickling such a head costs ~8 us and pickling it
~12 us here, against ~1 us for a 1 KiB add: on the paths that handle many small arrays (the
inline reduce, collectives' input checks, task results) that was most of the work.  So:

- :func:`array_of` (head, data frame -> array) unpickles a head once, checks that the result is a
  view of the frame it was given (the head is then of that form, whatever pickler wrote it), and
  answers later heads equal to it with ``np.frombuffer(frame, dtype).reshape(shape, order=...)``,
  which is exactly what the unpickler would do;
- :func:`array_frames` (array -> frames) pickles the head once per (dtype, shape, order) and
  reuses it.

Both caches are bounded (:data:`CACHE_SIZE` entries each, emptied when full) and thread-safe for
CPython (a dict read or write is atomic).  Anything else (object dtype, a subclass, a
non-contiguous array, another head) takes plain pickle: the result is always what pickle gives.
"""
from __future__ import annotations

import pickle
import pickletools
from typing import Any, Optional, Sequence

import numpy as np

CACHE_SIZE = 512
MAX_HEAD = 1024     # bytes: a longer head is not looked up (an array's is ~100-200 bytes)
# head -> (dtype, shape, order, read-only): heads checked to be numpy's out-of-band
# ``_frombuffer`` form (read-only: the head marks its buffer read-only, READONLY_BUFFER)
_HEADS: dict[bytes, tuple[np.dtype, tuple, str, bool]] = {}
# (dtype, shape, order) -> head, for arrays this process serializes
_MADE: dict[tuple, bytes] = {}


def _remember(cache: dict, key: Any, value: Any) -> None:
    if len(cache) >= CACHE_SIZE:
        cache.clear()
    cache[key] = value


def array_of(head: bytes, buffers: Sequence[Any]) -> Any:
    """``pickle.loads(head, buffers=buffers)``, faster for a known array head with one buffer.

    Returns what pickle returns (a read-only view of a bytes frame for a numpy array); raises
    what pickle raises."""
    key = _key(head, buffers)
    if key is not None:
        meta = _HEADS.get(key)
        if meta is not None:
            dtype, shape, order, readonly = meta
            arr = np.frombuffer(buffers[0], dtype=dtype).reshape(shape, order=order)
            if readonly and arr.flags.writeable:
                arr.flags.writeable = False
            return arr
    value = pickle.loads(head, buffers=buffers)
    if key is not None and type(value) is np.ndarray:
        _learn(key, value, buffers[0])
    return value


def _key(head: Any, buffers: Sequence[Any]) -> Optional[bytes]:
    """``head`` as a cache key, or None where no array head can be (an array's head is ~100-200
    bytes; the head of any other value may be large: it is never copied or hashed)."""
    if len(buffers) != 1 or len(head) > MAX_HEAD:
        return None
    return head if type(head) is bytes else bytes(head)


def array_meta(head: bytes, nbytes: int) -> Any:
    """The value of ``head`` with a blank data frame of ``nbytes`` (for its dtype and shape:
    nothing is read from the frame); raises what pickle raises."""
    key = _key(head, [None])
    meta = None if key is None else _HEADS.get(key)
    if meta is not None:
        dtype, shape, order, _ = meta
        return np.empty(shape, dtype=dtype, order=order)
    return array_of(head, [np.empty(nbytes, np.uint8)])


def _learn(head: bytes, arr: np.ndarray, frame: Any) -> None:
    """Remember ``head`` if ``arr`` (its value) is a plain view of all of ``frame``."""
    try:
        data = np.frombuffer(frame, dtype=np.uint8)
    except (TypeError, ValueError):
        return
    if arr.dtype.hasobject or arr.nbytes != data.nbytes or arr.nbytes == 0:
        return
    if arr.__array_interface__["data"][0] != data.__array_interface__["data"][0]:
        return
    order = _order(arr)
    if order is None:
        return
    try:        # (the head makes its buffer read-only: pickle's READONLY_BUFFER opcode)
        readonly = any(op.name == "READONLY_BUFFER" for op, _, _ in pickletools.genops(head))
    except Exception:   # (not a pickle stream pickletools can walk: do not remember it)
        return
    _remember(_HEADS, head, (arr.dtype, arr.shape, order, readonly))


def _order(arr: np.ndarray) -> Optional[str]:
    """The order pickle records for a contiguous array ("C" wins for one both ways), or None."""
    if arr.flags.c_contiguous:
        return "C"
    if arr.flags.f_contiguous:
        return "F"
    return None


def array_frames(arr: np.ndarray, copy: bool = False) -> Optional[list]:
    """The frames pickle protocol 5 gives a plain contiguous numeric array (head, data), or None
    for any other value (the caller pickles it).  ``copy``: the data frame is a copy (bytes),
    else a view of ``arr``'s memory."""
    if type(arr) is not np.ndarray or arr.dtype.hasobject or arr.nbytes == 0 \
            or arr.dtype.fields is not None:
        return None
    order = _order(arr)
    if order is None:
        return None
    key = (arr.dtype, arr.shape, order, arr.flags.writeable)
    head = _MADE.get(key)
    if head is None:
        buffers: list = []
        head = pickle.dumps(arr, protocol=5, buffer_callback=buffers.append)
        if len(buffers) != 1:
            return None
        _remember(_MADE, key, head)
    raw = pickle.PickleBuffer(arr).raw()
    return [head, raw.tobytes() if copy else raw]
