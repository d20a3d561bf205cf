"""What this rank knows about objects: small values it holds or read (the cache of inline
values), ids it saw deleted, and its own new objects (``put``, published to their shard).

Thread rule: the engine thread owns the catalog, with two documented exceptions: ``put`` (any
thread) records a new small value before the engine publishes it, and ``Freeing.delete`` (any
thread) marks ids deleted at once, so that the caller's next ``get`` on this rank sees it.  Both
are single dict/set operations (atomic in CPython); readers from other threads (``local_frames``)
only read.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from ..protocol import ObjectInfo
from ..serialization import frame_sizes, to_bytes
from ..store import DELETED

HEAD_MAX = 4096   # frame 0 of a chunked object travels in its ObjectInfo up to this size


class Catalog:
    """Small values and deletions known here; :meth:`info`/:meth:`local_frames` answer for any
    object from what this rank has (on rank 0 also from the scheduler's table, ``authority``)."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.known: dict[int, ObjectInfo] = {}     # small values put or read here; objects put here
        self.deleted: set[int] = set()             # ids deleted with hm.delete
        self.authority: Callable[[int], Optional[ObjectInfo]] = lambda oid: None

    def info(self, object_id: int) -> Optional[ObjectInfo]:
        info = self.known.get(object_id)
        if info is None:
            info = self.authority(object_id)
        return info

    def local_frames(self, object_id: int) -> Any:
        """Frames of the object if this rank has them complete or inline, ``DELETED`` if it was
        deleted, else None.  Safe from any thread (reads only)."""
        if object_id in self.deleted:
            return DELETED
        entry = self.ctx.store.get(object_id)
        if entry is not None and entry.complete:
            return entry.frames
        info = self.info(object_id)
        if info is not None and info.inline is not None:
            return info
        return None

    def describe(self, object_id: int, frames: list, holder: int,
                 inline_threshold: Optional[int] = None) -> ObjectInfo:
        """ObjectInfo of a serialized value held by ``holder`` (inline when at most
        ``inline_threshold`` bytes, default ``Config.inline_threshold``)."""
        sizes = frame_sizes(frames)
        limit = self.ctx.config.inline_threshold if inline_threshold is None else inline_threshold
        if sum(sizes) <= limit:
            return ObjectInfo(object_id, sizes, (holder,), to_bytes(frames))
        head = bytes(frames[0]) if sizes[0] <= HEAD_MAX else None
        return ObjectInfo(object_id, sizes, (holder,), head=head)

    def head_of(self, oid: int) -> Optional[bytes]:
        """Frame 0 of a held object, if small enough to travel in its ObjectInfo."""
        entry = self.ctx.store.get(oid)
        if entry is None or entry.sizes[0] > HEAD_MAX:
            return None
        return bytes(entry.frames[0])

    def remember(self, info: Optional[ObjectInfo], object_id: int) -> None:
        """Keep what a directory answer says: the value (inline) or that the object was deleted."""
        if info is None:
            self.deleted.add(object_id)
        elif info.inline is not None:
            self.known[object_id] = info

    def forget(self, object_id: int) -> None:
        """Drop a cached small value (freed or deleted)."""
        self.known.pop(object_id, None)

    # --- new objects -------------------------------------------------------------------------

    def put(self, frames: list, object_id: Optional[int] = None) -> int:
        """(any thread) Store a serialized value as a new object on this rank; returns its id."""
        ctx = self.ctx
        oid = ctx.ids.next() if object_id is None else object_id
        info = self.describe(oid, frames, ctx.rank)
        # (known at once to this thread, chunked ones too: a reduce right after a put checks
        # the input's dtype from it at call time, before the engine has stored the frames)
        self.known[oid] = info
        if info.inline is None:
            ctx.call_soon(ctx.store.put, oid, frames)
        ctx.call_soon(self.published, info)
        return oid

    def published(self, info: ObjectInfo) -> None:
        ctx = self.ctx
        ctx.publish(info)
        ctx.server.serve_deferred(info.object_id)
        if ctx.driver is not None:
            ctx.driver.object_known(info)
