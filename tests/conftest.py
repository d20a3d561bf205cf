"""Helpers for tests that launch real MPI jobs as subprocesses (each with a timeout)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

collect_ignore = ["mpi"]   # files there run inside mpirun jobs launched by the tests


def mpirun_cmd(n: int, *program: str, ft: bool = False) -> list[str]:
    """``mpirun`` command for ``n`` ranks running ``program`` with this Python."""
    from hoplite_mpi.cli import mpirun_command

    cmd = mpirun_command(n, [], ft=ft)
    return cmd[:-2] + list(program)   # drop "-m hoplite_mpi": program gives its own


def run_job(n: int, *program: str, timeout: float = 600, env: dict | None = None,
            cwd: str | None = None, ft: bool = False) -> subprocess.CompletedProcess:
    """Run ``mpirun -n n <python> program...`` (``ft``: with ULFM); kill it (and fail) after
    ``timeout`` seconds."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return run_bounded(mpirun_cmd(n, *program, ft=ft), timeout, full_env, cwd or ROOT)


def run_bounded(cmd: list[str], timeout: float, env: dict, cwd: str) -> subprocess.CompletedProcess:
    """Run the MPI job ``cmd`` in a session of its own; after ``timeout`` seconds ask its ranks
    where they are, kill the whole job (mpirun, its daemons, every rank) and fail the test."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _ask_ranks_where_they_are(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"MPI job did not finish within {timeout} s: {cmd}\n"
                    f"stdout: {out[-4000:]}\nstderr: {err[-16000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _ask_ranks_where_they_are(pid: int, wait: float = 3.0) -> None:
    """A job overran its timeout: make every Python process under ``pid`` print its threads'
    stacks (SIGUSR1) and its runtime state (SIGUSR2) to stderr (hoplite_mpi/debug.py), then give
    mpirun ``wait`` seconds to forward the output."""
    import psutil
    ranks = []
    try:
        for p in psutil.Process(pid).children(recursive=True):
            try:
                if "python" in os.path.basename(p.exe() or ""):
                    ranks.append(p)
            except psutil.Error:
                pass
    except psutil.Error:
        return
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        for p in ranks:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
    psutil.wait_procs(ranks, timeout=wait)   # (they do not exit: this is the bounded wait)


def check_results(script: str, n: int, tmp_path_factory, cache: dict, timeout: float = 900,
                  *args: str, ft: bool = False) -> dict:
    """Run a checks script (``tests/mpi/checks.py`` style) as ONE job on ``n`` ranks, once.

    ``mpirun -n n python -m hoplite_mpi script --json OUT *args`` (``ft``: under ULFM, as
    :func:`run_job`); the result is kept in
    ``cache`` under ``n``: ``{"checks": {name: record}, "returncode", "output"}``.  The script
    rewrites OUT after each check, so the checks that finished are reported even when the job
    is killed at ``timeout`` (returncode None).
    """
    if n not in cache:
        stem = os.path.splitext(os.path.basename(script))[0]
        out = tmp_path_factory.mktemp(f"{stem}-ranks{n}") / "results.json"
        try:
            proc = run_job(n, "-m", "hoplite_mpi", script, "--json", str(out), *args,
                           timeout=timeout, ft=ft)
            returncode, output = proc.returncode, proc.stdout[-4000:] + proc.stderr[-4000:]
        except pytest.fail.Exception as exc:     # run_job's timeout
            returncode, output = None, str(exc)[-8000:]
        got = {}
        if out.exists():
            got = {r["check"]: r for r in json.loads(out.read_text())}
        cache[n] = {"checks": got, "returncode": returncode, "output": output}
    return cache[n]


def assert_check_ok(results: dict, name: str) -> None:
    """Fail with the check's own error, or with the job's output if the check did not run."""
    rec = results["checks"].get(name)
    assert rec is not None, (f"check {name} did not run (job rc={results['returncode']}):\n"
                             f"{results['output']}")
    assert rec["ok"], rec.get("error")


@pytest.fixture(autouse=True)
def _own_mpi_session_dir(monkeypatch):
    """Every test's MPI jobs keep their session directory in a fresh one of their own (see
    hoplite_mpi.cli.own_session_dir: a stale one left by a killed job whose mpirun had the same
    pid stops a job at start-up once pids wrap, as they do many times in one run of the suite)."""
    from hoplite_mpi.cli import SESSION_DIR_VAR, own_session_dir

    monkeypatch.delenv(SESSION_DIR_VAR, raising=False)
    with own_session_dir() as env:
        monkeypatch.setenv(SESSION_DIR_VAR, env[SESSION_DIR_VAR])
        yield


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable


def pytest_addoption(parser):
    parser.addoption("--soak", type=int, default=0, metavar="N",
                     help="tests/test_random_workload.py: also run N more random-workload seeds")
    parser.addoption("--without-fixed", action="store_true", default=False,
                     help="tests/test_random_workload.py: leave out the inputs of the bugs found "
                          "and fixed (FIXED in tests/mpi/random_workload.py)")
    parser.addoption("--sim-seeds", type=int, default=0, metavar="N",
                     help="tests/test_simulation.py: a soak of N simulation seeds (from "
                          "--sim-start, default 1000) instead of the CI seeds")
    parser.addoption("--sim-start", type=int, default=1000, metavar="S",
                     help="tests/test_simulation.py: first seed of --sim-seeds")
    parser.addoption("--sim-seed", type=int, default=None, metavar="S",
                     help="tests/test_simulation.py: replay simulation seed S (its log shown)")
    parser.addoption("--slurm-slow", action="store_true", default=False,
                     help="tests/test_slurm.py: also the durable job drained by SLURM's own "
                          "--signal before a 2-minute time limit (~4 min)")
    parser.addoption("--durable-seeds", type=int, default=0, metavar="N",
                     help="tests/test_durable_mpi.py: the driver-kill test over N seeds "
                          "(default: the CI seeds)")
