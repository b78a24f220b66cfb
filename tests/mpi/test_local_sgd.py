"""Local SGD with scaling, end to end under mpiexec."""
import numpy as np
import pytest

from hpcopt import store
from tests.helpers import REPO, check, run_hpcopt_mpi

QUICK = str(REPO / "configs" / "quickstart.yaml")
SHORT = ["--set", "run.steps=60", "--set", "run.eval_every=30"]


def state(run_dir, sharded=("X", "M", "V", "D", "P"), replicated=()):
    info, _ = store.latest(str(run_dir))
    return store.read_state(str(run_dir), info, 0, info["nodes"], list(sharded), list(replicated))


def test_h1_identity_equals_sync_sgd(tmp_path):
    common = [*SHORT, "--set", "optimizer.momentum=0.5", "--set", "optimizer.lr=0.3"]
    check(run_hpcopt_mpi(2, ["run", QUICK, "--out", tmp_path / "local", *common, "--set", "algorithm.name=local_sgd",
                             "--set", "algorithm.local_steps=1"]))
    check(run_hpcopt_mpi(2, ["run", QUICK, "--out", tmp_path / "sync", *common, "--set", "algorithm.name=sync_sgd"]))
    X = state(tmp_path / "local")["X"]
    x = state(tmp_path / "sync", (), ("x",))["x"]
    assert np.abs(X - x[None, :]).max() <= 1e-5 * np.abs(x).max()
    a = store.read_run(str(tmp_path / "local"))["metrics"]["train_loss"]
    b = store.read_run(str(tmp_path / "sync"))["metrics"]["train_loss"]
    assert np.allclose(a, b, rtol=1e-4)


@pytest.mark.parametrize("scaling", ["adam", "rmsprop", "oasis"])
def test_global_scaling_shares_dhat_and_local_scaling_does_not(tmp_path, scaling):
    common = [*SHORT, "--set", "run.steps=23", "--set", "algorithm.name=local_sgd", "--set", "algorithm.local_steps=5",
              "--set", f"optimizer.scaling={scaling}", "--set", "optimizer.lr=0.01", "--set", "optimizer.alpha=0.01"]
    check(run_hpcopt_mpi(2, ["run", QUICK, "--out", tmp_path / "g", *common, "--set", "algorithm.scaling=global"]))
    check(run_hpcopt_mpi(2, ["run", QUICK, "--out", tmp_path / "l", *common, "--set", "algorithm.scaling=local",
                             "--set", "algorithm.sync_moments=keep"]))
    g = state(tmp_path / "g")
    assert g["D"].shape == (16, g["X"].shape[1])
    assert all(np.array_equal(g["D"][0], g["D"][i]) for i in range(16))  # identical between synchronisations
    assert not all(np.array_equal(g["V"][0], g["V"][i]) for i in range(16))  # statistics do move locally
    loc = state(tmp_path / "l")
    assert loc["D"].shape[1] == 0
    from hpcopt import precond
    D = precond.diagonal(precond.Hyper(scaling, alpha=0.01), loc["V"], 23)
    spread = np.abs(D - D.mean(axis=0)).max(axis=1)
    assert (spread > 1e-4).sum() >= 12  # heterogeneous data: the nodes' own diagonals differ
    m = store.read_run(str(tmp_path / "g"))["metrics"]
    rounds = m["rounds"]
    assert np.nanmax(rounds) == 4 and np.isnan(rounds[:4]).all() and rounds[4] == 1
    assert np.all(m["dhat_ratio"][np.isfinite(m["dhat_ratio"])] >= 1)


@pytest.mark.parametrize("mode", ["global", "local"])
def test_rank_count_invariance(tmp_path, mode):
    finals = []
    for ranks in (1, 2, 4):
        out = tmp_path / f"r{ranks}"
        check(run_hpcopt_mpi(ranks, ["run", QUICK, "--out", out, *SHORT, "--set", "algorithm.name=local_sgd",
                                     "--set", "algorithm.local_steps=4", "--set", "optimizer.scaling=adam",
                                     "--set", "optimizer.lr=0.01", "--set", f"algorithm.scaling={mode}"]))
        finals.append(state(out))
    for other in finals[1:]:
        for k in ("X", "M", "V"):
            scale = max(1e-30, float(np.abs(finals[0][k]).max()))
            assert np.abs(other[k] - finals[0][k]).max() <= 1e-5 * scale, k
