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

import os
import re
import subprocess
import sys
import tempfile
import threading
from typing import IO, Optional

STATUS_VAR = "HOPLITE_MPI_STATUS_FILE"
EXIT_JOB_LOST = 75
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


def run_watched(cmd: list[str], env: dict, driver: bool = True) -> int:
    """Run the job ``cmd`` (mpirun ...) with ``env``, forwarding its output; return the job's
    exit status as described in the module docstring (``driver``: the job runs ``python -m
    hoplite_mpi``, whose rank 0 reports its status; otherwise only mpirun's status counts)."""
    fd, status_path = tempfile.mkstemp(prefix="hoplite-mpi-status.")
    os.close(fd)
    os.unlink(status_path)      # (the driver creates it when it ends normally)
    env = dict(env, **{STATUS_VAR: status_path})
    hosts: list[str] = []
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    threads = [_Forward(proc.stdout, sys.stdout.buffer, hosts),
               _Forward(proc.stderr, sys.stderr.buffer, hosts)]
    for t in threads:
        t.start()
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        rc = 130
    for t in threads:
        t.join(timeout=5)
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
