"""Helpers for tests that launch real MPI jobs as subprocesses (each with a timeout)."""
from __future__ import annotations

import os
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
            cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run ``mpirun -n n <python> program...``; kill it (and fail) after ``timeout`` seconds."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    try:
        return subprocess.run(mpirun_cmd(n, *program), capture_output=True, text=True,
                              timeout=timeout, env=full_env, cwd=cwd or ROOT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"MPI job did not finish within {timeout} s: {exc.cmd}\n"
                    f"stdout: {exc.stdout}\nstderr: {exc.stderr}")


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable
