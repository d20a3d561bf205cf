"""Progress bars (hoplite_mpi/progress.py, issue 15) in a real job: hm.progress waits for
every ref and draws done/failed on a tqdm bar; without a terminal and unasked nothing is drawn;
Executor.map's results counted on a bar."""
from __future__ import annotations

import json
import os

from conftest import HERE, run_job


def test_progress_bars_count_done_and_failed_and_stay_silent_off_a_terminal():
    proc = run_job(3, "-m", "hoplite_mpi", os.path.join(HERE, "mpi", "progress_workload.py"),
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    got = json.loads(line[len("RESULT "):])
    assert got["done"] and got["order"] == 5 and got["values"]
    assert got["bar"].startswith("slow: 100%") and "20/20" in got["bar"] and "failed=1" in got["bar"]
    assert got["quiet"] == ""                        # (a StringIO is not a terminal)
    assert got["mapped"].startswith("square: 100%") and "30/30" in got["mapped"]
