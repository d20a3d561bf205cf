"""The driver's side of a durable workflow (issue 14): which of its objects have durable keys
(lineage), how often each call occurred, which steps earlier runs committed, and counters.

Thread-safe (tasks may be submitted from several driver threads); no MPI, no engine.
"""
from __future__ import annotations

import collections
import itertools
import logging
import os
import socket
import sys
import threading
import time
from typing import Any, Callable, Optional

from . import keys as K
from . import storage

log = logging.getLogger("hoplite_mpi")
_runs = itertools.count()


class Workflow:
    """State of the durable workflow stored under ``root`` (an absolute directory path).

    Counters (:attr:`stats`): ``restored`` (checkpointed tasks not executed: their results
    were read from storage), ``checkpointed`` (checkpointed tasks submitted for execution),
    ``persisted`` (steps committed by this run), ``persist_dups`` (a step some other attempt
    had committed first), ``persist_failed``, ``unkeyed`` (checkpointed tasks run without a
    checkpoint: an argument without a stable key), ``committed_at_start`` (steps found),
    ``reread`` (lost objects read back from storage instead of re-running their task).
    """

    def __init__(self, root: str, sync: bool = True) -> None:
        self.root = storage.open_root(root)
        self.sync = sync
        self.committed = storage.committed_keys(self.root)
        self._lock = threading.Lock()
        self.run = (f"{time.strftime('%Y%m%dT%H%M%S')}-{socket.gethostname()}-{os.getpid()}"
                    f"-{next(_runs)}")
        self._record = {
            "run": self.run, "argv": list(sys.argv), "host": socket.gethostname(),
            "pid": os.getpid(), "start": time.time(), "status": "running",
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0)}
        storage.write_json(self._path(".json"), self._record)
        self._keys_log = open(self._path(".keys"), "a", buffering=1)   # (a line per write)
        self._keys: dict[int, str] = {}          # object id -> durable key
        self._occurrences: collections.Counter = collections.Counter()
        self._warned: set = set()
        self.stats: collections.Counter = collections.Counter()
        self.stats["committed_at_start"] = len(self.committed)
        self.running: set[int] = set()        # checkpointed tasks submitted, not finished
        self.unpersisted: set[int] = set()    # finished, their commit not reported yet

    def _path(self, ext: str) -> str:
        return os.path.join(self.root, "runs", self.run + ext)

    def used(self, key: str) -> None:
        """Record that this run restored or committed step ``key`` (its keys log: gc roots)."""
        with self._lock:
            if not self._keys_log.closed:
                self._keys_log.write(key + "\n")

    def close(self, status: str) -> None:
        """Record the end of the run (``ended``: the runtime shut down; ``drained``) with its
        counters.  A run whose driver was killed stays ``running``."""
        with self._lock:
            if self._keys_log.closed:
                return
            self._keys_log.close()
        self._record.update(status=status, end=time.time(), **self.snapshot())
        try:
            storage.write_json(self._path(".json"), self._record)
        except OSError as exc:
            log.warning("cannot record the end of run %s: %s", self.run, exc)

    # --- keys --------------------------------------------------------------------------------

    def ref_key(self, ref: Any) -> str:
        """The durable key of an ObjectRef made or put on this driver.  Raises UnstableKey."""
        key = self._keys.get(ref.id)
        if key is None:
            raise K.UnstableKey("an ObjectRef with no durable key (a reduce/broadcast result, a "
                                "nested task's result, or a ref made before storage was attached)")
        return key

    def call_key(self, fn_key: bytes, args: tuple, kwargs: dict, name: Optional[str]) -> str:
        """The key of this submission (the next occurrence of the call): by function and
        arguments, or by ``name`` when the user named the step.  Raises UnstableKey."""
        if name is not None:
            ident = K.call_digest(b"name", name.encode())
        else:
            digest = K.value_digest((args, sorted(kwargs.items())), self.ref_key)
            ident = K.call_digest(fn_key, digest)
        with self._lock:
            n = self._occurrences[ident]
            self._occurrences[ident] = n + 1
        return K.named_key(name, n) if name is not None else K.task_key(fn_key, digest, n)

    def made(self, first_id: int, key: str, num_returns: int) -> None:
        """Task ``key``'s return values are objects ``first_id ..``: record their keys."""
        with self._lock:
            for i in range(num_returns):
                self._keys[first_id + i] = K.output_key(key, i)

    def put(self, object_id: int, value: Any) -> None:
        """A ``put`` value: its key is its content's digest (no key if it has none)."""
        try:
            key = K.put_key(K.value_digest(value, self.ref_key))
        except K.UnstableKey:
            return
        with self._lock:
            self._keys[object_id] = key

    def forget(self, object_ids: list[int]) -> None:
        with self._lock:
            for oid in object_ids:
                self._keys.pop(oid, None)

    def unkeyed(self, what: str, why: Exception) -> None:
        """A checkpointed task runs without a checkpoint; warn once per function."""
        self.stats["unkeyed"] += 1
        if what not in self._warned:
            self._warned.add(what)
            log.warning("task %s runs without a checkpoint: %s has no stable durable key (%s)",
                        what, "an argument" if "ObjectRef" not in str(why) else "a ref argument", why)

    def named_steps(self, prefix: str = "") -> dict[str, str]:
        """Named steps (``.options(name=..., checkpoint=True)``) committed before this run
        started, whose name starts with ``prefix``: name -> key of its first occurrence.
        Reads the headers of the committed manifests (once per call)."""
        out: dict[str, str] = {}
        for key in sorted(self.committed):
            try:
                header, _, _ = storage.read_header(self.root, key)
            except (OSError, storage.StorageError):
                continue
            name = header.get("name", "")
            if header.get("named") and name.startswith(prefix) and key == K.named_key(name, 0):
                out[name] = key
        return out

    # --- results -----------------------------------------------------------------------------

    def restore(self, key: str) -> Optional[list]:
        """The frames of each return value of committed step ``key``, or None if it was not
        committed by an earlier run (or cannot be read: logged, the task runs again)."""
        if key not in self.committed:
            return None
        try:
            frames = storage.load(self.root, key)
        except (storage.StorageError, OSError) as exc:
            log.warning("checkpoint %s cannot be read (%s); its task runs again", key, exc)
            return None
        if frames is not None:
            self.stats["restored"] += 1
            self.used(key)
        return frames

    def submitted(self, task_id: int) -> None:
        """A checkpointed task was submitted for execution."""
        self.stats["checkpointed"] += 1
        with self._lock:
            self.running.add(task_id)

    def task_done(self, task_id: int, ok: bool) -> None:
        """(engine thread) A task finished (``ok``: no error result, so a commit will be
        reported)."""
        with self._lock:
            if task_id in self.running:
                self.running.discard(task_id)
                if ok:
                    self.unpersisted.add(task_id)

    def persisted(self, task_id: int, key: str, ok: bool, committed: bool) -> None:
        """(engine thread) A worker's report of a commit attempt (after its TaskDone)."""
        self.stats["persisted" if ok and committed else "persist_dups" if ok else "persist_failed"] += 1
        if ok:
            self.used(key)
        with self._lock:
            self.unpersisted.discard(task_id)

    def snapshot(self) -> dict:
        return {"root": self.root, "run": self.run, **{k: self.stats.get(k, 0) for k in (
            "restored", "checkpointed", "persisted", "persist_dups", "persist_failed", "unkeyed",
            "committed_at_start", "reread")}}


def attach(current: Optional[Workflow], root: str, sync: bool, on_new: Callable[[Workflow], None]
           ) -> Workflow:
    """The workflow of ``root``: ``current`` if it is that one, else a new one passed to
    ``on_new``.  Raises ValueError if ``current`` is another directory."""
    if current is not None:
        if current.root != os.path.abspath(root):
            raise ValueError(f"this runtime's durable storage is {current.root}; it cannot change "
                             f"to {os.path.abspath(root)} while running")
        return current
    wf = Workflow(root, sync)
    on_new(wf)
    return wf
