"""Tasks placed ahead and waiting on a worker (``Config.worker_deps``, issue 12), run as ONE job
of 4 ranks under ULFM by tests/test_local_deps_mpi.py:

    hoplite-mpi run -n 4 tests/mpi/local_deps_checks.py --json OUT [--only name,name]

Gates are files in a fresh directory (a task waits for one to exist, bounded), never sleeps.
Every wait has a timeout.  ``rank_killed_while_tasks_wait_ahead`` kills a rank: it runs last.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import tempfile
import time

import numpy as np

import hoplite_mpi as hm

T = 60
CHECKS = {}
GATES = tempfile.mkdtemp(prefix="hoplite-local-deps-")


def check(fn):
    CHECKS[fn.__name__.removeprefix("check_")] = fn
    return fn


def gate(name: str) -> str:
    return os.path.join(GATES, name)


def open_gate(name: str) -> None:
    with open(gate(name), "w"):
        pass


def wait_file(path: str, timeout: float = T) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.002)


def get_raises(ref, exc_type: type, why: str) -> BaseException:
    """``hm.get(ref)`` must raise ``exc_type`` (within T seconds); returns the exception."""
    try:
        hm.get(ref, timeout=T)
    except exc_type as exc:
        return exc
    raise AssertionError(why)


@hm.remote
def inc(x):
    return x + 1


@hm.remote
def gated(path, value):
    """Return ``value`` once ``path`` exists."""
    wait_file(path)
    return value


@hm.remote
def started_then_gated(x, started, path):
    open(started, "w").close()
    wait_file(path)
    return x + 1


@hm.remote
def boom(x):
    raise ValueError(f"boom {x}")


@hm.remote
def where(x):
    return hm.rank(), x


@hm.remote
def ahead_count():
    return hm.stats()["tasks_ahead"]


def tasks_ahead() -> int:
    return sum(hm.get([ahead_count.options(rank=r).remote() for r in range(1, hm.world_size())],
                      timeout=T))


@check
def check_chain_runs_ahead_on_one_worker():
    before = tasks_ahead()
    r = 0
    for _ in range(300):
        r = inc.remote(r)
    assert hm.get(r, timeout=T) == 300
    assert tasks_ahead() - before > 100, "the chain's tasks were not placed ahead"


@check
def check_chain_of_chunked_results():
    r = hm.put(np.zeros(1 << 18))        # 2 MiB: chunked, not inline
    for _ in range(12):
        r = inc.remote(r)
    out = hm.get(r, timeout=T)
    assert out.shape == (1 << 18,) and (out == 12).all()


@check
def check_error_passes_down_a_chain_waiting_ahead():
    path = gate("error")
    a = boom.remote(gated.remote(path, 7))
    chain = [a]
    for _ in range(5):
        chain.append(inc.remote(chain[-1]))
    open_gate("error")
    for ref in chain:
        exc = get_raises(ref, ValueError, "a task after a failed one did not raise its error")
        assert "boom 7" in str(exc), str(exc)


@check
def check_cancel_of_a_task_waiting_ahead():
    a = gated.remote(gate("cancel"), 1)
    b = inc.remote(a)
    c = inc.remote(b)
    other = inc.remote(a)      # (a fan-out: waits on rank 0 or ahead, either way unaffected)
    assert b.cancel(), "a task waiting for its input could not be cancelled"
    assert b.cancelled()
    open_gate("cancel")
    assert hm.get(a, timeout=T) == 1
    assert hm.get(other, timeout=T) == 2
    for ref in (b, c):
        get_raises(ref, cf.CancelledError, "a cancelled task's result (or its user's) did not raise")


@check
def check_cancel_of_a_started_task_is_refused():
    a = gated.remote(gate("start-a"), 1)
    b = started_then_gated.remote(a, gate("b-started"), gate("start-b"))
    open_gate("start-a")
    wait_file(gate("b-started"))
    assert not b.cancel(), "a task that had started was reported cancelled"
    open_gate("start-b")
    assert hm.get(b, timeout=T) == 2


@check
def check_executor_shutdown_cancels_tasks_waiting_ahead():
    ex = hm.Executor()
    a = gated.remote(gate("shutdown"), 0)
    futs = [ex.submit(lambda x: x + 1, a)]
    for _ in range(5):
        futs.append(ex.submit(lambda x: x + 1, futs[-1]))
    done = []
    stopper = cf.ThreadPoolExecutor(1).submit(ex.shutdown, wait=True, cancel_futures=True)
    # (the gate opens only once shutdown has cancelled what it could: nothing could start before)
    deadline = time.monotonic() + T
    while not any(f.cancelled() for f in futs) and time.monotonic() < deadline:
        time.sleep(0.001)
    open_gate("shutdown")
    stopper.result(timeout=T)
    for i, f in enumerate(futs):
        assert f.done()
        if f.cancelled():
            done.append("cancelled")
            continue
        try:
            assert f.result(timeout=T) == i + 1
            done.append("ok")
        except cf.CancelledError:          # its input was cancelled
            done.append("input cancelled")
    assert "cancelled" in done, done
    assert "ok" not in done[done.index("cancelled"):], done


@check
def check_cancel_of_a_task_queued_on_its_worker():
    # one executor thread per worker: a task queued behind a running one on the same rank has
    # been placed but not started, and cancel() takes it back (as a stdlib pool's queued task)
    w = 1
    a = gated.options(rank=w).remote(gate("queued"), 5)
    queued = [inc.options(rank=w).remote(i) for i in range(3)]
    assert all(r.cancel() for r in queued), "a task queued on its worker could not be cancelled"
    open_gate("queued")
    assert hm.get(a, timeout=T) == 5
    for ref in queued:
        assert ref.cancelled()
        get_raises(ref, cf.CancelledError, "a cancelled queued task ran")
    assert hm.get(inc.options(rank=w).remote(1), timeout=T) == 2     # the worker goes on


@check
def check_rank_killed_while_tasks_wait_ahead():
    # a runs on some worker and dies there once the driver has placed b..e ahead behind it;
    # then a runs again elsewhere and the chain completes (needs a second worker)
    if hm.world_size() < 3:
        return
    rank, _ = hm.get(where.remote(0), timeout=T)
    victim = 1 + rank % (hm.world_size() - 1)
    a = die_once.options(rank=None).remote(gate("die"), gate("go"))
    chain = [a]
    for _ in range(4):
        chain.append(inc.remote(chain[-1]))
    open_gate("go")
    assert hm.get(chain[-1], timeout=T) == 14
    assert hm.dead_ranks(), "no rank died"
    del victim


@hm.remote
def ident(x):
    return x


@hm.remote
def die():
    os.kill(os.getpid(), signal.SIGKILL)


@check
def check_large_literal_argument_outlives_its_task_for_lineage():
    # a task given a large literal (stored as an object by the runtime): its result, only on
    # the worker that ran it, is lost with that rank and made again from lineage, which needs
    # the stored argument although the task had finished (real-MPI kill soak, seed 20020)
    if len(set(range(1, hm.world_size())) - set(hm.dead_ranks())) < 2:
        return
    value = np.arange(100_000, dtype=np.float64)       # 800 KB: stored, chunked result
    out = ident.remote(value)
    hm.wait([out], timeout=T)
    (holder,) = hm.locations(out)[out]
    die.options(rank=holder).remote()
    deadline = time.monotonic() + T
    while holder not in hm.dead_ranks() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert holder in hm.dead_ranks(), "the holder did not die"
    got = hm.get(out, timeout=T)
    assert (got == value).all()


@hm.remote(max_retries=3)
def die_once(marker, go):
    wait_file(go)
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return 10


def no_rank_declared_dead():
    if CURRENT[0] not in ("rank_killed_while_tasks_wait_ahead",
                          "large_literal_argument_outlives_its_task_for_lineage"):
        dead = hm.dead_ranks()
        assert not dead, f"ranks declared dead: {dead}"


CURRENT = [""]

if __name__ == "__main__":
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import checkrun

    def tracked(name, fn):
        def run():
            CURRENT[0] = name
            fn()
        return run
    checkrun.main({n: tracked(n, f) for n, f in CHECKS.items()}, after_each=no_rank_declared_dead)
