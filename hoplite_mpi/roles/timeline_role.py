"""Gathering the timeline (hoplite_mpi/tracing.py): every rank answers
:class:`~hoplite_mpi.protocol.TimelineRequest`; rank 0 (:meth:`TimelineRole.gather`) collects
the answers with their round trips (clock offsets) and hands them to a callback."""
from __future__ import annotations

import time
from typing import Any, Callable

from .. import protocol as P
from .. import tracing as timeline

WAIT = 30.0     # seconds rank 0 waits for the ranks' events


class TimelineRole:
    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.token = 0
        self._pending: dict = {}

    def on_request(self, source: int, msg: P.TimelineRequest) -> None:
        if msg.start:
            timeline.start(self.ctx.rank)
        rec = timeline.recorder
        events = rec.take() if rec is not None and not msg.start else []
        self.ctx.send(source, P.TimelineReply(msg.token, self.ctx.rank, time.perf_counter(), events))

    def gather(self, start: bool, done: Callable[[dict, dict], None]) -> None:
        """(engine, rank 0) Ask every live rank; ``done(per_rank, offsets)`` once all answered
        or after ``WAIT`` seconds (rank 0's own events included, offset 0)."""
        ctx = self.ctx
        if start:
            timeline.start(ctx.rank)
        self.token += 1
        token = self.token
        asked = {r for r in range(ctx.size) if r != ctx.rank and r not in ctx.dead}
        rec = timeline.recorder
        state = {"asked": asked, "sent": time.perf_counter(), "per_rank": {}, "offsets": {},
                 "done": done, "finished": False}
        if not start:
            state["per_rank"][ctx.rank] = rec.take() if rec is not None else []
            state["offsets"][ctx.rank] = (0.0, 0.0)
        self._pending[token] = state
        for rank in sorted(asked):
            ctx.send(rank, P.TimelineRequest(token, start))
        ctx.engine.timers.call_later(WAIT, self._finish, token)
        if not asked:
            self._finish(token)

    def on_reply(self, source: int, msg: P.TimelineReply) -> None:
        state = self._pending.get(msg.token)
        if state is None:
            return
        received = time.perf_counter()
        half = (received - state["sent"]) / 2
        state["per_rank"][msg.rank] = msg.events
        state["offsets"][msg.rank] = (msg.now - (state["sent"] + half), half)
        if set(state["per_rank"]) >= state["asked"]:
            self._finish(msg.token)

    def _finish(self, token: int) -> None:
        state = self._pending.pop(token, None)
        if state is not None:
            state["done"](state["per_rank"], state["offsets"])
