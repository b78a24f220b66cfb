"""Exact-value checks of every collective in hpcopt.comm, at any number of ranks.

argv[1]: "host" (NumPy arrays), "direct" (fake device arrays handed to MPI through
__cuda_array_interface__) or "staged" (fake device arrays copied through host buffers).
"""
import sys

import numpy as np
from mpi4py import MPI

from hpcopt import topology
from hpcopt.backend import Backend
from hpcopt.comm import Comm, Placement
from hpcopt.kernels import Kernels


class FakeDeviceArray:
    """Host memory exposed only through __cuda_array_interface__ (as a GPU array would be)."""

    def __init__(self, a: np.ndarray):
        self.base = a

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.base.shape, "typestr": self.base.dtype.str,
                "data": (self.base.ctypes.data, False), "strides": None, "version": 3}


class FakeGpuBackend(Backend):
    """NumPy compute, but every array counts as device memory for communication."""

    def __init__(self):
        super().__init__(np, "cpu", 0, "fake-gpu")
        self.views = 0
        self.staged = 0
        self.syncs = 0

    def is_device_array(self, a):
        return True

    def device_view(self, a):
        self.views += 1
        assert a.flags.c_contiguous
        return FakeDeviceArray(a)

    def synchronize(self):
        self.syncs += 1

    def copy_to_host(self, dev, host):
        self.staged += 1
        np.copyto(host, dev)

    def copy_from_host(self, host, dev):
        self.staged += 1
        np.copyto(dev, host)


mode = sys.argv[1]
world = MPI.COMM_WORLD
backend = FakeGpuBackend() if mode != "host" else None
cuda_aware = {"host": "auto", "direct": "yes", "staged": "no"}[mode]
n = 16
c = Comm(n, backend=backend, kernels=Kernels(mode="compiled"), cuda_aware=cuda_aware, timeout=60)
assert (c.lo, c.hi) == Placement(n, world.size).range(world.rank)
rng = np.random.default_rng(7)
full = rng.integers(-64, 64, size=(n, 33)).astype(np.float32)
X = np.ascontiguousarray(full[c.lo:c.hi])

# mean: exact (integers, n a power of two)
m = c.mean(X)
assert np.array_equal(m, full.mean(axis=0, dtype=np.float64).astype(np.float32)), "mean"

# mix on the complete graph with uniform weights equals mean exactly
Wc = topology.build("complete", n, weights="uniform").mixing_matrix(0)
out = c.mix(X, Wc)
assert np.array_equal(out, np.broadcast_to(m, out.shape)), "mix(complete) != mean"

# mix on every graph equals W @ X; terms are summed in global node order, so the result is
# the same bits whatever the number of ranks (compared with a one-rank reference here)
ref_k = Kernels(mode="numpy")
for name in ["ring", "torus", "exponential", "star", "hypercube", "erdos_renyi", "one_peer_exponential"]:
    topo = topology.build(name, n, p=0.4, seed=1)
    for t in range(topo.period):
        W = topo.mixing_matrix(t)
        got = c.mix(X, W)
        rows = [np.nonzero(W[i])[0] for i in range(n)]
        indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
        idx = np.concatenate(rows).astype(np.int64)
        w = np.concatenate([W[i, r] for i, r in enumerate(rows)]).astype(np.float32)
        one = np.empty_like(full)
        ref_k.mix_rows(one, full, np.empty((0, full.shape[1]), np.float32), indptr, idx, w)
        assert np.array_equal(got, one[c.lo:c.hi]), f"mix {name} phase {t}"
        assert np.allclose(got, (W @ full.astype(np.float64))[c.lo:c.hi], atol=1e-4), name

# move: a random permutation of rows, with self-moves kept in place
perm = np.random.default_rng(3).permutation(n)
Y = X.copy()
c.move(Y, np.arange(n), perm)
moved = np.empty_like(full)
moved[perm] = full
assert np.array_equal(Y, moved[c.lo:c.hi]), "move"

# gathers and small reductions
g = c.allgather_nodes(np.arange(c.lo, c.hi, dtype=float)[:, None] * [1, 2])
assert np.array_equal(g, np.arange(n)[:, None] * [1, 2]), "allgather"
s = c.allreduce_scalars([c.rank + 1.0])
assert s[0] == world.size * (world.size + 1) / 2, "allreduce"
assert c.agree(c.rank == world.size - 1) is True and c.agree(False) is False
per = c.gather_ranks([float(c.rank)])
if c.rank == 0:
    assert per[:, 0].tolist() == list(range(world.size))

sent, _ = c.totals()
if world.size > 1:
    assert sent > 0 and c.counters["mix"].calls >= 8
    if mode == "direct":
        assert backend.views > 0 and backend.staged == 0 and backend.syncs > 0 and c.cuda_aware
    if mode == "staged":
        assert backend.staged > 0 and backend.views == 0 and not c.cuda_aware
print(f"rank {c.rank}: collectives ok ({mode})", flush=True)
