"""The timeline's question of roles/gather.py (hoplite_mpi/tracing.py): every rank answers
"timeline" (start recording; the events recorded so far, then forgotten; or those and stop);
rank 0 asks it (Runtime.start_timeline / write_timeline)."""
from __future__ import annotations

from typing import Any

from .. import tracing as timeline
from .gather import Gather

WAIT = 30.0     # seconds rank 0 waits for the ranks' events


class TimelineRole:
    def __init__(self, ctx: Any, gather: Gather) -> None:
        self.ctx = ctx
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
