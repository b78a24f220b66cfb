"""Data sets, partitions over nodes and per-node minibatch samplers.

Data sets: synthetic heterogeneous quadratics (least squares with a closed-form
optimum), synthetic classification (optionally with badly scaled features), the two
bundled real sets (`digits`, `breast_cancer`, see hpcopt/datasets/README.md) and
loaders for LIBSVM text, NPZ and HDF5 files.

Partitions: iid, Dirichlet(alpha) over labels, label shards. Quadratic data are
generated per node, so they carry their own partition.

Randomness: every per-node random choice is a pure function of (seed, node, step)
through a counter-based hash (splitmix64), never of the rank, so a config gives the
same batches whatever the number of ranks. Per-step choices shared by all nodes use
`step_rng(seed, step, tag)`.
"""
from __future__ import annotations

import gzip
import os
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .config import ConfigError

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "datasets")


class Dataset(NamedTuple):
    name: str
    X_train: np.ndarray  # (N, f) float32
    y_train: np.ndarray  # int64 labels (classification) or float32 targets (regression)
    X_test: np.ndarray
    y_test: np.ndarray
    classes: int  # 0 for regression
    node_train: Optional[np.ndarray] = None  # given partition (quadratic): node of each sample
    node_test: Optional[np.ndarray] = None
    shape: Optional[Tuple[int, int, int]] = None  # image data: (channels, height, width) of a flattened row

    @property
    def task(self) -> str:
        return "regression" if self.classes == 0 else "classification"

    @property
    def features(self) -> int:
        return self.X_train.shape[1]


