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

from . import rankstats, session
from .config import Config
from .errors import ObjectDeletedError
from .objectref import ObjectRef, check_refs
from .store import DELETED
from .values import Blocking, remaining

def stats(all_ranks: bool = False, timeout: float = 30.0) -> dict:
    """A snapshot of this rank's counters (taken on its engine thread, so one instant); with
    ``all_ranks`` (driver only) every live rank's, as a dict rank -> that dict (gathered by
    messages; ranks that do not answer within ``min(timeout, 10)`` seconds are left out).

    Returns a new dict:

    - the counters of :data:`~hoplite_mpi.rankstats.COUNTERS`, each an int since the runtime
      started (0 if nothing was counted): ``pulls`` (chunked copies this rank fetched),
      ``serves`` (pulls it served), ``replicas`` (background copies it asked for as a shard
      primary), ``transfer_errors`` (fetches that failed with a TransferError),
      ``reduces_replanned`` (driver: reduces re-planned after a rank loss),
      ``reduce_bytes_kept`` (driver: result bytes those re-plans did not compute again),
      ``auto_freed`` (driver: objects freed when their last ref went), ``ranks_lost`` (ranks
      this rank saw die), ``worker_crashes`` (driver: tasks whose process exited under them),
      ``engine_errors`` (messages whose handling raised: a bug), ``tasks_ahead`` (worker:
      tasks placed here before their inputs were made, see ``Config.worker_deps``); any other
      counter of the runtime appears too;
    - ``tasks_run``: tasks this rank executed (failed ones included; 0 on a rank without
      tasks); ``busy_s``: wall seconds during which at least one task ran here;
      ``idle_cpu_s``: this process's CPU seconds while no task ran (the runtime's own cost on
      an idle rank: polling, serving, messages; None on a rank that runs no tasks);
      ``cpu_s``: the process's CPU seconds (all threads, tasks included) and ``wall_s`` the
      seconds since the runtime started;
    - ``bytes_sent``, ``bytes_received``: object bytes this rank's data streams moved
      (chunks of pulls, reduce steps and broadcasts; point-to-point, completed requests);
      ``control_batches_sent``, ``control_batches_received``, ``control_bytes_received``:
      control-message batches (pickled lists) and the received batches' bytes;
    - ``messages``: dict message type name -> messages of that type this rank received;
    - ``store_objects``, ``store_bytes``: copies (complete or being received) in this rank's
      object store and their bytes (small values cached outside the store are not counted);
    - ``dead_ranks``: sorted list of the ranks this rank knows are dead;
    - ``rank``: this rank; ``rank_loss_tolerance``: whether ULFM rank-loss tolerance is active;
    - ``scheduler``: on the driver, dict of task counts: ``submitted``; ``done`` (finished on a
      worker), ``errored`` (of those, with an exception as result); ``failed`` (failed without
      running: an input's error, a dead pinned rank); ``retried``; ``rebuilt`` (re-run from
      lineage to remake a lost result), else None;
    - ``stragglers``: on the driver, the ranks named so far as much slower than the median rank
      for a function's tasks (dicts ``rank``, ``function``, ``mean_s``, ``median_s``,
      ``ratio``, ``tasks``; roles/stragglers.py), else None;
    - ``durable``: on the driver with durable storage, dict ``root``, ``restored`` (checkpointed
      tasks not executed: restored from storage), ``checkpointed`` (checkpointed tasks
      submitted for execution), ``persisted`` (steps this run committed), ``persist_dups``,
      ``persist_failed``, ``unkeyed`` (checkpointed tasks run without a checkpoint: no stable
      key), ``committed_at_start``; else None.  A worker counts ``persisted``,
      ``persist_dups``, ``persist_errors``, ``persist_bytes`` and ``persist_us`` (writer time).

    ``hoplite-mpi run --stats`` (``Config.print_stats``) prints every rank's as a table when
    the job ends.

    Raises NotInitializedError / RuntimeShutdownError without a running runtime; RuntimeError
    for ``all_ranks`` off the driver; concurrent.futures.TimeoutError if gathering took longer
    than ``timeout`` seconds.
    """
    rt = session.current()
    if all_ranks:
        if rt.rank != 0:
            raise RuntimeError("hm.stats(all_ranks=True) is called on the driver (rank 0)")
        return dict(sorted(rt.gather_stats(timeout)[0].items()))
    return rt.call(rankstats.snapshot, rt)


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
