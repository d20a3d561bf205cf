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
from typing import Optional, Sequence

from .events import Outbox
from .ids import origin_rank
from .protocol import (DirAdd, DirCheck, DirDelete, DirLookup, DirPartial, DirPull, DirReply, DirSender,
                       Free, ObjectInfo, ObjectLost)

# automatically freed ids a shard remembers (see DirectoryShard.delete): a copy registered late
# races with the free by one message flight, so this is ample; ~80 bytes each, per shard
FREED_MEMORY = 1 << 14


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
    pulling: list[int] = field(default_factory=list)  # ranks with a pending DirPull
    partial: dict = field(default_factory=dict)       # rank receiving/producing -> its sender (or None)
    downstream: dict = field(default_factory=dict)    # rank -> receivers it currently feeds
    readers: set = field(default_factory=set)         # ranks given the inline value (they cache it)
    maker: Optional[int] = None                       # (unregistered) the rank that made it (DirCheck)


class DirectoryShard:
    """The entries of one shard held by this rank."""

    def __init__(self, rank: int, hosts: Optional[Sequence] = None) -> None:
        """``hosts[r]``: the host of rank ``r`` (any hashable; None: all on one host).  A
        receiver is then given a sender on its own host when one has a copy (issue 13: one
        crossing per host pair, as hierarchical MPI collectives do)."""
        self.rank = rank
        self.hosts = list(hosts) if hosts is not None and len(set(hosts)) > 1 else None
        self._entries: dict[int, _Entry] = {}
        self._deleted: set[int] = set()             # deleted by the user: answered for ever
        self._freed: set[int] = set()               # freed automatically: remembered a while
        self._freed_order: deque = deque()
        self._dead: set[int] = set()                # ranks lost (see rank_lost)

    def __len__(self) -> int:
        return sum(1 for e in self._entries.values() if e.info is not None)

    def info(self, object_id: int) -> ObjectInfo | None:
        entry = self._entries.get(object_id)
        return entry.info if entry else None

    def busy(self) -> list[tuple[int, Optional[tuple], list, list, dict]]:
        """(diagnostics) ``(object_id, holders or None, ranks waiting for a lookup, ranks waiting
        for a sender, partial copies {rank: sender})`` of every entry someone waits on or that
        has partial copies: copies of the shard's tables, read-only."""
        return [(oid, e.info.holders if e.info is not None else None, list(e.waiting),
                 list(e.pulling), dict(e.partial))
                for oid, e in list(self._entries.items()) if e.waiting or e.pulling or e.partial]

    def handle(self, source: int, msg: object) -> Outbox:
        """Apply one message received from ``source``; return the messages to send."""
        if isinstance(msg, DirAdd):
            return self.add(msg.info)
        if isinstance(msg, DirLookup):
            return self.lookup(msg.object_id, msg.requester)
        if isinstance(msg, DirPull):
            return self.pull(msg.object_id, msg.requester)
        if isinstance(msg, DirPartial):
            return self.partial(msg.info, msg.rank)
        if isinstance(msg, DirDelete):
            return self.delete(msg.object_id, msg.permanent)
        if isinstance(msg, DirCheck):
            return self.check(msg.object_id, msg.maker)
        raise TypeError(f"not a directory message: {msg!r}")

    def add(self, info: ObjectInfo) -> Outbox:
        """A rank holds ``info.object_id`` (its ``holders``); answer every waiting lookup."""
        oid = info.object_id
        if oid in self._deleted or oid in self._freed:  # a copy registered after the delete: free it
            return [(holder, Free(oid)) for holder in info.holders]
        entry = self._entries.setdefault(oid, _Entry())
        lost = entry.info is not None and entry.info.error and not entry.info.holders
        if entry.info is None or (not entry.info.holders and entry.info.inline is None) or (
                lost and info.inline is None and info.holders):
            # the first complete copy (a partial one announced less); a copy that re-registers
            # after rank 0 declared the object lost with its known holder also replaces that
            entry.info = info
        else:
            holders = entry.info.holders + tuple(h for h in info.holders if h not in entry.info.holders)
            entry.info = replace(entry.info, holders=holders)
        for holder in info.holders:   # a receiver finished: its sender is free for another one
            sender = entry.partial.pop(holder, None)
            if sender is not None:
                self._feeds(entry, sender, -1)
        return self._answer(oid, entry)

    def _answer(self, oid: int, entry: _Entry) -> Outbox:
        waiting, entry.waiting = entry.waiting, []
        if waiting and entry.info.inline is not None:
            entry.readers.update(waiting)
        out: Outbox = [(rank, DirReply(oid, entry.info)) for rank in waiting]
        pulling, entry.pulling = entry.pulling, []
        for rank in pulling:
            out += self.pull(oid, rank)
        return out

    @staticmethod
    def _feeds(entry: _Entry, rank: int, delta: int) -> None:
        count = entry.downstream.get(rank, 0) + delta
        if count > 0:
            entry.downstream[rank] = count
        else:
            entry.downstream.pop(rank, None)

    def partial(self, info: ObjectInfo, rank: int) -> Outbox:
        """``rank`` is producing the object; it exists (partially) from now on."""
        oid = info.object_id
        if oid in self._deleted or oid in self._freed:
            return [(rank, Free(oid))]
        entry = self._entries.setdefault(oid, _Entry())
        if entry.info is None:
            entry.info = replace(info, holders=())
        entry.partial.setdefault(rank, None)
        pulling, entry.pulling = entry.pulling, []     # lookups wait for a complete copy
        out: Outbox = []
        for requester in pulling:
            out += self.pull(oid, requester)
        return out

    def _depth(self, entry: _Entry, rank: int) -> int:
        depth, seen = 0, set()
        while rank in entry.partial and rank not in seen:
            seen.add(rank)
            sender = entry.partial[rank]
            if sender is None:
                break
            rank, depth = sender, depth + 1
        return depth + (1 if rank in entry.partial else 0)

    @staticmethod
    def _fed_by(entry: _Entry, rank: int, source: int) -> bool:
        """Whether ``rank``'s chain of senders reaches ``source`` (a receiver asking again after
        its sender died must not be placed on a rank it feeds: neither would ever progress)."""
        seen = set()
        while rank in entry.partial and rank not in seen:
            seen.add(rank)
            rank = entry.partial[rank]
            if rank == source:
                return True
        return False

    def pull(self, object_id: int, requester: int) -> Outbox:
        """Choose a sender for ``requester`` once the object exists (Hoplite's receiver-driven
        broadcast): among complete and partial copies that feed nobody yet (chain tails), the
        one closest to a complete copy; complete copies first.  Inline objects need no sender."""
        if requester in self._dead:
            # (rank 0 pulls for broadcast targets; one that died meanwhile must not become a
            # partial copy, the sender of later receivers for ever: simulation seed 5022)
            return []
        if object_id in self._deleted:
            return [(requester, DirSender(object_id, None))]
        entry = self._entries.setdefault(object_id, _Entry())
        info = entry.info
        if info is None:
            entry.pulling.append(requester)
            return self._orphan(object_id)
        if info.inline is not None:
            entry.readers.add(requester)
            return [(requester, DirSender(object_id, info))]
        if requester in info.holders:              # it has a complete copy already
            return [(requester, DirSender(object_id, replace(info, holders=(requester,))))]
        old = entry.partial.pop(requester, None)   # asked again (its sender failed): re-place it
        if old is not None:
            self._feeds(entry, old, -1)
        candidates = [h for h in info.holders if h != requester] + \
                     [r for r in entry.partial if r != requester
                      and not self._fed_by(entry, r, requester)]
        if not candidates:
            if requester in info.holders:
                return [(requester, DirSender(object_id, replace(info, holders=(requester,))))]
            entry.pulling.append(requester)   # only the requester itself had it: wait
            return []
        hosts = self.hosts
        if hosts is None:
            sender = min(candidates, key=lambda r: (entry.downstream.get(r, 0) > 0,
                                                    self._depth(entry, r), entry.downstream.get(r, 0)))
        else:
            # a copy on the receiver's host first (a second reader of a local copy costs memory
            # bandwidth; a chain that crosses to another host and back costs two link transfers)
            mine = hosts[requester] if requester < len(hosts) else None
            sender = min(candidates, key=lambda r: (
                r >= len(hosts) or hosts[r] != mine, entry.downstream.get(r, 0) > 0,
                self._depth(entry, r), entry.downstream.get(r, 0)))
        entry.partial[requester] = sender
        self._feeds(entry, sender, +1)
        return [(requester, DirSender(object_id, replace(info, holders=(sender,))))]

    def lookup(self, object_id: int, requester: int) -> Outbox:
        """Answer at once if the object is known (or deleted), else when it is added."""
        if object_id in self._deleted:
            return [(requester, DirReply(object_id, None))]
        entry = self._entries.setdefault(object_id, _Entry())
        info = entry.info
        if info is not None and (info.holders or info.inline is not None):
            if info.inline is not None:
                entry.readers.add(requester)
            return [(requester, DirReply(object_id, info))]
        entry.waiting.append(requester)   # not yet, or only being produced: wait for a copy
        return self._orphan(object_id) if info is None else []

    def _orphan(self, object_id: int) -> Outbox:
        """An object never registered here whose id's rank (the only one that could have made
        it: a put there, or a task it submitted) is dead: rank 0 decides (a task it knows may
        still make it; else the object becomes an ObjectLostError value, answering the waiters)."""
        origin = origin_rank(object_id)
        return [(0, ObjectLost(object_id, origin))] if origin in self._dead else []

    def check(self, object_id: int, maker: int) -> Outbox:
        """Rank 0 says ``maker`` made the object and died (:class:`DirCheck`).  Never registered
        here (its ``DirAdd`` died with the maker): ``ObjectLost`` to rank 0 now if this shard has
        seen ``maker`` die, else when it does (:meth:`rank_lost`).  Registered but without a
        complete copy left: ``ObjectLost`` again (rank 0 ignores it while a re-run is pending).
        A registered copy, a deleted or freed object: nothing."""
        if object_id in self._deleted or object_id in self._freed:
            return []
        entry = self._entries.setdefault(object_id, _Entry())
        info = entry.info
        if info is not None:
            # registered: a live copy, or a lost one already reported by rank_lost; that report
            # can reach rank 0 before the maker's TaskDone (which then made it look alive, a
            # retry skipped: simulation seed 51205), so a copyless object is reported again
            if info.holders or info.inline is not None or info.error:
                return []
            return [(0, ObjectLost(object_id, maker))]
        if maker in self._dead:
            return [(0, ObjectLost(object_id, maker))]
        entry.maker = maker
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
        out += [(rank, DirSender(object_id, None)) for rank in entry.pulling]
        if entry.info is not None:
            # holders drop their copies; ranks that read a small value drop their cached copy
            holders = set(entry.info.holders) | set(entry.partial) | entry.readers
            out += [(holder, Free(object_id)) for holder in sorted(holders)]
        return out

    def remove_holder(self, object_id: int, rank: int) -> Outbox:
        """``rank`` no longer holds the object (freed or dead)."""
        entry = self._entries.get(object_id)
        if entry is not None and entry.info is not None and rank in entry.info.holders:
            entry.info = replace(entry.info, holders=tuple(h for h in entry.info.holders if h != rank))
        return []

    def rank_lost(self, rank: int, thinned: Optional[list] = None) -> list[int]:
        """``rank`` died: it holds, receives and feeds nothing any more, and waits for nothing.

        Returns the objects whose last complete copy was on ``rank`` (not inline values, which
        live in the entry itself), the objects waited for that were never registered and that
        only ``rank`` could have made (their id's rank, see :meth:`_orphan`), and those rank 0
        said ``rank`` made (:meth:`check`); their entries stay, so pulls and lookups keep waiting
        until a rebuilt copy is added (lineage) or the object is deleted.
        ``thinned`` (if given) gets the objects that lost a copy but keep others.
        Receivers fed by ``rank`` see their stream fail and ask again (:meth:`pull` re-places them).
        """
        self._dead.add(rank)
        lost = []
        for oid, entry in self._entries.items():
            if entry.info is None and (entry.maker == rank or (
                    (entry.waiting or entry.pulling) and origin_rank(oid) == rank)):
                lost.append(oid)        # (an orphan, see _orphan; or its maker died, see check)
                continue
            entry.waiting = [r for r in entry.waiting if r != rank]
            entry.pulling = [r for r in entry.pulling if r != rank]
            sender = entry.partial.pop(rank, None)
            if sender is not None:          # it was being fed: its sender feeds one fewer
                self._feeds(entry, sender, -1)
            entry.downstream.pop(rank, None)
            for receiver, sender in list(entry.partial.items()):
                if sender == rank:          # it will ask again; until then it feeds from nobody
                    entry.partial[receiver] = None
            info = entry.info
            if info is not None and rank in info.holders:
                holders = tuple(h for h in info.holders if h != rank)
                entry.info = replace(info, holders=holders)
                if not holders and info.inline is None:
                    lost.append(oid)
                elif thinned is not None and info.inline is None:
                    thinned.append(oid)     # copies left, one fewer
        return lost
