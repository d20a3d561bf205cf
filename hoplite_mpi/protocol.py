"""Messages between ranks: one slotted dataclass per kind (immutable by convention).

Control messages travel in batches (a ``list`` of messages per MPI message, tag ``Tag.CONTROL``) so
that one loop iteration of a progress engine sends at most one message per destination.  Object
payloads travel separately as raw chunks (tag ``Tag.DATA_BASE + transfer tag``), see ``transport``.

Data flow (rank 0 = driver + scheduler; W = worker ranks; D = the directory shard of an object)::

    driver --submit--> Scheduler --RunTask(spec, dep infos)--> W --TaskDone(infos)--> Scheduler
                                                               W --DirAdd(info)-----> D
    any rank --DirLookup--> D --DirReply(info)--> any rank
    any rank --DirPull--> D --DirSender(info: the sender)--> any rank --Pull--> sender ==chunks==> any rank
"""
from __future__ import annotations

import enum
import operator
from dataclasses import dataclass, fields
from typing import Any, Optional


def message(cls: type) -> type:
    """Make ``cls`` a slotted dataclass that pickles as a plain tuple of its fields.

    Messages are immutable by convention but not ``frozen``: a frozen dataclass's ``__init__``
    (``object.__setattr__`` per field) and the generic pickling of slotted dataclasses (which
    calls ``dataclasses.fields`` per object) dominated rank 0's profile at 20k tasks/s; this
    brings a RunTask pickle round trip from ~40 us to ~11 us.
    """
    cls = dataclass(frozen=False, slots=True)(cls)
    names = tuple(f.name for f in fields(cls))
    if not names:
        cls.__reduce__ = lambda self: (cls, ())
        return cls
    getter = operator.attrgetter(*names)
    if len(names) == 1:
        cls.__reduce__ = lambda self: (cls, (getter(self),))
    else:
        cls.__reduce__ = lambda self: (cls, getter(self))
    return cls


class Tag(enum.IntEnum):
    """MPI tags.  Data transfers use ``DATA_BASE + t`` with ``t`` chosen by the receiver."""

    CONTROL = 1
    DATA_BASE = 16


@message
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
    head: Optional[bytes] = None    # frame 0 of a chunked object when small (numpy: dtype/shape)

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)


@message
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
    inline_threshold: Optional[int] = None    # results <= this many bytes go in-band (None: config)
    replicas: Optional[int] = None            # copies of each result (None: Config.replication)
    strict_rank: bool = False                 # lineage re-runs only on ``rank`` (else anywhere)
    durable: Optional[tuple[str, str, bool, bool]] = None  # (storage root, step key, named by the
    #   user, fsync): commit the results there; fsync is the driver's Config.storage_sync

    @property
    def return_ids(self) -> tuple[int, ...]:
        return tuple(range(self.task_id, self.task_id + self.num_returns))


# --- worker <-> scheduler -------------------------------------------------------------------

@message
class SubmitTask:
    """A task submitted on a worker rank (nested task), forwarded to the scheduler."""

    spec: TaskSpec


@message
class RunTask:
    """Scheduler -> worker: run ``spec``; ``deps`` gives an ObjectInfo per dependency.

    ``blobs`` carries (id, blob) pairs of functions/initializers the worker has not seen yet.
    A ``None`` in ``deps``: that input is being made by a task placed on this worker before
    this one (``Config.worker_deps``); the task waits on the worker until it is made there.
    """

    spec: TaskSpec
    deps: tuple[ObjectInfo, ...]
    blobs: tuple[tuple[bytes, bytes], ...] = ()


@message
class TaskDone:
    """Worker -> scheduler: the task finished (``results[i]`` describes return object ``i``)."""

    task_id: int
    rank: int
    results: tuple[ObjectInfo, ...]
    seconds: float = 0.0        # the task function's run time on the worker (straggler report)


@message
class Revoke:
    """Scheduler -> worker: drop the task if it has not started there (it waits for inputs
    made on the worker, or for an executor thread): a cancel; answered by :class:`Revoked`."""

    task_id: int


@message
class Revoked:
    """Worker -> scheduler: whether the task was dropped before it started (``dropped``)."""

    task_id: int
    rank: int
    dropped: bool


@message
class TaskBlocked:
    """Worker -> scheduler: the task waits in a nested get/wait; its slot may be reused."""

    task_id: int
    blocked: bool


# --- directory ------------------------------------------------------------------------------

@message
class DirAdd:
    """Holder -> directory shard: ``info.holders[0]`` now holds ``info.object_id``.
    ``replicas``: copies the object should have (0: ``Config.replication``)."""

    info: ObjectInfo
    replicas: int = 0


