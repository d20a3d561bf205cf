"""Post-mortem aids for a job that hangs: signals that make one rank say where it is.

- ``kill -USR1 <pid of a rank>``: every thread's Python stack, on the rank's stderr
  (:mod:`faulthandler`: it works even while a thread loops holding the GIL).
- ``kill -USR2 <pid of a rank>``: a summary of the rank's runtime state (:func:`engine_state`):
  known dead ranks, objects being fetched or received, open transfer streams, directory entries
  with waiters or partial copies, incomplete store entries, and on rank 0 the scheduler's tasks.

:func:`install` is called by ``hm.init()`` in the main thread; it leaves alone a signal for which
the program set its own handler.  The test suite sends both signals to every rank of a job that
overran its timeout, so that a hang in CI shows where each rank was.
"""
from __future__ import annotations

import faulthandler
import signal
import sys
from typing import Any

from .ids import format_id

MAX_LINES = 60   # per section of the state summary


def install(runtime: Any) -> None:
    """Register the two signals for ``runtime`` (no-op outside the main thread or without them)."""
    usr1, usr2 = getattr(signal, "SIGUSR1", None), getattr(signal, "SIGUSR2", None)
    if usr1 is None or usr2 is None:
        return
    try:
        if signal.getsignal(usr1) in (signal.SIG_DFL, None):
            faulthandler.register(usr1, file=sys.__stderr__, all_threads=True)
        if signal.getsignal(usr2) in (signal.SIG_DFL, None):
            signal.signal(usr2, lambda signum, frame: _usr2(runtime))
    except (ValueError, RuntimeError, OSError):   # not the main thread, or no such signal here
        return


def _usr2(runtime: Any) -> None:
    """This rank's state now; on rank 0 also the job-wide stall report (roles/stall.py)."""
    _write(engine_state(runtime))
    stall = getattr(runtime, "stall", None)
    if runtime.rank == 0 and stall is not None:
        try:
            runtime.call_soon(stall.report, "SIGUSR2 to rank 0")
        except Exception:      # (shutting down)
            pass


def _write(text: str) -> None:
    # (the process's own stderr, not a worker's forwarded one: a stuck engine forwards nothing)
    sys.__stderr__.write(text)
    sys.__stderr__.flush()


def _ids(ids) -> str:
    ids = list(ids)
    shown = ", ".join(format_id(i) for i in ids[:20])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > 20 else "")


def engine_state(rt: Any) -> str:
    """A readable summary of ``rt``'s state.  Read from another thread without locks while the
    engine runs, so it is a best-effort snapshot (a section that changed under it says so)."""
    lines = [f"---- hoplite_mpi rank {rt.rank} state ----",
             f"dead ranks: {sorted(rt.dead)}",
             f"waiting for a directory lookup: {_ids(rt.ctx.lookups.waiting)}",
             f"fetching: {_ids(rt.ctx.fetcher.fetching)}",
             "receiving: " + ", ".join(f"{format_id(o)} from {r}"
                                       for o, (r, _) in list(rt.ctx.fetcher.receiving.items())[:20]),
             f"pulls deferred until the copy starts: {_ids(rt.ctx.server.deferred)}",
             f"reduce steps running here: {_ids(rt.ctx.steps.running)}"]
    if rt.engine.closing:      # shutting down: whose last message is still awaited
        waiting = rt.shutdown_role.waiting()
        lines.append(f"shutting down: last message still awaited from {waiting}, "
                     f"own operations in flight: {not rt.transport.idle()}")
    sections = [("streams", _streams), ("directory", _directory), ("store", _store)]
    if rt.scheduler is not None:
        sections.append(("scheduler", _scheduler))
    for name, section in sections:
        try:
            lines += section(rt)[:MAX_LINES]
        except Exception as exc:     # (mutated while read: a snapshot, not a transaction)
            lines.append(f"{name}: not readable now ({type(exc).__name__})")
    return "\n".join(lines + ["----", ""])


def _streams(rt: Any) -> list[str]:
    return rt.transport.stream_summary() or ["streams: none"]


def _directory(rt: Any) -> list[str]:
    out = [f"directory {format_id(oid)}: holders {holders}, lookups waiting {waiting}, "
           f"pulls waiting {pulling}, partial copies (rank: sender) {partial}"
           for oid, holders, waiting, pulling, partial in rt.directory.busy()]
    return out or ["directory: no entry with waiters or partial copies"]


def _store(rt: Any) -> list[str]:
    out = []
    for oid in rt.store.ids():
        entry = rt.store.get(oid)
        if entry is not None and not entry.complete:
            out.append(f"store {format_id(oid)}: {entry.progress} of {entry.nbytes} bytes")
    return out or ["store: every entry complete"]


def _scheduler(rt: Any) -> list[str]:
    snap = rt.scheduler.snapshot(MAX_LINES)
    out = [f"scheduler: tasks by state {snap['states']}, in flight per worker {snap['inflight']}, "
           f"lost ranks {snap['lost_ranks']}, stats {snap['stats']}"]
    for tid, name, state, rank, attempts, missing in snap["tasks"]:
        waiting = f", waiting for {_ids(missing)}" if missing else ""
        out.append(f"task {format_id(tid)} {name} {state} on rank {rank}, attempt {attempts}{waiting}")
    return out
