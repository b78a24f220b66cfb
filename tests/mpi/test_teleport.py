"""Teleportation end to end under mpiexec."""
import numpy as np
import pytest

from hpcopt import config, data, models, store
from hpcopt.algorithms.teleport import active_nodes
from tests.helpers import REPO, check, run_hpcopt_mpi, run_script

QUICK = str(REPO / "configs" / "quickstart.yaml")
TP = ["--set", "algorithm.name=teleport", "--set", "run.steps=40", "--set", "run.eval_every=20"]


def final_x(run_dir):
    info, _ = store.latest(str(run_dir))
    return store.read_state(str(run_dir), info, 0, info["nodes"], ["X"], [])["X"]


def test_k_equal_n_without_moves_is_dsgd(tmp_path):
    check(run_hpcopt_mpi(2, ["run", QUICK, "--out", tmp_path / "tp", *TP, "--set", "algorithm.k=16",
                             "--set", "algorithm.teleport=false"]))
    check(run_hpcopt_mpi(2, ["run", QUICK, "--out", tmp_path / "d", "--set", "run.steps=40", "--set",
                             "algorithm.order=adapt_then_combine", "--set", "run.eval_every=20"]))
    assert np.array_equal(final_x(tmp_path / "tp"), final_x(tmp_path / "d"))


def test_k_1_is_sgd_on_a_random_node_per_step(tmp_path):
    check(run_hpcopt_mpi(2, ["run", QUICK, "--out", tmp_path / "tp", *TP, "--set", "algorithm.k=1",
                             "--set", "optimizer.schedule=constant", "--set", "optimizer.lr=0.2"]))
    cfg = config.load(QUICK, ["optimizer.lr=0.2"])
    ds = data.load(cfg.data, 16)
    parts = data.partition(ds, 16, "dirichlet", cfg.data.alpha, seed=cfg.data.seed)
    nd = data.NodeData(np, ds, parts, range(16), cfg.data.batch_size, cfg.run.seed)
    model = models.build(cfg.model, ds)
    x = model.init(cfg.run.seed)[None, :].astype(np.float32)
    for t in range(40):
        node = active_nodes(cfg.run.seed, t, 16, [1])[0]
        A, y, w = nd.batch(t, rows=[node])
        _, g = model.loss_grad(x, A, y, w)
        x = x - np.float32(0.2) * g
    X = final_x(tmp_path / "tp")
    holder = active_nodes(cfg.run.seed, 40, 16, [1])[0]
    assert np.allclose(X[holder], x[0], rtol=1e-5, atol=1e-6)
    run = store.read_run(str(tmp_path / "tp"))
    assert [row[0] for row in run["metrics"]["token_node"]] == [active_nodes(0, t, 16, [1])[0] for t in range(40)]
    loss = run["metrics"]["train_loss"]
    assert (np.isfinite(loss).sum(axis=1) == 1).all()  # one active node per step, the rest compute nothing


def test_token_maps_and_trajectory_are_rank_count_invariant(tmp_path):
    finals, maps = [], []
    for ranks in (1, 2, 4):
        out = tmp_path / f"r{ranks}"
        check(run_hpcopt_mpi(ranks, ["run", QUICK, "--out", out, *TP, "--set", "algorithm.k=4"]))
        run = store.read_run(str(out))
        maps.append(run["metrics"]["token_node"])
        X = final_x(out)
        holders = active_nodes(0, 40, 16, [4])
        finals.append(X[holders])
        bm = run["metrics"]["bytes_move"]
        assert bm.shape == (40, ranks) and (ranks == 1 or bm.sum() > 0)
    for m in maps[1:]:
        assert np.array_equal(m, maps[0])
    for f in finals[1:]:
        assert np.abs(f - finals[0]).max() <= 1e-5 * np.abs(finals[0]).max()


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_tokens_are_conserved_across_moves(ranks):
    proc = check(run_script(ranks, "tokens.py", timeout=120))
    assert proc.stdout.count("tokens conserved") == ranks


