"""Local SGD with scaling, end to end under mpiexec."""
import numpy as np
import pytest

from hpcopt import config, data, models, precond, store
from hpcopt.algorithms import local_sgd
from hpcopt.data import step_rng
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


@pytest.mark.parametrize("mode,scaling", [("global", "adam"), ("local", "adam"), ("global", "oasis")])
def test_rank_count_invariance(tmp_path, mode, scaling):
    finals = []
    for ranks in (1, 2, 4):
        out = tmp_path / f"r{ranks}"
        check(run_hpcopt_mpi(ranks, ["run", QUICK, "--out", out, *SHORT, "--set", "algorithm.name=local_sgd",
                                     "--set", "algorithm.local_steps=4", "--set", f"optimizer.scaling={scaling}",
                                     "--set", "optimizer.alpha=0.01", "--set", "optimizer.weight_decay=0.01",
                                     "--set", "optimizer.lr=0.01", "--set", f"algorithm.scaling={mode}"]))
        finals.append(state(out))
    for other in finals[1:]:
        for k in ("X", "M", "V"):
            if not finals[0][k].size:  # oasis has no first moment
                assert other[k].shape == finals[0][k].shape
                continue
            scale = max(1e-30, float(np.abs(finals[0][k]).max()))
            assert np.abs(other[k] - finals[0][k]).max() <= 1e-5 * scale, k


# one step of global scaling without a synchronisation (H = 2 > steps = 1), full batches,
# so every quantity has a closed form in the nodes' gradients and Hessians at x0
ONE_STEP = ["run.steps=1", "run.eval_every=0", "algorithm.name=local_sgd", "algorithm.local_steps=2",
            "algorithm.scaling=global", "data.batch_size=0", "optimizer.schedule=constant", "optimizer.lr=0.05",
            "optimizer.probes=2"]


def one_step(tmp_path, sets):
    check(run_hpcopt_mpi(2, ["run", QUICK, "--out", tmp_path / "one", *[a for kv in sets for a in ("--set", kv)]]))
    cfg = config.load(QUICK, sets)
    ds = data.load(cfg.data, 16)
    parts = data.partition(ds, 16, "dirichlet", cfg.data.alpha, seed=cfg.data.seed)
    model = models.build(cfg.model, ds)
    x0 = model.init(cfg.run.seed).astype(np.float32)
    batches = [(ds.X_train[p][None], ds.y_train[p][None], np.full((1, len(p)), 1 / len(p), np.float32))
               for p in parts]
    return cfg, model, x0, batches, state(tmp_path / "one")


@pytest.mark.parametrize("scaling", ["adam", "rmsprop"])
def test_global_scaling_couples_weight_decay_like_local_scaling(tmp_path, scaling):
    """g' = g + wd x0 enters the warm start, the moments and the step once: hand formulas."""
    wd, lr, b1, b2, eps = 0.05, 0.05, 0.9, 0.999, 1e-8
    cfg, model, x0, batches, st = one_step(tmp_path, [*ONE_STEP, f"optimizer.scaling={scaling}",
                                                      f"optimizer.weight_decay={wd}", "model.name=mlp",
                                                      "model.hidden=[8]"])  # x0 != 0 (softmax starts at 0)
    assert np.abs(x0).max() > 0.1
    g = np.stack([model.loss_grad(x0[None], *b)[1][0] for b in batches]).astype(np.float64) + wd * x0
    v0 = (g ** 2).mean(axis=0)  # warm start: the node average of g'^2 (every probe is the full batch)
    D0 = np.sqrt(v0) + eps
    V = b2 * v0 + (1 - b2) * g ** 2
    step = lr * g / D0  # adam: lr (m / (1 - b1)) / D0 with m = (1 - b1) g'
    assert np.allclose(st["V"], V, rtol=1e-4, atol=1e-10)
    assert np.allclose(x0 - st["X"], step, rtol=1e-3, atol=1e-7)
    if scaling == "adam":
        assert np.allclose(st["M"], (1 - b1) * g, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("shared", [False, True])
def test_global_oasis_probes_are_independent_per_node_unless_shared(tmp_path, shared):
    b2, alpha, lr = 0.9, 0.01, 0.05
    cfg, model, x0, batches, st = one_step(tmp_path, [*ONE_STEP, "optimizer.scaling=oasis", f"optimizer.beta2={b2}",
                                                      f"optimizer.alpha={alpha}",
                                                      f"optimizer.shared_probes={str(shared).lower()}"])
    d, seed = x0.shape[0], cfg.run.seed

    def z(node, t):
        if shared:
            return step_rng(seed, t, 11).choice(np.array([-1.0, 1.0], np.float32), d)
        return precond.rademacher(seed, [node], t, d)[0]

    def zhz(node, t):
        zz = z(node, t)
        return zz * model.hvp(x0[None], zz[None].astype(np.float32), *batches[node])[0]

    v0 = np.mean([np.mean([zhz(i, local_sgd.WARM_START_STEP + k) for k in range(2)], axis=0) for i in range(16)],
                 axis=0)
    V = np.stack([b2 * v0 + (1 - b2) * zhz(i, 0) for i in range(16)])
    assert np.allclose(st["V"], V, rtol=1e-4, atol=1e-8)
    g = np.stack([model.loss_grad(x0[None], *b)[1][0] for b in batches])
    assert np.allclose(x0 - st["X"], lr * g / np.maximum(alpha, np.abs(v0)), rtol=1e-3, atol=1e-7)
    probes = np.stack([z(i, 0) for i in range(16)])
    assert (len(np.unique(probes, axis=0)) == 1) == shared


@pytest.mark.parametrize("model,scaling,per_step,per_probe", [("mlp", "oasis", 3, 2), ("softmax", "oasis", 2, 1),
                                                              ("mlp", "rmsprop", 1, 1), ("mlp", "identity", 1, 0)])
def test_gradient_evals_count_a_hessian_vector_product_at_its_cost(tmp_path, model, scaling, per_step, per_probe):
    """MLP: an HVP is a central difference of two gradients; linear models: one (exact)."""
    check(run_hpcopt_mpi(2, ["run", QUICK, "--out", tmp_path / "g", "--set", "run.steps=6", "--set", "run.eval_every=0",
                             "--set", "algorithm.name=local_sgd", "--set", "algorithm.local_steps=3",
                             "--set", f"model.name={model}", "--set", "model.hidden=[8]",
                             "--set", f"optimizer.scaling={scaling}", "--set", "optimizer.alpha=0.01",
                             "--set", "optimizer.lr=0.01", "--set", "optimizer.probes=2"]))
    evals = store.read_run(str(tmp_path / "g"))["metrics"]["gradient_evals"]
    assert evals.tolist() == [16 * (t * per_step + 2 * per_probe) for t in range(1, 7)]
