"""run.node_metrics end to end: hpcopt run (1 and 2 ranks) -> run.h5 -> analyse and plots."""
import numpy as np

from hpcopt import metrics, store
from tests.helpers import REPO, check, run_cli, run_hpcopt_mpi

QUICK = str(REPO / "configs" / "quickstart.yaml")
COMMON = ["--set", "nodes.n=40", "--set", "run.steps=40", "--set", "run.eval_every=20", "--set", "run.log_every=10",
          "--set", "diagnostics.every=20", "--set", "run.node_sample=8", "--set", "run.progress=false"]


def test_sample_and_none_keep_the_columns_of_all_and_the_same_stats(tmp_path):
    for mode, ranks in (("auto", 1), ("sample", 2), ("none", 1)):
        check(run_hpcopt_mpi(ranks, ["run", QUICK, "--out", tmp_path / mode, *COMMON,
                                     "--set", f"run.node_metrics={mode}"]))
    full, part, none = (store.read_run(str(tmp_path / m)) for m in ("auto", "sample", "none"))
    assert full["attrs"]["node_metrics"] == "all" and full["node_ids"] is None  # auto at 40 nodes
    ids = part["node_ids"]
    assert part["attrs"]["node_metrics"] == "sample" and len(ids) == 8
    assert np.array_equal(ids, metrics.node_sample(40, 8, seed=0))
    for group, name in (("metrics", "train_loss"), ("eval", "node_test_loss"), ("eval", "node_test_accuracy"),
                        ("diag", "node_weight_dev")):
        a = np.asarray(full[group][name])
        assert a.shape[1] == 40 and np.asarray(part[group][name]).shape == (len(a), 8)
        # 1 vs 2 ranks: the same trajectories up to float32 summation order
        np.testing.assert_allclose(part[group][name], a[:, ids], rtol=1e-5, atol=1e-6)
        assert name not in none[group]
        if group != "eval":  # the stats are over all nodes whatever is kept
            assert np.array_equal(none[group][f"{name}_stats"], full[group][f"{name}_stats"])
        whole = metrics.node_stats(a if group != "eval" else a[:, ids])  # test metrics: over the evaluated sample
        np.testing.assert_allclose(part[group][f"{name}_stats"], whole, rtol=1e-5, atol=1e-6)
    assert np.array_equal(none["metrics"]["train_loss_stats"], full["metrics"]["train_loss_stats"])
    assert "node_test_loss_stats" not in none["eval"]  # none: no per-node evaluation at all
    assert np.array_equal(none["eval"]["test_accuracy"], full["eval"]["test_accuracy"])

    out = check(run_cli(["analyse", tmp_path / "sample", tmp_path / "none", "--per-node",
                         "--plot", tmp_path / "plots"])).stdout
    assert "the 8 nodes of the fixed sample" in out and "per-node columns not kept" in out
    first = out.split("the 8 nodes of the fixed sample")[1].splitlines()[3]
    assert first.split()[0] == str(ids[0])  # the table names the sampled nodes, not 0..7
    assert "test accuracy (the sample)" in out and "train loss (minibatch)" in out
    for name in ("train_loss", "node_test_accuracy", "node_weight_dev"):
        assert (tmp_path / "plots" / f"nodes_{name}.png").stat().st_size > 5000


def test_teleportation_stats_are_over_the_nodes_holding_a_model(tmp_path):
    check(run_cli(["run", QUICK, "--out", tmp_path / "t", "--set", "algorithm.name=teleport",
                   "--set", "algorithm.k=4", "--set", "nodes.n=16", "--set", "run.steps=20",
                   "--set", "run.node_metrics=sample", "--set", "run.node_sample=16"]))
    m = store.read_run(str(tmp_path / "t"))["metrics"]
    assert np.isnan(m["train_loss"]).any()  # idle nodes
    np.testing.assert_allclose(m["train_loss_stats"][:, 0], m["train_loss_mean"], rtol=1e-12)


def test_a_resumed_run_keeps_the_sample_and_a_legacy_file_keeps_every_column(tmp_path):
    part = tmp_path / "part"
    args = ["run", QUICK, "--out", part, *COMMON, "--set", "run.node_metrics=sample"]
    proc = run_hpcopt_mpi(2, [*args, "--set", "run.stop_after=20", "--set", "run.checkpoint_every=10"])
    assert proc.returncode == 75, proc.stderr[-2000:]
    check(run_hpcopt_mpi(1, [*args, "--resume"]))
    full = tmp_path / "full"
    check(run_hpcopt_mpi(1, ["run", QUICK, "--out", full, *COMMON, "--set", "run.node_metrics=sample"]))
    a, b = store.read_run(str(part)), store.read_run(str(full))
    assert np.array_equal(a["node_ids"], b["node_ids"])
    assert a["metrics"]["train_loss"].shape == b["metrics"]["train_loss"].shape == (40, 8)
    np.testing.assert_allclose(a["metrics"]["train_loss"], b["metrics"]["train_loss"], rtol=1e-5)
    assert store.node_layout(str(part))[0] == "sample"
    import h5py
    with h5py.File(part / store.RUN_FILE, "a") as f:  # a file from before run.node_metrics
        del f["config"].attrs["node_metrics"]
        del f["node_ids"]
    assert store.node_layout(str(part)) == ("all", None)
