"""A virtual clock and a queue of events at virtual times, for :mod:`.local`.

Nothing here reads the wall clock, sleeps or draws a random number: the owner says when each
event is due and moves the clock (:meth:`EventQueue.advance`).  Events are run in time order,
events due at the same time in the order they were scheduled, so a run is reproducible.
"""
from __future__ import annotations

import heapq
import itertools
from collections import defaultdict
from typing import Any, Callable, Optional


class EventQueue:
    """Events at virtual times (``now``: seconds), with per-pair message order.

    An event is a list ``[fn, args]``; ``ev[0] = None`` cancels it.  Messages scheduled with
    :meth:`post` (from ``src`` to ``dst``, ``args[1]`` being ``dst``) are due in the order they
    were posted per pair, and remembered per source so that :meth:`take` can withdraw the
    undelivered ones of a rank that ends.
    """

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list = []
        self._seq = itertools.count()
        self._last: dict[tuple[int, int], float] = {}      # (src, dst) -> last delivery time
        self._pending: dict[int, list] = defaultdict(list)  # src -> its undelivered events
        self._prune_at: dict[int, int] = {}

    def schedule(self, when: float, fn: Callable, *args: Any, src: int = -1) -> list:
        """Run ``fn(*args)`` at virtual time ``when``; returns the event (cancel: ``ev[0] = None``).
        ``src`` (a rank): remember the event as one of ``src``'s messages (see :meth:`take`)."""
        ev = [fn, args]
        heapq.heappush(self._heap, (when, next(self._seq), ev))
        if src >= 0:
            self._pending[src].append((when, ev))
        return ev

    def post(self, src: int, dst: int, delay: float, fn: Callable, *args: Any) -> None:
        """Deliver a message from ``src`` to ``dst`` (``fn(*args)``, ``args[1] == dst``) after
        ``delay`` seconds, but not before the pair's earlier ones."""
        when = max(self.now + delay, self._last.get((src, dst), 0.0))
        self._last[(src, dst)] = when
        pending = self._pending[src]
        if len(pending) >= self._prune_at.get(src, 64):      # (forget delivered ones)
            pending[:] = [p for p in pending if p[1][0] is not None]
            self._prune_at[src] = max(64, 2 * len(pending))
        self.schedule(when, fn, *args, src=src)

    def take(self, src: int) -> dict[Any, list]:
        """Forget ``src``'s messages: its undelivered ones by destination, each list
        ``[(when, event)]`` (the caller cancels those that must not arrive)."""
        by_dst: dict[Any, list] = defaultdict(list)
        for when, ev in self._pending.pop(src, ()):
            if ev[0] is not None:
                by_dst[ev[1][1]].append((when, ev))
        return by_dst

    def next_time(self) -> Optional[float]:
        """When the next event is due (None: none pending)."""
        while self._heap and self._heap[0][2][0] is None:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def run_due(self) -> int:
        """Run every event due by ``now`` (in time order); returns how many ran.  An exception
        of an event's function propagates (the event counts as run)."""
        n = 0
        while self._heap and self._heap[0][0] <= self.now:
            _, _, ev = heapq.heappop(self._heap)
            fn = ev[0]
            if fn is None:
                continue
            ev[0] = None
            fn(*ev[1])
            n += 1
        return n

    def advance(self, when: float) -> None:
        """Move virtual time forward to ``when`` (never backwards)."""
        self.now = max(self.now, when)
