"""Per-rank object store: serialized frames with a progress counter, pure (no MPI).

An entry is created complete (``put``, a task's return value) or empty (``allocate``, the receiving
end of a transfer) and then filled in order; ``progress`` counts the bytes received so far, in the
order of :func:`chunk_plan`.  A partially received entry can already be read up to ``progress``
(a partial copy serves what it has and forwards chunks as they arrive, Hoplite §3.3: objects/serve.py).

State left after errors: every method either does what it says or raises ``KeyError`` and leaves
the store unchanged.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .serialization import frame_sizes


DELETED = object()   # sentinel: "this object was deleted" (returned by Runtime.local_frames)


def chunk_plan(sizes: Sequence[int], chunk_size: int) -> list[tuple[int, int, int]]:
    """Split frames of the given byte ``sizes`` into ``(frame, start, stop)`` chunks.

    Each frame is cut separately into pieces of at most ``chunk_size`` bytes; empty frames give no
    chunk.  Both ends of a transfer compute the same plan from ``sizes`` alone.
    """
    plan = []
    for i, size in enumerate(sizes):
        for start in range(0, size, chunk_size):
            plan.append((i, start, min(size, start + chunk_size)))
    return plan


ADAPTIVE_PIECES = 4             # (Config.adaptive_chunks) chunks an object is cut into at least...
ADAPTIVE_MAX = 4 << 20          # ...with chunks of at most this many bytes


def object_chunk_size(sizes: Sequence[int], chunk_size: int, adaptive: bool) -> int:
    """The chunk size of an object of frame ``sizes`` (``Config.chunk_size`` and
    ``Config.adaptive_chunks``): ``chunk_size``, or if ``adaptive`` the power of two at or above
    a quarter of the object's bytes, within ``[chunk_size, ADAPTIVE_MAX]``.  Fewer, larger
    chunks for large objects: each chunk costs a few Python events on both ends (posting, a
    completed Test, a combine call, a release), ~0.1-0.3 ms on a loaded host.  Both ends of a
    transfer compute it from ``sizes`` alone, so every rank must use the same settings."""
    if not adaptive:
        return chunk_size
    want = max(1, sum(sizes) // ADAPTIVE_PIECES)
    return max(chunk_size, min(ADAPTIVE_MAX, 1 << (want - 1).bit_length()))


def config_chunk_size(sizes: Sequence[int], config: Any) -> int:
    """:func:`object_chunk_size` of an object of frame ``sizes`` under ``config`` (a
    :class:`Config`), in bytes."""
    return object_chunk_size(sizes, config.chunk_size, config.adaptive_chunks)


def one_chunk_per_frame(sizes: Sequence[int], config: Any) -> bool:
    """Whether no frame of an object of frame ``sizes`` spans several chunks under ``config``:
    then no chain of copies can pipeline it, and a direct pull from a holder is as good
    (``Config.broadcast_direct``, ``Config.direct_args``)."""
    return bool(sizes) and max(sizes) <= config_chunk_size(sizes, config)


def object_plan(sizes: Sequence[int], config: Any) -> list[tuple[int, int, int]]:
    """:func:`chunk_plan` of an object of frame ``sizes`` under ``config`` (a :class:`Config`)."""
    return chunk_plan(sizes, config_chunk_size(sizes, config))


def chunk_ends(plan: list) -> list[int]:
    """Cumulative byte offsets at the end of each chunk of ``plan`` (for ``bisect``)."""
    ends, total = [], 0
    for _, a, b in plan:
        total += b - a
        ends.append(total)
    return ends


@dataclass
class StoreEntry:
    """One object's frames on this rank.  ``progress == nbytes`` once complete."""

    object_id: int
    frames: list
    sizes: tuple[int, ...]
    progress: int
    pooled: bool = False
    on_complete: list[Callable[["StoreEntry"], None]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)

    @property
    def complete(self) -> bool:
        return self.progress >= self.nbytes


