"""Broadcast fetches: make every target rank hold a complete copy of an object.

The driver sends each target a ``Fetch`` and, in the same step, a ``DirPull`` on its behalf to the
object's shard, so the shard and the target wake up together; each target pulls through the
shard's chain of (partial) copies, so the copies form a pipelined tree built at run time (Hoplite
§3.3), and answers ``Fetched``.  A small (inline) value known to the broadcasting rank travels in
the ``Fetch`` itself (``Config.small_collectives``): the target keeps it and answers at once.  A
one-chunk object held here is pulled from here at once (``Fetch.sender``,
``Config.broadcast_direct``).  Replicas (``Config.replication``) are made the same way, with
``REPLICA_TOKEN``.

Timeline (hoplite_mpi/tracing.py): the broadcasting rank records each broadcast, and each target
each copy it made for a ``Fetch`` (which object, from which rank, bytes and chunks received), as
"collective" events.
"""
from __future__ import annotations

import bisect
import time
from typing import Any, Callable, Optional

from .. import faults
from .. import protocol as P
from .. import tracing as timeline
from ..context import Loss
from ..errors import TransferError
from ..ids import format_id, shard_of
from ..protocol import ObjectInfo
from ..serialization import rebuild_error
from ..store import DELETED, chunk_ends, object_plan, one_chunk_per_frame


