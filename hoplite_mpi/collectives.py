"""Reduce planning and coordination: pure state machines (no MPI, no I/O).

Tree-chain reduce (Hoplite §3.4): a binary tree of depth ``D`` on top of ``2**D`` chains.  For an
object of ``S`` bytes, link bandwidth ``B`` (bytes/s) and per-message latency ``L`` (s), the chain
length is ``k = round(S / (B * L))`` and::

    D = min(ceil(log2((n + 1) / (k + 1))), floor(log2(n + 1)))

so large objects give one chain (every hop streams chunk by chunk, bandwidth-optimal) and small ones
a binary tree (latency-optimal).  Slots are filled in arrival order, deepest first, so every slot's
children are known when the slot is filled and its step can start at once; the root slot is kept
for an input already on the target rank when there is one (saving the final copy).  With
``num < len(inputs)`` the first ``num`` inputs to become ready are reduced; later ones are ignored.

Last arrival (an addition to Hoplite's plan for staggered inputs): once a single input is still
to come, the target's step (the root, or the copy step) starts at once as an *accumulator*: it
takes over the children of the one free slot, pulls and combines everything that exists, and the
last input, when ready, is pulled by the target directly (``ReduceLate``) and added chunk by
chunk.  After the last arrival one transfer remains, instead of a pull into that input's rank
followed by the target's pull of the sum.  The bytes moved are the same ((n - 1) * S).

Inline path (small objects; ``Config.small_collectives``, on by default).  An object of at most
``Config.inline_threshold`` serialized bytes is an inline value: its directory entry carries the
value, and that entry reaches this coordinator with :class:`InputReady`.  So the gather a tree
would do (every hop: a ReduceStep, a Pull, the chunk, a ReduceStepDone: ~4 control messages of
Python, ``L`` each in the cost model, on each of ``D`` levels) is already done when the inputs are
known, and the combine is ``n * S`` bytes of numpy on this rank (~1 us per KiB).  The path is
therefore chosen by the first placed input: inline → the coordinator combines each input as it
becomes ready (first ``num``, arrival order, the same checks of shape, dtype and op as the tree),
and once ``num`` are in, the result is an inline value: registered at its shard (``DirAdd``) and
sent, in a :class:`~hoplite_mpi.protocol.Fetch` that carries it, to the ranks that must hold it
(the target if it is not this rank, and for an allreduce each contributing rank), which answer
``Fetched``; cost: at most one round trip, against ``2 + D`` control hops and a step per input for
the tree.  No step runs anywhere, so a rank loss re-plans nothing: inputs are values, and a target
that dies after the combine does not lose the (inline) result.  An input that turns out not to be
inline (a read-only array's pickle is one byte longer: one at the threshold may be larger than
its peers) moves the inputs combined so far into a tree (nothing was sent yet) and the reduce goes
on there.  When every input is already an inline value known on rank 0 and no copy must go
elsewhere (a reduce to the driver; an allreduce of the driver's own values), the driver's thread
runs this same coordinator itself (``Config.reduce_now``, ``Coordination.combine_now``) and stores
the result as a ``put``: the ref is ready when ``reduce`` returns, with no engine round trip
(1 KiB reduce of 4 inputs 0.56-0.69 -> 0.11-0.18 ms).  A broadcast of an inline value is the
same one message per target (:mod:`hoplite_mpi.objects.broadcast`).  Larger objects take the
tree-chain below.

Star (mid-size objects, also ``Config.small_collectives``): for ``n`` inputs of chain length
``k``, a star (the target's step pulls every input itself, each named by ``ReduceLate`` as it
is placed, with no step on the inputs' ranks) costs ``c + (n - 1) * k`` in units of ``L`` and the
tree-chain ``c + (levels - 1) + k``; :func:`star_cheaper` picks the star when
``(n - 2) * k < levels - 1``: with the default ``B`` and ``L``, objects under ~75 KB (``k = 0``)
that are not inline, e.g. a 64 KiB array (its pickle is a little over the inline threshold).
Its rank-loss handling is that of the last arrival below (every slot is a late one).

The coordinator has one entry point, :meth:`ReduceCoordinator.handle`: one event in (:class:`Start`,
:class:`InputReady`, :class:`~hoplite_mpi.events.RankLost`, or the messages ``ReduceStepDone``,
``ReduceResume`` and ``Fetched`` as they arrive), one list of instructions out, to be carried out in order:
``(rank, message)`` tuples to send, then local instructions (not tuples): :class:`Replanned`,
:class:`WatchInputs`, :class:`Reduced`.
"""
from __future__ import annotations

