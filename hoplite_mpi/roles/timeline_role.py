"""Gathering the timeline (hoplite_mpi/tracing.py) through roles/gather.py: every rank answers
"timeline" (start recording, or the events recorded so far, then forgotten); rank 0 hands the
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

    def _answer(self, start: bool) -> list:
        """(engine, every rank) Start recording (``start``: answers []), else take the events."""
        if start:
            timeline.start(self.ctx.rank)
            return []
        rec = timeline.recorder
        return rec.take() if rec is not None else []

    def gather_events(self, start: bool, done: Callable[[dict, dict], None]) -> None:
        """(engine, rank 0) Ask every live rank; ``done(per_rank, offsets)`` once all answered
        or after ``WAIT`` seconds (rank 0's own events included, offset 0)."""
        def finished(answers: Answers) -> None:
            events = {r: e if isinstance(e, list) else [] for r, e in answers.payloads.items()}
            done(events, answers.offsets)
        self.gather.ask("timeline", start, WAIT, finished)
