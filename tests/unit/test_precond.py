"""Preconditioners against hand formulas (three steps, clipping, bias correction)."""
import numpy as np
import pytest

from hpcopt import backend, kernels, precond

KERNELS = [kernels.Kernels(mode="numpy")]
if kernels._compiler() is not None:
    KERNELS.append(kernels.Kernels(mode="compiled"))


def grads(k):
    return np.array([[0.5, -2.0, 1e-4, 3.0]], np.float32) * (k + 1) + np.array([[0.1, 0.0, 0.0, -0.2]], np.float32)


@pytest.mark.parametrize("kern", KERNELS, ids=lambda k: k.impl)
def test_adam_local_three_steps(kern):
    h = precond.Hyper("adam", b1=0.9, b2=0.99, alpha=0.05, eps=1e-8)
    x = np.ones((1, 4), np.float32)
    mom = precond.init(h, backend.cpu(), 1, 4)
    xr, m, v = x.astype(float).copy(), np.zeros(4), np.zeros(4)
    for k in range(3):
        g = grads(k)
        precond.step_local(h, kern, x, g, mom, 0.1, k + 1)
        m = 0.9 * m + 0.1 * g[0]
        v = 0.99 * v + 0.01 * g[0] ** 2
        D = np.maximum(0.05, np.sqrt(v / (1 - 0.99 ** (k + 1)))) + 1e-8
        xr = xr - 0.1 * (m / (1 - 0.9 ** (k + 1))) / D
    assert np.allclose(x[0], xr, rtol=1e-5, atol=1e-6)
    # coordinate 2 has a tiny gradient: its D is clipped at alpha
    assert np.sqrt(v[2] / (1 - 0.99 ** 3)) < 0.05 and np.allclose(mom.v[0], v, rtol=1e-5)