# ---------------------------------------------------------------------------------------
# keyed random streams

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def _mix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, element-wise (uint64, wrapping), overwriting z (every
    caller passes a fresh array) with one scratch array."""
    t = np.right_shift(z, _S30)
    z ^= t
    z *= _M1
    np.right_shift(z, _S27, out=t)
    z ^= t
    z *= _M2
    np.right_shift(z, _S31, out=t)
    z ^= t
    return z


_NODE_KEYS: dict = {}  # (seed, stream, node ids) -> (len, 1) keys: the same nodes ask every step
_COUNTERS: dict = {}  # count -> (1, count) offsets (j + 1) * golden


def _node_keys(seed: int, stream: int, nodes) -> np.ndarray:
    ids = np.asarray(nodes, np.uint64)
    key = (int(seed), int(stream), ids.tobytes())
    k = _NODE_KEYS.get(key)
    if k is None:
        with np.errstate(over="ignore"):
            k = _mix64(np.array([seed], np.uint64) * _GOLDEN + np.uint64(stream))
            k = _mix64(k ^ (ids[:, None] * _GOLDEN + np.uint64(1)))
        if len(_NODE_KEYS) >= 1024:
            _NODE_KEYS.clear()
        _NODE_KEYS[key] = k
    return k


def keyed_bits(seed: int, nodes: Sequence[int], step, count: int, stream: int = 0) -> np.ndarray:
    """(len(nodes), count) uint64 random words, a pure function of (seed, stream, node, step, j);
    `step` is one integer or one per node.

    bits[v, j] = mix(mix(mix(mix(seed * g + stream) ^ (node_v * g + 1)) ^ (step * g + 2)) + (j + 1) * g)
    with mix the splitmix64 finaliser and g the golden-ratio constant; the per-node part is
    cached, since the same nodes draw at every step.
    """
    with np.errstate(over="ignore"):
        k = _node_keys(seed, stream, nodes)
        steps = np.asarray(step, np.uint64).reshape(-1, 1)  # one step for all nodes, or one per node
        k = _mix64(k ^ (steps * _GOLDEN + np.uint64(2)))
        offsets = _COUNTERS.get(count)
        if offsets is None:
            offsets = _COUNTERS[count] = (np.arange(count, dtype=np.uint64)[None, :] + np.uint64(1)) * _GOLDEN
        return _mix64(k + offsets)


def keyed_ints(seed: int, nodes: Sequence[int], step, count: int, high: np.ndarray,
               stream: int = 0) -> np.ndarray:
    """Uniform integers in [0, high[node]) of shape (len(nodes), count)."""
    bits = keyed_bits(seed, nodes, step, count, stream)
    np.remainder(bits, np.asarray(high, np.uint64)[:, None], out=bits)
    return bits.view(np.int64)  # values below high < 2**63: the same bits as int64


def step_rng(seed: int, step: int, tag: int = 0) -> np.random.Generator:
    """A generator shared by all ranks for per-step choices common to all nodes."""
    return np.random.default_rng([int(seed), int(step), int(tag), 0x68706370])


# ---------------------------------------------------------------------------------------
# generators and loaders


def quadratic(n: int, samples: int, dim: int, heterogeneity: float, noise: float,
              test_fraction: float, seed: int) -> Dataset:
    """Node v holds rows (a, b) with b = a . x_v + noise, x_v = x_c + zeta u_v.

    The nodes' own optima x_v differ by `heterogeneity` (zeta), and each node's
    features have their own scale, so the local Hessians differ too.
    """
    rng = np.random.default_rng(seed)
    m_test = max(1, int(round(samples * test_fraction / max(1e-9, 1 - test_fraction))))
    x_c = rng.standard_normal(dim)
    parts = []
    for _ in range(n):
        x_v = x_c + heterogeneity * rng.standard_normal(dim)
        scale = np.exp(0.5 * rng.standard_normal(dim))
        A = rng.standard_normal((samples + m_test, dim)) * scale
        b = A @ x_v + noise * rng.standard_normal(samples + m_test)
        parts.append((A, b))
    Xtr = np.concatenate([A[:samples] for A, _ in parts]).astype(np.float32)
    ytr = np.concatenate([b[:samples] for _, b in parts]).astype(np.float32)
    Xte = np.concatenate([A[samples:] for A, _ in parts]).astype(np.float32)
    yte = np.concatenate([b[samples:] for _, b in parts]).astype(np.float32)
    return Dataset("quadratic", Xtr, ytr, Xte, yte, 0,
                   np.repeat(np.arange(n), samples), np.repeat(np.arange(n), m_test))


def classification(n_samples: int, dim: int, classes: int, separation: float,
                   feature_scale: float, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((classes, dim))
    means *= (separation / 2) / np.linalg.norm(means, axis=1, keepdims=True)
    y = rng.integers(0, classes, n_samples)
    X = means[y] + rng.standard_normal((n_samples, dim))
    if feature_scale > 0 and dim > 1:
        X *= 10.0 ** (feature_scale * (np.arange(dim) / (dim - 1) - 0.5))
    return X.astype(np.float32), y.astype(np.int64)


def load_digits() -> tuple:
    with gzip.open(os.path.join(DATA_DIR, "digits.csv.gz"), "rt") as fh:
        arr = np.loadtxt(fh, delimiter=",")
    return (arr[:, :-1] / 16.0).astype(np.float32), arr[:, -1].astype(np.int64)


def load_breast_cancer() -> tuple:
    arr = np.loadtxt(os.path.join(DATA_DIR, "breast_cancer.csv"), delimiter=",", skiprows=1)
    return arr[:, :-1].astype(np.float32), arr[:, -1].astype(np.int64)


def load_libsvm(path: str) -> tuple:
    labels, rows, width = [], [], 0
    try:
        with open(path, "r", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                text = line.split("#", 1)[0].split()
                if not text:
                    continue
                try:
                    labels.append(float(text[0]))
                    row = {}
                    for item in text[1:]:
                        k, v = item.split(":", 1)
                        row[int(k) - 1] = float(v)
                except ValueError:
                    raise ConfigError(f"data.path = {path!r} is not allowed: line {lineno} is not "
                                      f"LIBSVM 'label index:value ...'") from None
                if row and min(row) < 0:
                    raise ConfigError(f"data.path = {path!r} is not allowed: line {lineno} has an "
                                      f"index < 1 (LIBSVM indices start at 1)")
                width = max(width, max(row, default=-1) + 1)
                rows.append(row)
    except OSError as exc:
        raise ConfigError(f"data.path = {path!r} is not allowed: cannot read it ({exc.strerror})") from None
    X = np.zeros((len(rows), width), np.float32)
    for i, row in enumerate(rows):
        for k, v in row.items():
            X[i, k] = v
    return X, np.asarray(labels)


def _load_arrays(path: str, kind: str) -> tuple:
    try:
        if kind == "npz":
            with np.load(path) as f:
                got = {k: f[k] for k in f.files}
        else:
            import h5py
            with h5py.File(path, "r") as f:
                got = {k: f[k][()] for k in f.keys() if isinstance(f[k], h5py.Dataset)}
    except OSError as exc:
        raise ConfigError(f"data.path = {path!r} is not allowed: cannot read it as {kind} ({exc})") from None
    if "X" not in got or "y" not in got:
        raise ConfigError(f"data.path = {path!r} is not allowed: needs arrays 'X' and 'y' "
                          f"(found {', '.join(sorted(got)) or 'none'})")
    test = (got["X_test"], got["y_test"]) if "X_test" in got and "y_test" in got else None
    return got["X"], got["y"], test


def _labels(y: np.ndarray) -> tuple:
    """Integer-valued labels -> (0..C-1 int64, C); anything else -> (float32, 0)."""
    y = np.asarray(y)
    if y.size and np.all(np.isfinite(y)) and np.all(np.asarray(y, np.float64) == np.round(y)):
        values = np.unique(y)
        if len(values) <= max(2, len(y) // 2):
            return np.searchsorted(values, y).astype(np.int64), max(2, len(values))
    return y.astype(np.float32), 0


def split(X: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> tuple:
    perm = np.random.default_rng([seed, 1]).permutation(len(X))
    n_test = int(round(len(X) * test_fraction))
    te, tr = perm[:n_test], perm[n_test:]
    return X[tr], y[tr], X[te], y[te]


def load(cfg, n_nodes: int) -> Dataset:
    """Build the data set named by a DataCfg (same on every rank)."""
    name = cfg.dataset.value
    if name == "quadratic":
        return quadratic(n_nodes, cfg.samples_per_node, cfg.dim, cfg.heterogeneity, cfg.noise,
                         cfg.test_fraction, cfg.seed)
    test = None
    if name == "classification":
        total = int(np.ceil(n_nodes * cfg.samples_per_node / (1 - cfg.test_fraction)))
        X, y = classification(total, cfg.dim, cfg.classes, cfg.separation, cfg.feature_scale, cfg.seed)
    elif name == "digits":
        X, y = load_digits()
    elif name == "breast_cancer":
        X, y = load_breast_cancer()
    elif name == "libsvm":
        X, y = load_libsvm(cfg.path)
    else:
        X, y, test = _load_arrays(cfg.path, name)
    X = np.asarray(X, np.float32).reshape(len(X), -1)
    if test is not None:
        Xte = np.asarray(test[0], np.float32).reshape(len(test[0]), -1)
        y_all, classes = _labels(np.concatenate([np.asarray(y), np.asarray(test[1])]))
        ytr, yte = y_all[:len(X)], y_all[len(X):]
        Xtr = X
    else:
        y, classes = _labels(y)
        Xtr, ytr, Xte, yte = split(X, y, cfg.test_fraction, cfg.seed)
    if len(Xtr) < n_nodes:
        raise ConfigError(f"nodes.n = {n_nodes} is not allowed: data set {name} has only {len(Xtr)} "
                          f"training samples")
    if cfg.standardize:
        mu, sd = Xtr.mean(axis=0), Xtr.std(axis=0)
        sd[sd == 0] = 1.0
        Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd
    return Dataset(name, Xtr.astype(np.float32), ytr, Xte.astype(np.float32), yte, classes)


# ---------------------------------------------------------------------------------------
# partitions


def partition(ds: Dataset, n: int, kind: str, alpha: float = 0.5, shards_per_node: int = 2,
              seed: int = 0) -> List[np.ndarray]:
    """Index arrays of each node's training samples (every node gets at least one)."""
    if ds.node_train is not None:
        return [np.nonzero(ds.node_train == v)[0] for v in range(n)]
    N = len(ds.X_train)
    rng = np.random.default_rng([seed, 2])
    if ds.classes == 0 and kind != "iid":
        raise ConfigError(f"data.partition = {kind!r} is not allowed: a regression data set "
                          f"has no labels to split by; use iid")
    if kind == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(N), n)]
    y = ds.y_train
    if kind == "dirichlet":
        for _ in range(1000):
            parts: List[list] = [[] for _ in range(n)]
            for c in range(ds.classes):
                idx = rng.permutation(np.nonzero(y == c)[0])
                if not len(idx):
                    continue
                cuts = (np.cumsum(rng.dirichlet(np.full(n, alpha)))[:-1] * len(idx)).astype(int)
                for v, chunk in enumerate(np.split(idx, cuts)):
                    parts[v].extend(chunk.tolist())
            if min(len(p) for p in parts) >= 1:
                return [np.sort(np.asarray(p, np.int64)) for p in parts]
        raise ConfigError(f"data.alpha = {alpha} is not allowed: Dirichlet split left a node empty "
                          f"in 1000 draws; raise alpha or lower nodes.n")
    # shards: sort by label, cut into n * s shards, deal s shards to each node
    total = n * shards_per_node
    if total > N:
        raise ConfigError(f"data.shards_per_node = {shards_per_node} is not allowed: "
                          f"{total} shards for {N} samples")
    order = np.argsort(y, kind="stable")
    shards = np.array_split(order, total)
    deal = rng.permutation(total).reshape(n, shards_per_node)
    return [np.sort(np.concatenate([shards[s] for s in deal[v]])) for v in range(n)]


