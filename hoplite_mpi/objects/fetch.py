"""Getting a complete copy of an object onto this rank (receiver-driven, Hoplite §3.3).

A rank that needs an object asks the object's directory shard for a sender (``DirPull``); the
shard answers (``DirSender``) with the tail of the shortest chain of complete or partial copies and
records this rank as a new partial copy fed by that sender.  This rank then ``Pull``s from the
sender, which streams the prefix it has and forwards each chunk as it arrives, so simultaneous
receivers form a pipeline S -> R1 -> R2 -> ..., and finished receivers become senders for later
ones.  A pull whose sender dies resumes from another sender, keeping the bytes received.
"""
from __future__ import annotations

import bisect
import logging
import time
from concurrent.futures import Future
from typing import Any, Callable, Optional

from .. import faults
from .. import tracing as timeline
from .. import protocol as P
from ..context import Loss
from ..errors import ObjectDeletedError, TransferError
from ..ids import format_id, shard_of
from ..protocol import ObjectInfo
from ..serialization import error_info, local_error, rebuild_error, to_bytes
from ..store import DELETED, chunk_ends, object_plan, one_chunk_per_frame
from ..transport.base import PeerFailure

log = logging.getLogger("hoplite_mpi")

# seconds before asking the shard again when its answer cannot be used yet (it named this rank,
# or a sender that just died and the shard may not know yet): an immediate re-ask made a
# message ping-pong between this rank and the shard until the state changed
RETRY_DELAY = 0.002


