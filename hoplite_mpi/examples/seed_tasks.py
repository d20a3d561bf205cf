"""The Hoplite Go prototype's workload (seed 000) on hoplite_mpi.

    hoplite-mpi run -n 4 -m hoplite_mpi.examples.seed_tasks [--lists 50] [--seed 7]

- Task 1 filters the primes out of a list of large integers.
- Task 2 multiplies two promised lists element-wise (truncating to the shorter).
- Task 3 multiplies a list of promised lists element-wise (a generalisation of Task 2).

Half of the tasks (Task 1) produce futures; the other half (Tasks 2 and 3) are submitted at once
with those futures as arguments, before they exist.  All results are fetched concurrently and
checked against a sequential computation; then every object is deleted and each ``get`` must raise
``ObjectDeletedError``.  Exit status 0 when everything matched.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import hoplite_mpi as hm


def is_prime(n: int) -> bool:
    """Trial division (the prototype's Task 1 kernel)."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    i = 3
    while i * i <= n:
        if n % i == 0:
            return False
        i += 2
    return True


def primes_of(xs: list[int]) -> list[int]:
    return [x for x in xs if is_prime(x)]


def multiply(a: list[int], b: list[int]) -> list[int]:
    return [x * y for x, y in zip(a, b)]


def multiply_all(*lists: list[int]) -> list[int]:
    out = list(lists[0])
    for other in lists[1:]:
        out = multiply(out, other)
    return out


task1_primes = hm.remote(primes_of)
task2_multiply = hm.remote(multiply)
task3_multiply_all = hm.remote(multiply_all)


def make_lists(n_lists: int, seed: int, magnitude: int = 10**11) -> list[list[int]]:
    """``n_lists`` lists of 50-300 integers from ``magnitude`` on (around 10^11, trial division
    costs real time)."""
    rng = np.random.default_rng(seed)
    return [[int(v) for v in rng.integers(magnitude, magnitude + 10**6, size=int(rng.integers(50, 300)))]
            for _ in range(n_lists)]


def plan(n_lists: int) -> list[tuple[str, tuple[int, ...]]]:
    """Which Task 1 outputs each dependent task takes: n/2 Task 2s and n/2 Task 3s."""
    half = n_lists // 2
    return ([("task2", (i, (i * 7 + 3) % n_lists)) for i in range(half)]
            + [("task3", tuple((i + k * 11) % n_lists for k in range(3))) for i in range(n_lists - half)])


def run(n_lists: int = 50, seed: int = 7, timeout: float = 600.0, magnitude: int = 10**11) -> dict:
    """Submit ``2 * n_lists`` tasks, check them, delete them.  Returns figures (seconds).

    Raises AssertionError if a result differs from the sequential computation or a deleted
    object is still readable.
    """
    lists = make_lists(n_lists, seed, magnitude)
    t0 = time.perf_counter()
    primes = [task1_primes.remote(xs) for xs in lists]
    dependents = [task2_multiply.remote(*(primes[i] for i in idx)) if kind == "task2"
                  else task3_multiply_all.remote(*(primes[i] for i in idx)) for kind, idx in plan(n_lists)]
    refs = primes + dependents
    values = hm.get(refs, timeout=timeout)
    parallel = time.perf_counter() - t0

    t0 = time.perf_counter()
    seq_primes = [primes_of(xs) for xs in lists]
    expected = seq_primes + [multiply(*(seq_primes[i] for i in idx)) if kind == "task2"
                             else multiply_all(*(seq_primes[i] for i in idx)) for kind, idx in plan(n_lists)]
    sequential = time.perf_counter() - t0
    assert values == expected, "a task's result differs from the sequential computation"

    hm.delete(refs)
    for ref in refs:
        try:
            hm.get(ref, timeout=timeout)
        except hm.ObjectDeletedError:
            continue
        raise AssertionError(f"{ref} is still readable after delete()")
    return {"tasks": len(refs), "parallel_s": parallel, "sequential_s": sequential}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lists", type=int, default=50, help="number of Task 1 inputs (tasks = 2x)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--magnitude", type=float, default=1e11, help="size of the integers")
    args = parser.parse_args(argv)
    hm.init()
    out = run(args.lists, args.seed, magnitude=int(args.magnitude))
    print(f"seed_tasks: {out['tasks']} tasks on {hm.world_size()} ranks: results match the sequential "
          f"run; all objects deleted and unreadable")
    print(f"  parallel {out['parallel_s']:.3f} s   sequential {out['sequential_s']:.3f} s   "
          f"speed-up {out['sequential_s'] / out['parallel_s']:.2f}x")
    hm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
