"""Jobs across three simulated hosts (issue 13): network namespaces joined by a bridge
(tests/hosts/, tests/multihost.py), Open MPI over TCP between every pair of ranks, one PRRTE
daemon per host.  Ranks of one host share its namespace, so the runtime's doorbells reach only
ranks of the same host; a rank alone on its host is woken by nothing but its own polling.

Checked: the seed workload; random workloads against their sequential reference; reduce,
allreduce and broadcast of 1 KiB-64 MiB with exact results on every rank; the fault workload
with the driver alone on its host; a worker SIGKILLed mid-reduce under ULFM (results exact).
Skipped, with the reason, where namespaces cannot be made (not root, no iproute2).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

import multihost as M
from conftest import HERE, ROOT, _ask_ranks_where_they_are, run_bounded

pytestmark = [pytest.mark.multihost,
              pytest.mark.skipif(bool(M.unavailable()), reason=M.unavailable() or "-")]

BOUND = 240    # seconds: a job across hosts that has not ended by then is a failure (killed)


@pytest.fixture(scope="module")
def hosts3():
    why = M.up(3)
    if why:
        pytest.skip(why)
    yield [M.host(k) for k in (1, 2, 3)]
    M.down()


def run_across(placement: dict, *program: str, timeout: float = BOUND, env: dict | None = None,
               ft: bool = True, map_by: str = "slot") -> subprocess.CompletedProcess:
    """``python -m hoplite_mpi PROGRAM...`` on ranks placed per ``placement`` (host -> ranks,
    rank 0 on the first host); the whole job is killed (and the test fails) after ``timeout``."""
    full_env = M.job_env(dict(os.environ, **(env or {})))
    cmd = M.mpirun_command(placement, [sys.executable, "-m", "hoplite_mpi", *program], ft=ft,
                           map_by=map_by)
    try:
        return run_bounded(cmd, timeout, full_env, ROOT)
    finally:
        shutil.rmtree(full_env["HM_HOSTS_TMP"], ignore_errors=True)


def test_seed_workload(hosts3):
    h1, h2, h3 = hosts3
    proc = run_across({h1: 2, h2: 1, h3: 1}, "-m", "hoplite_mpi.examples.seed_tasks", "--lists", "20")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_collectives_exact_on_every_rank(hosts3, tmp_path):
    h1, h2, h3 = hosts3
    out = tmp_path / "coll.json"
    proc = run_across({h1: 2, h2: 1, h3: 1}, os.path.join(HERE, "mpi", "multihost_collectives.py"),
                      "--sizes", "1K,64K,1M,16M,64M", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["hosts"] == {"0": h1, "1": h1, "2": h2, "3": h3}, got["hosts"]   # really spread
    assert len(got["results"]) == 15 and all(r["ok"] for r in got["results"]), got["results"]
    # every rank rings the ranks of the other hosts by UDP (transport/doorbell.py)
    others = {0: [2, 3], 1: [2, 3], 2: [0, 1, 3], 3: [0, 1, 2]}
    assert {int(r): v for r, v in got["udp_bells"].items()} == others, got["udp_bells"]


def test_collectives_with_ranks_round_robin_over_the_hosts(hosts3, tmp_path):
    """Ranks alternate between hosts: host-aware placement reorders the reduce's inputs (the
    results must not change) and chains broadcast copies within hosts."""
    h1, h2, h3 = hosts3
    out = tmp_path / "coll.json"
    proc = run_across({h1: 2, h2: 2, h3: 2}, os.path.join(HERE, "mpi", "multihost_collectives.py"),
                      "--sizes", "1K,1M,16M", "--json", str(out), map_by="node")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["hosts"] == {str(r): (h1, h2, h3)[r % 3] for r in range(6)}, got["hosts"]
    assert len(got["results"]) == 9 and all(r["ok"] for r in got["results"]), got["results"]


def test_random_workloads_against_their_reference(hosts3):
    h1, h2, h3 = hosts3
    seeds = 6
    proc = run_across({h1: 1, h2: 2, h3: 1}, os.path.join(HERE, "mpi", "random_workload.py"),
                      "--seed", "900", "--seeds", str(seeds), "--ops", "60")
    assert proc.returncode == 0 and f"DONE {seeds} seeds, 0 failed" in proc.stdout, (
        proc.stdout[-4000:] + proc.stderr[-3000:])


FAULT = os.path.join(HERE, "mpi", "fault_workload.py")


def test_driver_alone_on_its_host(hosts3, tmp_path):
    """Rank 0 alone on h1: no doorbell of another rank reaches it (a chain of 200 tasks, arrays
    between workers, a broadcast, a reduce and an allreduce)."""
    from test_faults import EXPECTED
    h1, h2, h3 = hosts3
    out = tmp_path / "fault.json"
    proc = run_across({h1: 1, h2: 2, h3: 1}, FAULT, "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert {k: got[k] for k in EXPECTED} == EXPECTED and got["dead"] == [], got


@pytest.mark.parametrize("kill", ["3:reduce:1", "2:combine:2"])
def test_a_worker_killed_mid_reduce(hosts3, tmp_path, kill):
    from test_faults import EXPECTED, _no_ulfm
    if _no_ulfm():
        pytest.skip(_no_ulfm())
    h1, h2, h3 = hosts3
    out = tmp_path / "fault.json"
    proc = run_across({h1: 1, h2: 1, h3: 2}, FAULT, "--json", str(out),
                      env={"HOPLITE_MPI_KILL": kill})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert {k: got[k] for k in EXPECTED} == EXPECTED, (got, proc.stderr[-4000:])
    dead = int(kill.split(":")[0])
    if got["dead"] == []:
        pytest.skip(f"{kill}: this run placed no such reduce step on rank {dead}")
    assert got["dead"] == [dead] and got["reduces_replanned"] >= 1, (got, proc.stderr[-4000:])


def test_a_lost_host_ends_the_job_with_a_status_that_names_it(hosts3):
    """The whole of h3 (its PRRTE daemon and ranks) SIGKILLed mid-job: Open MPI's runtime ends
    the job and mpirun exits 0; `hoplite-mpi run` must exit 75 and name the host (jobwatch.py)."""
    import threading
    h1, h2, h3 = hosts3
    env = M.job_env()
    cmd = M.hoplite_run_command({h1: 1, h2: 2, h3: 1},
                                [os.path.join(HERE, "mpi", "busy_loop.py"), "--seconds", "120"])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT, start_new_session=True)
    lines: list[str] = []
    running = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("RUNNING"):
                running.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert running.wait(90), "the job did not start: " + "".join(lines)[-2000:]
        assert M.hosts("kill-host", h3).returncode == 0
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            _ask_ranks_where_they_are(proc.pid)
            pytest.fail("the job went on for 60 s after its host h3 was killed")
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(5)
        shutil.rmtree(env["HM_HOSTS_TMP"], ignore_errors=True)
        M.down()          # (h3's namespace lost its processes: make the hosts afresh)
        assert M.up(3) == ""
    out = "".join(lines)
    assert not any(line.startswith("DONE") for line in lines), out
    assert proc.returncode == 75, f"exit {proc.returncode}\n{out[-2000:]}\n{err[-3000:]}"
    assert f"lost host {h3}" in err, err[-3000:]
