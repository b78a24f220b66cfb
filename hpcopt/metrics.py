"""Loss-landscape diagnostics of decentralized training (Zhang et al. 2021, arXiv 2112.01433).

Computed every `diagnostics.every` steps on a FIXED evaluation batch per node (drawn once
from stream 5 of the node's sampler, or the node's whole data with batch_size 0; never
augmented: the landscape of the data, not of one random crop of it), for
every model a node holds (D-SGD / Local SGD nodes, Teleportation tokens; one replicated
model for sync SGD):

  weight_variance     Xi^2 = mean_i ||x_i - x_bar||^2 (and node_weight_dev per node)
  mean_loss           mean_i f_i(x_i)        loss_at_mean   mean_i f_i(x_bar)
  smoothing_gap       loss_at_mean - mean_loss
  alpha_ratio         alpha_eff / alpha = <mean_i g_i(x_i), g_S> / ||g_S||^2,
                      g_S = mean_i g_i(x_bar) on the same batches (1 when all nodes agree)
  grad_deviation      ||mean_i g_i(x_i) - g_S||  (what a matched-noise baseline imitates)
  lambda_max          top Hessian eigenvalue of mean_i f_i at x_bar, power iteration on
                      Hessian-vector products (`diagnostics.power_iters` iterations)
  stability           lr * lambda_max (gradient descent on a quadratic is stable below 2)

Sums over nodes are all-reduced, so the figures do not depend on the number of ranks,
and nothing here changes the training state or its random streams.

What is measured: the models `algo.node_params` returns and their average, unless the
algorithm has `diagnostic_view(ctx, state, step)` returning (rows, average) for that step
(the same choice on every rank). Local SGD uses it at a step that ended with an average:
the rows are the nodes' models before the average, which is what the landscape figures
are about (after it they are trivial: Xi^2 ~ 0, alpha_ratio = 1).
"""
from __future__ import annotations

from typing import Dict

import numpy as np

from . import models

DIAG_STREAM = 5
NAMES = ("weight_variance", "mean_loss", "loss_at_mean", "smoothing_gap", "alpha_ratio", "grad_deviation",
         "lambda_max", "stability")


def sq_dist_sum(X, center, rows_per_chunk: int = 64) -> float:
    """sum_i ||X[i] - center||^2 without an (L, d) temporary (chunks of rows)."""
    total = 0.0
    for lo in range(0, X.shape[0], rows_per_chunk):
        diff = X[lo:lo + rows_per_chunk] - center[None, :]
        total += float((diff * diff).sum())
    return total


def _vec(b, a):
    return np.asarray(b.to_host(a), np.float64)


def diagnose(ctx, algo, state, step: int, lr: float) -> Dict[str, object]:
    """All diagnostics at the current state (a collective: every rank calls it)."""
    b, comm, model = ctx.backend, ctx.comm, ctx.model
    dcfg = ctx.cfg.diagnostics
    view_fn = getattr(algo, "diagnostic_view", None)
    view = view_fn(ctx, state, step) if view_fn else None
    X = algo.node_params(ctx, state) if view is None else view[0]
    rows_fn = getattr(algo, "active_rows", None)
    mask = np.asarray(rows_fn(ctx, state, step), bool) if rows_fn else np.ones(X.shape[0], bool)
    rows = np.nonzero(mask)[0]
    xbar = algo.average(ctx, state) if view is None else view[1]
    d = xbar.shape[0]
    batch = ctx.workspace.get("diag_batch")
    if batch is None:
        batch = ctx.data.batch(0, stream=DIAG_STREAM, batch_size=dcfg.batch_size, augment=False)
        ctx.workspace["diag_batch"] = batch
    A, y, w = (a[b.xp.asarray(rows)] for a in batch) if len(rows) < X.shape[0] else batch
    Xa = X[b.xp.asarray(rows)] if len(rows) < X.shape[0] else X
    L = len(rows)
    if L:
        Xbar = b.xp.broadcast_to(xbar[None, :], (L, d))
        with models.frozen(model):  # measuring must not move BatchNorm statistics
            loss_i, G = model.loss_grad(Xa, A, y, w)
            loss_s, Gs = model.loss_grad(Xbar, A, y, w)
        dev = ((Xa - xbar[None, :]) ** 2).sum(axis=1)
        local = np.concatenate([[float(loss_i.sum()), float(loss_s.sum()), float(dev.sum()), float(L)],
                                _vec(b, G.sum(axis=0)), _vec(b, Gs.sum(axis=0))])
    else:
        dev = b.zeros((0,))
        local = np.zeros(4 + 2 * d)
    tot = comm.allreduce_scalars(local)
    count = tot[3]
    g_mean, g_s = tot[4:4 + d] / count, tot[4 + d:] / count
    out: Dict[str, object] = {
        "mean_loss": tot[0] / count, "loss_at_mean": tot[1] / count, "weight_variance": tot[2] / count,
        "alpha_ratio": float(g_mean @ g_s / (g_s @ g_s)) if g_s @ g_s > 0 else float("nan"),
        "grad_deviation": float(np.linalg.norm(g_mean - g_s)),
    }
    out["smoothing_gap"] = out["loss_at_mean"] - out["mean_loss"]
    per_node = np.full(X.shape[0], np.nan)
    per_node[rows] = _vec(b, dev)
    out["node_weight_dev"] = comm.allgather_nodes(per_node)
    if dcfg.power_iters:
        lam = top_eigenvalue(ctx, xbar, (A, y, w), L, count, dcfg.power_iters, ctx.cfg.run.seed)
        out["lambda_max"] = lam
        out["stability"] = lr * lam
    else:
        out["lambda_max"] = out["stability"] = float("nan")
    return out


