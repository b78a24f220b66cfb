import numpy as np
import pytest

from hpcopt import config, data, models
from hpcopt.config import ConfigError


def dcfg(**kw):
    return config.from_dict({"data": kw}).data


@pytest.mark.parametrize("name, shape, classes", [("digits", (1797, 64), 10), ("breast_cancer", (569, 30), 2)])
def test_bundled_sets(name, shape, classes):
    ds = data.load(dcfg(dataset=name, test_fraction=0.25), 4)
    assert len(ds.X_train) + len(ds.X_test) == shape[0] and ds.features == shape[1]
    assert ds.classes == classes and ds.y_train.dtype == np.int64
    if name == "digits":
        assert ds.X_train.max() <= 1.0
    else:
        assert ds.X_train.max() > 1000 and ds.X_train[ds.X_train > 0].min() < 0.01  # badly scaled
        st = data.load(dcfg(dataset=name, standardize=True), 4)
        assert np.allclose(st.X_train.mean(0), 0, atol=1e-4)


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "shards"])
def test_partitions_cover_every_sample_once(kind):
    ds = data.load(dcfg(dataset="digits"), 10)
    parts = data.partition(ds, 10, kind, alpha=0.3, shards_per_node=2, seed=1)
    allidx = np.concatenate(parts)
    assert len(parts) == 10 and min(len(p) for p in parts) >= 1
    assert np.array_equal(np.sort(allidx), np.arange(len(ds.X_train)))
    labels_per_node = [len(np.unique(ds.y_train[p])) for p in parts]
    if kind == "shards":
        assert max(labels_per_node) <= 4
    if kind == "iid":
        assert min(labels_per_node) == 10


def test_dirichlet_small_alpha_is_skewed():
    ds = data.load(dcfg(dataset="digits"), 8)
    skew = []
    for alpha in (0.05, 100.0):
        parts = data.partition(ds, 8, "dirichlet", alpha=alpha, seed=0)
        frac = [np.bincount(ds.y_train[p], minlength=10).max() / len(p) for p in parts]
        skew.append(np.mean(frac))
    assert skew[0] > 0.5 > skew[1]


def test_keyed_streams_do_not_depend_on_grouping():
    high = np.array([5, 7, 11, 13])
    together = data.keyed_ints(3, [0, 1, 2, 3], 17, 6, high)
    apart = np.concatenate([data.keyed_ints(3, [v], 17, 6, high[v:v + 1]) for v in range(4)])
    assert np.array_equal(together, apart)
    assert (together < high[:, None]).all() and (together >= 0).all()
    assert not np.array_equal(together, data.keyed_ints(3, [0, 1, 2, 3], 18, 6, high))
    counts = np.bincount(data.keyed_ints(0, [0], 0, 70000, np.array([7]))[0], minlength=7)
    assert counts.min() > 9000 and counts.max() < 11000


def _splitmix_finaliser(z: int) -> int:
    mask = (1 << 64) - 1
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & mask
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_keyed_bits_are_the_documented_formula():
    # an independent evaluation with Python integers; the vectorised version caches the
    # per-node keys, so it is asked twice, for several nodes, steps, streams and counts
    g, mask = 0x9E3779B97F4A7C15, (1 << 64) - 1

    def expect(seed, stream, node, step, j):
        k = _splitmix_finaliser((seed * g + stream) & mask)
        k = _splitmix_finaliser(k ^ ((node * g + 1) & mask))
        k = _splitmix_finaliser(k ^ ((step * g + 2) & mask))
        return _splitmix_finaliser((k + (j + 1) * g) & mask)

    for _ in range(2):
        for seed, stream, nodes, step, count in [(0, 0, [0, 5, 255], 3, 4), (2**40 + 7, 29, [1], 10**6, 2),
                                                 (3, 7, [4, 2], [8, 9], 3)]:
            bits = data.keyed_bits(seed, nodes, step, count, stream)
            steps = step if isinstance(step, list) else [step] * len(nodes)
            for i, (node, st) in enumerate(zip(nodes, steps)):
                assert [int(b) for b in bits[i]] == [expect(seed, stream, node, st, j) for j in range(count)]


