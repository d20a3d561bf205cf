"""What the pure state machines (:mod:`~hoplite_mpi.scheduler`, :mod:`~hoplite_mpi.collectives`,
:mod:`~hoplite_mpi.directory`) share: the form of their output and the rank-loss event.

A machine's ``handle(event)`` returns an :data:`Outbox`: ``(rank, message)`` tuples to send,
then local :class:`Instruction` s for its shell (tell them apart with ``type(item) is tuple``).
"""
from __future__ import annotations

from dataclasses import dataclass

Outbox = list   # list[tuple[int, message] | Instruction]


class Instruction:
    """A local instruction (anything in the output that is not a ``(rank, message)`` tuple)."""

    __slots__ = ()


@dataclass(slots=True)
class RankLost:
    """Rank ``rank`` died (ULFM, or declared dead).  The reduce coordinator reads only ``rank``;
    the scheduler also: ``dead``, every rank dead now; ``moved``, shard indexes whose replicas
    are all dead now (what only rank 0 knows is registered there again: small values,
    deletions; an object whose copies died with that shard is rebuilt); ``changed``, shards whose
    primary was ``rank`` (lookups waiting there are sent again).  Shard indexes are those of the
    ``shard_of`` given to the scheduler."""

    rank: int
    moved: frozenset = frozenset()
    changed: frozenset = frozenset()
    dead: frozenset = frozenset()
