"""Other projects' executor tests against ``hm.Executor``: CPython's ``test_concurrent_futures``
and mpi4py's ``demo/futures/test_futures.py``, fetched at test time (nothing third-party is kept
in this repository).

The same tests also run against ``mpi4py.futures.MPIPoolExecutor`` in the same way (per
executor one MPI job of 3 ranks for the pool tests, ``python -m mpi4py.futures`` vs
``python -m hoplite_mpi``, and one SPMD job of 3 ranks for mpi4py's ``MPICommExecutor`` tests,
``MPICommExecutor(comm, root)`` vs ``hm.Executor(comm=comm, root=root)``; both driven by
``tests/conformance/adapter.py``), and ``hm.Executor`` must pass every test that
``MPIPoolExecutor`` passes.  Tests that only apply to the stdlib's pools or read mpi4py's private
state are excluded in both runs, each with its reason (``adapter.EXCLUDED``).

Where the suites come from:
  * CPython 3.11's ``test_concurrent_futures.py``: ``$HOPLITE_CPYTHON_TESTS`` (a directory or the
    file), else ``/usr/lib/python3.X/test/`` (Debian's ``libpython3.X-testsuite``, which
    ``.ci/run`` installs), else this Python's own ``test`` package;
  * mpi4py's sdist of the installed version, from PyPI's simple index (JSON, PEP 691), its
    sha256 checked, unpacked into pytest's cache directory (``.pytest_cache``).
Without either, the tests skip and say why.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import sysconfig
import tarfile
import time
import urllib.request

import pytest

from conftest import HERE, run_job

sys.path.insert(0, os.path.join(HERE, "conformance"))
import adapter  # noqa: E402  (only for EXCLUDED; runs nothing)

RANKS = 3                    # the driver and 2 workers (the suites' pools use 2 workers)
JOB_TIMEOUT = 420            # seconds per executor; a run takes ~1 min here
TEST_TIMEOUT = 90            # seconds per suite test (mpi4py's tests assert < 60 s themselves)
ADAPTER = os.path.join(HERE, "conformance", "adapter.py")

# Tests MPIPoolExecutor passes and hm.Executor does not yet, with why.  Listed, not excluded: they
# still run and are reported; test_known_gaps_still_fail fails once one passes (then remove it).
KNOWN_GAPS: dict[str, str] = {}


# --- fetching the suites --------------------------------------------------------------------

def _cpython_suite(cache) -> str:
    """A directory holding CPython's test_concurrent_futures.py for this Python (3.11 layout)."""
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    given = os.environ.get("HOPLITE_CPYTHON_TESTS")
    candidates = []
    if given:
        candidates.append(given if given.endswith(".py") else os.path.join(given, "test_concurrent_futures.py"))
    candidates.append(f"/usr/lib/python{ver}/test/test_concurrent_futures.py")
    candidates.append(os.path.join(sysconfig.get_paths()["stdlib"], "test", "test_concurrent_futures.py"))
    found = next((c for c in candidates if os.path.isfile(c)), None)
    if found is None:
        pytest.skip(f"CPython {ver}'s test_concurrent_futures.py not found (looked at {candidates}); "
                    f"install Debian's libpython{ver}-testsuite or set HOPLITE_CPYTHON_TESTS")
    target = cache.mkdir("conformance-cpython")
    shutil.copy(found, target / "test_concurrent_futures.py")
    return str(target)


