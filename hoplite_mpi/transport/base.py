"""The interface a progress engine needs from a transport.

All methods are called from the engine thread only.  Nothing blocks: sends and receives are
started, then driven by :meth:`Transport.progress`, which reports what completed.
"""
from __future__ import annotations

import abc
import time
from typing import Callable, Sequence


class PeerFailure(Exception):
    """A point-to-point operation with ``rank`` failed (e.g. ULFM ``MPI_ERR_PROC_FAILED``)."""

    def __init__(self, rank: int, detail: str = "") -> None:
        super().__init__(rank, detail)
        self.rank = rank
        self.detail = detail


class Transport(abc.ABC):
    """Control messages (picklable batches) and chunked object streams between ranks.

    Attributes:
        rank: this rank.  size: number of ranks.
    """

    rank: int
    size: int
    ft: bool = False      # whether rank failures are reported (ULFM) rather than fatal

    def failures(self) -> list[int]:
        """Ranks found dead since the last call (none by default)."""
        return []

    def exclude(self, rank: int) -> None:
        """Treat ``rank`` as dead from now on (declared dead by the runtime): drop what is sent
        to it and do not report it again."""

    @abc.abstractmethod
    def send(self, dest: int, batch: list) -> None:
        """Start sending a batch of control messages to ``dest`` (never to self)."""

    @abc.abstractmethod
    def receive(self) -> list[tuple[int, list]]:
        """Control batches that have arrived: ``[(source, batch), ...]`` (possibly empty)."""

    @abc.abstractmethod
    def send_stream(self, dest: int, tag: int, chunks: Sequence[memoryview],
                    on_done: Callable[[], None], on_error: Callable[[PeerFailure], None],
                    available: Callable[[], int] | None = None) -> None:
        """Send ``chunks`` in order to ``dest`` with data tag ``tag``, a window at a time.

        ``available()`` (if given) says how many leading chunks may be sent yet: a partial copy
        forwards what it has received (Hoplite §3.3 pipelining)."""

    @abc.abstractmethod
    def recv_stream(self, source: int, tag: int, chunks: Sequence[memoryview],
                    on_chunk: Callable[[int], None], on_error: Callable[[PeerFailure], None]) -> None:
        """Receive ``chunks`` (writable views) in order from ``source``; ``on_chunk(nbytes)`` after
        each completes in order.  The stream ends after the last chunk."""

    @abc.abstractmethod
    def cancel_stream(self, peer: int, tag: int) -> None:
        """Abandon the receive stream from ``peer`` with ``tag`` (if still in flight)."""

    @abc.abstractmethod
    def progress(self) -> bool:
        """Drive started operations; return whether anything completed."""

    @abc.abstractmethod
    def busy(self) -> bool:
        """Whether data streams are in flight (the engine then polls without sleeping long)."""

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds, less if a message may have arrived or :meth:`wake`
        was called; returns whether it was woken early.  Default: just sleep."""
        time.sleep(timeout)
        return False

    def wake(self) -> None:
        """End a :meth:`wait` in progress (thread-safe)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Cancel what is still in flight and release the communicator."""
