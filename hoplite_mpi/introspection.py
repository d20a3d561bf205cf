"""Introspection: what this rank counted (``stats``), where objects are (``locations``,
``object_info``, ``is_local``), which ranks died (``dead_ranks``), the options in effect
(``current_config``).  Like Ray's ``ray.experimental.get_object_locations`` and Dask's
``client.who_has``: for monitoring, benchmarks and tests; a program's results never depend on
them.  Every answer is a snapshot: it may be out of date as soon as it is returned.
"""
from __future__ import annotations

import concurrent.futures as cf
import time
from typing import Any, Iterable, NamedTuple, Optional, Union

from . import session
from .config import Config
from .errors import ObjectDeletedError
from .objectref import ObjectRef, check_refs
from .store import DELETED
from .values import Blocking, remaining

# the named counters of a rank (always in stats(), 0 until counted)
COUNTERS = ("pulls", "serves", "replicas", "transfer_errors", "reduces_replanned",
            "reduce_bytes_kept", "auto_freed", "ranks_lost", "worker_crashes", "engine_errors",
            "tasks_ahead")


def stats() -> dict:
    """A snapshot of this rank's counters (taken on its engine thread, so one instant).

    Returns a new dict:

    - the counters of :data:`COUNTERS`, each an int since the runtime started (0 if nothing was
      counted): ``pulls`` (chunked copies this rank fetched), ``serves`` (pulls it served),
      ``replicas`` (background copies it asked for as a shard primary), ``transfer_errors``
      (fetches that failed with a TransferError), ``reduces_replanned`` (driver: reduces
      re-planned after a rank loss), ``reduce_bytes_kept`` (driver: result bytes those re-plans
      did not compute again), ``auto_freed`` (driver: objects freed when their last ref went),
      ``ranks_lost`` (ranks this rank saw die), ``worker_crashes`` (driver: tasks whose process
      exited under them), ``engine_errors`` (messages whose handling raised: a bug),
      ``tasks_ahead`` (worker: tasks placed here before their inputs were made, see
      ``Config.worker_deps``); any other
      counter of the runtime appears too;
    - ``messages``: dict message type name -> messages of that type this rank received;
    - ``store_objects``, ``store_bytes``: copies (complete or being received) in this rank's
      object store and their bytes (small values cached outside the store are not counted);
    - ``dead_ranks``: sorted list of the ranks this rank knows are dead;
    - ``rank``: this rank; ``rank_loss_tolerance``: whether ULFM rank-loss tolerance is active;
    - ``scheduler``: on the driver, dict ``submitted``/``done``/``failed``/``retried``/``rebuilt``
      (tasks), else None;
    - ``stragglers``: on the driver, the ranks named so far as much slower than the median rank
      for a function's tasks (dicts ``rank``, ``function``, ``mean_s``, ``median_s``,
      ``ratio``, ``tasks``; roles/stragglers.py), else None;
    - ``durable``: on the driver with durable storage, dict ``root``, ``restored`` (checkpointed
      tasks not executed: restored from storage), ``checkpointed`` (checkpointed tasks
      submitted for execution), ``persisted`` (steps this run committed), ``persist_dups``,
      ``persist_failed``, ``unkeyed`` (checkpointed tasks run without a checkpoint: no stable
      key), ``committed_at_start``; else None.  A worker counts ``persisted``,
      ``persist_dups``, ``persist_errors``, ``persist_bytes`` and ``persist_us`` (writer time).

    Raises NotInitializedError / RuntimeShutdownError without a running runtime.
    """
    rt = session.current()
    return rt.call(_snapshot, rt)


def _snapshot(rt: Any) -> dict:
    """(engine thread) The dict of :func:`stats`."""
    counters = dict(rt.stats)
    out: dict = {name: counters.get(name, 0) for name in COUNTERS}
    out.update((k, v) for k, v in counters.items() if not k[:1].isupper())
    out["messages"] = {k: v for k, v in sorted(counters.items()) if k[:1].isupper()}
    out["store_objects"] = len(rt.store)
    out["store_bytes"] = rt.store.bytes_used
    out["dead_ranks"] = sorted(rt.dead)
    out["rank"] = rt.rank
    out["rank_loss_tolerance"] = bool(rt.transport.ft)
    scheduler = rt.scheduler
    out["scheduler"] = dict(scheduler.stats) if scheduler is not None else None
    driver = rt.ctx.driver
    out["stragglers"] = driver.stragglers.reports() if driver is not None else None
    workflow = getattr(rt, "workflow", None)
    out["durable"] = workflow.snapshot() if workflow is not None else None
    return out


