"""Gathering the timeline (hoplite_mpi/tracing.py) through roles/gather.py: every rank answers
"timeline" (start recording; the events recorded so far, then forgotten; or those and stop); rank 0 hands the
events and the clock offsets of the round trips to a callback."""
from __future__ import annotations

from typing import Any, Callable

from .. import tracing as timeline
from .gather import Answers, Gather

WAIT = 30.0     # seconds rank 0 waits for the ranks' events


class TimelineRole:
    def __init__(self, ctx: Any, gather: Gather) -> None:
        self.ctx = ctx
        self.gather = gather
        gather.answerers["timeline"] = self._answer

    def _answer(self, what: str) -> list:
        """(engine, every rank) ``what``: "start" recording (answers []), "take" the events
        recorded so far, or take them and "stop" recording."""
        if what == "start":
            timeline.start(self.ctx.rank)
            return []
        rec = timeline.recorder
        events = rec.take() if rec is not None else []
        if what == "stop":
            timeline.stop()
        return events

    def gather_events(self, what: str, done: Callable[[dict, dict], None]) -> None:
        """(engine, rank 0) Ask every live rank (``what`` as in :meth:`_answer`);
        ``done(per_rank, offsets)`` once all answered or after ``WAIT`` seconds (rank 0's own
        events included, offset 0)."""
        def finished(answers: Answers) -> None:
            events = {r: e if isinstance(e, list) else [] for r, e in answers.payloads.items()}
            done(events, answers.offsets)
        self.gather.ask("timeline", what, WAIT, finished)