import math
import pickle
from dataclasses import dataclass, field
from typing import Sequence, Callable, Optional

import numpy as np

from .arrays import array_meta, array_of
from .errors import HopliteError
from .events import Instruction, Outbox, RankLost
from .ids import format_id
from .protocol import (DirAdd, Fetch, Fetched, Free, ObjectInfo, ReduceAbort, ReduceLate, ReduceResume,
                       ReduceStep, ReduceStepDone)
from .serialization import error_info, local_error, serialize, to_bytes

OPS = {"sum": np.add, "prod": np.multiply, "min": np.minimum, "max": np.maximum}

# The tree combines contributions in arrival order, in any grouping: only commutative and
# associative ops give a result that does not depend on timing (as MPI_Op_create's ``commute``).
# Floating-point addition and multiplication are treated as associative, as MPI does.
COMMUTATIVE = frozenset([np.add, np.multiply, np.minimum, np.maximum, np.fmin, np.fmax,
                         np.logical_and, np.logical_or, np.logical_xor, np.bitwise_and,
                         np.bitwise_or, np.bitwise_xor, np.gcd, np.lcm, np.logaddexp,
                         np.logaddexp2, np.hypot])


# every allowed op pickled once (an op travels as its pickle in ReduceStep and ReduceRequest)
_OP_BLOBS = {u: pickle.dumps(u) for u in COMMUTATIVE}
_OPS_OF = {blob: u for u, blob in _OP_BLOBS.items()}


def op_blob(ufunc: np.ufunc) -> bytes:
    """The pickle of an op of :func:`resolve_op`."""
    blob = _OP_BLOBS.get(ufunc)
    return pickle.dumps(ufunc) if blob is None else blob


def load_op(blob: bytes) -> np.ufunc:
    """The op of :func:`op_blob`'s ``blob`` (raises what pickle raises for another blob)."""
    op = _OPS_OF.get(blob)
    return pickle.loads(blob) if op is None else op


def resolve_op(op) -> np.ufunc:
    """The numpy ufunc of ``op``: "sum", "prod", "min", "max", or a commutative and associative
    binary ufunc (:data:`COMMUTATIVE`: add, multiply, minimum, maximum, fmin, fmax, logical_and/
    or/xor, bitwise_and/or/xor, gcd, lcm, logaddexp, logaddexp2, hypot).

    Raises ValueError for an unknown name or an op whose result depends on the order of its
    inputs (np.subtract, np.divide, np.power, ...: the tree combines in arrival order), TypeError
    for anything that is not a binary ufunc.
    """
    if isinstance(op, str):
        try:
            return OPS[op]
        except KeyError:
            raise ValueError(f"unknown reduce op {op!r}; use one of {sorted(OPS)} or a binary numpy ufunc") from None
    if isinstance(op, np.ufunc):
        if op.nin != 2 or op.nout != 1:
            raise TypeError(f"reduce op {op.__name__} must be a binary ufunc (2 inputs, 1 output)")
        if op not in COMMUTATIVE:
            raise ValueError(
                f"reduce op np.{op.__name__} is not commutative and associative: the reduce tree "
                f"combines inputs in arrival order, so its result would depend on timing; use one "
                f"of {sorted(u.__name__ for u in COMMUTATIVE)} (or reduce with a task)")
        return op
    raise TypeError(f"reduce op must be a name or a numpy ufunc, got {op!r}")


def check_op_dtype(op: np.ufunc, dtype: np.dtype) -> Optional[str]:
    """Why ``op`` cannot combine arrays of ``dtype`` in place (``op(a, b, out=a)``, as every
    reduce step does), or None if it can.  Tried on one-element arrays."""
    a, b = np.zeros(1, dtype), np.zeros(1, dtype)
    try:
        with np.errstate(all="ignore"):
            op(a, b, out=a)
    except Exception as exc:
        return f"np.{op.__name__} cannot reduce {dtype} arrays in place: {exc}"
    return None


def portable_error(exc: BaseException, context: str) -> BaseException:
    """``exc`` as an instance of its nearest builtin type (numpy's own ufunc errors have
    constructors that do not survive pickling), with ``context`` before its message."""
    base = next(t for t in type(exc).__mro__ if t.__module__ == "builtins")
    try:
        return base(f"{context}: {type(exc).__name__}: {exc}")
    except Exception:
        return HopliteError(f"{context}: {type(exc).__name__}: {exc}")


