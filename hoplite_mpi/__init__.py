"""hoplite_mpi: distributed futures on MPI ranks, with run-time (Hoplite) collectives.

Rank 0 runs the user's program and a dynamic scheduler; the other ranks run tasks; every rank
holds an object store and a shard of the object directory.  See README.md.
"""
from . import mpi_defaults

mpi_defaults.apply()     # (before anything imports mpi4py.MPI: it initialises MPI)

from .api import (ObjectLocation, ObjectRef, RemoteFunction, allreduce, as_completed, broadcast, checkpoints,
                  current_config, lookup,
                  dead_ranks, delete, get, init, is_initialized, is_local, locations, object_info,
                  progress, put, rank, reduce, reduced_inputs, remote, shutdown, stats, task_key, timeline, wait,
                  world_size)
from .config import Config
from .errors import (BrokenExecutor, Drained, HopliteError, NotInitializedError, ObjectDeletedError,
                     ObjectLostError, RankLostError, RemoteTraceback, RuntimeShutdownError, SerializationError,
                     TaskError, TransferError, WorkerCrashedError)
from .executor import Executor

__version__ = "0.1.0"

__all__ = [
    "init", "shutdown", "is_initialized", "rank", "world_size",
    "remote", "RemoteFunction", "get", "wait", "put", "delete", "ObjectRef", "Executor", "Config",
    "broadcast", "reduce", "allreduce", "reduced_inputs",
    "task_key", "lookup", "checkpoints", "as_completed", "progress", "timeline", "stats", "locations", "object_info", "ObjectLocation", "is_local", "dead_ranks", "current_config",
    "Drained", "HopliteError", "NotInitializedError", "ObjectDeletedError", "ObjectLostError", "RankLostError", "RemoteTraceback",
    "RuntimeShutdownError", "SerializationError", "TaskError", "TransferError", "BrokenExecutor",
    "WorkerCrashedError",
]
