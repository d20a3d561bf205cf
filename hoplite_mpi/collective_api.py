"""The collectives of the API (Hoplite): ``broadcast``, ``reduce``, ``allreduce``,
``reduced_inputs``.  The reduce itself is planned by :mod:`hoplite_mpi.collectives` on rank 0."""
from __future__ import annotations

import concurrent.futures as cf
import time
from typing import Any, Optional, Sequence

import numpy as np

from . import session
from .arrays import array_meta
from .errors import HopliteError, ObjectDeletedError
from .objectref import ObjectRef, check_refs, inputs_of, new_ref
from .values import Blocking, remaining

def broadcast(ref: ObjectRef, ranks: Optional[Sequence[int]] = None, timeout: Optional[float] = None) -> None:
    """Block until every rank of ``ranks`` (default: all) holds a complete copy of ``ref``'s object.

    Receiver-driven (Hoplite §3.3): each target asks the object's directory shard for a sender and
    is given the tail of the shortest chain of complete or partial copies, so simultaneous
    receivers form a pipeline and finished ones serve later ones; no rank sends N copies.  The ref
    may still be computing.  Dead ranks (ULFM) are not waited for; a receiver whose sender dies
    resumes from its byte offset from another holder.  Raises TypeError/ValueError for bad
    arguments, TimeoutError after ``timeout`` seconds (copies made so far stay),
    ObjectDeletedError, the task's error if the object is an error object, or HopliteError
    naming the ranks whose copy failed otherwise (e.g. a TransferError); copies made stay.
    """
    check_refs([ref], "broadcast")
    rt = session.current()
    if ranks is None:
        targets = list(range(rt.size))
    else:
        targets = list(dict.fromkeys(ranks))
        for r in targets:
            if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < rt.size:
                raise ValueError(f"broadcast target {r!r} is not a rank (0..{rt.size - 1})")
    fut = rt.waiter()
    deadline = None if timeout is None else time.monotonic() + timeout
    rt.call_soon(rt.start_broadcast, ref.id, targets, fut.set_result)
    with Blocking(rt, [ref]):
        try:
            errors = fut.result(timeout)
            if not errors:   # the object exists: its ref completes too (the notifier may lag)
                exc = cf.Future.exception(ref, remaining(deadline))
        except cf.TimeoutError:
            raise cf.TimeoutError(f"broadcast of {ref.hex()} not complete after {timeout} s") from None
    if errors:
        if all(e == "deleted" for e in errors.values()):
            raise ObjectDeletedError(ref.hex())
        raise HopliteError(f"broadcast of {ref.hex()} failed on ranks {errors}")
    if exc is not None:      # an error object: every target holds it, the call raises it
        raise exc


def _collective(refs: Sequence[ObjectRef], op: Any, num: Optional[int], rank_: Optional[int],
                allreduce: bool) -> ObjectRef:
    from .collectives import op_blob, resolve_op

    refs = list(refs)
    what = "allreduce" if allreduce else "reduce"
    if not refs:
        raise ValueError(f"{what}() needs at least one input ref")
    check_refs(refs, what)
    ufunc = resolve_op(op)
    n = len(refs)
    num = n if num is None else num
    if not isinstance(num, int) or isinstance(num, bool) or not 1 <= num <= n:
        raise ValueError(f"num must be an int within 1..{n}, got {num!r}")
    rt = session.current()
    target = rt.rank if rank_ is None else rank_
    if not isinstance(target, int) or isinstance(target, bool) or not 0 <= target < rt.size:
        raise ValueError(f"rank must be within 0..{rt.size - 1}, got {target!r}")
    reduce_id = rt.ids.next(2)
    result_id = reduce_id + 1
    blob = op_blob(ufunc)
    if target == rt.rank and rt.scheduler is not None and rt.config.reduce_now \
            and rt.config.small_collectives:
        infos = _inline_inputs(rt, refs, num)
        if infos is not None and rt.ctx.coordinator.combine_now(reduce_id, infos, blob, num,
                                                                result_id, allreduce):
            ref = new_ref(rt, result_id, inputs=refs)
            ref.set_ready()
            return ref
    _check_op_now(rt, refs, ufunc, what)
    ref = new_ref(rt, result_id, inputs=refs)   # inputs stay alive (not auto-freed) meanwhile
    inputs = [r.id for r in refs]
    if rt.scheduler is not None:
        rt.call_soon(rt.start_reduce, reduce_id, inputs, blob, num, target, result_id, allreduce)
    else:
        from .protocol import ReduceRequest
        rt.call_soon(rt.send, 0, ReduceRequest(reduce_id, tuple(inputs), blob, num, target, allreduce))
        rt.watch(result_id)
    return ref