def test_node_data_batches_match_per_node_samplers():
    ds = data.load(dcfg(dataset="digits"), 6)
    parts = data.partition(ds, 6, "dirichlet", alpha=0.5)
    nd = data.NodeData(np, ds, parts, [2, 3, 4], 8, seed=5)
    A, y, w = nd.batch(11)
    assert A.shape == (3, 8, 64) and np.allclose(w.sum(1), 1)
    for i, v in enumerate([2, 3, 4]):
        one = data.NodeData(np, ds, parts, [v], 8, seed=5)
        A1, y1, _ = one.batch(11)
        assert np.array_equal(A1[0], A[i]) and np.array_equal(y1[0], y[i])
        idx = parts[v][one.batch_indices(11)[0]]
        assert np.array_equal(A[i], ds.X_train[idx])


def test_full_batch_weights_mean_over_each_nodes_data():
    ds = data.load(dcfg(dataset="quadratic", samples_per_node=9, dim=3), 4)
    parts = data.partition(ds, 4, "iid")
    nd = data.NodeData(np, ds, parts, [0, 1, 2, 3], 0, seed=0)
    A, y, w = nd.batch(0)
    m = models.LinearModel("quadratic", 3)
    x = np.ones((4, 3), np.float32)
    loss = m.loss(x, A, y, w)
    ref = [0.5 * np.mean((ds.X_train[p] @ x[0] - ds.y_train[p]) ** 2) for p in parts]
    assert np.allclose(loss, ref, rtol=1e-5)


def test_file_loaders(tmp_path):
    f = tmp_path / "a.svm"
    f.write_text("1 1:0.5 3:2\n-1 2:1\n1 1:1\n-1 3:4\n")
    X, y = data.load_libsvm(str(f))
    assert X.shape == (4, 3) and X[0, 2] == 2 and X[1, 1] == 1
    ds = data.load(dcfg(dataset="libsvm", path=str(f), test_fraction=0.25), 2)
    assert ds.classes == 2 and set(np.unique(ds.y_train)) <= {0, 1}
    np.savez(tmp_path / "d.npz", X=np.arange(20.0).reshape(10, 2), y=np.arange(10) % 3)
    ds = data.load(dcfg(dataset="npz", path=str(tmp_path / "d.npz"), test_fraction=0.2), 2)
    assert ds.classes == 3 and len(ds.X_test) == 2
    import h5py
    with h5py.File(tmp_path / "d.h5", "w") as h:
        h["X"] = np.ones((6, 2))
        h["y"] = np.linspace(0, 1, 6)
        h["X_test"] = np.ones((2, 2))
        h["y_test"] = np.array([0.1, 0.3])
    ds = data.load(dcfg(dataset="hdf5", path=str(tmp_path / "d.h5")), 2)
    assert ds.classes == 0 and len(ds.X_test) == 2
    f.write_text("1 a:b\n")
    with pytest.raises(ConfigError, match="line 1"):
        data.load_libsvm(str(f))
    with pytest.raises(ConfigError, match="needs arrays"):
        np.savez(tmp_path / "bad.npz", Z=np.ones(3))
        data.load(dcfg(dataset="npz", path=str(tmp_path / "bad.npz")), 2)


def test_step_rng_is_shared_and_keyed():
    a = data.step_rng(1, 5).permutation(10)
    assert np.array_equal(a, data.step_rng(1, 5).permutation(10))
    assert not np.array_equal(a, data.step_rng(1, 6).permutation(10))


def test_classification_generated_in_blocks_equals_one_pass():
    """The block-wise generator gives the values of the one-pass formula (peak memory only changes)."""
    def one_pass(n_samples, dim, classes, separation, feature_scale, seed):
        rng = np.random.default_rng(seed)
        means = rng.standard_normal((classes, dim))
        means *= (separation / 2) / np.linalg.norm(means, axis=1, keepdims=True)
        y = rng.integers(0, classes, n_samples)
        X = means[y] + rng.standard_normal((n_samples, dim))
        if feature_scale > 0 and dim > 1:
            X *= 10.0 ** (feature_scale * (np.arange(dim) / (dim - 1) - 0.5))
        return X.astype(np.float32), y

    for args in [(300_000, 7, 3, 2.0, 0.0, 1), (30_000, 99, 2, 1.0, 2.0, 5), (10, 1, 2, 1.0, 1.0, 0)]:
        X, y = data.classification(*args)
        X1, y1 = one_pass(*args)
        assert X.dtype == np.float32 and np.array_equal(X, X1) and np.array_equal(y, y1)