class ObjectStore:
    """The objects held on one rank, by object id.  Used by the engine thread only."""

    POOL_BYTES = 1 << 30   # freed receive buffers kept for reuse (per rank)
    MIN_POOLED = 1 << 20   # only buffers at least this large are pooled

    def __init__(self) -> None:
        self._entries: dict[int, StoreEntry] = {}
        self.bytes_used = 0
        # Receive buffers of freed objects, by size: a fresh buffer costs a page fault per 4 KiB
        # on first touch (~10 ms per 64 MiB here); iterative jobs (SGD steps, benchmarks) move
        # objects of the same size again and again.
        self._pool: dict[int, list] = {}
        self._pool_bytes = 0

    def __contains__(self, object_id: int) -> bool:
        return object_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, object_id: int) -> StoreEntry | None:
        return self._entries.get(object_id)

    def put(self, object_id: int, frames: list) -> StoreEntry:
        """Add a complete object.  Re-adding an id that is present and complete keeps the
        existing entry.  An entry still being received (e.g. a pull whose sender died, when a
        lineage re-run then makes the object on this very rank) is completed with ``frames``:
        they are copied into its buffers, so transfers already reading or writing those buffers
        see the object's bytes, and its ``on_complete`` callbacks run.  If the sizes differ (a
        non-deterministic task), the entry is replaced and its callbacks get the new one."""
        entry = self._entries.get(object_id)
        if entry is not None:
            if not entry.complete:
                self._complete_with(entry, frames)
            return self._entries[object_id]
        sizes = frame_sizes(frames)
        entry = StoreEntry(object_id, list(frames), sizes, sum(sizes))
        self._entries[object_id] = entry
        self.bytes_used += entry.nbytes
        return entry

    def _complete_with(self, entry: StoreEntry, frames: list) -> None:
        if frame_sizes(frames) == entry.sizes:
            for dst, src in zip(entry.frames, frames):
                memoryview(dst).cast("B")[:] = memoryview(src).cast("B")
            self.advance(entry.object_id, entry.nbytes)
            return
        callbacks, entry.on_complete = entry.on_complete, []
        self.delete(entry.object_id)
        fresh = self.put(entry.object_id, frames)
        for callback in callbacks:
            callback(fresh)

    def allocate(self, object_id: int, sizes: Sequence[int]) -> StoreEntry:
        """Create an empty entry of the given frame sizes to receive into (uninitialised memory)."""
        if object_id in self._entries:
            raise KeyError(f"object {object_id} is already in the store")
        frames = [self._buffer(size) for size in sizes]
        entry = StoreEntry(object_id, frames, tuple(sizes), 0)
        entry.pooled = True   # its buffers may be reused once it is deleted
        self._entries[object_id] = entry
        self.bytes_used += entry.nbytes
        return entry

    def advance(self, object_id: int, nbytes: int) -> bool:
        """Record ``nbytes`` more received bytes; run and clear ``on_complete`` callbacks when the
        entry becomes complete.  Returns whether it is complete."""
        entry = self._entries[object_id]
        entry.progress = min(entry.nbytes, entry.progress + nbytes)
        if entry.complete:
            callbacks, entry.on_complete = entry.on_complete, []
            for callback in callbacks:
                callback(entry)
            return True
        return False

    def delete(self, object_id: int) -> StoreEntry | None:
        """Drop an object (a transfer still sending from it keeps its own reference to the frames)."""
        entry = self._entries.pop(object_id, None)
        if entry is not None:
            self.bytes_used -= entry.nbytes
            if getattr(entry, "pooled", False):
                self._recycle(entry)
        return entry

    def buffer(self, size: int) -> np.ndarray:
        """An uninitialised uint8 buffer of ``size`` bytes, from the pool when one is free."""
        return self._buffer(size)

    def give_back(self, buffers: list) -> None:
        """Return scratch buffers (from :meth:`buffer`) to the pool if nobody else uses them."""
        entry = StoreEntry(-1, list(buffers), (), 0)
        buffers.clear()
        self._recycle(entry)

    def _buffer(self, size: int) -> np.ndarray:
        free = self._pool.get(size)
        if free:
            self._pool_bytes -= size
            return free.pop()
        return np.empty(size, dtype=np.uint8)

    def _recycle(self, entry: "StoreEntry") -> None:
        frames, entry.frames = entry.frames, []
        for frame in frames:
            # reuse only a buffer nobody else sees: no value handed out (get returns zero-copy
            # views), no transfer in flight (those hold memoryviews of it)
            if (frame.nbytes >= self.MIN_POOLED and sys.getrefcount(frame) <= 3
                    and self._pool_bytes + frame.nbytes <= self.POOL_BYTES):
                self._pool.setdefault(frame.nbytes, []).append(frame)
                self._pool_bytes += frame.nbytes
        del frames

    def ids(self) -> list[int]:
        return list(self._entries)
