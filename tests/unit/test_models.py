import numpy as np
import pytest

from hpcopt import models


def problem(kind, L=3, B=7, f=4, C=3, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((L, B, f))
    if kind == "quadratic":
        y = rng.standard_normal((L, B))
    else:
        y = rng.integers(0, 2 if kind == "logistic" else C, (L, B))
    w = rng.random((L, B))
    w /= w.sum(1, keepdims=True)
    if kind == "mlp":
        m = models.MLP(f, [5, 4], C, "tanh", l2=0.01)
    else:
        m = models.LinearModel(kind, f, C, l2=0.01)
    X = rng.standard_normal((L, m.d)) * 0.5
    return m, X, A, y, w


KINDS = ["quadratic", "logistic", "softmax", "mlp"]


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_matches_finite_differences(kind):
    m, X, A, y, w = problem(kind)
    loss, G = m.loss_grad(X, A, y, w)
    assert np.allclose(loss, m.loss(X, A, y, w))
    rng = np.random.default_rng(1)
    V = rng.standard_normal(X.shape)
    h = 1e-6
    fd = (m.loss(X + h * V, A, y, w) - m.loss(X - h * V, A, y, w)) / (2 * h)
    assert np.allclose((G * V).sum(1), fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", KINDS)
def test_hvp_matches_finite_differences_of_gradients(kind):
    m, X, A, y, w = problem(kind)
    rng = np.random.default_rng(2)
    V = rng.standard_normal(X.shape)
    h = 1e-5
    fd = (m.loss_grad(X + h * V, A, y, w)[1] - m.loss_grad(X - h * V, A, y, w)[1]) / (2 * h)
    Hv = m.hvp(X, V, A, y, w)
    # exact for the linear models; the MLP's own central difference has an O(eps^2) error
    tol = 2e-3 if kind == "mlp" else 1e-5
    assert np.abs(Hv - fd).max() <= tol * np.abs(fd).max()


@pytest.mark.parametrize("kind", KINDS)
def test_batched_equals_one_node_at_a_time_and_shared_data(kind):
    m, X, A, y, w = problem(kind)
    loss, G = m.loss_grad(X, A, y, w)
    for i in range(X.shape[0]):
        li, gi = m.loss_grad(X[i:i + 1], A[i:i + 1], y[i:i + 1], w[i:i + 1])
        assert np.allclose(li, loss[i]) and np.allclose(gi, G[i])
    shared = m.loss(X, A[0], y[0], np.broadcast_to(w[0], w.shape))
    for i in range(X.shape[0]):
        assert np.allclose(shared[i], m.loss(X[i:i + 1], A[:1], y[:1], w[:1])[0])


def test_accuracy_and_float32():
    m, X, A, y, w = problem("softmax")
    acc = m.accuracy(X.astype(np.float32), A.astype(np.float32), y)
    pred = np.einsum("lbf,lfc->lbc", A, X[:, :12].reshape(3, 4, 3)) + X[:, None, 12:]
    assert np.allclose(acc, (pred.argmax(-1) == y).mean(1))
    loss, G = m.loss_grad(X.astype(np.float32), A.astype(np.float32), y, w.astype(np.float32))
    assert G.dtype == np.float32


def test_least_squares_optimum_zeroes_the_mean_gradient():
    from hpcopt import config, data
    cfg = config.from_dict({"data": {"dataset": "quadratic", "dim": 4, "samples_per_node": 10}}).data
    ds = data.load(cfg, 5)
    parts = data.partition(ds, 5, "iid")
    xs = models.least_squares_optimum(ds, parts, l2=0.1)
    m = models.LinearModel("quadratic", 4, l2=0.1)
    g = np.zeros(4)
    for p in parts:
        _, gi = m.loss_grad(xs[None], ds.X_train[p][None].astype(float), ds.y_train[p][None].astype(float),
                            np.full((1, len(p)), 1 / len(p)))
        g += gi[0] / 5
    assert np.abs(g).max() < 1e-5
