"""Doorbells: wake a sleeping progress engine at once when a control message is sent to it.

An idle engine cannot block inside MPI (Open MPI's blocking calls spin, and the ranks are usually
oversubscribed), so it polls with exponential backoff up to ``Config.backoff_max`` seconds.  That
makes the first message to an idle rank wait up to ``backoff_max`` (10 ms) before it is seen,
once per idle hop: a broadcast reaches idle targets through the object's directory shard, itself
often idle, so two such delays added ~20 ms to a 55 ms 64 MiB broadcast here.

A doorbell is a Linux abstract-namespace UNIX datagram socket per rank
(``\\0hoplite-<job key>-<rank>``, nothing on disk).  The sleeping engine waits on it
with the backoff delay as timeout (``select``); a sender on the same host writes one byte to the receiver's
doorbell after each control batch (``sendto`` on a non-blocking socket, a few microseconds).  The
doorbell only says "poll now": messages still travel by MPI, and a lost ring (full socket buffer,
another host, another network namespace) only means the backoff delay again.  Peers on other hosts
are never rung.  Where abstract sockets do not exist (not Linux), :class:`EventBell` keeps the old
behaviour: only threads of the same process can wake the engine.
"""
from __future__ import annotations

import os
import select
import socket
import sys
import threading
from typing import Iterable


class EventBell:
    """Fallback: wakes on :meth:`wake` (same process) or after the timeout; ``ring`` does nothing."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def ring(self, rank: int) -> None:
        pass

    def wake(self) -> None:
        self._event.set()

    def wait(self, timeout: float) -> bool:
        woken = self._event.wait(timeout)
        self._event.clear()
        return woken

    def close(self) -> None:
        pass


class Doorbell:
    """The doorbell of rank ``rank`` of job ``key``; can ring those of ``peers`` (same host).

    Raises OSError if the socket cannot be bound (the caller falls back to :class:`EventBell`).
    Thread-safe: :meth:`wake` may be called from any thread, the rest from the engine thread.
    """

    def __init__(self, key: str, rank: int, peers: Iterable[int]) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.setblocking(False)
            self._sock.bind(_address(key, rank))
        except OSError:
            self._sock.close()
            raise
        self._me = _address(key, rank)
        self._peers = {r: _address(key, r) for r in peers if r != rank}

    def ring(self, rank: int) -> None:
        """Wake ``rank``'s engine if it sleeps (no-op for peers on other hosts)."""
        addr = self._peers.get(rank)
        if addr is not None:
            self._send(addr)

    def wake(self) -> None:
        """Wake this rank's own engine (from any thread)."""
        self._send(self._me)

    def _send(self, addr: bytes) -> None:
        try:
            self._sock.sendto(b"!", addr)
        except OSError:   # full (a ring is pending anyway), peer gone or not reachable
            pass

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds or until rung; returns whether it was rung."""
        if not select.select((self._sock,), (), (), timeout)[0]:   # microsecond timeouts
            return False
        try:
            while True:
                self._sock.recv(64)
        except OSError:   # BlockingIOError: drained
            pass
        return True

    def close(self) -> None:
        self._sock.close()


def _address(key: str, rank: int) -> bytes:
    return f"\0hoplite-{key}-{rank}".encode()


def make_bell(key: str, rank: int, same_host: Iterable[int]) -> "Doorbell | EventBell":
    """A :class:`Doorbell` on Linux (unless ``HOPLITE_MPI_DOORBELL=0``), else an :class:`EventBell`."""
    if sys.platform.startswith("linux") and os.environ.get("HOPLITE_MPI_DOORBELL", "1") != "0":
        try:
            return Doorbell(key, rank, same_host)
        except OSError:
            pass
    return EventBell()