# ---------------------------------------------------------------------------------------
# per-node samplers


class NodeData:
    """Training data of a rank's nodes, padded into (local_n, m_max, f) on the device.

    `batch(step)` draws, for every local node, `batch_size` sample indices uniformly with
    replacement from a stream keyed by (seed, node, step); batch_size 0 gives each node
    its whole data with weights 1/m_v. Returned weights sum to 1 per node, so models
    compute each node's mean loss over its batch.
    """

    def __init__(self, xp, ds: Dataset, parts: Sequence[np.ndarray], nodes: Sequence[int],
                 batch_size: int, seed: int, dtype=np.float32):
        self.xp = xp
        self.nodes = np.asarray(nodes, np.int64)
        self.batch_size = batch_size
        self.seed = seed
        counts = np.array([len(parts[v]) for v in self.nodes], np.int64)
        self.counts = counts
        m = int(counts.max())
        f = ds.features
        L = len(self.nodes)
        Xp = np.zeros((L, m, f), dtype)
        yp = np.zeros((L, m), ds.y_train.dtype)
        wfull = np.zeros((L, m), dtype)
        for i, v in enumerate(self.nodes):
            idx = parts[v]
            Xp[i, :len(idx)] = ds.X_train[idx]
            yp[i, :len(idx)] = ds.y_train[idx]
            wfull[i, :len(idx)] = 1.0 / len(idx)
        self.X = xp.asarray(Xp)
        self.y = xp.asarray(yp)
        self._full = (self.X, self.y, xp.asarray(wfull))
        self._flat_X = self.X.reshape(L * m, f)
        self._flat_y = self.y.reshape(L * m)
        self._offsets = np.arange(L, dtype=np.int64)[:, None] * m
        self._w = xp.full((L, batch_size), 1.0 / max(1, batch_size), dtype=dtype)

    def batch_indices(self, step: int, stream: int = 0, rows=None) -> np.ndarray:
        sel = slice(None) if rows is None else np.asarray(rows)
        return keyed_ints(self.seed, self.nodes[sel], step, self.batch_size, self.counts[sel], stream)

    def batch_for(self, rows, steps):
        """Minibatches of the given local rows, row i drawn as at step steps[i]."""
        rows = np.asarray(rows)
        B = self.batch_size
        if not B:
            r = self.xp.asarray(rows)
            return tuple(a[r] for a in self._full)
        idx = keyed_ints(self.seed, self.nodes[rows], np.asarray(steps), B, self.counts[rows])
        flat = self.xp.asarray((idx + self._offsets[rows]).ravel())
        A = self._flat_X.take(flat, axis=0).reshape(len(rows), B, -1)
        return A, self._flat_y.take(flat).reshape(len(rows), B), self._w[:len(rows)]

    def batch(self, step: int, stream: int = 0, rows=None, batch_size=None):
        """Minibatch of `step` for all local nodes, or for the local `rows` given (the
        same draws those nodes get in a full batch); other streams give independent draws;
        `batch_size` overrides the configured size (0: each node's whole data)."""
        B = self.batch_size if batch_size is None else batch_size
        if not B:
            if rows is None:
                return self._full
            r = self.xp.asarray(np.asarray(rows))
            return tuple(a[r] for a in self._full)
        sel = slice(None) if rows is None else np.asarray(rows)
        idx = keyed_ints(self.seed, self.nodes[sel], step, B, self.counts[sel], stream)
        flat = self.xp.asarray((idx + self._offsets[sel]).ravel())
        L = len(self.nodes) if rows is None else len(sel)
        A = self._flat_X.take(flat, axis=0).reshape(L, B, -1)
        w = self._w[:L] if B == self.batch_size else self.xp.full((L, B), 1.0 / B, dtype=self._flat_X.dtype)
        return A, self._flat_y.take(flat).reshape(L, B), w
