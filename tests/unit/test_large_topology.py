"""Sparse topologies at n = 1e5: builders, checks, spectral gaps and mix plans in seconds,
with a guard that fails if any n x n array is allocated (issue 16)."""
import math
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest

from hpcopt import comm as comm_mod
from hpcopt import topology
from hpcopt.kernels import Kernels

N = 100_000
LARGE = ["ring", "torus", "exponential", "exponential_directed", "one_peer_exponential", "star"]


@pytest.fixture
def no_square(monkeypatch):
    """NumPy's allocating constructors raise for n*n/8 elements or more (n = 1e5), and
    tracemalloc's peak must stay far below one dense matrix (80 GB)."""
    limit = N * N // 8
    for name in ("zeros", "empty", "ones", "full", "eye", "identity"):
        real = getattr(np, name)

        def guarded(*args, _real=real, _name=name, **kw):
            shape = args[0] if args else kw.get("shape", kw.get("N"))
            square = 2 if _name in ("eye", "identity") else 1
            size = int(np.prod(shape)) if not np.isscalar(shape) else int(shape) ** square
            if size >= limit:
                raise AssertionError(f"np.{_name}{shape}: an n x n-sized array at n = {N}")
            return _real(*args, **kw)
        monkeypatch.setattr(np, name, guarded)
    tracemalloc.start()
    yield
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1.5e9, f"peak traced allocation {peak / 1e9:.2f} GB"


def fake_comm(n, size, rank):
    """What Comm._build_plan reads, without MPI."""
    p = comm_mod.Placement(n, size)
    lo, hi = p.range(rank)
    return SimpleNamespace(n=n, size=size, rank=rank, lo=lo, hi=hi, local_n=hi - lo, placement=p,
                           backend=SimpleNamespace(xp=np))


@pytest.mark.parametrize("name", LARGE)
def test_builders_summary_and_plans_at_1e5(no_square, name):
    # sparse all the way (the guard refuses any n x n array); bench/large.py prints the seconds
    topo = topology.build(name, N)
    s = topology.summary(topo)
    for W in topo.operators:
        assert isinstance(W, topology.Sparse) and W.nnz < 40 * N
        for size, rank in ((1, 0), (4, 1), (4, 3)):
            plan = comm_mod.Comm._build_plan(fake_comm(N, size, rank), W)
            assert plan.indptr.shape == (fake_comm(N, size, rank).local_n + 1,)
    assert s["n"] == N and s["degree_min"] >= 1
    assert s["spectral_gap"] == s["spectral_gap"] or "not computed" in s["gap_note"]
    with pytest.raises(ValueError, match="DENSE_MAX"):
        topo.mixing_matrix(0)


def test_ring_and_torus_gaps_at_1e5_are_the_closed_forms(no_square):
    s = topology.summary(topology.build("ring", N))
    assert s["gap_note"] == "exact (circulant, FFT)"
    assert s["spectral_gap"] == pytest.approx(1 - (1 + 2 * math.cos(2 * math.pi / N)) / 3, abs=1e-12)
    r, c = topology.torus_dims(N)
    s = topology.summary(topology.build("torus", N))
    lam = (1 + 2 * math.cos(2 * math.pi / c) + 2) / 5  # the slowest mode along the longer side
    assert s["spectral_gap"] == pytest.approx(1 - lam, abs=1e-9)


@pytest.mark.parametrize("name", ["ring", "torus", "exponential", "exponential_directed", "complete", "star",
                                  "hypercube", "erdos_renyi"])
@pytest.mark.parametrize("n", [8, 12, 16, 30])
def test_sparse_gap_methods_agree_with_the_dense_one(name, n):
    if name == "hypercube" and n & (n - 1):
        return
    topo = topology.build(name, n, p=0.5, seed=2)
    W = topo.sparse(0)
    dense = topology.spectral_gap(W.dense())
    lam = topology._circulant_spectrum(W)
    if lam is not None:
        assert 1 - np.abs(lam[1:]).max() == pytest.approx(dense, abs=1e-9)
    norm, note = topology._power_norm(W, iters=20000, tol=1e-14)
    assert 1 - norm == pytest.approx(dense, abs=1e-5), note


def test_one_peer_period_gap_by_fft_matches_dense():
    topo = topology.build("one_peer_exponential", 24)
    dense = topology._period_gap(topo)[0]
    spectra = [topology._circulant_spectrum(W) for W in topo.operators]
    assert 1 - np.abs(np.prod(spectra, axis=0)[1:]).max() == pytest.approx(dense, abs=1e-9)


@pytest.mark.parametrize("name", ["ring", "torus", "exponential_directed", "one_peer_exponential", "star",
                                  "erdos_renyi"])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_plans_from_csr_equal_plans_from_the_dense_matrix_and_mix_exactly(name, size):
    n, d = 24, 5
    topo = topology.build(name, n, p=0.3, seed=1)
    X = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    k = Kernels(mode="numpy")
    for t in range(topo.period):
        W = topo.sparse(t)
        for rank in range(size):
            fc = fake_comm(n, size, rank)
            a = comm_mod.Comm._build_plan(fc, W)
            b = comm_mod.Comm._build_plan(fc, W.dense())
            assert np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices)
            assert np.array_equal(a.weights, b.weights) and a.recv == b.recv
            assert [(q, list(r)) for q, r in a.send] == [(q, list(r)) for q, r in b.send]
            cols = W.indices[W.indptr[fc.lo]:W.indptr[fc.hi]]
            remote_nodes = np.unique(cols[(cols < fc.lo) | (cols >= fc.hi)])
            out = np.empty((fc.local_n, d), np.float32)
            k.mix_rows(out, X[fc.lo:fc.hi], X[remote_nodes], a.indptr, a.indices, a.weights)
            ref = (W.dense().astype(np.float32) @ X.astype(np.float64))[fc.lo:fc.hi]
            assert np.allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_connectivity_and_checks_are_vectorised_and_right():
    assert topology.is_connected(5, np.array([[0, 1], [1, 2], [3, 4], [2, 3]]))
    assert not topology.is_connected(5, np.array([[0, 1], [1, 2], [3, 4]]))
    assert topology.is_connected(4, {(0, 1), (2, 1), (3, 2)})
    W = topology.build("exponential_directed", 16).sparse(0)
    topology.check_mixing_matrix(W, symmetric=False)
    with pytest.raises(ValueError, match="not symmetric"):
        topology.check_mixing_matrix(W, symmetric=True)
    topology.check_mixing_matrix(topology.build("torus", 20).sparse(0), symmetric=True)
