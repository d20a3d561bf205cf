"""Random-workload differential tests (issue 10): random DAGs of tasks, puts, deletes, broadcasts
and reduces, every result compared with a sequential reference (tests/mpi/random_workload.py).

A fixed set of seeds runs in CI (~3-4 minutes on 2 cores): jobs of several seeds at 2, 3, 4 and 8
ranks, single-seed jobs (so that a job's exit is tested after each kind of workload), a job with
a small chunk size and inline threshold (objects of several chunks stay cheap), a job with
arrays around the default 1 MiB chunk size, and ULFM jobs in which a worker rank SIGKILLs itself.

    python -m pytest -q tests/test_random_workload.py                   # the CI set
    python -m pytest -q tests/test_random_workload.py --soak 200        # + 200 more seeds
    python -m pytest -q tests/test_random_workload.py --without-fixed   # without the FIXED bugs' inputs

A failing seed's message carries the one-line replay command the job printed.
"""
from __future__ import annotations

import os
import random
import re

import pytest

from conftest import HERE, run_job

WORKLOAD = os.path.join(HERE, "mpi", "random_workload.py")
OPS = 60
SMALL = {"HOPLITE_MPI_CHUNK_SIZE": "8192", "HOPLITE_MPI_INLINE_THRESHOLD": "2048",
         "HOPLITE_MPI_WINDOW": "2"}

# (ranks, first seed, seeds in the job, extra args, env)
CI_JOBS = [
    (2, 100, 20, (), {}),
    (3, 200, 20, (), {}),
    (4, 300, 25, (), {}),
    (8, 400, 8, (), {}),
    (2, 500, 1, (), {}),
    (3, 510, 1, (), {}),
    (4, 520, 1, (), {}),
    (4, 600, 12, ("--big",), SMALL),
    (2, 650, 8, ("--big",), SMALL),
    (4, 700, 3, ("--big",), {}),
]
# ULFM jobs with one kill each: (ranks, seed); the kill is drawn from the seed
KILL_JOBS = [(4, 800), (4, 801), (3, 804)]
POINTS = ("task", "serve", "chunk", "dir", "reduce", "combine")


def job_timeout(n: int, seeds: int, big: bool) -> float:
    """Generous: 2 cores shared, 8 ranks heavily oversubscribed; a hang is still a failure."""
    return 90 + seeds * (8 if n <= 4 else 25) * (3 if big else 1)


def run_seeds(n, seed, seeds, args, env, without_fixed, kill=None):
    known = ("--without-fixed",) if without_fixed else ()
    env = dict(env)
    if kill:
        env["HOPLITE_MPI_KILL"] = kill
    ft = True       # the default launch (ULFM): every job must also end on its own
    proc = run_job(n, "-m", "hoplite_mpi", WORKLOAD, "--seed", str(seed), "--seeds", str(seeds),
                   "--ops", str(OPS), *args, *known,
                   timeout=job_timeout(n, seeds, "--big" in args) * (2 if kill else 1), env=env, ft=ft)
    out = proc.stdout + proc.stderr
    failed = re.findall(r"^SEED \d+ FAIL.*$", proc.stdout, re.M)
    details = "\n".join(line for line in proc.stdout.splitlines() if not line.startswith("SEED "))
    # every rank must also shut down cleanly (quiesced, then MPI_Finalize), not after the 30 s
    # give-up (a drained stream's receives that could never match kept every rank waiting)
    assert kill or "leaving without MPI_Finalize" not in proc.stderr, proc.stderr[-4000:]
    assert not failed and proc.returncode == 0 and f"DONE {seeds} seeds, 0 failed" in proc.stdout, (
        f"exit {proc.returncode}; " + ("\n".join(failed) or "no failing seed reported") + "\n"
        + details[-6000:] + "\n--- stderr ---\n" + proc.stderr[-4000:])
    return out


@pytest.mark.parametrize("n,seed,seeds,args,env", CI_JOBS,
                         ids=[f"n{j[0]}-seed{j[1]}x{j[2]}{'-big' if j[3] else ''}{'-small' if j[4] else ''}"
                              for j in CI_JOBS])
def test_random_workload(n, seed, seeds, args, env, request):
    run_seeds(n, seed, seeds, args, env, request.config.getoption("--without-fixed"))


def kill_for(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return f"{rng.randint(1, n - 1)}:{rng.choice(POINTS)}:{rng.randint(1, 6)}"


@pytest.mark.parametrize("n,seed", KILL_JOBS, ids=[f"n{n}-seed{s}" for n, s in KILL_JOBS])
def test_random_workload_with_a_killed_rank(n, seed, request):
    from test_faults import _no_ulfm
    if _no_ulfm():
        pytest.skip(_no_ulfm())
    run_seeds(n, seed, 1, (), {}, request.config.getoption("--without-fixed"), kill=kill_for(seed, n))


def soak_jobs(count: int) -> list[tuple]:
    """``count`` more seeds (from 10000 on) in jobs of up to 10, over 2, 3, 4, 8 ranks, with and
    without the small-chunk configuration; every fifth job a single-seed one."""
    jobs, seed, k = [], 10000, 0
    while seed < 10000 + count:
        n = (2, 3, 4, 8, 4, 3)[k % 6]
        size = 1 if k % 5 == 4 else min(10 if n < 8 else 4, 10000 + count - seed)
        env = SMALL if k % 3 == 2 else {}
        jobs.append((n, seed, size, ("--big",) if env else (), env))
        seed += size
        k += 1
    return jobs


def pytest_generate_tests(metafunc):
    if "soak_job" in metafunc.fixturenames:
        count = metafunc.config.getoption("--soak")
        jobs = soak_jobs(count) if count else []
        metafunc.parametrize("soak_job", jobs, ids=[f"n{j[0]}-seed{j[1]}x{j[2]}" for j in jobs])


def test_soak(soak_job, request):
    n, seed, seeds, args, env = soak_job
    run_seeds(n, seed, seeds, args, env, request.config.getoption("--without-fixed"))


def test_soak_with_kills(request):
    count = request.config.getoption("--soak")
    if not count:
        pytest.skip("only with --soak N")
    from test_faults import _no_ulfm
    if _no_ulfm():
        pytest.skip(_no_ulfm())
    failures = []
    for seed in range(20000, 20000 + max(1, count // 10)):
        try:
            run_seeds(4, seed, 1, (), {}, request.config.getoption("--without-fixed"),
                      kill=kill_for(seed, 4))
        except (AssertionError, pytest.fail.Exception) as exc:
            failures.append(f"seed {seed} kill {kill_for(seed, 4)}: {str(exc)[:2000]}")
    assert not failures, "\n\n".join(failures)
