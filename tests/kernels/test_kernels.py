"""The CPU build of kernels/*.cu equals the NumPy references bit for bit; PTX compiles;
the same assertions run on a GPU when CuPy sees one."""
import shutil
import subprocess

import numpy as np
import pytest

from hpcopt import kernels as K
from tests.helpers import check, run_script

SIZES = [0, 1, 7, 1013, 10**6]
UPDATES = [
    ("sgd", 2, (0.1, 0.01)),
    ("sgd", 2, (0.3, 0.0)),
    ("momentum", 3, (0.1, 0.9, 0.01, False)),
    ("momentum", 3, (0.1, 0.9, 0.0, True)),
    ("rmsprop", 3, (0.01, 0.99, 1e-3, 1e-8, 0.01)),
    ("rmsprop", 3, (0.01, 0.9, 0.0, 1e-8, 0.0)),
    ("adam", 4, (0.01, 0.9, 0.999, 1, 0.0, 1e-8, 0.0)),
    ("adam", 4, (0.01, 0.9, 0.999, 7, 1e-2, 0.0, 0.05)),
    ("scaled", 3, (0.1, 1e-2, 0.01)),
]


@pytest.fixture(scope="module")
def compiled():
    if K._compiler() is None:
        pytest.skip("no C++ compiler (g++/c++/clang++) to build the CPU kernels")
    return K.Kernels(mode="compiled")


def operands(n, count, shape=None, seed=0):
    rng = np.random.default_rng(seed + n)
    arrs = [rng.standard_normal(shape or n).astype(np.float32) for _ in range(count)]
    for a in arrs[2:]:
        np.abs(a, out=a)  # second moments and diagonals are non-negative
    return arrs


def run_both(kern, ref, method, count, scalars, n, shape=None):
    a = operands(n, count, shape)
    b = [x.copy() for x in a]
    getattr(kern, method)(*a, *scalars)
    getattr(ref, method)(*b, *scalars)
    return a, b


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("method, count, scalars", UPDATES)
def test_cpu_updates_equal_reference_bitwise(compiled, method, count, scalars, n):
    assert compiled.impl == "cpu"
    a, b = run_both(compiled, K.Kernels(mode="numpy"), method, count, scalars, n)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    if n:
        assert not np.array_equal(a[0], operands(n, count)[0])  # the update did something


@pytest.mark.parametrize("method, count, scalars", UPDATES)
def test_cpu_updates_on_multi_row_blocks(compiled, method, count, scalars):
    a, b = run_both(compiled, K.Kernels(mode="numpy"), method, count, scalars, 0, shape=(13, 1013))
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


def test_adam_reference_matches_textbook_formula():
    x, g, m, v = operands(50, 4)
    x0, g0, m0, v0 = (a.astype(np.float64) for a in (x, g, m, v))
    K.Kernels(mode="numpy").adam(x, g, m, v, 0.01, 0.9, 0.999, 3, 0.0, 1e-8, 0.0)
    m1 = 0.9 * m0 + 0.1 * g0
    v1 = 0.999 * v0 + 0.001 * g0 ** 2
    x1 = x0 - 0.01 * (m1 / (1 - 0.9 ** 3)) / (np.sqrt(v1 / (1 - 0.999 ** 3)) + 1e-8)
    assert np.allclose(x, x1, rtol=1e-5, atol=1e-6) and np.allclose(v, v1, rtol=1e-6)


def mix_case(rows, d, n_local, n_remote, seed=0):
    rng = np.random.default_rng(seed)
    local = rng.standard_normal((n_local, d)).astype(np.float32)
    remote = rng.standard_normal((n_remote, d)).astype(np.float32)
    deg = rng.integers(0, 5, rows)
    indptr = np.concatenate([[0], np.cumsum(deg)]).astype(np.int64)
    indices = rng.integers(0, n_local + n_remote, int(deg.sum())).astype(np.int64)
    weights = rng.random(int(deg.sum())).astype(np.float32)
    return local, remote, indptr, indices, weights


@pytest.mark.parametrize("rows, d", [(1, 0), (1, 1), (3, 7), (9, 1013), (1, 10**6), (4, 2 * 10**5)])
def test_cpu_mix_rows_equals_reference_bitwise(compiled, rows, d):
    local, remote, indptr, indices, weights = mix_case(rows, d, 3, 4)
    out_c = np.full((rows, d), np.nan, np.float32)
    out_r = np.full((rows, d), np.nan, np.float32)
    compiled.mix_rows(out_c, local, remote, indptr, indices, weights)
    K.Kernels(mode="numpy").mix_rows(out_r, local, remote, indptr, indices, weights)
    assert np.array_equal(out_c, out_r)
    src = np.concatenate([local, remote]).astype(np.float64)
    for r in range(rows):
        ks = range(indptr[r], indptr[r + 1])
        expect = sum((weights[k] * src[indices[k]] for k in ks), np.zeros(d))
        assert np.allclose(out_c[r], expect, rtol=1e-5, atol=1e-5)


