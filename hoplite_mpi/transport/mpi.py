"""MPI transport: the only module that calls mpi4py for data.

- Control batches: ``comm.isend`` of a pickled list, tag ``Tag.CONTROL``; received by polling
  ``comm.improbe`` (never a blocking receive, so an idle rank can sleep between polls).
- Object streams: ``Isend``/``Irecv`` of raw buffer slices (no pickling, no copy), a window of
  ``window`` chunks in flight per stream, tag ``Tag.DATA_BASE + tag``.  MPI's non-overtaking rule
  for one (source, tag, communicator) keeps the chunks of a stream in order.  The streams and the
  drains of failed ones are :class:`~.streams.StreamTable`'s (shared with :mod:`.local`); here
  are MPI's requests for it (:class:`_Requests`).

The communicator's error handler is ``ERRORS_RETURN`` so that a failed peer raises
``MPI.Exception`` here (ULFM: ``MPI_ERR_PROC_FAILED``), which becomes :class:`PeerFailure` for the
stream concerned; the job goes on.  Only ULFM's failure classes (PROC_FAILED, PROC_FAILED_PENDING,
REVOKED) mean a death (``PeerFailure.dead``); any other MPI error fails only that stream.  Dead
ranks are learned from ``Comm.Get_failed`` (a local call, ~0.3 us, which ULFM updates while MPI
is progressed: 10-50 ms after a SIGKILL here) and reported by :meth:`MPITransport.failures`; an
``ANY_SOURCE`` probe that reports a failure is acknowledged (``Ack_failed``) and repeated; control
sends to a dead rank are dropped.

Waking: a rank with nothing to do sleeps in :meth:`MPITransport.wait`; every control batch sent to
a rank also rings that rank's doorbell (:mod:`.doorbell`: a UNIX datagram on the same host, a UDP
datagram to a rank on another host), so it polls at once instead of after its backoff delay.
"""
from __future__ import annotations

import os
import socket
import time
import uuid
from typing import Any, Optional

from mpi4py import MPI

from ..protocol import Tag
from .doorbell import host_address, make_bell
from .streams import Requests, Stream, StreamError, StreamTable, StreamTransport


