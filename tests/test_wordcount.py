"""hoplite_mpi.examples.wordcount: the pure helpers in-process, and the example as real MPI jobs
(via ``run_job``: every job has a timeout).

The jobs' results are checked against counts computed here, independently of the example's code:
by hand for a small corpus written to a temp directory, and with this file's own regex and decoding
for a slice of the standard library.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from collections import Counter

import pytest

from conftest import run_job
from hoplite_mpi.examples import wordcount as wc

JOB_TIMEOUT = 300        # seconds for one MPI job
MODULE = ("-m", "hoplite_mpi", "-m", "hoplite_mpi.examples.wordcount")
TOP_LINE = re.compile(r"^\s+(\d+)\. (\S+)\s+(\d+)$", re.M)

# the small corpus and its word counts, worked out by hand from the docstring's definition
CORPUS = {
    "a.py": b"def alpha(beta):\n    return beta + 2x + x2  # alpha\n",
    "empty.py": b"",
    "sub/b.py": b"alpha \xff\xfebeta caf\xc3\xa9 _under __dunder__ 9lives\n",   # not UTF-8
    "sub/deeper/c.py": b"Alpha ALPHA alpha\n" * 3,
    "notes.txt": b"alpha alpha alpha\n",                   # not a .py file: not counted
    "sub/e.py.txt": b"alpha\n",                            # neither
}
EXPECTED = Counter({"alpha": 6, "beta": 3, "Alpha": 3, "ALPHA": 3, "def": 1, "return": 1, "x": 1,
                    "x2": 1, "caf": 1, "_under": 1, "__dunder__": 1, "lives": 1})


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    for rel, data in CORPUS.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "empty_subdir").mkdir()
    return root


def top_of(stdout: str) -> list[tuple[str, int]]:
    """The ``(word, count)`` lines the example printed, in order (ranks checked)."""
    rows = TOP_LINE.findall(stdout)
    assert [int(i) for i, _, _ in rows] == list(range(1, len(rows) + 1)), stdout
    return [(word, int(count)) for _, word, count in rows]


def ranked(counts: Counter, n: int) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


# --- pure helpers, in-process ----------------------------------------------------------------

def test_tokenize_follows_the_documented_definition():
    assert wc.tokenize("def f(x_1): return 2x+x2 # café 9lives __init__") == [
        "def", "f", "x_1", "return", "x", "x2", "caf", "lives", "__init__"]
    assert wc.tokenize("") == [] and wc.tokenize("123 4.5 \ufffd") == []
    assert wc.tokenize("Self self SELF") == ["Self", "self", "SELF"]      # case-sensitive


def test_read_text_replaces_undecodable_bytes(tmp_path):
    path = tmp_path / "bad.py"
    path.write_bytes(b"ok\xff\xfedone caf\xc3\xa9")
    assert wc.read_text(str(path)) == "ok\ufffd\ufffddone café"
    assert wc.count_words([str(path), str(path)]) == Counter({"ok": 2, "done": 2, "caf": 2})
    with pytest.raises(FileNotFoundError):
        wc.read_text(str(tmp_path / "missing.py"))


def test_partition_of_is_in_range_and_spreads_words():
    words = [f"w{i}" for i in range(2000)]
    for p in (1, 2, 3, 7):
        got = [wc.partition_of(w, p) for w in words]
        assert set(got) == set(range(p))
        assert min(Counter(got).values()) > len(words) / p / 2      # no empty/starved partition
    assert wc.partition_of("self", 4) == wc.partition_of("self", 4)
    for bad in (0, -1):
        with pytest.raises(ValueError):
            wc.partition_of("x", bad)


def test_partition_of_is_the_same_in_processes_with_different_hash_seeds():
    words = ["self", "def", "alpha", "__init__", "caf", "x2", "zlib"]
    code = ("import sys; from hoplite_mpi.examples import wordcount as wc; "
            "print([wc.partition_of(w, 5) for w in sys.argv[1:]]); print(hash('self'))")
    outs = []
    for seed in ("1", "2"):
        proc = subprocess.run([sys.executable, "-c", code, *words], capture_output=True, text=True,
                              timeout=120, env=dict(os.environ, PYTHONHASHSEED=seed))
        assert proc.returncode == 0, proc.stderr
        outs.append(proc.stdout.split("\n"))
    assert outs[0][1] != outs[1][1], "the two processes should have different str hashes"
    assert outs[0][0] == outs[1][0] == str([wc.partition_of(w, 5) for w in words])


def test_split_counts_is_a_disjoint_cover():
    counts = Counter(wc.tokenize(open(wc.__file__, encoding="utf-8").read()))
    parts = wc.split_counts(counts, 4)
    assert len(parts) == 4 and sum(len(p) for p in parts) == len(counts)
    merged = {}
    for j, part in enumerate(parts):
        assert all(wc.partition_of(w, 4) == j for w in part)
        merged.update(part)
    assert merged == counts


def test_map_and_reduce_functions(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("alpha beta beta\n")
    b.write_text("beta gamma\n")
    single = wc.map_files([str(a)], 1)                 # num_returns=1: the dict itself
    assert single == {"alpha": 1, "beta": 2}
    outs = [wc.map_files([str(p)], 3) for p in (a, b)]
    assert all(isinstance(o, tuple) and len(o) == 3 for o in outs)
    total = {}
    for j in range(3):
        total.update(wc.reduce_partition(j, 3, *(o[j] for o in outs)))
    assert total == {"alpha": 1, "beta": 3, "gamma": 1}
    wrong = next(j for j in range(3) if j != wc.partition_of("alpha", 3))
    with pytest.raises(ValueError, match="reached reducer"):
        wc.reduce_partition(wrong, 3, {"alpha": 1})


def test_list_files(corpus, tmp_path):
    got = wc.list_files(str(corpus))
    assert got == sorted(str(corpus / rel) for rel in ("a.py", "empty.py", "sub/b.py", "sub/deeper/c.py"))
    assert wc.list_files(str(corpus), max_files=2) == got[:2]
    (tmp_path / "nopy").mkdir()
    (tmp_path / "nopy" / "x.txt").write_text("alpha")
    with pytest.raises(ValueError, match="no .py files"):
        wc.list_files(str(tmp_path / "nopy"))
    with pytest.raises(FileNotFoundError):
        wc.list_files(str(tmp_path / "missing"))
    with pytest.raises(NotADirectoryError):
        wc.list_files(str(corpus / "a.py"))
    with pytest.raises(ValueError):
        wc.list_files(str(corpus), max_files=0)


def stdlib_slice(n: int) -> list[str]:
    """The first ``n`` stdlib .py files, listed here independently of the example."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for where, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages")]
        paths += [os.path.join(where, f) for f in files if f.endswith(".py")]
    return sorted(paths)[:n]