def test_kernel_arguments_are_checked():
    k = K.Kernels(mode="numpy")
    with pytest.raises(ValueError, match="float32"):
        k.sgd(np.zeros(3), np.zeros(3, np.float32), 0.1)


def test_remembered_addresses_never_go_stale(compiled):
    # the CPU build remembers array addresses by object; row views made one after another
    # usually reuse the id of the view just freed while pointing at other memory, so a
    # table without liveness checks would write every update into row 0
    base = np.zeros((300, 33), np.float32)
    g = np.ones(33, np.float32)
    before = len(compiled._lib._ptrs)
    for i in range(300):
        compiled.sgd(base[i], g, float(i + 1))
    assert np.array_equal(base, -np.arange(1, 301, dtype=np.float32)[:, None] * np.ones((1, 33), np.float32))
    assert len(compiled._lib._ptrs) <= before + 2  # dead views leave the table


def test_missing_compiler_falls_back_or_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setattr(K, "_compiler", lambda: None)
    k = K.Kernels(mode="auto", cache=tmp_path)
    assert k.impl == "numpy" and "no C++ compiler" in k.note
    with pytest.raises(K.KernelError, match="no C\\+\\+ compiler"):
        K.Kernels(mode="compiled", cache=tmp_path)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", K.KERNEL_FILES)
