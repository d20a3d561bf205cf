"""hoplite_mpi/malloc.py: with the runtime's mmap threshold, buffers of a few hundred KB are reused
from the heap instead of being fresh mmaps whose every page faults (each case in a fresh process:
the setting is per process)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from hoplite_mpi.config import Config

CHURN = r"""
import resource, sys
from hoplite_mpi import malloc
applied = malloc.tune(int(sys.argv[1]))
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f0 = faults()
for i in range(200):         # a received 320 KB message and its unpickled copy, one after another
    a = bytearray(320 * 1024)
    b = bytes(a)
    del a, b
print(applied, faults() - f0)
"""


def churn(threshold: int) -> tuple[bool, int]:
    proc = subprocess.run([sys.executable, "-c", CHURN, str(threshold)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    applied, faults = proc.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_buffers_are_reused_without_page_faults():
    applied, tuned = churn(32 << 20)
    unapplied, untuned = churn(0)       # 0: glibc's own policy
    assert applied and not unapplied
    # 200 x 2 x 80 pages: glibc's default trims and regrows the heap (or maps afresh) each time
    assert untuned > 10_000, untuned
    assert tuned < untuned / 20, (tuned, untuned)


def test_the_threshold_must_be_a_non_negative_int():
    for bad in (-1, 1.5, True, "32"):
        with pytest.raises(ValueError, match="malloc_mmap_threshold must be an int >= 0"):
            Config(malloc_mmap_threshold=bad)
    assert Config(malloc_mmap_threshold=0).malloc_mmap_threshold == 0
