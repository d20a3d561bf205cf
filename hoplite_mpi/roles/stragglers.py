"""The straggler report (issue 15; rank 0): ranks whose tasks of a function take much longer
than the median rank's are named, once each, in a warning and in ``hm.stats()["stragglers"]``.

Run times come with each TaskDone (the function's own time on the worker: not the fetch of its
inputs, which is not the rank's doing, nor pickling the result), grouped by
function (its id: tasks of one function with per-rank names count together) and rank.  A rank
is a straggler for a function when at least ``MIN_RANKS`` ranks ran ``MIN_TASKS`` of its tasks
and the rank's mean is more than ``FACTOR`` times the median of the ranks' means (and at least
``MIN_GAP`` seconds above it).  Checked every ``EVERY`` seconds and when the driver shuts down.
"""
from __future__ import annotations

import logging
import statistics
from typing import Any

log = logging.getLogger("hoplite_mpi")

FACTOR = 2.0
MIN_TASKS = 5
MIN_RANKS = 2
MIN_GAP = 0.001      # seconds (a tiny task 3x slower by 0.2 ms is not a straggler)
EVERY = 5.0


class Stragglers:
    def __init__(self) -> None:
        self.times: dict = {}            # fn id -> rank -> [count, total seconds, a task name]
        self.named: dict = {}            # (fn id, rank) -> the report (dict)

    def note(self, fn_id: bytes, name: str, rank: int, seconds: float) -> None:
        per_rank = self.times.setdefault(fn_id, {})
        row = per_rank.get(rank)
        if row is None:
            per_rank[rank] = [1, seconds, name]
        else:
            row[0] += 1
            row[1] += seconds

    def check(self, now: float = 0.0) -> list:
        """Name new stragglers (a warning each); returns the new reports."""
        new = []
        for fn_id, per_rank in self.times.items():
            means = {r: row[1] / row[0] for r, row in per_rank.items() if row[0] >= MIN_TASKS}
            if len(means) < MIN_RANKS:
                continue
            median = statistics.median(means.values())
            for rank, mean in means.items():
                if (fn_id, rank) in self.named or mean <= FACTOR * median or mean - median < MIN_GAP:
                    continue
                count, _, name = per_rank[rank]
                report = {"rank": rank, "function": name, "mean_s": mean, "median_s": median,
                          "ratio": mean / median if median else float("inf"), "tasks": count}
                self.named[(fn_id, rank)] = report
                new.append(report)
                log.warning("straggler: rank %d takes %.1fx the median rank's time for tasks of "
                            "%s (mean %.1f ms over %d tasks; median rank %.1f ms)", rank,
                            report["ratio"], name, mean * 1e3, count, median * 1e3)
        return new

    def reports(self) -> list:
        return list(self.named.values())