class MPITransport(StreamTransport):
    """Transport over an MPI communicator (which it owns: pass a ``Dup``)."""

    def __init__(self, comm: "MPI.Comm", window: int = 4) -> None:
        """Collective over ``comm`` (it exchanges host names and a job key for the doorbells)."""
        self.comm = comm
        self.comm.Set_errhandler(MPI.ERRORS_RETURN)
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self._sends: list = []           # pending control isend requests
        self._probe_twice = False        # (set by a sleep, see _receive_arrived)
        self._status = MPI.Status()
        key = comm.bcast(uuid.uuid4().hex[:16] if self.rank == 0 else None, root=0)
        self.hosts = hosts = comm.allgather(socket.gethostname())
        local = [r for r, h in enumerate(hosts) if h == hosts[self.rank]]
        remote = len(set(hosts)) > 1    # (the same on every rank: the allgather below is collective)
        self.bell = make_bell(key, self.rank, local, host_address() if remote else None)
        if remote:    # (collective: every rank takes part, with None if it has no UDP bell)
            addresses = comm.allgather(self.bell.udp_address)
            self.bell.add_remote({r: a for r, a in enumerate(addresses) if r not in local})
        self.ft = _has_ulfm(comm)
        self.dead = _DeadRanks(comm, self.ft)
        self.streams = StreamTable(_Requests(comm, self.dead.ranks, self._status), window,
                                   int(comm.Get_attr(MPI.TAG_UB) or 32767))

    # --- control ----------------------------------------------------------------------------

    def send(self, dest: int, batch: list) -> None:
        if dest in self.dead.ranks:
            return
        try:
            self._sends.append(self.comm.isend(batch, dest, Tag.CONTROL))
        except MPI.Exception:     # the peer died (reported by failures())
            return
        self.batches_sent += 1
        self.bell.ring(dest)

    def wait(self, timeout: float) -> bool:
        self._probe_twice = True
        return self.bell.wait(timeout)

    def wake(self) -> None:
        self.bell.wake()

    def receive(self) -> list[tuple[int, list]]:
        return self._receive_arrived(Tag.CONTROL)

    def _receive_arrived(self, tag: int) -> list[tuple[int, list]]:
        """Receive every message with ``tag`` (``MPI.ANY_TAG``: any) that has arrived: control
        batches are returned, data chunks received into scratch space and dropped.  A probe or
        receive that reports a dead rank is acknowledged and the loop goes on."""
        got = []
        status = self._status
        while True:
            try:
                msg = self.comm.improbe(MPI.ANY_SOURCE, tag, status)
            except MPI.Exception as exc:
                if not self._acknowledge(exc):
                    raise
                continue
            if msg is None:
                if self._probe_twice:
                    # Open MPI's TCP BTL: the first probe after a sleep reads the socket but
                    # matches before it does, so it reports nothing; without a second one the
                    # message waited for the next poll (a second backoff delay)
                    self._probe_twice = False
                    continue
                return got
            self._probe_twice = False
            source = status.Get_source()
            try:
                if status.Get_tag() == Tag.CONTROL:
                    self.control_bytes_received += status.Get_count(MPI.BYTE)
                    got.append((source, msg.recv()))
                    self.batches_received += 1
                else:
                    msg.Recv([bytearray(max(1, status.Get_count(MPI.BYTE))), MPI.BYTE])
            except MPI.Exception as exc:   # the sender died before its message was complete
                if not self._acknowledge(exc):
                    raise

    def _acknowledge(self, exc: "MPI.Exception") -> bool:
        """A pending ANY_SOURCE operation noticed a dead rank: acknowledge it so that the next
        probe works again.  Returns False if ``exc`` is not a process failure."""
        if not self.ft or exc.Get_error_class() not in _FAILURE_CLASSES:
            return False
        self.comm.Ack_failed()
        return True

    def exclude(self, rank: int) -> None:
        self.dead.ranks.add(rank)

    def failures(self) -> list[int]:
        """Ranks found dead since the last call (ULFM; always empty without it)."""
        return self.dead.poll()

    # --- streams (StreamTransport: a StreamTable) ------------------------------------------

    def _prune_sends(self) -> bool:
        """Forget completed control sends (one to a dead rank counts as completed); returns
        whether any completed."""
        if not self._sends:
            return False
        before = len(self._sends)
        self._sends = [r for r in self._sends if not _done(r)]
        return len(self._sends) != before

    # --- shutdown ---------------------------------------------------------------------------

    def drain(self) -> list[tuple[int, list]]:
        """Receive every message that has arrived, of any tag (control batches are returned,
        data chunks received into scratch space and dropped): a message left unreceived on a
        communicator that is then freed made MPI_Finalize hang under ULFM."""
        return self._receive_arrived(MPI.ANY_TAG)

    def close(self) -> None:
        self.streams.close()
        for req in self._sends:
            _cancel(req)
        self._sends = []
        self.bell.close()
        self.dead.close()


class _DeadRanks:
    """The ranks of ``comm`` known dead: ``ranks`` (reported by :meth:`poll`, or excluded by
    the runtime), learned from ULFM's ``Comm.Get_failed`` (a local call, ~0.3 us)."""

    def __init__(self, comm: "MPI.Comm", ft: bool) -> None:
        self.comm, self.ft = comm, ft
        self.ranks: set[int] = set()
        self._count = 0                  # the size of Get_failed's group at the last poll
        self._group = comm.Get_group()

    def poll(self) -> list[int]:
        """Ranks found dead since the last call (always none without ULFM)."""
        if not self.ft:
            return []
        group = self.comm.Get_failed()
        try:
            n = group.Get_size()
            if n == self._count:
                return []
            ranks = MPI.Group.Translate_ranks(group, list(range(n)), self._group)
        finally:
            group.Free()
        self._count = n
        new = sorted(set(ranks) - self.ranks)
        self.ranks.update(new)
        return new

    def close(self) -> None:
        self._group.Free()


