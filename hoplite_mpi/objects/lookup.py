"""Directory lookups of this rank: ``DirLookup`` to an object's shard, ``DirReply`` back.

A lookup of an object that does not exist yet waits in the shard until a holder registers it, so
a callback may run much later (or never, if the object is never made).  Concurrent lookups of one
object share one request.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from .. import protocol as P
from ..context import Loss
from ..ids import shard_of
from ..protocol import ObjectInfo


class Lookups:
    """Outstanding lookups of this rank (``object id -> callbacks``)."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.waiting: dict[int, list[Callable]] = {}

    def lookup(self, object_id: int, callback: Callable[[Optional[ObjectInfo]], None]) -> None:
        """Ask the object's shard for its info; ``callback(info | None)`` (None: deleted)."""
        waiting = self.waiting.get(object_id)
        if waiting is not None:
            waiting.append(callback)
            return
        self.waiting[object_id] = [callback]
        self.ctx.send(self.ctx.shard_ranks(object_id)[0], P.DirLookup(object_id, self.ctx.rank))

    def on_reply(self, source: int, msg: P.DirReply) -> None:
        ctx = self.ctx
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
                self.ctx.send(self.ctx.shard_ranks(oid)[0], P.DirLookup(oid, self.ctx.rank))
