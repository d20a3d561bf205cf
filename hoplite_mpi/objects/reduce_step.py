"""One slot of a reduce tree (Hoplite §3.4 tree-chain reduce): out = op(input, child_1, ...),
chunk by chunk, on this rank.  The coordinator (rank 0, :mod:`hoplite_mpi.collectives`) places
slots; :mod:`.reduce_node` runs the steps placed on this rank.
"""
from __future__ import annotations

import bisect
import enum
import time
from typing import Any, Optional

import numpy as np

from .. import faults
from .. import protocol as P
from .. import tracing as timeline
from ..arrays import array_meta
from ..collectives import load_op, portable_error
from ..errors import HopliteError
from ..ids import format_id
from ..protocol import ObjectInfo
from ..serialization import deserialize, local_error, serialize, to_bytes
from ..store import DELETED, chunk_ends, object_plan
from ..transport.base import PeerFailure


class StepState(enum.Enum):
    """RUNNING -> DONE (output complete, reported to the coordinator); RUNNING -> FAILED (a
    failure reported: waits for the abort) -> ABORTED; RUNNING -> ABORTED (an abandoned attempt:
    drains, see :class:`ReduceStep`)."""

    RUNNING = 1
    FAILED = 2
    ABORTED = 3
    DONE = 4


class ReduceStep:
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

    Timeline (hoplite_mpi/tracing.py): a step started while recording gives one "collective"
    event from :meth:`start` to its end (done, failed or aborted: :meth:`_trace`), and each child
    stream a "transfer" event (the copy step's pull records its own, in the Fetcher).
    """

    _began: Optional[float] = None   # (timeline) time.perf_counter() at start, s; None: not traced
    _streams: Optional[list] = None  # (timeline) per child stream: (start s, rank, object id)
    _inputs: Optional[list] = None   # (timeline) ids of the inputs combined here (own, late)

    def __init__(self, ctx: Any, coordinator: int, msg: P.ReduceStep) -> None:
        self.ctx, self.coordinator, self.msg = ctx, coordinator, msg
        self.op: np.ufunc = load_op(msg.op)
        self.sizes = tuple(msg.sizes)
        self.plan = object_plan(self.sizes, ctx.config)
        # a re-planned reduce goes on from the result's progress: chunks before ``first`` are
        # neither pulled nor combined (their bytes in this step's output are never read)
        ends = chunk_ends(self.plan)
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
        self.state = StepState.RUNNING

    def _input(self, info: ObjectInfo) -> tuple[bytes, np.ndarray]:
        """(C-order header, raw C-order bytes) of input ``info``; a Fortran-ordered or other
        non-C-contiguous input is copied into C order (every slot works on C-order bytes)."""
        frames = self.ctx.catalog.local_frames(info.object_id)
        if isinstance(frames, ObjectInfo):
            frames = frames.inline
        if frames is None or frames is DELETED:
            if info.inline is None:
                raise HopliteError(f"reduce input {format_id(info.object_id)} is not on rank {self.ctx.rank}")
            frames = info.inline
        arr = deserialize(frames)
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        head = serialize(np.empty(arr.shape, arr.dtype))[0]
        if len(head) != self.sizes[0]:
            raise HopliteError("reduce: unexpected header size (a bug, please report it)")
        return bytes(head), arr.reshape(-1).view(np.uint8)

    def start(self) -> None:
        ctx, msg = self.ctx, self.msg
        out = msg.out_id
        if timeline.recorder is not None:
            self._began = time.perf_counter()
            self._streams = []
            self._inputs = [msg.input_info.object_id] if msg.input_info is not None else []
        if msg.input_info is not None and not msg.children and not msg.late:   # a leaf: its input
            head, data = self._input(msg.input_info)
            ctx.store.put(out, [head, data])
            ctx.server.serve_deferred(out)
            self._done()
            return
        entry = self.entry = ctx.store.allocate(out, self.sizes)
        entry.on_complete.append(lambda e: self._done())
        ctx.steps.register(out, self)
        if msg.input_info is None and len(msg.children) == 1 and not msg.late:   # a copy step
            self._announce()
            (child_rank, child_id), = msg.children
            if self.offset:
                ctx.store.advance(out, self.offset)
                if entry.complete:
                    return
            ctx.fetcher.receive(out, entry, child_rank, child_id,
                                lambda oid, failure: self._failed(failure))
            ctx.server.serve_deferred(out)
            return
        head = msg.head
        if msg.input_info is not None:
            head, data = self._input(msg.input_info)
            self.locals.append(data)
            self.contributions += 1
        self.dtype = array_meta(head, self.sizes[1]).dtype
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
        ctx.server.serve_deferred(out)
        if ctx.steps.is_aborted(msg.reduce_id):    # its abort overtook it
            self.abort()
        self._release()
        if not self.plan:
            ctx.store.advance(out, 0)

    def _pull(self, rank: int, oid: int) -> None:
        if self.first >= len(self.plan):     # (a re-plan after the result was complete)
            return
        ctx, i = self.ctx, len(self.bufs)
        bufs = [ctx.store.buffer(size) for size in self.sizes]
        self.bufs.append(bufs)
        self.got.append(self.first)
        self.open += 1
        if self._streams is not None:
            self._streams.append((time.perf_counter(), rank, oid))
        chunks = [memoryview(bufs[f])[a:b] for f, a, b in self.plan[self.first:]]
        tag = ctx.next_tag()
        ctx.transport.recv_stream(rank, tag, chunks, lambda n, i=i: self._arrived(i),
                                  lambda failure: self._stream_failed(failure))
        ctx.send(rank, P.Pull(oid, tag, self.offset, self.sizes))

    def add_late(self, info: ObjectInfo, rank: int) -> None:
        """A late contribution: input ``info`` on ``rank`` (pulled, or combined here if local)."""
        if self.state is StepState.ABORTED or self.late <= 0:
            return
        self.late -= 1
        if self._inputs is not None:
            self._inputs.append(info.object_id)
        if rank != self.ctx.rank and info.inline is None:
            self._pull(rank, info.object_id)
            return
        try:
            _, data = self._input(info)
        except Exception as exc:
            self._report(local_error(HopliteError(
                f"reduce input {format_id(info.object_id)} unusable on rank {self.ctx.rank}: {exc}")))
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
            if self._streams is not None:
                self._trace_stream(child)
        if self.state is not StepState.RUNNING:
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
            exc, f"reduce op np.{self.op.__name__} failed on rank {self.ctx.rank}")))

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
        drain = self.state is StepState.ABORTED and not self.msg.final
        if self.state is not StepState.RUNNING and not drain:
            return
        out = self.msg.out_id
        last = len(self.plan) - 1
        store = self.ctx.store
        while self.combined < len(self.plan) and store.get(out) is self.entry \
                and (drain or self.count[self.combined] >= self.expected):
            if self.combined == last >= self.first and not drain \
                    and self.contributions < self.expected:
                break   # (empty arrays: no data chunk waits for the contributions, this does)
            _, a, b = self.plan[self.combined]
            self.combined += 1
            store.advance(out, b - a)

    def _stream_failed(self, failure: PeerFailure) -> None:
        self._closed()
        self._failed(failure)

    def _failed(self, failure: PeerFailure) -> None:
        """A child's rank died: tell the coordinator (it re-plans) and wait for the abort.  Any
        other failure of a child's stream (not a death) fails the reduce with TransferError."""
        if self.state in (StepState.ABORTED, StepState.DONE):
            return
        if failure.dead:
            self._report(local_error(HopliteError(
                f"reduce step on rank {self.ctx.rank} lost its input from rank {failure.rank}: "
                f"{failure.detail}")), lost=failure.rank)
            return
        # (refused: the child's output was freed, this reduce is being torn down)
        self._report(self.ctx.fetcher.transfer_error(self.msg.out_id, failure))

    def _report(self, error: Any, lost: int = -1) -> None:
        if self.state is not StepState.RUNNING:
            return
        self.state = StepState.FAILED
        if self._began is not None:
            self._trace("failed")
        self.ctx.send(self.coordinator, P.ReduceStepDone(self.msg.reduce_id, self.msg.out_id,
                                                         self.ctx.rank, error=to_bytes(error), lost=lost))

    def abort(self) -> None:
        """This attempt is abandoned (see the class docstring)."""
        if self.state in (StepState.ABORTED, StepState.DONE):
            return
        if self._began is not None:
            self._trace("aborted")
        self.state = StepState.ABORTED
        self.late = 0
        if self.msg.final:   # (it may never finish: a failed reduce's result is never adopted)
            self.ctx.steps.unregister(self.msg.out_id, self)
        self._release()
        self._closed(0)

    def _closed(self, n: int = 1) -> None:
        """``n`` child streams ended; scratch space goes back once all have and the step ended."""
        self.open -= n
        if self.open <= 0 and self.bufs and self.state in (StepState.ABORTED, StepState.DONE):
            for bufs in self.bufs:
                self.ctx.store.give_back(bufs)
            self.bufs = []

    def _announce(self) -> None:
        if self.msg.final and not self.msg.adopt:   # others (an allreduce) may chain on it
            info = ObjectInfo(self.msg.out_id, self.sizes, ())
            for rank in self.ctx.shard_ranks(self.msg.out_id):
                self.ctx.send(rank, P.DirPartial(info, self.ctx.rank))

    def _done(self) -> None:
        ctx, msg = self.ctx, self.msg
        if self._began is not None:
            self._trace("done")
        ctx.steps.unregister(msg.out_id, self)
        aborted = self.state is StepState.ABORTED
        if not aborted:
            self.state = StepState.DONE
        self._closed(0)
        self.locals = self.out = None
        if aborted:
            return
        out_id = msg.out_id
        if msg.adopt:
            out_id = self._adopt()
        if msg.final:
            ctx.publish(ObjectInfo(out_id, self.sizes, (ctx.rank,), head=ctx.catalog.head_of(out_id)))
        ctx.send(self.coordinator, P.ReduceStepDone(msg.reduce_id, out_id, ctx.rank, self.sizes))

    def _adopt(self) -> int:
        """(re-planned reduce) Make this complete output the result object ``msg.adopt``: fill in
        the chunks an abandoned attempt's result entry has not given out, or store it as is."""
        ctx, store = self.ctx, self.ctx.store
        new = store.get(self.msg.out_id)
        old = store.get(self.msg.adopt)
        if old is None:
            store.put(self.msg.adopt, list(new.frames))
        elif not old.complete:      # chunks before ``progress`` were given out: keep them
            done = old.progress
            for (f, a, b), end in zip(self.plan, chunk_ends(self.plan)):
                if end - (b - a) >= done:
                    _raw(old.frames[f])[a:b] = _raw(new.frames[f])[a:b]
            store.advance(self.msg.adopt, old.nbytes - done)
        store.delete(self.msg.out_id)
        ctx.server.serve_deferred(self.msg.adopt)
        return self.msg.adopt


    # --- timeline ----------------------------------------------------------------------------

    def _kind(self) -> str:
        """What this step does: "leaf" (its input is its output), "copy" (the target's copy of
        the root's output), "combine" (its input and/or late ones with its children's)."""
        msg = self.msg     # (as :meth:`start` tells them apart)
        if msg.input_info is not None and not msg.children and not msg.late:
            return "leaf"
        if msg.input_info is None and len(msg.children) == 1 and not msg.late:
            return "copy"
        return "combine"

    def _received(self, kind: str) -> tuple[int, int]:
        """(chunks, bytes) received so far from other ranks: over the child streams, or into
        the copy step's entry (from its offset on)."""
        ends = chunk_ends(self.plan)
        if kind == "copy":
            got = [bisect.bisect_right(ends, self.entry.progress)] if self.entry is not None else []
        else:
            got = self.got
        chunks = sum(g - self.first for g in got)
        nbytes = sum(ends[g - 1] - self.offset for g in got if g > self.first)
        return chunks, nbytes

    def _trace(self, outcome: str) -> None:
        """Record this step as one "collective" event (once): its reduce attempt, output (and
        the result, if final), the inputs combined here (its own, late ones), its children's
        count, the ranks it received from (``peers``), the chunks and bytes received so far.
        ``outcome``: "done", "failed" or "aborted"."""
        began, self._began = self._began, None
        rec = timeline.recorder
        if rec is None:
            return
        msg = self.msg
        kind = self._kind()
        chunks, nbytes = self._received(kind)
        peers = [rank for _, rank, _ in self._streams or ()] or [rank for rank, _ in msg.children]
        args = {"reduce": format_id(msg.reduce_id), "step": kind, "out": format_id(msg.out_id),
                "inputs": [format_id(oid) for oid in self._inputs or ()],
                "children": len(msg.children), "peers": peers, "chunks": chunks, "bytes": nbytes,
                "outcome": outcome}
        if msg.final:
            args["result"] = format_id(msg.adopt or msg.out_id)
        rec.complete(f"reduce {kind}", "collective", began, time.perf_counter(), args,
                     tid="collectives")

    def _trace_stream(self, child: int) -> None:
        """Record child stream ``child`` (complete now) as a "transfer" event."""
        rec = timeline.recorder
        if rec is None or child >= len(self._streams):   # (recording began after this stream)
            return
        start, rank, oid = self._streams[child]
        nbytes = chunk_ends(self.plan)[-1] - self.offset
        rec.complete(f"pull {format_id(oid)}", "transfer", start, time.perf_counter(),
                     {"object": format_id(oid), "bytes": nbytes, "peer": rank, "reduce": True},
                     tid="transfers")


def _raw(frame: Any) -> np.ndarray:
    return np.frombuffer(frame, np.uint8) if not isinstance(frame, np.ndarray) else frame.view(np.uint8)

