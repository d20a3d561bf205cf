"""The public API, one import away: ``init``/``shutdown``, ``@remote``, ``get``/``wait``/``put``/
``delete``, ``ObjectRef``, the collectives and introspection.

A facade: each name is defined in the module of its responsibility and re-exported here, so
``hoplite_mpi.api.<name>`` keeps working:

- :mod:`hoplite_mpi.session`: init, shutdown, is_initialized, rank, world_size;
- :mod:`hoplite_mpi.objectref`: ObjectRef;
- :mod:`hoplite_mpi.values`: put, get, wait, delete;
- :mod:`hoplite_mpi.remote_functions`: remote, RemoteFunction, submit_task;
- :mod:`hoplite_mpi.collective_api`: broadcast, reduce, allreduce, reduced_inputs;
- :mod:`hoplite_mpi.introspection`: stats, locations, object_info, ObjectLocation, is_local,
  dead_ranks, current_config;
- :mod:`hoplite_mpi.worker`: task_key; :mod:`hoplite_mpi.durable_api`: lookup, checkpoints
  (durable workflows, :mod:`hoplite_mpi.durable`).
"""
from __future__ import annotations

from .collective_api import allreduce, broadcast, reduce, reduced_inputs
from .durable_api import checkpoints, lookup
from .progressbars import as_completed, progress
from .timeline_api import timeline
from .introspection import (ObjectLocation, current_config, dead_ranks, is_local, locations,
                            object_info, stats)
from .objectref import ObjectRef
from .remote_functions import RemoteFunction, remote, submit_task
from .session import init, is_initialized, rank, shutdown, world_size
from .values import delete, get, put, wait
from .worker import task_key

__all__ = [
    "init", "shutdown", "is_initialized", "rank", "world_size",
    "ObjectRef", "put", "get", "wait", "delete",
    "remote", "RemoteFunction", "submit_task",
    "broadcast", "reduce", "allreduce", "reduced_inputs",
    "stats", "locations", "object_info", "ObjectLocation", "is_local", "dead_ranks",
    "current_config", "task_key", "lookup", "checkpoints", "as_completed", "progress",
    "timeline",
]
