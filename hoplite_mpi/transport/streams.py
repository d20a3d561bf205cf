"""Chunk streams over point-to-point requests: what :mod:`.mpi` and :mod:`.local` share.

A :class:`StreamTable` holds one rank's data streams (a window of chunk requests in flight per
stream) and the *drains* of receive streams that failed for another reason than a death.  It
drives them through a :class:`Requests` object, the transport's own requests (MPI's, or the
simulated ones of :mod:`.local`), so the stream and shutdown logic exists once.

Drains: a receive stream that failed for another reason than a death (an MPI error such as
``MPI_ERR_TRUNCATE``, or a callback's bug) keeps matching (and discarding) its sender's messages
until none came for ``DRAIN_SECONDS``; the sender posts no new chunks once told
(:meth:`StreamTable.stop_send`).  So no send of the sender stays unmatched: it would never
complete (a busy engine, and a pending request at ``MPI_Finalize``).  The drain's receives
already in flight are not cancelled (one already matched would go on writing into a buffer freed
meanwhile): the drain waits for them, keeping their buffers.
"""
from __future__ import annotations

import abc
import logging
from collections import deque
from typing import Any, Optional, Sequence

from ..protocol import Tag
from .base import PeerFailure, Transport

log = logging.getLogger("hoplite_mpi")

DRAIN_SECONDS = 30.0     # (on the transport's clock: virtual seconds in a simulation)


class StreamError(Exception):
    """A chunk request failed with MPI error class ``mpi_error``; ``dead``: a ULFM failure class
    (the peer is gone), else an error of this transfer only."""

    def __init__(self, detail: str, dead: bool, mpi_error: int) -> None:
        super().__init__(detail)
        self.detail, self.dead, self.mpi_error = detail, dead, mpi_error


class Stream:
    """One stream: ``chunks`` sent to (``send``) or received from ``peer`` with transport tag
    ``tag``; ``next``: the first chunk not posted yet; ``inflight``: ``(request, nbytes)`` in
    order; ``withdrawn``: (shutdown) its posted receives were cancelled."""

    __slots__ = ("peer", "tag", "chunks", "next", "inflight", "on_chunk", "on_done", "on_error",
                 "send", "available", "withdrawn")

    def __init__(self, peer, tag, chunks, send, on_chunk, on_done, on_error, available=None):
        self.peer, self.tag, self.chunks, self.send = peer, tag, chunks, send
        self.available = available
        self.withdrawn = False
        self.next = 0
        self.inflight: deque = deque()
        self.on_chunk, self.on_done, self.on_error = on_chunk, on_done, on_error


class Requests(abc.ABC):
    """A transport's point-to-point requests, as a :class:`StreamTable` uses them.

    Attributes:
        failed: the ranks excluded (reported dead or declared dead); the same set the
            transport updates.
    """

    failed: set

    @abc.abstractmethod
    def post(self, s: Stream, buf: Any) -> Any:
        """Start sending (``s.send``) or receiving chunk ``buf`` of ``s``; returns the request.
        Raises :class:`StreamError` if MPI refuses it."""

    @abc.abstractmethod
    def test(self, req: Any) -> bool:
        """Whether ``req`` completed.  Raises :class:`StreamError` if it completed with an error."""

    @abc.abstractmethod
    def done(self, req: Any) -> bool:
        """Whether ``req`` completed, an error counting as completion (never raises)."""

    @abc.abstractmethod
    def cancel(self, req: Any) -> None:
        """Cancel ``req`` and forget it (a stream that ends)."""

    @abc.abstractmethod
    def withdraw(self, req: Any) -> None:
        """Ask to cancel ``req`` and keep it: it completes, cancelled or matched."""

    @abc.abstractmethod
    def down(self, peer: int) -> Optional[tuple[str, int]]:
        """``(detail, mpi_error)`` if operations with ``peer`` fail now (it is dead), else None."""

    @abc.abstractmethod
    def discard_next(self, peer: int, tag: int) -> Optional[tuple[Any, Any]]:
        """Start receiving (into scratch space, to drop it) the next message from ``peer`` with
        ``tag`` that has arrived: ``(request, buffer)``, or None if none has arrived (or the
        probe failed)."""

    @abc.abstractmethod
    def now(self) -> float:
        """Seconds on the transport's clock (drain deadlines)."""


