"""The progress engine of one rank: the only thread that touches the rank's state and transport.

Other threads (the driver, task threads) hand it work with :meth:`Engine.call_soon`.  One
iteration (:meth:`Engine.step`)::

    run queued calls -> receive control batches -> dispatch messages -> report peer failures
      -> run due timers -> dispatch this rank's own messages -> drive data streams
      -> flush one batch per destination

:meth:`Engine.run` repeats steps on a thread of its own, sleeping by the :class:`Backoff` policy
when a step did nothing.  A simulation (:mod:`hoplite_mpi.sim`) calls :meth:`Engine.step` itself
with a virtual ``clock``; nothing here reads the wall clock except through ``clock``.

No role code lives here: roles register message handlers (:meth:`Engine.on`), peer-failure hooks
(``engine.peers``: :meth:`Peers.on_failure`) and timers (``engine.timers``:
:meth:`Timers.call_later`, :meth:`Timers.every`), and queue messages in ``engine.outbox``
(:meth:`Outbox.send`).
"""
from __future__ import annotations

import heapq
import itertools
import logging
import os
import queue
import threading
import time
from collections import defaultdict, deque
from typing import Any, Callable, Iterator, Optional

from .errors import RuntimeShutdownError

log = logging.getLogger("hoplite_mpi")

# seconds after the last activity during which an engine polls by yielding the core (no sleep):
# a reply usually follows within a round trip.  Measured on 4 ranks / 2 cores: a 1,000-task chain
# took ~7 s with plain exponential backoff and ~1 s with this window; idle cost is unaffected.
HOT_WINDOW = 0.005


def _sleep0() -> None:
    time.sleep(0)


class Backoff:
    """Idle policy (as mpi4py.futures' ``Backoff``): poll by yielding the core for
    :data:`HOT_WINDOW` seconds after any activity or while data streams are in flight, then sleep
    exponentially longer, from ``tmin`` up to ``tmax`` seconds, between polls (the ranks are
    usually oversubscribed: an idle rank must not spin)."""

    def __init__(self, tmax: float, tmin: float = 2.5e-5, hot_window: float = HOT_WINDOW) -> None:
        self.tmin, self.tmax, self.hot_window = tmin, tmax, hot_window
        self.delay = tmin
        self.last_active = 0.0

    def active(self, now: float) -> None:
        self.delay = self.tmin
        self.last_active = now

    def rung(self, now: float) -> None:
        """Woken by a doorbell: poll hot for a tenth of the window only (the message may lag its
        ring by a little); what it brings, if it is activity, starts the whole window.  A ring
        for a quiet message (a heartbeat) so costs ~0.5 ms of polling, not 5 ms."""
        self.delay = self.tmin
        self.last_active = max(self.last_active, now - 0.9 * self.hot_window)

    def idle_delay(self, now: float, busy: bool) -> float:
        """Seconds to sleep before the next poll (0: only yield the core)."""
        if busy or now - self.last_active < self.hot_window:
            return 0.0
        self.delay = min(self.tmax, self.delay * 2)
        return self.delay


class Timer:
    """A pending :meth:`Timers.call_later`; :meth:`cancel` keeps it from running."""

    __slots__ = ("when", "fn", "args", "cancelled")

    def __init__(self, when: float, fn: Callable, args: tuple) -> None:
        self.when, self.fn, self.args, self.cancelled = when, fn, args, False

    def cancel(self) -> None:
        self.cancelled = True


