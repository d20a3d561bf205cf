"""Directory lookups of this rank: ``DirLookup`` to an object's shard, ``DirReply`` back.

A lookup of an object that does not exist yet waits in the shard until a holder registers it, so
a callback may run much later (or never, if the object is never made).  Concurrent lookups of one
object share one request.  While the timeline records (hoplite_mpi/tracing.py), each request
is a "directory" event from the DirLookup to its DirReply.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

from .. import protocol as P
from .. import tracing as timeline
from ..context import Loss
from ..ids import format_id, shard_of
from ..protocol import ObjectInfo


class Lookups:
    """Outstanding lookups of this rank (``object id -> callbacks``)."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.waiting: dict[int, list[Callable]] = {}
        self._asked: dict[int, tuple] = {}    # (timeline) object -> (DirLookup sent s, shard rank)

    def lookup(self, object_id: int, callback: Callable[[Optional[ObjectInfo]], None]) -> None:
        """Ask the object's shard for its info; ``callback(info | None)`` (None: deleted)."""
        waiting = self.waiting.get(object_id)
        if waiting is not None:
            waiting.append(callback)
            return
        self.waiting[object_id] = [callback]
        self._ask(object_id)

    def _ask(self, object_id: int) -> None:
        """Send the DirLookup of ``object_id`` to its shard's primary."""
        shard = self.ctx.shard_ranks(object_id)[0]
        if timeline.recorder is not None:
            self._asked[object_id] = (time.perf_counter(), shard)
        self.ctx.send(shard, P.DirLookup(object_id, self.ctx.rank))

    def on_reply(self, source: int, msg: P.DirReply) -> None:
        ctx = self.ctx
        if timeline.recorder is not None:
            self._trace(msg)
        ctx.catalog.remember(msg.info, msg.object_id)
        if ctx.driver is not None:
            ctx.driver.looked_up(msg.object_id, msg.info)
        for callback in self.waiting.pop(msg.object_id, ()):
            callback(msg.info)

    def rank_lost(self, loss: Loss) -> None:
        """Lookups that waited at a dead shard primary go to the shard's next rank."""
        n = len(self.ctx.shards)
        for oid in list(self.waiting):
            if shard_of(oid, n) in loss.changed:
                self._ask(oid)

    def _trace(self, msg: P.DirReply) -> None:
        """Record the lookup ``msg`` answers as a "directory" event: the object, the shard rank
        asked, the answer ("holders" with their ranks, "inline" (a value), "none": deleted) and
        whether the object is an error object."""
        asked = self._asked.pop(msg.object_id, None)
        rec = timeline.recorder
        if asked is None or rec is None:
            return
        start, shard = asked
        info = msg.info
        args = {"object": format_id(msg.object_id), "shard": shard,
                "answer": "none" if info is None else "inline" if info.inline is not None else "holders"}
        if info is not None:
            args["holders"] = list(info.holders)
            args["error"] = bool(info.error)
        rec.complete(f"DirLookup {format_id(msg.object_id)}", "directory", start,
                     time.perf_counter(), args, tid="directory")
