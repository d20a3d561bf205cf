"""In-process transport: N ranks in one process over one seeded event queue and a virtual clock.

:class:`Network` holds the ranks' :class:`LocalTransport` objects, the event queue and the
virtual time (``Network.now``, seconds).  Nothing here reads the wall clock or sleeps: time only
moves when the owner (the simulator, :mod:`hoplite_mpi.sim`) calls :meth:`Network.advance`.

Semantics (those of :mod:`.mpi` under ULFM, which the runtime relies on):

- Every message is an event delivered at a random future virtual time.  Messages from one rank
  to another arrive in the order they were sent, whatever their kind (control batch or stream
  chunk): MPI's non-overtaking order, which shutdown's any-tag drain depends on.  Messages of
  different pairs interleave at random.
- Control batches are pickled at send time and unpickled at delivery (no object is shared
  between ranks).  :meth:`LocalTransport.receive` returns those that have arrived.
- Stream chunks are matched like MPI point-to-point messages: by (source, tag), in order; a
  chunk that arrives before its receive is posted waits in the receiver's unexpected queue and
  is matched when the receive is posted.  A chunk longer than the posted buffer fails that
  receive with a non-death error (MPI_ERR_TRUNCATE).  A chunk's bytes are copied when its send
  is posted (a partial copy may send only the chunks its ``available()`` allows).  A send
  completes when its chunk arrives (``eager``) or when it is matched (rendezvous).
- :meth:`Network.kill` ends a rank at once: its undelivered messages vanish except a random
  prefix per destination, messages to it are dropped, and every live rank learns of the death
  after random delays: first its operations with the dead rank fail (streams end with
  ``PeerFailure(dead=True)``), then :meth:`LocalTransport.failures` reports it (ULFM's
  ``MPI_Comm_get_failed``); the two delays are independent, so either may come first.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import pickle
import random
from collections import defaultdict, deque
from typing import Any, Callable, Optional

from ..protocol import Tag
from .base import PeerFailure, Transport, describe_streams

log = logging.getLogger("hoplite_mpi")

DRAIN_SECONDS = 30.0     # as transport.mpi (virtual seconds here)
ERR_TRUNCATE = 15        # MPI_ERR_TRUNCATE's error class in Open MPI
ERR_PROC_FAILED = 75     # MPIX_ERR_PROC_FAILED's error class in Open MPI


class _Req:
    """A posted point-to-point operation (one chunk).  ``done`` once it completed; ``error``: the
    MPI error class it completed with (0: none)."""

    __slots__ = ("buf", "nbytes", "done", "error", "cancelled", "key")

    def __init__(self, buf: Any, nbytes: int, key: tuple = ()) -> None:
        self.buf, self.nbytes, self.key = buf, nbytes, key
        self.done = self.cancelled = False
        self.error = 0


class _Chunk:
    """A stream chunk in flight or waiting in a receiver's unexpected queue."""

    __slots__ = ("data", "send_req")

    def __init__(self, data: bytes, send_req: _Req) -> None:
        self.data, self.send_req = data, send_req


class _Stream:
    __slots__ = ("peer", "tag", "chunks", "next", "inflight", "on_chunk", "on_done", "on_error",
                 "send", "available", "withdrawn")

    def __init__(self, peer, tag, chunks, send, on_chunk, on_done, on_error, available=None):
        self.peer, self.tag, self.chunks, self.send = peer, tag, chunks, send
        self.available = available
        self.withdrawn = False
        self.next = 0
        self.inflight: deque = deque()
        self.on_chunk, self.on_done, self.on_error = on_chunk, on_done, on_error


class _MPIError(Exception):
    def __init__(self, error_class: int, detail: str) -> None:
        super().__init__(detail)
        self.error_class = error_class


