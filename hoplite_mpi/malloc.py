"""glibc malloc tuning for the runtime's processes (``Config.malloc_mmap_threshold``).

glibc serves an allocation above its mmap threshold (128 KiB at start, raised dynamically up to
32 MiB as such blocks are freed) with a fresh ``mmap`` and returns it with ``munmap`` when freed.
Every page of such a block then faults on first touch, and each ``munmap`` may shoot down TLBs on
the other cores; on the VMs here that made a 320 KB pickled message cost ~1 ms per hop (each of
the pickle, MPI's receive buffer and the unpickled value is a fresh block).  A fixed, higher
threshold keeps blocks up to it in the heap, where freed memory is reused without faults: the
mpi4py ping-pong of a pickled 320 KB array went from 2.6 to 0.6 ms per round trip, and a task
returning 320 KB in-band reached the driver 0.5 ms sooner (4 ranks, this machine).  The cost is
resident memory: freed blocks stay in the process (up to the trim threshold at the top of the
heap).  Objects of the object store above the threshold (many MiB) still come from ``mmap``.

Only glibc has ``mallopt``; elsewhere :func:`tune` does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger("hoplite_mpi")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MAX_MMAP_THRESHOLD = 32 << 20    # glibc's upper bound on 64-bit (HEAP_MAX_SIZE / 2)

_done: list[int] = []


def tune(mmap_threshold: int) -> bool:
    """Set glibc's mmap threshold to ``mmap_threshold`` bytes (capped at 32 MiB) and its trim
    threshold to four times that, once per process.  0: change nothing.  Returns whether the
    settings were applied (False off glibc, or if ``mallopt`` refused them; nothing is raised)."""
    if mmap_threshold <= 0:
        return False
    if _done:
        return _done[0] == mmap_threshold
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    threshold = min(int(mmap_threshold), MAX_MMAP_THRESHOLD)
    ok = mallopt(M_MMAP_THRESHOLD, threshold) == 1 and \
        mallopt(M_TRIM_THRESHOLD, min(4 * threshold, 2**31 - 1)) == 1
    if ok:
        _done.append(mmap_threshold)
    else:
        log.debug("mallopt refused an mmap threshold of %d bytes", threshold)
    return ok
