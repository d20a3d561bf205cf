"""``hm.timeline()`` (issue 15; the mechanism: :mod:`hoplite_mpi.tracing`)."""
from __future__ import annotations

from typing import Optional

from . import session


def timeline(path: Optional[str] = None, *, stop: bool = False, timeout: float = 60.0) -> Optional[int]:
    """Record what every rank does, as a Chrome trace-event file.

    - ``hm.timeline()``: start recording on every rank (again after a stop);
    - ``hm.timeline(path)``: gather what every rank recorded so far (then forgotten; recording
      goes on) and write it to ``path`` as trace-event JSON (Perfetto, chrome://tracing;
      ``python -m hoplite_mpi.trace summary PATH``); returns the number of events written;
    - ``hm.timeline(path, stop=True)``: the same, and every rank stops recording (its hooks cost
      one test of a module global again); ``hm.timeline(stop=True)``: stop, dropping the events.

    ``HOPLITE_MPI_TIMELINE=PATH`` records a whole run instead (written when the driver shuts
    down, if still recording).

    Raises RuntimeError: not on the driver, or ``path``/``stop`` given while nothing records;
    concurrent.futures.TimeoutError: the ranks did not answer within ``timeout`` seconds (a rank
    that does not answer within 30 s is left out of the file)."""
    rt = session.current()
    if rt.rank != 0:
        raise RuntimeError("hm.timeline() is called on the driver (rank 0)")
    if path is None and not stop:
        rt.start_timeline(timeout)
        return None
    return rt.write_timeline(path, timeout, stop=stop)
