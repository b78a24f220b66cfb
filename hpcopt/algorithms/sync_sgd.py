"""Synchronous all-reduce SGD: x <- x - lr * mean_i g_i(x) (one model, replicated).

Every node computes a gradient at the shared model on its own minibatch; one
all-reduce averages them and every rank applies the same update, so all replicas stay
bit-identical.

Noise baseline (Zhang et al. 2021: "SSGD + matched isotropic noise"): with
`algorithm.noise` the averaged gradient gets xi = sigma * z / sqrt(d), z ~ N(0, I) drawn
from (seed, step) (the same on every rank), so E||xi||^2 = sigma^2. sigma is
`algorithm.noise_std` (fixed) or, for matched, the grad_deviation a DPSGD run measured
at that step (interpolated between its diagnostic steps), i.e. the size of the extra
term decentralization adds to the average model's step.

BatchNorm models: each node updates the running statistics of its copy of x on its own
batch; the one model keeps their mean (carried in the same all-reduce as the gradient).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import models, optim
from ..data import step_rng

SHARDED: tuple = ()


class State(NamedTuple):
    x: object  # (d,) the model
    m: object  # (d,) momentum buffer, or (0,) without momentum


def init(ctx, x0) -> State:
    b = ctx.backend
    x = b.asarray(x0).copy()
    m = b.zeros(x.shape if optim.uses_momentum(ctx.cfg.optimizer) else (0,))
    return State(x, m)


def node_params(ctx, state: State):
    return ctx.backend.xp.broadcast_to(state.x, (ctx.comm.local_n, state.x.shape[0]))


def average(ctx, state: State):
    return state.x.copy()


def step(ctx, state: State, t: int, lr: float):
    A, y, w = ctx.data.batch(t)
    nb = models.buffer_dim(ctx.model)
    X = ctx.backend.xp.tile(state.x[None, :], (ctx.comm.local_n, 1)) if nb else node_params(ctx, state)
    loss, G = ctx.model.loss_grad(X, A, y, w)
    if nb:  # the nodes' updated BatchNorm statistics ride in the gradient's (zero) buffer block
        G[:, -nb:] = X[:, -nb:]
    g = ctx.comm.mean(G)
    if nb:  # the one model keeps the mean of the nodes' statistics
        state.x[-nb:] = g[-nb:]
        g[-nb:] = 0
    sigma = noise_std(ctx, t)
    if sigma > 0:
        z = step_rng(ctx.cfg.run.seed, t, 19).standard_normal(g.shape[0])
        g += ctx.backend.asarray((sigma / np.sqrt(g.shape[0]) * z).astype(np.float32))
    optim.apply(ctx.kernels, state.x, g, state.m, lr, ctx.cfg.optimizer)
    return state, {"loss": loss}


def noise_std(ctx, t: int) -> float:
    kind = ctx.cfg.algorithm.noise.value
    if kind == "fixed":
        return ctx.cfg.algorithm.noise_std
    if kind == "matched":
        steps, values = ctx.workspace["noise_schedule"]
        return float(np.interp(t, steps, values))
    return 0.0