@message
class DirLookup:
    """Any rank -> shard: reply once the object exists (the lookup waits until then)."""

    object_id: int
    requester: int


@message
class DirPull:
    """Receiver -> shard: "I want a copy": once the object exists, pick a sender for ``requester``
    (a complete or partial copy: the tail of the shortest chain, Hoplite §3.3), record the
    requester as a partial holder fed by it, and reply with ``info.holders == (sender,)``."""

    object_id: int
    requester: int


@message
class DirCheck:
    """Rank 0 -> shard: ``maker`` made ``object_id`` (rank 0 had its ``TaskDone``) and is dead
    now.  If the shard never got the object's ``DirAdd`` (the maker died between its two
    messages), it answers ``ObjectLost`` once it has seen ``maker`` die; a registered object is
    the shard's own business (:meth:`DirectoryShard.rank_lost`)."""

    object_id: int
    maker: int


@message
class DirPartial:
    """Producer -> shard: ``rank`` is producing the object (a reduce output): it exists from now on
    and can serve the prefix it has."""

    info: ObjectInfo
    rank: int


@message
class DirReply:
    """Shard -> requester, the answer to a DirLookup: ``info`` is None when the object was
    deleted."""

    object_id: int
    info: Optional[ObjectInfo]


@message
class DirSender:
    """Shard -> requester, the answer to a DirPull: ``info.holders`` is the one chosen sender (a
    complete or partial copy, Hoplite §3.3), or ``info`` carries the value inline, or is None
    (the object was deleted)."""

    object_id: int
    info: Optional[ObjectInfo]


@message
class DirDelete:
    """Any rank -> shard: forget the object everywhere.

    ``permanent`` (``hm.delete``): later lookups answer 'deleted' for ever.  Not permanent (the
    driver dropped its last ref, nobody can ask again): the shard only remembers the id for a while,
    to free a copy whose registration arrives late.
    """

    object_id: int
    permanent: bool = True


@message
class Free:
    """Shard -> holder: drop your copy of the object."""

    object_id: int


# --- object transfer ------------------------------------------------------------------------

@message
class Pull:
    """Receiver -> holder: send the object's bytes from ``offset`` on, as chunks tagged ``tag``.
    ``sizes``: the frame sizes the receiver expects (its chunk plan); a holder whose copy differs
    refuses (``PullRefused.reason``) instead of sending chunks that would not fit."""

    object_id: int
    tag: int
    offset: int = 0
    sizes: tuple = ()


@message
class PullRefused:
    """Holder -> receiver: it does not hold the object (any more); ask the directory again.
    With ``reason``: it holds a copy that does not match the sizes asked for (a bug): the
    receiver fails the object with TransferError."""

    object_id: int
    tag: int
    reason: str = ""


@message
class StreamCancel:
    """Receiver -> sender: a stream with MPI tag ``mpi_tag`` failed on the receiver for another
    reason than a death (a bug): post no more chunks of it.  The receiver drains what was
    posted already, so no send is left unmatched."""

    mpi_tag: int


REPLICA_TOKEN = -1   # Fetch token of a background replica copy (its Fetched is ignored)


@message
class Fetch:
    """Driver -> rank: make sure you hold a complete copy (broadcast), then answer Fetched.
    (Primary shard -> rank with ``token=REPLICA_TOKEN``: make a background replica.)
    ``info``: the object's value itself (inline; a small broadcast, or the result of a reduce of
    small inputs): keep it, nothing to pull.  ``sender``: a complete copy to pull from at once,
    without asking the directory (a broadcast of a one-chunk object, ``Config.broadcast_direct``)."""

    object_id: int
    token: int
    pulled: bool = False   # the driver already sent the DirPull for this rank (saves a hop)
    info: Optional[ObjectInfo] = None
    sender: Optional[ObjectInfo] = None


@message
class Fetched:
    """Rank -> driver: the copy asked for by ``token`` is complete (``error``: why not)."""

    token: int
    rank: int
    error: Optional[str] = None


# --- reduce (Hoplite §3.4 tree-chain) --------------------------------------------------------

