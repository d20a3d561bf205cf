"""``hm.timeline()`` (issue 15; the mechanism: :mod:`hoplite_mpi.timeline`)."""
from __future__ import annotations

from typing import Optional

from . import session


def timeline(path: Optional[str] = None, timeout: float = 60.0) -> Optional[int]:
    """Without ``path``: start recording the timeline on every rank.  With ``path``: gather what
    every rank recorded so far (then forgotten) and write it there as a Chrome trace-event JSON
    file (Perfetto, chrome://tracing; ``python -m hoplite_mpi.trace summary PATH``); returns the
    number of events.  ``HOPLITE_MPI_TIMELINE=PATH`` records a whole run instead.

    Raises RuntimeError: not on the driver, or ``path`` given while nothing records;
    concurrent.futures.TimeoutError: the ranks did not answer within ``timeout`` seconds."""
    rt = session.current()
    if rt.rank != 0:
        raise RuntimeError("hm.timeline() is called on the driver (rank 0)")
    if path is None:
        rt.start_timeline(timeout)
        return None
    return rt.write_timeline(path, timeout)
