"""Giving copies: answering ``Pull`` from this rank's store, complete or partial (Hoplite §3.3).

A partial copy streams the prefix it has and forwards each later chunk as it arrives (the
transport's ``available`` callback).  A pull for a copy that has not started here yet (the shard
chose this rank as a sender while its own copy was still being set up) is deferred until it
starts; a pull for an object freed here is refused (``PullRefused``), and so is one whose
expected frame sizes differ from the copy here (a bug: the receiver's chunks would not match).
"""
from __future__ import annotations

import bisect
import logging
from typing import Any

from .. import faults
from .. import protocol as P
from ..context import Loss
from ..ids import format_id
from ..store import chunk_ends, object_plan

log = logging.getLogger("hoplite_mpi")

FREED_MEMORY = 1 << 16    # freed ids remembered to refuse late pulls (a bound, not a cache)


class Server:
    """Pulls waiting for this rank's copy to start (``deferred``), ids freed here, and streams
    served from an incomplete copy (``partial``: object id -> [(rank, tag)])."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.deferred: dict[int, list] = {}    # object id -> [(source, Pull)]
        self.freed_here: set[int] = set()
        self.partial: dict[int, list] = {}

    def on_pull(self, source: int, msg: P.Pull) -> None:
        faults.reached("serve")
        ctx, oid = self.ctx, msg.object_id
        entry = ctx.store.get(oid)
        if entry is None:
            if oid in ctx.catalog.deleted or oid in self.freed_here:
                ctx.send(source, P.PullRefused(oid, msg.tag))
            else:   # we were chosen as a sender before our own copy started: serve it then
                self.deferred.setdefault(oid, []).append((source, msg))
            return
        if msg.sizes and tuple(msg.sizes) != tuple(entry.sizes):
            reason = (f"rank {ctx.rank} holds {format_id(oid)} with frame sizes {entry.sizes}, "
                      f"rank {source} expects {tuple(msg.sizes)}")
            log.error("rank %d: refused a pull (a bug, please report it): %s\n%s", ctx.rank,
                      reason, ctx.engine_state())
            ctx.send(source, P.PullRefused(oid, msg.tag, reason))
            return
        plan = object_plan(entry.sizes, ctx.config)
        ends = chunk_ends(plan)
        skip = bisect.bisect_right(ends, msg.offset)
        chunks = [memoryview(entry.frames[f]).cast("B")[a:b] for f, a, b in plan[skip:]]
        available = None
        if not entry.complete:
            def chunks_held() -> int:    # (a partial copy forwards what it has received)
                return bisect.bisect_right(ends, entry.progress) - skip
            available = chunks_held
            self.partial.setdefault(oid, []).append((source, msg.tag))
        ctx.stats["serves"] += 1
        ctx.transport.send_stream(source, msg.tag, chunks, lambda: None,
                                  lambda failure: log.warning("rank %d: send to rank %d failed: %s",
                                                              ctx.rank, failure.rank, failure.detail),
                                  available)

    def serve_deferred(self, oid: int) -> None:
        """This rank's copy of ``oid`` started: serve the pulls that waited for it."""
        for source, msg in self.deferred.pop(oid, ()):
            self.on_pull(source, msg)

    def refuse_deferred(self, oid: int, held: bool = True) -> None:
        """``oid`` was freed here: refuse pulls of it waiting for our copy, and later ones.
        (Only an object this rank ``held`` in its store, or had pulls for, is remembered: no
        pull ever comes for a small value, and remembering every freed id made a long driver's
        memory grow by ~80 bytes per task up to the bound.)"""
        deferred = self.deferred.pop(oid, ())
        if held or deferred or oid in self.ctx.fetcher.fetching:   # (a fetch here: we may be a sender)
            self.freed_here.add(oid)
            if len(self.freed_here) > FREED_MEMORY:
                self.freed_here.clear()
        for source, msg in deferred:
            self.ctx.send(source, P.PullRefused(oid, msg.tag))

    def forget_partial(self, oid: int) -> None:
        """The copy of ``oid`` here is complete (or freed): its streams need no watching."""
        self.partial.pop(oid, None)

    def abandon_partial(self, oid: int) -> None:
        """The shard answered that ``oid`` has no copy to pull any more (deleted, or an error
        object: lost with its ranks) while this rank holds an incomplete copy that nothing fills
        (its sender died): drop it and refuse the pulls it serves, so that their receivers ask
        the shard again instead of waiting for ever for chunks that will never come (found by
        the simulation, seed 126)."""
        ctx = self.ctx
        entry = ctx.store.get(oid)
        if entry is None or entry.complete or oid in ctx.fetcher.receiving:
            return
        ctx.store.delete(oid)
        self.refuse_deferred(oid)
        self.refuse_partial(oid)

    def refuse_partial(self, oid: int) -> None:
        """This rank dropped its incomplete copy of ``oid``: the streams it served from it will
        get no more chunks; stop them and refuse their pulls, so that each receiver asks the
        shard again (a new sender, or the error object of a failed reduce) instead of waiting
        for ever (simulation seed 30445: a failed reduce's partial result chain)."""
        ctx = self.ctx
        for source, tag in self.partial.pop(oid, ()):
            ctx.transport.stop_send_stream(source, ctx.transport.data_tag(tag))
            ctx.send(source, P.PullRefused(oid, tag))

    def rank_lost(self, loss: Loss) -> None:
        for oid, pulls in list(self.deferred.items()):
            self.deferred[oid] = [(src, m) for src, m in pulls if src != loss.rank]
