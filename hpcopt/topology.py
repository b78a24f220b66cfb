"""Communication graphs and mixing matrices (pure: no MPI, no files but an edge list).

A `Topology` holds one mixing matrix per phase (static graphs have one phase) as a
`Sparse` matrix: CSR rows (columns ascending, the diagonal included), float64 weights,
O(edges) memory. `sparse(step)` is what the run path uses (`comm.mix` builds its message
plan from it once per phase); `mixing_matrix(step)` is a dense float64 `(n, n)` copy for
small n only (at most DENSE_MAX nodes: tests, `hpcopt topology --matrix`). Builders,
weights, checks and the connectivity test are vectorised over edges (no Python loop
over nodes or edges), so a 1e5-node ring, torus or exponential graph builds in well
under a second.

Spectral gap (`spectral_gap`, `summary`): dense singular values up to DENSE_MAX nodes;
above, exactly by FFT for circulant matrices (ring, exponential, exponential_directed,
one-peer phases, torus as a 2-D circulant, complete), otherwise by power iteration on
the sparse operator (W - 11^T/n)^T (W - 11^T/n), reported as NaN with a note when it
does not converge within a fixed budget (`gap_note` in the summary says which).

Weights: Metropolis-Hastings, W_ij = 1 / (1 + max(deg_i, deg_j)) on edges and the rest
on the diagonal. On a regular graph this equals the uniform weights 1 / (deg + 1), so
`weights: uniform` is only a check that the graph is regular.

Two directed graphs (Ying et al. 2021, "Exponential graph is provably efficient for
decentralized deep training"), both doubly stochastic but not symmetric:
* `exponential_directed`, static: with tau = ceil(log2 n), node i sends to the tau nodes
  (i + 2^j) mod n, j = 0..tau-1, and W = (I + sum_j P_j) / (tau + 1), i.e.
  W[(i + 2^j) mod n, i] = 1 / (tau + 1): every node receives from tau in-neighbours
  (i - 2^j) and sends to tau out-neighbours, one message each way per edge.
  `exponential` is its undirected closure i ~ i +- 2^j (degree 2 tau - 1 at n = 16: 7
  neighbours instead of 4 in- and 4 out-neighbours, so about twice the bytes per step),
  with Metropolis-Hastings weights.
* `one_peer_exponential`, time-varying: at step t with k = t mod ceil(log2 n), node i
  averages with node (i + 2^k) mod n, W_t = (I + P_k) / 2; for n a power of two the
  product of one period of matrices is exactly the averaging matrix 11^T / n.
`weights` does not apply to these two (their weights are fixed; both are regular).
`comm.mix` takes any sparse W: a rank receives the rows its nodes' rows of W name
(in-neighbours) and sends its rows to the ranks whose rows of W name them
(out-neighbours), so W @ X is exact for non-symmetric W as well.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Dict, NamedTuple, Optional, Tuple

import numpy as np

from .config import ConfigError

Edge = Tuple[int, int]
NAMES = ("ring", "torus", "exponential", "exponential_directed", "one_peer_exponential", "complete", "star",
         "hypercube", "erdos_renyi", "edgelist")
DENSE_MAX = 4096  # largest n with a dense accessor / dense spectral gap
MAX_EDGES = 50_000_000  # a graph with more (undirected) edges is refused (complete graphs at large n)


class Sparse:
    """One n x n mixing matrix in CSR form: row i's non-zeros are `data[indptr[i]:indptr[i+1]]`
    at columns `indices[...]` (ascending, the diagonal included); float64 weights.

    `grid`: the shape of the cyclic grid the matrix may be circulant on ((n,) for the
    one-dimensional graphs, (rows, cols) for the torus), a hint for the spectral gap.
    """

    __slots__ = ("n", "indptr", "indices", "data", "grid", "_dense", "_rows", "__weakref__")

    def __init__(self, n: int, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray,
                 grid: Optional[Tuple[int, ...]] = None):
        self.n = int(n)
        self.indptr = np.asarray(indptr, np.int64)
        self.indices = np.asarray(indices, np.int64)
        self.data = np.asarray(data, np.float64)
        self.grid = grid
        self._dense: Optional[np.ndarray] = None
        self._rows: Optional[np.ndarray] = None

    @classmethod
    def from_coo(cls, n: int, rows, cols, vals, grid=None) -> "Sparse":
        """From (row, column, value) triplets with distinct (row, column) pairs; zeros dropped."""
        rows, cols, vals = (np.asarray(a) for a in (rows, cols, vals))
        keep = vals != 0
        rows, cols, vals = rows[keep].astype(np.int64), cols[keep].astype(np.int64), vals[keep].astype(np.float64)
        order = np.argsort(rows * n + cols, kind="stable")
        rows, cols, vals = rows[order], cols[order], vals[order]
        indptr = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
        return cls(n, indptr, cols, vals, grid)

    @classmethod
    def from_dense(cls, W: np.ndarray) -> "Sparse":
        W = np.asarray(W, np.float64)
        r, c = np.nonzero(W)  # row-major: rows ascending, columns ascending within a row
        return cls.from_coo(W.shape[0], r, c, W[r, c])

    @property
    def shape(self) -> Tuple[int, int]:
        return (self.n, self.n)

    @property
    def nnz(self) -> int:
        return int(self.indices.size)

    def row_ids(self) -> np.ndarray:
        """Row of every stored entry (cached)."""
        if self._rows is None:
            self._rows = np.repeat(np.arange(self.n, dtype=np.int64), np.diff(self.indptr))
        return self._rows

    def diagonal(self) -> np.ndarray:
        rows = self.row_ids()
        on = rows == self.indices
        out = np.zeros(self.n)
        out[rows[on]] = self.data[on]
        return out

    def offdiag_degree(self) -> np.ndarray:
        rows = self.row_ids()
        return np.bincount(rows[(rows != self.indices) & (self.data > 0)], minlength=self.n)

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """W @ x for a vector x (float64)."""
        return np.bincount(self.row_ids(), weights=self.data * x[self.indices], minlength=self.n)

    def rmatvec(self, x: np.ndarray) -> np.ndarray:
        """W^T @ x."""
        return np.bincount(self.indices, weights=self.data * x[self.row_ids()], minlength=self.n)

    def transpose(self) -> "Sparse":
        return Sparse.from_coo(self.n, self.indices, self.row_ids(), self.data, self.grid)

    def dense(self) -> np.ndarray:
        """The dense float64 (n, n) matrix (cached); only for n <= DENSE_MAX."""
        if self._dense is None:
            if self.n > DENSE_MAX:
                raise ValueError(f"a dense mixing matrix of {self.n} nodes ({8 * self.n * self.n / 2**30:.1f} GiB) "
                                 f"is not built above DENSE_MAX = {DENSE_MAX} nodes; use Topology.sparse(step)")
            W = np.zeros((self.n, self.n))
            W[self.row_ids(), self.indices] = self.data
            self._dense = W
        return self._dense

    def __repr__(self) -> str:
        return f"Sparse(n={self.n}, nnz={self.nnz})"


class Topology(NamedTuple):
    name: str
    n: int
    operators: Tuple[Sparse, ...]  # one per phase
    directed: bool

    @property
    def static(self) -> bool:
        return len(self.operators) == 1

    @property
    def period(self) -> int:
        return len(self.operators)

    def sparse(self, step: int) -> Sparse:
        """The mixing matrix of `step` (the same object for every step of one phase)."""
        return self.operators[step % len(self.operators)]

    def mixing_matrix(self, step: int) -> np.ndarray:
        """Dense copy of the matrix of `step` (n <= DENSE_MAX only; cached per phase)."""
        return self.sparse(step).dense()

    @property
    def matrices(self) -> Tuple[np.ndarray, ...]:
        """Dense matrices of all phases (small n only)."""
        return tuple(W.dense() for W in self.operators)

    def phase(self, step: int) -> int:
        return step % len(self.operators)


# ---------------------------------------------------------------------------------------
# edge sets: (m, 2) int64 arrays of undirected edges (i < j, unique, sorted)


def _undirected(n: int, i, j) -> np.ndarray:
    i, j = np.asarray(i, np.int64).ravel(), np.asarray(j, np.int64).ravel()
    keep = i != j
    a, b = np.minimum(i[keep], j[keep]), np.maximum(i[keep], j[keep])
    key = np.sort(a * n + b)  # sort + de-duplicate (np.unique's hash path is slower here)
    if key.size:
        key = key[np.concatenate([[True], key[1:] != key[:-1]])]
    return np.stack([key // n, key % n], axis=1) if key.size else np.zeros((0, 2), np.int64)


def _edge_array(n: int, edges) -> np.ndarray:
    """Accept an (m, 2) array or an iterable of pairs (older callers)."""
    if isinstance(edges, np.ndarray):
        return edges.reshape(-1, 2).astype(np.int64, copy=False)
    e = np.array(sorted(edges), np.int64).reshape(-1, 2)
    return _undirected(n, e[:, 0], e[:, 1])


def ring_edges(n: int) -> np.ndarray:
    i = np.arange(n)
    return _undirected(n, i, (i + 1) % n)


def torus_dims(n: int, rows: int = 0) -> Tuple[int, int]:
    if rows <= 0:
        rows = max(r for r in range(1, int(math.isqrt(n)) + 1) if n % r == 0)
    return rows, n // rows


def torus_edges(n: int, rows: int = 0) -> np.ndarray:
    r, c = torus_dims(n, rows)
    a, b = np.divmod(np.arange(n), c)
    i = np.concatenate([a * c + b, a * c + b])
    j = np.concatenate([((a + 1) % r) * c + b, a * c + (b + 1) % c])
    return _undirected(n, i, j)


def _shifts(n: int) -> np.ndarray:
    """1, 2, 4, ... < n."""
    return np.array([1 << k for k in range(max(0, (n - 1).bit_length())) if (1 << k) < n], np.int64)


def exponential_edges(n: int) -> np.ndarray:
    """Static exponential graph: i ~ i + 2^k (mod n) for 2^k < n, undirected."""
    i = np.arange(n)[None, :]
    s = _shifts(n)[:, None]
    return _undirected(n, np.broadcast_to(i, (len(s), n)), (i + s) % n)


def _too_many(name: str, n: int, edges: float) -> None:
    if edges > MAX_EDGES:
        raise ConfigError(f"nodes.n = {n} is not allowed: topology {name} has {edges:.3g} edges, more than "
                          f"{MAX_EDGES:.3g}; use a sparse graph (ring, torus, exponential, ...)")


def complete_edges(n: int) -> np.ndarray:
    _too_many("complete", n, n * (n - 1) / 2)
    i, j = np.triu_indices(n, 1)
    return np.stack([i, j], axis=1).astype(np.int64)


def star_edges(n: int) -> np.ndarray:
    j = np.arange(1, n, dtype=np.int64)
    return np.stack([np.zeros_like(j), j], axis=1)


def hypercube_edges(n: int) -> np.ndarray:
    if n & (n - 1):
        raise ConfigError(f"topology.name = 'hypercube' is not allowed: needs nodes.n a power of 2 (nodes.n = {n})")
    bits = n.bit_length() - 1
    i = np.arange(n)[None, :]
    flips = (np.int64(1) << np.arange(bits, dtype=np.int64))[:, None]
    return _undirected(n, np.broadcast_to(i, (bits, n)), i ^ flips)


def erdos_renyi_edges(n: int, p: float, seed: int, tries: int = 200, chunk: int = 1 << 22) -> np.ndarray:
    """G(n, p), redrawn (with the same seed stream) until connected. Pair (i, j), i < j, is
    kept when its uniform draw is < p, the draws taken in row-major order of the upper
    triangle; they are drawn in chunks of rows (the same stream as one call), so memory
    stays O(n + edges) while time is O(n^2)."""
    _too_many("erdos_renyi", n, p * n * (n - 1) / 2)
    rng = np.random.default_rng(seed)
    per_row = np.arange(n - 1, -1, -1, dtype=np.int64)  # entries of row i: n - 1 - i
    for _ in range(tries):
        parts = []
        i0 = 0
        while i0 < n:
            i1, total = i0, 0
            while i1 < n and (total == 0 or total + per_row[i1] <= chunk):
                total += int(per_row[i1])
                i1 += 1
            keep = np.nonzero(rng.random(total) < p)[0]
            if keep.size:
                counts = per_row[i0:i1]
                starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
                r = np.searchsorted(starts, keep, side="right") - 1
                parts.append(np.stack([i0 + r, i0 + r + 1 + keep - starts[r]], axis=1))
            i0 = i1
        edges = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
        if is_connected(n, edges):
            return edges
    raise ConfigError(f"topology.p = {p} is not allowed: no connected Erdos-Renyi graph on {n} nodes "
                      f"in {tries} draws; raise p")


def edgelist_edges(n: int, path: str, max_bytes: int = 256 << 20) -> np.ndarray:
    """Edges of an edge-list file: one 'i j' pair (0-based node numbers, ASCII digits,
    separated by blanks or a comma) per line; '#' starts a comment; self loops are ignored.
    Reads at most `max_bytes` of UTF-8 text (the default holds a complete graph on ~5000
    nodes); every problem is one ConfigError line."""
    from .config import read_text
    where = f"topology.path = {path!r} is not allowed"
    try:
        text, why = read_text(path, max_bytes)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    if text is None:
        raise ConfigError(f"{where}: {why}")
    pairs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        body = line.split("#", 1)[0].strip()
        if not body:
            continue
        parts = body.replace(",", " ").split()
        if len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts):
            raise ConfigError(f"{where}: line {lineno} is not 'i j' (two node numbers 0..{n - 1})")
        i, j = (int(p) if len(p) < 19 else -1 for p in parts)  # int() refuses > 4300 digits
        if not (0 <= i < n and 0 <= j < n):
            raise ConfigError(f"{where}: line {lineno} names a node outside 0..{n - 1}")
        pairs.append((i, j))
    e = np.array(pairs, np.int64).reshape(-1, 2)
    return _undirected(n, e[:, 0], e[:, 1])


# ---------------------------------------------------------------------------------------
# weights and checks


def degrees(n: int, edges) -> np.ndarray:
    e = _edge_array(n, edges)
    return np.bincount(e.ravel(), minlength=n).astype(np.int64)


def is_connected(n: int, edges) -> bool:
    """Connected components by min-label hooking and pointer jumping (O(m log n), vectorised)."""
    if n <= 1:
        return True
    e = _edge_array(n, edges)
    if len(e) < n - 1:
        return False
    u, v = e[:, 0], e[:, 1]
    parent = np.arange(n, dtype=np.int64)
    while True:
        pu, pv = parent[u], parent[v]
        diff = pu != pv
        if not diff.any():
            break
        lo, hi = np.minimum(pu[diff], pv[diff]), np.maximum(pu[diff], pv[diff])
        np.minimum.at(parent, hi, lo)
        while True:  # full shortcut: every node points at its root
            pp = parent[parent]
            if np.array_equal(pp, parent):
                break
            parent = pp
    return bool((parent == 0).all())


def _symmetric(n: int, e: np.ndarray, w: np.ndarray, grid=None) -> Sparse:
    """Sparse W with W_ij = W_ji = w on the edges and 1 - (row sum) on the diagonal."""
    i, j = e[:, 0], e[:, 1]
    rows, cols = np.concatenate([i, j]), np.concatenate([j, i])
    vals = np.concatenate([w, w])
    off = Sparse.from_coo(n, rows, cols, vals)
    diag = 1.0 - np.bincount(off.row_ids(), weights=off.data, minlength=n)  # in column order
    idx = np.arange(n, dtype=np.int64)
    return Sparse.from_coo(n, np.concatenate([off.row_ids(), idx]), np.concatenate([off.indices, idx]),
                           np.concatenate([off.data, diag]), grid)


def metropolis_weights(n: int, edges, grid=None) -> Sparse:
    e = _edge_array(n, edges)
    deg = degrees(n, e)
    w = 1.0 / (1.0 + np.maximum(deg[e[:, 0]], deg[e[:, 1]]).astype(np.float64))
    return _symmetric(n, e, w, grid)


def uniform_weights(n: int, edges, name: str, grid=None) -> Sparse:
    e = _edge_array(n, edges)
    deg = degrees(n, e)
    if n > 1 and deg.min() != deg.max():
        raise ConfigError(f"topology.weights = 'uniform' is not allowed: {name} on {n} nodes is not regular "
                          f"(degrees {deg.min()}..{deg.max()}); use metropolis")
    inv = 1.0 / (deg.astype(np.float64) + 1.0)
    i, j = e[:, 0], e[:, 1]
    idx = np.arange(n, dtype=np.int64)
    return Sparse.from_coo(n, np.concatenate([i, j, idx]), np.concatenate([j, i, idx]),
                           np.concatenate([inv[i], inv[j], inv]), grid)


def exponential_directed_matrix(n: int) -> Sparse:
    """Static directed exponential graph: node i sends to (i + 2^j) mod n for
    j = 0..ceil(log2 n)-1, every weight (self included) 1 / (ceil(log2 n) + 1)."""
    tau = math.ceil(math.log2(n)) if n > 1 else 0
    s = np.concatenate([[0], _shifts(n)[:tau]])  # 2^j < n, so the shifts are distinct and non-zero mod n
    i = np.arange(n)[None, :]
    rows = np.broadcast_to((i + s[:, None]) % n, (len(s), n))
    cols = np.broadcast_to(i, (len(s), n))
    return Sparse.from_coo(n, rows.ravel(), cols.ravel(), np.full(rows.size, 1.0 / (tau + 1)), (n,))


def one_peer_matrices(n: int) -> Tuple[Sparse, ...]:
    if n == 1:
        return (Sparse(1, np.array([0, 1]), np.array([0]), np.array([1.0]), (1,)),)
    mats = []
    i = np.arange(n)
    for k in range(max(1, math.ceil(math.log2(n)))):
        mats.append(Sparse.from_coo(n, np.concatenate([i, i]), np.concatenate([i, (i + (1 << k)) % n]),
                                    np.full(2 * n, 0.5), (n,)))
    return tuple(mats)


# ---------------------------------------------------------------------------------------
# spectral gap


def _circulant_spectrum(W: Sparse) -> Optional[np.ndarray]:
    """Eigenvalues of W when W is circulant on its grid (W[a, b] depends on (b - a) mod
    grid only), indexed by frequency; None otherwise. O(nnz log nnz + n log n)."""
    grid = W.grid
    if not grid or int(np.prod(grid)) != W.n:
        return None
    rows, cols = W.row_ids(), W.indices
    deg = np.diff(W.indptr)
    if deg.size == 0 or (deg != deg[0]).any():
        return None
    ra, ca = np.unravel_index(rows, grid), np.unravel_index(cols, grid)
    off = np.ravel_multi_index(tuple((c - r) % g for r, c, g in zip(ra, ca, grid)), grid)
    order = np.lexsort((off, rows))
    off, vals = off[order].reshape(W.n, deg[0]), W.data[order].reshape(W.n, deg[0])
    if not (off == off[0]).all() or not (vals == vals[0]).all():
        return None
    stencil = np.zeros(W.n)
    stencil[off[0]] = vals[0]
    return np.fft.fftn(stencil.reshape(grid)).ravel()


def _power_norm(W: Sparse, iters: int = 2000, tol: float = 1e-10, seed: int = 0) -> Tuple[float, str]:
    """||W - 11^T/n||_2 by power iteration on (W - J)^T (W - J), sparse; (NaN, note) when it
    does not settle within `iters` iterations."""
    n = W.n
    x = np.random.default_rng(seed).standard_normal(n)
    x -= x.mean()
    x /= np.linalg.norm(x)
    prev = 0.0
    for it in range(1, iters + 1):
        y = W.matvec(x)
        y -= y.mean()
        z = W.rmatvec(y)
        z -= z.mean()
        lam = float(np.linalg.norm(z))
        if lam == 0.0:
            return 0.0, f"power iteration ({it} iterations)"
        x = z / lam
        if abs(lam - prev) <= tol * lam:
            return math.sqrt(lam), f"power iteration ({it} iterations)"
        prev = lam
    return float("nan"), f"not computed: power iteration did not converge in {iters} iterations (n = {n})"


def gap_and_note(W) -> Tuple[float, str]:
    """(1 - ||W - 11^T/n||_2, how it was computed)."""
    if not isinstance(W, Sparse):
        W = np.asarray(W, np.float64)
        n = W.shape[0]
        if n == 1:
            return 1.0, "exact"
        return float(1.0 - np.linalg.norm(W - np.full((n, n), 1.0 / n), 2)), "exact (dense)"
    if W.n == 1:
        return 1.0, "exact"
    if W.n <= DENSE_MAX:
        return gap_and_note(W.dense())
    lam = _circulant_spectrum(W)
    if lam is not None:
        return float(1.0 - np.abs(lam[1:]).max()), "exact (circulant, FFT)"
    norm, note = _power_norm(W)
    return 1.0 - norm, note


def spectral_gap(W) -> float:
    """1 - ||W - 11^T/n||_2; for symmetric W this is 1 - max(|lambda_2|, |lambda_n|).
    Dense W, or a Sparse matrix (see gap_and_note for the method above DENSE_MAX)."""
    return gap_and_note(W)[0]


def check_mixing_matrix(W, symmetric: bool = True, tol: float = 1e-12) -> None:
    """Raise ValueError unless W (dense or Sparse) is non-negative, doubly stochastic (and symmetric)."""
    if isinstance(W, Sparse):
        n, data = W.n, W.data
        rows_sum = np.bincount(W.row_ids(), weights=data, minlength=n)
        cols_sum = np.bincount(W.indices, weights=data, minlength=n)
        neg = (data < -tol).any()
    else:
        n = W.shape[0]
        rows_sum, cols_sum, neg = W.sum(axis=1), W.sum(axis=0), (W < -tol).any()
    if neg:
        raise ValueError("mixing matrix has negative entries")
    if not np.allclose(rows_sum, 1.0, atol=tol * n, rtol=0):
        raise ValueError("mixing matrix rows do not sum to 1")
    if not np.allclose(cols_sum, 1.0, atol=tol * n, rtol=0):
        raise ValueError("mixing matrix columns do not sum to 1")
    if symmetric:
        if isinstance(W, Sparse):
            T = W.transpose()
            same = (np.array_equal(T.indptr, W.indptr) and np.array_equal(T.indices, W.indices)
                    and np.array_equal(T.data, W.data))
        else:
            same = np.array_equal(W, W.T)
        if not same:
            raise ValueError("mixing matrix is not symmetric")


# option names of `hpcopt topology` for the messages of check_params / build
CLI_KEYS = {"name": "NAME", "n": "--n", "weights": "--weights", "p": "--p", "seed": "--seed", "path": "--path",
            "rows": "--rows"}


def check_params(name: str, n: int, weights: str = "metropolis", p: float = 0.3, seed: int = 0,
                 path: str = "", rows: int = 0, keys: Optional[Dict[str, str]] = None) -> None:
    """Raise ConfigError (one line) for any value the config's `topology` section rejects.

    The rules are the config's own (type, choices and bounds of config.TopologyCfg's
    fields, checked by the config loader's functions), so `hpcopt topology` and a YAML
    file accept exactly the same values. `keys` renames parameters in the messages
    (CLI_KEYS: the command line's option names); the default is the config keys.
    """
    from . import config
    keys = keys or {}
    where = f"{keys.get('n', 'nodes.n')} = {config._show(n)} is not allowed"
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise ConfigError(f"{where}: must be an integer >= 1")
    if n < 1:
        raise ConfigError(f"{where}: must be >= 1")
    fields = {f.name: f for f in dataclasses.fields(config.TopologyCfg)}
    hints = typing.get_type_hints(config.TopologyCfg)
    for k, v in (("name", name), ("weights", weights), ("p", p), ("seed", seed), ("path", path), ("rows", rows)):
        key = keys.get(k, f"topology.{k}")
        v = v.item() if isinstance(v, np.generic) else v
        config._check_rules(key, config._coerce(hints[k], v, key), fields[k].metadata)


def build(name: str, n: int, weights: str = "metropolis", p: float = 0.3, seed: int = 0,
          path: str = "", rows: int = 0, keys: Optional[Dict[str, str]] = None) -> Topology:
    """Build a topology by name (see NAMES); checks the parameters (check_params) and
    validates the result. Sparse throughout: O(n + edges) memory."""
    check_params(name, n, weights=weights, p=p, seed=seed, path=path, rows=rows, keys=keys)
    if name in ("one_peer_exponential", "exponential_directed"):
        mats = one_peer_matrices(n) if name == "one_peer_exponential" else (exponential_directed_matrix(n),)
        for W in mats:
            check_mixing_matrix(W, symmetric=False)
        return Topology(name, n, mats, directed=True)
    grid: Optional[Tuple[int, ...]] = (n,)  # circulant candidates (checked before use)
    if name == "ring":
        edges = ring_edges(n)
    elif name == "torus":
        if rows and n % rows:
            raise ConfigError(f"topology.rows = {rows} is not allowed: must divide nodes.n = {n}")
        edges = torus_edges(n, rows)
        grid = torus_dims(n, rows)
    elif name == "exponential":
        edges = exponential_edges(n)
    elif name == "complete":
        edges = complete_edges(n)
    elif name == "star":
        edges, grid = star_edges(n), None
    elif name == "hypercube":
        edges, grid = hypercube_edges(n), None
    elif name == "erdos_renyi":
        edges, grid = erdos_renyi_edges(n, p, seed), None
    elif name == "edgelist":
        edges, grid = edgelist_edges(n, path), None
    else:
        raise ConfigError(f"topology.name = {name!r} is not allowed: choose one of {', '.join(NAMES)}")
    if not is_connected(n, edges):
        raise ConfigError(f"topology.name = {name!r} is not allowed: the graph on {n} nodes is not connected")
    W = uniform_weights(n, edges, name, grid) if weights == "uniform" else metropolis_weights(n, edges, grid)
    check_mixing_matrix(W, symmetric=True)
    return Topology(name, n, (W,), directed=False)


def from_config(cfg, n: int) -> Topology:
    t = cfg
    return build(t.name.value, n, weights=t.weights.value, p=t.p, seed=t.seed, path=t.path, rows=t.rows)


def _period_gap(topo: Topology) -> Tuple[float, str]:
    """Gap of the product of one period of matrices (time-varying graphs)."""
    if topo.period == 1:
        return gap_and_note(topo.operators[0])
    if topo.n <= DENSE_MAX:
        prod = np.eye(topo.n)
        for W in topo.operators:
            prod = W.dense() @ prod
        return gap_and_note(prod)
    spectra = [_circulant_spectrum(W) for W in topo.operators]
    if all(s is not None for s in spectra) and len({W.grid for W in topo.operators}) == 1:
        lam = np.prod(spectra, axis=0)  # circulants on one grid share their eigenvectors
        return float(1.0 - np.abs(lam[1:]).max()), "exact (circulant, FFT)"
    return float("nan"), f"not computed for a time-varying non-circulant graph above {DENSE_MAX} nodes"


def summary(topo: Topology) -> dict:
    """Degree, spectral gap and weight statistics (per phase for time-varying graphs),
    from the sparse matrices; `gap_note` says how the gap was computed."""
    gaps, notes, degs, wmin, wmax, self_w = [], [], [], [], [], []
    for W in topo.operators:
        rows = W.row_ids()
        offm = (rows != W.indices) & (W.data > 0)
        d = W.offdiag_degree()
        degs.append((int(d.min()), int(d.max())))
        g, note = gap_and_note(W)
        gaps.append(g)
        notes.append(note)
        nz = W.data[offm]
        wmin.append(float(nz.min()) if nz.size else 0.0)
        wmax.append(float(nz.max()) if nz.size else 0.0)
        diag = W.diagonal()
        self_w.append((float(diag.min()), float(diag.max())))
    gap_period, _ = _period_gap(topo)
    return {
        "name": topo.name, "n": topo.n, "phases": topo.period, "directed": topo.directed,
        "degree_min": min(a for a, _ in degs), "degree_max": max(b for _, b in degs),
        "spectral_gap": float(np.min(gaps)), "spectral_gap_period": gap_period,
        "gap_note": notes[int(np.argmin(gaps))] if not np.isnan(gaps).any() else next(
            nt for g, nt in zip(gaps, notes) if g != g),
        "edges_per_step": float(np.mean([int((W.data > 0).sum()) - int((W.diagonal() > 0).sum())
                                         for W in topo.operators])),
        "weight_min": min(wmin), "weight_max": max(wmax),
        "self_weight_min": min(s for s, _ in self_w), "self_weight_max": max(s for _, s in self_w),
    }
