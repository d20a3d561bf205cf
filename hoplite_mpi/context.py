"""What the components of one rank's runtime share, and the rank-loss event they all receive.

A component (``objects/*``, ``roles/*``, ``refs``) gets a :class:`Context` instead of the
runtime: the rank's identity, its engine's ``send``/``call_soon``, the store, the config, the
clock, the shard map and membership, and the other components by name (their public methods
only; no component touches another's fields).  Everything here runs on the engine thread unless
a method says otherwise.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

from .ids import shard_of
from .protocol import DirAdd


@dataclass
class Loss:
    """A rank died (ULFM) or was declared dead: what every component is told, in the order the
    runtime calls them (see :meth:`hoplite_mpi.runtime.Runtime.rank_lost`).

    ``moved``: shards whose every replica is dead now (a live rank took them over: what was
    registered there must be registered again).  ``changed``: shards whose primary was the dead
    rank (requests waiting there must be sent again)."""

    rank: int
    moved: set = field(default_factory=set)
    changed: set = field(default_factory=set)


class Context:
    """Shared by the components of one rank (see the module docstring).

    Attributes:
        rank, size, transport, clock, stats, dead (ranks lost), send, send_all, call_soon: the
            engine's (properties).  shards: the shard map (``directory.shard_map``).
        catalog, lookups, fetcher, server, broadcasts, steps, freeing, shard, refs: the components
            every rank has (the runtime reads them here too).  driver, coordinator: rank 0 only
            (else None).  tasks: ranks that run tasks (else None).  workflow: rank 0's durable
            workflow (``Config.storage``), else None.  persister: the rank's checkpoint writer,
            once it wrote one.
        rank_lost: ``rank_lost(rank)`` (the runtime's), for a component that learns of a death
            first.  engine_state: ``() -> str``, the rank's state for error logs.
    """

    def __init__(self, engine: Any, config: Any, store: Any, ids: Any, shards: list) -> None:
        self.engine = engine
        self.config = config
        self.store = store
        self.ids = ids
        self.shards = shards
        self._tags = itertools.count(1)
        self.catalog: Any = None
        self.lookups: Any = None
        self.fetcher: Any = None
        self.server: Any = None
        self.broadcasts: Any = None
        self.steps: Any = None
        self.freeing: Any = None
        self.shard: Any = None
        self.refs: Any = None
        self.driver: Any = None
        self.coordinator: Any = None
        self.tasks: Any = None
        self.workflow: Any = None     # rank 0 with durable storage: durable.workflow.Workflow
        self.persister: Any = None    # made at the first checkpointed task run here
        self.output: Any = None       # a worker's output forwarding (output.py), when on
        self.rank_lost: Callable[[int], None] = lambda rank: None
        self.engine_state: Callable[[], str] = lambda: ""

    # (the engine's, under the names components use)

    @property
    def transport(self) -> Any:
        return self.engine.transport

    @property
    def rank(self) -> int:
        return self.engine.rank

    @property
    def size(self) -> int:
        return self.engine.size

    @property
    def clock(self) -> Callable[[], float]:
        return self.engine.clock

    @property
    def dead(self) -> set[int]:
        return self.engine.peers.dead

    @property
    def stats(self) -> Any:
        return self.engine.stats

    def send(self, dest: int, msg: Any) -> None:
        """Queue a message (:meth:`~.engine.Outbox.send`)."""
        self.engine.outbox.send(dest, msg)

    def send_all(self, out: list) -> None:
        """Queue ``[(dest, msg), ...]`` (a state machine's output)."""
        self.engine.outbox.send_all(out)

    def call_soon(self, fn: Callable, *args: Any) -> None:
        """Run ``fn(*args)`` on the engine thread (any thread; :meth:`~.engine.Engine.call_soon`)."""
        self.engine.call_soon(fn, *args)

    def next_tag(self) -> int:
        """A fresh transport tag for a data stream received by this rank."""
        return next(self._tags)

    def shard_ranks(self, object_id: int) -> tuple[int, ...]:
        """Live ranks of the object's directory shard; when all its replicas died, the next live
        rank after them takes the shard over (rebuilt on rank loss)."""
        return self.shard_live(shard_of(object_id, len(self.shards)))

    def shard_live(self, shard: int) -> tuple[int, ...]:
        """:meth:`shard_ranks` of shard number ``shard``."""
        ranks = self.shards[shard]
        if not self.dead:
            return ranks
        live = tuple(r for r in ranks if r not in self.dead)
        if live:
            return live
        return (next(r % self.size for r in range(ranks[-1] + 1, ranks[-1] + self.size)
                     if r % self.size not in self.dead),)

    def shard_primary(self, shard: int) -> int:
        """The rank that answers requests for ``shard`` now (the successor that took it over
        when all its ranks are dead, as :meth:`shard_ranks`; simulation seed 218)."""
        return self.shard_live(shard)[0]

    def publish(self, info: Any, replicas: int = 0) -> None:
        """Register ``info`` (this rank holds the object, or its value is inline) at its shard."""
        for rank in self.shard_ranks(info.object_id):
            self.send(rank, DirAdd(info, replicas))