class Timers:
    """The engine's timers on its ``clock`` (engine thread only): a heap by due time, ties in
    the order they were set."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._heap: list = []
        self._seq = itertools.count()

    def call_later(self, delay: float, fn: Callable, *args: Any) -> Timer:
        """Run ``fn(*args)`` once ``delay`` seconds of ``clock`` have passed."""
        timer = Timer(self.clock() + delay, fn, args)
        heapq.heappush(self._heap, (timer.when, next(self._seq), timer))
        return timer

    def every(self, interval: float, fn: Callable[[float], None]) -> None:
        """Run ``fn(now)`` every ``interval`` seconds from now on."""
        def tick() -> None:
            self.call_later(interval, tick)
            fn(self.clock())
        self.call_later(interval, tick)

    def due(self) -> Iterator[Timer]:
        """The timers due now, earliest first, each taken off the heap as it is yielded (so one
        that an earlier one cancels, or sets due already, is seen as by a plain loop)."""
        heap = self._heap
        if heap:
            now = self.clock()
            while heap and heap[0][0] <= now:
                timer = heapq.heappop(heap)[2]
                if not timer.cancelled:
                    yield timer

    def next_delay(self, delay: float) -> float:
        """``delay``, shortened to the next timer's due time."""
        if self._heap:
            return max(0.0, min(delay, self._heap[0][0] - self.clock()))
        return delay


class Peers:
    """What the engine knows of the other ranks' liveness (engine thread).

    Attributes:
        dead: ranks lost (reported by the transport or declared dead); shared by every component.
        heard: ``rank -> clock()`` of its last control batch, while ``track_heard`` is set (rank
            0's heartbeat monitor, roles/membership.py, reads it).
        hooks: ``hook(rank)`` per rank the transport reports dead, in the order registered.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.dead: set[int] = set()
        self.heard: dict[int, float] = {}
        self.track_heard = False
        self.hooks: list[Callable[[int], None]] = []

    def on_failure(self, hook: Callable[[int], None]) -> None:
        """Call ``hook(rank)`` (engine thread) for each rank the transport reports dead."""
        self.hooks.append(hook)

    def heard_from(self, rank: int) -> None:
        """A control batch came from ``rank`` (any batch is a sign of life)."""
        if self.track_heard:
            self.heard[rank] = self.clock()


class Outbox:
    """Messages queued during a step: a batch per destination, handed to the transport by
    :meth:`flush`, and this rank's own messages, which the engine dispatches itself."""

    def __init__(self, rank: int, transport: Any) -> None:
        self.rank = rank
        self.transport = transport
        self._batches: dict[int, list] = defaultdict(list)
        self._local: deque = deque()

    def send(self, dest: int, msg: Any) -> None:
        """(engine thread) Queue a message; batches go out at the end of the step."""
        if dest == self.rank:
            self._local.append(msg)
        else:
            self._batches[dest].append(msg)

    def send_all(self, out: list) -> None:
        """Queue ``[(dest, msg), ...]`` (a state machine's output)."""
        for dest, msg in out:
            self.send(dest, msg)

    def flush(self) -> None:
        """Hand every queued batch to the transport now."""
        if self._batches:
            batches, self._batches = self._batches, defaultdict(list)
            for dest, batch in batches.items():
                self.transport.send(dest, batch)

    def take_local(self) -> deque:
        """This rank's own messages queued so far (those queued from now on wait for the next
        call)."""
        local, self._local = self._local, deque()
        return local

    def discard_local(self) -> None:
        """Drop this rank's own messages not yet handled (shutdown)."""
        self._local.clear()


