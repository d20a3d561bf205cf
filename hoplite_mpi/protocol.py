"""Messages between ranks: one frozen slotted dataclass per kind.

Control messages travel in batches (a ``list`` of messages per MPI message, tag ``Tag.CONTROL``) so
that one loop iteration of a progress engine sends at most one message per destination.  Object
payloads travel separately as raw chunks (tag ``Tag.DATA_BASE + transfer tag``), see ``transport``.

Data flow (rank 0 = driver + scheduler; W = worker ranks; D = the directory shard of an object)::

    driver --submit--> Scheduler --RunTask(spec, dep infos)--> W --TaskDone(infos)--> Scheduler
                                                               W --DirAdd(info)-----> D
    any rank --DirLookup--> D --DirReply(info)--> any rank --Pull--> holder ==chunks==> any rank
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional


class Tag(enum.IntEnum):
    """MPI tags.  Data transfers use ``DATA_BASE + t`` with ``t`` chosen by the receiver."""

    CONTROL = 1
    DATA_BASE = 16


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What is known of one object: enough to fetch it, or the value itself when small.

    ``sizes`` are the byte lengths of its serialized frames (frame 0 = pickle stream, the others =
    out-of-band buffers such as numpy array data).  ``inline`` holds the frames themselves when the
    total is at most ``Config.inline_threshold``.  ``error`` marks an object whose value is a pickled
    task exception.  ``holders`` are ranks holding a complete copy.
    """

    object_id: int
    sizes: tuple[int, ...]
    holders: tuple[int, ...] = ()
    inline: Optional[tuple[bytes, ...]] = None
    error: bool = False

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """A task as submitted.  ``task_id`` is also the id of its first return object.

    ``args_blob`` is the cloudpickled ``(args, kwargs)`` in which every top-level ObjectRef argument
    was replaced by a placeholder; ``deps`` lists those refs' ids in placeholder order.  ``fn_blob``
    is sent with the first task of a function from a rank, ``None`` afterwards.
    """

    task_id: int
    num_returns: int
    fn_id: bytes
    fn_blob: Optional[bytes]
    args_blob: bytes
    deps: tuple[int, ...]
    owner: int
    name: str = ""
    rank: Optional[int] = None
    allowed: Optional[tuple[int, ...]] = None
    max_retries: int = 3
    init_id: Optional[bytes] = None
    init_blob: Optional[bytes] = None

    @property
    def return_ids(self) -> tuple[int, ...]:
        return tuple(range(self.task_id, self.task_id + self.num_returns))


# --- worker <-> scheduler -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SubmitTask:
    """A task submitted on a worker rank (nested task), forwarded to the scheduler."""

    spec: TaskSpec


@dataclass(frozen=True, slots=True)
class RunTask:
    """Scheduler -> worker: run ``spec``; ``deps`` gives an ObjectInfo per dependency.

    ``blobs`` carries (id, blob) pairs of functions/initializers the worker has not seen yet.
    """

    spec: TaskSpec
    deps: tuple[ObjectInfo, ...]
    blobs: tuple[tuple[bytes, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class TaskDone:
    """Worker -> scheduler: the task finished (``results[i]`` describes return object ``i``)."""

    task_id: int
    rank: int
    results: tuple[ObjectInfo, ...]


@dataclass(frozen=True, slots=True)
class TaskBlocked:
    """Worker -> scheduler: the task waits in a nested get/wait; its slot may be reused."""

    task_id: int
    blocked: bool


@dataclass(frozen=True, slots=True)
class ObjectReady:
    """Scheduler -> owner of a ref: the object exists (or failed).  Used for put-from-worker too."""

    info: ObjectInfo


# --- directory ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class DirAdd:
    """Holder -> directory shard: ``info.holders[0]`` now holds ``info.object_id``."""

    info: ObjectInfo


@dataclass(frozen=True, slots=True)
class DirLookup:
    """Any rank -> shard: reply once the object exists (the lookup waits until then)."""

    object_id: int
    requester: int


@dataclass(frozen=True, slots=True)
class DirReply:
    """Shard -> requester: ``info`` is None when the object was deleted."""

    object_id: int
    info: Optional[ObjectInfo]


@dataclass(frozen=True, slots=True)
class DirDelete:
    """Any rank -> shard: forget the object everywhere; later lookups answer 'deleted'."""

    object_id: int


@dataclass(frozen=True, slots=True)
class Free:
    """Shard -> holder: drop your copy of the object."""

    object_id: int


# --- object transfer ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Pull:
    """Receiver -> holder: send the object's bytes from ``offset`` on, as chunks tagged ``tag``."""

    object_id: int
    tag: int
    offset: int = 0


@dataclass(frozen=True, slots=True)
class PullRefused:
    """Holder -> receiver: it does not hold the object (any more); ask the directory again."""

    object_id: int
    tag: int


# --- lifecycle ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Shutdown:
    """Driver -> every rank: stop after acknowledging."""


@dataclass(frozen=True, slots=True)
class ShutdownAck:
    """Rank -> driver: engine stopped accepting work."""

    rank: int


ALL_MESSAGES = (SubmitTask, RunTask, TaskDone, TaskBlocked, ObjectReady, DirAdd, DirLookup,
                DirReply, DirDelete, Free, Pull, PullRefused, Shutdown, ShutdownAck)
