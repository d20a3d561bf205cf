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

Parts: the clock and event queue are :mod:`.events`'; the streams and their drains are
:mod:`.streams`' (shared with :mod:`.mpi`); here: the network's delays, deliveries and kills
(:class:`Network`), MPI's matching of chunks (:class:`Matching`) and the transport.
"""
from __future__ import annotations

import logging
import pickle
import random
from collections import defaultdict, deque
from typing import Any, Callable, NamedTuple, Optional

from .events import EventQueue
from .streams import Requests, Stream, StreamError, StreamTable, StreamTransport

log = logging.getLogger("hoplite_mpi")

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


class Matching(Requests):
    """One rank's simulated point-to-point requests: chunks matched by (source, tag) in order,
    as MPI does (see the module docstring), for the rank's :class:`~.streams.StreamTable`.

    Args:
        net: the network.  rank: this rank.
        failed, broken: the owning transport's sets of excluded ranks and of ranks whose
            operations fail (dead), shared with it.
    """

    def __init__(self, net: "Network", rank: int, failed: set, broken: set) -> None:
        self.net, self.rank = net, rank
        self.failed, self.broken = failed, broken
        self.unexpected: dict[tuple[int, int], deque] = defaultdict(deque)   # (src, tag) -> chunks
        self.posted: dict[tuple[int, int], deque] = defaultdict(deque)       # (src, tag) -> _Req

    def arrived(self, src: int, tag: int, chunk: _Chunk) -> None:
        """A chunk from ``src`` arrived: match the first posted receive, else queue it."""
        posted = self.posted.get((src, tag))
        while posted:
            req = posted.popleft()
            if not req.cancelled:
                self._match(req, chunk)
                return
        self.unexpected[(src, tag)].append(chunk)

    def _match(self, req: _Req, chunk: _Chunk) -> None:
        chunk.send_req.done = True       # (rendezvous: the send completes once matched)
        n = len(chunk.data)
        if n > req.nbytes:
            req.error = ERR_TRUNCATE
        elif req.buf is not None and n:
            req.buf[:n] = chunk.data
        req.done = True

    def drop_unexpected(self) -> None:
        """Drop every chunk that arrived unmatched (its send completes)."""
        for key in list(self.unexpected):
            for chunk in self.unexpected.pop(key):
                chunk.send_req.done = True

    # --- Requests ---------------------------------------------------------------------------

    def post(self, s: Stream, buf: Any) -> _Req:
        if s.send:
            req = _Req(None, len(buf))
            self.net.post(self.rank, s.peer, self.net.deliver_chunk, self.rank, s.peer, s.tag,
                          _Chunk(bytes(buf), req))
            return req
        req = _Req(buf, len(buf))
        waiting = self.unexpected.get((s.peer, s.tag))
        if waiting:
            self._match(req, waiting.popleft())
        else:
            self.posted[(s.peer, s.tag)].append(req)
        return req

    def test(self, req: _Req) -> bool:
        if req.done and req.error:
            raise StreamError(f"MPI error class {req.error} (message truncated)", False, req.error)
        return req.done

    def done(self, req: _Req) -> bool:
        return req.done

    def cancel(self, req: _Req) -> None:
        """Cancel a posted receive: one not matched yet is withdrawn (completes, cancelled).
        (A send's request completes too; its chunk is delivered all the same.)"""
        if not req.done:
            req.cancelled = req.done = True

    withdraw = cancel

    def down(self, peer: int) -> Optional[tuple[str, int]]:
        if peer in self.failed:
            return "rank excluded (declared dead)", 0
        if peer in self.broken:
            return "MPI_ERR_PROC_FAILED (simulated)", ERR_PROC_FAILED
        return None

    def discard_next(self, peer: int, tag: int) -> Optional[tuple[Any, Any]]:
        waiting = self.unexpected.get((peer, tag))
        if not waiting:
            return None
        waiting.popleft().send_req.done = True
        return _DISCARDED, None

    def now(self) -> float:
        return self.net.now


_DISCARDED = _Req(None, 0)       # (a chunk discarded by a drain: matched at once)
_DISCARDED.done = True


class Delays(NamedTuple):
    """Seconds of the network's random delays: a message's delivery takes ``latency`` (min,
    max), or up to ``slow`` for one in ``slow_every`` (on average: reorders pairs); a live rank
    learns of a kill after ``detect`` (min, max)."""

    latency: tuple[float, float] = (1e-5, 5e-4)
    slow: float = 5e-3
    slow_every: int = 20
    detect: tuple[float, float] = (1e-3, 5e-2)


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
        tag_ub: the largest tag (MPI's ``TAG_UB``).

    Attributes:
        killed: the ranks ended by :meth:`kill`.  delivered: messages delivered so far.
        record: None, or a list to which each delivered control batch is appended as
            ``(time, src, dst, batch)``.
    """

    def __init__(self, size: int, rng: random.Random, window: int = 4, eager: bool = True,
                 latency: tuple[float, float] = (1e-5, 5e-4), slow: float = 5e-3,
                 slow_every: int = 20, detect: tuple[float, float] = (1e-3, 5e-2),
                 tag_ub: int = 32767) -> None:
        self.size = size
        self.rng = rng
        self.eager = eager
        self.delays = Delays(latency, slow, slow_every, detect)
        self.tag_ub = tag_ub
        self.killed: set[int] = set()
        self.delivered = 0
        self.record: Optional[list] = None
        self.queue = EventQueue()
        self.transports = [LocalTransport(self, r, window) for r in range(size)]

    # --- time and events (see EventQueue) ---------------------------------------------------

    @property
    def now(self) -> float:
        """Virtual seconds."""
        return self.queue.now

    def clock(self) -> float:
        """Virtual seconds (the ranks' injected clock)."""
        return self.queue.now

    def schedule(self, when: float, fn: Callable, *args: Any) -> list:
        """Run ``fn(*args)`` at virtual time ``when``; returns the event (cancel: ``ev[0] = None``)."""
        return self.queue.schedule(when, fn, *args)

    def next_time(self) -> Optional[float]:
        """When the next event is due (None: none pending)."""
        return self.queue.next_time()

    def run_due(self) -> int:
        """Run every event due by ``now`` (in time order); returns how many ran."""
        return self.queue.run_due()

    def advance(self, when: float) -> None:
        """Move virtual time forward to ``when`` (never backwards)."""
        self.queue.advance(when)

    def post(self, src: int, dst: int, fn: Callable, *args: Any) -> None:
        """Deliver a message from ``src`` to ``dst`` (``fn(*args)``, ``args[1] == dst``) after a
        random delay, after the pair's earlier ones."""
        lo, hi = self.delays.latency
        if self.rng.randrange(self.delays.slow_every) == 0:
            hi = self.delays.slow
        self.queue.post(src, dst, self.rng.uniform(lo, hi), fn, *args)

    # --- deliveries ---------------------------------------------------------------------------

    def deliver_control(self, src: int, dst: int, blob: bytes, req: _Req) -> None:
        if dst in self.killed:
            return
        self.delivered += 1
        req.done = True
        batch = pickle.loads(blob)
        if self.record is not None:
            self.record.append((self.now, src, dst, batch))
        self.transports[dst].inbox.append((src, batch))

    def deliver_chunk(self, src: int, dst: int, tag: int, chunk: _Chunk) -> None:
        if dst in self.killed:
            return
        self.delivered += 1
        if self.eager:
            chunk.send_req.done = True
        self.transports[dst].matching.arrived(src, tag, chunk)

    # --- failures -----------------------------------------------------------------------------

    def kill(self, rank: int) -> None:
        """End ``rank`` now (see the module docstring).  Killing a dead rank does nothing."""
        if rank in self.killed:
            return
        self.killed.add(rank)
        by_dst = self.queue.take(rank)
        for dst in sorted(by_dst):
            events = sorted(by_dst[dst], key=lambda p: p[0])
            keep = self.rng.randint(0, len(events))
            for _, ev in events[keep:]:
                ev[0] = None
        lo, hi = self.delays.detect
        for r in range(self.size):
            if r != rank and r not in self.killed:
                t = self.transports[r]
                self.schedule(self.now + self.rng.uniform(lo, hi), t.broken.add, rank)
                self.schedule(self.now + self.rng.uniform(lo, hi), t.noticed.append, rank)


class LocalTransport(StreamTransport):
    """One rank's end of a :class:`Network` (see the module docstring for the semantics)."""

    ft = True

    def __init__(self, net: Network, rank: int, window: int = 4) -> None:
        self.net = net
        self.rank = rank
        self.size = net.size
        self.failed: set[int] = set()          # reported by failures(), or excluded
        self.broken: set[int] = set()          # operations with these ranks fail (dead)
        self.noticed: list[int] = []           # dead ranks failures() has not reported yet
        self.inbox: deque = deque()            # (source, batch) arrived
        self._sends: list[_Req] = []           # control sends not yet arrived
        self.matching = Matching(net, rank, self.failed, self.broken)
        self.streams = StreamTable(self.matching, window, net.tag_ub)

    # --- control ----------------------------------------------------------------------------

    def send(self, dest: int, batch: list) -> None:
        if dest in self.failed or dest in self.broken:
            return
        req = _Req(None, 0, (dest,))
        self._sends.append(req)
        self.batches_sent += 1
        self.net.post(self.rank, dest, self.net.deliver_control, self.rank, dest,
                      pickle.dumps(batch, protocol=5), req)

    def receive(self) -> list[tuple[int, list]]:
        got = list(self.inbox)
        self.inbox.clear()
        self.batches_received += len(got)
        return got

    def failures(self) -> list[int]:
        new = sorted(set(self.noticed) - self.failed)
        self.noticed.clear()
        self.failed.update(new)
        return new

    def exclude(self, rank: int) -> None:
        self.failed.add(rank)

    def wait(self, timeout: float) -> bool:
        return False      # (no sleeping in a simulation: the simulator moves the clock)

    # --- streams (StreamTransport: a StreamTable) ------------------------------------------

    def _prune_sends(self) -> bool:
        """Forget completed control sends; one to a rank found dead completes with an error
        (dropped), as in MPI.  Returns whether any completed."""
        before = len(self._sends)
        gone = self.broken | self.failed
        self._sends = [r for r in self._sends if not r.done and r.key[0] not in gone]
        return len(self._sends) != before

    # --- shutdown ---------------------------------------------------------------------------

    def drain(self) -> list[tuple[int, list]]:
        """Control batches that arrived; stream chunks that arrived unmatched are dropped."""
        self.matching.drop_unexpected()
        return self.receive()

    def close(self) -> None:
        self.streams.close()
        self._sends = []
