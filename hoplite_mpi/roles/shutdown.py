"""Shutdown: a barrier-free handshake over the runtime's communicator.

A rank may free the communicator (and later call MPI_Finalize) only when no message to it is
still on its way and none of its own is unfinished: under ULFM, a message that arrives for a
communicator its receiver has already freed (e.g. a Free that a shard sent while handling a
deletion just before its Shutdown) left MPI_Finalize's barrier hanging on every rank.  So::

    driver:  Shutdown -> every live rank, then quiesce
    others:  on Shutdown, ShutdownAck -> every other live rank, then quiesce
    quiesce: send nothing more; cancel posted receives; receive and drop every message (any
             tag) until each live peer's last message (its Shutdown/ShutdownAck) has come and
             every own send has completed

MPI's non-overtaking order (one source, one communicator, a receive matching any tag) means
nothing from a peer can follow its last message.  Ranks that die meanwhile are not waited for.
If a peer never answers (hung), the rank gives up after ``Config.shutdown_timeout`` seconds and
is marked ``unclean`` (the process then exits without MPI_Finalize).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

from .. import protocol as P

log = logging.getLogger("hoplite_mpi")


class Shutdown:
    """``goodbyes``: ranks whose last message came; ``unclean``: quiescence timed out."""

    def __init__(self, ctx: Any, on_close: Callable[[], None]) -> None:
        self.ctx = ctx
        self.on_close = on_close           # (stops this rank's task executor)
        self.goodbyes: set[int] = set()
        self.deadline: Optional[float] = None
        self.unclean = False

    def begin(self) -> None:
        """(engine) The driver ends the job (rank 0: the user called shutdown; others: its
        Shutdown, or a peer's ShutdownAck that overtook it, arrived): send this rank's last
        message to every live peer and stop the engine loop (:meth:`step` follows)."""
        ctx = self.ctx
        engine = ctx.engine
        if engine.closing:
            return
        last = P.Shutdown() if ctx.rank == 0 else P.ShutdownAck(ctx.rank)
        for rank in range(ctx.size):
            if rank != ctx.rank and rank not in ctx.dead:
                ctx.send(rank, last)
        engine.outbox.discard_local()
        self.on_close()
        engine.outbox.flush()
        engine.stop()

    def on_last_message(self, source: int, msg: Any) -> None:
        self.begin()

    def note_goodbye(self, source: int, batch: list) -> None:
        """(engine's ``on_leftover``) A batch that arrived after this rank stopped."""
        if any(type(m) in (P.Shutdown, P.ShutdownAck) for m in batch):
            self.goodbyes.add(source)

    def waiting(self) -> list[int]:
        """Live peers whose last message has not come yet."""
        ctx = self.ctx
        return sorted(set(range(ctx.size)) - {ctx.rank} - ctx.dead - self.goodbyes)

    def quiesce(self) -> None:
        """(engine thread, after :meth:`begin`) Drop whatever still arrives until every live
        peer has sent its last message and this rank's sends have completed.  Between rounds it
        waits by the engine's idle policy (:class:`~hoplite_mpi.engine.Backoff`)."""
        ctx = self.ctx
        backoff, clock, transport = ctx.engine.backoff, ctx.clock, ctx.transport
        while True:
            active, done = self.step()
            if done:
                return
            if active:
                backoff.active(clock())
            delay = backoff.idle_delay(clock(), False)
            if delay:
                transport.wait(delay)
            else:
                time.sleep(0)          # yield the core

    def step(self) -> tuple[bool, bool]:
        """One round of quiescence: (whether anything happened, whether it is over)."""
        ctx = self.ctx
        transport = ctx.transport
        if self.deadline is None:
            self.deadline = ctx.clock() + ctx.config.shutdown_timeout
        active = False
        for source, batch in transport.drain():
            active = True
            self.note_goodbye(source, batch)
        for rank in transport.failures():
            ctx.dead.add(rank)        # (nothing to repair: only not to wait for it)
        if transport.quiesce():
            active = True
        waiting = self.waiting()
        if not waiting and transport.idle():
            return active, True
        if ctx.clock() > self.deadline:
            log.warning("rank %d: shutdown: no last message from rank(s) %s after %.0f s "
                        "(or own sends unfinished); leaving without MPI_Finalize",
                        ctx.rank, waiting, ctx.config.shutdown_timeout)
            self.unclean = True
            return active, True
        return active, False
