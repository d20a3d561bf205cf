"""The timeline (issue 15): what each rank did, as a Chrome trace-event file (open it in
https://ui.perfetto.dev or chrome://tracing; ``python -m hoplite_mpi.trace summary`` sums it up).

Recording is off unless ``Config.timeline`` names a file (``HOPLITE_MPI_TIMELINE=trace.json``:
the whole run, written when the driver shuts down) or the driver calls ``hm.timeline()``
(recording starts on every rank) and later ``hm.timeline("trace.json")`` (written at once).
When off, each hook costs one test of a module global.

Events, per rank (``pid`` = rank; ``tid`` = the thread, or a lane named after the kind), by
``cat``; "X" complete events unless said otherwise; times in microseconds, sizes in bytes:

- ``task``: a task run (name, id; on the executor thread).
- ``wait``: a task's wait for its inputs; the driver's ``get``.
- ``transfer`` (lane "transfers"): an object stream into this rank, from the ``Pull`` to the last
  chunk (object, bytes, peer): fetches, broadcast copies, and a reduce step's child streams
  (``reduce: true``).
- ``collective`` (lane "collectives"): a reduce step (objects/reduce_step.py: the attempt's
  ``reduce`` id, ``step`` leaf/combine/copy, ``out``, ``result`` if final, the ``inputs``
  combined here, the ``peers`` it received from, the ``chunks`` and ``bytes`` received,
  ``outcome`` done/failed/aborted); a broadcast copy on a target (objects/broadcast.py: object,
  ``root`` that asked, ``peer`` it came from, ``path`` held/inline/direct/directory, chunks,
  bytes); on the rank that started them, a whole broadcast (targets, errors) and a whole reduce
  (roles/coordinator.py: result, target, path, inputs used, attempts).
- ``directory`` (lane "directory"): a ``DirLookup`` until its ``DirReply`` (object, shard rank,
  answer holders/inline/none) and this rank's ``DirPull`` until its ``DirSender`` (answer: the
  sender's rank, inline, deleted); objects/lookup.py, objects/fetch.py.
- ``rank-loss``: a rank declared dead (instant).  ``replan``: a reduce planned again without the
  dead ranks (instant, rank 0: result, new attempt id, dead ranks, ``bytes_kept`` of the result
  already given out, inputs to place again).

Each rank stamps events with its own ``time.perf_counter``; when rank 0 gathers them it estimates
each rank's clock offset from the request/reply round trip (offset = the rank's clock at its
reply minus the midpoint of rank 0's send and receive times) and shifts the rank's events onto
its own clock; the error is at most half the round trip (``args.offset_error_us`` in the
metadata).
"""
from __future__ import annotations

import json
import threading
import time
from typing import Any, Optional

recorder: Optional["Recorder"] = None      # this process's, while recording


class Recorder:
    """Events of this rank (thread-safe appends)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.events: list = []
        self._lock = threading.Lock()

    def complete(self, name: str, cat: str, start: float, end: float, args: Optional[dict] = None,
                 tid: Optional[str] = None) -> None:
        ev = {"name": name, "cat": cat, "ph": "X", "ts": start * 1e6, "dur": (end - start) * 1e6,
              "pid": self.rank, "tid": tid or threading.current_thread().name}
        if args:
            ev["args"] = args
        with self._lock:
            self.events.append(ev)

    def instant(self, name: str, cat: str, args: Optional[dict] = None) -> None:
        ev = {"name": name, "cat": cat, "ph": "i", "s": "p", "ts": time.perf_counter() * 1e6,
              "pid": self.rank, "tid": threading.current_thread().name}
        if args:
            ev["args"] = args
        with self._lock:
            self.events.append(ev)

    def take(self) -> list:
        with self._lock:
            events, self.events = self.events, []
        return events


def start(rank: int) -> None:
    """Start recording in this process (idempotent)."""
    global recorder
    if recorder is None:
        recorder = Recorder(rank)


def stop() -> None:
    global recorder
    recorder = None


def write(path: str, per_rank: dict, offsets: dict) -> int:
    """Write the events of every rank (``per_rank``: rank -> events on its own clock;
    ``offsets``: rank -> (offset s, error s)) shifted onto rank 0's clock, as a trace-event
    JSON file; returns the number of events."""
    out = []
    for rank in sorted(per_rank):
        off, err = offsets.get(rank, (0.0, 0.0))
        out.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
        out.append({"name": "process_sort_index", "ph": "M", "pid": rank, "args": {"sort_index": rank}})
        for ev in per_rank[rank]:
            ev = dict(ev)
            ev["ts"] = ev["ts"] - off * 1e6
            out.append(ev)
    doc = {"traceEvents": out, "displayTimeUnit": "ms",
           "metadata": {"clock": "rank 0's time.perf_counter, microseconds",
                        "offset_error_us": {str(r): e * 1e6 for r, (_, e) in offsets.items()}}}
    with open(path, "w") as f:
        json.dump(doc, f)
    return len(out)
