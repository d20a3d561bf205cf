"""The reduce coordinator role (rank 0): the shell around the pure
:class:`~hoplite_mpi.collectives.ReduceCoordinator` (Hoplite §3.4 tree-chain reduce).

Inputs are placed as they become ready (:meth:`Driver.when_ready`); steps report back
(``ReduceStepDone``); after a rank loss the coordinator re-plans and the new attempt goes on from
the bytes of the result already given out (``ReduceResume``).

Timeline (hoplite_mpi/tracing.py): each reduce coordinated here is a "collective" event from its
start to its result, and each re-plan an instant event (cat "replan").
"""
from __future__ import annotations

import logging
import time
from typing import Any

from .. import protocol as P
from .. import tracing as timeline
from ..collectives import (InputReady, ReduceCoordinator, Reduced, Replanned, Start, WatchInputs,
                           chain_length, host_order)
from ..context import Loss
from ..events import RankLost
from ..ids import format_id
from ..store import config_chunk_size

log = logging.getLogger("hoplite_mpi")


class Coordination:
    """``running``: reduce id (and ids of its earlier attempts) -> coordinator; ``reduced``:
    result id -> the input ids it was computed from (``hm.reduced_inputs``)."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.running: dict[int, ReduceCoordinator] = {}
        self.reduced: dict[int, list[int]] = {}
        self._began: dict[int, float] = {}     # (timeline) result id -> start, perf_counter s
        hosts = getattr(ctx.transport, "hosts", None)
        # (Config.host_aware: inputs ready together are placed grouped by host)
        self.hosts = hosts if hosts and len(set(hosts)) > 1 and ctx.config.host_aware else None

    def start(self, reduce_id: int, inputs: list[int], op: bytes, num: int, target: int,
              result_id: int, allreduce: bool) -> None:
        """Coordinate a reduce: inputs are placed as they become ready."""
        ctx = self.ctx

        def k_of(nbytes: int) -> int:
            return chain_length(nbytes, ctx.config.link_bandwidth, ctx.config.link_latency)
        def chunks_of(sizes: tuple) -> int:
            return -(-sizes[1] // config_chunk_size(sizes, ctx.config))
        coord = ReduceCoordinator(reduce_id, inputs, op, num, target, result_id, ctx.ids.next, k_of,
                                  allreduce, ctx.shard_ranks, small=ctx.config.small_collectives,
                                  home=ctx.rank,
                                  size_to_chunks=chunks_of if ctx.config.chunk_aware_plan else None,
                                  direct_fetch=ctx.config.broadcast_direct)
        self.running[reduce_id] = coord
        if timeline.recorder is not None:
            self._began[result_id] = time.perf_counter()
        self._coordinated(coord, coord.handle(Start(frozenset(ctx.dead))))

    def combine_now(self, reduce_id: int, infos: list, op: bytes, num: int, result_id: int,
                    allreduce: bool) -> bool:
        """(driver thread) The inline path without the engine: when every input is an inline
        value known here (``infos``, in input order, none an error) and no copy must go to
        another rank, run the same pure coordinator on the calling thread and store the result
        as :meth:`Catalog.put` stores a ``put`` (published by the engine afterwards).  Returns
        False, having changed nothing, when the reduce needs the engine (an input that is not
        inline, a failure to report, an allreduce whose inputs live elsewhere)."""
        ctx = self.ctx
        home = ctx.rank
        if allreduce and any(info.holders[:1] not in ((), (home,)) for info in infos):
            return False        # (the result must be copied to those ranks: a round trip)
        coord = ReduceCoordinator(reduce_id, [info.object_id for info in infos], op, num, home,
                                  result_id, ctx.ids.next, lambda nbytes: 1, allreduce,
                                  ctx.shard_ranks, small=True, home=home)
        coord.handle(Start(frozenset()))
        for info in infos:
            coord.handle(InputReady(info))
            if coord.path != "inline":
                return False
        result = coord.result
        if not coord.done or result is None or result.error or coord.pending_fetch:
            return False
        self.reduced[result_id] = list(coord.used)
        ctx.catalog.put(list(result.inline), result_id)
        return True

    def on_request(self, source: int, msg: P.ReduceRequest) -> None:
        """A reduce asked for by a task (hm.reduce on a worker)."""
        self.start(msg.reduce_id, list(msg.inputs), msg.op, msg.num, msg.target,
                   msg.reduce_id + 1, msg.allreduce)

    def on_step_done(self, source: int, msg: P.ReduceStepDone) -> None:
        ctx = self.ctx
        if msg.lost >= 0 and msg.lost not in ctx.dead and ctx.transport.ft:
            # a step saw ``lost`` die (ULFM) before this rank did: act on it now (every reduce
            # it takes part in is re-planned; this message's attempt is then an old one)
            ctx.rank_lost(msg.lost)
        coord = self.running.get(msg.reduce_id)
        if coord is not None:
            self._coordinated(coord, coord.handle(msg))

    def on_resume(self, source: int, msg: P.ReduceResume) -> None:
        coord = self.running.get(msg.reduce_id)
        if coord is not None:
            self._coordinated(coord, coord.handle(msg))

    def fetched(self, msg: P.Fetched) -> None:
        """A copy of an allreduce's result reached its rank (``msg.token`` is the reduce id)."""
        coord = self.running.get(msg.token)
        if coord is not None:
            self._coordinated(coord, coord.handle(msg))

    def _coordinated(self, coord: ReduceCoordinator, out: list) -> None:
        """Carry out a coordinator's instructions in order."""
        ctx = self.ctx
        for item in out:
            cls = item.__class__
            if cls is tuple:
                ctx.send(item[0], item[1])
            elif cls is WatchInputs:
                hosts = self.hosts
                if hosts is None:
                    for oid in item.object_ids:
                        ctx.driver.when_ready(oid, lambda info, c=coord: self._coordinated(
                            c, c.handle(InputReady(info))))
                    continue
                # several hosts: the inputs ready now are placed grouped by host (host_order)
                now: list = []
                watching = [True]
                for oid in item.object_ids:
                    ctx.driver.when_ready(oid, lambda info, c=coord: now.append(info) if watching[0]
                                          else self._coordinated(c, c.handle(InputReady(info))))
                watching[0] = False
                for info in host_order(now, hosts, coord.target):
                    self._coordinated(coord, coord.handle(InputReady(info)))
            elif cls is Replanned:
                ctx.stats["reduces_replanned"] += 1
                ctx.stats["reduce_bytes_kept"] += item.start    # result bytes not computed again
                log.warning("rank 0: reduce %s re-planned without the dead rank(s) %s (from byte %d)",
                            format_id(item.result_id), list(item.dead), item.start)
                self.running[item.reduce_id] = coord
                if timeline.recorder is not None:
                    self._trace_replan(coord, item)
            elif cls is Reduced:
                for rid in item.attempts:
                    self.running.pop(rid, None)
                self.reduced[item.result.object_id] = list(item.used)
                if timeline.recorder is not None:
                    self._trace_reduce(coord, item)
                ctx.refs.notify([item.result])
                ctx.driver.object_known(item.result)
            else:
                raise TypeError(f"unknown instruction {item!r}")

    # --- timeline ----------------------------------------------------------------------------

    def _trace_replan(self, coord: ReduceCoordinator, item: Replanned) -> None:
        """An instant event: the reduce of result ``item.result_id`` planned again without the
        dead ranks, as attempt ``item.reduce_id``; what it keeps: the result's first ``item.start`` bytes
        (given out already) and the inputs it will place again."""
        rec = timeline.recorder
        if rec is not None:
            rec.instant(f"replan {format_id(item.result_id)}", "replan",
                        {"result": format_id(item.result_id), "reduce": format_id(item.reduce_id),
                         "dead": list(item.dead), "bytes_kept": item.start,
                         "inputs": len(coord.inputs), "num": coord.num})

    def _trace_reduce(self, coord: ReduceCoordinator, item: Reduced) -> None:
        """The reduce that gave ``item`` as one "collective" event, from its start here: its
        result, target rank, path ("inline" or "tree"), the inputs used, the reduce ids of its
        attempts (the ``reduce`` of its steps' events)."""
        began = self._began.pop(item.result.object_id, None)
        rec = timeline.recorder
        if began is None or rec is None:
            return
        rec.complete(f"reduce {format_id(item.result.object_id)}", "collective", began,
                     time.perf_counter(),
                     {"result": format_id(item.result.object_id), "target": coord.target,
                      "path": coord.path, "used": [format_id(oid) for oid in item.used],
                      "attempts": [format_id(rid) for rid in item.attempts],
                      "error": bool(item.result.error)},
                     tid="collectives")

    def rank_lost(self, loss: Loss) -> None:
        for coord in {id(c): c for c in self.running.values()}.values():
            self._coordinated(coord, coord.handle(RankLost(loss.rank)))