class Network:
    """The event queue, virtual clock and transports of ``size`` in-process ranks.

    Args:
        size: number of ranks.
        rng: the seeded source of every random choice (delays, kept prefixes).
        window: chunks in flight per stream (``Config.window``).
        eager: a stream send completes when its chunk arrives (small messages in MPI); False:
            when a receive matches it (rendezvous: a sender whose receiver never posts stays
            busy until the chunk is drained or the receiver dies).
        latency: (min, max) seconds of one message's delivery delay; every ``slow_every``-th
            message (on average) takes up to ``slow`` seconds instead (reorders pairs).
        detect: (min, max) seconds after a kill until a live rank learns of it.
    """

    def __init__(self, size: int, rng: random.Random, window: int = 4, eager: bool = True,
                 latency: tuple[float, float] = (1e-5, 5e-4), slow: float = 5e-3,
                 slow_every: int = 20, detect: tuple[float, float] = (1e-3, 5e-2),
                 tag_ub: int = 32767) -> None:
        self.size = size
        self.rng = rng
        self.now = 0.0
        self.eager = eager
        self.latency, self.slow, self.slow_every, self.detect = latency, slow, slow_every, detect
        self.tag_ub = tag_ub
        self.killed: set[int] = set()
        self.delivered = 0
        self.record: Optional[list] = None     # set to a list: (time, src, dst, batch) per batch
        self._events: list = []
        self._seq = itertools.count()
        self._last: dict[tuple[int, int], float] = {}      # (src, dst) -> last delivery time
        self._pending: dict[int, list] = defaultdict(list)  # src -> its undelivered events
        self._prune_at: dict[int, int] = {}
        self.transports = [LocalTransport(self, r, window) for r in range(size)]

    # --- time and events --------------------------------------------------------------------

    def clock(self) -> float:
        """Virtual seconds (the ranks' injected clock)."""
        return self.now

    def schedule(self, when: float, fn: Callable, *args: Any, src: int = -1) -> list:
        """Run ``fn(*args)`` at virtual time ``when``; returns the event (cancel: ``ev[0] = None``)."""
        ev = [fn, args]
        heapq.heappush(self._events, (when, next(self._seq), ev))
        if src >= 0:
            self._pending[src].append((when, ev))
        return ev

    def next_time(self) -> Optional[float]:
        """When the next event is due (None: none pending)."""
        while self._events and self._events[0][2][0] is None:
            heapq.heappop(self._events)
        return self._events[0][0] if self._events else None

    def run_due(self) -> int:
        """Run every event due by ``now`` (in time order); returns how many ran."""
        n = 0
        while self._events and self._events[0][0] <= self.now:
            _, _, ev = heapq.heappop(self._events)
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

    def _delay(self) -> float:
        lo, hi = self.latency
        if self.rng.randrange(self.slow_every) == 0:
            hi = self.slow
        return self.rng.uniform(lo, hi)

    def _post(self, src: int, dst: int, fn: Callable, *args: Any) -> None:
        """Deliver a message from ``src`` to ``dst`` later, after the pair's earlier ones."""
        when = max(self.now + self._delay(), self._last.get((src, dst), 0.0))
        self._last[(src, dst)] = when
        pending = self._pending[src]
        if len(pending) >= self._prune_at.get(src, 64):      # (forget delivered ones)
            pending[:] = [p for p in pending if p[1][0] is not None]
            self._prune_at[src] = max(64, 2 * len(pending))
        self.schedule(when, fn, *args, src=src)

    # --- deliveries ---------------------------------------------------------------------------

    def _deliver_control(self, src: int, dst: int, blob: bytes, req: _Req) -> None:
        if dst in self.killed:
            return
        self.delivered += 1
        req.done = True
        batch = pickle.loads(blob)
        if self.record is not None:
            self.record.append((self.now, src, dst, batch))
        self.transports[dst]._inbox.append((src, batch))

    def _deliver_chunk(self, src: int, dst: int, tag: int, chunk: _Chunk) -> None:
        if dst in self.killed:
            return
        self.delivered += 1
        if self.eager:
            chunk.send_req.done = True
        self.transports[dst]._arrived(src, tag, chunk)

    # --- failures -----------------------------------------------------------------------------

    def kill(self, rank: int) -> None:
        """End ``rank`` now (see the module docstring).  Killing a dead rank does nothing."""
        if rank in self.killed:
            return
        self.killed.add(rank)
        by_dst: dict[Any, list] = defaultdict(list)
        for when, ev in self._pending.pop(rank, ()):
            if ev[0] is not None:
                dst = ev[1][1]
                by_dst[dst].append((when, ev))
        for dst in sorted(by_dst):
            events = sorted(by_dst[dst], key=lambda p: p[0])
            keep = self.rng.randint(0, len(events))
            for _, ev in events[keep:]:
                ev[0] = None
        lo, hi = self.detect
        for r in range(self.size):
            if r != rank and r not in self.killed:
                t = self.transports[r]
                self.schedule(self.now + self.rng.uniform(lo, hi), t._link_failed, rank)
                self.schedule(self.now + self.rng.uniform(lo, hi), t._noticed, rank)


