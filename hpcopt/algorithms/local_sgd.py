"""Local SGD with diagonal scaling (Chezhegov et al. 2024, arXiv 2406.00846).

Every node takes H = `algorithm.local_steps` steps on its own data, then all nodes
average their parameters (one all-reduce). Steps are divided by a clipped diagonal
D_hat (see hpcopt.precond):
* `algorithm.scaling: global` (the analysed form): each node updates its moments every
  step, but the step uses D_hat frozen for the round; at synchronisation the statistic
  is averaged across nodes in the same all-reduce as the parameters (one buffer) and
  D_hat is recomputed, identical on every node. Adam's first moment is averaged too.
* `algorithm.scaling: local`: every node updates its own D_hat every step (fused
  kernels); at synchronisation the moments are averaged (`sync_moments: average`) or
  kept local (`keep`).
With H = 1 and identity scaling this is synchronous SGD (tested).

Statistics at synchronisation (recorded per round in run.h5, NaN between rounds):
dhat_min / dhat_median / dhat_max, dhat_ratio (max / min, the paper's Gamma / alpha),
dhat_clipped (fraction of coordinates at alpha), dhat_change (relative change of D_hat
since the last round), client_drift (mean_i ||x_i - x_bar||^2 just before averaging),
rounds, gradient_evals (cumulative, all nodes, warm-start probes included).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import optim, precond
from ..data import step_rng

SHARDED = ("X", "M", "V", "D", "P")
METRICS = ("rounds", "gradient_evals", "client_drift", "dhat_min", "dhat_median", "dhat_max", "dhat_ratio",
           "dhat_clipped", "dhat_change")
PROBE_STREAM = 3
WARM_START_STEP = 1 << 40  # probe keys of the warm start, disjoint from training steps


class State(NamedTuple):
    X: object  # (L, d) parameters
    M: object  # (L, d) adam first moment, or momentum buffer for identity + momentum, else (L, 0)
    V: object  # (L, d) scaling statistic (EMA), else (L, 0)
    D: object  # (L, d) frozen D_hat of the round (global scaling), else (L, 0)
    P: object  # (L, d) D_hat at the previous synchronisation (for dhat_change), else (L, 0)


def _hyper(ctx) -> precond.Hyper:
    return precond.from_config(ctx.cfg.optimizer)


def _probes(ctx, X, t: int, A, y, w, shared: bool):
    """z * (H z) per node with Rademacher z; shared z over nodes for global scaling."""
    L, d = X.shape
    seed = ctx.cfg.run.seed
    if shared:
        z = np.broadcast_to(step_rng(seed, t, 11).choice(np.array([-1.0, 1.0], np.float32), d), (L, d))
    else:
        z = precond.rademacher(seed, range(ctx.comm.lo, ctx.comm.hi), t, d)
    z = ctx.backend.asarray(z)
    return z * ctx.model.hvp(X, z, A, y, w)


def init(ctx, x0) -> State:
    b, comm, h = ctx.backend, ctx.comm, _hyper(ctx)
    L = comm.local_n
    X = b.xp.tile(b.asarray(x0)[None, :], (L, 1))
    d = X.shape[1]
    mom = precond.init(h, b, L, d)
    M = mom.m if h.name == "adam" else b.zeros((L, d if optim.uses_momentum(ctx.cfg.optimizer) else 0))
    glob = ctx.cfg.algorithm.scaling.value == "global"
    if precond.warm_started(h, glob):
        stat = b.zeros((L, d))
        probes = ctx.cfg.optimizer.probes
        for k in range(probes):
            A, y, w = ctx.data.batch(k, stream=PROBE_STREAM)
            _, G = ctx.model.loss_grad(X, A, y, w)
            zhz = _probes(ctx, X, WARM_START_STEP + k, A, y, w, glob) if h.name == "oasis" else None
            stat += precond.statistic(h, G, zhz)
        stat /= np.float32(probes)
        if glob:
            stat[...] = comm.mean(stat)[None, :]
        mom = precond.warm_start(h, mom, stat, glob)
    if glob and h.name != "identity":
        D = precond.diagonal(h, mom.v, 0)
        P = D.copy()
    else:
        D = P = b.zeros((L, 0))
    return State(X, M, mom.v, D, P)


def node_params(ctx, state: State):
    return state.X


def average(ctx, state: State):
    return ctx.comm.mean(state.X)


def step(ctx, state: State, t: int, lr: float):
    h = _hyper(ctx)
    cfg = ctx.cfg
    glob = cfg.algorithm.scaling.value == "global"
    A, y, w = ctx.data.batch(t)
    loss, G = ctx.model.loss_grad(state.X, A, y, w)
    zhz = _probes(ctx, state.X, t, A, y, w, glob) if precond.needs_hvp(h) else None
    mom = precond.Moments(state.M if h.name == "adam" else state.M[:, :0], state.V)
    wd = cfg.optimizer.weight_decay
    if h.name == "identity":
        optim.apply(ctx.kernels, state.X, G, state.M, lr, cfg.optimizer)
    elif glob:
        precond.step_frozen(h, ctx.kernels, state.X, G, mom, state.D, lr, t + 1, wd, zhz)
    else:
        precond.step_local(h, ctx.kernels, state.X, G, mom, lr, t + 1, wd, zhz)
    stats = {"loss": loss}
    H = cfg.algorithm.local_steps
    if (t + 1) % H == 0:
        state, round_stats = synchronise(ctx, state, h, glob, t)
        stats.update(round_stats)
        stats["rounds"] = (t + 1) // H
    extra = 2 if precond.needs_hvp(h) else 1
    probes = cfg.optimizer.probes * extra if precond.warm_started(h, glob) else 0
    stats["gradient_evals"] = float(ctx.comm.n * ((t + 1) * extra + probes))
    return state, stats


def synchronise(ctx, state: State, h: precond.Hyper, glob: bool, t: int):
    comm, xp = ctx.comm, ctx.backend.xp
    X = state.X
    d = X.shape[1]
    # every field that is averaged travels in ONE all-reduce: [X | V | M]
    parts = [X]
    if h.name != "identity" and (glob or ctx.cfg.algorithm.sync_moments.value == "average"):
        parts.append(state.V)
        if h.name == "adam":
            parts.append(state.M)
    elif h.name == "identity" and state.M.shape[1]:
        parts.append(state.M)
    mean = comm.mean(xp.concatenate(parts, axis=1) if len(parts) > 1 else X)
    xbar = mean[:d]
    drift = comm.allreduce_scalars([float(((X - xbar[None, :]) ** 2).sum())])[0] / comm.n
    for k, target in enumerate(parts):
        target[...] = mean[k * d:(k + 1) * d][None, :]
    stats = {"client_drift": drift}
    if h.name == "identity":
        return state, stats
    limit = ctx.cfg.optimizer.alpha + ctx.cfg.optimizer.eps
    if glob:
        Dnew = precond.diagonal(h, state.V[:1], 0)  # warm-started: no bias correction; same on every node
        old = state.P[:1]
        change = float(xp.sqrt(((Dnew - old) ** 2).sum() / max(1e-30, float((old ** 2).sum()))))
        state.D[...] = Dnew
        state.P[...] = Dnew
        lo, hi, med = float(Dnew.min()), float(Dnew.max()), float(xp.median(Dnew))
        clipped = float((Dnew <= limit).sum()) / d if ctx.cfg.optimizer.alpha > 0 else 0.0
    else:
        D = precond.diagonal(h, state.V, t + 1)  # each node its own
        change = float("nan")
        lo = comm.allreduce_scalars([float(D.min())], op="min")[0]
        hi = comm.allreduce_scalars([float(D.max())], op="max")[0]
        med_sum, n_clipped = comm.allreduce_scalars([float(xp.median(D, axis=1).sum()),
                                                     float((D <= limit).sum()) if ctx.cfg.optimizer.alpha > 0
                                                     else 0.0])
        med, clipped = med_sum / comm.n, n_clipped / (comm.n * d)
    stats.update({"dhat_min": lo, "dhat_max": hi, "dhat_median": med, "dhat_ratio": hi / lo if lo > 0 else np.inf,
                  "dhat_clipped": clipped, "dhat_change": change})
    return state, stats
