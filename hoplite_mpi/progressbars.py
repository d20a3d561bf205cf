"""Progress of a set of refs (issue 15): :func:`as_completed` and :func:`progress` yield refs
as they complete and show a tqdm bar (done / failed / running, tasks per second) when the
driver's stderr is a terminal, or when asked; silent otherwise.  ``Executor.map`` takes the
same ``progress`` switch.  The bar is tqdm's (a well-kept library); without tqdm installed
nothing is shown."""
from __future__ import annotations

import concurrent.futures as cf
import sys
import time
from typing import Any, Iterable, Iterator, Optional

from .objectref import ObjectRef, check_refs

REFRESH = 0.5      # seconds between looks at the scheduler's count of running tasks


def _wanted(show: Optional[bool], file: Any) -> bool:
    if show is not None:
        return bool(show)
    isatty = getattr(file, "isatty", None)
    return bool(isatty and isatty())


def _bar(total: int, desc: Optional[str], file: Any) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:        # (an optional look: no bar)
        return None
    return tqdm(total=total, desc=desc or "tasks", unit="task", file=file, dynamic_ncols=True,
                smoothing=0.1)


def _running() -> Optional[int]:
    """Tasks placed on workers and not finished (the driver's scheduler), or None."""
    from . import session
    try:
        rt = session.current()
        sched = rt.scheduler
        return None if sched is None else rt.call(sched.running, timeout=1.0)
    except Exception:
        return None


def as_completed(refs: Iterable[ObjectRef], timeout: Optional[float] = None,
                 progress: Optional[bool] = None, desc: Optional[str] = None,
                 file: Any = None) -> Iterator[ObjectRef]:
    """Yield the refs of ``refs`` as they complete (ready or failed), like
    ``concurrent.futures.as_completed``; with a progress bar on ``file`` (default
    ``sys.stderr``) when ``progress`` is True, or None and ``file`` is a terminal.

    Raises TypeError for a non-ref, ``TimeoutError`` (concurrent.futures') if not all
    completed within ``timeout`` seconds (the refs are not affected)."""
    refs = list(refs)
    check_refs(refs, "as_completed")
    file = sys.stderr if file is None else file
    bar = _bar(len(refs), desc, file) if _wanted(progress, file) else None
    failed = 0
    last = 0.0
    try:
        for ref in cf.as_completed(refs, timeout=timeout):
            if bar is not None:
                if ref.cancelled() or ref.exception() is not None:
                    failed += 1
                now = time.monotonic()
                if now - last >= REFRESH:
                    last = now
                    running = _running()
                    bar.set_postfix_str(f"failed={failed}" + (f" running={running}" if running is not None else ""),
                                        refresh=False)
                bar.update(1)
            yield ref
    finally:
        if bar is not None:
            bar.set_postfix_str(f"failed={failed}", refresh=False)
            bar.close()


def counting(values: Iterator, progress: Optional[bool], desc: str, total: Optional[int] = None,
             file: Any = None) -> Iterator:
    """``values`` as they are taken, counted on a bar (``progress`` as in :func:`as_completed`);
    Executor.map's results."""
    file = sys.stderr if file is None else file
    bar = _bar(total, desc, file) if _wanted(progress, file) else None
    if bar is None:
        yield from values
        return
    try:
        while True:
            try:
                box = [next(values)]
            except StopIteration:
                return
            bar.update(1)
            yield box.pop()          # (no reference to a yielded value is kept here)
    finally:
        values.close()
        bar.close()


def progress(refs: Iterable[ObjectRef], desc: Optional[str] = None, show: Optional[bool] = None,
             timeout: Optional[float] = None, file: Any = None) -> list:
    """Wait for every ref of ``refs``, showing a bar (see :func:`as_completed`; ``show`` None:
    only on a terminal); returns the refs in the order they completed.  Raises as
    :func:`as_completed`."""
    return list(as_completed(refs, timeout=timeout, progress=show, desc=desc, file=file))