class LocalTransport(Transport):
    """One rank's end of a :class:`Network` (see the module docstring for the semantics)."""

    ft = True

    def __init__(self, net: Network, rank: int, window: int = 4) -> None:
        self.net = net
        self.rank = rank
        self.size = net.size
        self.window = window
        self.failed: set[int] = set()          # reported by failures(), or excluded
        self._broken: set[int] = set()         # operations with these ranks fail (dead)
        self._noticed_dead: list[int] = []     # dead ranks failures() has not reported yet
        self._inbox: deque = deque()           # (source, batch) arrived
        self._unexpected: dict[tuple[int, int], deque] = defaultdict(deque)   # (src, tag) -> chunks
        self._posted: dict[tuple[int, int], deque] = defaultdict(deque)       # (src, tag) -> _Req
        self._sends: list[_Req] = []           # control sends not yet arrived
        self._streams: list[_Stream] = []
        self._drains: list[list] = []          # [peer, tag, deadline, [_Req]] as transport.mpi

    # --- events from the network ----------------------------------------------------------

    def _link_failed(self, rank: int) -> None:
        self._broken.add(rank)

    def _noticed(self, rank: int) -> None:
        self._noticed_dead.append(rank)

    def _arrived(self, src: int, tag: int, chunk: _Chunk) -> None:
        posted = self._posted.get((src, tag))
        while posted:
            req = posted.popleft()
            if not req.cancelled:
                self._match(req, chunk)
                return
        self._unexpected[(src, tag)].append(chunk)

    def _match(self, req: _Req, chunk: _Chunk) -> None:
        chunk.send_req.done = True       # (rendezvous: the send completes once matched)
        n = len(chunk.data)
        if n > req.nbytes:
            req.error = ERR_TRUNCATE
        elif req.buf is not None and n:
            req.buf[:n] = chunk.data
        req.done = True

    # --- control ----------------------------------------------------------------------------

    def send(self, dest: int, batch: list) -> None:
        if dest in self.failed or dest in self._broken:
            return
        req = _Req(None, 0, (dest,))
        self._sends.append(req)
        self.net._post(self.rank, dest, self.net._deliver_control, self.rank, dest,
                       pickle.dumps(batch, protocol=5), req)

    def receive(self) -> list[tuple[int, list]]:
        got = list(self._inbox)
        self._inbox.clear()
        return got

    def failures(self) -> list[int]:
        new = sorted(set(self._noticed_dead) - self.failed)
        self._noticed_dead.clear()
        self.failed.update(new)
        return new

    def exclude(self, rank: int) -> None:
        self.failed.add(rank)

    def wait(self, timeout: float) -> bool:
        return False      # (no sleeping in a simulation: the simulator moves the clock)

    # --- streams ----------------------------------------------------------------------------

    def data_tag(self, tag: int) -> int:
        """The wire tag of stream ``tag`` (as :meth:`.mpi.MPITransport.data_tag`)."""
        return Tag.DATA_BASE + tag % (self.net.tag_ub - Tag.DATA_BASE)

    def send_stream(self, dest, tag, chunks, on_done, on_error, available=None) -> None:
        self._streams.append(_Stream(dest, self.data_tag(tag), chunks, True, None, on_done,
                                     on_error, available))

    def recv_stream(self, source, tag, chunks, on_chunk, on_error) -> None:
        self._streams.append(_Stream(source, self.data_tag(tag), chunks, False, on_chunk, None,
                                     on_error))

    def cancel_stream(self, peer, tag) -> None:
        wire = self.data_tag(tag)
        for s in self._streams:
            if not s.send and s.peer == peer and s.tag == wire:
                for req in s.inflight:
                    self._cancel(req)
                s.inflight.clear()
                s.next = len(s.chunks)

    def fail_stream(self, peer, tag, failure) -> None:
        wire = self.data_tag(tag)
        for s in self._streams:
            if not s.send and s.peer == peer and s.tag == wire:
                self._streams.remove(s)
                self._fail(s, failure.detail, failure.dead, failure.mpi_error, failure.refused)
                return

    def stop_send_stream(self, peer, tag) -> None:
        for s in self._streams:
            if s.send and s.peer == peer and s.tag == tag:
                s.chunks = s.chunks[:s.next]

    def _cancel(self, req: _Req) -> None:
        """Cancel a posted receive: one not matched yet is withdrawn (completes, cancelled)."""
        if not req.done:
            req.cancelled = req.done = True

    def _post_chunk(self, s: _Stream, buf: Any) -> _Req:
        if s.send:
            req = _Req(None, len(buf))
            self.net._post(self.rank, s.peer, self.net._deliver_chunk, self.rank, s.peer, s.tag,
                           _Chunk(bytes(buf), req))
            return req
        req = _Req(buf, len(buf))
        waiting = self._unexpected.get((s.peer, s.tag))
        if waiting:
            self._match(req, waiting.popleft())
        else:
            self._posted[(s.peer, s.tag)].append(req)
        return req

    def _drive(self, s: _Stream) -> tuple[bool, bool]:
        """Advance one stream; returns (finished, progressed).  Raises _MPIError."""
        progressed = False
        while s.inflight and s.inflight[0].done:
            req = s.inflight.popleft()
            if req.error:
                raise _MPIError(req.error, f"MPI error class {req.error} (message truncated)")
            progressed = True
            if s.on_chunk is not None:
                s.on_chunk(req.nbytes)
        limit = len(s.chunks) if s.available is None else min(len(s.chunks), s.available())
        while s.next < limit and len(s.inflight) < self.window:
            s.inflight.append(self._post_chunk(s, s.chunks[s.next]))
            s.next += 1
            progressed = True
        finished = s.next >= len(s.chunks) and not s.inflight
        if finished and s.on_done is not None:
            s.on_done()
        return finished, progressed

    def _end(self, s: _Stream, detail: str, dead: bool, mpi_error: int = 0) -> None:
        if not s.send and not dead:
            self._drains.append([s.peer, s.tag, self.net.now + DRAIN_SECONDS, list(s.inflight)])
            s.inflight.clear()
        self._fail(s, detail, dead, mpi_error)

    def _fail(self, s: _Stream, detail: str, dead: bool = True, mpi_error: int = 0,
              refused: bool = False) -> None:
        for req in s.inflight:
            if not s.send:
                self._cancel(req)
        s.inflight.clear()
        try:
            s.on_error(PeerFailure(s.peer, detail, dead, mpi_error, s.tag, refused))
        except Exception:
            log.exception("error handler of a stream with rank %d failed", s.peer)

    def _progress_drains(self) -> None:
        now = self.net.now
        keep = []
        for d in self._drains:
            peer, tag, _, reqs = d
            reqs[:] = [r for r in reqs if not r.done]
            if reqs and now > d[2]:
                for r in reqs:
                    self._cancel(r)
            while peer not in self.failed and peer not in self._broken:
                waiting = self._unexpected.get((peer, tag))
                if not waiting:
                    break
                waiting.popleft().send_req.done = True
                d[2] = now + DRAIN_SECONDS
            reqs[:] = [r for r in reqs if not r.done]
            if peer not in self.failed and (reqs or now < d[2]):
                keep.append(d)
        self._drains = keep

    def _prune_sends(self) -> bool:
        """Forget completed control sends; one to a rank found dead completes with an error
        (dropped), as in MPI.  Returns whether any completed."""
        before = len(self._sends)
        gone = self._broken | self.failed
        self._sends = [r for r in self._sends if not r.done and r.key[0] not in gone]
        return len(self._sends) != before

    def progress(self) -> bool:
        progressed = self._prune_sends()
        if self._streams:
            keep = []
            for s in self._streams:
                if s.peer in self.failed or s.peer in self._broken:
                    why = "rank excluded (declared dead)" if s.peer in self.failed else \
                        "MPI_ERR_PROC_FAILED (simulated)"
                    self._fail(s, why, True, 0 if s.peer in self.failed else ERR_PROC_FAILED)
                    progressed = True
                    continue
                try:
                    finished, moved = self._drive(s)
                except _MPIError as exc:
                    self._end(s, str(exc), dead=False, mpi_error=exc.error_class)
                    progressed = True
                    continue
                except Exception as exc:
                    log.exception("rank %d: a stream callback failed", self.rank)
                    self._end(s, f"{type(exc).__name__}: {exc}", dead=False)
                    progressed = True
                    continue
                progressed |= moved or finished
                if not finished:
                    keep.append(s)
            self._streams = keep
        if self._drains:
            self._progress_drains()
        return progressed

    def stream_summary(self) -> list[str]:
        return describe_streams(self._streams)

    def busy(self) -> bool:
        return bool(self._streams or self._sends)

    # --- shutdown ---------------------------------------------------------------------------

    def drain(self) -> list[tuple[int, list]]:
        """Control batches that arrived; stream chunks that arrived unmatched are dropped."""
        for key in list(self._unexpected):
            for chunk in self._unexpected.pop(key):
                chunk.send_req.done = True
        return self.receive()

    def quiesce(self) -> bool:
        progressed = self._prune_sends()
        keep = []
        for s in self._streams:
            if s.peer in self.failed or s.peer in self._broken:
                for req in s.inflight:
                    self._cancel(req)
                s.inflight.clear()
                progressed = True
                continue
            if not s.send and not s.withdrawn:
                for req in s.inflight:
                    self._cancel(req)
                s.withdrawn = True
            still = deque(r for r in s.inflight if not r.done)
            progressed |= len(still) != len(s.inflight)
            s.inflight = still
            if still:
                keep.append(s)
        self._streams = keep
        if self._drains:
            for d in self._drains:
                for r in d[3]:
                    self._cancel(r)
                d[3][:] = [r for r in d[3] if not r.done]
            before = len(self._drains)
            self._drains = [d for d in self._drains if d[3] and d[0] not in self.failed]
            progressed |= len(self._drains) != before
        return progressed

    def idle(self) -> bool:
        return not self._sends and not self._streams and not self._drains

    def close(self) -> None:
        for s in self._streams:
            for req in s.inflight:
                self._cancel(req)
        self._streams = []
        self._sends = []
