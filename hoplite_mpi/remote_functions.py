"""Remote functions: ``@remote``, :class:`RemoteFunction`, and submitting a task
(:func:`submit_task`, also used by the Executor)."""
from __future__ import annotations

import hashlib
import logging
import pickle
from typing import Any, Callable, Optional, overload

from . import session
from .durable.keys import UnstableKey, function_key
from .errors import SerializationError
from .objectref import ObjectRef, new_refs
from .protocol import TaskSpec
from .serialization import dumps
from .values import put
from .worker import DepPlaceholder

log = logging.getLogger("hoplite_mpi")

_TASK_OPTIONS = ("num_returns", "max_retries", "rank", "name", "inline_threshold", "replicas",
                 "strict_rank", "checkpoint", "version")


def check_options(options: dict) -> None:
    """Types and ranges of task options (the pinned rank is checked against the runtime at submit)."""
    unknown = set(options) - set(_TASK_OPTIONS)
    if unknown:
        raise TypeError(f"unknown task option(s) {sorted(unknown)}; known: {list(_TASK_OPTIONS)}")
    n = options.get("num_returns", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"num_returns must be an int >= 1, got {n!r}")
    r = options.get("max_retries", 3)
    if not isinstance(r, int) or isinstance(r, bool) or r < 0:
        raise ValueError(f"max_retries must be an int >= 0, got {r!r}")
    rank_ = options.get("rank")
    if rank_ is not None:
        if not isinstance(rank_, int) or isinstance(rank_, bool):
            raise TypeError(f"rank must be an int, got {rank_!r}")
    if not isinstance(options.get("strict_rank", False), bool):
        raise TypeError(f"strict_rank must be a bool, got {options['strict_rank']!r}")
    if not isinstance(options.get("checkpoint", False), bool):
        raise TypeError(f"checkpoint must be a bool, got {options['checkpoint']!r}")
    v = options.get("version")
    if v is not None and not isinstance(v, (str, int)):
        raise TypeError(f"version must be a str or int, got {v!r}")
    t = options.get("inline_threshold")
    if t is not None and (not isinstance(t, int) or isinstance(t, bool) or t < 0):
        raise ValueError(f"inline_threshold must be an int >= 0 (bytes), got {t!r}")
    c = options.get("replicas")
    if c is not None and (not isinstance(c, int) or isinstance(c, bool) or c < 1):
        raise ValueError(f"replicas must be an int >= 1 (copies of each result), got {c!r}")


def fn_identity(fn: Callable, what: str) -> tuple[bytes, bytes]:
    """``(id, pickled fn)`` of a function: the id (a hash of the pickle) lets the scheduler and
    workers keep the function after its first task.  Raises SerializationError naming ``what``."""
    blob = dumps(fn, what)
    return hashlib.blake2b(blob, digest_size=16).digest(), blob


_PLAIN = frozenset({int, float, str, bytes, bool, type(None), DepPlaceholder})


def _pack_args(rt: Any, name: str, args: tuple, kwargs: dict, keep: list
               ) -> tuple[bytes, tuple[int, ...]]:
    """Pickle (args, kwargs), top-level refs replaced by placeholders; large values become
    objects of their own (``put``; their refs are appended to ``keep``, which the caller holds
    until the task is submitted, else they would be freed at once).  Raises SerializationError."""
    deps: list[int] = []

    def sub(value: Any) -> Any:
        if isinstance(value, ObjectRef):
            deps.append(value.id)
            return DepPlaceholder(len(deps) - 1)
        return value

    packed_args = [sub(a) for a in args]
    packed_kwargs = {k: sub(v) for k, v in kwargs.items()}
    if all(type(a) in _PLAIN for a in packed_args) and all(type(v) in _PLAIN for v in packed_kwargs.values()):
        # fast path (most fine-grained tasks): the C pickler gives the same bytes for these types
        # as cloudpickle, without building a cloudpickle Pickler per task
        blob = pickle.dumps((packed_args, packed_kwargs), protocol=5)
        if len(blob) <= rt.config.inline_threshold:
            return blob, tuple(deps)
    try:
        blob = dumps((packed_args, packed_kwargs), "arguments")
    except SerializationError:
        for i, a in enumerate(args):
            dumps(a, f"argument {i} of {name}")          # raises, naming the culprit
        for k, v in kwargs.items():
            dumps(v, f"keyword argument {k!r} of {name}")
        raise
    if len(blob) > rt.config.inline_threshold:
        def big(value: Any) -> Any:
            if isinstance(value, DepPlaceholder):
                return value
            if len(dumps(value, "argument")) > rt.config.inline_threshold // 4:
                keep.append(put(value))
                return sub(keep[-1])
            return value
        packed_args = [big(a) for a in packed_args]
        packed_kwargs = {k: big(v) for k, v in packed_kwargs.items()}
        blob = dumps((packed_args, packed_kwargs), "arguments")
    return blob, tuple(deps)


