"""Test hooks: deep access to this process's runtime, for tests that must read or disturb
internals the API does not show (e.g. corrupt a stored copy, read a store entry's memory
address, the shard map).  Not part of the API: what a runtime's components offer may change
between versions.  Programs use :mod:`hoplite_mpi.introspection` (``hm.stats()``,
``hm.locations()``, ...) instead.
"""
from __future__ import annotations

from typing import Any

from . import session


def runtime() -> Any:
    """This process's running :class:`~hoplite_mpi.runtime.Runtime` (its public components:
    ``store``, ``catalog``, ``fetcher``, ``lookups``, ``scheduler``, ``shards``, ...).  Raises
    NotInitializedError / RuntimeShutdownError without one."""
    return session.current()
