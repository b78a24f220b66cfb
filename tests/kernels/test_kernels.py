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
    out = tmp_path / f"{source}.{arch}.ptx"
    proc = subprocess.run([nvcc, "-ptx", f"-arch={arch}", "-std=c++14", str(K.source_dir() / source),
                           "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    names = [n for n in K.SIGNATURES if f".entry {n}(" in text or f".entry {n} (" in text]
    assert names, "no kernel entry points in the PTX"


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
