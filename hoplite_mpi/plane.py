"""The object plane of a rank: fetching objects, serving copies (partial ones too), broadcast
fetches and reduce steps.  A mixin of :class:`~hoplite_mpi.runtime.Runtime`; every method runs on
the engine thread unless it says otherwise.

Receiver-driven transfers (Hoplite §3.3): a rank that needs an object asks the object's directory
shard for a sender (``DirPull``); the shard answers with the tail of the shortest chain of
complete or partial copies and records the receiver as a new partial copy fed by that sender.  The
receiver then ``Pull``s from the sender, which streams the prefix it has and forwards each chunk
as it arrives.  So simultaneous receivers form a pipeline S -> R1 -> R2 -> ..., and finished
receivers become senders for later ones.

Reduce steps (Hoplite §3.4): a slot's rank allocates its output, pulls its children's outputs
directly, and combines chunk ``i`` as soon as every child delivered chunk ``i``; its own parent
pulls the output while it grows.
"""
from __future__ import annotations

import bisect
import logging
import pickle
from concurrent.futures import Future
from typing import Any, Callable, Optional

import numpy as np

from . import faults
from . import protocol as P
from .collectives import portable_error
from .debug import engine_state
from .errors import HopliteError, ObjectDeletedError, TransferError
from .ids import format_id
from .protocol import ObjectInfo
from .serialization import (deserialize, frame_sizes, local_error, rebuild_error, serialize,
                            serialize_error, to_bytes)
from .store import DELETED, chunk_plan
from .transport.base import PeerFailure

log = logging.getLogger("hoplite_mpi")

HEAD_MAX = 4096   # frame 0 of a chunked object travels in its ObjectInfo up to this size


