"""Teleportation (Takezawa & Stich, ICLR 2025, arXiv 2501.15259).

k model "tokens" live on k active nodes. Step t:
1. the active set a_t is an ordered uniform sample drawn from (seed, t), computed by
   every rank without messages; token j sits on node a_t[j]. For n <= PERMUTATION_MAX it
   is the first k entries of a random permutation of the n nodes (O(n) per step); above,
   NumPy's `Generator.choice(n, k, replace=False)` from the same generator (Floyd's
   algorithm, O(k)): the same distribution, another stream;
2. every token takes an SGD step on the data of the node it sits on (inactive nodes
   compute nothing);
3. the tokens gossip on a graph over token ids (`topology.*` with k vertices, ring by
   default): x_j <- sum_l W_jl x_l (adapt-then-combine), through `comm.mix_tokens`, which
   touches only the k token rows (O(k d) per step, no n x n matrix and no n-row plan;
   the sums are those the embedding n x n matrix gave, bit for bit);
4. token j moves to node a_{t+1}[j] (`comm.move`: a row copy inside a rank, a message
   between ranks; a token whose next node is its current node is not sent).
Token j therefore sees a uniformly random node every step, independently of where it
was. With `algorithm.teleport: false` (ablation) the tokens stay on nodes 0..k-1; with
k = n that is D-SGD (adapt-then-combine) on the token graph.

k search (`algorithm.k: auto`): the candidates 1, 2, 4, ... <= n are packed into two
batches with at most n tokens each; a batch runs its candidates side by side for T =
`algorithm.search_steps` iterations on disjoint node sets (each step one permutation of
the n nodes is cut into consecutive blocks, one per candidate), every candidate from x0.
The k whose average token has the lowest loss on a validation split wins; the table goes
to run.h5 (/tables/k_search, with the split's size in `validation_samples` and
`validation_from_train` = 1) and training starts from x0 with that k. A resumed run
reads k back from that table (`restore_workspace`).

The validation split (`validation_split`, called by the runner before the nodes' data
are built) is carved out of the training data: floor(data.val_fraction * m_v) samples of
every node v (at least one left to train on), chosen from data.seed alone, so every rank
and every number of ranks carves the same samples. They are removed from the nodes'
training data for the search and for the training that follows, and the test split is
never looked at. Only a run that searches (k auto) carves; a run with a fixed k, and
every other method, trains on all the training data. The runner passes the split as
`ctx.workspace["validation"]` (a `Validation`); an older runner that passes a plain
(X_test, y_test) pair still works, and the table then says validation_from_train = 0.
"""
from __future__ import annotations

from typing import List, NamedTuple, Sequence

import numpy as np

from .. import optim
from .. import topology as topology_mod
from ..data import step_rng

SHARDED = ("X",)
METRICS = ("token_node",)
TAG = 13  # stream of the active-set permutations


class State(NamedTuple):
    X: object  # (L, d): a node's row holds the token sitting on it (other rows are unused)


class Validation(NamedTuple):
    """The k search's validation split (on the rank's device), carved from the training data."""
    X: object  # (m, f)
    y: object  # (m,)
    samples: int
    from_train: bool = True


VAL_STREAM = 31  # data.seed stream of the validation carve


def needs_validation(cfg) -> bool:
    """Whether a run searches k (and so carves a validation split)."""
    return cfg.algorithm.name.value == "teleport" and cfg.algorithm.k == 0


def carve(parts: Sequence[np.ndarray], fraction: float, seed: int):
    """(training parts, validation indices): floor(fraction * m_v) samples of every node's
    part, at least one left to train on, drawn from `seed` alone (pure; sorted indices)."""
    rng = np.random.default_rng([seed, VAL_STREAM])
    train, val = [], []
    for p in parts:
        p = np.asarray(p, np.int64)
        m = min(int(fraction * len(p)), len(p) - 1)
        pick = np.zeros(len(p), bool)
        pick[rng.permutation(len(p))[:m]] = True
        train.append(p[~pick])
        val.append(p[pick])
    return train, np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)


def validation_split(cfg, ds, parts, xp=np):
    """(parts to train on, Validation or None): the runner's hook, called before NodeData.

    With k auto the validation samples are carved out of the training parts (see
    `carve`); otherwise the parts are returned unchanged and there is no split."""
    from ..config import ConfigError
    if not needs_validation(cfg):
        return parts, None
    train, idx = carve(parts, cfg.data.val_fraction, cfg.data.seed)
    if not len(idx):
        raise ConfigError(f"data.val_fraction = {cfg.data.val_fraction} is not allowed: it carves no validation "
                          f"sample from nodes of {min(len(p) for p in parts)}..{max(len(p) for p in parts)} "
                          f"training samples; raise it")
    return train, Validation(xp.asarray(ds.X_train[idx]), xp.asarray(ds.y_train[idx]), int(len(idx)))


# ---------------------------------------------------------------------------------------
# pure schedule: where the tokens are


PERMUTATION_MAX = 8192  # above this many nodes the active set is drawn in O(k) (see the docstring)