def dead_ranks() -> list[int]:
    """Sorted list of the ranks this rank knows are dead (reported by ULFM, or declared dead
    after missing heartbeats).  Other ranks may learn of a death a little later.  Raises
    NotInitializedError / RuntimeShutdownError without a running runtime."""
    rt = session.current()
    return rt.call(lambda: sorted(rt.dead))


def current_config() -> Config:
    """The :class:`~hoplite_mpi.config.Config` this runtime runs with (frozen: options given to
    ``init``, else ``HOPLITE_MPI_*`` environment variables, else defaults).  Raises
    NotInitializedError / RuntimeShutdownError without a running runtime."""
    return session.current().config


def is_local(ref: ObjectRef) -> bool:
    """Whether this rank holds ``ref``'s value now, so that ``get`` reads it without a transfer:
    a complete copy in its store, or a small (inline) value it made or read.  Does not wait and
    fetches nothing; False for a deleted object or one still being computed or received.
    Raises TypeError for a non-ref, NotInitializedError / RuntimeShutdownError without a
    running runtime."""
    check_refs([ref], "is_local")
    got = session.current().local_frames(ref.id)
    return got is not None and got is not DELETED


class ObjectLocation(NamedTuple):
    """Where one object is, as its directory shard records it (see :func:`object_info`)."""

    ranks: tuple[int, ...]   # ranks holding a complete copy (for an inline object: its maker)
    nbytes: int              # serialized size in bytes (all frames)
    inline: bool             # small: the value travels inside control messages to any rank
    error: bool              # the object is a task's exception


def object_info(refs: Union[ObjectRef, Iterable[ObjectRef]], timeout: Optional[float] = None
                ) -> dict[ObjectRef, ObjectLocation]:
    """Where each object of ``refs`` is, asked of the objects' directory shards (from any rank).

    Waits until each object exists (its task finished; a failed task's object is its exception,
    ``error`` True) and returns ``{ref: ObjectLocation}`` for the distinct refs, in order.
    ``ranks`` are the ranks the directory records as holding a complete copy, in the order they
    registered (the producer first); copies being received are not listed, and a copy made or
    dropped a moment ago may not be yet.

    Raises TypeError for a non-ref; concurrent.futures.TimeoutError after ``timeout`` seconds
    (in all); ObjectDeletedError for a deleted object; concurrent.futures.CancelledError for a
    cancelled task; NotInitializedError / RuntimeShutdownError without a running runtime.
    """
    items = list(dict.fromkeys([refs] if isinstance(refs, ObjectRef) else refs))
    check_refs(items, "object_info")
    rt = session.current()
    deadline = None if timeout is None else time.monotonic() + timeout
    out: dict[ObjectRef, ObjectLocation] = {}
    with Blocking(rt, items):
        asked = {}
        for ref in items:
            if rt.is_deleted(ref.id):
                raise ObjectDeletedError(ref.hex())
            if ref.cancelled():
                raise cf.CancelledError(ref.hex())
            fut = asked[ref] = rt.waiter()
            rt.call_soon(rt.ctx.lookups.lookup, ref.id, fut.set_result)
        for ref, fut in asked.items():
            try:
                info = fut.result(remaining(deadline))
            except cf.TimeoutError:
                raise cf.TimeoutError(f"object_info() timed out after {timeout} s waiting for "
                                      f"{ref.hex()}") from None
            if info is None:
                raise ObjectDeletedError(ref.hex())
            out[ref] = ObjectLocation(tuple(info.holders), info.nbytes, info.inline is not None,
                                      bool(info.error))
    return out


def locations(refs: Union[ObjectRef, Iterable[ObjectRef]], timeout: Optional[float] = None
              ) -> dict[ObjectRef, list[int]]:
    """``{ref: [ranks holding a complete copy]}`` for the distinct refs, as the directory
    records it (Dask's ``who_has``); waits and raises as :func:`object_info`."""
    return {ref: list(loc.ranks) for ref, loc in object_info(refs, timeout).items()}
