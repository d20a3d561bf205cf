"""Draining before the job ends (issue 14; rank 0): on a request from the launcher, or when
the job's end time comes near, stop starting tasks, let running ones finish and their
checkpoints commit, then end the program with :class:`~hoplite_mpi.errors.Drained` and exit
status 79 (``jobwatch.EXIT_DRAINED``), so that a requeued job resumes from storage.

Triggers, checked every ``CHECK`` seconds on rank 0's engine thread:

- the file named by ``HOPLITE_MPI_DRAIN_FILE`` exists: ``hoplite-mpi run`` creates it when it
  gets SIGUSR1 or SIGTERM (``#SBATCH --signal=B:USR1@120``; jobwatch.py), a JSON object with
  the reason;
- the job's end time (epoch seconds: ``HOPLITE_MPI_JOB_END_TIME``, else SLURM's
  ``SLURM_JOB_END_TIME``, which SLURM sets from 23.02 on) is less than ``Config.drain_margin``
  seconds away.

Protocol: the scheduler gets :class:`~hoplite_mpi.scheduler.Drain` (nothing is placed any
more; placed tasks not started yet are revoked); rank 0 waits until no task runs and every
checkpointed task that finished has reported its commit (``Persisted``), at most
``Config.drain_grace`` seconds; it logs what was done and what is left, then every ref not
ready and every waiting call fails with ``Drained``.  ``python -m hoplite_mpi`` turns that into
exit status 79 (after the normal shutdown, in which workers flush their persisters).  If the
program does not end within ``EXIT_AFTER`` seconds (its main thread is not waiting on the
runtime), rank 0 records status 79 and exits at once; workers then flush and exit as after a
driver's death.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any, Optional

from ..errors import Drained
from ..scheduler import Drain

log = logging.getLogger("hoplite_mpi")

DRAIN_FILE_VAR = "HOPLITE_MPI_DRAIN_FILE"
END_TIME_VARS = ("HOPLITE_MPI_JOB_END_TIME", "SLURM_JOB_END_TIME")
CHECK = 0.5           # seconds between looks at the triggers
POLL = 0.05           # seconds between looks at the drain's progress
EXIT_AFTER = 10.0     # seconds the program has to end after Drained before rank 0 exits


def end_time(environ: Any = os.environ) -> Optional[float]:
    """The job's end time (epoch seconds) from the environment, or None."""
    for var in END_TIME_VARS:
        raw = environ.get(var, "").strip()
        if raw:
            try:
                value = float(raw)
            except ValueError:
                log.warning("%s=%r is not an epoch time in seconds; ignored", var, raw)
                continue
            if value > 0:
                return value
    return None


class DrainRole:
    """Rank 0's drain controller; :meth:`install` arms it when a trigger can fire."""

    def __init__(self, ctx: Any, exit_process: Any = os._exit) -> None:
        self.ctx = ctx
        self.exit_process = exit_process
        self.file = os.environ.get(DRAIN_FILE_VAR) or None
        self.end = end_time()
        self.reason: Optional[str] = None
        self.deadline = 0.0
        self.done = False

    def install(self) -> bool:
        """Start watching the triggers (rank 0); returns whether there is one to watch."""
        if self.file is None and self.end is None:
            return False
        self.ctx.engine.timers.every(CHECK, self.check)
        return True

    def check(self, now: float) -> None:
        """(engine, timer) Start draining if a trigger fired."""
        if self.reason is not None:
            return
        if self.file is not None and os.path.exists(self.file):
            why = "asked to drain"
            try:
                with open(self.file) as f:
                    why = json.load(f).get("reason", why)
            except (OSError, ValueError):
                pass
            self.start(why)
        elif self.end is not None and self.end - time.time() < self.ctx.config.drain_margin:
            self.start(f"the job ends in {max(0.0, self.end - time.time()):.0f} s "
                       f"(drain_margin {self.ctx.config.drain_margin:.0f} s)")

    def start(self, reason: str) -> None:
        """(engine) Begin draining (idempotent)."""
        if self.reason is not None:
            return
        ctx = self.ctx
        self.reason = reason
        self.deadline = ctx.clock() + ctx.config.drain_grace
        log.warning("draining (%s): no new task starts; waiting up to %.0f s for running tasks "
                    "and their checkpoints", reason, ctx.config.drain_grace)
        ctx.refs.drained = Drained(reason)
        ctx.driver.scheduled(ctx.driver.scheduler.handle(Drain()))
        ctx.engine.timers.call_later(POLL, self._progress)

    def _progress(self) -> None:
        ctx = self.ctx
        running = ctx.driver.scheduler.running()
        workflow = ctx.workflow
        unpersisted = len(workflow.unpersisted) if workflow is not None else 0
        if (running or unpersisted) and ctx.clock() < self.deadline:
            ctx.engine.timers.call_later(POLL, self._progress)
            return
        self._finish(running, unpersisted)

    def _finish(self, running: int, unpersisted: int) -> None:
        ctx = self.ctx
        self.done = True
        stats = ctx.driver.scheduler.stats
        finished = ctx.driver.succeeded
        left = stats["submitted"] - finished
        durable = ctx.workflow.snapshot() if ctx.workflow is not None else {}
        log.warning("drained (%s): %d task(s) finished in this run, %d restored from storage, "
                    "%d checkpoint(s) committed; %d submitted task(s) not finished%s%s; run the "
                    "same command again to resume", self.reason,
                    finished, durable.get("restored", 0),
                    durable.get("persisted", 0), left,
                    f", {running} still running at the deadline" if running else "",
                    f", {unpersisted} checkpoint(s) not confirmed" if unpersisted else "")
        ctx.refs.fail_waiters(ctx.refs.drained)
        threading.Thread(target=self._exit_later, name="hoplite-drain-exit", daemon=True).start()

    def _exit_later(self) -> None:
        """If the program has not ended ``EXIT_AFTER`` seconds after Drained: exit 79."""
        time.sleep(EXIT_AFTER)
        from ..jobwatch import EXIT_DRAINED, write_status
        log.warning("the program did not end within %.0f s of draining; exiting with status %d",
                    EXIT_AFTER, EXIT_DRAINED)
        write_status(EXIT_DRAINED)
        logging.shutdown()
        self.exit_process(EXIT_DRAINED)