def describe_streams(streams: Sequence[Stream]) -> list[str]:
    """Lines for :meth:`Transport.stream_summary`."""
    return [f"stream {'send to' if s.send else 'receive from'} {s.peer} tag {s.tag}: "
            f"chunk {s.next}/{len(s.chunks)}, {len(s.inflight)} in flight" for s in list(streams)]


class StreamTable:
    """One rank's data streams and drains, driven through ``requests``.

    Args:
        requests: the transport's :class:`Requests`.
        window: chunks in flight per stream (``Config.window``).
        tag_ub: the largest tag the transport allows (MPI's ``TAG_UB``).

    Stream callbacks run inside :meth:`progress`; one that raises fails its own stream only
    (logged), never the table.
    """

    def __init__(self, requests: Requests, window: int, tag_ub: int) -> None:
        self.requests = requests
        self.window = window
        self.tag_ub = tag_ub
        self.streams: list[Stream] = []
        self.drains: list[list] = []     # [peer, tag, deadline, [(request, buffer)]]
        self.bytes_sent = 0              # object bytes whose send request completed
        self.bytes_received = 0          # object bytes whose receive request completed

    def data_tag(self, tag: int) -> int:
        """The transport tag of stream ``tag`` (wrapped below the tag upper bound)."""
        return Tag.DATA_BASE + tag % (self.tag_ub - Tag.DATA_BASE)

    # --- the Transport methods --------------------------------------------------------------

    def send(self, dest, tag, chunks, on_done, on_error, available=None) -> None:
        self.streams.append(Stream(dest, self.data_tag(tag), chunks, True, None, on_done, on_error,
                                   available))

    def receive(self, source, tag, chunks, on_chunk, on_error) -> None:
        self.streams.append(Stream(source, self.data_tag(tag), chunks, False, on_chunk, None,
                                   on_error))

    def cancel(self, peer: int, tag: int) -> None:
        """Abandon the receive stream from ``peer`` with stream ``tag``: its requests are
        cancelled; it is dropped at the next :meth:`progress`."""
        wire = self.data_tag(tag)
        for s in self.streams:
            if not s.send and s.peer == peer and s.tag == wire:
                for req, _ in s.inflight:
                    self.requests.cancel(req)
                s.inflight.clear()
                s.next = len(s.chunks)

    def fail(self, peer: int, tag: int, failure: PeerFailure) -> None:
        """End the receive stream from ``peer`` with stream ``tag`` now, with ``failure`` (its
        posted receives are cancelled: the peer refused, they can match nothing)."""
        wire = self.data_tag(tag)
        for s in self.streams:
            if not s.send and s.peer == peer and s.tag == wire:
                self.streams.remove(s)
                self._fail(s, failure.detail, failure.dead, failure.mpi_error, failure.refused)
                return

    def stop_send(self, peer: int, wire_tag: int) -> None:
        """Post no more chunks of the send stream to ``peer``; it finishes once the chunks in
        flight complete."""
        for s in self.streams:
            if s.send and s.peer == peer and s.tag == wire_tag:
                s.chunks = s.chunks[:s.next]

    def busy(self) -> bool:
        return bool(self.streams)

    def idle(self) -> bool:
        return not self.streams and not self.drains

    def summary(self) -> list[str]:
        return describe_streams(self.streams)

    # --- progress ---------------------------------------------------------------------------

    def progress(self) -> bool:
        """Drive every stream and drain; returns whether anything completed.  A stream whose
        peer is down, whose request failed or whose callback raised ends with its ``on_error``."""
        progressed = False
        if self.streams:
            keep = []
            for s in self.streams:
                why = self.requests.down(s.peer)
                if why is not None:     # (also a hung rank declared dead: no MPI error)
                    self._fail(s, why[0], True, why[1])
                    progressed = True
                    continue
                try:
                    finished, moved = self._drive(s)
                except StreamError as exc:
                    # only a death's error classes mean the peer is gone; any other error (e.g.
                    # MPI_ERR_TRUNCATE) fails this stream's objects, not the rank
                    self._end(s, exc.detail, exc.dead, exc.mpi_error)
                    progressed = True
                    continue
                except Exception as exc:   # a callback's bug: fail this stream only
                    log.exception("a stream callback failed (stream with rank %d)", s.peer)
                    self._end(s, f"{type(exc).__name__}: {exc}", dead=False)
                    progressed = True
                    continue
                progressed |= moved or finished
                if not finished:
                    keep.append(s)
            self.streams = keep
        if self.drains:
            self._progress_drains()
        return progressed

    def _drive(self, s: Stream) -> tuple[bool, bool]:
        """Advance one stream; returns (finished, progressed).  Raises StreamError."""
        progressed = False
        while s.inflight and self.requests.test(s.inflight[0][0]):
            _, nbytes = s.inflight.popleft()
            progressed = True
            if s.send:
                self.bytes_sent += nbytes
            else:
                self.bytes_received += nbytes
                if s.on_chunk is not None:
                    s.on_chunk(nbytes)
        limit = len(s.chunks) if s.available is None else min(len(s.chunks), s.available())
        while s.next < limit and len(s.inflight) < self.window:
            buf = s.chunks[s.next]
            s.inflight.append((self.requests.post(s, buf), len(buf)))
            s.next += 1
            progressed = True
        finished = s.next >= len(s.chunks) and not s.inflight
        if finished and s.on_done is not None:
            s.on_done()
        return finished, progressed

    def _end(self, s: Stream, detail: str, dead: bool, mpi_error: int = 0) -> None:
        """Fail stream ``s``; a receive stream that failed for another reason than a death
        drains its sender's remaining messages (see the module docstring)."""
        if not s.send and not dead:
            self.drains.append([s.peer, s.tag, self.requests.now() + DRAIN_SECONDS,
                                list(s.inflight)])
            s.inflight.clear()
        self._fail(s, detail, dead, mpi_error)

    def _fail(self, s: Stream, detail: str, dead: bool = True, mpi_error: int = 0,
              refused: bool = False) -> None:
        """End stream ``s``: cancel its requests, report the failure to its ``on_error``."""
        for req, _ in s.inflight:
            self.requests.cancel(req)
        s.inflight.clear()
        try:
            s.on_error(PeerFailure(s.peer, detail, dead, mpi_error, s.tag, refused))
        except Exception:   # (the engine goes on; the runtime logs its own errors)
            log.exception("error handler of a stream with rank %d failed", s.peer)

    def _progress_drains(self) -> None:
        rq = self.requests
        now = rq.now()
        keep = []
        for d in self.drains:
            peer, tag, _, reqs = d
            reqs[:] = [(r, b) for r, b in reqs if not rq.done(r)]
            if reqs and now > d[2]:     # silent for DRAIN_SECONDS: what is posted will not match
                for r, _ in reqs:
                    rq.withdraw(r)
            while rq.down(peer) is None:
                got = rq.discard_next(peer, tag)
                if got is None:
                    break
                reqs.append(got)
                d[2] = now + DRAIN_SECONDS
            reqs[:] = [(r, b) for r, b in reqs if not rq.done(r)]
            if peer not in rq.failed and (reqs or now < d[2]):
                keep.append(d)
        self.drains = keep

    # --- shutdown ---------------------------------------------------------------------------

    def quiesce(self) -> bool:
        """Start nothing new: withdraw posted receives, drop the requests with dead peers, keep
        what is in flight until it completes.  New messages of a drained stream are the
        transport's :meth:`~.base.Transport.drain`'s now.  Returns whether anything completed."""
        rq = self.requests
        progressed = False
        keep = []
        for s in self.streams:
            if rq.down(s.peer) is not None:
                for req, _ in s.inflight:
                    rq.cancel(req)
                s.inflight.clear()
                progressed = True
                continue
            if not s.send and not s.withdrawn:
                for req, _ in s.inflight:   # posted receives: cancel (a matched one completes)
                    rq.withdraw(req)
                s.withdrawn = True
            still = deque(p for p in s.inflight if not rq.done(p[0]))
            progressed |= len(still) != len(s.inflight)
            s.inflight = still
            if still:
                keep.append(s)
        self.streams = keep
        if self.drains:
            for d in self.drains:
                for r, _ in d[3]:
                    rq.withdraw(r)
                d[3][:] = [(r, b) for r, b in d[3] if not rq.done(r)]
            before = len(self.drains)
            self.drains = [d for d in self.drains if d[3] and d[0] not in rq.failed]
            progressed |= len(self.drains) != before
        return progressed

    def close(self) -> None:
        """Cancel every stream's requests and forget the streams."""
        for s in self.streams:
            for req, _ in s.inflight:
                self.requests.cancel(req)
        self.streams = []