@pytest.mark.parametrize("kern", KERNELS, ids=lambda k: k.impl)
def test_rmsprop_local_three_steps_from_warm_start(kern):
    h = precond.Hyper("rmsprop", b2=0.9, alpha=0.3, eps=0.0)
    x = np.zeros((1, 4), np.float32)
    mom = precond.warm_start(h, precond.init(h, backend.cpu(), 1, 4), np.full((1, 4), 0.25, np.float32))
    xr, v = np.zeros(4), np.full(4, 0.25)
    for k in range(3):
        g = grads(k)
        precond.step_local(h, kern, x, g, mom, 0.2, k + 1)
        v = 0.9 * v + 0.1 * g[0] ** 2
        xr = xr - 0.2 * g[0] / np.maximum(0.3, np.sqrt(v))
    assert np.allclose(x[0], xr, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kern", KERNELS, ids=lambda k: k.impl)
def test_oasis_and_frozen_global_step(kern):
    h = precond.Hyper("oasis", b2=0.5, alpha=0.4)
    x = np.zeros((1, 4), np.float32)
    mom = precond.warm_start(h, precond.init(h, backend.cpu(), 1, 4), np.array([[1.0, -3.0, 0.1, 2.0]], np.float32))
    D = precond.diagonal(h, mom.v, 0)
    assert np.allclose(D, [[1.0, 3.0, 0.4, 2.0]])  # |v| clipped below at alpha
    xr, v = np.zeros(4), np.array([1.0, -3.0, 0.1, 2.0])
    for k in range(3):
        g = grads(k)
        zhz = np.array([[2.0, 2.0, 2.0, 2.0]], np.float32)
        precond.step_frozen(h, kern, x, g, mom, D, 0.1, k + 1, zhz=zhz)
        v = 0.5 * v + 0.5 * 2.0
        xr = xr - 0.1 * g[0] / np.array([1.0, 3.0, 0.4, 2.0])  # frozen within the round
    assert np.allclose(x[0], xr, rtol=1e-6) and np.allclose(mom.v[0], v)
    h2 = precond.Hyper("adam", b1=0.5, b2=0.5, alpha=0.0, eps=0.0)
    x2 = np.zeros((1, 4), np.float32)
    mom2 = precond.init(h2, backend.cpu(), 1, 4)
    Dfix = np.full((1, 4), 2.0, np.float32)
    m = np.zeros(4)
    xr2 = np.zeros(4)
    for k in range(3):
        g = grads(k)
        precond.step_frozen(h2, kern, x2, g, mom2, Dfix, 0.1, k + 1)
        m = 0.5 * m + 0.5 * g[0]
        xr2 = xr2 - 0.1 * (m / (1 - 0.5 ** (k + 1))) / 2.0
    assert np.allclose(x2[0], xr2, rtol=1e-6)


def test_hutchinson_estimates_the_hessian_diagonal():
    rng = np.random.default_rng(0)
    d = 12
    Q = rng.standard_normal((d, d))
    H = Q @ Q.T / d + np.diag(np.linspace(1, 3, d))
    est = np.zeros(d)
    N = 4000
    for t in range(N):
        z = precond.rademacher(5, [0], t, d, np.float64)[0]
        est += z * (H @ z)
    est /= N
    off = np.sqrt(((H - np.diag(np.diag(H))) ** 2).sum(axis=1))
    assert np.all(np.abs(est - np.diag(H)) < 4 * off / np.sqrt(N))
    diag = np.diag(np.linspace(1, 3, d))
    z = precond.rademacher(5, [0], 0, d, np.float64)[0]
    assert np.allclose(z * (diag @ z), np.diag(diag))  # a diagonal Hessian is exact in one probe


def test_rademacher_is_plus_minus_one_and_keyed():
    a = precond.rademacher(1, [0, 1, 2], 9, 1000)
    assert set(np.unique(a)) == {-1.0, 1.0} and abs(a.mean()) < 0.1
    assert np.array_equal(a[1:], precond.rademacher(1, [1, 2], 9, 1000))


def _decay_reference(name, mode, x, wd, lr, b1, b2, alpha, eps, D0, v0, steps=3):
    """Hand formulas of coupled weight decay: g' = g + wd x enters the moments and the
    step once, under global (D_hat frozen at D0) and local scaling alike."""
    x = x.astype(float).copy()
    m, v = np.zeros_like(x), v0.astype(float).copy()
    for k in range(steps):
        gp = grads(k)[0].astype(float) + wd * x
        if name == "oasis":
            v = b2 * v + (1 - b2) * 2.0  # z*(Hz) = 2: the statistic has no decay in it
            D = D0 if mode == "global" else np.maximum(alpha, np.abs(v))
            x = x - lr * gp / D
            continue
        v = b2 * v + (1 - b2) * gp ** 2
        if name == "rmsprop":
            D = D0 if mode == "global" else np.maximum(alpha, np.sqrt(v)) + eps
            x = x - lr * gp / D
        else:  # adam
            m = b1 * m + (1 - b1) * gp
            D = D0 if mode == "global" else np.maximum(alpha, np.sqrt(v / (1 - b2 ** (k + 1)))) + eps
            x = x - lr * (m / (1 - b1 ** (k + 1))) / D
    return x, m, v


@pytest.mark.parametrize("kern", KERNELS, ids=lambda k: k.impl)
@pytest.mark.parametrize("name", ["adam", "rmsprop", "oasis"])
@pytest.mark.parametrize("mode", ["global", "local"])
def test_weight_decay_is_coupled_the_same_way_under_both_scalings(kern, name, mode):
    wd, lr, b1, b2, alpha, eps = 0.3, 0.05, 0.9, 0.8, 0.05, 1e-8
    h = precond.Hyper(name, b1=b1, b2=b2, alpha=alpha, eps=eps)
    x0 = np.array([[1.0, -2.0, 0.5, 3.0]], np.float32)
    x = x0.copy()
    mom = precond.init(h, backend.cpu(), 1, 4)
    v0 = np.zeros(4)
    if name != "adam" or mode == "global":
        v0 = np.array([0.5, 0.1, 2.0, 0.3])
        mom = precond.warm_start(h, mom, v0[None].astype(np.float32), mode == "global")
    D = precond.diagonal(h, mom.v, 0)
    zhz = np.full((1, 4), 2.0, np.float32) if name == "oasis" else None
    for k in range(3):
        g = grads(k)
        if mode == "global":
            precond.step_frozen(h, kern, x, g, mom, D, lr, k + 1, wd, zhz=zhz)
        else:
            precond.step_local(h, kern, x, g, mom, lr, k + 1, wd, zhz=zhz)
    xr, m, v = _decay_reference(name, mode, x0[0], wd, lr, b1, b2, alpha, eps, D[0].astype(float), v0)
    assert np.allclose(x[0], xr, rtol=1e-5, atol=1e-6)
    assert np.allclose(mom.v[0], v, rtol=1e-5)
    if name == "adam":
        assert np.allclose(mom.m[0], m, rtol=1e-5, atol=1e-7)


def test_global_adam_decay_at_the_first_step_is_the_documented_decay():
    """Step 1, zero gradient: the decay moves x by lr * wd * x / D (not 1/(1-b1) times that)."""
    h = precond.Hyper("adam", b1=0.9, b2=0.999, alpha=0.0, eps=0.0)
    x = np.full((1, 3), 2.0, np.float32)
    mom = precond.warm_start(h, precond.init(h, backend.cpu(), 1, 3), np.ones((1, 3), np.float32), True)
    D = precond.diagonal(h, mom.v, 0)  # = 1
    precond.step_frozen(h, kernels.Kernels(mode="numpy"), x, np.zeros((1, 3), np.float32), mom, D, 0.1, 1, 0.01)
    assert np.allclose(x, 2.0 - 0.1 * 0.01 * 2.0, rtol=0, atol=1e-7)