def _mpi4py_suite(cache) -> str:
    """``demo/futures`` of the installed mpi4py version's sdist (downloaded once)."""
    import mpi4py
    version = mpi4py.__version__
    root = cache.mkdir("conformance-mpi4py")
    demo = root / f"mpi4py-{version}" / "demo" / "futures"
    if (demo / "test_futures.py").is_file():
        return str(demo)
    name = f"mpi4py-{version}.tar.gz"
    try:
        req = urllib.request.Request("https://pypi.org/simple/mpi4py/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            index = json.load(resp)
        entry = next((f for f in index["files"] if f["filename"] == name), None)
        if entry is None:
            pytest.skip(f"{name} is not on PyPI's index")
        with urllib.request.urlopen(entry["url"], timeout=120) as resp:
            blob = resp.read()
    except OSError as exc:
        pytest.skip(f"cannot download {name} from PyPI: {exc}")
    digest = hashlib.sha256(blob).hexdigest()
    want = entry.get("hashes", {}).get("sha256")
    if want and digest != want:
        pytest.fail(f"{name}: sha256 {digest} differs from PyPI's {want}")
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        members = [m for m in tar.getmembers()
                   if m.name.startswith((f"mpi4py-{version}/demo/futures/", f"mpi4py-{version}/test/"))]
        if hasattr(tarfile, "data_filter"):     # Python >= 3.10.12 / 3.11.4
            tar.extractall(root, members=members, filter="data")
        else:
            tar.extractall(root, members=[m for m in members if m.isfile() or m.isdir()])
    if not (demo / "test_futures.py").is_file():
        pytest.skip(f"{name} has no demo/futures/test_futures.py")
    return str(demo)


# --- the two runs -----------------------------------------------------------------------------

_runs: dict[str, dict] = {}
_unavailable: list[str] = []      # why the suites cannot be had, once known


def _job(args: list, out, env: dict) -> tuple:
    """One MPI job of the adapter; returns (returncode or None on timeout, output tail)."""
    try:
        proc = run_job(RANKS, *args, "--json", str(out), "--test-timeout", str(TEST_TIMEOUT),
                       timeout=JOB_TIMEOUT, env=env)
        return proc.returncode, proc.stdout[-3000:] + proc.stderr[-6000:]
    except pytest.fail.Exception as exc:     # run_job's timeout
        return None, str(exc)[-9000:]


def _read(path) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"results": {}, "running": None, "finished": False}


_RANK = {"pass": 0, "skip": 1, "excluded": 1, "fail": 2, "error": 3}


def _run(which: str, request, tmp_path_factory) -> dict:
    """Run every suite test against ``which`` ("hoplite" or "mpi4py"), once: the pool tests in
    one job under ``python -m hoplite_mpi`` / ``python -m mpi4py.futures``, and mpi4py's
    MPICommExecutor tests in one SPMD job (every rank runs them; a test passes if it passes on
    every rank)."""
    if _unavailable:                 # (found once: do not try to download again per test)
        pytest.skip(_unavailable[0])
    if which not in _runs:
        try:
            cpython = _cpython_suite(request.config.cache)
            mpi4py_demo = _mpi4py_suite(request.config.cache)
        except pytest.skip.Exception as exc:
            _unavailable.append(str(exc))
            raise
        tmp = tmp_path_factory.mktemp(f"conformance-{which}")
        launcher = "hoplite_mpi" if which == "hoplite" else "mpi4py.futures"
        path = os.pathsep.join(p for p in (cpython, mpi4py_demo, os.environ.get("PYTHONPATH")) if p)
        env = {"PYTHONPATH": path}
        t0 = time.monotonic()
        rc1, out1 = _job(["-m", launcher, ADAPTER, "--executor", which, "--cpython", cpython,
                          "--mpi4py", mpi4py_demo], tmp / "pool.json", env)
        rc2, out2 = _job([ADAPTER, "--spmd", "--executor", which, "--mpi4py", mpi4py_demo],
                         tmp / "spmd.json", env)
        seconds = round(time.monotonic() - t0, 1)
        pool = _read(tmp / "pool.json")
        results = dict(pool["results"])
        running = [pool["running"]] if pool["running"] else []
        finished = pool["finished"]
        for r in range(RANKS):
            rank = _read(f"{tmp / 'spmd.json'}.rank{r}")
            finished = finished and rank["finished"]
            if rank["running"]:
                running.append(f"{rank['running']} (rank {r})")
            for test_id, rec in rank["results"].items():
                old = results.get(test_id)
                if old is None or _RANK.get(rec["outcome"], 3) > _RANK.get(old["outcome"], 3):
                    results[test_id] = dict(rec, detail=f"rank {r}: {rec['detail']}")
        counts: dict[str, int] = {}
        for rec in results.values():
            counts[rec["outcome"]] = counts.get(rec["outcome"], 0) + 1
        returncode = rc1 if rc1 != 0 else rc2
        _runs[which] = dict(results=results, running=running, finished=finished,
                            returncode=returncode, output=f"{out1}\n--- SPMD job:\n{out2}",
                            counts=counts, seconds=seconds)
        print(f"\nconformance {which}: {counts} in {seconds} s", file=sys.stderr)
    return _runs[which]


