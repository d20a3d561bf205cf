"""Durable workflows' calls for programs (issue 14; the mechanism is in :mod:`hoplite_mpi.durable`):
:func:`lookup` and :func:`checkpoints` find named steps committed by earlier runs, e.g. the
latest weights of a training run to resume from."""
from __future__ import annotations

from typing import Optional

from . import session
from .durable.keys import named_key
from .objectref import ObjectRef
from .remote_functions import restore


def _workflow():
    rt = session.current()
    if rt.rank != 0 or rt.workflow is None:
        raise RuntimeError("no durable storage on this rank: hm.init(storage=DIR) on the driver "
                           "(or HOPLITE_MPI_STORAGE) first")
    return rt, rt.workflow


def lookup(name: str) -> Optional[ObjectRef]:
    """The result of the named step ``name`` (the first ``f.options(name=name,
    checkpoint=True)`` task of a run) if an earlier run committed it, as a ready ref whose value
    is read from storage when used; else None.  For a step of several return values, the
    first one's ref.  Raises RuntimeError without durable storage (driver only)."""
    rt, wf = _workflow()
    refs = restore(rt, wf, named_key(name, 0))
    return refs[0] if refs else None


def checkpoints(prefix: str = "") -> list[str]:
    """Names of the named steps committed before this run started, that start with
    ``prefix``, sorted.  Raises RuntimeError without durable storage (driver only)."""
    _, wf = _workflow()
    return sorted(wf.named_steps(prefix))
