"""hoplite_mpi: distributed futures on MPI ranks, with run-time (Hoplite) collectives.

Rank 0 runs the user's program and a dynamic scheduler; the other ranks run tasks; every rank
holds an object store and a shard of the object directory.  See README.md.
"""
from .api import (ObjectRef, RemoteFunction, allreduce, broadcast, delete, get, init, is_initialized,
                  put, rank, reduce, reduced_inputs, remote, shutdown, wait, world_size)
from .config import Config
from .errors import (BrokenExecutor, HopliteError, NotInitializedError, ObjectDeletedError,
                     ObjectLostError, RankLostError, RemoteTraceback, RuntimeShutdownError, SerializationError,
                     TaskError, TransferError, WorkerCrashedError)
from .executor import Executor

__version__ = "0.1.0"

__all__ = [
    "init", "shutdown", "is_initialized", "rank", "world_size",
    "remote", "RemoteFunction", "get", "wait", "put", "delete", "ObjectRef", "Executor", "Config",
    "broadcast", "reduce", "allreduce", "reduced_inputs",
    "HopliteError", "NotInitializedError", "ObjectDeletedError", "ObjectLostError", "RankLostError", "RemoteTraceback",
    "RuntimeShutdownError", "SerializationError", "TaskError", "TransferError", "BrokenExecutor",
    "WorkerCrashedError",
]
