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


def _keyed_case(rng, rows, f, N=400, logistic=True):
    data_ = rng.standard_normal((N, f)).astype(np.float32)
    y = (rng.random(N) < 0.5).astype(np.float32) if logistic else rng.standard_normal(N).astype(np.float32)
    X = (2 * rng.standard_normal((rows, f + logistic))).astype(np.float32)
    counts = rng.integers(1, 30, rows).astype(np.int64)
    starts = rng.integers(0, N - 30, rows).astype(np.int64)
    keys = rng.integers(-2**63, 2**63 - 1, rows, dtype=np.int64)
    return X, data_, y, keys, counts, starts


def _fused(k, X, data_, y, keys, steps, counts, starts, B, l2, logistic):
    loss, G = np.empty(len(X), np.float32), np.empty_like(X)
    k.keyed_linear_loss_grad(loss, G, X, data_, y, keys, steps, counts, starts, B, np.float32(1 / max(1, B)), l2,
                             logistic)
    return loss, G


@pytest.mark.parametrize("logistic", [True, False])
@pytest.mark.parametrize("f, B", [(1, 1), (7, 16), (8, 5), (29, 16), (64, 70)])
def test_fused_linear_loss_grad_equals_the_reference_bitwise(compiled, logistic, f, B):
    rng = np.random.default_rng(f * 100 + B)
    X, data_, y, keys, counts, starts = _keyed_case(rng, 23, f, logistic=logistic)
    ref = kernels.Kernels(mode="numpy")
    for steps in (np.array([77], np.int64), rng.integers(0, 10**9, 23).astype(np.int64)):
        for l2 in (0.0, 0.01):
            a = _fused(compiled, X, data_, y, keys, steps, counts, starts, B, l2, logistic)
            b = _fused(ref, X, data_, y, keys, steps, counts, starts, B, l2, logistic)
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
            # a row's result does not depend on the other rows of the call
            sub = slice(5, 12)
            c = _fused(compiled, np.ascontiguousarray(X[sub]), data_, y, keys[sub].copy(),
                       steps if len(steps) == 1 else steps[sub].copy(), counts[sub].copy(), starts[sub].copy(),
                       B, l2, logistic)
            assert np.array_equal(c[0], a[0][sub]) and np.array_equal(c[1], a[1][sub])


