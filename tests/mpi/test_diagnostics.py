"""Landscape diagnostics against independent computations, invariance, and no side effects."""
import numpy as np
import pytest

from hpcopt import config, data, models, store
from tests.helpers import REPO, check, run_hpcopt_mpi

QUICK = str(REPO / "configs" / "quickstart.yaml")
QUAD = ["--set", "data.dataset=quadratic", "--set", "data.partition=iid", "--set", "model.name=auto",
        "--set", "nodes.n=8", "--set", "data.samples_per_node=40", "--set", "data.dim=10",
        "--set", "optimizer.lr=0.05", "--set", "optimizer.schedule=constant", "--set", "run.steps=30",
        "--set", "run.eval_every=10", "--set", "diagnostics.every=10", "--set", "diagnostics.batch_size=0",
        "--set", "diagnostics.power_iters=300"]


def test_diagnostics_match_independent_computation_on_a_quadratic(tmp_path):
    out = tmp_path / "d"
    check(run_hpcopt_mpi(2, ["run", QUICK, "--out", out, *QUAD]))
    run = store.read_run(str(out))
    diag = run["diag"]
    cfg = config.load(QUICK, [q for q in QUAD[1::2]])
    ds = data.load(cfg.data, 8)
    parts = data.partition(ds, 8, "iid")
    H = sum(ds.X_train[p].astype(float).T @ ds.X_train[p].astype(float) / len(p) for p in parts) / 8
    lam = np.linalg.eigvalsh(H).max()
    assert abs(diag["lambda_max"][-1] - lam) <= 1e-3 * lam
    assert diag["stability"][-1] == pytest.approx(0.05 * diag["lambda_max"][-1])
    info, _ = store.latest(str(out))
    X = store.read_state(str(out), info, 0, 8, ["X"], [])["X"].astype(np.float64)
    xbar = X.mean(axis=0)
    assert diag["weight_variance"][-1] == pytest.approx(((X - xbar) ** 2).sum(axis=1).mean(), rel=1e-4)
    model = models.LinearModel("quadratic", ds.features)
    gi = np.stack([model.loss_grad(X[i:i + 1], ds.X_train[p][None].astype(float), ds.y_train[p][None].astype(float),
                                   np.full((1, len(p)), 1 / len(p)))[1][0] for i, p in enumerate(parts)])
    gs = np.stack([model.loss_grad(xbar[None], ds.X_train[p][None].astype(float), ds.y_train[p][None].astype(float),
                                   np.full((1, len(p)), 1 / len(p)))[1][0] for p in parts])
    gm, gS = gi.mean(axis=0), gs.mean(axis=0)
    # the mean gradient is a small difference of large per-node gradients: float32 keeps ~4 digits
    assert diag["alpha_ratio"][-1] == pytest.approx(gm @ gS / (gS @ gS), rel=1e-3)
    assert diag["grad_deviation"][-1] == pytest.approx(np.linalg.norm(gm - gS), rel=1e-3)
    assert diag["node_weight_dev"].shape == (3, 8)


def test_alpha_ratio_is_exactly_one_when_nodes_agree(tmp_path):
    check(run_hpcopt_mpi(2, ["run", QUICK, "--out", tmp_path / "s", *QUAD, "--set", "algorithm.name=sync_sgd"]))
    diag = store.read_run(str(tmp_path / "s"))["diag"]
    assert np.all(diag["alpha_ratio"] == 1.0) and np.all(diag["weight_variance"] == 0.0)
    assert np.all(diag["smoothing_gap"] == 0.0)


