"""Local SGD with diagonal scaling (Chezhegov et al. 2024, arXiv 2406.00846).

Every node takes H = `algorithm.local_steps` steps on its own data, then all nodes
average their parameters (one all-reduce). With `algorithm.local_steps_final` H grows
linearly over the run (each round keeps the H it started with; see `round_ends`).
Steps are divided by a clipped diagonal D_hat (see hpcopt.precond):
* `algorithm.scaling: global` (the analysed form): each node updates its moments every
  step, but the step uses D_hat frozen for the round; at synchronisation the statistic
  is averaged across nodes in the same all-reduce as the parameters (one buffer) and
  D_hat is recomputed, identical on every node. Adam's first moment is averaged too.
* `algorithm.scaling: local`: every node updates its own D_hat every step (fused
  kernels); at synchronisation the moments are averaged (`sync_moments: average`) or
  kept local (`keep`).
With H = 1 and identity scaling this is synchronous SGD (tested).

Weight decay is coupled, g' = g + wd x, and means the same under both scalings: g'
enters the moments and the step (hpcopt.precond), the warm-start statistics included.
OASIS's Hutchinson probes are independent per node (keyed by seed, node and step, so
rank-count invariant) unless `optimizer.shared_probes` shares one per step (global
scaling only).

Statistics at synchronisation (recorded per round in run.h5, NaN between rounds):
dhat_min / dhat_median / dhat_max, dhat_ratio (max / min, the paper's Gamma / alpha),
dhat_clipped (fraction of coordinates at alpha), dhat_change (relative change of D_hat
since the last round), client_drift (mean_i ||x_i - x_bar||^2 just before averaging),
rounds, gradient_evals (cumulative, all nodes, warm-start probes included, in units of
one minibatch gradient: a Hessian-vector product counts `hvp_cost` gradients, 1 for the
linear models' exact product, 2 for the MLP's central difference and for the torch
models' forward-over-reverse product).

Landscape diagnostics (hpcopt.metrics) at a step that averaged measure the nodes'
models as they were before the average (`diagnostic_view`): measured after it they
would be trivial (weight variance ~0, alpha_ratio exactly 1). Only those steps keep a
copy of the rows, and only when diagnostics are due there.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import models, optim, precond
from . import batch_loss_grad
from ..data import step_rng
from ..metrics import sq_dist_sum

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


def round_ends(h0: int, h1: int, total: int) -> np.ndarray:
    """Steps after which the nodes synchronise: H constant (h1 = 0) or growing linearly
    from h0 at step 0 to h1 at the last step (each round's H fixed at its start)."""
    if h1 <= 0:
        return np.arange(h0, total + h0, h0)
    ends, t = [], 0
    while t < total:
        t += max(1, int(round(h0 + (h1 - h0) * t / max(1, total))))
        ends.append(t)
    return np.asarray(ends)


def _sync_round(ctx, t: int) -> int:
    """Round number (1-based) if step t ends a round, else 0 (pure in t; cached)."""
    a = ctx.cfg.algorithm
    key = ("local_sgd_rounds", a.local_steps, a.local_steps_final, ctx.cfg.run.steps)
    ends = ctx.workspace.get(key)
    if ends is None:
        ends = round_ends(a.local_steps, a.local_steps_final, ctx.cfg.run.steps)
        ctx.workspace[key] = ends
    i = int(np.searchsorted(ends, t + 1))
    return i + 1 if i < len(ends) and ends[i] == t + 1 else 0


def _hyper(ctx) -> precond.Hyper:
    return precond.from_config(ctx.cfg.optimizer)


def hvp_cost(model) -> int:
    """Minibatch gradients one Hessian-vector product costs: 1 for the linear models'
    exact product, 2 for the MLP (central difference of two gradients) and the torch
    models (forward-over-reverse, about two gradients)."""
    return 1 if getattr(model, "kind", "") in ("quadratic", "logistic", "softmax") else 2


def _shared_probes(ctx, glob: bool) -> bool:
    return glob and ctx.cfg.optimizer.shared_probes


def _probes(ctx, X, t: int, A, y, w, shared: bool, first_row: int = 0):
    """z * (H z) per node with Rademacher z: one z per node keyed by (seed, node, t), or
    (shared) one z for all nodes keyed by (seed, t)."""
    L, d = X.shape
    seed = ctx.cfg.run.seed
    if shared:
        z = np.broadcast_to(step_rng(seed, t, 11).choice(np.array([-1.0, 1.0], np.float32), d), (L, d))
    else:
        first = ctx.comm.lo + first_row
        z = precond.rademacher(seed, range(first, first + L), t, d)
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
        wd = ctx.cfg.optimizer.weight_decay
        for k in range(probes):
            A, y, w = ctx.data.batch(k, stream=PROBE_STREAM)
            with models.frozen(ctx.model):  # probes at x0 leave BatchNorm statistics as initialised
                if h.name == "oasis":  # the statistic is z * (H z) alone: no gradient needed
                    G, zhz = None, _probes(ctx, X, WARM_START_STEP + k, A, y, w, _shared_probes(ctx, glob))
                else:  # the gradient the method steps with: g' = g + wd x0 (coupled decay)
                    G, zhz = precond.decayed(ctx.model.loss_grad(X, A, y, w)[1], X, wd), None
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


CHUNK_FLOATS = 1 << 20  # rows per local step are processed in blocks of about this many floats


def step(ctx, state: State, t: int, lr: float):
    """H local steps happen one per call; every H-th call also synchronises.

    The local step runs over blocks of rows (about CHUNK_FLOATS parameters each), so the
    minibatch and gradient buffers stay small next to the state; every node's draws and
    arithmetic are the same whatever the blocking.
    """
    h = _hyper(ctx)
    cfg = ctx.cfg
    glob = cfg.algorithm.scaling.value == "global"
    L, d = state.X.shape
    rows = max(1, CHUNK_FLOATS // max(1, d))
    loss = ctx.backend.empty((L,))
    for lo in range(0, L, rows):
        hi = min(L, lo + rows)
        loss[lo:hi] = _local_step(ctx, state, h, glob, t, lr, lo, hi)
    stats = {"loss": loss}
    r = _sync_round(ctx, t)
    if r:
        every = cfg.diagnostics.every
        if every and (t + 1) % every == 0:  # the diagnostics of this step measure the rows before the average
            ctx.workspace[DIAG_KEY] = (t + 1, state.X.copy())
        state, round_stats = synchronise(ctx, state, h, glob, t)
        stats.update(round_stats)
        stats["rounds"] = r
    stats["gradient_evals"] = float(ctx.comm.n * gradient_evals(ctx, h, glob, t + 1))
    return state, stats


def gradient_evals(ctx, h: precond.Hyper, glob: bool, steps: int) -> int:
    """Minibatch-gradient equivalents one node has spent after `steps` steps, warm start
    included: a step is one gradient plus (oasis) one Hessian-vector product; a warm-start
    probe is one gradient (rmsprop, adam) or one Hessian-vector product (oasis)."""
    hvp = hvp_cost(ctx.model) if precond.needs_hvp(h) else 0
    probe = (hvp if h.name == "oasis" else 1) if precond.warm_started(h, glob) else 0
    return steps * (1 + hvp) + ctx.cfg.optimizer.probes * probe


DIAG_KEY = "local_sgd_pre_average"


def diagnostic_view(ctx, state: State, step: int):
    """(rows, average) the diagnostics measure at `step` (the count of steps done): at a
    step that averaged, the nodes' models just before the average and the average they
    were replaced by; otherwise None (the current rows, as for every method)."""
    kept = ctx.workspace.pop(DIAG_KEY, None)
    if kept is None or kept[0] != step:
        return None
    return kept[1], state.X[0].copy()  # after the average every row holds the mean


def _local_step(ctx, state: State, h: precond.Hyper, glob: bool, t: int, lr: float, lo: int, hi: int):
    cfg = ctx.cfg
    X = state.X[lo:hi]
    if precond.needs_hvp(h):  # the probes need the batch itself
        A, y, w = ctx.data.batch(t, rows=np.arange(lo, hi)) if hi - lo < state.X.shape[0] else ctx.data.batch(t)
        loss, G = ctx.model.loss_grad(X, A, y, w)
        zhz = _probes(ctx, X, t, A, y, w, _shared_probes(ctx, glob), lo)
    else:
        loss, G = batch_loss_grad(ctx, X, t, lo, hi)
        zhz = None
    mom = precond.Moments(state.M[lo:hi] if h.name == "adam" else state.M[lo:hi, :0], state.V[lo:hi])
    wd = cfg.optimizer.weight_decay
    if h.name == "identity":
        optim.apply(ctx.kernels, X, G, state.M[lo:hi], lr, cfg.optimizer)
    elif glob:
        precond.step_frozen(h, ctx.kernels, X, G, mom, state.D[lo:hi], lr, t + 1, wd, zhz)
    else:
        precond.step_local(h, ctx.kernels, X, G, mom, lr, t + 1, wd, zhz)
    return loss


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
    mean = comm.mean_many(parts)  # one all-reduce, no packed copy of the blocks
    xbar = mean[:d]
    drift = comm.allreduce_scalars([sq_dist_sum(X, xbar)])[0] / comm.n
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
    else:  # each node its own D_hat, summarised block by block (no (L, d) temporaries)
        change = float("nan")
        mins, maxs, med_sum, n_clipped = [np.inf], [-np.inf], 0.0, 0.0
        rows = max(1, CHUNK_FLOATS // max(1, d))
        for a in range(0, X.shape[0], rows):
            D = precond.diagonal(h, state.V[a:a + rows], t + 1)
            mins.append(float(D.min()))
            maxs.append(float(D.max()))
            med_sum += float(xp.median(D, axis=1).sum())
            n_clipped += float((D <= limit).sum()) if ctx.cfg.optimizer.alpha > 0 else 0.0
        lo = comm.allreduce_scalars([min(mins)], op="min")[0]
        hi = comm.allreduce_scalars([max(maxs)], op="max")[0]
        med_sum, n_clipped = comm.allreduce_scalars([med_sum, n_clipped])
        med, clipped = med_sum / comm.n, n_clipped / (comm.n * d)
    stats.update({"dhat_min": lo, "dhat_max": hi, "dhat_median": med, "dhat_ratio": hi / lo if lo > 0 else np.inf,
                  "dhat_clipped": clipped, "dhat_change": change})
    return state, stats
