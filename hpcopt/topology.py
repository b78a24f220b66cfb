"""Communication graphs and mixing matrices (pure: no MPI, no files but an edge list).

A `Topology` holds one mixing matrix per phase; `mixing_matrix(step)` returns the matrix
used at that step (static graphs have one phase). Matrices are dense float64 `(n, n)`
arrays: n is the number of nodes (at most a few thousand), and `comm` turns the sparsity
pattern into a message plan once per distinct matrix.

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
from typing import Dict, List, NamedTuple, Optional, Set, Tuple

import numpy as np

from .config import ConfigError

Edge = Tuple[int, int]
NAMES = ("ring", "torus", "exponential", "exponential_directed", "one_peer_exponential", "complete", "star",
         "hypercube", "erdos_renyi", "edgelist")


class Topology(NamedTuple):
    name: str
    n: int
    matrices: Tuple[np.ndarray, ...]  # one per phase
    directed: bool

    @property
    def static(self) -> bool:
        return len(self.matrices) == 1

    @property
    def period(self) -> int:
        return len(self.matrices)

    def mixing_matrix(self, step: int) -> np.ndarray:
        return self.matrices[step % len(self.matrices)]

    def phase(self, step: int) -> int:
        return step % len(self.matrices)


# ---------------------------------------------------------------------------------------
# edge sets


def _undirected(pairs) -> Set[Edge]:
    return {(min(i, j), max(i, j)) for i, j in pairs if i != j}


def ring_edges(n: int) -> Set[Edge]:
    return _undirected((i, (i + 1) % n) for i in range(n))


def torus_dims(n: int, rows: int = 0) -> Tuple[int, int]:
    if rows <= 0:
        rows = max(r for r in range(1, int(math.isqrt(n)) + 1) if n % r == 0)
    return rows, n // rows


def torus_edges(n: int, rows: int = 0) -> Set[Edge]:
    r, c = torus_dims(n, rows)
    pairs = []
    for a in range(r):
        for b in range(c):
            i = a * c + b
            pairs.append((i, ((a + 1) % r) * c + b))
            pairs.append((i, a * c + (b + 1) % c))
    return _undirected(pairs)


def exponential_edges(n: int) -> Set[Edge]:
    """Static exponential graph: i ~ i + 2^k (mod n) for 2^k < n, undirected."""
    pairs = []
    k = 1
    while k < n:
        pairs += [(i, (i + k) % n) for i in range(n)]
        k *= 2
    return _undirected(pairs)


def complete_edges(n: int) -> Set[Edge]:
    return {(i, j) for i in range(n) for j in range(i + 1, n)}


def star_edges(n: int) -> Set[Edge]:
    return {(0, j) for j in range(1, n)}


def hypercube_edges(n: int) -> Set[Edge]:
    if n & (n - 1):
        raise ConfigError(f"topology.name = 'hypercube' is not allowed: needs nodes.n a power of 2 (nodes.n = {n})")
    bits = n.bit_length() - 1
    return _undirected((i, i ^ (1 << b)) for i in range(n) for b in range(bits))


def erdos_renyi_edges(n: int, p: float, seed: int, tries: int = 200) -> Set[Edge]:
    """G(n, p), redrawn (with the same seed stream) until connected."""
    rng = np.random.default_rng(seed)
    iu = np.triu_indices(n, 1)
    for _ in range(tries):
        keep = rng.random(len(iu[0])) < p
        edges = set(zip(iu[0][keep].tolist(), iu[1][keep].tolist()))
        if is_connected(n, edges):
            return edges
    raise ConfigError(f"topology.p = {p} is not allowed: no connected Erdos-Renyi graph on {n} nodes "
                      f"in {tries} draws; raise p")


def edgelist_edges(n: int, path: str, max_bytes: int = 256 << 20) -> Set[Edge]:
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
    return _undirected(pairs)


# ---------------------------------------------------------------------------------------
# weights and checks


def degrees(n: int, edges: Set[Edge]) -> np.ndarray:
    deg = np.zeros(n, dtype=np.int64)
    for i, j in edges:
        deg[i] += 1
        deg[j] += 1
    return deg


def is_connected(n: int, edges: Set[Edge]) -> bool:
    adj: List[List[int]] = [[] for _ in range(n)]
    for i, j in edges:
        adj[i].append(j)
        adj[j].append(i)
    seen = {0}
    todo = [0]
    while todo:
        for j in adj[todo.pop()]:
            if j not in seen:
                seen.add(j)
                todo.append(j)
    return len(seen) == n


def metropolis_weights(n: int, edges: Set[Edge]) -> np.ndarray:
    deg = degrees(n, edges)
    W = np.zeros((n, n))
    for i, j in edges:
        W[i, j] = W[j, i] = 1.0 / (1.0 + max(deg[i], deg[j]))
    W[np.diag_indices(n)] = 1.0 - W.sum(axis=1)
    return W


def uniform_weights(n: int, edges: Set[Edge], name: str) -> np.ndarray:
    deg = degrees(n, edges)
    if n > 1 and deg.min() != deg.max():
        raise ConfigError(f"topology.weights = 'uniform' is not allowed: {name} on {n} nodes is not regular "
                          f"(degrees {deg.min()}..{deg.max()}); use metropolis")
    W = np.zeros((n, n))
    for i, j in edges:
        W[i, j] = W[j, i] = 1.0
    W[np.diag_indices(n)] = 1.0
    return W / W.sum(axis=1, keepdims=True)


def exponential_directed_matrix(n: int) -> np.ndarray:
    """Static directed exponential graph: node i sends to (i + 2^j) mod n for
    j = 0..ceil(log2 n)-1, every weight (self included) 1 / (ceil(log2 n) + 1)."""
    tau = math.ceil(math.log2(n)) if n > 1 else 0
    W = np.eye(n)
    for j in range(tau):  # 2^j < n, so the shifts are distinct and non-zero mod n
        W[(np.arange(n) + (1 << j)) % n, np.arange(n)] += 1.0
    return W / (tau + 1)


def one_peer_matrices(n: int) -> Tuple[np.ndarray, ...]:
    if n == 1:
        return (np.ones((1, 1)),)
    mats = []
    for k in range(max(1, math.ceil(math.log2(n)))):
        W = 0.5 * np.eye(n)
        W[np.arange(n), (np.arange(n) + (1 << k)) % n] += 0.5
        mats.append(W)
    return tuple(mats)


def spectral_gap(W: np.ndarray) -> float:
    """1 - ||W - 11^T/n||_2; for symmetric W this is 1 - max(|lambda_2|, |lambda_n|)."""
    n = W.shape[0]
    if n == 1:
        return 1.0
    return float(1.0 - np.linalg.norm(W - np.full((n, n), 1.0 / n), 2))


def check_mixing_matrix(W: np.ndarray, symmetric: bool = True, tol: float = 1e-12) -> None:
    """Raise ValueError unless W is non-negative, doubly stochastic (and symmetric)."""
    if (W < -tol).any():
        raise ValueError("mixing matrix has negative entries")
    if not np.allclose(W.sum(axis=1), 1.0, atol=tol * W.shape[0], rtol=0):
        raise ValueError("mixing matrix rows do not sum to 1")
    if not np.allclose(W.sum(axis=0), 1.0, atol=tol * W.shape[0], rtol=0):
        raise ValueError("mixing matrix columns do not sum to 1")
    if symmetric and not np.array_equal(W, W.T):
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
    validates the result."""
    check_params(name, n, weights=weights, p=p, seed=seed, path=path, rows=rows, keys=keys)
    if name in ("one_peer_exponential", "exponential_directed"):
        mats = one_peer_matrices(n) if name == "one_peer_exponential" else (exponential_directed_matrix(n),)
        for W in mats:
            check_mixing_matrix(W, symmetric=False)
        return Topology(name, n, mats, directed=True)
    if name == "ring":
        edges = ring_edges(n)
    elif name == "torus":
        if rows and n % rows:
            raise ConfigError(f"topology.rows = {rows} is not allowed: must divide nodes.n = {n}")
        edges = torus_edges(n, rows)
    elif name == "exponential":
        edges = exponential_edges(n)
    elif name == "complete":
        edges = complete_edges(n)
    elif name == "star":
        edges = star_edges(n)
    elif name == "hypercube":
        edges = hypercube_edges(n)
    elif name == "erdos_renyi":
        edges = erdos_renyi_edges(n, p, seed)
    elif name == "edgelist":
        edges = edgelist_edges(n, path)
    else:
        raise ConfigError(f"topology.name = {name!r} is not allowed: choose one of {', '.join(NAMES)}")
    if not is_connected(n, edges):
        raise ConfigError(f"topology.name = {name!r} is not allowed: the graph on {n} nodes is not connected")
    W = uniform_weights(n, edges, name) if weights == "uniform" else metropolis_weights(n, edges)
    check_mixing_matrix(W, symmetric=True)
    return Topology(name, n, (W,), directed=False)


