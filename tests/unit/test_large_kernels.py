"""The keyed minibatch gather (kernels/keyed_gather.cu): compiled CPU build, NumPy reference
and NodeData's NumPy path give the same batches bit for bit; LinearModel's in-place
logistic loss/gradient equals the plain expression bit for bit."""
import numpy as np
import pytest

from hpcopt import data, kernels
from hpcopt.models.numpy_models import LinearModel


@pytest.fixture(scope="module")
def compiled():
    k = kernels.Kernels(mode="auto")
    if k.impl != "cpu":
        pytest.skip(f"no CPU kernels here: {k.note}")
    return k


def dataset(N=3000, f=7, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return data.Dataset("t", rng.standard_normal((N, f)).astype(np.float32), rng.integers(0, classes, N),
                        np.zeros((1, f), np.float32), np.zeros(1, np.int64), classes)


def test_kernel_equals_reference(compiled):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((500, 9)).astype(np.float32)
    rows, B = 37, 11
    counts = rng.integers(1, 20, rows).astype(np.int64)
    starts = rng.integers(0, 480, rows).astype(np.int64)
    keys = rng.integers(-2**63, 2**63 - 1, rows, dtype=np.int64)
    for steps in (np.array([12345], np.int64), rng.integers(0, 10**9, rows).astype(np.int64)):
        A1, i1 = np.empty((rows, B, 9), np.float32), np.empty((rows, B), np.int64)
        A2, i2 = np.empty_like(A1), np.empty_like(i1)
        compiled.keyed_gather(A1, i1, X, keys, steps, counts, starts)
        kernels.Kernels(mode="numpy").keyed_gather(A2, i2, X, keys, steps, counts, starts)
        assert np.array_equal(i1, i2) and np.array_equal(A1, A2)
        assert ((i1 >= starts[:, None]) & (i1 < (starts + counts)[:, None])).all()


def test_kernel_checks_its_arguments(compiled):
    X = np.zeros((10, 3), np.float32)
    A, idx = np.empty((2, 4, 3), np.float32), np.empty((2, 4), np.int64)
    one = np.ones(2, np.int64)
    with pytest.raises(ValueError, match="starts \\+ counts"):
        compiled.keyed_gather(A, idx, X, one, one[:1], np.array([5, 8]), np.array([0, 5]))
    with pytest.raises(ValueError, match="float32"):
        compiled.keyed_gather(A, idx, X.astype(np.float64), one, one[:1], one, one)
    with pytest.raises(ValueError, match="shapes"):
        compiled.keyed_gather(A[:1], idx, X, one, one[:1], one, one)


@pytest.mark.parametrize("B", [1, 5, 16])
def test_nodedata_batches_are_the_same_compiled_or_not(compiled, B):
    ds = dataset()
    parts = data.partition(ds, 40, "dirichlet", alpha=0.3, seed=4)
    a = data.NodeData(np, ds, parts, range(5, 40), B, 7, kernels=compiled)
    b = data.NodeData(np, ds, parts, range(5, 40), B, 7, kernels=kernels.Kernels(mode="numpy"))
    assert a._compiled() is compiled and b._compiled() is None
    for t in (0, 1, 99, 2**40):
        for kw in ({}, {"rows": [3, 0, 30]}, {"stream": 5}, {"batch_size": 3, "rows": [2]}):
            for p, q in zip(a.batch(t, **kw), b.batch(t, **kw)):
                assert p.dtype == q.dtype and np.array_equal(p, q)
        for p, q in zip(a.batch_for([4, 9, 9], [t, 7, 3]), b.batch_for([4, 9, 9], [t, 7, 3])):
            assert np.array_equal(p, q)
    # and the indices are data.keyed_ints' (the documented stream)
    idx = data.keyed_ints(7, a.nodes, 3, B, a.counts) + a._starts
    assert np.array_equal(a.batch(3)[0], ds.X_train[np.concatenate([np.asarray(parts[v]) for v in a.nodes])][idx])


def _plain_logistic(Z, y, w):
    z = Z[..., 0]
    y = y.astype(z.dtype, copy=False)
    e = np.exp(-np.abs(z))
    softplus = np.maximum(z, 0) + np.log1p(e)
    p = np.where(z >= 0, 1, e) / (1 + e)
    return (w * (softplus - y * z)).sum(axis=-1), (w * (p - y))[..., None]


@pytest.mark.parametrize("shape", [(256, 16, 20), (3, 1, 4), (9, 33, 30)])
def test_logistic_in_place_equals_the_plain_expression(shape):
    L, B, f = shape
    rng = np.random.default_rng(L)
    m = LinearModel("logistic", f)
    X = (3 * rng.standard_normal((L, m.d))).astype(np.float32)
    A = rng.standard_normal((L, B, f)).astype(np.float32)
    y, w = rng.integers(0, 2, (L, B)), np.full((L, B), 1 / B, np.float32)
    Z = m.logits(X, A)
    ref = np.matmul(A, m._split(X)[0]) + m._split(X)[1][:, None, :]
    assert np.array_equal(Z, ref)
    for got, want in zip(m._dloss(Z, y, w), _plain_logistic(Z, y, w)):
        assert got.dtype == want.dtype and np.array_equal(got, want)


@pytest.mark.parametrize("kind,classes", [("logistic", 0), ("softmax", 4), ("quadratic", 0)])
def test_shared_data_evaluation_in_node_chunks_changes_no_bit(kind, classes):
    rng = np.random.default_rng(3)
    m = LinearModel(kind, 6, classes)
    X = rng.standard_normal((50, m.d)).astype(np.float32)
    A = rng.standard_normal((30, 6)).astype(np.float32)
    y = rng.standard_normal(30).astype(np.float32) if kind == "quadratic" else rng.integers(0, max(2, classes), 30)
    w = np.broadcast_to(np.full((1, 30), 1 / 30, np.float32), (50, 30))
    whole = m.loss(X, A, y, w), m.accuracy(X, A, y)
    m.EVAL_CHUNK = 100  # 3 nodes per chunk
    assert len(m._chunks(X, A)) > 10
    assert np.array_equal(m.loss(X, A, y, w), whole[0])
    assert np.array_equal(m.accuracy(X, A, y), whole[1], equal_nan=True)
