"""A stalled job (tests/test_stall.py): rank 2 is SIGSTOPped, then a task pinned to it is
submitted and the driver waits for its result.  With ``HOPLITE_MPI_STALL_TIMEOUT`` small, rank
0 prints a stall report naming rank 2 (silent) and the object the driver waits for; the driver
then SIGCONTs rank 2 and the job ends normally.  Prints ``OBJECT <id>`` and ``RESULT ok``."""
from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np

import hoplite_mpi as hm
from hoplite_mpi.ids import format_id


@hm.remote
def pid() -> int:
    return os.getpid()


@hm.remote
def make(n: int) -> np.ndarray:
    return np.ones(n)


def main() -> None:
    victim = hm.get(pid.options(rank=2).remote(), timeout=60)
    os.kill(victim, signal.SIGSTOP)
    try:
        ref = make.options(rank=2).remote(1 << 17)
        print(f"OBJECT {format_id(ref.id)}", flush=True)
        wait = float(sys.argv[1])
        try:
            hm.get(ref, timeout=wait)       # (stalls: its rank is stopped)
        except TimeoutError:
            pass
    finally:
        os.kill(victim, signal.SIGCONT)
    assert hm.get(ref, timeout=60).sum() == 1 << 17
    print("RESULT ok", flush=True)


if __name__ == "__main__":
    main()
