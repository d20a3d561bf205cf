"""Fault injection for tests: SIGKILL this process when it reaches a named point.

Set ``HOPLITE_MPI_KILL="RANK:POINT:N"`` (several separated by ``,``): the process of runtime rank
``RANK`` kills itself with SIGKILL the ``N``-th time (1-based) it reaches ``POINT``.  Points:

``task``     a worker starts running a task
``chunk``    a data chunk has been received (any transfer: fetch, broadcast, reduce)
``serve``    a rank starts sending an object to another rank
``dir``      a directory shard applies a DirAdd
``reduce``   a rank starts a reduce step (leaf, inner slot or final copy)
``combine``  a reduce step received a chunk of a child's output (a reduce in mid-stream)
``replica``  a rank starts receiving a background replica copy
``persist``  a checkpoint write passed one of its steps (a frame file written; the manifest
             written, not yet linked: durable/storage.py)
``done``     rank 0 received a task's completion (TaskDone)

Used by the fault-injection suite (tests/test_faults.py) to kill a rank at a chosen moment of a
real ``mpirun --with-ft ulfm`` job.  Unset (the default), :func:`reached` costs one dict lookup.
"""
from __future__ import annotations

import os
import signal
import sys

POINTS = ("task", "chunk", "serve", "dir", "reduce", "combine", "replica", "persist", "done")

_plan: dict[str, int] = {}    # point -> remaining count for this rank
_rank: int | None = None


def arm(rank: int, spec: str | None = None) -> None:
    """Read the kill plan for ``rank`` (from ``spec`` or ``HOPLITE_MPI_KILL``).

    Raises ValueError for a malformed plan (unknown point, N < 1)."""
    global _rank
    _rank = rank
    _plan.clear()
    spec = os.environ.get("HOPLITE_MPI_KILL", "") if spec is None else spec
    for item in filter(None, (part.strip() for part in spec.split(","))):
        try:
            r, point, n = item.split(":")
            r, n = int(r), int(n)
        except ValueError:
            raise ValueError(f"HOPLITE_MPI_KILL item {item!r} is not RANK:POINT:N") from None
        if point not in POINTS or n < 1:
            raise ValueError(f"HOPLITE_MPI_KILL item {item!r}: point must be one of {POINTS}, N >= 1")
        if r == rank:
            _plan[point] = n


def reached(point: str) -> None:
    """Count one arrival at ``point``; SIGKILL this process if the plan says so."""
    left = _plan.get(point)
    if left is None:
        return
    if left > 1:
        _plan[point] = left - 1
        return
    # (the process's own stderr: a worker's sys.stderr forwards to rank 0, too late for a SIGKILL)
    sys.__stderr__.write(f"[hoplite_mpi rank {_rank}] fault injection: SIGKILL at {point}\n")
    sys.__stderr__.flush()
    os.kill(os.getpid(), signal.SIGKILL)