def test_default_corpus_is_the_stdlib_without_site_packages():
    got = wc.list_files(None, max_files=200)
    assert got == stdlib_slice(200)
    assert not any("site-packages" in p.split(os.sep) for p in wc.list_files())


def test_top_words_diff_and_report():
    counts = {"b": 2, "a": 2, "c": 5, "d": 1}
    assert wc.top_words(counts, 3) == [("c", 5), ("a", 2), ("b", 2)]      # ties by word
    assert wc.diff_counts(counts, dict(counts)) == []
    assert wc.diff_counts({"a": 1}, {"a": 2, "b": 1}) == ["'a': got 1, expected 2",
                                                           "'b': got 0, expected 1"]
    out = {"files": 1, "bytes": 10, "words": 3, "distinct": 2, "map_tasks": 1, "partitions": 1,
           "ranks": 2, "top": [("a", 2)], "parallel_s": 1.0, "sequential_s": 2.0, "match": False,
           "diff": ["'a': got 1, expected 2"], "routes": None, "rank0_pulls": None}
    text = wc.report(out, "DIR")
    assert "MISMATCH" in text and "'a': got 1, expected 2" in text and "matches" not in text
    assert "speed-up 2.00x" in text


# --- the example as MPI jobs --------------------------------------------------------------------

def test_small_corpus_4_ranks_moves_map_outputs_worker_to_worker(corpus):
    # map tasks are declared with inline_threshold=0: every map output moves point to point
    proc = run_job(4, *MODULE, str(corpus), "--files-per-task", "1", "--partitions", "3",
                   "--top", "50", timeout=JOB_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "4 files" in out and "23 words, 12 distinct" in out, out
    assert "4 map tasks x 3 partitions -> 3 reduce tasks on 4 ranks" in out, out
    assert "result matches the sequential collections.Counter" in out, out
    assert top_of(out) == ranked(EXPECTED, 50)
    assert "12 map outputs" in out and "12 worker-to-worker, 0 in-band" in out, out
    assert "rank 0 held none of the map outputs" in out, out


def test_small_corpus_2_ranks_and_the_route_check_can_fail(corpus):
    # 2 ranks: one worker, so one partition (num_returns=1).  With map tasks allowed to return
    # 64 KiB in-band, these tiny partitions ride through rank 0 in control messages: the check
    # must fail
    proc = run_job(2, *MODULE, str(corpus), "--files-per-task", "3", "--top", "5",
                   "--map-inline-threshold", "65536", timeout=JOB_TIMEOUT)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 map tasks x 1 partitions" in proc.stdout, proc.stdout
    assert "result matches the sequential collections.Counter" in proc.stdout
    assert top_of(proc.stdout) == ranked(EXPECTED, 5)
    assert "2 in-band via rank 0" in proc.stdout, proc.stdout
    assert "not every map output moved worker-to-worker" in proc.stderr, proc.stderr


def test_stdlib_slice_4_ranks():
    paths = stdlib_slice(200)
    expected = Counter()
    for path in paths:       # this file's own reading and tokenizing
        with open(path, "rb") as fh:
            expected.update(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", fh.read().decode("utf-8", "replace")))
    proc = run_job(4, *MODULE, "--max-files", "200", "--files-per-task", "25", timeout=JOB_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "200 files" in out and f"{sum(expected.values())} words, {len(expected)} distinct" in out, out
    assert "8 map tasks x 3 partitions" in out, out
    assert "result matches the sequential collections.Counter" in out, out
    assert top_of(out) == ranked(expected, 20)
    assert re.search(r"parallel \d+\.\d+ s   sequential \d+\.\d+ s", out), out


def test_directory_without_py_files_is_an_error_on_the_driver(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.txt").write_text("alpha")
    proc = run_job(2, *MODULE, str(tmp_path), timeout=JOB_TIMEOUT)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"no .py files under {tmp_path}" in proc.stderr
    assert "top" not in proc.stdout
