"""The stall report (issue 15): when the job has made no progress for ``Config.stall_timeout``
seconds while work is outstanding, rank 0 asks every rank for its state (roles/gather.py) and
prints one report for the whole job on its stderr: what the driver and each task waits for,
where those objects are, which ranks did not answer, and the likely culprit.  ``SIGUSR2`` to
rank 0 prints the same report at once (debug.py; other ranks print their own state).

Progress is counted on rank 0: task completions, reduce steps done, broadcast copies made,
checkpoints committed, objects that became ready for the driver.  Outstanding work: unfinished
tasks, or a driver's fetch in flight.  After a report, the next one comes only after another
``stall_timeout`` without progress.  A rank that does not answer within ``REPLY_WAIT`` seconds
is named: stopped (SIGSTOP), stuck in C code holding the GIL, or swapping.
"""
from __future__ import annotations

import sys
from typing import Any

from ..ids import format_id
from ..scheduler import TaskState
from .gather import Answers, Gather

REPLY_WAIT = 5.0      # seconds rank 0 waits for the ranks' answers
PROGRESS = ("TaskDone", "ReduceStepDone", "Fetched", "Persisted", "DirSender")


class StallRole:
    """Every rank answers "state" (roles/gather.py); rank 0 (:meth:`install`) watches for
    stalls."""

    def __init__(self, ctx: Any, gather: Gather) -> None:
        self.ctx = ctx
        self.gather = gather
        gather.answerers["state"] = lambda arg: ctx.engine_state()     # (every rank)
        self.answers = Answers({}, {}, set())
        self.reason = ""
        self.printing = False
        self.marker: tuple = ()
        self.since = 0.0           # clock time of the last progress (or of the last report)
        self.reports = 0

    # --- rank 0 ---------------------------------------------------------------------------------

    def install(self) -> None:
        timeout = self.ctx.config.stall_timeout
        if timeout > 0:
            self.since = self.ctx.clock()
            self.ctx.engine.timers.every(min(1.0, timeout / 4), self.check)

    def _marker(self) -> tuple:
        stats = self.ctx.stats
        return tuple(stats.get(name, 0) for name in PROGRESS) + (self.ctx.refs.notified,)

    def _outstanding(self) -> int:
        driver = self.ctx.driver
        return (driver.scheduler.pending() + len(self.ctx.fetcher.fetching)
                + len(self.ctx.refs.awaited))

    def check(self, now: float) -> None:
        """(engine, timer) Report if nothing progressed for ``stall_timeout`` seconds."""
        marker = self._marker()
        if marker != self.marker or not self._outstanding():
            self.marker, self.since = marker, now
            return
        stalled = now - self.since
        if stalled >= self.ctx.config.stall_timeout and not self.printing:
            self.since = now             # (the next report after another stall_timeout)
            self.report(f"no progress for {stalled:.0f} s with {self._outstanding()} task(s) "
                        f"or fetch(es) outstanding")

    def report(self, reason: str) -> None:
        """(engine) Ask every live rank for its state; print once all answered or after
        ``REPLY_WAIT`` seconds."""
        if self.printing:
            return
        self.reason, self.printing = reason, True
        self.gather.ask("state", None, REPLY_WAIT, self._print)

    def _print(self, answers: Answers) -> None:
        self.answers, self.printing = answers, False
        self.reports += 1
        sys.__stderr__.write(self.text())
        sys.__stderr__.flush()

    def text(self) -> str:
        """The report (rank 0's view, the answers received so far)."""
        silent = self.answers.silent
        lines = [f"==== hoplite_mpi stall report: {self.reason} ===="]
        lines += self._waits()
        if silent:
            lines.append(f"silent ranks (no answer within {REPLY_WAIT:.0f} s): {silent}")
        lines.append("likely culprit: " + self._culprit(silent))
        for rank, text in sorted(self.answers.payloads.items()):
            lines.append(str(text).rstrip())
        lines.append("==== end of stall report ====")
        return "\n".join(lines) + "\n"

    def _waits(self) -> list[str]:
        """Who waits for what: the driver's fetches, tasks waiting for inputs, with the task
        that makes each missing object and where it runs."""
        ctx, sched = self.ctx, self.ctx.driver.scheduler
        out = []
        waited = list(dict.fromkeys(list(ctx.refs.awaited) + list(ctx.fetcher.fetching)))
        for oid in waited[:20]:
            out.append(f"the driver waits for {format_id(oid)}{self._where(oid)}")
        for task in list(sched.tasks.values())[:200]:
            for oid in list(task.missing)[:5]:
                out.append(f"task {format_id(task.spec.task_id)} {task.spec.name} waits for "
                           f"{format_id(oid)}{self._where(oid)}")
            if len(out) > 40:
                out.append("...")
                break
        return out or ["nothing waits for an object (tasks may be running long)"]

    def _where(self, oid: int) -> str:
        sched = self.ctx.driver.scheduler
        maker = sched.producer.get(oid)
        if maker is not None:
            task = sched.tasks.get(maker)
            if task is not None:
                return (f" (made by task {format_id(maker)} {task.spec.name}, {task.state}"
                        + (f" on rank {task.rank}" if task.rank is not None else "") + ")")
        info = sched.objects.get(oid) or self.ctx.catalog.info(oid)
        if info is not None:
            return f" (exists: holders {list(info.holders)}{', inline' if info.inline else ''})"
        return ""

    def _culprit(self, silent: list[int]) -> str:
        if silent:
            return (f"rank(s) {silent}: they did not answer (stopped, stuck in C code holding the "
                    f"GIL, swapping, or cut off)")
        sched = self.ctx.driver.scheduler
        running = [t for t in sched.tasks.values() if t.state is TaskState.RUNNING]
        if running:
            by_rank: dict = {}
            for t in running:
                by_rank.setdefault(t.rank, []).append(f"{format_id(t.spec.task_id)} {t.spec.name}")
            return "; ".join(f"rank {r} runs {', '.join(v[:3])}" for r, v in sorted(by_rank.items(), key=str)) + \
                " (every rank answered: tasks running long, or waiting on something outside the runtime)"
        return "none found: every rank answered and no task runs (see the states below)"