def _describe(run: dict) -> str:
    return (f"job rc={run['returncode']}, finished={run['finished']}, counts={run['counts']}, "
            f"hung in: {run['running']}\n{run['output']}")


def test_mpi4py_baseline_ran(request, tmp_path_factory):
    """The baseline run itself completed (otherwise the comparison below means little)."""
    base = _run("mpi4py", request, tmp_path_factory)
    assert base["finished"], _describe(base)
    assert base["counts"].get("pass", 0) > 50, _describe(base)


def test_hoplite_run_completes(request, tmp_path_factory):
    """Every suite test ran to its end against hm.Executor (no hang, no crashed job)."""
    run = _run("hoplite", request, tmp_path_factory)
    assert run["finished"] and run["returncode"] == 0, _describe(run)


def test_hoplite_passes_everything_mpi4py_passes(request, tmp_path_factory):
    base = _run("mpi4py", request, tmp_path_factory)
    run = _run("hoplite", request, tmp_path_factory)
    passed_base = {t for t, r in base["results"].items() if r["outcome"] == "pass"}
    missing = sorted(t for t in passed_base - KNOWN_GAPS.keys()
                     if run["results"].get(t, {}).get("outcome") != "pass")
    report = "\n\n".join(f"{t}: {run['results'].get(t, {}).get('outcome', 'did not run')}\n"
                         f"{run['results'].get(t, {}).get('detail', '')}" for t in missing)
    assert not missing, (f"{len(missing)} test(s) pass with MPIPoolExecutor but not with "
                         f"hm.Executor (hoplite {run['counts']}, mpi4py {base['counts']}):\n{report}")


def test_exclusions_name_existing_tests(request, tmp_path_factory):
    """Every exclusion names a test (or class) that exists, so the list cannot go stale."""
    run = _run("hoplite", request, tmp_path_factory)
    ran = set(run["results"])
    classes = {t.rsplit(".", 1)[0] for t in ran}
    stale = [t for t in adapter.EXCLUDED if t not in ran and t not in classes]
    assert not stale, f"exclusions that match no test: {stale}"


def test_known_gaps_still_fail(request, tmp_path_factory):
    """KNOWN_GAPS stays true: each listed test still passes with MPIPoolExecutor and fails with
    hm.Executor (a gap that got fixed must leave the list)."""
    base = _run("mpi4py", request, tmp_path_factory)
    run = _run("hoplite", request, tmp_path_factory)
    for test_id in KNOWN_GAPS:
        assert base["results"].get(test_id, {}).get("outcome") == "pass", test_id
        assert run["results"].get(test_id, {}).get("outcome") in ("fail", "error"), (
            f"{test_id} passes now: remove it from KNOWN_GAPS")


def test_report_figures(request, tmp_path_factory):
    """Print both runs' counts and times (pytest -s, or -rA shows them)."""
    base = _run("mpi4py", request, tmp_path_factory)
    run = _run("hoplite", request, tmp_path_factory)
    total = len(run["results"])
    lines = [f"{name}: {r['counts']} of {len(r['results'])} tests, {r['seconds']} s"
             for name, r in (("hm.Executor", run), ("MPIPoolExecutor", base))]
    print("\n".join(lines))
    assert total == len(base["results"]), "the two runs did not run the same tests"