def test_k_auto_searches_and_records_the_table(tmp_path):
    proc = check(run_hpcopt_mpi(2, ["run", QUICK, "--out", tmp_path / "a", *TP, "--set", "algorithm.k=auto",
                                    "--set", "algorithm.search_steps=20"]))
    run = store.read_run(str(tmp_path / "a"))
    table = run["tables"]["k_search"]
    assert sorted(table["k"].tolist()) == [1, 2, 4, 8, 16]
    best = int(table["k"][np.argmin(table["validation_loss"])])
    assert run["metrics"]["token_node"].shape == (40, best)
    assert "k_search" in proc.stdout


def test_k_search_selects_on_a_validation_split_carved_from_the_training_data(tmp_path):
    """The k search's split is floor(val_fraction * m_v) samples of every node's training
    data (never the test split), recorded in the table, and the nodes train without them."""
    from hpcopt.algorithms import teleport
    sets = ["data.batch_size=0", "data.val_fraction=0.2"]
    check(run_hpcopt_mpi(2, ["run", QUICK, "--out", tmp_path / "a", *TP, "--set", "algorithm.k=auto",
                             "--set", "algorithm.search_steps=5", "--set", "run.steps=2",
                             *[a for kv in sets for a in ("--set", kv)]]))
    run = store.read_run(str(tmp_path / "a"))
    table = run["tables"]["k_search"]
    cfg = config.load(QUICK, ["algorithm.name=teleport", "algorithm.k=auto", *sets])
    ds = data.load(cfg.data, 16)
    parts = data.partition(ds, 16, "dirichlet", cfg.data.alpha, seed=cfg.data.seed)
    train, val = teleport.validation_split(cfg, ds, parts)
    assert val.samples == sum(int(0.2 * len(p)) for p in parts) != len(ds.y_test)
    assert (table["validation_samples"] == val.samples).all() and (table["validation_from_train"] == 1).all()
    # full-batch losses at step 0 are the losses of x0 on what each active node kept
    model = models.build(cfg.model, ds)
    x0 = model.init(cfg.run.seed)[None, :].astype(np.float32)
    loss0 = run["metrics"]["train_loss"][0]
    active = np.nonzero(np.isfinite(loss0))[0]
    assert len(active)
    for v in active:
        kept, full = ds.X_train[train[v]], ds.X_train[parts[v]]
        ref = model.loss(x0, kept[None], ds.y_train[train[v]][None], np.full((1, len(kept)), 1 / len(kept)))[0]
        allv = model.loss(x0, full[None], ds.y_train[parts[v]][None], np.full((1, len(full)), 1 / len(full)))[0]
        assert loss0[v] == pytest.approx(float(ref), rel=1e-5)
        assert len(train[v]) < len(parts[v]) or ref == allv



def test_resumed_k_search_run_takes_k_from_the_run_file(tmp_path):
    args = [*TP, "--set", "algorithm.k=auto", "--set", "algorithm.search_steps=20"]
    stopped = run_hpcopt_mpi(2, ["run", QUICK, "--out", tmp_path / "a", *args, "--set", "run.stop_after=25"])
    assert stopped.returncode == 75, stopped.stderr
    assert "k_search:" in stopped.stdout
    table = store.read_run(str(tmp_path / "a"))["tables"]["k_search"]
    best = int(table["k"][np.argmin(table["validation_loss"])])
    resumed = check(run_hpcopt_mpi(2, ["run", QUICK, "--out", tmp_path / "a", *args, "--resume"]))
    assert f"k = {best} from the k search recorded in run.h5" in resumed.stdout
    assert "k_search:" not in resumed.stdout  # not searched again
    check(run_hpcopt_mpi(2, ["run", QUICK, "--out", tmp_path / "b", *args]))
    assert np.array_equal(final_x(tmp_path / "a"), final_x(tmp_path / "b"))