def chain_length(nbytes: int, bandwidth: float, latency: float) -> int:
    """Hoplite's k = round(S / (B * L))."""
    return int(round(nbytes / (bandwidth * latency)))


def tree_depth(n: int, k: int) -> int:
    """Hoplite's D = min(ceil(log2((n+1)/(k+1))), floor(log2(n+1))), at least 0."""
    if n <= 1:
        return 0
    return max(0, min(math.ceil(math.log2((n + 1) / (k + 1))), int(math.floor(math.log2(n + 1)))))


def star_cheaper(n: int, k: int, m: int = 0) -> bool:
    """Whether a star (the target pulls every input itself and combines them) costs less than
    the tree-chain for ``n`` inputs of chain length ``k``.  In units of ``L``: the star takes
    ``c + (n - 1) * k`` (its hops, then the target receives ``n - 1`` objects of ``S`` bytes),
    the tree-chain ``c + (levels - 1) + k`` (one hop per level below the root, bytes pipelined
    through the chain), with the same ``c`` (the steps asked, the pulls sent, the result
    reported): the star when ``(n - 2) * k < levels - 1``.

    ``m``: the object's data chunks (0: as many as it takes to pipeline, Hoplite's model).  A
    chain of ``D = levels - 1`` hops streams chunk by chunk, so each hop after the first adds one
    chunk's time ``k / m`` (``Config.chunk_aware_plan``): the tree-chain takes
    ``c + D + k + (D - 1) * k / m``; an object of one chunk crosses the hops one after the
    other."""
    if n <= 2:
        return False
    parent, _ = tree_chain(n, tree_depth(n, k))
    level: list[int] = []
    for p in parent:                 # (a parent comes before its children)
        level.append(0 if p is None else level[p] + 1)
    depth = max(level)
    if m <= 0:
        return (n - 2) * k < depth
    return m * (n - 2) * k < m * depth + (depth - 1) * k


def host_order(infos: list, hosts: Sequence, target: int) -> list:
    """Inputs ready together, in the order to place them (issue 13): grouped by the host of
    their holder, the target's host last.  Slots are filled leaf first and the data flows
    towards the root, on the target, so a chain then crosses each host boundary once instead
    of at every hop when the inputs' ranks alternate between hosts.  Stable within a host
    (input order).  ``hosts[r]``: the host of rank ``r``."""
    def key(info):
        rank = info.holders[0] if info.holders else target
        host = hosts[rank] if rank < len(hosts) else None
        return (host == hosts[target], str(host))
    return sorted(infos, key=key)