def top_eigenvalue(ctx, xbar, batch, L: int, count: float, iters: int, seed: int) -> float:
    """Power iteration with Hessian-vector products of mean_i f_i at x_bar."""
    b, comm, model = ctx.backend, ctx.comm, ctx.model
    A, y, w = batch
    d = xbar.shape[0]
    v = np.random.default_rng([seed, 17]).standard_normal(d)
    v /= np.linalg.norm(v)
    lam = float("nan")
    for _ in range(iters):
        if L:
            V = b.xp.broadcast_to(b.asarray(v.astype(np.float32))[None, :], (L, d))
            Xbar = b.xp.broadcast_to(xbar[None, :], (L, d))
            hv_local = _vec(b, model.hvp(Xbar, b.xp.ascontiguousarray(V), A, y, w).sum(axis=0))
        else:
            hv_local = np.zeros(d)
        hv = comm.allreduce_scalars(hv_local) / count
        lam = float(v @ hv)
        norm = np.linalg.norm(hv)
        if norm == 0 or not np.isfinite(norm):
            break
        v = hv / norm
    return lam


# ---------------------------------------------------------------------------------------
# per-node columns of run.h5 (run.node_metrics)

NODE_STATS = ("mean", "std", "min", "max", "q05", "q25", "q50", "q75", "q95")
_LEVELS = (0.05, 0.25, 0.5, 0.75, 0.95)
NODE_COLUMNS = ("train_loss", "node_test_loss", "node_test_accuracy", "node_weight_dev")  # (rows, n) each
ALL_UP_TO = 1024  # run.node_metrics: auto keeps every node's column up to this many nodes


def node_mode(cfg_run, n: int) -> str:
    """The resolved run.node_metrics: auto is `all` up to ALL_UP_TO nodes, else `sample`."""
    mode = cfg_run.node_metrics.value
    if mode == "auto":
        mode = "all" if n <= ALL_UP_TO else "sample"
    return mode


def node_sample(n: int, size: int, seed: int) -> np.ndarray:
    """The fixed sample of run.node_metrics: sample: `size` distinct node ids (all of them
    when size >= n), sorted, drawn from a stream keyed by the run seed alone, so the same
    config gives the same nodes on any number of ranks and across resumes."""
    if size >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.Generator(np.random.PCG64([int(seed) % 2 ** 64, 0x6E6F6465]))
    return np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)


def node_stats(values) -> np.ndarray:
    """(rows, n) per-node values -> (rows, len(NODE_STATS)): mean, std, min, max and the
    5/25/50/75/95% quantiles (linear interpolation, as np.quantile) over each row's finite
    entries, so nodes that hold no model (NaN: Teleportation's idle nodes, unevaluated
    nodes) stay out; a row with no finite entry is all NaN. One sort of the block, no
    loop over rows (the flush of a 256-node run writes 50 rows at a time)."""
    v = np.asarray(values, np.float64)
    v = v.reshape(len(v), -1)
    out = np.full((len(v), len(NODE_STATS)), np.nan)
    if not v.size:
        return out
    finite = np.isfinite(v)
    k = finite.sum(axis=1)
    s = np.sort(np.where(finite, v, np.inf), axis=1)  # the k finite values first, in order
    has = k > 0
    kk = np.maximum(k, 1)
    total = np.where(finite, v, 0.0).sum(axis=1)
    mean = total / kk
    dev = np.where(finite, v - mean[:, None], 0.0)
    r = np.arange(len(v))
    out[:, 0] = mean
    out[:, 1] = np.sqrt((dev * dev).sum(axis=1) / kk)
    out[:, 2] = s[:, 0]
    out[:, 3] = s[r, kk - 1]
    with np.errstate(invalid="ignore"):  # rows without a finite entry (inf - inf) become NaN below
        for c, q in enumerate(_LEVELS):
            pos = q * (kk - 1)
            lo = np.floor(pos).astype(np.int64)
            hi = np.minimum(lo + 1, kk - 1)
            frac = pos - lo
            a, b = s[r, lo], s[r, hi]
            out[:, 4 + c] = a + (b - a) * frac
    out[~has] = np.nan
    return out


def node_columns(columns: Dict[str, np.ndarray], names, mode: str, ids) -> Dict[str, np.ndarray]:
    """The run.h5 columns of one append: for each per-node column in `names` ((rows, n)
    arrays over ALL nodes) add `<name>_stats` (over all nodes, `node_stats`) and keep the
    column itself whole (`all`), its `ids` columns (`sample`) or nothing (`none`)."""
    out = dict(columns)
    for name in names:
        if name not in out:
            continue
        values = np.asarray(out[name])
        out[f"{name}_stats"] = node_stats(values)
        if mode == "none":
            del out[name]
        elif mode == "sample":
            out[name] = values[:, ids]
    return out
