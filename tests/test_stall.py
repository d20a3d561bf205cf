"""The stall report (hoplite_mpi/roles/stall.py, issue 15) in a real job: a rank is SIGSTOPped
while the driver waits for the result of a task pinned to it; within ``stall_timeout`` plus
the reply wait, rank 0 prints one report that names the silent rank, the object waited for and
the task that makes it.  Plain mpirun (no ULFM: no heartbeat declares the stopped rank dead)."""
from __future__ import annotations

import os
import re

from conftest import HERE, run_job

WORKLOAD = os.path.join(HERE, "mpi", "stall_workload.py")


def test_a_stopped_rank_is_named_in_the_stall_report():
    proc = run_job(3, "-m", "hoplite_mpi", WORKLOAD, "12", timeout=240,
                   env={"HOPLITE_MPI_STALL_TIMEOUT": "2"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "RESULT ok" in proc.stdout
    oid = re.search(r"OBJECT (\S+)", proc.stdout).group(1)
    report = proc.stderr[proc.stderr.index("==== hoplite_mpi stall report"):]
    report = report[:report.index("==== end of stall report ====")]
    assert "no progress for" in report
    assert "silent ranks (no answer within 5 s): [2]" in report
    assert "likely culprit: rank(s) [2]" in report
    assert re.search(rf"the driver waits for {re.escape(oid)} \(made by task \S+ make, running on rank 2\)",
                     report), report[:2000]
    assert "---- hoplite_mpi rank 1 state ----" in report     # the ranks that answered


def test_no_report_without_a_stall():
    proc = run_job(3, "-m", "hoplite_mpi", os.path.join(HERE, "mpi", "launch_module.py"), "5",
                   timeout=240, env={"HOPLITE_MPI_STALL_TIMEOUT": "0.5"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stall report" not in proc.stderr
