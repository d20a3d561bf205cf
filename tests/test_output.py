"""Worker output forwarded to the driver (hoplite_mpi/output.py, issue 15), in real MPI jobs:
every line of every task arrives once, labelled with its task, pid and rank, in per-task
order; a failing task's lines arrive before its error; a worker SIGKILLed after printing still
gets its lines out; ``forward_output=False`` leaves workers' output unlabelled."""
from __future__ import annotations

import json
import os
import re

import pytest

from conftest import HERE, run_job

WORKLOAD = os.path.join(HERE, "mpi", "output_workload.py")
LINE = re.compile(r"^\((\w+) pid=(\d+), rank=(\d+)\) (.*)$")


def _labelled(text: str) -> list[tuple]:
    return [m.groups() for m in map(LINE.match, text.splitlines()) if m]


def _result(stdout: str) -> dict:
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_every_line_arrives_once_labelled_and_in_order():
    tasks = 12                                  # 4 ranks: 3 workers x 4 tasks x 250 lines
    proc = run_job(4, "-m", "hoplite_mpi", WORKLOAD, str(tasks), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    who = _result(proc.stdout)["who"]
    out, err = _labelled(proc.stdout), _labelled(proc.stderr)
    for t in range(tasks):
        rank, pid = who[t]
        mine = [(n, p, r, text) for n, p, r, text in out if text.startswith(f"task {t} ")]
        assert all((n, int(p), int(r)) == ("emit", pid, rank) for n, p, r, _ in mine), mine[:3]
        lines = [text for *_, text in mine]
        expected = [f"task {t} line {i}" for i in range(250) if i % 50 != 49] + [f"task {t} partial"]
        assert lines == expected                 # each once, in the order written
        warned = [text for n, p, r, text in err if f"task {t} line" in text]
        assert warned == [f"task {t} line {i}" for i in range(49, 250, 50)]   # logging: stderr
    assert len(out) == tasks * 246 + 1          # (+ the failing task's line)


def test_a_failing_task_s_lines_arrive_before_its_error():
    proc = run_job(3, "-m", "hoplite_mpi", WORKLOAD, "2", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    printed = next(i for i, line in enumerate(lines) if line.endswith("printed before the error"))
    assert LINE.match(lines[printed]).group(1) == "fails"
    assert printed < lines.index("DRIVER SAW THE ERROR")


def test_a_killed_worker_s_last_lines_arrive():
    from test_faults import _no_ulfm
    if _no_ulfm():
        pytest.skip(_no_ulfm())
    proc = run_job(3, "-m", "hoplite_mpi", WORKLOAD, "2", "--kill", timeout=300, ft=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    words = [i for i, line in enumerate(lines) if line.endswith("last words before SIGKILL")]
    assert len(words) == 1 and LINE.match(lines[words[0]]).group(3) == "1"
    assert any(line.startswith("DRIVER SAW THE DEATH") for line in lines[words[0]:])


def test_forwarding_can_be_turned_off():
    proc = run_job(3, "-m", "hoplite_mpi", WORKLOAD, "2", timeout=300,
                   env={"HOPLITE_MPI_FORWARD_OUTPUT": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _labelled(proc.stdout) == []
    assert proc.stdout.count("task 0 line 0") == 1          # (mpirun forwarded it, unlabelled)
