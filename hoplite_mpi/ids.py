"""Object and task identifiers, generated locally on every rank without a round trip.

An id is a plain ``int``: ``(origin_rank << 40) | counter`` (so ~10^12 ids per rank).  A task's id
is the id of its first return object; its ``num_returns`` return ids are consecutive.
"""
from __future__ import annotations

import itertools
import threading

RANK_SHIFT = 40
_COUNTER_MASK = (1 << RANK_SHIFT) - 1


class IdGenerator:
    """Thread-safe generator of ids unique across ranks."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    def next(self, n: int = 1) -> int:
        """Return the first of ``n`` consecutive fresh ids."""
        with self._lock:
            first = next(self._counter)
            for _ in range(n - 1):
                next(self._counter)
        return (self.rank << RANK_SHIFT) | first


def origin_rank(object_id: int) -> int:
    """The rank that generated ``object_id``."""
    return object_id >> RANK_SHIFT


def format_id(object_id: int) -> str:
    """Human-readable form ``rank:counter`` used in messages and reprs."""
    return f"{object_id >> RANK_SHIFT}:{object_id & _COUNTER_MASK}"


def shard_of(object_id: int, num_shards: int) -> int:
    """Directory shard of an object: a multiplicative hash of the id, mod ``num_shards``."""
    return ((object_id * 0x9E3779B97F4A7C15) >> 17 & 0xFFFFFFFF) % num_shards
