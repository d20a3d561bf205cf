"""Rank 0 asks every live rank one question and collects the answers (issue 15): the stall
report (each rank's state), the timeline (each rank's events and its clock), the job's stats
(each rank's counters).  One message pair, :class:`~hoplite_mpi.protocol.Ask` /
:class:`~hoplite_mpi.protocol.Answer`; what a rank answers is looked up by the question's name
in :attr:`Gather.answerers` (registered by the roles that ask).

With each answer comes the answering rank's ``time.perf_counter()``; rank 0 estimates the
rank's clock offset from the round trip (offset = the rank's clock at its answer minus the
midpoint of rank 0's send and receive times; error at most half the round trip), which the
timeline uses to put every rank's events on rank 0's clock.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

from .. import protocol as P

log = logging.getLogger("hoplite_mpi")


@dataclasses.dataclass
class Answers:
    """What came back.  ``payloads``: rank -> answer (rank 0's own included);
    ``offsets``: rank -> (clock offset s, error s); ``asked``: the ranks asked (live when
    asked, rank 0 excluded)."""

    payloads: dict
    offsets: dict
    asked: set

    @property
    def silent(self) -> list[int]:
        """The ranks asked that did not answer (in time)."""
        return sorted(self.asked - set(self.payloads))


class Gather:
    """Every rank answers :class:`P.Ask`; rank 0 :meth:`ask`\\ s."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.answerers: dict[str, Callable[[Any], Any]] = {}
        self.token = 0
        self._pending: dict[int, tuple] = {}     # token -> (Answers, sent at, done)

    # --- every rank -------------------------------------------------------------------------

    def on_ask(self, source: int, msg: P.Ask) -> None:
        """(engine) Answer with this rank's payload (None if answering raised: logged)."""
        self.ctx.send(source, P.Answer(msg.token, self.ctx.rank, time.perf_counter(),
                                       self._answer(msg.what, msg.arg)))

    def _answer(self, what: str, arg: Any) -> Any:
        try:
            return self.answerers[what](arg)
        except Exception:
            log.exception("rank %d: answering %r failed", self.ctx.rank, what)
            return None

    # --- rank 0 -----------------------------------------------------------------------------

    def ask(self, what: str, arg: Any, wait: float, done: Callable[[Answers], None]) -> None:
        """(engine, rank 0) Ask every live rank ``what`` (with ``arg``); ``done(answers)`` once
        all answered or after ``wait`` seconds, whichever comes first.  Rank 0 answers too
        (first, offset 0)."""
        ctx = self.ctx
        self.token += 1
        token = self.token
        asked = {r for r in range(ctx.size) if r != ctx.rank and r not in ctx.dead}
        answers = Answers({ctx.rank: self._answer(what, arg)}, {ctx.rank: (0.0, 0.0)}, asked)
        self._pending[token] = (answers, time.perf_counter(), done)
        for rank in sorted(asked):
            ctx.send(rank, P.Ask(token, what, arg))
        if asked:
            ctx.engine.timers.call_later(wait, self._finish, token)
        else:
            self._finish(token)

    def on_answer(self, source: int, msg: P.Answer) -> None:
        pending = self._pending.get(msg.token)
        if pending is None:
            return       # (late: the wait had ended)
        answers, sent, _ = pending
        half = (time.perf_counter() - sent) / 2
        answers.payloads[msg.rank] = msg.payload
        answers.offsets[msg.rank] = (msg.now - (sent + half), half)
        if set(answers.payloads) >= answers.asked - self.ctx.dead:
            self._finish(msg.token)

    def _finish(self, token: int) -> None:
        pending = self._pending.pop(token, None)
        if pending is not None:
            pending[2](pending[0])
