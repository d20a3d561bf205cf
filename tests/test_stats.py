"""``hm.stats()`` of every rank and ``hoplite-mpi run --stats`` (hoplite_mpi/rankstats.py,
issue 15) on a real 4-rank job: tasks run per rank, object bytes sent = received over the job
and at least what the workload moved, busy time of a 0.3 s task, idle CPU within the process's
CPU, the table printed at the end, a typed error for all_ranks off the driver."""
from __future__ import annotations

import json
import os
import sys

from conftest import HERE, ROOT, run_bounded

WORKLOAD = os.path.join(HERE, "mpi", "stats_workload.py")


def _run(tmp_path, *options: str):
    cmd = [sys.executable, "-m", "hoplite_mpi.cli", "run", "-n", "4", "--no-ft", *options,
           WORKLOAD]
    proc = run_bounded(cmd, 300, dict(os.environ, PYTHONUNBUFFERED="1"), ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return proc, json.loads(line[7:])


def test_every_ranks_stats_and_the_table_at_the_end(tmp_path):
    proc, got = _run(tmp_path, "--stats")
    assert got["sums"] == [float(1 << 19)] * 9
    assert got["errors"][0] == "ValueError: meant to fail"
    assert got["errors"][1].startswith("RuntimeError: hm.stats(all_ranks=True) is called on the driver")
    stats = {int(r): s for r, s in got["stats"].items()}
    assert sorted(stats) == [0, 1, 2, 3] and all(s["rank"] == r for r, s in stats.items())
    expected = {int(r): n for r, n in got["expected_tasks"].items()}
    assert {r: stats[r]["tasks_run"] for r in (1, 2, 3)} == expected and stats[0]["tasks_run"] == 0
    # object bytes: every completed send is a completed receive somewhere (nothing in flight);
    # each worker received the 4 MiB array (from rank 0 or, relayed, from another worker)
    sent = sum(s["bytes_sent"] for s in stats.values())
    received = sum(s["bytes_received"] for s in stats.values())
    assert sent == received
    assert all(stats[r]["bytes_received"] >= got["nbytes"] for r in (1, 2, 3))
    assert stats[0]["bytes_sent"] >= got["nbytes"] and stats[0]["serves"] >= 1
    assert stats[1]["busy_s"] >= 0.3
    for r in (1, 2, 3):
        s = stats[r]
        assert 0 <= s["idle_cpu_s"] <= s["cpu_s"] and s["busy_s"] <= s["wall_s"]
        assert s["control_batches_received"] >= s["tasks_run"]
    assert stats[0]["idle_cpu_s"] is None and stats[0]["scheduler"]["errored"] == 2
    # the table on the driver's stderr, one row per rank, matching what was gathered then
    table = proc.stderr[proc.stderr.index("==== hoplite_mpi job stats ===="):]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = line.split()
        if cells and (cells[0].isdigit() or cells[0] == "all"):
            rows[cells[0]] = cells
    assert set(rows) == {"0", "1", "2", "3", "all"}
    assert {int(r): int(rows[r][1]) for r in ("1", "2", "3")} == expected
    assert int(rows["all"][1]) == sum(expected.values())
    assert "tasks: done" in table and "errored 2" in table


def test_no_table_unless_asked(tmp_path):
    proc, got = _run(tmp_path)
    assert "hoplite_mpi job stats" not in proc.stderr
    assert sorted(got["stats"]) == ["0", "1", "2", "3"]