def _inline_inputs(rt: Any, refs: Sequence[ObjectRef], num: int) -> Optional[list]:
    """The ObjectInfos of the first ``num`` refs (in order) that are done, if they are inline
    values known on this rank (not errors, not deleted), else None: the reduce can then be
    combined on the calling thread (:meth:`Coordination.combine_now`).  As on the engine, inputs
    ready when the reduce starts are taken in input order."""
    infos = []
    info_of, deleted = rt.info, rt.is_deleted
    for ref in refs:
        if not ref.done():
            continue
        info = info_of(ref.id)
        if info is None or info.inline is None or info.error or deleted(ref.id):
            return None
        infos.append(info)
        if len(infos) == num:
            return infos
    return None


def _check_op_now(rt: Any, refs: Sequence[ObjectRef], ufunc: Any, what: str) -> None:
    """Raise TypeError at call time if an input known here already has a dtype that ``ufunc``
    cannot combine in place (otherwise the coordinator fails the result at the first input)."""
    from .collectives import check_op_dtype
    for ref in refs:
        info = rt.info(ref.id) if ref.done() else None   # (a read of engine state: a hint)
        head = None if info is None or info.error else (
            info.inline[0] if info.inline is not None else info.head)
        if head is None or len(info.sizes) != 2:
            continue
        try:
            arr = array_meta(head, info.sizes[1])
        except Exception:
            continue
        if isinstance(arr, np.ndarray):
            why = check_op_dtype(ufunc, arr.dtype)
            if why is not None:
                raise TypeError(f"{what}() input {ref.hex()}: {why}")
        return


def reduce(refs: Sequence[ObjectRef], op: Any = "sum", num: Optional[int] = None,
           rank: Optional[int] = None) -> ObjectRef:
    """Element-wise reduce of numpy arrays; returns a ref at once (Hoplite §3.4 tree-chain).

    Args:
        refs: refs of C-contiguous numpy arrays of one shape and numeric dtype; they may still be
            computing.
        op: "sum", "prod", "min", "max", or any binary numpy ufunc.
        num: reduce the first ``num`` inputs to become ready (subset reduce, for asynchronous
            SGD); the others are not waited for.  Default: all.
        rank: where the result lives (default: the calling rank).

    The tree is built at run time in arrival order; every slot combines chunk ``i`` of its
    children while chunk ``i+1`` is still arriving; once one input is still to come, the result's
    rank accumulates the others and then adds the last one itself.  Raises (at call time)
    ValueError for an empty list, a bad ``num``/``rank`` or unknown op name, TypeError for
    non-refs or a non-ufunc op.  The returned ref fails with ValueError (naming the offending
    input) for a shape/dtype mismatch, TypeError for non-numeric inputs, or an input task's
    exception.  Under ULFM, a rank holding an input or a tree step that dies makes the reduce
    re-plan without it (lost inputs rebuilt from lineage; a ``num`` subset already chosen is
    kept; the new tree computes only the chunks after those the result had given out); the
    result is the failure-free one.  If ``rank`` itself dies the ref fails with
    HopliteError; an input that cannot be rebuilt fails it with ObjectLostError.
    """
    return _collective(refs, op, num, rank, allreduce=False)


def allreduce(refs: Sequence[ObjectRef], op: Any = "sum", num: Optional[int] = None) -> ObjectRef:
    """Like :func:`reduce` (result on the calling rank), and every rank that produced a reduced
    input also holds the result when the ref completes: the copies chain on the result as it is
    being produced (pipelined, not reduce-then-broadcast)."""
    return _collective(refs, op, num, None, allreduce=True)


def reduced_inputs(red: ObjectRef, timeout: Optional[float] = None) -> list[ObjectRef]:
    """The input refs that went into the reduce ``red`` (waits until it completes; driver only).

    Raises the reduce's error if it failed, TimeoutError, or HopliteError off the driver."""
    check_refs([red], "reduced_inputs")
    rt = session.current()
    cf.Future.result(red, timeout)
    used = rt.reduced.get(red.id) if rt.scheduler is not None else None
    if used is None:
        raise HopliteError(f"{red.hex()} is not the result of a reduce made on this driver")
    by_id = {r.id: r for r in inputs_of(red)}
    return [by_id[oid] for oid in used]