class RemoteFunction:
    """A function made remote with :func:`remote`.  ``f.remote(*args, **kwargs)`` submits a task."""

    def __init__(self, fn: Callable, options: dict) -> None:
        if not callable(fn):
            raise TypeError(f"remote() needs a callable, got {fn!r}")
        check_options(options)
        self._fn = fn
        self._options = dict(options)
        self._identity: Optional[tuple[bytes, bytes]] = None
        self._durable_key: Optional[bytes] = None     # keys.function_key, when storage is on
        self.__name__ = getattr(fn, "__name__", "task")
        self.__doc__ = getattr(fn, "__doc__", None)
        self.__wrapped__ = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"remote function {self.__name__} cannot be called directly: use "
                        f"{self.__name__}.remote(...)")

    def options(self, **options: Any) -> "RemoteFunction":
        """A copy with other task options: ``num_returns``, ``max_retries``, ``rank``, ``name``,
        ``inline_threshold`` (bytes; results up to this size travel in-band through the
        scheduler on rank 0 to the tasks that use them, larger ones stay in the worker's store
        and move worker-to-worker; ``0`` keeps every result off rank 0, e.g. a shuffle's
        intermediate data; default ``Config.inline_threshold``), ``replicas`` (copies of each
        chunked result, made in the background on other ranks and re-made when a holder dies;
        losing ``replicas - 1`` ranks then re-runs nothing; default ``Config.replication``;
        ValueError at submit if more than the ranks of the job), ``strict_rank`` (with ``rank``:
        default False, pinning is placement: when every copy of a finished result is lost with
        its rank, lineage re-runs the task on another rank; True: the task may only ever run on
        ``rank``, and such a result raises ObjectLostError instead).  A pinned task whose rank
        dies *while it runs* fails with RankLostError either way."""
        check_options(options)
        other = RemoteFunction(self._fn, {**self._options, **options})
        other._identity = self._identity
        if "version" not in options:
            other._durable_key = self._durable_key
        return other

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Submit a task; returns an ObjectRef at once (a list of them if ``num_returns > 1``).

        Raises (at call time, nothing submitted): SerializationError naming the function or the
        argument that cannot be pickled; ValueError for a ``rank`` that is not a worker rank.
        """
        if self._identity is None:
            self._identity = fn_identity(self._fn, f"function {self.__name__}")
        rt = session.current()
        if rt.rank == 0 and rt.workflow is not None and self._durable_key is None:
            try:
                version = self._options.get("version")
                self._durable_key = function_key(self._fn, None if version is None else str(version))
            except UnstableKey:
                self._durable_key = b""
        return submit_task(rt, self._identity, self.__name__, args, kwargs, self._options,
                           fn_key=self._durable_key)


def submit_task(rt: Any, identity: tuple[bytes, bytes], name: str, args: tuple, kwargs: dict,
                options: dict, allowed: Optional[tuple[int, ...]] = None,
                init: Optional[tuple[bytes, bytes]] = None, original_errors: bool = False,
                fn_key: Optional[bytes] = None) -> Any:
    """Build a TaskSpec and hand it to the scheduler; returns the ref(s).  ``options`` were
    checked by :func:`check_options` already; only the pinned rank is checked here.
    ``original_errors`` (Executor): a return value that cannot be pickled fails the ref with
    the pickler's own exception instead of SerializationError.  ``fn_key``: the function's
    durable key (keys.function_key; b"": it has none), given on the driver with storage on.

    Durable workflows (issue 14): with storage attached on the driver, every task submitted
    there gets a durable key (the keys of its ref arguments come from their producers).  A
    checkpointed one whose key an earlier run committed is not submitted: its refs are ready
    at once, their values memory-mapped from storage (read only when used)."""
    pinned = options.get("rank")
    if pinned is not None and pinned not in rt.worker_ranks:
        raise ValueError(f"rank={pinned} is not a worker rank (worker ranks: {list(rt.worker_ranks)})")
    copies = options.get("replicas")
    if copies is not None and copies > rt.size:
        raise ValueError(f"replicas={copies} exceeds the number of ranks ({rt.size})")
    # (fn_key None: a caller without durable keys, the Executor: its tasks are not checkpointed)
    workflow = rt.workflow if rt.rank == 0 and fn_key is not None else None
    key = None
    if workflow is not None:
        key, restored = _durable(rt, workflow, fn_key, name, args, kwargs, options)
        if restored is not None:
            return restored
    fn_id, fn_blob = identity
    keep: list = []   # refs of arguments stored as objects: alive while a result ref is
    args_blob, deps = _pack_args(rt, name, args, kwargs, keep)
    num_returns = options.get("num_returns", 1)
    task_id = rt.ids.next(num_returns)
    sent = rt.sent_blobs
    spec = TaskSpec(
        task_id=task_id, num_returns=num_returns, fn_id=fn_id,
        fn_blob=None if fn_id in sent else fn_blob, args_blob=args_blob, deps=deps,
        owner=rt.rank, name=options.get("name", name), rank=options.get("rank"), allowed=allowed,
        max_retries=options.get("max_retries", 3),
        inline_threshold=options.get("inline_threshold"), replicas=options.get("replicas"),
        strict_rank=bool(options.get("strict_rank", False)),
        init_id=init[0] if init else None,
        init_blob=init[1] if init and init[0] not in sent else None,
        durable=((workflow.root, key, "name" in options, workflow.sync)
                 if key is not None and _checkpointed(rt, options) else None))
    if key is not None:
        workflow.made(task_id, key, num_returns)
        if spec.durable is not None:
            workflow.submitted(task_id)
    sent.add(fn_id)
    if init:
        sent.add(init[0])
    refs = new_refs(rt, task_id, num_returns, task_id, original_errors)
    if keep:
        # the arguments stored as objects live as long as a result ref does: lineage may have to
        # run the task again after its result was lost with a rank (Ray pins a task's arguments
        # for its lineage too; the user holds no ref to them).  Found by a real-MPI kill soak
        # (seed 20020: ObjectLostError for a task given a large literal)
        for ref in refs:
            ref._args = keep
    rt.submit(spec)
    return refs[0] if num_returns == 1 else refs


def _checkpointed(rt: Any, options: dict) -> bool:
    return bool(options.get("checkpoint", rt.config.checkpoint))


def _durable(rt: Any, workflow: Any, fn_key: Optional[bytes], name: str, args: tuple,
             kwargs: dict, options: dict) -> tuple[Optional[str], Any]:
    """(driver, storage on) ``(key, refs)``: the task's durable key (None: it has none; a
    checkpointed task then runs without a checkpoint, with a warning), and its refs if an
    earlier run committed it (restored: not submitted), else None."""
    checkpoint = _checkpointed(rt, options)
    try:
        if not fn_key:
            raise UnstableKey("the function cannot be identified across runs")
        named = options.get("name") if checkpoint else None
        key = workflow.call_key(fn_key, args, kwargs, named)
    except UnstableKey as why:
        if checkpoint:
            workflow.unkeyed(options.get("name", name), why)
        return None, None
    if not checkpoint:
        return key, None
    refs = restore(rt, workflow, key, options.get("num_returns", 1))
    return key, (None if refs is None else refs[0] if len(refs) == 1 else refs)


def restore(rt: Any, workflow: Any, key: str, num_returns: Optional[int] = None) -> Optional[list]:
    """(driver) Ready refs for the results of committed step ``key`` (their values memory-
    mapped from storage, read when used), or None if it is not committed (or has another
    number of return values than ``num_returns``: then it runs again)."""
    stored = workflow.restore(key)
    if stored is None:
        return None
    if num_returns is not None and len(stored) != num_returns:
        log.warning("checkpoint %s has %d return values, the task %d; it runs again", key,
                    len(stored), num_returns)
        return None
    task_id = rt.ids.next(len(stored))
    for i, frames in enumerate(stored):
        rt.put(list(frames), task_id + i)
    workflow.made(task_id, key, len(stored))
    refs = new_refs(rt, task_id, len(stored), task_id, False)
    for ref in refs:
        ref.set_ready()
    return refs


@overload
def remote(fn: Callable) -> RemoteFunction: ...
@overload
def remote(**options: Any) -> Callable[[Callable], RemoteFunction]: ...


def remote(fn: Optional[Callable] = None, **options: Any) -> Any:
    """Make ``fn`` a remote function: ``@remote`` or ``@remote(num_returns=2, max_retries=3)``.

    Options: ``num_returns`` (int >= 1), ``max_retries`` (int >= 0: re-runs after the loss of the
    worker rank running the task; takes effect with rank-loss tolerance, not yet implemented),
    ``rank`` (pin to a worker rank), ``name``.  Raises TypeError/ValueError for unknown options or
    bad values.
    """
    if fn is not None:
        if options:
            raise TypeError("use @remote or @remote(**options), not both")
        return RemoteFunction(fn, {})
    check_options(options)
    return lambda f: RemoteFunction(f, options)