def active_nodes(seed: int, step: int, n: int, sizes: Sequence[int], teleport: bool = True) -> np.ndarray:
    """Node of every token at `step`: blocks of one ordered uniform sample without
    replacement, one block per group (a permutation's head up to PERMUTATION_MAX nodes)."""
    total = int(sum(sizes))
    if not teleport:
        return np.arange(total, dtype=np.int64)
    rng = step_rng(seed, step, TAG)
    if n <= PERMUTATION_MAX:
        return rng.permutation(n)[:total].astype(np.int64)
    return rng.choice(n, total, replace=False).astype(np.int64)


def search_batches(n: int) -> List[List[int]]:
    """Candidates 1, 2, 4, ... <= n packed first-fit-decreasing into two batches of <= n."""
    cands = [1 << i for i in range(n.bit_length()) if (1 << i) <= n]
    bins: List[List[int]] = [[], []]
    for k in sorted(cands, reverse=True):
        for b in bins:
            if sum(b) + k <= n:
                b.append(k)
                break
    return [sorted(b) for b in bins if b]


def node_mixing_matrix(n: int, nodes: np.ndarray, token_ws: Sequence[np.ndarray]) -> np.ndarray:
    """n x n matrix applying each group's token graph to the nodes its tokens sit on (a
    dense reference for small n in tests; the run path mixes the k rows only)."""
    W = np.eye(n)
    off = 0
    for Wt in token_ws:
        k = Wt.shape[0]
        idx = nodes[off:off + k]
        W[idx] = 0.0
        W[np.ix_(idx, idx)] = Wt
        off += k
    return W


# ---------------------------------------------------------------------------------------


class _Groups:
    """Tokens of one or more groups (k values) and their token graphs."""

    def __init__(self, ctx, sizes: Sequence[int]):
        self.sizes = list(sizes)
        t = ctx.cfg.topology
        self.token_ws = [topology_mod.build(t.name.value, k, weights=t.weights.value, p=t.p, seed=t.seed,
                                            path=t.path, rows=t.rows if k == ctx.cfg.algorithm.k else 0)
                         for k in self.sizes]
        self.group = np.repeat(np.arange(len(self.sizes)), self.sizes)
        self._nodes: dict = {}  # step -> active nodes (the schedule is asked several times per step)
        self._mats: dict = {}  # phases -> block-diagonal token matrix

    def nodes(self, ctx, step: int) -> np.ndarray:
        hit = self._nodes.get(step)
        if hit is None:
            if len(self._nodes) >= 4:
                self._nodes.pop(next(iter(self._nodes)))
            hit = self._nodes[step] = active_nodes(ctx.cfg.run.seed, step, ctx.comm.n, self.sizes,
                                                   ctx.cfg.algorithm.teleport)
            hit.setflags(write=False)
        return hit

    def token_matrix(self, step: int) -> topology_mod.Sparse:
        """K x K block-diagonal matrix over all tokens (each group's token graph at `step`)."""
        key = tuple(tw.phase(step) for tw in self.token_ws)
        W = self._mats.get(key)
        if W is None:
            rows, cols, vals, off = [], [], [], 0
            for tw, k in zip(self.token_ws, self.sizes):
                Wt = tw.sparse(step)
                rows.append(Wt.row_ids() + off)
                cols.append(Wt.indices + off)
                vals.append(Wt.data)
                off += k
            W = self._mats[key] = topology_mod.Sparse.from_coo(off, np.concatenate(rows), np.concatenate(cols),
                                                               np.concatenate(vals))
        return W

    def matrix(self, ctx, step: int, nodes: np.ndarray) -> np.ndarray:
        """The dense n x n matrix the token gossip applies (reference; small n only)."""
        return node_mixing_matrix(ctx.comm.n, nodes, [tw.mixing_matrix(step) for tw in self.token_ws])


def _local(ctx, nodes: np.ndarray):
    """(token indices, local rows) of the tokens sitting on this rank's nodes."""
    lo, hi = ctx.comm.lo, ctx.comm.hi
    tokens = np.nonzero((nodes >= lo) & (nodes < hi))[0]
    return tokens, nodes[tokens] - lo


def _advance(ctx, X, groups: _Groups, t: int, lr: float):
    """One Teleportation step for all groups, in place on the k token rows of X; returns
    (X, per-row loss, active mask). O(k d) apart from the two (local_n,) outputs."""
    b, comm = ctx.backend, ctx.comm
    nodes = groups.nodes(ctx, t)
    tokens, rows = _local(ctx, nodes)
    # the (local_n,) loss row is reused across steps (the runner copies it at once): only the
    # rows set last step go back to NaN, so a step costs O(k) there too
    loss = ctx.workspace.get("teleport_loss")
    if loss is None or loss.shape != (comm.local_n,):
        loss = ctx.workspace["teleport_loss"] = np.full(comm.local_n, np.nan)
    else:
        loss[ctx.workspace.get("teleport_loss_rows", slice(0, 0))] = np.nan
    ctx.workspace["teleport_loss_rows"] = rows
    active = np.zeros(comm.local_n, bool)
    if len(rows):
        r = b.xp.asarray(rows)
        A, y, w = ctx.data.batch(t, rows=rows)
        Xa = X[r]
        lval, G = ctx.model.loss_grad(Xa, A, y, w)
        optim.apply(ctx.kernels, Xa, G, None, lr, ctx.cfg.optimizer)
        X[r] = Xa
        loss[rows] = b.to_host(lval)
        active[rows] = True
    comm.mix_tokens(X, nodes, groups.token_matrix(t))
    comm.move(X, nodes, groups.nodes(ctx, t + 1))
    return X, loss, active


