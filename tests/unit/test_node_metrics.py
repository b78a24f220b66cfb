"""run.node_metrics: the per-node columns kept in run.h5 and their distribution columns."""
import numpy as np

from hpcopt import config, metrics


def test_node_stats_match_a_hand_computation_and_skip_nan():
    v = np.array([[1.0, 2.0, 3.0, 4.0, np.nan], [np.nan] * 5, [5.0, 5.0, 5.0, 5.0, 5.0]])
    st = metrics.node_stats(v)
    col = dict(zip(metrics.NODE_STATS, st.T))
    assert st.shape == (3, len(metrics.NODE_STATS))
    assert col["mean"][0] == 2.5 and col["min"][0] == 1.0 and col["max"][0] == 4.0
    assert np.isclose(col["std"][0], np.sqrt(1.25))
    assert np.isclose(col["q50"][0], 2.5) and np.isclose(col["q25"][0], 1.75) and np.isclose(col["q95"][0], 3.85)
    assert np.isnan(st[1]).all()  # no node held a model
    assert np.all(st[2, [0, 2, 3, 4, 8]] == 5.0) and st[2, 1] == 0.0


def test_node_stats_equal_numpy_row_by_row():
    rng = np.random.default_rng(1)
    v = rng.standard_normal((40, 257))
    v[rng.random(v.shape) < 0.3] = np.nan
    v[3] = np.nan
    v[4] = np.nan
    v[4, 7] = 2.5  # one finite node
    v[5, :4] = np.inf  # infinities are not finite either
    st = metrics.node_stats(v)
    for row, got in zip(v, st):
        f = row[np.isfinite(row)]
        if not f.size:
            assert np.isnan(got).all()
            continue
        want = [f.mean(), f.std(), f.min(), f.max(), *np.quantile(f, [0.05, 0.25, 0.5, 0.75, 0.95])]
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_sample_is_fixed_sorted_distinct_and_keyed_by_the_seed():
    a = metrics.node_sample(100_000, 1024, seed=3)
    assert a.shape == (1024,) and a.dtype == np.int64
    assert np.all(np.diff(a) > 0) and a[0] >= 0 and a[-1] < 100_000
    assert np.array_equal(a, metrics.node_sample(100_000, 1024, seed=3))
    assert not np.array_equal(a, metrics.node_sample(100_000, 1024, seed=4))
    assert a[-1] - a[0] > 90_000  # spread over the network, not a block at the start
    assert np.array_equal(metrics.node_sample(10, 1024, seed=0), np.arange(10))


def test_auto_keeps_every_node_up_to_1024():
    def mode(value, n):
        return metrics.node_mode(config.from_dict({"run": {"node_metrics": value}}).run, n)

    assert mode("auto", 1024) == "all" and mode("auto", 1025) == "sample"
    assert mode("all", 10 ** 5) == "all" and mode("none", 4) == "none" and mode("sample", 4) == "sample"


def test_node_columns_keep_all_the_sample_or_none_and_always_the_stats():
    rng = np.random.default_rng(0)
    cols = {"step": np.arange(3), "train_loss": rng.random((3, 50)), "lr": np.ones(3)}
    ids = np.array([1, 7, 30])
    full = metrics.node_columns(cols, metrics.NODE_COLUMNS, "all", None)
    part = metrics.node_columns(cols, metrics.NODE_COLUMNS, "sample", ids)
    none = metrics.node_columns(cols, metrics.NODE_COLUMNS, "none", None)
    assert np.array_equal(full["train_loss"], cols["train_loss"])
    assert np.array_equal(part["train_loss"], cols["train_loss"][:, ids])
    assert "train_loss" not in none and np.array_equal(none["lr"], cols["lr"])
    for out in (full, part, none):  # the distribution is over ALL nodes in every mode
        assert np.array_equal(out["train_loss_stats"], metrics.node_stats(cols["train_loss"]))
    assert "train_loss_stats" not in cols  # the caller's columns are not changed