class Calls:
    """Work other threads hand the engine (:meth:`Engine.call_soon`, :meth:`Engine.call_batched`),
    and the wake-up of an engine sleeping while none is queued."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self.wake = wake
        self.sleeping = False      # (set by the loop before its last look at the queue)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._open: Optional[list] = None   # the batch that put_batched may still add to

    def put(self, fn: Callable, args: tuple) -> None:
        with self._lock:
            self._open = None      # a later batched item must not overtake this call
            self._queue.put((fn, args))
        if self.sleeping:
            self.wake()

    def put_batched(self, fn: Callable, item: Any) -> None:
        """Queue ``fn([item, ...])``: ``item`` joins the last queued call if that is a batch of
        ``fn`` the engine has not started yet, else starts a new batch (order is kept: nothing
        queued after a call runs before it)."""
        with self._lock:
            batch = self._open
            if batch is None or batch[0] is not fn:
                batch = self._open = [fn]
                self._queue.put((self._run_batch, (batch,)))
            batch.append(item)
        if self.sleeping:
            self.wake()

    def _run_batch(self, batch: list) -> None:
        with self._lock:
            if self._open is batch:
                self._open = None  # closed: later items start a new batch
        batch[0](batch[1:])

    def get(self) -> Optional[tuple]:
        """The next ``(fn, args)``, or None if none is queued."""
        if self._queue.empty():       # (cheaper than the exception, on every step)
            return None
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None

    def empty(self) -> bool:
        return self._queue.empty()


class Engine:
    """Message dispatch, outbox, timers and the progress loop of rank ``transport.rank``.

    Args:
        transport: a :class:`~hoplite_mpi.transport.Transport` (MPI, or in-process for tests).
        clock: seconds, monotonic (``time.monotonic``; a virtual clock in simulation).
        backoff_max: seconds; the longest idle sleep (``Config.backoff_max``).
        hot_window: seconds of polling without sleeping after activity (``Config.hot_window``).
        hot_yield: poll with ``os.sched_yield`` (True) or ``time.sleep(0)`` (``Config.hot_yield``).

    Attributes:
        outbox: messages queued this step (:class:`Outbox`: ``send``, ``send_all``, ``flush``).
        timers: :class:`Timers` (``call_later``, ``every``) on ``clock``.
        peers: :class:`Peers`: dead ranks, when each rank was last heard of, failure hooks.
        stats: counters (messages handled by type, engine errors, ...).
        closing: set by :meth:`stop`: the loop ends after the current step and messages that
            still arrive go to ``on_leftover`` (shutdown's quiescence, in the runtime).
    """

    def __init__(self, transport: Any, clock: Callable[[], float] = time.monotonic,
                 backoff_max: float = 0.01, hot_window: float = HOT_WINDOW,
                 hot_yield: bool = True) -> None:
        self.transport = transport
        # the hot poll's yield: sched_yield gives the core to another runnable thread and
        # returns at once when there is none; time.sleep(0) sleeps for the kernel's timer slack
        # (~50 us here): a 1 KiB mpi4py ping-pong polled that way took 0.29-0.32 ms, with
        # os.sched_yield 0.12 ms (2 ranks, this machine)
        self._yield = os.sched_yield if hot_yield and hasattr(os, "sched_yield") else _sleep0
        self.clock = clock
        self.backoff = Backoff(backoff_max, hot_window=hot_window)
        self.outbox = Outbox(transport.rank, transport)
        self.timers = Timers(clock)
        self.peers = Peers(clock)
        self.stats: dict[str, int] = defaultdict(int)
        self.closing = False
        self.on_leftover: Callable[[int, list], None] = lambda source, batch: None
        self._calls = Calls(transport.wake)
        self._handlers: dict[type, Callable[[int, Any], None]] = {}
        # message types whose arrival alone does not start the hot window (no reply follows
        # soon): rank 0 hears a heartbeat from every worker each second, and with a hot window
        # per heartbeat it spun 13 % of a core at 32 ranks (benchmarks/scale.py)
        self.quiet: set[type] = set()

    @property
    def rank(self) -> int:
        return self.transport.rank

    @property
    def size(self) -> int:
        return self.transport.size

    # --- registration ----------------------------------------------------------------------

    def on(self, msg_type: type, handler: Callable[[int, Any], None]) -> None:
        """Dispatch messages of ``msg_type`` to ``handler(source, msg)`` (one handler per type)."""
        if msg_type in self._handlers:
            raise ValueError(f"a handler for {msg_type.__name__} is registered already")
        self._handlers[msg_type] = handler

    # --- threads -> engine -----------------------------------------------------------------

    def call_soon(self, fn: Callable, *args: Any) -> None:
        """Run ``fn(*args)`` on the engine thread (thread-safe, returns at once).  Raises
        RuntimeShutdownError once the engine is stopping (it runs no more calls)."""
        if self.closing:
            raise RuntimeShutdownError("the hoplite_mpi runtime is shut down")
        self._calls.put(fn, args)

    def call_batched(self, fn: Callable[[list], None], item: Any) -> None:
        """Run ``fn(items)`` on the engine thread with ``item`` and the items of the calls of
        ``fn`` queued right after it (thread-safe, returns at once): one engine call per burst
        (issue 12: task submissions).  Order with :meth:`call_soon` is kept.  Raises
        RuntimeShutdownError once the engine is stopping."""
        if self.closing:
            raise RuntimeShutdownError("the hoplite_mpi runtime is shut down")
        self._calls.put_batched(fn, item)

    # --- messages --------------------------------------------------------------------------

    def dispatch(self, source: int, msg: Any) -> None:
        self.stats[type(msg).__name__] += 1
        self.guarded(self._handlers[type(msg)], source, msg)

    def guarded(self, fn: Callable, *args: Any) -> None:
        """Run one step of the engine; a bug or bad input in one message must not stop the
        engine (every other task and transfer of this rank depends on it)."""
        try:
            fn(*args)
        except Exception:
            self.stats["engine_errors"] += 1
            log.exception("rank %d: error while handling %s", self.rank,
                          type(args[-1]).__name__ if args else getattr(fn, "__name__", fn))

    # --- the loop --------------------------------------------------------------------------

    def stop(self) -> None:
        """(engine thread) End the loop after this step; later messages go to ``on_leftover``."""
        self.closing = True

    def step(self) -> bool:
        """One iteration of the loop; returns whether anything happened."""
        active = False
        calls = self._calls
        while True:
            call = calls.get()
            if call is None:
                break
            self.guarded(call[0], *call[1])
            active = True
            if self.closing:          # (this call was the driver's shutdown)
                return True
        transport, peers = self.transport, self.peers
        # (once closing, this rank's last messages are out: nothing below may send more)
        quiet = self.quiet
        for source, batch in transport.receive():
            if not quiet or not all(msg.__class__ in quiet for msg in batch):
                active = True      # (a batch of quiet messages only, e.g. heartbeats, is not)
            if source in peers.dead:   # declared dead (hung): whatever it still says is void
                continue
            if self.closing:           # (a Shutdown earlier in this round)
                self.on_leftover(source, batch)
                continue
            peers.heard_from(source)
            for i, msg in enumerate(batch):
                self.dispatch(source, msg)
                if self.closing:       # nothing after a Shutdown is acted on
                    self.on_leftover(source, batch[i:])
                    break
        if self.closing:
            return True
        for rank in transport.failures():
            active = True
            for hook in peers.hooks:
                self.guarded(hook, rank)
        for timer in self.timers.due():
            self.guarded(timer.fn, *timer.args)
        # only the messages queued so far: one that makes another local message each time (a
        # request answered by this rank's own shard) then cannot keep the engine from the
        # transport, heartbeats and death notices
        for msg in self.outbox.take_local():
            if self.closing:
                return True
            active = True
            self.dispatch(self.rank, msg)
        if self.closing:
            return True
        if transport.progress():
            active = True
        self.outbox.flush()
        return active

    def run(self) -> None:
        """Step until :meth:`stop`, sleeping by the :class:`Backoff` policy when idle."""
        transport, backoff, clock, calls = self.transport, self.backoff, self.clock, self._calls
        backoff.active(clock())
        while not self.closing:
            if self.step():
                backoff.active(clock())
                continue
            delay = backoff.idle_delay(clock(), transport.busy())
            if not delay:
                self._yield()          # yield the core, but answer within microseconds
                continue
            calls.sleeping = True      # set before the last look at the queue: no lost wake-up
            if calls.empty() and transport.wait(self.timers.next_delay(delay)):
                backoff.rung(clock())      # rung: the message may lag its doorbell
            calls.sleeping = False
