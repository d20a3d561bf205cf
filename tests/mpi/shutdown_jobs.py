"""Jobs for tests/test_shutdown.py: ``python shutdown_jobs.py CASE`` (launch mode 2, hm.init()).

Each case prints ``END <time.time()>`` as the driver's last action, so the test can measure how
long the ranks took to leave after it.

- ``dropped``: results nobody reads, refs dropped while the job ends (issue 10: every rank hung
  in MPI_Finalize under ULFM, in 2 of 3 runs at 4 ranks).
- ``waiters``: four threads wait without a timeout (get, wait, result, broadcast) on a 30 s task
  when the main thread calls hm.shutdown(); each must return with RuntimeShutdownError.
- ``loss``: a worker rank is killed (HOPLITE_MPI_KILL) while the job runs.
- ``inflight``: hm.shutdown() while a 64 MiB broadcast is being streamed (posted receives are
  withdrawn, sends in flight completed by the receivers' drain); the broadcast raises
  RuntimeShutdownError.
- ``exit``: a task calls os._exit(3): it must fail with WorkerCrashedError within seconds, without
  a retry (which would cost another rank), the job go on with the other workers, and exit with
  status 0.
"""
import sys
import threading
import time

import hoplite_mpi as hm

case = sys.argv[1]
hm.init()


@hm.remote
def mk(v):
    return [v] * 1000


@hm.remote
def ping():
    return hm.rank()


@hm.remote
def slow(seconds):
    time.sleep(seconds)
    return 1


@hm.remote
def double(i):
    return 2 * i


if case == "dropped":
    a = mk.remote(1.0)
    b = mk.remote(2.0)
    print([hm.get(ping.options(rank=r).remote(), timeout=60) for r in range(1, hm.world_size())])
    del a, b        # the driver frees their objects while the job ends
elif case == "waiters":
    ref = slow.remote(30)
    calls = {"get": lambda: hm.get(ref), "wait": lambda: hm.wait([ref]),
             "result": lambda: ref.result(), "broadcast": lambda: hm.broadcast(ref)}
    outcome = {}

    def call(name):
        try:
            calls[name]()
            outcome[name] = "returned"
        except BaseException as exc:      # (what the test checks)
            outcome[name] = type(exc).__name__
    threads = [threading.Thread(target=call, args=(name,), daemon=True) for name in calls]
    for t in threads:
        t.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    hm.shutdown()
    for t in threads:
        t.join(10)
    print("WAITERS", sorted(outcome.items()), "after %.1f s" % (time.monotonic() - t0))
    try:
        hm.get(ref)
        print("AFTER returned")
    except BaseException as exc:
        print("AFTER", type(exc).__name__)
elif case == "inflight":
    import numpy as np

    @hm.remote
    def big(n):
        return np.ones(n, dtype=np.float64)
    ref = big.options(rank=1).remote(8 << 20)
    hm.wait([ref], timeout=120)
    outcome = {}

    def bc():
        try:
            hm.broadcast(ref)
            outcome["broadcast"] = "returned"
        except BaseException as exc:
            outcome["broadcast"] = type(exc).__name__
    t = threading.Thread(target=bc, daemon=True)
    t.start()
    time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 0.05)
    hm.shutdown()
    t.join(10)
    print("INFLIGHT", outcome)
elif case == "exit":
    import os

    @hm.remote          # (default max_retries=3: an os._exit is not retried all the same)
    def die(status):
        os._exit(status)
    t0 = time.monotonic()
    try:
        hm.get(die.remote(3), timeout=120)
        print("EXIT returned")
    except hm.WorkerCrashedError as exc:
        print("EXIT WorkerCrashedError after %.1f s: %s" % (time.monotonic() - t0, exc))
    except BaseException as exc:
        print("EXIT other", type(exc).__name__, exc)
    print("SUM", sum(hm.get([double.remote(i) for i in range(10)], timeout=120)))
elif case == "loss":
    print("SUM", sum(hm.get([double.remote(i) for i in range(40)], timeout=120)))
print("END", time.time(), flush=True)
