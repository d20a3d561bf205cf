"""hoplite_mpi.examples.async_sgd: the model in-process, and ``--quick`` as real 4-rank jobs."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_job

from hoplite_mpi.examples import async_sgd as sgd

RUN_FIELDS = ("samples_per_s", "time_to_target_s", "final_accuracy", "steps", "samples", "wall_s",
              "gradients_per_worker", "sleep_s_per_worker", "curve")


def _sklearn():
    return pytest.importorskip("sklearn", reason="scikit-learn is not installed "
                               "(pip install -e '.[examples]'): the example trains on its digits")


# --- the model, in-process -------------------------------------------------------------------

def test_views_share_the_flat_vector():
    m = sgd.MLP(7)
    w = m.init(0)
    assert w.dtype == np.float32 and w.shape == (m.size,) and m.size == 64 * 7 + 7 + 7 * 10 + 10
    W1, b1, W2, b2 = m.views(w)
    assert (W1.shape, b1.shape, W2.shape, b2.shape) == ((64, 7), (7,), (7, 10), (10,))
    W2[3, 4] = 42.0
    assert w[64 * 7 + 7 + 3 * 10 + 4] == 42.0
    assert sum(v.size for v in m.views(w)) == m.size


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(1)
    m = sgd.MLP(5, d_in=6, classes=3)
    w = m.init(2).astype(np.float64)
    w[m.size - 3 - 5:] += rng.standard_normal(3 + 5) * 0.1     # non-zero biases
    X = rng.standard_normal((9, 6))
    y = rng.integers(0, 3, 9)
    loss, g = m.loss_and_grad(w, X, y)
    assert loss == pytest.approx(m.loss(w, X, y), rel=1e-12)
    eps = 1e-6
    num = np.empty_like(w)
    for i in range(m.size):
        e = np.zeros_like(w)
        e[i] = eps
        num[i] = (m.loss(w + e, X, y) - m.loss(w - e, X, y)) / (2 * eps)
    err = np.abs(num - g).max() / max(np.abs(num).max(), 1e-12)
    assert err < 1e-6, f"analytic and numerical gradients differ (relative error {err:.2e})"
    # and the float32 path the example uses agrees with float64
    _, g32 = m.loss_and_grad(w.astype(np.float32), X.astype(np.float32), y)
    np.testing.assert_allclose(g32, g, rtol=1e-3, atol=1e-5)


def test_sgd_on_digits_decreases_the_loss():
    _sklearn()
    cfg = sgd.Config(hidden=128, batch=64, lr=0.05)
    Xtr, ytr, Xte, yte = sgd.load_data(cfg.seed)
    assert Xtr.dtype == np.float32 and len(Xtr) + len(Xte) == 1797 and abs(len(Xte) - 360) <= 1
    m = sgd.model_of(cfg.hidden)
    w = m.init(cfg.seed)
    before = m.loss(w, Xtr, ytr)
    for step in range(60):
        g, loss, dt, slept = sgd.worker_gradient(w, cfg, step % 3, 3, step)
        assert g.shape == w.shape and dt > 0 and slept == 0
        w -= cfg.lr * g
    after = m.loss(w, Xtr, ytr)
    assert after < 0.5 * before, f"training loss {before:.3f} -> {after:.3f}"
    assert m.accuracy(w, Xte, yte) > 0.85


def test_minibatches_are_reproducible_and_from_the_shard():
    _sklearn()
    cfg = sgd.Config(batch=16)
    X1, y1 = sgd.minibatch(cfg, 1, 3, 5)
    X2, y2 = sgd.minibatch(cfg, 1, 3, 5)
    assert np.array_equal(X1, X2) and np.array_equal(y1, y2)
    Xs, _ = sgd.shard(cfg.seed, 1, 3)
    assert all(any(np.array_equal(x, row) for row in Xs) for x in X1[:4])
    assert not np.array_equal(sgd.minibatch(cfg, 1, 3, 6)[0], X1)


# --- the job -------------------------------------------------------------------------------

def _check_job(proc, out, straggler: bool) -> dict:
    output = f"rc={proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, output
    assert out.exists(), output
    res = json.loads(out.read_text())
    assert res["ok"] is True
    assert res["meta"]["ranks"] == 4 and res["meta"]["workers"] == 3
    target = res["config"]["target"]
    assert target >= 0.85
    for name in ("mpi_sync", "hoplite_async"):
        run = res["runs"][name]
        missing = [f for f in RUN_FIELDS if f not in run]
        assert not missing, f"{name}: JSON lacks {missing}"
        assert run["final_accuracy"] >= target, f"{name} ended at {run['final_accuracy']}"
        assert run["time_to_target_s"] is not None and run["time_to_target_s"] <= run["wall_s"]
        assert run["samples_per_s"] > 0 and run["steps"] > 0
        assert len(run["gradients_per_worker"]) == 3
        slept = run["sleep_s_per_worker"]
        if straggler:
            assert slept[2] > 0 and slept[0] == slept[1] == 0, f"{name}: sleeps {slept}"
        else:
            assert slept == [0, 0, 0]
    sync, hop = res["runs"]["mpi_sync"], res["runs"]["hoplite_async"]
    assert sync["samples"] == sync["steps"] * 3 * res["config"]["batch"]
    # every async step applied k gradients, each from one worker's task
    assert sum(hop["gradients_per_worker"]) == hop["steps"] * hop["k"]
    assert hop["samples"] == hop["steps"] * hop["k"] * res["config"]["batch"]
    assert res["ratio"]["samples_per_s"] == pytest.approx(hop["samples_per_s"] / sync["samples_per_s"])
    assert "hoplite / MPI: samples/s" in proc.stdout
    return res


def test_quick_job_hoplite_mpi_run(tmp_path):
    """The way the README launches it: python -m hoplite_mpi -m ... (baseline in pinned tasks)."""
    _sklearn()
    out = tmp_path / "quick.json"
    proc = run_job(4, "-m", "hoplite_mpi", "-m", "hoplite_mpi.examples.async_sgd", "--quick",
                   "--json", str(out), timeout=240)
    res = _check_job(proc, out, straggler=False)
    assert res["meta"]["launch"].startswith("hoplite-mpi run")


def test_quick_job_plain_mpirun_with_straggler(tmp_path):
    """Plain mpirun: the SPMD baseline before hm.Executor(comm=COMM_WORLD); a 2x straggler."""
    _sklearn()
    out = tmp_path / "quick.json"
    proc = run_job(4, "-m", "hoplite_mpi.examples.async_sgd", "--quick", "--seconds", "3",
                   "--straggler", "2", "--json", str(out), timeout=240)
    res = _check_job(proc, out, straggler=True)
    assert res["meta"]["launch"].startswith("mpirun SPMD")


def test_job_exits_nonzero_below_target(tmp_path):
    """An unreachable target must fail the job (exit status 1, ok false in the JSON)."""
    _sklearn()
    out = tmp_path / "fail.json"
    proc = run_job(4, "-m", "hoplite_mpi", "-m", "hoplite_mpi.examples.async_sgd", "--quick",
                   "--seconds", "1", "--target", "1.01", "--json", str(out), timeout=240)
    assert proc.returncode == 1, f"rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert json.loads(out.read_text())["ok"] is False
    assert "FAILED" in proc.stderr


def test_resume_after_the_driver_is_killed(tmp_path):
    """--storage: the weights are checkpointed every 5 steps by the workers; the driver is
    SIGKILLed mid-training; the same command again resumes from the latest checkpoint (its
    first snapshot is already far above a fresh model's accuracy) and trains on."""
    _sklearn()
    from test_faults import _no_ulfm
    store = tmp_path / "store"
    args = ["-m", "hoplite_mpi", "-m", "hoplite_mpi.examples.async_sgd", "--quick", "--runs",
            "hoplite", "--storage", str(store), "--checkpoint-every", "5"]
    proc = run_job(4, *args, "--seconds", "60", timeout=240, env={"HOPLITE_MPI_KILL": "0:done:120"},
                   ft=not _no_ulfm())
    assert proc.returncode != 0 and "SIGKILL at done" in proc.stderr, proc.stderr[-3000:]
    out = tmp_path / "resumed.json"
    proc = run_job(4, *args, "--seconds", "1", "--json", str(out), timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = json.loads(out.read_text())["runs"]["hoplite_async"]
    step = run["resumed_from"]
    assert step >= 5 and step % 5 == 0 and f"resumed from step {step}" in proc.stdout
    assert run["steps"] > step and run["curve"][0]["step"] == step
    assert run["curve"][0]["accuracy"] > 0.5          # a fresh model guesses (~0.1)


def test_the_straggler_is_named():
    """The straggler report (roles/stragglers.py): the last worker computes 6x slower and is
    named, alone, on the driver's stderr."""
    _sklearn()
    proc = run_job(4, "-m", "hoplite_mpi", "-m", "hoplite_mpi.examples.async_sgd", "--quick",
                   "--runs", "hoplite", "--seconds", "2", "--straggler", "6", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    named = [line for line in proc.stderr.splitlines() if "straggler: rank" in line]
    assert len(named) == 1 and "straggler: rank 3 " in named[0], proc.stderr[-3000:]