def from_config(cfg, n: int) -> Topology:
    t = cfg
    return build(t.name.value, n, weights=t.weights.value, p=t.p, seed=t.seed, path=t.path, rows=t.rows)


def summary(topo: Topology) -> dict:
    """Degree, spectral gap and weight statistics (per phase for time-varying graphs)."""
    gaps, degs, wmin, wmax, self_w = [], [], [], [], []
    for W in topo.matrices:
        off = W - np.diag(np.diag(W))
        d = (off > 0).sum(axis=1)
        degs.append((int(d.min()), int(d.max())))
        gaps.append(spectral_gap(W))
        nz = off[off > 0]
        wmin.append(float(nz.min()) if nz.size else 0.0)
        wmax.append(float(nz.max()) if nz.size else 0.0)
        self_w.append((float(np.diag(W).min()), float(np.diag(W).max())))
    prod = np.eye(topo.n)
    for W in topo.matrices:
        prod = W @ prod
    return {
        "name": topo.name, "n": topo.n, "phases": topo.period, "directed": topo.directed,
        "degree_min": min(a for a, _ in degs), "degree_max": max(b for _, b in degs),
        "spectral_gap": min(gaps), "spectral_gap_period": spectral_gap(prod),
        "edges_per_step": float(np.mean([(W > 0).sum() - topo.n for W in topo.matrices])),
        "weight_min": min(wmin), "weight_max": max(wmax),
        "self_weight_min": min(s for s, _ in self_w), "self_weight_max": max(s for _, s in self_w),
    }