class Fetcher:
    """Copies being fetched (``fetching``: DirPull sent), produced here (``producing``: a reduce
    step's output that readers wait for) and received (``receiving``: object -> (sending rank,
    stream tag))."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.fetching: dict[int, list[Callable]] = {}
        self.producing: dict[int, list[Callable]] = {}
        self.receiving: dict[int, tuple[int, int]] = {}
        self._began: dict[int, tuple] = {}       # (timeline) into -> (start, sender, bytes, source)
        self._asked: dict[int, tuple] = {}       # (timeline) object -> (DirPull sent s, shard rank)

    # --- entry points ------------------------------------------------------------------------

    def fetch(self, object_id: int, callback: Callable[[Any], None]) -> None:
        """Call ``callback(frames | info-with-inline | DELETED)`` once this rank holds the object
        (an ObjectInfo with ``error`` set if the copy failed: :class:`TransferError`)."""
        catalog = self.ctx.catalog
        local = catalog.local_frames(object_id)
        if local is not None:
            callback(local)
            return
        info = catalog.info(object_id)
        if info is not None:
            self.fetch_from(info, callback)
        else:
            self.request(object_id, callback)

    def fetch_info(self, info: ObjectInfo, timeout: float | None = None) -> list:
        """Blocking (any thread but the engine): the frames of the object ``info`` describes.

        Raises:
            ObjectDeletedError: it was deleted.  TransferError: the copy failed (a bug).
            concurrent.futures.TimeoutError: not here within ``timeout`` seconds.
        """
        fut: Future = Future()
        self.ctx.call_soon(self.fetch_from, info, fut.set_result)
        got = fut.result(timeout)
        if got is DELETED:
            raise ObjectDeletedError(format_id(info.object_id))
        if isinstance(got, ObjectInfo):
            if got.error:       # the transfer failed (TransferError)
                raise rebuild_error(got.inline)
            return got.inline
        return got

    def fetch_from(self, info: ObjectInfo, callback: Callable) -> None:
        """:meth:`request` the object ``info`` describes (a task's input), straight from one of
        its holders if it is one chunk (``Config.direct_args``); ``callback`` as :meth:`fetch`."""
        if info.inline is not None:
            callback(info)
            return
        self.request(info.object_id, callback, self._direct(info))

    def _direct(self, info: ObjectInfo) -> Optional[ObjectInfo]:
        """``info`` naming one live holder (not this rank) to pull it from without asking its
        shard, if ``Config.direct_args`` and the object is one chunk; else None."""
        ctx = self.ctx
        if not ctx.config.direct_args or not info.holders or info.error:
            return None
        if not one_chunk_per_frame(info.sizes, ctx.config):
            return None     # (the shard's chain of partial copies pipelines it)
        for holder in info.holders:
            if holder != ctx.rank and holder not in ctx.dead:
                return ObjectInfo(info.object_id, info.sizes, (holder,), head=info.head)
        return None

    def await_sender(self, oid: int, callback: Callable) -> None:
        """Wait for the answer to a DirPull someone else sent for this rank (a broadcast)."""
        self.fetching.setdefault(oid, []).append(callback)

    def pull_direct(self, info: ObjectInfo, callback: Callable) -> None:
        """Pull from ``info.holders[0]`` (a complete copy) without asking the directory (a
        broadcast, ``Fetch.sender``); the copy registers itself once complete, as any.  A sender
        that no longer holds it (PullRefused) or dies sends this rank to the directory."""
        self.fetching[info.object_id] = [callback]
        self.on_sender(info.holders[0], P.DirSender(info.object_id, info))

    def request(self, oid: int, callback: Callable, direct: Optional[ObjectInfo] = None) -> None:
        """Get a complete copy here: wait for one being received/produced, else ask the shard
        for a sender (DirPull) and pull from it (``direct``: pull from its holder at once, as
        :meth:`pull_direct`)."""
        ctx = self.ctx
        local = ctx.catalog.local_frames(oid)
        if local is not None:
            callback(local)
            return
        waiting = self.fetching.get(oid)
        if waiting is not None:    # being fetched (received) here: its outcome is ours
            waiting.append(callback)
            return
        entry = ctx.store.get(oid)
        if entry is not None:      # being produced here (a reduce step): wait for it
            waiting = self.producing.get(oid)
            if waiting is None:
                waiting = self.producing[oid] = []
                entry.on_complete.append(lambda e: self._produced(oid, e))
            waiting.append(callback)
            return
        if direct is not None:
            self.pull_direct(direct, callback)
            return
        self.fetching[oid] = [callback]
        self.ask_sender(oid)

    def _produced(self, oid: int, entry: Any) -> None:
        for callback in self.producing.pop(oid, ()):
            callback(entry.frames)

    def drop_unfinished_result(self, oid: int) -> None:
        """A failed reduce's result entry here will never be complete (its final step was
        aborted; the result is an error object in the directory): drop it, and send the readers
        that waited for it to the directory (they get the error object)."""
        store = self.ctx.store
        entry = store.get(oid)
        if entry is not None and not entry.complete:
            entry.on_complete.clear()
            store.delete(oid)
            self.ctx.server.refuse_partial(oid)
        for callback in self.producing.pop(oid, ()):
            self.request(oid, callback)

    def ask_sender(self, oid: int) -> None:
        """Ask the object's shard for a sender for this rank (answered by :meth:`on_sender`)."""
        shard = self.ctx.shard_ranks(oid)[0]
        if timeline.recorder is not None:
            self._asked[oid] = (time.perf_counter(), shard)
        self.ctx.send(shard, P.DirPull(oid, self.ctx.rank))

    def _ask_later(self, oid: int) -> None:
        """Ask again after :data:`RETRY_DELAY` seconds, if a reader still waits then."""
        def again() -> None:
            if oid in self.fetching and oid not in self.receiving:
                self.ask_sender(oid)
        self.ctx.engine.timers.call_later(RETRY_DELAY, again)

    # --- the shard's answer and the stream ---------------------------------------------------

    def on_sender(self, source: int, msg: P.DirSender) -> None:
        """The shard's answer to a DirPull: a sender (or the value, or 'deleted')."""
        ctx, oid, info = self.ctx, msg.object_id, msg.info
        catalog = ctx.catalog
        if timeline.recorder is not None:
            self._trace_answer(oid, info)
        # keep what the answer tells even if nobody here waits yet: a DirPull the driver sent for
        # us (broadcast) can be answered before its Fetch arrives
        catalog.remember(info, oid)
        local = catalog.local_frames(oid)
        if info is None or info.inline is not None or local is DELETED or isinstance(local, ObjectInfo):
            # no chunked copy to pull any more (deleted, or now a value here, e.g. the error
            # object of an object lost with its ranks, known to rank 0 before its shard says so;
            # simulation seeds 126, 1472)
            ctx.server.abandon_partial(oid)
        callbacks = self.fetching.get(oid)
        if callbacks is None:
            if info is None or local is not None or ctx.store.get(oid) is not None:
                return
            callbacks = self.fetching[oid] = []
        if info is None or info.inline is not None or local is not None:
            del self.fetching[oid]
            got = DELETED if info is None else (local or info)
            for callback in callbacks:
                callback(got)
            return
        if oid in self.receiving:
            # a second answer while a stream already fills our copy (our own DirPull, e.g. for a
            # replica, and the driver's for a broadcast): a second stream into the same entry
            # would advance its progress twice and complete it with chunks never written
            # (found by the simulation, seed 18)
            return
        sender = info.holders[0]
        if sender == ctx.rank:           # only we had it (it was freed meanwhile): ask again later
            self._ask_later(oid)
            return
        entry = ctx.store.get(oid)
        if entry is None:
            entry = ctx.store.allocate(oid, info.sizes)
            entry.on_complete.append(lambda e: self._fetched(oid, info.head))
        self.receive(oid, entry, sender, oid, self.pull_failed)
        ctx.server.serve_deferred(oid)

    def receive(self, into: int, entry: Any, sender: int, source_id: int,
                on_error: Callable[[int, PeerFailure], None]) -> None:
        """Pull ``source_id`` from ``sender`` into store entry ``into`` (from its progress on)."""
        ctx = self.ctx
        plan = object_plan(entry.sizes, ctx.config)
        skip = bisect.bisect_right(chunk_ends(plan), entry.progress)
        chunks = [memoryview(entry.frames[f])[a:b] for f, a, b in plan[skip:]]
        if not chunks:
            ctx.store.advance(into, 0)
            return
        tag = ctx.next_tag()
        ctx.stats["pulls"] += 1
        self.receiving[into] = (sender, tag)
        if timeline.recorder is not None:
            self._began[into] = (time.perf_counter(), sender, sum(len(c) for c in chunks), source_id)

        def failed(failure: PeerFailure) -> None:
            self.receiving.pop(into, None)
            on_error(into, failure)
        ctx.transport.recv_stream(sender, tag, chunks, lambda n: self._chunk_in(into, n), failed)
        ctx.send(sender, P.Pull(source_id, tag, entry.progress, entry.sizes))

    def sender_of(self, oid: int) -> Optional[int]:
        """(timeline) The rank the pull into this rank's copy of ``oid`` streams from, while it
        runs and in the callbacks of its completion (they run before :meth:`_chunk_in` drops
        the record); None if no pull of it was recorded."""
        began = self._began.get(oid)
        return began[1] if began is not None else None

    def _trace_answer(self, oid: int, info: Optional[ObjectInfo]) -> None:
        """Record this rank's DirPull of ``oid`` and the shard's answer as a "directory" event
        (answer: the sender's rank, "inline" or "deleted"); an answer to a DirPull sent for this
        rank by another (a broadcast's) is not recorded."""
        asked = self._asked.pop(oid, None)
        rec = timeline.recorder
        if asked is None or rec is None:
            return
        start, shard = asked
        answer = "deleted" if info is None else "inline" if info.inline is not None else "sender"
        args = {"object": format_id(oid), "shard": shard, "answer": answer}
        if answer == "sender":
            args["sender"] = info.holders[0]
        rec.complete(f"DirPull {format_id(oid)}", "directory", start, time.perf_counter(), args,
                     tid="directory")

    def _chunk_in(self, into: int, nbytes: int) -> None:
        faults.reached("chunk")
        store = self.ctx.store
        if store.get(into) is None:    # deleted or freed while it was arriving: let it end
            self.receiving.pop(into, None)
            return
        if store.advance(into, nbytes):
            self.receiving.pop(into, None)
            began = self._began.pop(into, None)
            rec = timeline.recorder
            if began is not None and rec is not None:
                start, sender, total, source = began
                rec.complete(f"pull {format_id(source)}", "transfer", start, time.perf_counter(),
                             {"object": format_id(source), "bytes": total, "peer": sender},
                             tid="transfers")

    def _fetched(self, oid: int, head: Optional[bytes]) -> None:
        ctx = self.ctx
        entry = ctx.store.get(oid)
        if entry is None:
            return
        ctx.server.forget_partial(oid)
        ctx.publish(ObjectInfo(oid, entry.sizes, (ctx.rank,), head=head))   # a sender for others
        for callback in self.fetching.pop(oid, ()):
            callback(entry.frames)

    # --- failures ----------------------------------------------------------------------------

    def pull_failed(self, oid: int, failure: PeerFailure) -> None:
        """A pull of ``oid`` into this rank failed: resume from another sender after a death,
        else fail the readers with TransferError."""
        if failure.dead:
            log.warning("rank %d: pull of %s from rank %d failed: %s", self.ctx.rank,
                        format_id(oid), failure.rank, failure.detail)
            self._ask_later(oid)   # keep the bytes, resume from another sender
            return
        self._transfer_failed(oid, failure)

    def transfer_error(self, oid: int, failure: PeerFailure) -> bytes:
        """The error object (bytes) of a stream of ``oid`` that failed for another reason than a
        death.  Unless the peer merely no longer held the object (``refused``), that is a bug of
        ours: counted, logged with this rank's state, and the sender told to post no more."""
        ctx = self.ctx
        if failure.refused:
            log.debug("rank %d: rank %d no longer holds %s", ctx.rank, failure.rank, format_id(oid))
        else:
            ctx.stats["transfer_errors"] += 1
            if failure.tag >= 0:
                ctx.send(failure.rank, P.StreamCancel(failure.tag))   # it posts no more chunks
            log.error("rank %d: transfer of %s from rank %d failed (not a rank loss; a bug, "
                      "please report it): %s\n%s", ctx.rank, format_id(oid), failure.rank,
                      failure.detail, ctx.engine_state())
        return to_bytes(local_error(TransferError(format_id(oid), failure.rank, failure.detail,
                                                  failure.mpi_error)))

    def _transfer_failed(self, oid: int, failure: PeerFailure) -> None:
        """A pull from a live rank failed for another reason than its death (a bug of ours):
        every reader of the object on this rank gets :class:`TransferError`; the incomplete copy
        is dropped, so a later fetch starts afresh.  Both ranks stay in the job."""
        error = self.transfer_error(oid, failure)
        self.receiving.pop(oid, None)
        store = self.ctx.store
        entry = store.get(oid)
        if entry is not None and not entry.complete:
            entry.pooled = False     # (receives still in flight write into its buffers)
            store.delete(oid)
            self.ctx.server.refuse_partial(oid)
        info = error_info(oid, error)
        for callback in self.fetching.pop(oid, ()):
            callback(info)

    def _stop_receiving(self, oid: int) -> bool:
        """Cancel the stream filling this rank's copy of ``oid``; whether one was running."""
        stream = self.receiving.pop(oid, None)
        if stream is not None:
            self.ctx.transport.cancel_stream(*stream)
        return stream is not None

    def _drop_incomplete(self, oid: int) -> None:
        """Drop this rank's copy of ``oid`` if it is incomplete (its own readers are refused)."""
        ctx = self.ctx
        entry = ctx.store.get(oid)
        if entry is not None and not entry.complete:
            ctx.store.delete(oid)
            ctx.server.refuse_partial(oid)

    def copy_dropped(self, oid: int) -> None:
        """This rank's incomplete copy of ``oid`` was just dropped (``Free`` or ``hm.delete``)
        while readers here wait for it: stop its stream (its chunks would otherwise land in
        nothing and nobody would ever answer the readers) and ask the shard again, which answers
        'deleted' after a delete (readers get ObjectDeletedError), else a new sender
        (simulation seed 50312: a task's input deleted while the task's rank received it)."""
        self._stop_receiving(oid)
        if oid in self.fetching:
            self.ask_sender(oid)

    def deleted(self, oid: int) -> None:
        """``oid`` was deleted (``hm.delete`` anywhere): readers waiting here for a copy get
        DELETED now (ObjectDeletedError) instead of waiting for the shard's answer, which a
        shard that moved may never give (simulation seed 70179); an incomplete copy being
        received is stopped and dropped."""
        if self._stop_receiving(oid):
            self._drop_incomplete(oid)
        for callback in self.fetching.pop(oid, ()):
            callback(DELETED)

    def on_pull_refused(self, source: int, msg: P.PullRefused) -> None:
        ctx, oid = self.ctx, msg.object_id
        if msg.reason or oid not in self.fetching:
            # a mismatched copy (a bug), or a reduce step's child pull: fail that stream
            ctx.transport.fail_stream(source, msg.tag, PeerFailure(
                source, msg.reason or f"rank {source} no longer holds {format_id(oid)}", dead=False,
                refused=not msg.reason))
            return
        # The sender dropped its copy (deleted/freed): cancel our receive and ask the shard anew.
        ctx.transport.cancel_stream(source, msg.tag)
        self.receiving.pop(oid, None)
        self._drop_incomplete(oid)
        self.ask_sender(oid)

    def rank_lost(self, loss: Loss) -> None:
        """A DirPull may have gone to the dead shard (e.g. after a stream from it failed before
        the failure was known here): ask the new shard, unless a live sender streams to us."""
        n = len(self.ctx.shards)
        for oid in list(self.fetching):
            if shard_of(oid, n) in loss.changed and oid not in self.receiving:
                self.ask_sender(oid)
