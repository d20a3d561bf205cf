"""MPI transport: the only module that calls mpi4py for data.

- Control batches: ``comm.isend`` of a pickled list, tag ``Tag.CONTROL``; received by polling
  ``comm.improbe`` (never a blocking receive, so an idle rank can sleep between polls).
- Object streams: ``Isend``/``Irecv`` of raw buffer slices (no pickling, no copy), a window of
  ``window`` chunks in flight per stream, tag ``Tag.DATA_BASE + tag``.  MPI's non-overtaking rule
  for one (source, tag, communicator) keeps the chunks of a stream in order.

The communicator's error handler is ``ERRORS_RETURN`` so that a failed peer raises
``MPI.Exception`` here (ULFM: ``MPI_ERR_PROC_FAILED``), which becomes :class:`PeerFailure` for the
stream concerned; the job goes on.  Only ULFM's failure classes (PROC_FAILED, PROC_FAILED_PENDING,
REVOKED) mean a death (``PeerFailure.dead``); any other MPI error fails only that stream.  Dead ranks are learned from ``Comm.Get_failed`` (a local call,
~0.3 us, which ULFM updates while MPI is progressed: 10-50 ms after a SIGKILL here) and reported by
:meth:`MPITransport.failures`; an ``ANY_SOURCE`` probe that reports a failure is acknowledged
(``Ack_failed``) and repeated; control sends to a dead rank are dropped.

Waking: a rank with nothing to do sleeps in :meth:`MPITransport.wait`; every control batch sent to
a rank on the same host also rings that rank's doorbell (:mod:`.doorbell`), so it polls at once
instead of after its backoff delay.
"""
from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections import deque

from mpi4py import MPI

from ..protocol import Tag
from .base import PeerFailure, Transport, describe_streams
from .doorbell import make_bell

log = logging.getLogger("hoplite_mpi")

# a receive stream failed by a non-death error keeps matching (and discarding) its sender's
# messages until none came for this long (the sender posts no new chunks once told; see drains)
DRAIN_SECONDS = 30.0


class _Stream:
    __slots__ = ("peer", "tag", "chunks", "next", "inflight", "on_chunk", "on_done", "on_error", "send",
                 "available", "withdrawn")

    def __init__(self, peer, tag, chunks, send, on_chunk, on_done, on_error, available=None):
        self.peer, self.tag, self.chunks, self.send = peer, tag, chunks, send
        self.available = available
        self.withdrawn = False        # (shutdown) its posted receives were cancelled
        self.next = 0
        self.inflight: deque = deque()
        self.on_chunk, self.on_done, self.on_error = on_chunk, on_done, on_error