@pytest.mark.parametrize("logistic", [True, False])
def test_fused_linear_loss_grad_is_the_model_on_the_gathered_batch(compiled, logistic):
    """Against the textbook formulas in float64 on the batch keyed_gather draws."""
    rng = np.random.default_rng(5)
    f, B, l2 = 29, 16, 0.003
    X, data_, y, keys, counts, starts = _keyed_case(rng, 31, f, logistic=logistic)
    X[0, :] = 40.0  # |z| in the hundreds: exp(-|z|) underflows, the loss stays finite and exact
    steps = np.array([3], np.int64)
    loss, G = _fused(compiled, X, data_, y, keys, steps, counts, starts, B, l2, logistic)
    A, idx = np.empty((31, B, f), np.float32), np.empty((31, B), np.int64)
    compiled.keyed_gather(A, idx, data_, keys, steps, counts, starts)
    A64, y64, X64 = A.astype(np.float64), y[idx].astype(np.float64), X.astype(np.float64)
    z = np.einsum("rjt,rt->rj", A64, X64[:, :f]) + (X64[:, f:] if logistic else 0.0)
    if logistic:
        lj, dz = np.logaddexp(0, z) - y64 * z, 1 / (1 + np.exp(-z)) - y64
    else:
        lj, dz = 0.5 * (z - y64) ** 2, z - y64
    want_loss = lj.mean(axis=1) + 0.5 * l2 * (X64 * X64).sum(axis=1)
    want_G = np.concatenate([np.einsum("rj,rjt->rt", dz, A64) / B] + ([dz.mean(axis=1, keepdims=True)]
                                                                     if logistic else []), axis=1) + l2 * X64
    np.testing.assert_allclose(loss, want_loss, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(G, want_G, rtol=2e-4, atol=2e-5)
    model = LinearModel("logistic" if logistic else "quadratic", f, 2, l2)
    ml, mg = model.loss_grad(X, A, y[idx], np.full((31, B), 1 / B, np.float32))
    np.testing.assert_allclose(loss, ml, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(G, mg, rtol=2e-4, atol=2e-5)


def test_fused_linear_loss_grad_checks_its_arguments(compiled):
    rng = np.random.default_rng(0)
    X, data_, y, keys, counts, starts = _keyed_case(rng, 4, 5)
    steps = np.array([1], np.int64)
    ok = dict(B=3, l2=0.0, logistic=True)
    with pytest.raises(ValueError, match="shapes"):
        _fused(compiled, X[:, :5].copy(), data_, y, keys, steps, counts, starts, **ok)  # no bias column
    with pytest.raises(ValueError, match="shapes"):
        _fused(compiled, X, data_, y[:-1].copy(), keys, steps, counts, starts, **ok)
    with pytest.raises(ValueError, match="starts \\+ counts"):
        _fused(compiled, X, data_, y, keys, steps, counts, starts + 400, **ok)
    with pytest.raises(ValueError, match="float32"):
        _fused(compiled, X.astype(np.float64), data_, y, keys, steps, counts, starts, **ok)
    with pytest.raises(ValueError, match="B = 0"):
        _fused(compiled, X, data_, y, keys, steps, counts, starts, 0, 0.0, True)


@pytest.mark.parametrize("impl", ["compiled", "numpy"])
def test_bound_linear_pass_equals_the_call_and_checks_what_changes(compiled, impl):
    """Kernels.linear_pass checks the fixed operands once; each call checks X, G, loss, steps."""
    k = compiled if impl == "compiled" else kernels.Kernels(mode="numpy")
    rng = np.random.default_rng(3)
    X, data_, y, keys, counts, starts = _keyed_case(rng, 9, 29)
    bound = k.linear_pass(data_, y, keys, counts, starts, 16, 1 / 16, 0.01, True)
    for steps in (np.array([4], np.int64), rng.integers(0, 10**9, 9).astype(np.int64)):
        loss, G = np.empty(9, np.float32), np.empty_like(X)
        bound(loss, G, X, steps)
        want = _fused(k, X, data_, y, keys, steps, counts, starts, 16, 0.01, True)
        assert np.array_equal(loss, want[0]) and np.array_equal(G, want[1])
    loss, G = np.empty(9, np.float32), np.empty_like(X)
    with pytest.raises(ValueError, match="shapes"):
        bound(loss, G, np.ascontiguousarray(X[:, :29]), np.array([0], np.int64))
    with pytest.raises(ValueError, match="float32"):
        bound(loss, G, X.astype(np.float64), np.array([0], np.int64))
    with pytest.raises(ValueError, match="steps"):
        bound(loss, G, X, np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="starts \\+ counts"):
        k.linear_pass(data_, y, keys, counts, starts + 400, 16, 1 / 16, 0.0, True)
    with pytest.raises(ValueError, match="keys"):
        k.linear_pass(data_, y, keys.astype(np.int32), counts, starts, 16, 1 / 16, 0.0, True)


@pytest.mark.parametrize("kind", ["logistic", "quadratic"])
def test_nodedata_fused_pass_equals_gather_then_reference(compiled, kind):
    ds = dataset(classes=2) if kind == "logistic" else dataset()
    parts = data.partition(ds, 40, "iid", seed=1)
    model = LinearModel(kind, ds.features, 2, 0.01)
    X = np.random.default_rng(2).standard_normal((35, model.d)).astype(np.float32)
    nd = data.NodeData(np, ds, parts, range(5, 40), 16, 7, kernels=compiled)
    for t in (0, 5, 2**40):
        loss, G = nd.linear_loss_grad(model, X, t)
        A, y, w = nd.batch(t)
        rl, rG = np.empty_like(loss), np.empty_like(G)
        kernels.ref_linear_loss_grad(rl, rG, X, A, y.astype(np.float32), w, 0.01, kind == "logistic")
        assert np.array_equal(loss, rl) and np.array_equal(G, rG)
        for lo, hi in ((3, 10), (0, 35), (10, 35), (3, 10)):  # row ranges bound once each, in any order
            sub = nd.linear_loss_grad(model, np.ascontiguousarray(X[lo:hi]), t, lo, hi)
            assert np.array_equal(sub[0], loss[lo:hi]) and np.array_equal(sub[1], G[lo:hi])
    assert nd.linear_loss_grad(LinearModel("softmax", ds.features, 3), X, 0) is None
    assert data.NodeData(np, ds, parts, range(5, 40), 0, 7, kernels=compiled).linear_loss_grad(model, X, 0) is None