def test_diagnostics_are_rank_count_invariant_and_do_not_change_training(tmp_path):
    args = ["--set", "run.steps=30", "--set", "diagnostics.every=10", "--set", "diagnostics.power_iters=10",
            "--set", "model.name=mlp", "--set", "model.hidden=[16]"]
    rows = []
    for ranks in (1, 2, 4):
        check(run_hpcopt_mpi(ranks, ["run", QUICK, "--out", tmp_path / f"r{ranks}", *args]))
        rows.append(store.read_run(str(tmp_path / f"r{ranks}"))["diag"])
    for other in rows[1:]:
        for k in ("weight_variance", "alpha_ratio", "lambda_max", "mean_loss", "loss_at_mean"):
            assert np.allclose(other[k], rows[0][k], rtol=1e-4, atol=1e-7), k
    check(run_hpcopt_mpi(2, ["run", QUICK, "--out", tmp_path / "off", *args, "--set", "diagnostics.every=0"]))
    a = store.read_state(str(tmp_path / "r2"), store.latest(str(tmp_path / "r2"))[0], 0, 16, ["X"], [])["X"]
    b = store.read_state(str(tmp_path / "off"), store.latest(str(tmp_path / "off"))[0], 0, 16, ["X"], [])["X"]
    assert np.array_equal(a, b)


def test_matched_noise_baseline_follows_a_dpsgd_run(tmp_path):
    check(run_hpcopt_mpi(2, ["run", QUICK, "--out", tmp_path / "dpsgd", "--set", "run.steps=40",
                             "--set", "diagnostics.every=10", "--set", "diagnostics.power_iters=0"]))
    base = ["--set", "algorithm.name=sync_sgd", "--set", "run.steps=40"]
    check(run_hpcopt_mpi(2, ["run", QUICK, "--out", tmp_path / "plain", *base]))
    check(run_hpcopt_mpi(2, ["run", QUICK, "--out", tmp_path / "noisy", *base, "--set", "algorithm.noise=matched",
                             "--set", f"algorithm.noise_run={tmp_path / 'dpsgd'}"]))
    xa = store.read_state(str(tmp_path / "plain"), store.latest(str(tmp_path / "plain"))[0], 0, 16, [], ["x"])["x"]
    xb = store.read_state(str(tmp_path / "noisy"), store.latest(str(tmp_path / "noisy"))[0], 0, 16, [], ["x"])["x"]
    assert not np.allclose(xa, xb)
    bad = run_hpcopt_mpi(2, ["run", QUICK, "--out", tmp_path / "bad", *base, "--set", "algorithm.noise=matched",
                             "--set", f"algorithm.noise_run={tmp_path / 'plain'}"])
    assert bad.returncode == 2 and "has no diagnostics" in bad.stderr


def test_local_sgd_diagnostics_measure_the_models_before_the_average(tmp_path):
    """diagnostics.every a multiple of H: the figures are of the nodes' models just before
    they are averaged (Xi^2 = that round's client drift), not of the identical averaged ones."""
    args = ["--set", "run.steps=20", "--set", "run.eval_every=0", "--set", "algorithm.name=local_sgd",
            "--set", "algorithm.local_steps=5", "--set", "diagnostics.every=5", "--set", "diagnostics.power_iters=5"]
    runs = []
    for ranks in (1, 2):
        check(run_hpcopt_mpi(ranks, ["run", QUICK, "--out", tmp_path / f"r{ranks}", *args]))
        runs.append(store.read_run(str(tmp_path / f"r{ranks}")))
    diag, m = runs[1]["diag"], runs[1]["metrics"]
    assert diag["step"].tolist() == [5, 10, 15, 20]
    drift = m["client_drift"][diag["step"] - 1]
    assert np.all(drift > 1e-4)
    assert np.allclose(diag["weight_variance"], drift, rtol=1e-4)
    assert np.allclose(diag["node_weight_dev"].mean(axis=1), drift, rtol=1e-4)
    assert np.all(np.abs(diag["alpha_ratio"] - 1) > 1e-4) and np.all(diag["smoothing_gap"] != 0)
    for k in ("weight_variance", "alpha_ratio", "mean_loss", "loss_at_mean", "lambda_max"):
        assert np.allclose(runs[0]["diag"][k], diag[k], rtol=1e-4, atol=1e-7), k
    check(run_hpcopt_mpi(2, ["run", QUICK, "--out", tmp_path / "off", *args, "--set", "diagnostics.every=0"]))
    a = store.read_state(str(tmp_path / "r2"), store.latest(str(tmp_path / "r2"))[0], 0, 16, ["X"], [])["X"]
    b = store.read_state(str(tmp_path / "off"), store.latest(str(tmp_path / "off"))[0], 0, 16, ["X"], [])["X"]
    assert np.array_equal(a, b)  # measuring changes nothing
