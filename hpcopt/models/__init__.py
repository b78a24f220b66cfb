"""Flat-parameter models batched over a rank's nodes: one registry, two backends.

Every model has the same surface, so the algorithms, the diagnostics and checkpoints
never ask which backend computes:

  d                          length of one node's row (parameters, then any buffers)
  kind                       name recorded in run.h5
  init(seed) -> (d,)         initial row, the same for every node
  loss_grad(X, A, y, w)      per-node loss (L,) and gradient (L, d) for the rows X (L, d)
  loss(X, A, y, w), accuracy(X, A, y), hvp(X, V, A, y, w)

`A` is per-node data (L, B, f) with weights w (L, B) summing to 1 per node, or shared
data (B, f) for evaluation. Backends:

  numpy_models   quadratic, logistic, softmax, mlp (NumPy / CuPy, exact gradients)
  torch_backend  torch_mlp, cnn, lenet, vgg11, resnet20 (nets.py) and user factories
                 (`model.name: torch`, `model.factory`), evaluated by torch.func on the
                 rows hpcopt owns
"""
from __future__ import annotations

import contextlib

from ..config import TORCH_MODELS, ConfigError
from .numpy_models import MLP, LinearModel, least_squares_optimum

__all__ = ["MLP", "LinearModel", "least_squares_optimum", "build", "frozen", "buffer_dim", "NUMPY_MODELS",
           "TORCH_MODELS"]

NUMPY_MODELS = ("quadratic", "logistic", "softmax", "mlp")


def _numpy_model(name: str, cfg, ds):
    if ds.classes == 0 and name != "quadratic":
        raise ConfigError(f"model.name = {name!r} is not allowed: data set {ds.name} is a regression "
                          f"task; use quadratic (least squares) or auto")
    if ds.classes and name == "quadratic":
        raise ConfigError(f"model.name = 'quadratic' is not allowed: data set {ds.name} has class "
                          f"labels; use logistic, softmax, mlp or auto")
    if name == "logistic" and ds.classes != 2:
        raise ConfigError(f"model.name = 'logistic' is not allowed: data set {ds.name} has "
                          f"{ds.classes} classes; use softmax or mlp")
    if name == "mlp":
        return MLP(ds.features, cfg.hidden, ds.classes, cfg.activation.value, cfg.l2, cfg.init_scale)
    return LinearModel(name, ds.features, ds.classes, cfg.l2)


def build(cfg, ds, backend=None, threads: int = 0, log=None):
    """Model for a ModelCfg and a data set; mismatches are one-line ConfigErrors.

    `backend` (backend.Backend) places torch models on the rank's device; `threads` is
    the per-rank thread count torch uses on the CPU; `log(text)` receives one-line notes
    (e.g. why vmap fell back to the loop).
    """
    name = cfg.name.value
    if name == "auto":
        name = "quadratic" if ds.classes == 0 else ("logistic" if ds.classes == 2 else "softmax")
    if name in NUMPY_MODELS:
        return _numpy_model(name, cfg, ds)
    if name in TORCH_MODELS:
        from . import torch_backend
        return torch_backend.build(name, cfg, ds, backend=backend, threads=threads, log=log)
    raise ConfigError(f"model.name = {name!r} is not allowed: choose one of "
                      f"{', '.join(NUMPY_MODELS + TORCH_MODELS)}")


def buffer_dim(model) -> int:
    """Length of the block at the end of each row that holds buffers (BatchNorm running
    statistics), not parameters; 0 for models without buffers."""
    return int(getattr(model, "buffer_dim", 0))


def frozen(model):
    """Context in which `loss_grad` updates no buffers (diagnostics, warm-start probes)."""
    return model.frozen_buffers() if buffer_dim(model) else contextlib.nullcontext()
