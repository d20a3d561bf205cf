"""The interface a progress engine needs from a transport.

All methods are called from the engine thread only.  Nothing blocks: sends and receives are
started, then driven by :meth:`Transport.progress`, which reports what completed.
"""
from __future__ import annotations

import abc
import time
from typing import Optional, Callable, Sequence


class PeerFailure(Exception):
    """A point-to-point operation with ``rank`` failed.

    ``dead`` says why: True when ``rank`` is gone (ULFM ``MPI_ERR_PROC_FAILED``,
    ``MPI_ERR_PROC_FAILED_PENDING``, ``MPI_ERR_REVOKED``, or the rank was declared dead); False
    for any other MPI error (``MPI_ERR_TRUNCATE``, ...), which is a bug of ours, not a death: the
    objects of that transfer fail with :class:`~hoplite_mpi.errors.TransferError` and the rank
    stays in the job.  ``mpi_error`` is the MPI error class (0 when not from MPI).  ``refused``:
    the peer sent nothing because it no longer holds the object (freed: not a bug).
    """

    def __init__(self, rank: int, detail: str = "", dead: bool = True, mpi_error: int = 0,
                 tag: int = -1, refused: bool = False) -> None:
        super().__init__(rank, detail)
        self.rank = rank
        self.detail = detail
        self.dead = dead
        self.mpi_error = mpi_error
        self.tag = tag      # the stream's transport tag (for :meth:`Transport.stop_send_stream`)
        self.refused = refused


class Transport(abc.ABC):
    """Control messages (picklable batches) and chunked object streams between ranks.

    Attributes:
        rank: this rank.  size: number of ranks.
    """

    rank: int
    size: int
    ft: bool = False      # whether rank failures are reported (ULFM) rather than fatal
    hosts: Optional[list] = None   # host name of each rank (None: unknown, one host)

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
    def fail_stream(self, peer: int, tag: int, failure: PeerFailure) -> None:
        """End the receive stream from ``peer`` with ``tag`` (if still open): cancel what is in
        flight and call its ``on_error(failure)``."""

    def data_tag(self, tag: int) -> int:
        """The transport's own tag of the stream a runtime calls ``tag`` (as in PeerFailure.tag)."""
        return tag

    def stop_send_stream(self, peer: int, tag: int) -> None:
        """Post no more chunks of the send stream to ``peer`` with transport tag ``tag`` (its
        receiver failed it); chunks in flight complete (the receiver drains them)."""

    @abc.abstractmethod
    def progress(self) -> bool:
        """Drive started operations; return whether anything completed."""

    @abc.abstractmethod
    def busy(self) -> bool:
        """Whether data streams are in flight (the engine then polls without sleeping long)."""

    def stream_summary(self) -> list[str]:
        """One line per data stream in flight (for :func:`hoplite_mpi.debug.engine_state`)."""
        return []

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds, less if a message may have arrived or :meth:`wake`
        was called; returns whether it was woken early.  Default: just sleep."""
        time.sleep(timeout)
        return False

    def wake(self) -> None:
        """End a :meth:`wait` in progress (thread-safe)."""

    # --- shutdown (see Runtime._quiesce) ---------------------------------------------------

    def drain(self) -> list[tuple[int, list]]:
        """While shutting down: receive every message that has arrived, whatever its tag; data
        messages are dropped, control batches returned as by :meth:`receive`."""
        return self.receive()

    def quiesce(self) -> bool:
        """While shutting down: start nothing new (no further chunks), withdraw posted receives,
        drive own sends to completion (dropping those to dead ranks); returns whether anything
        completed."""
        return self.progress()

    def idle(self) -> bool:
        """Whether no operation of this rank is in flight any more."""
        return not self.busy()

    @abc.abstractmethod
    def close(self) -> None:
        """Cancel what is still in flight and release the communicator."""
