"""One module per method family.

Each module defines
  State                  a NamedTuple of arrays (a checkpoint saves exactly these);
  SHARDED                names of State fields with the node axis first (others are
                         replicated on every rank);
  init(ctx, x0) -> State
  step(ctx, state, t, lr) -> (State, stats)   stats["loss"]: local nodes' batch losses;
  node_params(ctx, state) -> (local_n, d) array of the nodes' models;
  average(ctx, state) -> (d,) average model (a collective: every rank calls it);
  METRICS (optional)     names of scalar stats a step may return besides "loss" (the same
                         value on every rank); run.h5 gets one column each, NaN where a
                         step did not report it (e.g. per-round statistics).
Algorithms compute and communicate through `ctx.comm`; they never print or open files.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import numpy as np


class Context(NamedTuple):
    cfg: Any  # Config
    comm: Any  # comm.Comm
    backend: Any  # backend.Backend
    kernels: Any  # kernels.Kernels
    model: Any
    data: Any  # data.NodeData
    topology: Any  # topology.Topology or None
    workspace: dict  # scratch buffers an algorithm reuses across steps (never checkpointed)


def spare_buffer(ctx, key: str, X):
    """A buffer shaped like X for the next mixed parameters: the previous step's X, which
    nothing needs once the mix has read it (see `retire`)."""
    buf = ctx.workspace.get(key)
    if buf is None or buf.shape != X.shape or buf is X:
        buf = ctx.backend.empty(X.shape)
    return buf


def batch_loss_grad(ctx, X, t: int, lo: int = 0, hi: Optional[int] = None):
    """(loss, G) of the models X of the local rows lo:hi (all by default) on their
    minibatches of step t: one fused pass for the linear models where the sampler allows
    it (NodeData.linear_loss_grad), else the gathered batch through the model."""
    fused = ctx.data.linear_loss_grad(ctx.model, X, t, lo, hi)
    if fused is not None:
        return fused
    L = ctx.comm.local_n
    A, y, w = ctx.data.batch(t) if lo == 0 and hi in (None, L) else ctx.data.batch(t, rows=np.arange(lo, hi))
    return ctx.model.loss_grad(X, A, y, w)


def retire(ctx, key: str, X) -> None:
    """Hand X back as the next step's spare buffer."""
    ctx.workspace[key] = X


# the modules import the helpers above, so they load after them
from . import dsgd, hybrid, local_sgd, sync_sgd, teleport  # noqa: E402

REGISTRY = {"sync_sgd": sync_sgd, "dsgd": dsgd, "local_sgd": local_sgd, "teleport": teleport, "hybrid": hybrid}


def get(name: str):
    return REGISTRY[name]
