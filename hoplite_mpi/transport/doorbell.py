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
another network namespace) only means the backoff delay again.  Where abstract sockets do not
exist (not Linux), :class:`EventBell` keeps the old behaviour: only threads of the same process
can wake the engine.

Ranks on other hosts (issue 13): abstract sockets do not cross hosts (nor network namespaces), so
each doorbell also has a UDP socket on its host's address (the one its host name resolves to;
none if that is a loopback address), which the ranks exchange at start-up
(:meth:`Doorbell.add_remote`); a batch to a rank on another host rings it with one datagram.
Without it a message to an idle rank on another host waited for the receiver's backoff, and over
Open MPI's TCP BTL the reply for the receiver's next poll too: a no-op task on a rank of another
host took 54-77 ms after the two had been idle for 0.2 s, against 1.1-3 ms on one host
(simulated hosts, benchmarks/RESULTS.md).  A datagram may be lost or refused (a firewall): that
again only means the backoff delay.
"""
from __future__ import annotations

import os
import select
import socket
import sys
import threading
from typing import Iterable, Optional


class EventBell:
    """Fallback: wakes on :meth:`wake` (same process) or after the timeout; ``ring`` does nothing."""

    udp_address = None
    remote_ranks: list = []

    def __init__(self) -> None:
        self._event = threading.Event()

    def add_remote(self, addresses: dict) -> None:
        pass

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

    def __init__(self, key: str, rank: int, peers: Iterable[int],
                 udp_host: Optional[str] = None) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.setblocking(False)
            self._sock.bind(_address(key, rank))
        except OSError:
            self._sock.close()
            raise
        self._me = _address(key, rank)
        self._peers = {r: _address(key, r) for r in peers if r != rank}
        self._remote: dict[int, tuple[str, int]] = {}
        self._udp: Optional[socket.socket] = None
        if udp_host:
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                udp.setblocking(False)
                udp.bind((udp_host, 0))
                self._udp = udp
            except OSError:     # (no such address here: ranks on other hosts are not rung)
                udp.close()
        self._waited = (self._sock,) if self._udp is None else (self._sock, self._udp)

    @property
    def udp_address(self) -> Optional[tuple[str, int]]:
        """``(ip, port)`` of this doorbell's UDP socket, for ranks on other hosts; None if it
        has none."""
        return self._udp.getsockname()[:2] if self._udp is not None else None

    @property
    def remote_ranks(self) -> list[int]:
        """The ranks on other hosts this doorbell rings by UDP."""
        return sorted(self._remote)

    def add_remote(self, addresses: dict) -> None:
        """Ring ``rank`` at ``addresses[rank] = (ip, port)`` (ranks on other hosts); nothing
        without a UDP socket of this doorbell's own."""
        if self._udp is None:
            return
        for r, addr in addresses.items():
            if r not in self._peers and addr is not None:
                self._remote[r] = tuple(addr)

    def ring(self, rank: int) -> None:
        """Wake ``rank``'s engine if it sleeps (no-op for peers on other hosts)."""
        addr = self._peers.get(rank)
        if addr is not None:
            self._send(addr)
        elif self._remote:
            remote = self._remote.get(rank)
            if remote is not None:
                try:
                    self._udp.sendto(b"!", remote)
                except OSError:   # full, unreachable, refused: the receiver's backoff, as before
                    pass

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
        ready = select.select(self._waited, (), (), timeout)[0]   # microsecond timeouts
        if not ready:
            return False
        for sock in ready:
            try:
                while True:
                    sock.recv(64)
            except OSError:   # BlockingIOError: drained
                pass
        return True

    def close(self) -> None:
        self._sock.close()
        if self._udp is not None:
            self._udp.close()


def _address(key: str, rank: int) -> bytes:
    return f"\0hoplite-{key}-{rank}".encode()


def host_address() -> Optional[str]:
    """The IPv4 address this host's name resolves to, if it is not a loopback address (ranks on
    other hosts could not reach it), else None."""
    try:
        ip = socket.gethostbyname(socket.gethostname())
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


def make_bell(key: str, rank: int, same_host: Iterable[int],
              udp_host: Optional[str] = None) -> "Doorbell | EventBell":
    """A :class:`Doorbell` on Linux (unless ``HOPLITE_MPI_DOORBELL=0``), with a UDP socket on
    ``udp_host`` for ranks on other hosts if given; else an :class:`EventBell`."""
    if sys.platform.startswith("linux") and os.environ.get("HOPLITE_MPI_DOORBELL", "1") != "0":
        try:
            return Doorbell(key, rank, same_host, udp_host)
        except OSError:
            pass
    return EventBell()
