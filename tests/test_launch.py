"""The three launch modes, with 1, 2 and 4 ranks, and the hoplite-mpi command."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import HERE, ROOT, run_job
from hoplite_mpi.cli import SESSION_DIR_VAR, mpirun_command, own_session_dir

RANKS = (1, 2, 4)


@pytest.mark.parametrize("n", RANKS)
def test_module_launch_runs_script_on_rank0_with_args(n):
    proc = run_job(n, "-m", "hoplite_mpi", os.path.join(HERE, "mpi", "launch_module.py"), "41",
                   timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("RESULT") == 1 and "ARGS ['41'] RESULT 42" in proc.stdout


def test_module_launch_passes_exit_status():
    proc = run_job(2, "-m", "hoplite_mpi", os.path.join(HERE, "mpi", "launch_module.py"), "1", "3",
                   timeout=300)
    assert "RESULT 2" in proc.stdout
    assert proc.returncode == 3


@pytest.mark.parametrize("n", RANKS)
@pytest.mark.parametrize("flag", ["", "--no-shutdown"])
def test_init_launch(n, flag):
    args = [os.path.join(HERE, "mpi", "launch_init.py")] + ([flag] if flag else [])
    proc = run_job(n, *args, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("RESULT") == 1 and f"RESULT {sum(2 * i for i in range(100))}" in proc.stdout


def test_plain_python_without_mpirun():
    proc = subprocess.run([sys.executable, os.path.join(HERE, "mpi", "launch_init.py")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "RESULT 9900" in proc.stdout


@pytest.mark.parametrize("n", RANKS)
def test_executor_in_spmd_program_under_pytest_mpi(n):
    proc = run_job(n, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--with-mpi",
                   os.path.join(HERE, "mpi", "spmd_executor_pytest.py"), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 passed" in proc.stdout or ("1 passed" in proc.stdout and n == 1)


def test_cli_run_and_info():
    script = os.path.join(HERE, "mpi", "launch_module.py")
    proc = subprocess.run([sys.executable, "-m", "hoplite_mpi.cli", "run", "-n", "2", script, "5"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "RESULT 6" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "hoplite_mpi.cli", "run", "-n", "2", script, "5", "4"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 4
    proc = subprocess.run([sys.executable, "-m", "hoplite_mpi.cli", "run", "-n", "3", "info"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ranks:             3" in proc.stdout
    assert "MPI library:" in proc.stdout and "thread level:      MULTIPLE" in proc.stdout
    assert "ULFM (rank-loss detection): on" in proc.stdout


def test_mpirun_command_flags():
    cmd = mpirun_command(4, ["s.py", "a"], mpirun="mpirun", flavour="openmpi", cores=2, uid=0)
    assert cmd[:3] == ["mpirun", "-n", "4"]
    assert "--oversubscribe" in cmd and "--allow-run-as-root" in cmd
    assert cmd[cmd.index("--with-ft") + 1] == "ulfm"
    assert cmd[-3:] == ["hoplite_mpi", "s.py", "a"]
    assert cmd[cmd.index("oob_tcp_keepalive_time") - 1:][:3] == ["--prtemca", "oob_tcp_keepalive_time", "5"]
    cmd = mpirun_command(2, ["s.py"], mpirun="mpirun", flavour="openmpi", cores=2, uid=1000, ft=False)
    assert "--oversubscribe" not in cmd and "--allow-run-as-root" not in cmd and "--with-ft" not in cmd
    cmd = mpirun_command(8, ["s.py"], mpirun="mpiexec", flavour="mpich", cores=2, uid=0)
    assert cmd[:3] == ["mpiexec", "-n", "8"] and "--oversubscribe" not in cmd and "--with-ft" not in cmd
    assert "--prtemca" not in cmd


def test_a_stale_session_dir_left_by_a_dead_mpirun_with_our_pid_does_not_stop_the_job():
    # CI, 2026-12-01: after pids wrapped, three jobs died at start-up with "The PMIx server's
    # listener thread failed to start" (exit 213): their mpirun got the pid of one whose job had
    # ended abnormally and found its stale rendezvous file.  Here the shell plants such a file
    # for its own pid, then execs mpirun (same pid): the trap without own_session_dir (so that
    # this test can fail), then the job with it.
    base = tempfile.mkdtemp(prefix="hm.")     # short: PMIx socket paths must fit in 108 bytes
    plant = 'mkdir -p "$TMPDIR/ompi.$$" && touch "$TMPDIR/ompi.$$/pmix.$(hostname).tool" && exec "$@"'
    cmd = ["bash", "-c", plant, "plant"] + mpirun_command(1, [], ft=False)[:-2] + ["-c", "pass"]
    try:
        env = {k: v for k, v in os.environ.items() if k != SESSION_DIR_VAR}
        env["TMPDIR"] = base
        trapped = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        assert trapped.returncode != 0 and "listener" in trapped.stderr, trapped
        with own_session_dir(env) as fresh:
            own = fresh[SESSION_DIR_VAR]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=fresh)
        assert proc.returncode == 0, proc.stderr
        assert not os.path.exists(own)            # removed with the job
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_module_launch_finds_modules_next_to_the_script_on_every_rank(tmp_path):
    # the helper module is imported by reference on the workers, so its folder must be on their path
    (tmp_path / "helper_mod.py").write_text("def triple(x):\n    return 3 * x\n")
    (tmp_path / "main_script.py").write_text(
        "import hoplite_mpi as hm\nimport helper_mod\n"
        "print('RESULT', hm.get(hm.remote(helper_mod.triple).remote(14), timeout=120))\n")
    proc = run_job(3, "-m", "hoplite_mpi", str(tmp_path / "main_script.py"), timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT 42" in proc.stdout


def test_signals_make_a_rank_print_its_stacks_and_its_state(tmp_path):
    # what a hung job's ranks print when the test harness (or a user) signals them
    # (hoplite_mpi/debug.py): here a task signals its own worker process while it runs
    (tmp_path / "signals.py").write_text(
        "import os, signal, time\nimport hoplite_mpi as hm\n"
        "@hm.remote\ndef poke(sig):\n    os.kill(os.getpid(), sig)\n    time.sleep(0.5)\n"
        "    return os.getpid()\n"
        "hm.init()\n"
        "print('PIDS', hm.get(poke.options(rank=1).remote(int(signal.SIGUSR1)), timeout=120),\n"
        "      hm.get(poke.options(rank=1).remote(int(signal.SIGUSR2)), timeout=120))\n")
    proc = run_job(2, "-m", "hoplite_mpi", str(tmp_path / "signals.py"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]      # neither signal ends the rank
    assert "PIDS" in proc.stdout
    # SIGUSR1: every thread's stack, the running task's included
    assert "in run" in proc.stderr and "engine.py" in proc.stderr and "in poke" in proc.stderr, proc.stderr[-3000:]
    # SIGUSR2: the runtime state of rank 1
    assert "---- hoplite_mpi rank 1 state ----" in proc.stderr, proc.stderr[-3000:]
    assert "streams: " in proc.stderr and "store: " in proc.stderr


@pytest.mark.parametrize("user", [None, "send,put"])
def test_mpi_defaults_are_set_before_mpi_starts_and_never_override_the_user(user):
    """hoplite_mpi/mpi_defaults.py: the TCP BTL without ``put`` (a rank SIGKILLed mid-transfer
    otherwise deadlocks a live peer inside Open MPI 5.0's ob1+TCP: tests/test_multihost.py's
    killed-mid-reduce test hung 2 runs in 6 without it, 0 in 20 with it)."""
    env = {k: v for k, v in os.environ.items() if k != "OMPI_MCA_btl_tcp_flags"}
    if user:
        env["OMPI_MCA_btl_tcp_flags"] = user
    code = ("import os, sys, hoplite_mpi; assert 'mpi4py.MPI' not in sys.modules; "
            "print(os.environ['OMPI_MCA_btl_tcp_flags'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    flags = proc.stdout.strip().split(",")
    assert flags == (user.split(",") if user else ["send", "inplace", "need-ack", "need-csum"])
