"""Worker output on the driver (tests/test_output.py): tasks print numbered lines on every
worker; one prints then raises; optionally (``--kill``) one prints and its rank is SIGKILLed.
The driver prints ``RESULT <json>`` with who ran what (rank, pid per task) at the end."""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

import hoplite_mpi as hm

LINES = 250


@hm.remote
def emit(t: int, n: int) -> tuple:
    for i in range(n):
        if i % 50 == 49:
            logging.getLogger("user").warning("task %d line %d", t, i)     # (stderr)
        else:
            print(f"task {t} line {i}")
    print(f"task {t} partial", end="")          # a last line without its newline
    return hm.rank(), os.getpid()


@hm.remote(max_retries=0)
def fails() -> None:
    print("printed before the error")
    raise ValueError("boom")


@hm.remote(max_retries=0)
def last_words() -> None:
    print("last words before SIGKILL", flush=True)
    time.sleep(0.3)
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    tasks = int(sys.argv[1])
    kill = "--kill" in sys.argv
    who = hm.get([emit.remote(t, LINES) for t in range(tasks)], timeout=240)
    try:
        hm.get(fails.remote(), timeout=120)
    except ValueError:
        print("DRIVER SAW THE ERROR", flush=True)
    if kill:
        try:
            hm.get(last_words.options(rank=1).remote(), timeout=120)
        except Exception as exc:
            print(f"DRIVER SAW THE DEATH {type(exc).__name__}", flush=True)
    print("RESULT " + json.dumps({"who": who}), flush=True)


if __name__ == "__main__":
    main()