def test_ptx_compiles(tmp_path, arch, source):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    # the GPU module is the concatenation of KERNEL_FILES (a file may use helpers of an
    # earlier one): compile each file after the ones before it, and find its own kernels
    upto = K.KERNEL_FILES[:K.KERNEL_FILES.index(source) + 1]
    unit = tmp_path / f"upto_{source}"
    unit.write_text("\n".join((K.source_dir() / f).read_text() for f in upto))
    out = tmp_path / f"{source}.{arch}.ptx"
    proc = subprocess.run([nvcc, "-ptx", f"-arch={arch}", "-std=c++14", "-x", "cu", str(unit), "-o", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    own = (K.source_dir() / source).read_text()
    names = [n for n in K.SIGNATURES if f".entry {n}(" in text or f".entry {n} (" in text]
    mine = [n for n in K.SIGNATURES if f"void {n}(" in own]
    assert mine and set(mine) <= set(names), (mine, names)


def test_two_ranks_compile_into_an_empty_cache_at_once(tmp_path):
    cache = tmp_path / "cache"
    proc = check(run_script(2, "compile_race.py", str(cache), timeout=300))
    assert proc.stdout.count("built") == 2
    assert len(list(cache.glob("hpcopt_kernels_*.so"))) == 1
    assert not list(cache.glob(".*.tmp"))


def _gpu():
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
        reason = "CuPy sees no GPU"
    except Exception as exc:  # noqa: BLE001
        reason = f"CuPy unavailable ({type(exc).__name__})"
    pytest.skip(reason)


@pytest.mark.parametrize("method, count, scalars", UPDATES)
def test_gpu_updates_match_reference(method, count, scalars):
    cp = _gpu()
    kern = K.Kernels(on_gpu=True, mode="compiled")
    for n in SIZES:
        a = operands(n, count)
        b = [x.copy() for x in a]
        dev = [cp.asarray(x) for x in a]
        getattr(kern, method)(*dev, *scalars)
        getattr(K.Kernels(mode="numpy"), method)(*b, *scalars)
        for x, y in zip(dev, b):  # built with --fmad=false: same rounding as the reference
            assert np.array_equal(cp.asnumpy(x), y)


def test_gpu_mix_rows_matches_reference():
    cp = _gpu()
    kern = K.Kernels(on_gpu=True, mode="compiled")
    local, remote, indptr, indices, weights = mix_case(9, 1013, 3, 4)
    out = cp.empty((9, 1013), cp.float32)
    kern.mix_rows(out, cp.asarray(local), cp.asarray(remote), cp.asarray(indptr), cp.asarray(indices),
                  cp.asarray(weights))
    ref = np.empty((9, 1013), np.float32)
    K.Kernels(mode="numpy").mix_rows(ref, local, remote, indptr, indices, weights)
    assert np.array_equal(cp.asnumpy(out), ref)


# -- sizes and shapes are checked before any call into C ------------------------------

METHODS = {"sgd": ("sgd_update", 2, (0.1, 0.01)), "momentum": ("momentum_update", 3, (0.1, 0.9, 0.01, True)),
           "rmsprop": ("rmsprop_update", 3, (0.01, 0.99, 1e-3, 1e-8, 0.01)),
           "adam": ("adam_update", 4, (0.01, 0.9, 0.999, 3, 0.0, 1e-8, 0.0)),
           "scaled": ("scaled_update", 3, (0.1, 1e-2, 0.01))}
# (L, d) blocks whose wrong operand has: no columns (a checkpoint written with momentum 0
# holds an (L, 0) buffer), one element too few or too many, one row, or x's size in
# another shape (a NumPy reference would broadcast the one-row case silently)
WRONG = {"empty rows": (4, 0), "one short": (4 * 5 - 1,), "one long": (4, 6), "one row": (1, 5),
         "flat": (20,)}


@pytest.fixture(params=["compiled", "numpy"])
def kern(request):
    if request.param == "compiled" and K._compiler() is None:
        pytest.skip("no C++ compiler (g++/c++/clang++) to build the CPU kernels")
    return K.Kernels(mode=request.param)


@pytest.mark.parametrize("wrong", WRONG)
@pytest.mark.parametrize("method", METHODS)
def test_update_kernels_reject_arrays_of_another_size(kern, method, wrong):
    op, count, scalars = METHODS[method]
    for pos in range(count):
        arrs = operands(0, count, shape=(4, 5))
        arrs[pos] = np.abs(np.random.default_rng(pos).standard_normal(WRONG[wrong])).astype(np.float32)
        before = [a.copy() for a in arrs]
        with pytest.raises(ValueError, match=rf"^kernel {op}: \w+ has shape \(.*\) \(\d+ elements\) but x has shape"):
            getattr(kern, method)(*arrs, *scalars)
        assert all(np.array_equal(a, b) for a, b in zip(arrs, before))  # nothing was written


@pytest.mark.parametrize("method", METHODS)
def test_update_kernels_name_the_wrong_array_and_both_sizes(kern, method):
    op, count, scalars = METHODS[method]
    names = K.ARRAYS[op]
    for pos in range(1, count):
        arrs = operands(0, count, shape=(4, 5))
        arrs[pos] = np.zeros((4, 0), np.float32)
        with pytest.raises(ValueError) as info:
            getattr(kern, method)(*arrs, *scalars)
        assert str(info.value) == (f"kernel {op}: {names[pos]} has shape (4, 0) (0 elements) but x has shape "
                                   f"(4, 5) (20 elements); {', '.join(names)} must all have the same shape")


def test_update_kernels_reject_a_missing_array(kern):
    x, g = operands(0, 2, shape=(4, 5))
    with pytest.raises(ValueError, match=r"momentum_update\.m must be a C-contiguous float32 array, got NoneType"):
        kern.momentum(x, g, None, 0.1, 0.9)


def test_momentum_with_an_empty_buffer_from_a_momentum_free_checkpoint(kern):
    # the crash of the robustness issue: a run resumed with momentum > 0 from a
    # checkpoint written with momentum 0 handed the (L, 0) buffer to momentum_update
    X = np.ones((16, 650), np.float32)
    G = np.ones_like(X)
    M = np.zeros((16, 0), np.float32)
    with pytest.raises(ValueError, match=r"kernel momentum_update: m has shape \(16, 0\) \(0 elements\) "
                                         r"but x has shape \(16, 650\) \(10400 elements\)"):
        kern.momentum(X, G, M, 0.1, 0.9)
    assert np.all(X == 1)


def good_mix(rows=3, d=5):
    local, remote, indptr, indices, weights = mix_case(rows, d, 3, 2, seed=4)
    return dict(out=np.zeros((rows, d), np.float32), local=local, remote=remote, indptr=indptr,
                indices=indices, weights=weights)


def i64(*v):
    return np.array(v, np.int64)


MIX_WRONG = {
    "out 1-D": (dict(out=np.zeros(15, np.float32)), r"out must be 2-D \(rows, d\), got shape \(15,\)"),
    "local row length": (dict(local=np.zeros((3, 4), np.float32)),
                         r"local must be 2-D with out's row length d = 5, got shape \(3, 4\) \(12 elements\)"),
    "local 1-D": (dict(local=np.zeros(5, np.float32)),
                  r"local must be 2-D with out's row length d = 5, got shape \(5,\)"),
    "remote row length": (dict(remote=np.zeros((2, 6), np.float32)),
                          r"remote must be 2-D with out's row length d = 5, got shape \(2, 6\)"),
    "remote no columns": (dict(remote=np.zeros((2, 0), np.float32)), r"remote must be 2-D .* got shape \(2, 0\)"),
    "indptr short": (dict(indptr=i64(0, 1, 2)), r"indptr must have shape \(4,\) \(out's rows \+ 1\), got shape \(3,\)"),
    "indptr long": (dict(indptr=i64(0, 1, 2, 3, 3)), r"indptr must have shape \(4,\) .* got shape \(5,\)"),
    "weights short": (dict(indptr=i64(0, 1, 2, 3), indices=i64(0, 1, 2), weights=np.ones(2, np.float32)),
                      r"indices and weights must be 1-D of one length, got indices shape \(3,\) \(3 elements\) "
                      r"and weights shape \(2,\) \(2 elements\)"),
    "indices 2-D": (dict(indptr=i64(0, 1, 2, 3), indices=i64(0, 1, 2).reshape(3, 1),
                         weights=np.ones((3, 1), np.float32)), r"indices and weights must be 1-D"),
    "indptr past nnz": (dict(indptr=i64(0, 1, 2, 4), indices=i64(0, 1, 2), weights=np.ones(3, np.float32)),
                        r"indptr must be non-decreasing within \[0, 3\] \(the length of indices\), got first 0, "
                        r"last 4"),
    "indptr negative": (dict(indptr=i64(-1, 1, 2, 3), indices=i64(0, 1, 2), weights=np.ones(3, np.float32)),
                        r"got first -1"),
    "indptr decreasing": (dict(indptr=i64(0, 2, 1, 3), indices=i64(0, 1, 2), weights=np.ones(3, np.float32)),
                          r"non-decreasing=False"),
    "index too large": (dict(indptr=i64(0, 1, 2, 3), indices=i64(0, 5, 2), weights=np.ones(3, np.float32)),
                        r"indices must lie in \[0, 5\) \(local rows 3 \+ remote rows 2\), got min 0, max 5"),
    "index negative": (dict(indptr=i64(0, 1, 2, 3), indices=i64(0, -1, 2), weights=np.ones(3, np.float32)),
                       r"indices must lie in \[0, 5\) .* got min -1"),
    "indices dtype": (dict(indices=np.zeros(3, np.int32)), r"mix_rows\.indices must be a C-contiguous int64"),
}


@pytest.mark.parametrize("case", MIX_WRONG)
def test_mix_rows_rejects_wrong_sizes_and_bounds(kern, case):
    change, message = MIX_WRONG[case]
    args = {**good_mix(), **change}
    out0 = args["out"].copy()
    with pytest.raises(ValueError, match=message):
        kern.mix_rows(**args)
    assert np.array_equal(args["out"], out0)


def test_mix_rows_bounds_are_never_taken_from_a_dead_array(kern):
    # CSR bounds are remembered per live array; a new array that reuses a freed one's id
    # must be checked afresh, or an out-of-range index would reach the C loop
    args = good_mix()
    for _ in range(50):
        args["indices"] = np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1][:args["indices"].size], np.int64)
        kern.mix_rows(**args)
        n = args["indices"].size
        del args["indices"]
        args["indices"] = np.full(n, 99, np.int64)
        with pytest.raises(ValueError, match=r"indices must lie in \[0, 5\)"):
            kern.mix_rows(**args)
    assert len(kern._csr) <= 2  # dead arrays leave the table


@pytest.mark.parametrize("L", [1, 3])
@pytest.mark.parametrize("out_shape, x_shape", [((4,), (None, 5)), ((5, 1), (None, 5)), ((5,), (None, 0)),
                                                ((5,), (5,))])
def test_row_sum_rejects_wrong_sizes(kern, L, out_shape, x_shape):
    out = np.zeros(out_shape, np.float32)
    X = np.ones(tuple(L if s is None else s for s in x_shape), np.float32)
    with pytest.raises(ValueError, match=r"kernel row_sum: X must be 2-D \(rows, d\) and out of shape \(d,\)"):
        kern.row_sum(out, X, 0.5)
    assert np.all(out == 0)


def test_row_sum_still_sums(kern):
    X = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = np.empty(4, np.float32)
    kern.row_sum(out, X, 0.5)
    assert np.array_equal(out, X.sum(axis=0) * np.float32(0.5))