class ObjectPlane:
    """Mixin: needs ``store, transport, config, rank, send, shard_ranks, _known, _deleted,
    _lookup, _fetching, _deferred, _broadcasts, stats`` from the runtime."""

    # --- local state ---------------------------------------------------------------------------

    def _info(self, object_id: int) -> Optional[ObjectInfo]:
        info = self._known.get(object_id)
        if info is None and self.scheduler is not None:
            info = self.scheduler.objects.get(object_id)
        return info

    def local_frames(self, object_id: int) -> Any:
        """Frames of the object if this rank has them complete or inline, ``DELETED`` if it was
        deleted, else None.  Safe from any thread (reads only)."""
        if object_id in self._deleted:
            return DELETED
        entry = self.store.get(object_id)
        if entry is not None and entry.complete:
            return entry.frames
        info = self._info(object_id)
        if info is not None and info.inline is not None:
            return info
        return None

    def describe(self, object_id: int, frames: list, holder: int,
                 inline_threshold: Optional[int] = None) -> ObjectInfo:
        """ObjectInfo of a serialized value held by ``holder`` (inline when at most
        ``inline_threshold`` bytes, default ``Config.inline_threshold``)."""
        sizes = frame_sizes(frames)
        limit = self.config.inline_threshold if inline_threshold is None else inline_threshold
        if sum(sizes) <= limit:
            return ObjectInfo(object_id, sizes, (holder,), to_bytes(frames))
        head = bytes(frames[0]) if sizes[0] <= HEAD_MAX else None
        return ObjectInfo(object_id, sizes, (holder,), head=head)

    def put(self, frames: list, object_id: int | None = None) -> int:
        """Store a serialized value as a new object on this rank (any thread).  Returns its id."""
        oid = self.ids.next() if object_id is None else object_id
        info = self.describe(oid, frames, self.rank)
        if info.inline is not None:
            self._known[oid] = info
        else:
            self.call_soon(self.store.put, oid, frames)
        self.call_soon(self._published, info)
        return oid

    def _published(self, info: ObjectInfo) -> None:
        for rank in self.shard_ranks(info.object_id):
            self.send(rank, P.DirAdd(info))
        self._serve_deferred(info.object_id)
        if self.scheduler is not None:
            self._scheduled(self.scheduler.object_known(info))

    # --- fetching ------------------------------------------------------------------------------

    def fetch(self, object_id: int, callback: Callable[[Any], None]) -> None:
        """Call ``callback(frames | info-with-inline | DELETED)`` once this rank holds the object."""
        local = self.local_frames(object_id)
        if local is not None:
            callback(local)
            return
        info = self._info(object_id)
        if info is not None:
            self._fetch_from(info, callback)
        else:
            self._request(object_id, callback)

    def fetch_info(self, info: ObjectInfo, timeout: float | None = None) -> list:
        """Blocking (any thread but the engine): the frames of the object ``info`` describes."""
        fut: Future = Future()
        self.call_soon(self._fetch_from, info, fut.set_result)
        got = fut.result(timeout)
        if got is DELETED:
            raise ObjectDeletedError(format_id(info.object_id))
        if isinstance(got, ObjectInfo):
            if got.error:       # the transfer failed (TransferError)
                raise rebuild_error(got.inline)
            return got.inline
        return got

    def _fetch_from(self, info: ObjectInfo, callback: Callable) -> None:
        if info.inline is not None:
            callback(info)
            return
        self._request(info.object_id, callback)

    def _request(self, oid: int, callback: Callable) -> None:
        """Get a complete copy here: wait for one being received/produced, else ask the shard
        for a sender (DirPull) and pull from it."""
        local = self.local_frames(oid)
        if local is not None:
            callback(local)
            return
        waiting = self._fetching.get(oid)
        if waiting is not None:    # being fetched (received) here: its outcome is ours
            waiting.append(callback)
            return
        entry = self.store.get(oid)
        if entry is not None:      # being produced here (a reduce step): wait for it
            waiting = self._producing.get(oid)
            if waiting is None:
                waiting = self._producing[oid] = []
                entry.on_complete.append(lambda e: self._produced(oid, e))
            waiting.append(callback)
            return
        self._fetching[oid] = [callback]
        self._ask_sender(oid)

    def _produced(self, oid: int, entry: Any) -> None:
        for callback in self._producing.pop(oid, ()):
            callback(entry.frames)

    def _drop_unfinished_result(self, oid: int) -> None:
        """A failed reduce's result entry here will never be complete (its final step was
        aborted; the result is an error object in the directory): drop it, and send the readers
        that waited for it to the directory (they get the error object)."""
        entry = self.store.get(oid)
        if entry is not None and not entry.complete:
            entry.on_complete.clear()
            self.store.delete(oid)
        for callback in self._producing.pop(oid, ()):
            self._request(oid, callback)

    def _ask_sender(self, oid: int) -> None:
        """Ask the object's shard for a sender for this rank (answered by :meth:`_on_sender`)."""
        self.send(self.shard_ranks(oid)[0], P.DirPull(oid, self.rank))

    def _on_sender(self, oid: int, info: Optional[ObjectInfo]) -> None:
        """The shard's answer to our DirPull: a sender (or the value, or 'deleted')."""
        # keep what the answer tells even if nobody here waits yet: a DirPull the driver sent for
        # us (broadcast) can be answered before its Fetch arrives
        if info is None:
            self._deleted.add(oid)
        elif info.inline is not None:
            self._known[oid] = info
        callbacks = self._fetching.get(oid)
        if callbacks is None:
            if info is None or self.local_frames(oid) is not None or self.store.get(oid) is not None:
                return
            callbacks = self._fetching[oid] = []
        if info is None or info.inline is not None or self.local_frames(oid) is not None:
            del self._fetching[oid]
            got = DELETED if info is None else (self.local_frames(oid) or info)
            for callback in callbacks:
                callback(got)
            return
        sender = info.holders[0]
        if sender == self.rank:          # only we had it (it was freed meanwhile): ask again later
            self._ask_sender(oid)
            return
        entry = self.store.get(oid)
        if entry is None:
            entry = self.store.allocate(oid, info.sizes)
            entry.on_complete.append(lambda e: self._fetched(oid, info.head))
        self._receive(oid, entry, sender, oid, self._pull_failed)
        self._serve_deferred(oid)

    def _receive(self, into: int, entry: Any, sender: int, source_id: int,
                 on_error: Callable[[int, PeerFailure], None]) -> None:
        """Pull ``source_id`` from ``sender`` into store entry ``into`` (from its progress on)."""
        plan = chunk_plan(entry.sizes, self.config.chunk_size)
        skip = bisect.bisect_right(_ends(plan), entry.progress)
        chunks = [memoryview(entry.frames[f])[a:b] for f, a, b in plan[skip:]]
        if not chunks:
            self.store.advance(into, 0)
            return
        self._next_tag += 1
        tag = self._next_tag
        self.stats["pulls"] += 1
        self._receiving[into] = sender

        def failed(failure: PeerFailure) -> None:
            self._receiving.pop(into, None)
            on_error(into, failure)
        self.transport.recv_stream(sender, tag, chunks, lambda n: self._chunk_in(into, n), failed)
        self.send(sender, P.Pull(source_id, tag, entry.progress, entry.sizes))

    def _chunk_in(self, into: int, nbytes: int) -> None:
        faults.reached("chunk")
        if self.store.get(into) is None:    # deleted or freed while it was arriving: let it end
            self._receiving.pop(into, None)
            return
        if self.store.advance(into, nbytes):
            self._receiving.pop(into, None)

    def _fetched(self, oid: int, head: Optional[bytes]) -> None:
        entry = self.store.get(oid)
        if entry is None:
            return
        info = ObjectInfo(oid, entry.sizes, (self.rank,), head=head)
        for rank in self.shard_ranks(oid):  # this rank now holds a copy (a sender for others)
            self.send(rank, P.DirAdd(info))
        for callback in self._fetching.pop(oid, ()):
            callback(entry.frames)

    def _pull_failed(self, oid: int, failure: PeerFailure) -> None:
        if failure.dead:
            log.warning("rank %d: pull of %s from rank %d failed: %s", self.rank, format_id(oid),
                        failure.rank, failure.detail)
            self._ask_sender(oid)   # keep the bytes, resume from another sender
            return
        self._transfer_failed(oid, failure)

    def _transfer_error(self, oid: int, failure: PeerFailure) -> tuple:
        """The error object (frames) of a stream of ``oid`` that failed for another reason than
        a death.  Unless the peer merely no longer held the object (``refused``), that is a bug
        of ours: counted, logged with this rank's state, and the sender told to post no more."""
        if failure.refused:
            log.debug("rank %d: rank %d no longer holds %s", self.rank, failure.rank, format_id(oid))
        else:
            self.stats["transfer_errors"] += 1
            if failure.tag >= 0:
                self.send(failure.rank, P.StreamCancel(failure.tag))   # it posts no more chunks
            log.error("rank %d: transfer of %s from rank %d failed (not a rank loss; a bug, "
                      "please report it): %s\n%s", self.rank, format_id(oid), failure.rank,
                      failure.detail, engine_state(self))
        return to_bytes(local_error(TransferError(format_id(oid), failure.rank, failure.detail,
                                                  failure.mpi_error)))

    def _transfer_failed(self, oid: int, failure: PeerFailure) -> None:
        """A pull from a live rank failed for another reason than its death (a bug of ours):
        every reader of the object on this rank gets :class:`TransferError`; the incomplete copy
        is dropped, so a later fetch starts afresh.  Both ranks stay in the job."""
        error = self._transfer_error(oid, failure)
        self._receiving.pop(oid, None)
        entry = self.store.get(oid)
        if entry is not None and not entry.complete:
            entry.pooled = False     # (receives still in flight write into its buffers)
            self.store.delete(oid)
        info = ObjectInfo(oid, frame_sizes(error), (), error, True)
        for callback in self._fetching.pop(oid, ()):
            callback(info)

    def _on_pull_refused(self, source: int, msg: P.PullRefused) -> None:
        oid = msg.object_id
        if msg.reason or oid not in self._fetching:
            # a mismatched copy (a bug), or a reduce step's child pull: fail that stream
            self.transport.fail_stream(source, msg.tag, PeerFailure(
                source, msg.reason or f"rank {source} no longer holds {format_id(oid)}", dead=False,
                refused=not msg.reason))
            return
        # The sender dropped its copy (deleted/freed): cancel our receive and ask the shard anew.
        self.transport.cancel_stream(source, msg.tag)
        self._receiving.pop(oid, None)
        entry = self.store.get(oid)
        if entry is not None and not entry.complete:
            self.store.delete(oid)
        self._ask_sender(oid)

    # --- serving ---------------------------------------------------------------------------

    def _on_pull(self, source: int, msg: P.Pull) -> None:
        faults.reached("serve")
        oid = msg.object_id
        entry = self.store.get(oid)
        if entry is None:
            if oid in self._deleted or oid in self._freed_here:
                self.send(source, P.PullRefused(oid, msg.tag))
            else:   # we were chosen as a sender before our own copy started: serve it then
                self._deferred.setdefault(oid, []).append((source, msg))
            return
        if msg.sizes and tuple(msg.sizes) != tuple(entry.sizes):
            reason = (f"rank {self.rank} holds {format_id(oid)} with frame sizes {entry.sizes}, "
                      f"rank {source} expects {tuple(msg.sizes)}")
            log.error("rank %d: refused a pull (a bug, please report it): %s\n%s", self.rank,
                      reason, engine_state(self))
            self.send(source, P.PullRefused(oid, msg.tag, reason))
            return
        plan = chunk_plan(entry.sizes, self.config.chunk_size)
        ends = _ends(plan)
        skip = bisect.bisect_right(ends, msg.offset)
        chunks = [memoryview(entry.frames[f]).cast("B")[a:b] for f, a, b in plan[skip:]]
        available = None
        if not entry.complete:
            def available(entry=entry, ends=ends, skip=skip):
                return bisect.bisect_right(ends, entry.progress) - skip
        self.stats["serves"] += 1
        self.transport.send_stream(source, msg.tag, chunks, lambda: None,
                                   lambda failure: log.warning("rank %d: send to rank %d failed: %s",
                                                               self.rank, failure.rank, failure.detail),
                                   available)

    def _serve_deferred(self, oid: int) -> None:
        for source, msg in self._deferred.pop(oid, ()):
            self._on_pull(source, msg)

    def _refuse_deferred(self, oid: int, held: bool = True) -> None:
        """``oid`` was freed here: refuse pulls of it waiting for our copy, and later ones.
        (Only an object this rank ``held`` in its store, or had pulls for, is remembered: no
        pull ever comes for a small value, and remembering every freed id made a long driver's
        memory grow by ~80 bytes per task up to the bound.)"""
        deferred = self._deferred.pop(oid, ())
        if held or deferred or oid in self._fetching:   # (a fetch here: we may be a sender)
            self._freed_here.add(oid)
            if len(self._freed_here) > 1 << 16:
                self._freed_here.clear()
        for source, msg in deferred:
            self.send(source, P.PullRefused(oid, msg.tag))

    # --- broadcast -------------------------------------------------------------------------

    def start_broadcast(self, object_id: int, ranks: list[int], done: Callable[[dict], None]) -> None:
        """Make every rank of ``ranks`` hold a complete copy; ``done({rank: error})`` after.
        Dead ranks are skipped (and a target that dies meanwhile is no longer waited for)."""
        ranks = [r for r in ranks if r not in self.dead]
        token = self.ids.next()
        self._broadcasts[token] = (set(ranks), {}, done)
        shard = self.shard_ranks(object_id)[0]
        for rank in ranks:
            if rank == self.rank:
                self._on_fetch(self.rank, P.Fetch(object_id, token))
            else:
                # The DirPull goes out from here together with the Fetch: the shard and the
                # target wake up at the same time instead of one after the other (an idle rank
                # polls only every backoff_max seconds).
                self.send(shard, P.DirPull(object_id, rank))
                self.send(rank, P.Fetch(object_id, token, pulled=True))
        if not ranks:
            self._on_fetched(self.rank, P.Fetched(token, self.rank))

    def _on_fetch(self, source: int, msg: P.Fetch) -> None:
        if msg.token == P.REPLICA_TOKEN:
            faults.reached("replica")
        def reply(got: Any) -> None:
            error = "deleted" if got is DELETED else None
            if isinstance(got, ObjectInfo) and got.error:
                exc = rebuild_error(got.inline)     # (an error object is a value: held fine)
                if isinstance(exc, TransferError):  # (but the copy itself failed)
                    error = repr(exc)
            self.send(source, P.Fetched(msg.token, self.rank, error))
        oid = msg.object_id
        if msg.pulled and self.local_frames(oid) is None and self.store.get(oid) is None:
            # our DirPull was sent by the driver: wait for the shard's answer (it may be here)
            self._fetching.setdefault(oid, []).append(reply)
            return
        self.fetch(oid, reply)

    def _on_fetched(self, source: int, msg: P.Fetched) -> None:
        if msg.token == P.REPLICA_TOKEN:   # a background replica is complete (it registered itself)
            return
        state = self._broadcasts.get(msg.token)
        if state is None:
            coordinator = self._reduces.get(msg.token)
            if coordinator is not None:
                self._coordinated(coordinator, coordinator.fetched(msg.rank, msg.error))
            return
        remaining, errors, done = state
        remaining.discard(msg.rank)
        if msg.error:
            errors[msg.rank] = msg.error
        if not remaining:
            del self._broadcasts[msg.token]
            done(errors)

    # --- reduce steps (the node side) ------------------------------------------------------

    def _on_reduce_late(self, source: int, msg: P.ReduceLate) -> None:
        step = self._reduce_steps.get(msg.out_id)
        if step is not None:     # (else the step failed and told the coordinator)
            step.add_late(msg.info, msg.rank)

    def _on_reduce_abort(self, source: int, msg: P.ReduceAbort) -> None:
        self._aborted_reduces.add(msg.reduce_id)
        if len(self._aborted_reduces) > 4096:
            self._aborted_reduces.clear()
        for step in list(self._reduce_steps.values()):
            if step.msg.reduce_id == msg.reduce_id:
                step.abort()
                if step.msg.final and not msg.result_id:      # the reduce failed
                    self._drop_unfinished_result(step.msg.out_id)
                    if step.msg.adopt:       # (a re-planned one: the result entry itself)
                        self._drop_unfinished_result(step.msg.adopt)
        for rank in msg.forward:     # (after the final step stopped giving out its output)
            self.send(rank, P.ReduceAbort(msg.reduce_id))
        if msg.result_id:            # where the result stands now: the next attempt goes on from there
            entry = self.store.get(msg.result_id)
            self.send(source, P.ReduceResume(msg.reduce_id, entry.progress if entry is not None else 0))

    def _on_reduce_step(self, source: int, msg: P.ReduceStep) -> None:
        faults.reached("reduce")
        try:
            _ReduceStep(self, source, msg).start()
        except Exception as exc:
            self.send(source, P.ReduceStepDone(msg.reduce_id, msg.out_id, self.rank,
                                               error=to_bytes(serialize_error(exc, self.rank))))