def _group_means(ctx, X, groups: _Groups, nodes: np.ndarray):
    """(groups, d) average token of every group (one all-reduce)."""
    xp = ctx.backend.xp
    tokens, rows = _local(ctx, nodes)
    sums = ctx.backend.zeros((len(groups.sizes), X.shape[1]))
    for g in range(len(groups.sizes)):
        sel = rows[groups.group[tokens] == g]
        if len(sel):
            sums[g] = X[xp.asarray(sel)].sum(axis=0)
    total = ctx.comm.allreduce(sums)
    return total / ctx.backend.asarray(np.asarray(groups.sizes, np.float32))[:, None]


def k_search(ctx, x0) -> int:
    """Run the candidates in two batches of T steps; returns the chosen k (table in workspace)."""
    b = ctx.backend
    T = ctx.cfg.algorithm.search_steps
    table = {"k": [], "batch": [], "validation_loss": [], "validation_accuracy": [], "validation_samples": [],
             "validation_from_train": []}
    val = ctx.workspace["validation"]
    if not isinstance(val, Validation):  # an older runner's (X, y) pair: the test split
        val = Validation(val[0], val[1], int(len(val[1])), False)
    for bi, sizes in enumerate(search_batches(ctx.comm.n)):
        groups = _Groups(ctx, sizes)
        X = b.xp.tile(b.asarray(x0)[None, :], (ctx.comm.local_n, 1))
        for t in range(T):
            X, _, _ = _advance(ctx, X, groups, t, optim.lr_at(ctx.cfg.optimizer, t, T))
        means = _group_means(ctx, X, groups, groups.nodes(ctx, T))
        w = b.xp.full((len(sizes), val.samples), 1.0 / val.samples, dtype=np.float32)
        vl = b.to_host(ctx.model.loss(means, val.X, val.y, w))
        va = b.to_host(ctx.model.accuracy(means, val.X, val.y))
        for g, k in enumerate(sizes):
            table["k"].append(k)
            table["batch"].append(bi)
            table["validation_loss"].append(float(vl[g]))
            table["validation_accuracy"].append(float(va[g]))
            table["validation_samples"].append(val.samples)
            table["validation_from_train"].append(int(val.from_train))
    ctx.workspace.setdefault("tables", {})["k_search"] = {k: np.asarray(v) for k, v in table.items()}
    return best_k(table)


def best_k(table) -> int:
    """The candidate with the lowest finite validation loss (the first on ties)."""
    losses = np.array(table["validation_loss"], np.float64)
    losses[~np.isfinite(losses)] = np.inf
    return int(np.asarray(table["k"])[int(np.argmin(losses))])


def restore_workspace(ctx, tables) -> str:
    """On resume: take k from the search recorded in run.h5 instead of searching again."""
    table = tables.get("k_search")
    if ctx.cfg.algorithm.k != 0 or not table:
        return ""
    ctx.workspace["teleport_k"] = best_k(table)
    return f"k = {ctx.workspace['teleport_k']} from the k search recorded in run.h5 (not searched again)"


def chosen_k(ctx) -> int:
    k = ctx.workspace.get("teleport_k")
    if k is None:
        k = ctx.cfg.algorithm.k
        ctx.workspace["teleport_k"] = k
    return k


def init(ctx, x0) -> State:
    b = ctx.backend
    if ctx.cfg.algorithm.k == 0 and "teleport_k" not in ctx.workspace:
        ctx.workspace["teleport_k"] = k_search(ctx, x0)
    ctx.workspace["teleport_groups"] = _Groups(ctx, [chosen_k(ctx)])
    return State(b.xp.tile(b.asarray(x0)[None, :], (ctx.comm.local_n, 1)))


def node_params(ctx, state: State):
    return state.X


def active_rows(ctx, state: State, step: int) -> np.ndarray:
    """Local rows that hold a token at the start of `step`."""
    groups = ctx.workspace["teleport_groups"]
    _, rows = _local(ctx, groups.nodes(ctx, step))
    mask = np.zeros(ctx.comm.local_n, bool)
    mask[rows] = True
    return mask


def average(ctx, state: State):
    """The average token (evaluated by the runner); a collective."""
    groups = ctx.workspace["teleport_groups"]
    return _group_means(ctx, state.X, groups, groups.nodes(ctx, ctx.comm.step + 1))[0]


def step(ctx, state: State, t: int, lr: float):
    groups = ctx.workspace["teleport_groups"]
    X, loss, active = _advance(ctx, state.X, groups, t, lr)
    return State(X), {"loss": loss, "active": active, "token_node": groups.nodes(ctx, t)}