class MPITransport(Transport):
    """Transport over an MPI communicator (which it owns: pass a ``Dup``)."""

    def __init__(self, comm: "MPI.Comm", window: int = 4) -> None:
        """Collective over ``comm`` (it exchanges host names and a job key for the doorbells)."""
        self.comm = comm
        self.comm.Set_errhandler(MPI.ERRORS_RETURN)
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.window = window
        self.tag_ub = int(comm.Get_attr(MPI.TAG_UB) or 32767)
        self._sends: list = []           # pending control isend requests
        self._streams: list[_Stream] = []
        # [peer, mpi tag, deadline, [(request, buffer)]]: receive streams that failed for another
        # reason than a death; what their sender still sends is matched and discarded here, so
        # no Isend of the sender stays unmatched (it would never complete: a busy engine, and a
        # pending request at MPI_Finalize)
        self._drains: list[list] = []
        self._status = MPI.Status()
        key = comm.bcast(uuid.uuid4().hex[:16] if self.rank == 0 else None, root=0)
        hosts = comm.allgather(socket.gethostname())
        self.bell = make_bell(key, self.rank, [r for r, h in enumerate(hosts) if h == hosts[self.rank]])
        self.failed: set[int] = set()     # dead ranks reported by failures()
        self._nfailed = 0
        self._group = comm.Get_group()
        self.ft = _has_ulfm(comm)

    # --- control ----------------------------------------------------------------------------

    def send(self, dest: int, batch: list) -> None:
        if dest in self.failed:
            return
        try:
            self._sends.append(self.comm.isend(batch, dest, Tag.CONTROL))
        except MPI.Exception:     # the peer died (reported by failures())
            return
        self.bell.ring(dest)

    def wait(self, timeout: float) -> bool:
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
                return got
            source = status.Get_source()
            try:
                if status.Get_tag() == Tag.CONTROL:
                    got.append((source, msg.recv()))
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
        self.failed.add(rank)

    def failures(self) -> list[int]:
        """Ranks found dead since the last call (ULFM; always empty without it)."""
        if not self.ft:
            return []
        group = self.comm.Get_failed()
        try:
            n = group.Get_size()
            if n == self._nfailed:
                return []
            ranks = MPI.Group.Translate_ranks(group, list(range(n)), self._group)
        finally:
            group.Free()
        self._nfailed = n
        new = sorted(set(ranks) - self.failed)
        self.failed.update(new)
        return new

    # --- streams ----------------------------------------------------------------------------

    def data_tag(self, tag: int) -> int:
        """The MPI tag of stream ``tag`` (wrapped below the MPI tag upper bound)."""
        return Tag.DATA_BASE + tag % (self.tag_ub - Tag.DATA_BASE)

    def send_stream(self, dest, tag, chunks, on_done, on_error, available=None) -> None:
        self._streams.append(_Stream(dest, self.data_tag(tag), chunks, True, None, on_done, on_error,
                                     available))

    def recv_stream(self, source, tag, chunks, on_chunk, on_error) -> None:
        self._streams.append(_Stream(source, self.data_tag(tag), chunks, False, on_chunk, None, on_error))

    def cancel_stream(self, peer, tag) -> None:
        mpi_tag = self.data_tag(tag)
        for s in self._streams:
            if not s.send and s.peer == peer and s.tag == mpi_tag:
                for req, _ in s.inflight:
                    _cancel(req)
                s.inflight.clear()
                s.next = len(s.chunks)  # finished: dropped at the next progress()

    def fail_stream(self, peer, tag, failure) -> None:
        mpi_tag = self.data_tag(tag)
        for s in self._streams:
            if not s.send and s.peer == peer and s.tag == mpi_tag:
                # (the peer refused before sending anything: cancel the posted receives, they can
                # match nothing; a drain would wait for them in vain)
                self._streams.remove(s)
                _fail(s, failure.detail, failure.dead, failure.mpi_error, failure.refused)
                return

    def stop_send_stream(self, peer, tag) -> None:
        for s in self._streams:
            if s.send and s.peer == peer and s.tag == tag:
                s.chunks = s.chunks[:s.next]    # finishes once the chunks in flight complete

    def _end(self, s: _Stream, detail: str, dead: bool, mpi_error: int = 0) -> None:
        """Fail stream ``s``; a receive stream that failed for another reason than a death
        drains its sender's remaining messages (see ``_drains``)."""
        if not s.send and not dead:
            # its receives in flight are not cancelled (one already matched would go on writing
            # into a buffer freed meanwhile): the drain waits for them, keeping their buffers
            self._drains.append([s.peer, s.tag, time.monotonic() + DRAIN_SECONDS, list(s.inflight)])
            s.inflight.clear()
        _fail(s, detail, dead, mpi_error)

    def _progress_drains(self) -> None:
        now = time.monotonic()
        status = self._status
        keep = []
        for d in self._drains:
            peer, tag, _, reqs = d
            reqs[:] = [(r, b) for r, b in reqs if not _done(r)]
            if reqs and now > d[2]:     # silent for DRAIN_SECONDS: what is posted will not match
                for r, _ in reqs:
                    _cancel_only(r)
            while peer not in self.failed:
                try:
                    msg = self.comm.improbe(peer, tag, status)
                except MPI.Exception:
                    break
                if msg is None:
                    break
                buf = bytearray(status.Get_count(MPI.BYTE))
                reqs.append((msg.Irecv([buf, MPI.BYTE]), buf))
                d[2] = now + DRAIN_SECONDS
            if peer not in self.failed and (reqs or now < d[2]):
                keep.append(d)
        self._drains = keep

    def _drive(self, s: _Stream) -> tuple[bool, bool]:
        """Advance one stream; returns (finished, progressed)."""
        progressed = False
        while s.inflight and s.inflight[0][0].Test():
            _, nbytes = s.inflight.popleft()
            progressed = True
            if s.on_chunk is not None:
                s.on_chunk(nbytes)
        limit = len(s.chunks) if s.available is None else min(len(s.chunks), s.available())
        while s.next < limit and len(s.inflight) < self.window:
            buf = s.chunks[s.next]
            if s.send:
                req = self.comm.Isend([buf, MPI.BYTE], s.peer, s.tag)
            else:
                req = self.comm.Irecv([buf, MPI.BYTE], s.peer, s.tag)
            s.inflight.append((req, len(buf)))
            s.next += 1
            progressed = True
        finished = s.next >= len(s.chunks) and not s.inflight
        if finished and s.on_done is not None:
            s.on_done()
        return finished, progressed

    def progress(self) -> bool:
        progressed = False
        if self._sends:
            before = len(self._sends)
            self._sends = [r for r in self._sends if not _done(r)]
            progressed = len(self._sends) != before
        if self._streams:
            keep = []
            for s in self._streams:
                if s.peer in self.failed:   # (also a hung rank declared dead: no MPI error)
                    _fail(s, "rank excluded (declared dead)")
                    progressed = True
                    continue
                try:
                    finished, moved = self._drive(s)
                except MPI.Exception as exc:
                    # only ULFM's failure classes mean the peer is gone; any other MPI error
                    # (e.g. MPI_ERR_TRUNCATE) fails this stream's objects, not the rank
                    cls = exc.Get_error_class()
                    self._end(s, str(exc), dead=cls in _FAILURE_CLASSES, mpi_error=cls)
                    progressed = True
                    continue
                except Exception as exc:   # a callback's bug: fail this stream only
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

    # --- shutdown ---------------------------------------------------------------------------

    def drain(self) -> list[tuple[int, list]]:
        """Receive every message that has arrived, of any tag (control batches are returned,
        data chunks received into scratch space and dropped): a message left unreceived on a
        communicator that is then freed made MPI_Finalize hang under ULFM."""
        return self._receive_arrived(MPI.ANY_TAG)

    def quiesce(self) -> bool:
        progressed = False
        if self._sends:
            before = len(self._sends)
            self._sends = [r for r in self._sends if not _done(r)]
            progressed = len(self._sends) != before
        keep = []
        for s in self._streams:
            if s.peer in self.failed:
                for req, _ in s.inflight:
                    _cancel(req)
                s.inflight.clear()
                progressed = True
                continue
            if not s.send and not s.withdrawn:
                for req, _ in s.inflight:      # posted receives: cancel (a matched one completes)
                    try:
                        req.Cancel()
                    except MPI.Exception:
                        pass
                s.withdrawn = True
            still = deque()
            for req, nbytes in s.inflight:
                if not _done(req):
                    still.append((req, nbytes))
            progressed |= len(still) != len(s.inflight)
            s.inflight = still
            if still:
                keep.append(s)
        self._streams = keep
        if self._drains:     # (new messages of a drained stream are taken by drain() now)
            for d in self._drains:
                for r, _ in d[3]:   # posted receives: cancel (a matched one completes)
                    _cancel_only(r)
                d[3][:] = [(r, b) for r, b in d[3] if not _done(r)]
            before = len(self._drains)
            self._drains = [d for d in self._drains if d[3] and d[0] not in self.failed]
            progressed |= len(self._drains) != before
        return progressed

    def idle(self) -> bool:
        return not self._sends and not self._streams and not self._drains

    def stream_summary(self) -> list[str]:
        return describe_streams(self._streams)

    def busy(self) -> bool:
        # pending control sends count: a large pickled batch goes by rendezvous and needs this
        # side to progress it
        return bool(self._streams or self._sends)

    def close(self) -> None:
        for s in self._streams:
            for req, _ in s.inflight:
                _cancel(req)
        self._streams = []
        for req in self._sends:
            _cancel(req)
        self._sends = []
        self.bell.close()
        self._group.Free()


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


def _fail(s: _Stream, detail: str, dead: bool = True, mpi_error: int = 0,
          refused: bool = False) -> None:
    """End stream ``s`` (its peer is gone, or ``dead=False``: an MPI error that is not a death):
    drop its requests, report the failure."""
    for req, _ in s.inflight:
        _cancel(req)
    s.inflight.clear()
    try:
        s.on_error(PeerFailure(s.peer, detail, dead, mpi_error, s.tag, refused))
    except Exception:   # (the engine goes on; the runtime logs its own errors)
        log.exception("error handler of a stream with rank %d failed", s.peer)


def _cancel_only(req) -> None:
    """Ask MPI to cancel ``req`` and keep it (it completes, cancelled or matched, on a Test)."""
    try:
        req.Cancel()
    except MPI.Exception:
        pass


def _cancel(req) -> None:
    try:
        req.Cancel()
        req.Free()
    except MPI.Exception:
        pass
