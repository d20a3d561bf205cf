"""Worker output on the driver (issue 15): ``print``, ``sys.stdout``/``sys.stderr`` writes and
``logging`` records of a worker rank reach the driver's stdout/stderr, each line prefixed with
where it came from, as Ray does: ``(f pid=1234, rank=2) text`` for a task ``f``, ``(rank=2)``
for output outside tasks (a library's warning on a worker).  No socket: lines travel as
:class:`~hoplite_mpi.protocol.Output` control messages to rank 0.

On a worker, :func:`install` replaces ``sys.stdout`` and ``sys.stderr`` with
:class:`Forwarder` s.  A forwarder keeps a partial line per thread and stream; each complete
line is queued (:class:`Lines`), and the first line of a burst schedules one engine call that
sends everything queued in one message: a line leaves within one engine step (no timer), so
little is lost when the rank is SIGKILLed right after printing.  When a task ends its partial
lines are queued too, before its completion is reported, so that a task's output reaches the
driver before its result or its error (same channel, in order).  Lines are never split or
interleaved: only whole lines travel, and the driver writes each one with one call.

What is not forwarded: writes to the file descriptors themselves (C extensions, subprocesses;
mpirun forwards those as before), and ``Config.forward_output=False`` turns it off.
"""
from __future__ import annotations

import io
import os
import sys
import threading
from typing import Any, Optional

from . import protocol as P
from .errors import RuntimeShutdownError

STDOUT, STDERR = 1, 2


class Lines:
    """A worker's queue of whole lines for rank 0 (any thread); :meth:`send` on the engine."""

    def __init__(self, ctx: Any, originals: dict) -> None:
        self.ctx = ctx
        self.originals = originals          # stream -> the process's own stream (fallback)
        self._items: list = []
        self._lock = threading.Lock()
        self._scheduled = False
        self.lost = 0

    def add(self, stream: int, label: str, text: str) -> None:
        with self._lock:
            self._items.append((stream, label, text))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.ctx.call_soon(self.send)
        except RuntimeShutdownError:       # the runtime is gone: write it here ourselves
            self._local()

    def send(self) -> None:
        """(engine) Everything queued, in one message to rank 0."""
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        if items:
            self.ctx.send(0, P.Output(tuple(items)))

    def _local(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for stream, label, text in items:
            _write(self.originals[stream], label, text)


class Forwarder(io.TextIOBase):
    """A worker's ``sys.stdout`` or ``sys.stderr``: whole lines go to :class:`Lines`, labelled
    with the task the writing thread runs (``label_of``)."""

    def __init__(self, stream: int, original: Any, lines: Lines, label_of: Any) -> None:
        super().__init__()
        self.stream, self.original, self.lines, self.label_of = stream, original, lines, label_of
        self._partial = threading.local()

    # (what code that inspects sys.stdout may ask)
    @property
    def encoding(self) -> str:          # type: ignore[override]
        return getattr(self.original, "encoding", "utf-8")

    @property
    def errors(self) -> Optional[str]:  # type: ignore[override]
        return getattr(self.original, "errors", None)

    def fileno(self) -> int:
        return self.original.fileno()    # (the real descriptor: writes to it are not forwarded)

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        buf = getattr(self._partial, "text", "") + s
        cut = buf.rfind("\n")
        if cut < 0:
            self._partial.text = buf
            return len(s)
        self._partial.text = buf[cut + 1:]
        self.lines.add(self.stream, self.label_of(), buf[:cut])
        return len(s)

    def flush(self) -> None:
        """Whole lines leave as they are written; a partial line waits for its end (or for
        :meth:`end_line`), so ``flush`` has nothing to do."""

    def end_line(self) -> None:
        """Queue this thread's partial line (its task ended)."""
        text = getattr(self._partial, "text", "")
        if text:
            self._partial.text = ""
            self.lines.add(self.stream, self.label_of(), text)


def _write(stream: Any, label: str, text: str) -> None:
    prefix = f"({label}) " if label else ""
    stream.write("".join(f"{prefix}{line}\n" for line in text.split("\n")))


class Output:
    """This process's output forwarding: installed on a worker (:meth:`install`), or the
    driver's side that writes what arrives (:meth:`on_output`)."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.forwarders: list[Forwarder] = []
        self.saved: Optional[tuple] = None
        self.pid = os.getpid()

    def install(self, label_of_task: Any) -> None:
        """(worker) Replace sys.stdout/sys.stderr; ``label_of_task()`` is the calling thread's
        task name, or None outside tasks."""
        rank, pid = self.ctx.rank, self.pid

        def label() -> str:
            name = label_of_task()
            return f"{name} pid={pid}, rank={rank}" if name is not None else f"rank={rank}"
        self.saved = (sys.stdout, sys.stderr)
        lines = Lines(self.ctx, {STDOUT: sys.stdout, STDERR: sys.stderr})
        self.forwarders = [Forwarder(STDOUT, sys.stdout, lines, label),
                           Forwarder(STDERR, sys.stderr, lines, label)]
        sys.stdout, sys.stderr = self.forwarders

    def task_ended(self) -> None:
        """(task thread) Queue the thread's partial lines before its result is reported."""
        for f in self.forwarders:
            f.end_line()

    def uninstall(self) -> None:
        """Put the process's own streams back (Executor mode: the rank goes on after)."""
        if self.saved is not None and (sys.stdout, sys.stderr) == tuple(self.forwarders):
            for f in self.forwarders:
                f.end_line()
            sys.stdout, sys.stderr = self.saved
        self.saved = None

    @staticmethod
    def on_output(source: int, msg: P.Output) -> None:
        """(rank 0) Write forwarded lines to this process's stdout/stderr."""
        streams = {STDOUT: sys.stdout, STDERR: sys.stderr}
        touched = set()
        for stream, label, text in msg.items:
            out = streams[stream]
            _write(out, label, text)
            touched.add(stream)
        for stream in touched:
            try:
                streams[stream].flush()
            except (OSError, ValueError):
                pass