class _Requests(Requests):
    """MPI's requests for the stream table: ``Isend``/``Irecv`` of raw buffer slices (no
    pickling, no copy); an ``MPI.Exception`` becomes :class:`StreamError`, ``dead`` for ULFM's
    failure classes only."""

    def __init__(self, comm: "MPI.Comm", failed: set, status: "MPI.Status") -> None:
        self.comm, self.failed, self.status = comm, failed, status

    def post(self, s: Stream, buf: Any) -> Any:
        try:
            if s.send:
                return self.comm.Isend([buf, MPI.BYTE], s.peer, s.tag)
            return self.comm.Irecv([buf, MPI.BYTE], s.peer, s.tag)
        except MPI.Exception as exc:
            raise _stream_error(exc) from exc

    def test(self, req: Any) -> bool:
        try:
            return req.Test()
        except MPI.Exception as exc:
            raise _stream_error(exc) from exc

    def done(self, req: Any) -> bool:
        return _done(req)

    def cancel(self, req: Any) -> None:
        _cancel(req)

    def withdraw(self, req: Any) -> None:
        """Ask MPI to cancel ``req`` and keep it (it completes, cancelled or matched, on a Test)."""
        try:
            req.Cancel()
        except MPI.Exception:
            pass

    def down(self, peer: int) -> Optional[tuple[str, int]]:
        # (a death ULFM reports fails the requests themselves; this is a rank the runtime
        # declared dead, a hung one: no MPI error)
        return ("rank excluded (declared dead)", 0) if peer in self.failed else None

    def discard_next(self, peer: int, tag: int) -> Optional[tuple[Any, Any]]:
        try:
            msg = self.comm.improbe(peer, tag, self.status)
        except MPI.Exception:
            return None
        if msg is None:
            return None
        buf = bytearray(self.status.Get_count(MPI.BYTE))
        return msg.Irecv([buf, MPI.BYTE]), buf

    def now(self) -> float:
        return time.monotonic()


def _stream_error(exc: "MPI.Exception") -> StreamError:
    cls = exc.Get_error_class()
    return StreamError(str(exc), cls in _FAILURE_CLASSES, cls)


_FAILURE_CLASSES = frozenset(c for c in (getattr(MPI, "ERR_PROC_FAILED", None),
                                         getattr(MPI, "ERR_PROC_FAILED_PENDING", None),
                                         getattr(MPI, "ERR_REVOKED", None)) if c is not None)


def ulfm_status() -> str:
    """'on', or 'off (<reason>)': whether this job survives the loss of a rank (ULFM)."""
    lib = MPI.Get_library_version()
    if "Open MPI" not in lib:
        return "off (only Open MPI's ULFM is supported; this MPI ends the job when a rank dies)"
    if not hasattr(MPI.Comm, "Get_failed") or not _FAILURE_CLASSES:
        return "off (mpi4py was built without the ULFM extensions)"
    enabled = os.environ.get("OMPI_MCA_mpi_ft_enable", "")
    if enabled.lower() in ("1", "true", "yes", "on"):
        return "on"
    return "off in this job (start it with `hoplite-mpi run` without --no-ft, or `mpirun --with-ft ulfm`)"


def _has_ulfm(comm: "MPI.Comm") -> bool:
    if ulfm_status() != "on":
        return False
    try:
        comm.Get_failed().Free()
    except (NotImplementedError, AttributeError, MPI.Exception):
        return False
    return True


def _done(req) -> bool:
    """Test a control send; one to a rank that died counts as done (dropped)."""
    try:
        return req.Test()
    except MPI.Exception:
        return True


def _cancel(req) -> None:
    try:
        req.Cancel()
        req.Free()
    except MPI.Exception:
        pass