def _ends(plan: list) -> list[int]:
    ends, total = [], 0
    for _, a, b in plan:
        total += b - a
        ends.append(total)
    return ends


class _ReduceStep:
    """One slot's work: out = op(input, child_1, ..., child_m), chunk by chunk.

    Each contribution (the slot's own input, each child's stream, and ``msg.late`` contributions
    named later by :class:`~hoplite_mpi.protocol.ReduceLate`) is combined into chunk ``i`` of the
    output as soon as it has chunk ``i``; chunk ``i`` is released to readers (``store.advance``, in
    order) once all of them are in.  Local contributions (the input, a late input on this rank)
    are applied to a chunk together with its first streamed contribution, so no chunk is copied
    when an op can write it.

    Rank loss: a child stream that fails (its rank died) is reported (``ReduceStepDone.lost``) and
    the step waits for :class:`~hoplite_mpi.protocol.ReduceAbort`.  Aborted, a step receives the
    rest of every live stream into scratch space (no MPI request is cancelled, so no sender is
    left with an unmatched send) and, unless it is the final step, releases its whole output
    unchanged (garbage that only other aborted steps read, then freed).  An aborted final step
    stops releasing: the result entry keeps the chunks it gave out (complete reductions) and the
    next attempt's final step fills in the rest (``adopt``).  The next attempt's steps start at
    the chunk after those bytes (``msg.start``): children are pulled from that offset and earlier
    chunks of the output are released unread.
    """

    def __init__(self, rt: Any, coordinator: int, msg: P.ReduceStep) -> None:
        self.rt, self.coordinator, self.msg = rt, coordinator, msg
        self.op: np.ufunc = pickle.loads(msg.op)
        self.sizes = tuple(msg.sizes)
        self.plan = chunk_plan(self.sizes, rt.config.chunk_size)
        # a re-planned reduce goes on from the result's progress: chunks before ``first`` are
        # neither pulled nor combined (their bytes in this step's output are never read)
        ends = _ends(self.plan)
        self.first = bisect.bisect_right(ends, msg.start) if msg.start else 0
        self.offset = ends[self.first - 1] if self.first else 0    # bytes before chunk ``first``
        self.got: list[int] = []
        self.bufs: list = []
        self.locals: list[np.ndarray] = []     # raw C-order bytes of local contributions
        self.late = msg.late
        self.combined = 0
        self.open = 0                 # child streams still receiving
        self.contributions = 0        # contributions complete: local ones, and whole streams
        self.entry: Any = None
        self.reported = False         # a failure was sent to the coordinator
        self.aborted = False
        self.finished = False

    def _input(self, info: ObjectInfo) -> tuple[bytes, np.ndarray]:
        """(C-order header, raw C-order bytes) of input ``info``; a Fortran-ordered or other
        non-C-contiguous input is copied into C order (every slot works on C-order bytes)."""
        frames = self.rt.local_frames(info.object_id)
        if isinstance(frames, ObjectInfo):
            frames = frames.inline
        if frames is None or frames is DELETED:
            if info.inline is None:
                raise RuntimeError(f"reduce input {format_id(info.object_id)} is not on rank {self.rt.rank}")
            frames = info.inline
        arr = deserialize(frames)
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        head = serialize(np.empty(arr.shape, arr.dtype))[0]
        if len(head) != self.sizes[0]:
            raise RuntimeError("reduce: unexpected header size")
        return bytes(head), arr.reshape(-1).view(np.uint8)

    def start(self) -> None:
        rt, msg = self.rt, self.msg
        out = msg.out_id
        if msg.input_info is not None and not msg.children and not msg.late:   # a leaf: its input
            head, data = self._input(msg.input_info)
            rt.store.put(out, [head, data])
            rt._serve_deferred(out)
            self._done()
            return
        entry = self.entry = rt.store.allocate(out, self.sizes)
        entry.on_complete.append(lambda e: self._done())
        rt._reduce_steps[out] = self
        if msg.input_info is None and len(msg.children) == 1 and not msg.late:   # a copy step
            self._announce()
            (child_rank, child_id), = msg.children
            if self.offset:
                rt.store.advance(out, self.offset)
                if entry.complete:
                    return
            rt._receive(out, entry, child_rank, child_id, lambda oid, failure: self._failed(failure))
            rt._serve_deferred(out)
            return
        head = msg.head
        if msg.input_info is not None:
            head, data = self._input(msg.input_info)
            self.locals.append(data)
            self.contributions += 1
        self.dtype = pickle.loads(head, buffers=[np.empty(self.sizes[1], np.uint8)]).dtype
        entry.frames[0][:] = np.frombuffer(head, np.uint8)
        self.out = entry.frames[1]
        expected = len(self.locals) + len(msg.children) + self.late
        # header chunks are complete from the start; data chunks count their contributions
        self.count = [expected if f != 1 or i < self.first else 0
                      for i, (f, _, _) in enumerate(self.plan)]
        self.expected = expected
        self._announce()
        for child_rank, child_id in msg.children:
            self._pull(child_rank, child_id)
        rt._serve_deferred(out)
        if msg.reduce_id in rt._aborted_reduces:    # its abort overtook it
            self.abort()
        self._release()
        if not self.plan:
            rt.store.advance(out, 0)

    def _pull(self, rank: int, oid: int) -> None:
        if self.first >= len(self.plan):     # (a re-plan after the result was complete)
            return
        rt, i = self.rt, len(self.bufs)
        bufs = [rt.store.buffer(size) for size in self.sizes]
        self.bufs.append(bufs)
        self.got.append(self.first)
        self.open += 1
        chunks = [memoryview(bufs[f])[a:b] for f, a, b in self.plan[self.first:]]
        rt._next_tag += 1
        tag = rt._next_tag
        rt.transport.recv_stream(rank, tag, chunks, lambda n, i=i: self._arrived(i),
                                 lambda failure: self._stream_failed(failure))
        rt.send(rank, P.Pull(oid, tag, self.offset, self.sizes))

    def add_late(self, info: ObjectInfo, rank: int) -> None:
        """A late contribution: input ``info`` on ``rank`` (pulled, or combined here if local)."""
        if self.aborted or self.late <= 0:
            return
        self.late -= 1
        if rank != self.rt.rank and info.inline is None:
            self._pull(rank, info.object_id)
            return
        try:
            _, data = self._input(info)
        except Exception as exc:
            self._report(local_error(HopliteError(
                f"reduce input {format_id(info.object_id)} unusable on rank {self.rt.rank}: {exc}")))
            return
        self.locals.append(data)
        self.contributions += 1
        streamed = bool(self.bufs) or self.late > 0
        try:
            for i, (f, a, b) in enumerate(self.plan):
                if f != 1 or i < self.first:
                    continue
                if self.count[i]:
                    o = self.out[a:b].view(self.dtype)
                    self.op(o, data[a:b].view(self.dtype), out=o)
                    self.count[i] += 1
                elif not streamed:          # nothing else will come: combine the local ones now
                    self._combine(i, None)
        except Exception as exc:    # the op failed on these values: the reduce fails, not the rank
            self._op_failed(exc)
            return
        self._release()

    def _arrived(self, child: int) -> None:
        faults.reached("combine")
        i = self.got[child]
        self.got[child] += 1
        if self.got[child] == len(self.plan):
            self.contributions += 1
            self._closed()
        if self.aborted or self.reported:
            return
        f, a, b = self.plan[i]
        if f == 1:
            try:
                self._combine(i, self.bufs[child][1][a:b].view(self.dtype))
            except Exception as exc:    # the op failed on these values: fail the reduce only
                self._op_failed(exc)
                return
        self._release()

    def _op_failed(self, exc: BaseException) -> None:
        self._report(local_error(portable_error(
            exc, f"reduce op np.{self.op.__name__} failed on rank {self.rt.rank}")))

    def _combine(self, i: int, chunk: Optional[np.ndarray]) -> None:
        """Add ``chunk`` (a streamed contribution to chunk ``i``; None: none) to the output."""
        _, a, b = self.plan[i]
        dt = self.dtype
        o = self.out[a:b].view(dt)
        if self.count[i]:
            self.op(o, chunk, out=o)
            self.count[i] += 1
            return
        parts = [x[a:b].view(dt) for x in self.locals] + ([chunk] if chunk is not None else [])
        if len(parts) == 1:
            o[...] = parts[0]
        else:
            self.op(parts[0], parts[1], out=o)
            for part in parts[2:]:
                self.op(o, part, out=o)
        self.count[i] = len(parts)

    def _release(self) -> None:
        """Advance the output over every leading chunk that has all its contributions (all of
        them once an aborted step that is not final drains)."""
        drain = self.aborted and not self.msg.final
        if (self.reported or self.aborted) and not drain:
            return
        out = self.msg.out_id
        last = len(self.plan) - 1
        while self.combined < len(self.plan) and self.rt.store.get(out) is self.entry \
                and (drain or self.count[self.combined] >= self.expected):
            if self.combined == last >= self.first and not drain \
                    and self.contributions < self.expected:
                break   # (empty arrays: no data chunk waits for the contributions, this does)
            _, a, b = self.plan[self.combined]
            self.combined += 1
            self.rt.store.advance(out, b - a)

    def _stream_failed(self, failure: PeerFailure) -> None:
        self._closed()
        self._failed(failure)

    def _failed(self, failure: PeerFailure) -> None:
        """A child's rank died: tell the coordinator (it re-plans) and wait for the abort.  Any
        other failure of a child's stream (not a death) fails the reduce with TransferError."""
        if self.aborted:
            return
        if failure.dead:
            self._report(local_error(HopliteError(
                f"reduce step on rank {self.rt.rank} lost its input from rank {failure.rank}: "
                f"{failure.detail}")), lost=failure.rank)
            return
        # (refused: the child's output was freed, this reduce is being torn down)
        self._report(self.rt._transfer_error(self.msg.out_id, failure))

    def _report(self, error: Any, lost: int = -1) -> None:
        if self.reported:
            return
        self.reported = True
        self.rt.send(self.coordinator, P.ReduceStepDone(self.msg.reduce_id, self.msg.out_id,
                                                        self.rt.rank, error=to_bytes(error), lost=lost))

    def abort(self) -> None:
        """This attempt is abandoned (see the class docstring)."""
        if self.aborted or self.finished:
            return
        self.aborted = True
        self.late = 0
        if self.msg.final:   # (it may never finish: a failed reduce's result is never adopted)
            self.rt._reduce_steps.pop(self.msg.out_id, None)
        self._release()
        self._closed(0)

    def _closed(self, n: int = 1) -> None:
        """``n`` child streams ended; scratch space goes back once all have and the step ended."""
        self.open -= n
        if self.open <= 0 and self.bufs and (self.finished or self.aborted):
            for bufs in self.bufs:
                self.rt.store.give_back(bufs)
            self.bufs = []

    def _announce(self) -> None:
        if self.msg.final and not self.msg.adopt:   # others (an allreduce) may chain on it
            info = ObjectInfo(self.msg.out_id, self.sizes, ())
            for rank in self.rt.shard_ranks(self.msg.out_id):
                self.rt.send(rank, P.DirPartial(info, self.rt.rank))

    def _done(self) -> None:
        rt, msg = self.rt, self.msg
        self.finished = True
        if rt._reduce_steps.get(msg.out_id) is self:
            del rt._reduce_steps[msg.out_id]
        self._closed(0)
        self.locals = self.out = None
        if self.aborted:
            return
        out_id = msg.out_id
        if msg.adopt:
            out_id = self._adopt()
        if msg.final:
            info = ObjectInfo(out_id, self.sizes, (rt.rank,), head=_head_of(rt, out_id))
            for rank in rt.shard_ranks(out_id):
                rt.send(rank, P.DirAdd(info))
        rt.send(self.coordinator, P.ReduceStepDone(msg.reduce_id, out_id, rt.rank, self.sizes))

    def _adopt(self) -> int:
        """(re-planned reduce) Make this complete output the result object ``msg.adopt``: fill in
        the chunks an abandoned attempt's result entry has not given out, or store it as is."""
        rt, store = self.rt, self.rt.store
        new = store.get(self.msg.out_id)
        old = store.get(self.msg.adopt)
        if old is None:
            store.put(self.msg.adopt, list(new.frames))
        elif not old.complete:      # chunks before ``progress`` were given out: keep them
            done = old.progress
            for (f, a, b), end in zip(self.plan, _ends(self.plan)):
                if end - (b - a) >= done:
                    _raw(old.frames[f])[a:b] = _raw(new.frames[f])[a:b]
            store.advance(self.msg.adopt, old.nbytes - done)
        store.delete(self.msg.out_id)
        rt._serve_deferred(self.msg.adopt)
        return self.msg.adopt


def _raw(frame: Any) -> np.ndarray:
    return np.frombuffer(frame, np.uint8) if not isinstance(frame, np.ndarray) else frame.view(np.uint8)


def _head_of(rt: Any, oid: int) -> Optional[bytes]:
    entry = rt.store.get(oid)
    if entry is None or entry.sizes[0] > HEAD_MAX:
        return None
    return bytes(entry.frames[0])
