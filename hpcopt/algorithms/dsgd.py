"""Decentralized SGD (D-SGD / DPSGD) on a graph with mixing matrix W_t.

combine_then_adapt (default, the DPSGD form of Lian et al. 2017):
    x_i <- sum_j W_ij x_j - lr * g_i(x_i)
adapt_then_combine:
    x_i <- sum_j W_ij (x_j - lr * g_i(x_j))
With momentum mu, g_i is replaced by the node's buffer m_i = mu m_i + g_i (the buffer
is local and never mixed). In combine_then_adapt the gradient is taken at the
pre-mixing x_i, so with `algorithm.overlap` the neighbours' rows travel while the
gradient is computed. Time-varying graphs (one-peer exponential) use W_t of step t.
Models with buffers (BatchNorm running statistics at the end of each row) take the
gradient first, which updates the node's statistics, and then mix: statistics are mixed
with W like the parameters, and the overlap is off (a send buffer must not change).
"""
from __future__ import annotations

from typing import NamedTuple

from .. import models, optim
from . import batch_loss_grad, retire, spare_buffer

SHARDED = ("X", "M")


class State(NamedTuple):
    X: object  # (local_n, d) the nodes' models
    M: object  # (local_n, d) momentum buffers, or (local_n, 0)


def init(ctx, x0) -> State:
    b = ctx.backend
    L = ctx.comm.local_n
    X = b.xp.tile(b.asarray(x0)[None, :], (L, 1))
    d = X.shape[1] if optim.uses_momentum(ctx.cfg.optimizer) else 0
    return State(X, b.zeros((L, d)))


def node_params(ctx, state: State):
    return state.X


def average(ctx, state: State):
    return ctx.comm.mean(state.X)


def step(ctx, state: State, t: int, lr: float):
    W = ctx.topology.sparse(t)  # one CSR matrix per phase: comm builds its plan once per phase
    comm = ctx.comm
    opt = ctx.cfg.optimizer
    out = spare_buffer(ctx, "dsgd_spare", state.X)
    if ctx.cfg.algorithm.order.value == "adapt_then_combine":
        loss, G = batch_loss_grad(ctx, state.X, t)
        optim.apply(ctx.kernels, state.X, G, state.M, lr, opt)
        X = comm.mix(state.X, W, out=out)
    elif models.buffer_dim(ctx.model):
        # BatchNorm statistics are updated in place in state.X by the gradient pass, so it
        # runs before the mix (and never while state.X is a send buffer): the nodes then mix
        # their updated statistics with the same W as the parameters
        loss, G = batch_loss_grad(ctx, state.X, t)
        X = comm.mix(state.X, W, out=out)
        optim.apply(ctx.kernels, X, G, state.M, lr, opt)
    else:
        if ctx.cfg.algorithm.overlap:
            pending = comm.mix_begin(state.X, W)
            loss, G = batch_loss_grad(ctx, state.X, t)
            X = comm.mix_end(pending, out=out)
        else:
            X = comm.mix(state.X, W, out=out)
            loss, G = batch_loss_grad(ctx, state.X, t)
        optim.apply(ctx.kernels, X, G, state.M, lr, opt)
    retire(ctx, "dsgd_spare", state.X)
    return State(X, state.M), {"loss": loss}
