"""Freeing objects: ``hm.delete`` (permanent: later reads raise ObjectDeletedError), automatic
freeing of objects no ref points to any more (the scheduler's reference counts), and ``Free``
(a shard tells a holder to drop its copy)."""
from __future__ import annotations

from typing import Any

from .. import protocol as P


class Freeing:
    """Stateless: acts on the store, the catalog, the server, the shard and the driver."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    def delete(self, object_ids: list[int]) -> None:
        """(any thread) Free objects everywhere.  Later fetches raise ObjectDeletedError."""
        self.ctx.catalog.deleted.update(object_ids)   # visible to this rank's readers at once
        self.ctx.call_soon(self.free, list(object_ids))

    def free(self, object_ids: list[int], permanent: bool = True) -> None:
        """(engine) Free objects here and tell their shards (which tell the holders).

        ``permanent``: ``hm.delete`` (tombstones answer later lookups); otherwise automatic
        freeing of objects no ref points to any more (no tombstone kept)."""
        ctx = self.ctx
        driver = ctx.driver
        for oid in object_ids:
            ctx.server.refuse_partial(oid)
            held = ctx.store.delete(oid) is not None
            ctx.server.refuse_deferred(oid, held)
            ctx.catalog.forget(oid)
            if driver is not None:   # before any later submit is handled
                driver.freed_here(oid, permanent)
            for rank in set(ctx.shard_ranks(oid)) | ({0} if driver is None else set()):
                ctx.send(rank, P.DirDelete(oid, permanent))
            ctx.fetcher.copy_dropped(oid)    # (after the DirDelete: its shard answers 'deleted')

    def on_dir_delete(self, source: int, msg: P.DirDelete) -> None:
        ctx, oid = self.ctx, msg.object_id
        ctx.catalog.forget(oid)
        ctx.shard.on_delete(msg)
        if not msg.permanent:
            return
        ctx.catalog.deleted.add(oid)
        ctx.fetcher.deleted(oid)
        if ctx.driver is not None:
            ctx.driver.deleted_elsewhere(oid)

    def on_free(self, source: int, msg: P.Free) -> None:
        ctx = self.ctx
        ctx.server.refuse_partial(msg.object_id)
        held = ctx.store.delete(msg.object_id) is not None
        ctx.server.refuse_deferred(msg.object_id, held)
        ctx.fetcher.copy_dropped(msg.object_id)
        if ctx.driver is None:    # a cached small value (rank 0's copies are the scheduler's)
            ctx.catalog.forget(msg.object_id)
