"""This process's runtime: start, publish, shut down; ``init``/``shutdown`` and the lifecycle
queries of the API (``is_initialized``, ``rank``, ``world_size``).

The only module that holds the process-wide runtime state (the running
:class:`~hoplite_mpi.runtime.Runtime`, the lock that guards starting it, whether it was shut down,
whether a rank died).  The API modules and the Executor call the functions here; nothing else
reads or writes that state.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from typing import Any, Optional

from . import debug
from .config import Config
from .errors import NotInitializedError, RuntimeShutdownError

log = logging.getLogger("hoplite_mpi")

_runtime = None          # the Runtime of this process, if any
_lock = threading.RLock()
_ranks_died = False      # the driver saw a rank die, or did not shut down cleanly (set by shutdown)
_shut_down = False       # shutdown() ended this process's runtime (API calls: RuntimeShutdownError)


# --- the runtime of this process ---------------------------------------------------------------

def current() -> Any:
    """The running Runtime of this process.

    Raises RuntimeShutdownError after :func:`shutdown`, else NotInitializedError without one."""
    rt = _runtime
    if rt is None:
        if _shut_down:
            raise RuntimeShutdownError("the hoplite_mpi runtime was shut down (hoplite_mpi.shutdown())")
        raise NotInitializedError("hoplite_mpi is not initialised: call hoplite_mpi.init() first "
                                  "(or run the script with `python -m hoplite_mpi`)")
    return rt


def current_or_none() -> Optional[Any]:
    """The running Runtime of this process, or None."""
    return _runtime


def install(rt: Any) -> Any:
    """(simulation, tests) Make ``rt`` this process's runtime, for the API calls that follow
    (several simulated ranks share one process: each task runs with its rank's runtime);
    returns the runtime installed before (None if none), to be installed again after."""
    global _runtime
    with _lock:
        previous, _runtime = _runtime, rt
    return previous


def is_initialized() -> bool:
    """Whether this process has a running runtime."""
    return _runtime is not None


def ranks_died() -> bool:
    """(driver) Whether a rank died or the runtime did not shut down cleanly: the process must
    then leave without MPI_Finalize (:func:`exit_now`)."""
    return _ranks_died


def _setup_logging(config: Config, rank: int) -> None:
    log.setLevel(config.log_level.upper())
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"[hoplite_mpi rank {rank}] %(levelname)s %(message)s"))
        log.addHandler(handler)


def _start(comm: Any, root: int, options: dict) -> Any:
    """Create and start the runtime on a private copy of ``comm`` (collective over ``comm``);
    call with ``_lock`` held.

    The runtime is published as this process's before its engine starts: a task the engine runs
    at once may call the API (``hm.rank()``, ``hm.get``, ``f.remote``)."""
    global _runtime, _shut_down
    from mpi4py import MPI

    from .runtime import Runtime

    config = Config.from_sources(options)
    if MPI.Query_thread() < MPI.THREAD_SERIALIZED:
        raise RuntimeError("hoplite_mpi needs MPI initialised with thread level SERIALIZED or MULTIPLE "
                           "(mpi4py's default is MULTIPLE; do not lower mpi4py.rc.thread_level)")
    if comm is None:
        comm = MPI.COMM_WORLD
    if not 0 <= root < comm.Get_size():
        raise ValueError(f"root must be within 0..{comm.Get_size() - 1}, got {root}")
    # rank `root` of comm becomes rank 0 (the driver) of the runtime's communicator
    own = comm.Split(0, (comm.Get_rank() - root) % comm.Get_size())
    _setup_logging(config, own.Get_rank())
    rt = Runtime(own, config)
    if rt.rank == 0 and rt.size > 1 and not rt.transport.ft:
        from .transport.mpi import ulfm_status
        log.warning("rank-loss tolerance: %s", ulfm_status())
    _runtime = rt
    _shut_down = False
    return rt.start()


def start_or_join(comm: Any, root: int, options: dict) -> tuple[Any, bool]:
    """(Executor, ``comm`` mode) The running runtime, or a new one started on ``comm`` with
    ``root`` as its driver (collective over ``comm``).  Returns ``(runtime, started_here)``."""
    with _lock:
        if _runtime is not None:
            return _runtime, False
        return _start(comm, root, options), True


def served(rt: Any) -> None:
    """A non-driver rank finished serving ``rt`` (the driver shut it down): this process has no
    runtime any more."""
    global _runtime
    with _lock:
        if _runtime is rt:
            _runtime = None


# --- init / shutdown ---------------------------------------------------------------------------

def init(comm: Any = None, **options: Any) -> None:
    """Start hoplite_mpi on every rank of ``comm`` (default ``MPI.COMM_WORLD``); collective.

    Rank 0 returns (it is the driver).  Every other rank serves tasks until the driver calls
    :func:`shutdown` (or exits), then exits the process with status 0, so code after ``init()`` runs
    on rank 0 only.  Idempotent: a second call returns at once, except that ``storage=DIR``
    given on the driver of a running runtime (a script run by ``python -m hoplite_mpi``)
    attaches that durable storage (ValueError if another one is attached).

    Args:
        comm: an ``mpi4py.MPI.Comm``; the runtime works on a private copy (``comm.Split``).
        **options: fields of :class:`~hoplite_mpi.config.Config` (also ``HOPLITE_MPI_*`` env vars).

    Raises:
        TypeError / ValueError: an unknown option or a bad value (on every rank, before any
            communication).
        RuntimeError: MPI was initialised with a thread level below SERIALIZED.
    """
    with _lock:
        if _runtime is not None:
            if options.get("storage") and _runtime.rank == 0:
                _runtime.attach_storage(options["storage"], bool(options.get(
                    "storage_sync", _runtime.config.storage_sync)))
            return
        rt = _start(comm, 0, options)
    debug.install(rt)        # kill -USR1 / -USR2 <pid>: where this rank is (hoplite_mpi/debug.py)
    if rt.rank == 0:
        atexit.register(_finalize_after_rank_loss)   # (runs after shutdown: atexit is LIFO)
        atexit.register(shutdown)
        return
    rt.serve()
    served(rt)
    if rt.dead or rt.unclean:
        exit_now(0)
    sys.exit(0)


def exit_now(status: int) -> None:
    """Leave without MPI_Finalize.  After a rank loss every survivor does so: Open MPI's finalize
    fence with a dead rank sometimes never completes under ULFM (1 run in ~20 here), and a rank
    that finalizes while others do not waits for them for ever."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(status)


def _finalize_after_rank_loss() -> None:
    """(atexit, driver) After a rank loss, exit without MPI_Finalize: status 1 if the program
    ended with an uncaught exception, else 0 (an explicit ``sys.exit(n)`` cannot be seen from an
    atexit handler; ``python -m hoplite_mpi`` passes the script's status on itself)."""
    if _ranks_died:
        exit_now(1 if getattr(sys, "last_value", None) is not None else 0)


def shutdown() -> None:
    """Driver: stop the runtime on every rank.  Refs of this runtime can no longer be resolved.

    Idempotent; does nothing on a rank that is not the driver or without a runtime.
    """
    global _runtime, _shut_down, _ranks_died
    with _lock:
        rt = _runtime
        if rt is None or rt.rank != 0:
            return
        _runtime = None
        _shut_down = True
    rt.shutdown()
    _ranks_died = _ranks_died or bool(rt.dead) or rt.unclean


def rank() -> int:
    """This process's rank in the runtime (0 = driver)."""
    return current().rank


def world_size() -> int:
    """Number of ranks of the runtime."""
    return current().size
