"""What ``hoplite-mpi run`` learns about a job beyond mpirun's exit status (issue 13).

With the Open MPI wheel (PRRTE 3.0), the loss of a whole host (its PRRTE daemon and all its
ranks) ends the job even under ULFM, and ``mpirun`` then exits **0**: the failure is recorded
on the daemon job, not in mpirun's exit status (PRRTE's errmgr_dvm.c; a fix exists only on
PRRTE's master).  So the launcher decides for itself:

- the driver (rank 0, ``python -m hoplite_mpi``) writes its exit status to the file named by
  :data:`STATUS_VAR` when it ends normally (:func:`write_status`); no file means it was killed;
- mpirun's output is forwarded line by line and scanned for PRRTE's reports of a lost daemon
  (:data:`LOST_HOST`: "Remote daemon: ... on node H" on stderr, "Remote host: H" in the "daemon
  failed to report back" block on stdout), which name the host.

:func:`run_watched` returns the driver's status, or :data:`EXIT_JOB_LOST` (75, sysexits'
EX_TEMPFAIL: a re-run may succeed, e.g. a SLURM ``--requeue``) when the driver did not finish
although mpirun exited 0, after printing which host was lost when mpirun named one.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, Any, Optional

STATUS_VAR = "HOPLITE_MPI_STATUS_FILE"
EXIT_JOB_LOST = 75
EXIT_DRAINED = 79     # the driver drained (durable workflows): run again to resume
LOST_HOST = (re.compile(r"Remote daemon:\s*\S+\s+on node\s+(\S+)"),
             re.compile(r"Remote host:\s+(\S+)"))


def write_status(status: int) -> None:
    """(driver) Record that the program ended with ``status`` (no-op unless launched by
    ``hoplite-mpi run``).  Atomic: written to a temporary name, then renamed."""
    path = os.environ.get(STATUS_VAR)
    if not path:
        return
    try:
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.write(f"{int(status)}\n")
        os.replace(tmp, path)
    except (OSError, ValueError):
        pass


def read_status(path: str) -> Optional[int]:
    try:
        with open(path) as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


class _Forward(threading.Thread):
    """Copies ``src`` to ``dst`` as it comes, line by line, and keeps the hosts named by
    :data:`LOST_HOST` patterns."""

    def __init__(self, src: IO[bytes], dst: IO[bytes], hosts: list) -> None:
        super().__init__(daemon=True)
        self.src, self.dst, self.hosts = src, dst, hosts

    def run(self) -> None:
        for line in iter(self.src.readline, b""):
            try:
                self.dst.write(line)
                self.dst.flush()
            except (OSError, ValueError):
                pass
            text = line.decode("utf-8", "replace")
            if "Remote" in text:
                for pattern in LOST_HOST:
                    m = pattern.search(text)
                    if m and m.group(1) not in self.hosts:
                        self.hosts.append(m.group(1))


class _DrainRequest:
    """(launcher) SIGUSR1 or SIGTERM asks rank 0 to drain instead of ending the job: the first
    one writes the drain file rank 0 watches (roles/drain.py) and is not forwarded to mpirun
    (USR1 would make every rank dump its stacks, TERM ends the job).  A second SIGTERM, or the
    job still running ``bound`` seconds after the first signal, terminates mpirun."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, path: str, proc: Optional[Any], bound: float) -> None:
        self.path, self.proc, self.bound = path, proc, bound
        self.asked = False
        self.old: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            self.old[sig] = signal.signal(sig, self._on_signal)

    def restore(self) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.asked:
            if signum == signal.SIGTERM and self.proc is not None:
                print(f"hoplite-mpi: second {name}: ending the job", file=sys.stderr, flush=True)
                self.proc.terminate()
            return
        self.asked = True
        tmp = f"{self.path}.{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump({"reason": f"{name} to hoplite-mpi run", "at": time.time()}, fh)
        os.replace(tmp, self.path)
        print(f"hoplite-mpi: {name}: draining (rank 0 stops starting tasks, lets running ones "
              f"and their checkpoints finish, then the job exits with {EXIT_DRAINED})",
              file=sys.stderr, flush=True)
        threading.Thread(target=self._bound, daemon=True).start()

    def _bound(self) -> None:
        deadline = time.monotonic() + self.bound
        while self.proc is None and time.monotonic() < deadline:   # (mpirun not started yet)
            time.sleep(0.05)
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"hoplite-mpi: the job did not drain within {self.bound:.0f} s; ending it",
                  file=sys.stderr, flush=True)
            self.proc.terminate()


def _drain_bound(env: dict) -> float:
    """Seconds after a drain request before the launcher ends the job anyway: the drain's grace
    (``HOPLITE_MPI_DRAIN_GRACE``, default 60) plus time to exit."""
    try:
        grace = float(env.get("HOPLITE_MPI_DRAIN_GRACE", "60"))
    except ValueError:
        grace = 60.0
    return grace + 60.0


def run_watched(cmd: list[str], env: dict, driver: bool = True) -> int:
    """Run the job ``cmd`` (mpirun ...) with ``env``, forwarding its output; return the job's
    exit status as described in the module docstring (``driver``: the job runs ``python -m
    hoplite_mpi``, whose rank 0 reports its status; otherwise only mpirun's status counts)."""
    fd, status_path = tempfile.mkstemp(prefix="hoplite-mpi-status.")
    os.close(fd)
    os.unlink(status_path)      # (the driver creates it when it ends normally)
    drain_path = status_path + ".drain"
    env = dict(env, **{STATUS_VAR: status_path})
    if driver:
        env["HOPLITE_MPI_DRAIN_FILE"] = drain_path
    hosts: list[str] = []
    # (the handlers before mpirun starts: a USR1 during its start-up killed the launcher, 138)
    drain = _DrainRequest(drain_path, None, _drain_bound(env))
    if driver:
        drain.install()
    proc = drain.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    threads = [_Forward(proc.stdout, sys.stdout.buffer, hosts),
               _Forward(proc.stderr, sys.stderr.buffer, hosts)]
    for t in threads:
        t.start()
    try:
        while True:
            try:
                rc = proc.wait()
                break
            except InterruptedError:     # (a drain request's handler ran)
                continue
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        rc = 130
    for t in threads:
        t.join(timeout=5)
    drain.restore()
    status = read_status(status_path)
    try:
        os.unlink(status_path)
    except OSError:
        pass
    where = f": lost host {', '.join(hosts)}" if hosts else ""
    if rc == 0 and status is None and driver:
        print(f"hoplite-mpi: the job ended before the driver (rank 0) finished{where}; "
              f"mpirun exited 0 (Open MPI ends a job that loses a whole host); exit status "
              f"{EXIT_JOB_LOST}", file=sys.stderr, flush=True)
        return EXIT_JOB_LOST
    if hosts:
        print(f"hoplite-mpi: job ended with status {rc}{where}", file=sys.stderr, flush=True)
    return rc if rc != 0 or status is None else status
