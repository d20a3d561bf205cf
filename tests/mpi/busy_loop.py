"""A job that keeps every worker busy with short tasks for up to ``--seconds`` (tests of what
happens when ranks or hosts die meanwhile).  Prints RUNNING once every worker has run a task,
then DONE <tasks> at the end."""
import argparse
import time

import hoplite_mpi as hm


@hm.remote
def work(i):
    time.sleep(0.05)
    return hm.rank()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=60)
    args = p.parse_args()
    workers = range(1, hm.world_size())
    assert sorted(hm.get([work.options(rank=r).remote(0) for r in workers], timeout=60)) == list(workers)
    print("RUNNING", flush=True)
    done, end = 0, time.monotonic() + args.seconds
    while time.monotonic() < end:
        hm.get([work.remote(i) for i in range(8)], timeout=60)
        done += 8
    print("DONE", done, flush=True)
