"""Rank-loss detection beyond what ULFM reports: heartbeats.

Workers send rank 0 a ``Heartbeat`` every ``Config.heartbeat`` seconds (any message counts as a
sign of life: the engine records the time of every batch, ``Peers.heard``).  Rank 0 declares a
worker not heard of for ``Config.heartbeat_timeout`` seconds dead (a hung rank: stopped,
deadlocked, swapping; MPI only reports ranks that died): it tells every live worker
(``MemberDown``, the hung rank too, which then exits) and handles the loss itself.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from .. import protocol as P

log = logging.getLogger("hoplite_mpi")


class Membership:
    """Stateless beyond the engine's ``heard`` table (``engine.peers``)."""

    def __init__(self, ctx: Any, exit_process: Callable[[int], None]) -> None:
        self.ctx = ctx
        self.exit_process = exit_process
        self.closed = False      # (rank 0) the driver shut down: nobody is declared dead any more

    def heartbeat(self, now: float) -> None:
        """(timer) Workers: tell rank 0 they are alive.  Rank 0: check everyone was heard of."""
        ctx = self.ctx
        if ctx.rank != 0:
            ctx.send(0, P.Heartbeat())
            return
        if self.closed:
            return
        timeout = ctx.config.heartbeat_timeout
        heard = ctx.engine.peers.heard
        for rank in range(1, ctx.size):
            last = heard.setdefault(rank, now)
            if rank not in ctx.dead and now - last > timeout:
                log.warning("rank 0: no message from rank %d for %.1f s: declaring it dead",
                            rank, now - last)
                for other in range(1, ctx.size):
                    if other not in ctx.dead:
                        ctx.send(other, P.MemberDown(rank))   # (the hung rank too: it exits)
                ctx.engine.outbox.flush()         # before the hung rank is excluded from sends
                ctx.rank_lost(rank)

    def driver_lost(self) -> None:
        """(engine) Rank 0 died: this rank cannot go on without the driver; it exits, once the
        checkpoints it was writing are committed (bounded: ``Config.shutdown_timeout``), so that
        a task that finished before the driver died is not run again by the next run."""
        log.error("rank %d: rank 0 (the driver) died; exiting", self.ctx.rank)
        if self.ctx.tasks is not None:
            self.ctx.tasks.flush_checkpoints()
        logging.shutdown()
        self.exit_process(1)

    def on_member_down(self, source: int, msg: P.MemberDown) -> None:
        ctx = self.ctx
        if msg.rank == ctx.rank:
            log.error("rank %d: rank 0 declared this rank dead (no heartbeat for %.0f s); exiting",
                      ctx.rank, ctx.config.heartbeat_timeout)
            logging.shutdown()
            self.exit_process(0)
            return
        ctx.rank_lost(msg.rank)
