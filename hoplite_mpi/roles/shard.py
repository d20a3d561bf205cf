"""The directory shard role of a rank: the shell around the pure
:class:`~hoplite_mpi.directory.DirectoryShard` (``DirAdd``/``DirLookup``/``DirPull``/
``DirPartial``/``DirDelete``/``DirCheck``), background replication of chunked objects, and rebuilding shards
after a rank loss."""
from __future__ import annotations

from typing import Any

from .. import faults
from .. import protocol as P
from ..context import Loss
from ..directory import DirectoryShard
from ..ids import shard_of

REPLICATED_MEMORY = 1 << 16     # ids whose replicas were requested (a bound: see _replicate)


class ShardRole:
    """``directory``: this rank's entries; ``want``: copies wanted per object when not
    ``Config.replication``; ``replicated``: objects whose replicas were requested (primary)."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.directory = DirectoryShard(ctx.rank, getattr(ctx.transport, "hosts", None)
                                        if ctx.config.host_aware else None)
        self.replicated: set[int] = set()
        self.want: dict[int, int] = {}

    def on_message(self, source: int, msg: Any) -> None:
        """DirAdd, DirLookup, DirPull, DirPartial, DirCheck."""
        ctx = self.ctx
        add = type(msg) is P.DirAdd
        if add:
            faults.reached("dir")
        ctx.send_all(self.directory.handle(source, msg))
        if add:
            oid = msg.info.object_id
            if msg.replicas and msg.replicas != ctx.config.replication:
                self.want[oid] = msg.replicas      # (every replica of the shard keeps it)
            if self._wanted(oid) > 1 and ctx.shard_ranks(oid)[0] == ctx.rank:
                self._replicate(oid)

    def _wanted(self, oid: int) -> int:
        return self.want.get(oid, self.ctx.config.replication)

    def _replicate(self, oid: int) -> None:
        """(primary shard) Give a chunked object its missing copies (``replicas`` of its task,
        else ``Config.replication``), on the live ranks after its first holder: each is sent a
        Fetch and pulls the object like a broadcast target (relayed, in the background), then
        registers as a holder.  Also run when a holder died (copies are re-made)."""
        ctx = self.ctx
        info = self.directory.info(oid)
        if (info is None or info.inline is not None or info.error or not info.holders
                or oid in self.replicated):
            return
        self.replicated.add(oid)
        if len(self.replicated) > REPLICATED_MEMORY:
            self.replicated.clear()     # (a bound: a re-add after this only adds spare copies)
        first = info.holders[0]
        others = [(first + k) % ctx.size for k in range(1, ctx.size)]
        need = self._wanted(oid) - len(info.holders)
        for rank in [r for r in others if r not in info.holders and r not in ctx.dead][:max(0, need)]:
            ctx.stats["replicas"] += 1
            ctx.send(rank, P.Fetch(oid, P.REPLICA_TOKEN))

    def on_delete(self, msg: P.DirDelete) -> None:
        ctx, oid = self.ctx, msg.object_id
        self.replicated.discard(oid)
        self.want.pop(oid, None)
        # applied even when this rank does not know yet that it is a shard rank of ``oid``: rank
        # 0 re-sends deletions to a moved shard's new rank as soon as it sees the loss, which
        # can be before that rank does (simulation seed 70179); elsewhere a tombstone is harmless
        ctx.send_all(self.directory.delete(oid, msg.permanent))

    def rank_lost(self, loss: Loss) -> None:
        """Forget the dead rank in this rank's entries (objects left without a copy are reported
        to rank 0: ``ObjectLost``); re-register at shards that moved what this rank holds; re-make
        copies of objects that lost one (if this rank is their shard's primary now)."""
        ctx = self.ctx
        n = len(ctx.shards)
        thinned: list[int] = []
        for oid in self.directory.rank_lost(loss.rank, thinned):
            ctx.send(0, P.ObjectLost(oid, loss.rank))
        if loss.moved:
            self._register_again(loss.moved)
        for oid in thinned:     # copies to re-make (this rank is the shard's primary now)
            if self._wanted(oid) > 1 and ctx.shard_primary(shard_of(oid, n)) == ctx.rank:
                self.replicated.discard(oid)
                self._replicate(oid)

    def _register_again(self, moved: set) -> None:
        """Shards ``moved`` lost all their replicas: tell their new ranks what this rank knows
        (its complete copies, and small values put or read here: a worker's put lives only in its
        own cache and its shard, so a put whose shard died would otherwise be lost for good)."""
        ctx = self.ctx
        n = len(ctx.shards)
        catalog = ctx.catalog
        for oid in ctx.store.ids():
            entry = ctx.store.get(oid)
            if shard_of(oid, n) in moved and entry.complete and oid not in catalog.deleted:
                ctx.publish(catalog.describe(oid, entry.frames, ctx.rank))
        for oid, info in list(catalog.known.items()):
            if shard_of(oid, n) in moved and oid not in catalog.deleted:
                ctx.publish(info)