class Broadcasts:
    """Broadcasts this rank started: ``token -> (targets remaining, errors, done callback)``."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.running: dict[int, tuple] = {}

    def start(self, object_id: int, ranks: list[int], done: Callable[[dict], None]) -> None:
        """Make every rank of ``ranks`` hold a complete copy; ``done({rank: error})`` after.
        Dead ranks are skipped (and a target that dies meanwhile is no longer waited for)."""
        ctx = self.ctx
        ranks = [r for r in ranks if r not in ctx.dead]
        token = ctx.ids.next()
        if timeline.recorder is not None:
            done = self._traced_broadcast(object_id, len(ranks), done)
        self.running[token] = (set(ranks), {}, done)
        shard = ctx.shard_ranks(object_id)[0]
        # a small value known here goes to each target in the Fetch itself: one message out and
        # one answer, no directory hop (Config.small_collectives)
        info = ctx.catalog.info(object_id) if ctx.config.small_collectives else None
        small = info if (info is not None and info.inline is not None
                         and object_id not in ctx.catalog.deleted) else None   # (deleted: the old way answers)
        direct = self._direct(object_id) if small is None else None
        for rank in ranks:
            if rank == ctx.rank:
                self.on_fetch(ctx.rank, P.Fetch(object_id, token))
            elif small is not None:
                ctx.send(rank, P.Fetch(object_id, token, info=small))
            elif direct is not None:
                ctx.send(rank, P.Fetch(object_id, token, sender=direct))
            else:
                # The DirPull goes out from here together with the Fetch: the shard and the
                # target wake up at the same time instead of one after the other (an idle rank
                # polls only every backoff_max seconds).
                ctx.send(shard, P.DirPull(object_id, rank))
                ctx.send(rank, P.Fetch(object_id, token, pulled=True))
        if not ranks:
            self.on_fetched(ctx.rank, P.Fetched(token, ctx.rank))

    def _direct(self, object_id: int) -> Optional[ObjectInfo]:
        """(``Config.broadcast_direct``) This rank's complete copy, as the sender every target
        pulls from at once, if the object is one chunk per frame: a chain of copies cannot
        pipeline it (each hop forwards it whole), and no directory hop comes before the pulls.
        None: the targets ask the directory (chains of partial copies, Hoplite §3.3)."""
        ctx = self.ctx
        if not ctx.config.broadcast_direct or object_id in ctx.catalog.deleted:
            return None
        entry = ctx.store.get(object_id)
        if entry is None or not entry.complete or not one_chunk_per_frame(entry.sizes, ctx.config):
            return None
        return ObjectInfo(object_id, entry.sizes, (ctx.rank,), head=ctx.catalog.head_of(object_id))

    def on_fetch(self, source: int, msg: P.Fetch) -> None:
        """(target) Get a copy, then answer ``Fetched`` (with an error text if it failed)."""
        ctx = self.ctx
        if msg.token == P.REPLICA_TOKEN:
            faults.reached("replica")
        traced = self._traced_copy(source, msg) if timeline.recorder is not None else None

        def reply(got: Any) -> None:
            if traced is not None:
                traced(got)
            error = "deleted" if got is DELETED else None
            if isinstance(got, ObjectInfo) and got.error:
                exc = rebuild_error(got.inline)     # (an error object is a value: held fine)
                if isinstance(exc, TransferError):  # (but the copy itself failed)
                    error = repr(exc)
            ctx.send(source, P.Fetched(msg.token, ctx.rank, error))
        oid = msg.object_id
        if msg.info is not None:            # the value itself: keep it (the cache of small values)
            ctx.catalog.remember(msg.info, oid)
            reply(msg.info)
            return
        if msg.sender is not None and msg.sender.holders[0] not in ctx.dead \
                and ctx.catalog.local_frames(oid) is None and ctx.store.get(oid) is None \
                and oid not in ctx.fetcher.fetching:
            ctx.fetcher.pull_direct(msg.sender, reply)   # (a broadcast of a one-chunk object)
            return
        # (unless a rank of the object's shard is dead here: the driver's DirPull may have gone to
        # it, and this rank may have re-sent its pending requests already, before this Fetch came;
        # simulation seed 1709)
        if msg.pulled and ctx.catalog.local_frames(oid) is None and ctx.store.get(oid) is None \
                and not ctx.dead.intersection(ctx.shards[shard_of(oid, len(ctx.shards))]):
            # our DirPull was sent by the driver: wait for the shard's answer (it may be here)
            ctx.fetcher.await_sender(oid, reply)
            return
        ctx.fetcher.fetch(oid, reply)

    # --- timeline ----------------------------------------------------------------------------

    def _traced_broadcast(self, object_id: int, targets: int, done: Callable) -> Callable:
        """``done`` that first records the broadcast (from now on) as a "collective" event."""
        began = time.perf_counter()

        def traced(errors: dict) -> None:
            rec = timeline.recorder
            if rec is not None:
                rec.complete(f"broadcast {format_id(object_id)}", "collective", began,
                             time.perf_counter(), {"object": format_id(object_id),
                                                   "targets": targets, "errors": len(errors)},
                             tid="collectives")
            done(errors)
        return traced

    def _traced_copy(self, source: int, msg: P.Fetch) -> Callable[[Any], None]:
        """A callback for the outcome of ``msg`` (this rank's copy) that records it as a
        "collective" event from now on: the object, the rank that asked (``root``), the one it
        was received from (``peer``, the last sender if a pull resumed elsewhere; None if nothing
        was pulled), ``path`` (``held``: here already; ``inline``: the value came in the Fetch;
        ``direct``: pulled from the sender the Fetch named; ``directory``: from the sender the
        shard named), and the bytes and chunks received (those not held here at the start)."""
        ctx, oid = self.ctx, msg.object_id
        began = time.perf_counter()
        entry = ctx.store.get(oid)
        held = entry.progress if entry is not None else 0
        local = ctx.catalog.local_frames(oid)
        if msg.info is not None:
            path = "inline"
        elif local is not None and local is not DELETED:
            path = "held"
        else:
            path = "direct" if msg.sender is not None else "directory"
        what = "replica" if msg.token == P.REPLICA_TOKEN else "broadcast"

        def traced(got: Any) -> None:
            rec = timeline.recorder
            if rec is None:
                return
            peer = ctx.fetcher.sender_of(oid) if path not in ("held", "inline") else None
            now = ctx.store.get(oid)
            nbytes = chunks = 0
            failed = got is DELETED or (isinstance(got, ObjectInfo) and bool(got.error))
            if now is not None and not failed and not isinstance(got, ObjectInfo):   # (frames)
                ends = chunk_ends(object_plan(now.sizes, ctx.config))
                nbytes = now.nbytes - held
                chunks = len(ends) - bisect.bisect_right(ends, held)
            rec.complete(f"{what} copy {format_id(oid)}", "collective", began, time.perf_counter(),
                         {"object": format_id(oid), "root": source, "peer": peer, "path": path,
                          "bytes": nbytes, "chunks": chunks, "error": failed},
                         tid="collectives")
        return traced

    def on_fetched(self, source: int, msg: P.Fetched) -> None:
        if msg.token == P.REPLICA_TOKEN:   # a background replica is complete (it registered itself)
            return
        state = self.running.get(msg.token)
        if state is None:
            if self.ctx.coordinator is not None:   # an allreduce's copies
                self.ctx.coordinator.fetched(msg)
            return
        remaining, errors, done = state
        remaining.discard(msg.rank)
        if msg.error:
            errors[msg.rank] = msg.error
        if not remaining:
            del self.running[msg.token]
            done(errors)

    def rank_lost(self, loss: Loss) -> None:
        """A dead target needs nothing."""
        for token, (remaining, errors, done) in list(self.running.items()):
            if loss.rank in remaining:
                self.on_fetched(loss.rank, P.Fetched(token, loss.rank))
