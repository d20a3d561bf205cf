"""The node side of reduces: the reduce steps placed on this rank (``ReduceStep``), late inputs
(``ReduceLate``) and aborts of attempts abandoned after a rank loss (``ReduceAbort``)."""
from __future__ import annotations

from typing import Any

from .. import faults
from .. import protocol as P
from ..serialization import serialize_error, to_bytes
from .reduce_step import ReduceStep

ABORTED_MEMORY = 4096     # aborted reduce attempts remembered (an abort may overtake its step)


class ReduceSteps:
    """Steps running here (``running``: output id -> step) and attempts aborted (``aborted``)."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.running: dict[int, ReduceStep] = {}
        self.aborted: set[int] = set()

    def register(self, out_id: int, step: ReduceStep) -> None:
        self.running[out_id] = step

    def unregister(self, out_id: int, step: ReduceStep) -> None:
        if self.running.get(out_id) is step:
            del self.running[out_id]

    def is_aborted(self, reduce_id: int) -> bool:
        return reduce_id in self.aborted

    def on_step(self, source: int, msg: P.ReduceStep) -> None:
        faults.reached("reduce")
        try:
            ReduceStep(self.ctx, source, msg).start()
        except Exception as exc:
            self.ctx.send(source, P.ReduceStepDone(msg.reduce_id, msg.out_id, self.ctx.rank,
                                                   error=to_bytes(serialize_error(exc, self.ctx.rank))))

    def on_late(self, source: int, msg: P.ReduceLate) -> None:
        step = self.running.get(msg.out_id)
        if step is not None:     # (else the step failed and told the coordinator)
            step.add_late(msg.info, msg.rank)

    def on_abort(self, source: int, msg: P.ReduceAbort) -> None:
        ctx = self.ctx
        self.aborted.add(msg.reduce_id)
        if len(self.aborted) > ABORTED_MEMORY:
            self.aborted.clear()
        for step in list(self.running.values()):
            if step.msg.reduce_id == msg.reduce_id:
                step.abort()
                if step.msg.final and not msg.result_id:      # the reduce failed
                    ctx.fetcher.drop_unfinished_result(step.msg.out_id)
                    if step.msg.adopt:       # (a re-planned one: the result entry itself)
                        ctx.fetcher.drop_unfinished_result(step.msg.adopt)
        for rank in msg.forward:     # (after the final step stopped giving out its output)
            ctx.send(rank, P.ReduceAbort(msg.reduce_id))
        if msg.result_id:            # where the result stands now: the next attempt goes on from there
            entry = ctx.store.get(msg.result_id)
            ctx.send(source, P.ReduceResume(msg.reduce_id, entry.progress if entry is not None else 0))
