"""Synchronous all-reduce SGD: x <- x - lr * mean_i g_i(x) (one model, replicated).

Every node computes a gradient at the shared model on its own minibatch; one
all-reduce averages them and every rank applies the same update, so all replicas stay
bit-identical.
"""
from __future__ import annotations

from typing import NamedTuple

from .. import optim

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
    loss, G = ctx.model.loss_grad(node_params(ctx, state), A, y, w)
    g = ctx.comm.mean(G)
    optim.apply(ctx.kernels, state.x, g, state.m, lr, ctx.cfg.optimizer)
    return state, {"loss": loss}
