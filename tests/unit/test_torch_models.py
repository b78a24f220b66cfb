"""The torch backend on the CPU: gradients, HVPs, vmap against the loop, BatchNorm buffers,
the tie between the NumPy mlp and torch_mlp, and the flat row layout."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hpcopt import config, models
from hpcopt.config import ConfigError
from hpcopt.models import torch_backend

# (name, input shape, nodes, model keys): small inputs keep the suite fast; vgg11 needs 32x32
NETS = [
    ("torch_mlp", (12,), 4, {"hidden": [8, 6]}),
    ("cnn", (1, 8, 8), 4, {}),
    ("lenet", (1, 16, 16), 4, {}),
    ("resnet20", (3, 8, 8), 3, {}),
    ("vgg11", (3, 32, 32), 2, {}),
]


def make(name, shape, keys=None, classes=5, **model):
    ds = SimpleNamespace(name="stand-in", shape=shape if len(shape) == 3 else None, classes=classes,
                         features=int(np.prod(shape)))
    cfg = config.from_dict({"model": {"name": name, **(keys or {}), **model}})
    log = []
    return torch_backend.build(name, cfg.model, ds, threads=1, log=log.append), log


def batch(m, L, B=3, dtype=np.float64, seed=0, spread=0.05):
    rng = np.random.default_rng(seed)
    x0 = m.init(0).astype(dtype)
    X = x0[None, :] + spread * rng.standard_normal((L, m.d)).astype(dtype) * (np.abs(x0) + 0.01)
    A = rng.standard_normal((L, B, int(np.prod(m.input_shape)))).astype(dtype)
    y = rng.integers(0, m.classes, (L, B))
    w = rng.random((L, B)).astype(dtype)
    w /= w.sum(1, keepdims=True)
    return np.ascontiguousarray(X), A, y, w


def unit_rows(V):
    return V / np.linalg.norm(V, axis=1, keepdims=True)


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(1e-300, np.linalg.norm(b)))


@pytest.mark.parametrize("name,shape,L,keys", NETS, ids=[n[0] for n in NETS])
def test_gradient_matches_float64_finite_differences(name, shape, L, keys):
    m, _ = make(name, shape, keys, vectorize="loop")
    X, A, y, w = batch(m, L)
    loss, G = m.loss_grad(X, A, y, w)
    assert G.shape == X.shape and G.dtype == np.float64 and np.all(np.isfinite(G))
    V = unit_rows(np.random.default_rng(1).standard_normal(X.shape))
    h = 1e-6  # a step of norm 1e-6: small enough not to cross a ReLU or max-pool kink
    fd = (m.loss_grad(X + h * V, A, y, w)[0] - m.loss_grad(X - h * V, A, y, w)[0]) / (2 * h)
    assert rel((G * V).sum(1), fd) < 1e-5
    assert np.allclose(loss, m.loss(X, A, y, w), rtol=1e-10)  # GroupNorm: train and eval modes agree
    # the float32 path (what runs) gives the same gradient to float32 precision
    _, G32 = m.loss_grad(X.astype(np.float32), A.astype(np.float32), y, w.astype(np.float32))
    assert G32.dtype == np.float32 and rel(G32, G) < 1e-4


@pytest.mark.parametrize("name,shape,L,keys", NETS, ids=[n[0] for n in NETS])
def test_vmap_and_loop_agree_for_nodes_with_different_parameters(name, shape, L, keys):
    mv, _ = make(name, shape, keys, vectorize="vmap")
    ml, _ = make(name, shape, keys, vectorize="loop")
    X, A, y, w = batch(mv, L, dtype=np.float32, spread=0.5)
    lv, Gv = mv.loss_grad(X, A, y, w)
    ll, Gl = ml.loss_grad(X, A, y, w)
    assert rel(lv, ll) < 1e-5 and rel(Gv, Gl) < 1e-5
    for i in range(L):  # the nodes really hold different models
        assert rel(Gl[i], Gl[(i + 1) % L]) > 1e-2
    Xt, yt = A[0], y[0]
    assert np.array_equal(mv.accuracy(X, Xt, yt), ml.accuracy(X, Xt, yt))
    wt = np.full((1, Xt.shape[0]), 1.0 / Xt.shape[0], np.float32)
    assert rel(mv.loss(X, Xt, yt, wt), ml.loss(X, Xt, yt, wt)) < 1e-5


@pytest.mark.parametrize("name,shape,L,keys", NETS[:4], ids=[n[0] for n in NETS[:4]])
def test_hvp_matches_finite_difference_of_gradients(name, shape, L, keys):
    for vec in ("vmap", "loop"):
        m, _ = make(name, shape, keys, vectorize=vec)
        X, A, y, w = batch(m, L)
        V = unit_rows(np.random.default_rng(2).standard_normal(X.shape))
        H = m.hvp(X, V, A, y, w)
        h = 1e-6
        fd = (m.loss_grad(X + h * V, A, y, w)[1] - m.loss_grad(X - h * V, A, y, w)[1]) / (2 * h)
        assert rel(H, fd) < 1e-5, vec


def test_hvp_is_symmetric_and_shared_data_broadcasts():
    m, _ = make("cnn", (1, 8, 8))
    X, A, y, w = batch(m, 2)
    rng = np.random.default_rng(3)
    U, V = rng.standard_normal(X.shape), rng.standard_normal(X.shape)
    assert np.allclose((U * m.hvp(X, V, A, y, w)).sum(1), (V * m.hvp(X, U, A, y, w)).sum(1), rtol=1e-8)
    # shared data (B, f) gives every node the same batch
    l_shared, G_shared = m.loss_grad(X, A[0], y[0], w[:1])
    l_node, G_node = m.loss_grad(X, np.stack([A[0], A[0]]), np.stack([y[0], y[0]]), np.stack([w[0], w[0]]))
    assert np.allclose(l_shared, l_node, rtol=1e-12) and np.allclose(G_shared, G_node, rtol=1e-10)


def test_torch_mlp_follows_the_numpy_mlp_trajectory():
    f, C, L, B = 12, 4, 3, 8
    cfg = config.from_dict({"model": {"name": "mlp", "hidden": [10, 6], "l2": 0.001}})
    ds = SimpleNamespace(name="stand-in", shape=None, classes=C, features=f)
    ref = models.build(cfg.model, ds)
    tcfg = config.from_dict({"model": {"name": "torch_mlp", "hidden": [10, 6], "l2": 0.001}})
    tm = models.build(tcfg.model, ds, threads=1)
    x0 = ref.init(7)
    assert tm.d == ref.d and np.array_equal(tm.init(7), x0)
    Xn, Xt = np.tile(x0, (L, 1)), np.tile(x0, (L, 1))
    rng = np.random.default_rng(0)
    for _ in range(20):
        A = rng.standard_normal((L, B, f)).astype(np.float32)
        y = rng.integers(0, C, (L, B))
        w = np.full((L, B), 1.0 / B, np.float32)
        ln, Gn = ref.loss_grad(Xn, A, y, w)
        lt, Gt = tm.loss_grad(Xt, A, y, w)
        assert np.allclose(ln, lt, rtol=1e-5)
        Xn -= 0.5 * Gn
        Xt -= 0.5 * Gt
    assert rel(Xt, Xn) < 1e-5 and rel(Xn, np.tile(x0, (L, 1))) > 1e-2  # it moved, and both alike


def test_flat_layout_round_trips_through_load_state_dict():
    m, _ = make("resnet20", (3, 8, 8), norm="batch")
    row = m.init(0) + np.arange(m.d, dtype=np.float32) * 1e-6
    sd = {k: torch.from_numpy(v) for k, v in m.state_dict(row).items()}
    net = m.make()
    net.load_state_dict(sd, strict=True)
    assert np.array_equal(m.spec.flatten(net), row)
    ends = [e.offset + e.size for e in m.spec.entries]
    assert ends[-1] == m.d and m.spec.params + m.buffer_dim == m.d
    assert all(e.buffer for e in m.spec.entries if e.offset >= m.spec.params)


def test_batchnorm_statistics_update_in_place_and_freeze():
    m, log = make("resnet20", (3, 8, 8), norm="batch")
    assert m.vectorize == "loop" and any("BatchNorm" in line for line in log)
    X, A, y, w = batch(m, 3, dtype=np.float32)
    P = m.spec.params
    before = X.copy()
    _, G = m.loss_grad(X, A, y, w)
    assert np.all(G[:, P:] == 0)  # no gradient on the statistics: a fused update leaves them alone
    assert np.array_equal(X[:, :P], before[:, :P])
    assert not np.allclose(X[:, P:], before[:, P:])  # each node's statistics moved towards its batch
    assert rel(X[0, P:] - before[0, P:], X[1, P:] - before[1, P:]) > 1e-3
    snap = X.copy()
    with models.frozen(m):
        m.loss_grad(X, A, y, w)
    m.hvp(X, G, A, y, w)
    m.loss(X, A[0], y[0], w[:1])
    assert np.array_equal(X, snap)
    # eval mode uses the running statistics: changing them changes the loss
    X2 = X.copy()
    X2[:, P:] *= 1.5
    assert not np.allclose(m.loss(X, A[0], y[0], w[:1]), m.loss(X2, A[0], y[0], w[:1]))


class DataDependent(torch.nn.Module):
    """A forward that vmap cannot batch (a Python branch on a tensor's value)."""

    def __init__(self, f, classes):
        super().__init__()
        self.lin = torch.nn.Linear(f, classes)

    def forward(self, x):
        z = self.lin(x.reshape(x.shape[0], -1))
        return z * 2 if float(z.sum()) > 1e9 else z


def test_auto_falls_back_to_the_loop_with_one_logged_line(tmp_path):
    src = tmp_path / "dd_model.py"
    src.write_text("import torch\n"
                   "from tests.unit.test_torch_models import DataDependent\n"
                   "def build(shape, classes):\n    return DataDependent(shape[0], classes)\n")
    m, log = make("torch", (6,), factory=f"{src}:build")
    assert m.vectorize == "loop" and not log  # auto on the CPU: the loop, chosen silently
    m.vectorize = "auto"  # what auto means on a GPU: try vmap on the first batch
    X, A, y, w = batch(m, 3, dtype=np.float32)
    _, G = m.loss_grad(X, A, y, w)
    assert m.vectorize == "loop" and len(log) == 1 and "vmap" in log[0] and "loop" in log[0]
    ml, _ = make("torch", (6,), factory=f"{src}:build", vectorize="loop")
    assert np.array_equal(G, ml.loss_grad(X, A, y, w)[1])


@pytest.mark.parametrize("spec,why", [
    ("nocolon", "expected 'package.module:function'"),
    ("hpcopt_no_such_module:f", "no module named"),
    ("hpcopt.models.nets:no_such_function", "has no attribute"),
    ("hpcopt.models.nets:__doc__", "not a function"),
    ("missing/file.py:f", "no file"),
])
def test_factory_specs_that_do_not_load(spec, why):
    with pytest.raises(ConfigError, match=why):
        torch_backend.load_factory(spec)


@pytest.mark.parametrize("body,why", [
    ("def f(shape, classes):\n    return 3\n", "not a torch.nn.Module"),
    ("def f(shape, classes):\n    return torch.nn.Linear(shape[0], classes + 1)\n", "the data need"),
    ("def f(shape, classes):\n    return torch.nn.Linear(shape[0] + 1, classes)\n", "cannot take a batch"),
    ("def f(shape, classes):\n    raise RuntimeError('boom')\n", "boom"),
    ("def f(shape, classes):\n    return torch.nn.ReLU()\n", "no parameters"),
    ("def f(shape, classes) oops\n", "SyntaxError"),
])
def test_factories_that_do_not_fit_the_data(tmp_path, body, why):
    src = tmp_path / "user_net.py"
    src.write_text("import torch\n" + body)
    with pytest.raises(ConfigError, match=why):
        make("torch", (6,), factory=f"{src}:f")


def test_config_rules_for_torch_models():
    for data, why in [({"model": {"name": "torch"}}, "model.factory"),
                      ({"model": {"name": "lenet", "norm": "batch", "vectorize": "vmap"}}, "vmap"),
                      ({"model": {"name": "lenet", "norm": "batch"}, "optimizer": {"weight_decay": 0.1}},
                       "weight_decay"),
                      ({"model": {"name": "mlp", "norm": "batch"}}, "model.norm"),
                      ({"model": {"name": "cnn"}, "data": {"augment": True}}, "data.augment")]:
        with pytest.raises(ConfigError, match=why):
            config.from_dict(data)
    ds = SimpleNamespace(name="digits-like", shape=None, classes=10, features=30)
    with pytest.raises(ConfigError, match="images"):
        models.build(config.from_dict({"model": {"name": "cnn"}}).model, ds)