def tree_chain(n: int, depth: int) -> tuple[list[Optional[int]], list[int]]:
    """Topology of ``n`` slots: ``parent[i]`` (None for the root, slot 0) and the fill order
    (deepest slots first, the root last)."""
    tree = (1 << depth) - 1
    parent: list[Optional[int]] = []
    level: list[int] = []
    # tree slots in heap order: slot i (0-based) has parent (i - 1) // 2
    for i in range(tree):
        parent.append(None if i == 0 else (i - 1) // 2)
        level.append(int(math.floor(math.log2(i + 1))))
    chains = 1 << depth
    rest = n - tree
    lengths = [rest // chains + (1 if c < rest % chains else 0) for c in range(chains)]
    for c, length in enumerate(lengths):
        above = None if depth == 0 else (tree - (1 << (depth - 1))) + c // 2
        for p in range(length):
            parent.append(above)
            level.append(depth + p)
            above = len(parent) - 1
    order = sorted(range(n), key=lambda i: (-level[i], i))
    return parent, order


# --- events (ReduceCoordinator.handle takes one; ReduceStepDone, ReduceResume and Fetched too) ---

@dataclass(slots=True)
class Start:
    """Begin: every input is asked for (:class:`WatchInputs`), or, if the target is among
    ``dead`` (ranks dead now), the reduce fails at once."""

    dead: frozenset = frozenset()


@dataclass(slots=True)
class InputReady:
    """An input exists (``info``; an error object fails the reduce).  Inputs beyond the first
    ``num`` are ignored; an input given more than once (``[a, a]``) fills one slot per
    occurrence; an info whose holders are all dead is ignored (it is asked for again)."""

    info: ObjectInfo


# --- local instructions (in handle()'s output beside the (rank, message) sends) -----------------

@dataclass(slots=True)
class Replanned(Instruction):
    """The reduce was planned again without the ``dead`` ranks; its new attempt has id
    ``reduce_id`` (messages of it carry that id) and starts at byte ``start`` of the result (the
    bytes before were given out already and are not computed again).  A :class:`WatchInputs`
    follows."""

    reduce_id: int
    result_id: int
    dead: tuple
    start: int


@dataclass(slots=True)
class WatchInputs(Instruction):
    """Report each of these objects with :class:`InputReady` once it exists with a live copy (or
    as an error object); ids are distinct."""

    object_ids: tuple


@dataclass(slots=True)
class Reduced(Instruction):
    """The reduce is over (the last instruction it gives): ``result`` is the result's info (an
    error object if it failed), ``used`` the input ids reduced, in arrival order, ``attempts``
    the reduce ids of every attempt (the first is the one it was created with)."""

    result: ObjectInfo
    used: tuple
    attempts: tuple


@dataclass
class _Slot:
    index: int
    parent: Optional[int]
    children: list = field(default_factory=list)
    info: Optional[ObjectInfo] = None   # the input placed here
    rank: Optional[int] = None
    out_id: Optional[int] = None
    started: bool = False
    late: bool = False      # filled by the last input: the target's accumulator pulls it


class ReduceCoordinator:
    """One reduce on rank 0: places inputs in tree-chain slots as they become ready and tells
    each slot's rank what to pull and combine.

    Args:
        reduce_id: unique id (also the fetch token of an allreduce's broadcast).
        inputs: object ids of the input refs.
        op: pickled ufunc (sent to the ranks).
        num: how many inputs to reduce (the first ``num`` to be ready).
        target: rank where the result lives.
        result_id: object id of the result.
        new_id: returns a fresh object id (intermediate outputs).
        chain_k: Hoplite's chain length ``k`` for this object size (see :func:`chain_length`); it
            is computed from the first ready input when None and ``size_to_k`` is given.
        allreduce: also give the result to every rank that contributed an input.
        shard_ranks: the directory shard ranks of an object id.
        small: take the inline path when the inputs are inline values (``Config.small_collectives``).
        home: the rank this coordinator runs on (it knows the result once :class:`Reduced` is
            carried out: no copy is sent to it).
        size_to_chunks: the data chunks of an object of frame sizes ``sizes``, for the choice of
            the star (``Config.chunk_aware_plan``; None: Hoplite's model, see :func:`star_cheaper`).
        direct_fetch: (allreduce, ``Config.broadcast_direct``) a result of one chunk is pulled by
            each contributing rank from the target at once (``Fetch.sender``), not through the
            directory: no chain of copies can pipeline it, and the DirPull/DirSender hop goes.
    """

    def __init__(self, reduce_id: int, inputs: list[int], op: bytes, num: int, target: int,
                 result_id: int, new_id: Callable[[], int], size_to_k: Callable[[int], int],
                 allreduce: bool = False, shard_ranks: Callable[[int], tuple] = lambda oid: (0,),
                 small: bool = False, home: int = 0,
                 size_to_chunks: Optional[Callable[[tuple], int]] = None,
                 direct_fetch: bool = False) -> None:
        self.reduce_id = reduce_id
        self.inputs = list(inputs)
        self.op = op
        self.num = num
        self.target = target
        self.result_id = result_id
        self.new_id = new_id
        self.size_to_k = size_to_k
        self.size_to_chunks = size_to_chunks
        self.direct_fetch = direct_fetch
        self.allreduce = allreduce
        self.shard_ranks = shard_ranks
        self.slots: list[_Slot] = []
        self.order: list[int] = []
        self.used: list[int] = []          # input ids placed, in arrival order
        self.head: Optional[bytes] = None
        self.sizes: Optional[tuple] = None
        self.shape: Optional[tuple] = None
        self.dtype: Optional[np.dtype] = None
        self.copy_step: Optional[_Slot] = None
        self.pending_fetch: set[int] = set()
        self.result_done = False
        self.done = False
        self.result: Optional[ObjectInfo] = None   # set when done (error objects too)
        self.intermediates: list[tuple[int, int]] = []
        # re-planning after a rank loss: every attempt has its own reduce id; later attempts make
        # the result under a fresh id that the target adopts as ``result_id`` when complete
        self.attempts = [reduce_id]
        self.final_id = result_id
        self.retired: list[tuple[int, int]] = []   # intermediates of abandoned attempts
        self.dead: set[int] = set()
        self._wants_inputs = False    # WatchInputs (after a re-plan) at the end of this event
        self._reported = False        # Reduced given
        self.start = 0                # bytes of the result the target has given out (re-plans)
        self.awaiting: Optional[int] = None   # abandoned attempt whose ReduceResume is awaited
        # the inline path (see the module docstring): chosen at the first placed input
        self.small = small
        self.home = home
        self.path: Optional[str] = None       # "inline" or "tree" once the first input is placed
        self.acc: Optional[np.ndarray] = None  # (inline) the combination of the inputs so far
        self.held: list[ObjectInfo] = []      # (inline) their infos, to replay into a tree
        self._ufunc: Optional[np.ufunc] = None

    # --- events ------------------------------------------------------------------------------

    def handle(self, event: object) -> list:
        """Apply one event; returns the instructions: ``(rank, message)`` sends, then the local
        :class:`Instruction` s.  Events after the reduce is over give nothing.

        Raises TypeError for an object that is not one of its events (nothing changed).
        """
        cls = event.__class__
        if cls is InputReady:
            out = self._input_ready(event.info)
        elif cls is ReduceStepDone:
            out = self._step_done(event)
        elif cls is Fetched:
            out = self._fetched(event.rank, event.error)
        elif cls is RankLost:
            out = self._rank_lost(event.rank)
        elif cls is ReduceResume:
            out = self._resume(event.reduce_id, event.progress)
        elif cls is Start:
            if self.target in event.dead:       # (the target died before the reduce was asked for)
                out = self._rank_lost(self.target)
            else:
                out = [WatchInputs(tuple(dict.fromkeys(self.inputs)))]
        else:
            raise TypeError(f"the reduce coordinator has no event {cls.__name__}")
        if self._wants_inputs:
            self._wants_inputs = False
            if not self.done:
                out.append(Replanned(self.reduce_id, self.result_id, tuple(sorted(self.dead)),
                                     self.start))
                out.append(WatchInputs(tuple(dict.fromkeys(self.inputs))))
        if self.done and not self._reported:
            self._reported = True
            out.append(Reduced(self.result, tuple(self.used), tuple(self.attempts)))
        return out

    def _input_ready(self, info: ObjectInfo) -> Outbox:
        oid = info.object_id
        want = self.inputs.count(oid) - self.used.count(oid)
        if self.done or len(self.used) >= self.num or want <= 0:
            return []
        if info.inline is None and info.holders and set(info.holders) <= self.dead:
            return []       # a copy that died: the runtime asks the directory (or lineage) again
        # (an inline value needs no holder: it is placed on a live rank, the target if none)
        if info.error:
            return self._fail_with(info.inline)
        out: Outbox = []
        for _ in range(want):
            if self.done or len(self.used) >= self.num:
                break
            out += self._place(info)
        return out

    def _place(self, info: ObjectInfo) -> Outbox:
        """Put one occurrence of input ``info`` into the next slot (or, on the inline path, into
        the combination)."""
        head = info.head if info.inline is None else info.inline[0]
        if len(info.sizes) != 2 or head is None:
            return self._fail(TypeError(
                f"reduce input {format_id(info.object_id)} is not a numpy array with an out-of-band "
                f"buffer (C- or Fortran-contiguous numeric array expected)"))
        try:
            if info.inline is not None:
                arr = array_of(head, info.inline[1:])
            else:
                arr = array_meta(head, info.sizes[1])
        except Exception as exc:
            return self._fail(TypeError(f"reduce input {format_id(info.object_id)} is not a numpy array ({exc})"))
        if self.dtype is not None and type(arr) is np.ndarray and arr.dtype == self.dtype \
                and arr.shape == self.shape:
            pass        # (as the first input, which was checked)
        elif not isinstance(arr, np.ndarray) or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            kind = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
            return self._fail(TypeError(f"reduce input {format_id(info.object_id)} has non-numeric type {kind}"))
        if self.dtype is None:
            self._ufunc = load_op(self.op)
            why = check_op_dtype(self._ufunc, arr.dtype)
            if why is not None:
                return self._fail(TypeError(f"reduce input {format_id(info.object_id)}: {why}"))
            self.shape, self.dtype = arr.shape, arr.dtype
        elif arr.shape != self.shape or arr.dtype != self.dtype:
            first = format_id(self.used[0] if self.used else self.inputs[0])
            return self._fail(ValueError(
                f"reduce input {format_id(info.object_id)} has shape {arr.shape} and dtype {arr.dtype}, "
                f"but input {first} has shape {self.shape} and dtype {self.dtype}"))
        if self.path is None:
            self.path = "inline" if self.small and info.inline is not None else "tree"
        if self.path == "inline":
            if info.inline is not None:
                return self._combine(info, arr)
            return self._to_tree(info)
        return self._place_in_tree(info, arr)

    # --- the inline path ---------------------------------------------------------------------

    def _combine(self, info: ObjectInfo, arr: np.ndarray) -> Outbox:
        """(inline path) Combine the value of ``info`` into the result here; once ``num`` inputs
        are in, the result is an inline value: registered at its shard, sent to the ranks that
        must hold it (the target; an allreduce's contributors), done when they have it."""
        self.used.append(info.object_id)
        self.held.append(info)
        try:
            if self.acc is None:
                self.acc = np.array(arr, order="C", copy=True)
            else:
                self._ufunc(self.acc, arr, out=self.acc)
        except Exception as exc:    # the op failed on these values: the reduce fails
            return self._fail(portable_error(
                exc, f"reduce op np.{self._ufunc.__name__} failed on rank {self.home}"))
        if len(self.used) < self.num:
            return []
        frames = to_bytes(serialize(self.acc, copy=True))   # (arrays.array_frames, mostly)
        self.acc = None
        self.result = ObjectInfo(self.result_id, tuple(len(f) for f in frames), (self.target,),
                                 frames)
        self.result_done = True
        out: Outbox = [(r, DirAdd(self.result)) for r in self.shard_ranks(self.result_id)]
        copies = {self.target}
        if self.allreduce:
            for held in self.held:
                live = [h for h in held.holders if h not in self.dead]
                copies.add(live[0] if live else self.target)
        for rank in sorted(copies - self.dead - {self.home}):
            self.pending_fetch.add(rank)
            out.append((rank, Fetch(self.result_id, self.reduce_id, info=self.result)))
        return out + self._maybe_finish()

    def _to_tree(self, info: ObjectInfo) -> Outbox:
        """(inline path) An input that is not inline (its pickle is larger, e.g. a read-only
        array's at the threshold): nothing was sent yet, so the inputs placed so far go into a
        tree as on the tree path, then this one."""
        held, self.held, self.used, self.acc = self.held, [], [], None
        self.path = "tree"
        out: Outbox = []
        for h in held + [info]:
            if self.done:
                break
            out += self._place(h)
        return out

    # --- the tree path -----------------------------------------------------------------------

    def _place_in_tree(self, info: ObjectInfo, arr: np.ndarray) -> Outbox:
        if self.head is None:
            # every slot works on C-order bytes with this canonical header
            self.head = bytes(serialize(np.empty(arr.shape, arr.dtype))[0])
            self.sizes = (len(self.head), info.sizes[1])
        out: Outbox = []
        if not self.slots:
            n = self.num
            k = self.size_to_k(info.sizes[1])
            m = self.size_to_chunks(self.sizes) if self.size_to_chunks is not None else 0
            if self.small and star_cheaper(n, k, m):
                out += self._star()
            else:
                parent, self.order = tree_chain(n, tree_depth(n, k))
                self.slots = [_Slot(i, p) for i, p in enumerate(parent)]
                for slot in self.slots:
                    if slot.parent is not None:
                        self.slots[slot.parent].children.append(slot.index)
        self.used.append(info.object_id)
        live = [h for h in info.holders if h not in self.dead]
        rank = live[0] if live else self.target
        slot = self._choose_slot(rank)
        slot.info, slot.rank = info, rank
        if self.allreduce and rank != self.target and rank not in self.pending_fetch:
            self.pending_fetch.add(rank)
            sender = None
            if self.direct_fetch and self.size_to_chunks is not None \
                    and self.size_to_chunks(self.sizes) == 1:
                sender = ObjectInfo(self.result_id, self.sizes, (self.target,))
            out.append((rank, Fetch(self.result_id, self.reduce_id, sender=sender)))
        if slot.late:
            if rank != self.target and info.inline is None and (
                    not arr.flags.c_contiguous or tuple(info.sizes) != self.sizes):
                # the accumulator pulls raw C-order bytes with the canonical header (a read-only
                # array's pickle is a byte longer, READONLY_BUFFER): a leaf step on ``rank``
                # makes them
                slot.out_id = self.new_id()
                self.intermediates.append((rank, slot.out_id))
                out.append((rank, ReduceStep(self.reduce_id, slot.out_id, info, (), self.op, False,
                                             self.sizes, start=self.start)))
                info = ObjectInfo(slot.out_id, self.sizes, (rank,))
            return out + [(self.target, ReduceLate(self.reduce_id, self.final_id, info, rank))]
        slot.out_id = self.final_id if (slot.parent is None and rank == self.target) else self.new_id()
        out += self._start_ready()
        if self.num - len(self.used) == 1:
            out += self._accumulate()
        return out

    def _step_done(self, msg: ReduceStepDone) -> Outbox:
        """A slot's output is complete; the result's completion finishes the reduce."""
        if self.done or msg.reduce_id != self.reduce_id:
            return []     # (a message of an abandoned attempt)
        if msg.error is not None:
            if msg.lost >= 0 and msg.lost not in self.dead:
                return self._rank_lost(msg.lost)
            if msg.lost < 0:
                return self._fail_with(msg.error)
            return []
        if msg.out_id != self.result_id:
            return []
        self.result_done = True
        self.result = ObjectInfo(self.result_id, msg.sizes, (msg.rank,), head=self.head)
        return self._maybe_finish()

    def _fetched(self, rank: int, error: Optional[str]) -> Outbox:
        """(allreduce) ``rank`` holds the result."""
        self.pending_fetch.discard(rank)
        if error is not None and not self.done:
            return self._fail(HopliteError(f"allreduce: rank {rank} could not get the result: {error}"))
        return self._maybe_finish()

    def _rank_lost(self, rank: int) -> Outbox:
        """``rank`` died.  If it held the target, the reduce fails with :class:`HopliteError`
        naming the rank.  If it held a placed input or a step, the attempt is abandoned and the
        reduce planned again (Hoplite §4: re-plan around the failure): every input's info is
        asked for anew (:class:`Replanned`, :class:`WatchInputs`; a copy elsewhere, or lineage re-runs its task, or it
        fails with ObjectLostError) once the target said how much of the result it had given out
        (``ReduceResume``; the new tree skips those chunks), and the new tree's final step
        completes the old result entry on the target (readers of it just wait).  A first-k
        reduce whose k inputs were all chosen keeps them (chunks already given out must not
        change); one still choosing takes the next arrivals, backups included.  An allreduce no
        longer waits for ``rank``."""
        if self.done:
            return []
        self.dead.add(rank)
        self.pending_fetch.discard(rank)
        if rank == self.target and not self.result_done:
            return self._fail(HopliteError(
                f"reduce {format_id(self.result_id)}: its target rank {rank} died"))
        if self.result_done or rank not in self._ranks():
            return self._maybe_finish()
        return self._restart()

    def _ranks(self) -> set[int]:
        """Ranks of this attempt's steps and placed inputs."""
        ranks = {s.rank for s in self.slots if s.rank is not None}
        return ranks | ({self.copy_step.rank} if self.copy_step is not None else set())

    def _restart(self) -> Outbox:
        old = self.reduce_id
        out = self._aborts(resume=True)
        asked = any(rank == self.target for rank, _ in out)    # it answers with ReduceResume
        self.reduce_id = self.new_id()
        self.attempts.append(self.reduce_id)
        self.final_id = self.new_id()
        self.retired += self.intermediates
        self.intermediates = []
        if len(self.used) == self.num < len(self.inputs):
            self.inputs = list(self.used)      # the chosen subset stays chosen
        self.used, self.slots, self.order, self.copy_step = [], [], [], None
        if asked:       # the new tree is planned once the target says where the result stands
            self.awaiting = old
        else:
            self._wants_inputs = True
        return out

    def _resume(self, reduce_id: int, progress: int) -> Outbox:
        """(ReduceResume from the target, after the abort of attempt ``reduce_id``) The result
        entry gave out its first ``progress`` bytes: those are complete reductions of the same
        inputs, so the next attempt's steps pull and combine only the chunks after them (Hoplite
        §4's "ancestors re-pull", from the target's progress instead of from scratch).  Then
        every input's info is asked for again (:class:`Replanned`, :class:`WatchInputs`)."""
        if self.done or reduce_id != self.awaiting:
            return []
        self.awaiting = None
        self.start = max(self.start, progress)
        self._wants_inputs = True
        return []

    # --- internals ---------------------------------------------------------------------------

    def _choose_slot(self, rank: int) -> _Slot:
        free = [i for i in self.order if self.slots[i].info is None]
        root = self.slots[self.order[-1]]
        if rank == self.target and root.info is None:
            return root
        non_root = [i for i in free if i != root.index]
        # keep the root for a later input on the target rank unless this is the last slot
        return self.slots[non_root[0]] if non_root else root

    def _start_ready(self) -> Outbox:
        out: Outbox = []
        for slot in self.slots:
            if slot.started or slot.info is None:
                continue
            if any(self.slots[c].info is None for c in slot.children):
                continue
            slot.started = True
            children = tuple((self.slots[c].rank, self.slots[c].out_id) for c in slot.children)
            final = slot.out_id == self.final_id
            out.append((slot.rank, ReduceStep(self.reduce_id, slot.out_id, slot.info, children,
                                              self.op, final, self.sizes, adopt=self._adopt(final),
                                              start=self.start)))
            if not final:
                self.intermediates.append((slot.rank, slot.out_id))
            if slot.parent is None and not final:   # the root's output is copied to the target
                self.copy_step = _Slot(-1, None, rank=self.target, out_id=self.final_id, started=True)
                out.append((self.target, ReduceStep(self.reduce_id, self.final_id, None,
                                                    ((slot.rank, slot.out_id),), self.op, True,
                                                    self.sizes, adopt=self._adopt(True),
                                                    start=self.start)))
        return out

    def _star(self) -> Outbox:
        """(mid-size objects, see :func:`star_cheaper`) Every slot is late: the target's step
        starts now as an accumulator of all ``num`` inputs, and each input, once placed, is
        pulled by it directly (``ReduceLate``), with no step on the input's rank."""
        n = self.num
        self.slots = [_Slot(i, None, started=True, late=True) for i in range(n)]
        self.order = list(range(n))
        self.copy_step = _Slot(-1, None, rank=self.target, out_id=self.final_id, started=True)
        return [(self.target, ReduceStep(self.reduce_id, self.final_id, None, (), self.op, True,
                                         self.sizes, late=n, head=self.head,
                                         adopt=self._adopt(True), start=self.start))]

    def _accumulate(self) -> Outbox:
        """One input is still to come: start the target's step now, with the children of the
        free slot as its own, and mark that slot late (see the module docstring)."""
        last = next(self.slots[i] for i in self.order if self.slots[i].info is None)
        root = self.slots[self.order[-1]]
        last.late = last.started = True
        if last is root:            # the target holds no root input: its copy step accumulates
            acc = self.copy_step = _Slot(-1, None, list(root.children), rank=self.target,
                                         out_id=self.final_id)
        else:                       # the root is the target's input; ``last`` is one of its children
            acc = root
            acc.children = [c for c in root.children if c != last.index] + last.children
        acc.started = True
        children = tuple((self.slots[c].rank, self.slots[c].out_id) for c in acc.children)
        return [(self.target, ReduceStep(self.reduce_id, self.final_id, acc.info, children, self.op,
                                         True, self.sizes, late=1, head=self.head,
                                         adopt=self._adopt(True), start=self.start))]

    def _adopt(self, final: bool) -> int:
        return self.result_id if final and self.final_id != self.result_id else 0

    def _frees(self) -> Outbox:
        return [(rank, Free(oid)) for rank, oid in self.intermediates + self.retired
                if rank not in self.dead]

    def _maybe_finish(self) -> Outbox:
        if not self.result_done or self.pending_fetch or self.done:
            return []
        self.done = True
        return self._frees()

    def _fail(self, exc: BaseException) -> Outbox:
        return self._fail_with(to_bytes(local_error(exc)))

    def _fail_with(self, error: tuple) -> Outbox:
        self.done = True
        self.result = error_info(self.result_id, error)
        out: Outbox = [(r, DirAdd(self.result)) for r in self.shard_ranks(self.result_id)]
        return out + self._aborts() + self._frees()

    def _aborts(self, resume: bool = False) -> Outbox:
        """Abandon this attempt's steps: the target's first (it stops giving out its output;
        ``resume``: it answers with :class:`ReduceResume`), which then tells the others (they
        drain their streams)."""
        ranks = self._ranks() - self.dead
        if self.target in ranks:
            return [(self.target, ReduceAbort(self.reduce_id, tuple(sorted(ranks - {self.target})),
                                              self.result_id if resume else 0))]
        return [(rank, ReduceAbort(self.reduce_id)) for rank in sorted(ranks)]
