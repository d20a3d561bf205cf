"""Requests that name a rank which died before they were made (issue 10, found by the random
workload tester): rank 3 SIGKILLs itself, then the driver asks for a reduce to rank 3 (it must
fail with HopliteError, not wait for ever), a task pinned to rank 3 (RankLostError), and a
second task of a function whose first task was that refused one (it must run: the function
travelled with the refused task only).  Before the kill, rank 1 puts small values; those whose
directory shard was rank 3 must still be readable from rank 2 afterwards (the shard moves, and
rank 1 re-registers the values it put).  Prints one JSON line."""
from __future__ import annotations

import json
import os
import signal
import time

import numpy as np

import hoplite_mpi as hm
from hoplite_mpi import testing

T = 60


@hm.remote
def suicide():
    os.kill(os.getpid(), signal.SIGKILL)


@hm.remote
def make():
    return np.ones(8, np.float32)


@hm.remote
def first_use(x):
    return x + 1


@hm.remote
def put_small(n):
    return [hm.put(b"small %d" % i) for i in range(n)]


@hm.remote
def read_all(box):
    return hm.get(box[0], timeout=T)


def outcome(fn):
    try:
        return ["ok", repr(fn())]
    except Exception as exc:
        return [type(exc).__name__, str(exc)]


def main():
    hm.init()
    from hoplite_mpi.ids import shard_of
    puts = hm.get(put_small.options(rank=1).remote(16), timeout=T)
    shards = testing.runtime().ctx.shards     # (the shard map: an internal)
    on_dead_shard = sum(shards[shard_of(r.id, len(shards))][0] == 3 for r in puts)
    suicide.options(rank=3).remote()
    deadline = time.monotonic() + T
    while 3 not in hm.dead_ranks():              # (a bounded wait for the death notice)
        assert time.monotonic() < deadline, "rank 3's death was never noticed"
        time.sleep(0.01)
    got = {
        "reduce_to_dead": outcome(lambda: hm.get(hm.reduce([make.options(rank=2).remote()], "prod",
                                                           rank=3), timeout=T)),
        "pinned_to_dead": outcome(lambda: hm.get(first_use.options(rank=3).remote(1), timeout=T)),
        "same_function_elsewhere": outcome(lambda: hm.get(first_use.remote(41), timeout=T)),
        "small_puts_read_after_their_shard_died": outcome(
            lambda: hm.get(read_all.options(rank=2).remote([puts]), timeout=T)
            == [b"small %d" % i for i in range(16)]),
        "puts_on_dead_shard": on_dead_shard,
    }
    print(json.dumps(got), flush=True)


if __name__ == "__main__":
    main()