class StreamTransport(Transport):
    """A :class:`~.base.Transport` whose data streams are a :class:`StreamTable`
    (``self.streams``) and whose control sends are pending requests (``self._sends``, forgotten
    by :meth:`_prune_sends` once complete): what both transports do with them."""

    streams: StreamTable
    _sends: list
    batches_sent = 0                 # (counted by the subclasses; instance attributes once set)
    batches_received = 0
    control_bytes_received = 0

    @abc.abstractmethod
    def _prune_sends(self) -> bool:
        """Forget completed control sends (one to a dead rank counts as completed: dropped, as
        in MPI); returns whether any completed."""

    def data_tag(self, tag: int) -> int:
        """The transport tag of stream ``tag`` (wrapped below the tag upper bound)."""
        return self.streams.data_tag(tag)

    def send_stream(self, dest, tag, chunks, on_done, on_error, available=None) -> None:
        self.streams.send(dest, tag, chunks, on_done, on_error, available)

    def recv_stream(self, source, tag, chunks, on_chunk, on_error) -> None:
        self.streams.receive(source, tag, chunks, on_chunk, on_error)

    def cancel_stream(self, peer, tag) -> None:
        self.streams.cancel(peer, tag)

    def fail_stream(self, peer, tag, failure: PeerFailure) -> None:
        self.streams.fail(peer, tag, failure)

    def stop_send_stream(self, peer, tag) -> None:
        self.streams.stop_send(peer, tag)

    def progress(self) -> bool:
        # (completed control sends are only forgotten: nothing follows from them, so they do
        # not count as progress that would keep the engine polling, e.g. after a heartbeat)
        self._prune_sends()
        return self.streams.progress()

    def quiesce(self) -> bool:
        progressed = self._prune_sends()
        return self.streams.quiesce() or progressed

    def busy(self) -> bool:
        # pending control sends count: a large pickled batch goes by rendezvous and needs this
        # side to progress it
        return bool(self.streams.busy() or self._sends)

    def idle(self) -> bool:
        return not self._sends and self.streams.idle()

    def stream_summary(self) -> list[str]:
        return self.streams.summary()

    def traffic(self) -> dict:
        """Bytes moved by this rank's data streams (object chunks), and its control batches
        sent and received (their bytes where the transport knows them), since it started."""
        return {"bytes_sent": self.streams.bytes_sent,
                "bytes_received": self.streams.bytes_received,
                "control_batches_sent": self.batches_sent,
                "control_batches_received": self.batches_received,
                "control_bytes_received": self.control_bytes_received}