@message
class ReduceStep:
    """Coordinator -> the rank of one slot of a reduce tree: produce ``out_id``.

    ``out_id`` = op(own input, outputs of the children), computed chunk by chunk as the children's
    chunks arrive, served to the parent as it grows.  ``input_info`` is None for the copy step of
    the target rank (it only receives the single child's output).  ``children`` lists
    ``(rank, object id)`` pairs to pull directly.  ``final``: ``out_id`` is the result object.
    ``late``: how many more contributions will be named by :class:`ReduceLate` (the target's
    accumulator starts before the last input exists).  ``head``: frame 0 of the output.
    """

    reduce_id: int
    out_id: int
    input_info: Optional[ObjectInfo]
    children: tuple[tuple[int, int], ...]
    op: bytes
    final: bool = False
    sizes: tuple[int, ...] = ()     # frame sizes of the output (= of every input)
    late: int = 0
    head: bytes = b""
    adopt: int = 0      # (a re-planned reduce) when complete, the output becomes this object
    start: int = 0      # (a re-planned reduce) bytes of the output already given out by the
                        # result entry: only the chunks after them are pulled and combined


@message
class ReduceLate:
    """Coordinator -> the target's accumulator step ``out_id``: one of its late contributions is
    the input ``info``, held by ``rank`` (the target itself: combine it locally; else pull it)."""

    reduce_id: int
    out_id: int
    info: ObjectInfo
    rank: int


@message
class ReduceStepDone:
    """Rank -> coordinator: the step's output is complete (or failed with ``error`` frames)."""

    reduce_id: int
    out_id: int
    rank: int
    sizes: tuple[int, ...] = ()
    error: Optional[tuple[bytes, ...]] = None
    lost: int = -1      # the error is that this rank died (the reduce is re-planned)


@message
class ReduceAbort:
    """Coordinator -> the target, then target -> ``forward``: the reduce attempt ``reduce_id`` is
    abandoned (a participant died).  The target first stops releasing its output (readers of the
    result wait for the next attempt to complete it), then tells the other ranks, whose steps
    drain their streams and fill their outputs with garbage that nobody publishes.
    """

    reduce_id: int
    forward: tuple[int, ...] = ()
    result_id: int = 0      # (to the target) answer with ReduceResume: how much of it is out


@message
class ReduceResume:
    """Target -> coordinator, answering a :class:`ReduceAbort` with ``result_id``: the result
    entry on the target has given out its first ``progress`` bytes (complete reductions), so the
    next attempt only computes the rest (0: no result entry, start from scratch)."""

    reduce_id: int
    progress: int


@message
class ReduceRequest:
    """Worker -> rank 0: a task called reduce/allreduce; rank 0 coordinates it."""

    reduce_id: int
    inputs: tuple[int, ...]
    op: bytes
    num: int
    target: int
    allreduce: bool


# --- lifecycle ------------------------------------------------------------------------------

@message
class ObjectLost:
    """Directory shard -> scheduler: no complete copy of the object is left (``rank`` died)."""

    object_id: int
    rank: int


@message
class Persisted:
    """Worker -> rank 0: an attempt to commit checkpointed task ``task_id``'s results as step
    ``key`` ended (``ok`` False: an I/O error; ``committed`` False: committed before by
    another attempt); ``nbytes`` written (durable/persister.py)."""

    task_id: int
    key: str
    ok: bool
    committed: bool
    nbytes: int


@message
class Output:
    """Worker -> rank 0: lines a worker's tasks (``label`` "f pid=P, rank=R") or the worker
    itself (``label`` "rank=R") wrote to stdout (``stream`` 1) or stderr (2), in the order
    written: ``items`` = ((stream, label, text), ...), each text one or more whole lines
    (hoplite_mpi/output.py)."""

    items: tuple


@message
class Ask:
    """Rank 0 -> every rank: answer question ``what`` (with ``arg``): "state" (a stall report),
    "timeline" (``arg`` "start" recording, "take" the events so far, or take them and "stop"),
    "stats" (the rank's counters); roles/gather.py."""

    token: int
    what: str
    arg: Any


@message
class Answer:
    """Answer to :class:`Ask`: the rank's ``payload`` and its clock (``time.perf_counter``)
    when it answered (rank 0 estimates clock offsets from it)."""

    token: int
    rank: int
    now: float
    payload: Any


@message
class Heartbeat:
    """Worker -> rank 0: still alive (sent every ``Config.heartbeat`` seconds)."""


@message
class MemberDown:
    """Rank 0 -> every rank: ``rank`` is declared dead (it stopped answering)."""

    rank: int


@message
class TaskExit:
    """Worker -> rank 0: the running task ``task_id`` called ``os._exit(status)``, so this rank
    is about to end; rank 0 echoes it back once it has taken note (the rank then exits)."""

    task_id: int
    rank: int
    status: int


@message
class Shutdown:
    """Driver -> every live rank: the job ends; the driver's last message (runtime.py, shutdown)."""


@message
class ShutdownAck:
    """Rank -> every other live rank, on Shutdown: this rank's last message on the communicator."""

    rank: int

