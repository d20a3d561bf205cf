"""The public exception types of hoplite_mpi.

Every error a user can see derives from :class:`HopliteError`, except the standard ones that
``concurrent.futures`` users expect (``TimeoutError``, ``CancelledError``, ``BrokenExecutor``,
``ValueError``/``TypeError`` for bad arguments), which are raised as they are.
"""
from __future__ import annotations

import concurrent.futures
import pickle

__all__ = [
    "HopliteError",
    "NotInitializedError",
    "SerializationError",
    "ObjectDeletedError",
    "ObjectLostError",
    "RankLostError",
    "TransferError",
    "WorkerCrashedError",
    "RemoteTraceback",
    "TaskError",
    "RuntimeShutdownError",
    "BrokenExecutor",
]

BrokenExecutor = concurrent.futures.BrokenExecutor


class HopliteError(Exception):
    """Base class of hoplite_mpi's own errors."""


class NotInitializedError(HopliteError, RuntimeError):
    """An API call needs a runtime: call ``hoplite_mpi.init()`` (or use ``Executor``) first."""


class RuntimeShutdownError(HopliteError, RuntimeError):
    """The runtime was shut down while the call was waiting or before it was made."""


class Drained(BaseException):
    """The job is draining (durable workflows: the launcher was signalled, or the job's end
    time is near; ``hoplite_mpi/roles/drain.py``): raised by calls that wait on the runtime,
    after running tasks finished and their checkpoints were committed.  A ``BaseException``,
    so that ``except Exception`` in the program does not swallow it; ``python -m hoplite_mpi``
    exits with status 79 on it.  Running the same program again resumes from storage."""


class SerializationError(HopliteError, TypeError):
    """A function, argument or return value could not be pickled (cloudpickle protocol 5).

    The message names what could not be pickled (e.g. ``argument 1 of f``) and the original
    pickling error is chained as ``__cause__``.  Raised at call time by ``f.remote(...)`` and
    ``put``; delivered through the returned future by ``Executor.submit``.  Nothing was sent,
    so no other task or object is affected.

    ``__cause__`` does not survive pickling, so when this error travels to another rank (a
    return value that could not be pickled) the pickling error goes along as :attr:`original`,
    if it can be pickled itself (else ``original`` is None).
    """

    original: "BaseException | None" = None

    def __reduce__(self):
        original = self.original if self.original is not None else self.__cause__
        if original is not None:
            try:
                pickle.dumps(original)
            except Exception:
                original = None
        return (_rebuild_serialization_error, (self.args, original))


def _rebuild_serialization_error(args: tuple, original: "BaseException | None") -> SerializationError:
    exc = SerializationError(*args)
    exc.original = original
    return exc


class ObjectDeletedError(HopliteError, KeyError):
    """The object was freed with ``hoplite_mpi.delete``; its value can no longer be fetched."""

    def __init__(self, object_id: object) -> None:
        super().__init__(object_id)
        self.object_id = object_id

    def __str__(self) -> str:
        return f"object {self.object_id} was deleted with hoplite_mpi.delete()"


class ObjectLostError(HopliteError):
    """Every copy of the object is gone and it cannot be rebuilt from lineage."""

    def __init__(self, object_id: object, rank: int | None = None) -> None:
        super().__init__(object_id, rank)
        self.object_id = object_id
        self.rank = rank

    def __str__(self) -> str:
        where = f" (its last copy was on dead rank {self.rank})" if self.rank is not None else ""
        return f"object {self.object_id} is lost{where}"


class RankLostError(HopliteError):
    """A task could not be completed because the rank running it died: it was pinned to that rank
    (``.options(rank=r)``), or it was lost ``max_retries + 1`` times, or no worker rank is left.

    Attributes: ``task`` (its name and id), ``rank`` (the last dead rank it ran on or was pinned
    to), ``attempts`` (how many times it was started).
    """

    def __init__(self, task: str, rank: int, attempts: int, why: str = "") -> None:
        super().__init__(task, rank, attempts, why)
        self.task, self.rank, self.attempts, self.why = task, rank, attempts, why

    def __str__(self) -> str:
        return (f"task {self.task} lost with rank {self.rank} after {self.attempts} attempt(s)"
                + (f": {self.why}" if self.why else ""))


class TransferError(HopliteError):
    """Moving an object between two live ranks failed for a reason other than a rank's death: an
    MPI error that is not a ULFM failure class (e.g. ``MPI_ERR_TRUNCATE``), or a holder whose copy
    does not match the object's registered frame sizes.  This is a bug of hoplite_mpi, never the
    user's: please report it with the log.  The object's readers on that rank get this error;
    both ranks stay in the job, and a later ``get`` tries the transfer again.

    Attributes: ``object_id`` (printable id), ``rank`` (the peer), ``detail`` (the MPI error
    string or the mismatch), ``mpi_error`` (the MPI error class, 0 if none).
    """

    def __init__(self, object_id: object, rank: int, detail: str, mpi_error: int = 0) -> None:
        super().__init__(object_id, rank, detail, mpi_error)
        self.object_id, self.rank, self.detail, self.mpi_error = object_id, rank, detail, mpi_error

    def __str__(self) -> str:
        return f"transfer of object {self.object_id} from rank {self.rank} failed: {self.detail}"
class WorkerCrashedError(RankLostError):
    """The task itself ended its worker rank's process (``os._exit``): the cause is the task,
    not the rank (Ray's ``WorkerCrashedError`` as against a node's death).  It is not retried
    (``max_retries`` is for ranks that die under a task): the exit would most likely happen again,
    and the rank it ended is lost to the job (MPI cannot replace it), as after any rank loss.

    Attributes: those of :class:`RankLostError`, and ``status`` (the exit status it asked for).
    """

    def __init__(self, task: str, rank: int, attempts: int, status: int) -> None:
        super().__init__(task, rank, attempts, f"the task called os._exit({status})")
        self.args = (task, rank, attempts, status)
        self.status = status

    def __str__(self) -> str:
        return (f"task {self.task} ended its worker process with os._exit({self.status}) on rank "
                f"{self.rank} (attempt {self.attempts}): the task, not the rank, is the cause; "
                "not retried, and the job goes on without that rank")


class RemoteTraceback(Exception):
    """Carries the formatted traceback of an exception raised on another rank.

    Attached as ``__cause__`` of the re-raised task exception, like CPython's
    ``concurrent.futures.process._RemoteTraceback``.
    """

    def __init__(self, tb: str, rank: int, host: str) -> None:
        super().__init__(tb, rank, host)
        self.tb = tb
        self.rank = rank
        self.host = host

    def __str__(self) -> str:
        return f'\n"""\nTraceback on rank {self.rank} ({self.host}):\n{self.tb}"""'


class TaskError(HopliteError):
    """Stand-in for a task exception whose own type could not be pickled or rebuilt.

    ``original_type`` names the exception's type; the remote traceback is the ``__cause__``.
    """

    def __init__(self, message: str, original_type: str = "") -> None:
        super().__init__(message, original_type)
        self.original_type = original_type

    def __str__(self) -> str:
        return f"{self.original_type}: {self.args[0]}" if self.original_type else str(self.args[0])
