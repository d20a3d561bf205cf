"""One shard of the object directory: a pure state machine (event in -> messages out).

The directory maps an object id to an :class:`~hoplite_mpi.protocol.ObjectInfo` (frame sizes, the
ranks holding a complete copy, the value itself for small objects).  Shard of an object:
``ids.shard_of(object_id, num_shards)``; the shard map places shard ``s`` on ``replication`` ranks.
A lookup of an object that does not exist yet waits in the shard until a holder registers it
(Hoplite: "directory lookup blocks until some rank holds the object"), so a ``get`` may be issued
before the ``put`` or the task that makes the object.

Every handler returns a list of ``(destination rank, message)``; it never does I/O.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace

from .protocol import DirAdd, DirDelete, DirLookup, DirReply, Free, ObjectInfo

Outbox = list  # list[tuple[int, object]]

FREED_MEMORY = 1 << 16   # automatically freed ids a shard remembers (see DirectoryShard.delete)


def shard_map(num_ranks: int, replication: int = 1) -> list[tuple[int, ...]]:
    """Ranks of each shard: one shard per rank; shard ``s`` lives on ``s, s+1, .. s+r-1`` (mod n).

    Raises:
        ValueError: ``replication`` is not within ``1..num_ranks``.
    """
    if not 1 <= replication <= num_ranks:
        raise ValueError(f"replication must be within 1..{num_ranks} (the number of ranks), got {replication}")
    return [tuple((s + k) % num_ranks for k in range(replication)) for s in range(num_ranks)]


@dataclass
class _Entry:
    info: ObjectInfo | None = None
    waiting: list[int] = field(default_factory=list)  # ranks with a pending lookup


class DirectoryShard:
    """The entries of one shard held by this rank."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self._entries: dict[int, _Entry] = {}
        self._deleted: set[int] = set()             # deleted by the user: answered for ever
        self._freed: set[int] = set()               # freed automatically: remembered a while
        self._freed_order: deque = deque()

    def __len__(self) -> int:
        return sum(1 for e in self._entries.values() if e.info is not None)

    def info(self, object_id: int) -> ObjectInfo | None:
        entry = self._entries.get(object_id)
        return entry.info if entry else None

    def handle(self, source: int, msg: object) -> Outbox:
        """Apply one message received from ``source``; return the messages to send."""
        if isinstance(msg, DirAdd):
            return self.add(msg.info)
        if isinstance(msg, DirLookup):
            return self.lookup(msg.object_id, msg.requester)
        if isinstance(msg, DirDelete):
            return self.delete(msg.object_id, msg.permanent)
        raise TypeError(f"not a directory message: {msg!r}")

    def add(self, info: ObjectInfo) -> Outbox:
        """A rank holds ``info.object_id`` (its ``holders``); answer every waiting lookup."""
        oid = info.object_id
        if oid in self._deleted or oid in self._freed:  # a copy registered after the delete: free it
            return [(holder, Free(oid)) for holder in info.holders]
        entry = self._entries.setdefault(oid, _Entry())
        if entry.info is None:
            entry.info = info
        else:
            holders = entry.info.holders + tuple(h for h in info.holders if h not in entry.info.holders)
            entry.info = replace(entry.info, holders=holders)
        waiting, entry.waiting = entry.waiting, []
        return [(rank, DirReply(oid, entry.info)) for rank in waiting]

    def lookup(self, object_id: int, requester: int) -> Outbox:
        """Answer at once if the object is known (or deleted), else when it is added."""
        if object_id in self._deleted:
            return [(requester, DirReply(object_id, None))]
        entry = self._entries.setdefault(object_id, _Entry())
        if entry.info is not None:
            return [(requester, DirReply(object_id, entry.info))]
        entry.waiting.append(requester)
        return []

    def delete(self, object_id: int, permanent: bool = True) -> Outbox:
        """Forget the object: holders free their copies, waiting lookups learn it was deleted.

        ``permanent=False`` (automatic freeing): the id is kept only among the last
        ``FREED_MEMORY`` freed ids, long enough to free a copy registered late, so the shard does
        not grow with the number of tasks.
        """
        if permanent:
            self._deleted.add(object_id)
        elif object_id not in self._freed:
            self._freed.add(object_id)
            self._freed_order.append(object_id)
            if len(self._freed_order) > FREED_MEMORY:
                self._freed.discard(self._freed_order.popleft())
        entry = self._entries.pop(object_id, None)
        if entry is None:
            return []
        out: Outbox = [(rank, DirReply(object_id, None)) for rank in entry.waiting]
        if entry.info is not None:
            out += [(holder, Free(object_id)) for holder in entry.info.holders]
        return out

    def remove_holder(self, object_id: int, rank: int) -> Outbox:
        """``rank`` no longer holds the object (freed or dead)."""
        entry = self._entries.get(object_id)
        if entry is not None and entry.info is not None and rank in entry.info.holders:
            entry.info = replace(entry.info, holders=tuple(h for h in entry.info.holders if h != rank))
        return []
