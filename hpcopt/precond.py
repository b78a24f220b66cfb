"""Diagonal scaling (preconditioning) for Local SGD, after Chezhegov et al. 2024
("Local Methods with Adaptivity via Scaling", arXiv 2406.00846).

A scaling keeps per-node moments in `Moments(m, v)`:
  v  the statistic whose EMA defines the diagonal D: g*g for `rmsprop` and `adam`,
     the Hutchinson product z*(H z) with Rademacher z for `oasis` (E[z*(Hz)] = diag H);
  m  Adam's first moment (shape (L, 0) for the others).
The step divides by the clipped diagonal D_hat = max(alpha, D) ("alpha-positivity"):
  identity  D_hat = 1                        x -= lr g
  rmsprop   D = sqrt(v)                      x -= lr g / (max(alpha, D) + eps)
  adam      D = sqrt(v / (1 - b2^k))         x -= lr (m / (1 - b1^k)) / (max(alpha, D) + eps)
  oasis     D = |v|                          x -= lr g / max(alpha, D)
with EMAs v = b2 v + (1 - b2) stat and m = b1 m + (1 - b1) g (k = number of updates).

Conventions where the paper leaves a choice (documented in the README):
* rmsprop and oasis start from a warm start, v0 = mean of `probes` statistics at x0
  (each node on its own data for local scaling, averaged over nodes for global), and use
  no bias correction. adam under local scaling starts from zero moments with the usual
  bias corrections; under global scaling its v is warm-started too (a frozen D_hat of 0
  would make the first round's steps unbounded), so only m is bias-corrected.
* Global scaling (`diagonal`): D_hat is computed from the node-averaged v at each
  synchronisation and frozen for the next round (`step_frozen`); local scaling
  (`step_local`) updates every node's own D_hat every step, with the fused kernels.
* Weight decay is coupled and means the same in both modes: the gradient the method
  sees is g' = g + wd * x, and g' (not g) enters the moments (rmsprop's and adam's v =
  EMA of g'*g', adam's m = EMA of g') and the step, exactly as the fused local kernels
  do. Global adam therefore steps x -= lr (m / (1 - b1^k)) / D_hat with the decay inside
  m (never added again after the bias correction). oasis's statistic is the Hessian of
  the loss, without the decay (model.l2 puts a penalty into the Hessian as well).
* Hutchinson probes are independent per node by default (`rademacher`, keyed by (seed,
  node, step)); with global scaling and `optimizer.shared_probes` one probe per step is
  shared by all nodes. Independent probes average n estimates in the all-reduce (their
  errors partly cancel) at no extra message cost.
All functions work in place on the rank's (L, d) blocks and return the moments, so a
checkpoint is "save the moments".
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

NAMES = ("identity", "rmsprop", "adam", "oasis")


class Hyper(NamedTuple):
    name: str = "identity"
    b1: float = 0.9  # adam: first-moment EMA weight
    b2: float = 0.999  # EMA weight of the statistic (rmsprop, adam, oasis)
    alpha: float = 0.0  # clipping: D_hat = max(alpha, D)
    eps: float = 1e-8  # added to the clipped diagonal (rmsprop, adam)
    bias_correction: bool = True  # adam


class Moments(NamedTuple):
    m: Any  # (L, d) for adam, else (L, 0)
    v: Any  # (L, d) for rmsprop / adam / oasis, else (L, 0)


def from_config(opt) -> Hyper:
    return Hyper(opt.scaling.value, opt.beta1, opt.beta2, opt.alpha, opt.eps, opt.bias_correction)


def needs_hvp(h: Hyper) -> bool:
    return h.name == "oasis"


def init(h: Hyper, backend, L: int, d: int) -> Moments:
    return Moments(backend.zeros((L, d if h.name == "adam" else 0)),
                   backend.zeros((L, d if h.name != "identity" else 0)))


def statistic(h: Hyper, g, zhz=None):
    """The quantity whose EMA is v: g*g, or z*(Hz) for oasis."""
    return zhz if h.name == "oasis" else g * g


def warm_started(h: Hyper, global_scaling: bool) -> bool:
    """Whether v starts from probes at x0 (then D_hat has no bias correction)."""
    return h.name in ("rmsprop", "oasis") or (h.name == "adam" and global_scaling)


def warm_start(h: Hyper, mom: Moments, stat, global_scaling: bool = False) -> Moments:
    """v0 = the given mean statistic where `warm_started`; otherwise zero moments stay."""
    if warm_started(h, global_scaling):
        mom.v[...] = stat
    return mom


def observe(h: Hyper, mom: Moments, g, zhz=None) -> Moments:
    """EMA updates of the moments in place (global scaling: D_hat is not touched)."""
    if h.name == "identity":
        return mom
    f = mom.v.dtype.type
    b2 = f(h.b2)
    mom.v[...] = b2 * mom.v + (f(1) - b2) * statistic(h, g, zhz)
    if h.name == "adam":
        b1 = f(h.b1)
        mom.m[...] = b1 * mom.m + (f(1) - b1) * g
    return mom


def diagonal(h: Hyper, v, count: int):
    """D_hat = clip(D) from a statistic v after `count` EMA updates (+ eps where used)."""
    xp = np if isinstance(v, np.ndarray) else __import__("cupy")
    f = v.dtype.type
    if h.name == "oasis":
        return xp.maximum(f(h.alpha), xp.abs(v))
    if h.name == "adam" and h.bias_correction and count > 0:
        v = v * f(1.0 / (1.0 - h.b2 ** count))
    return xp.maximum(f(h.alpha), xp.sqrt(v)) + f(h.eps)


def step_local(h: Hyper, kernels, x, g, mom: Moments, lr: float, count: int, wd: float = 0.0,
               zhz=None) -> Moments:
    """Local scaling: update this node's moments and step with its own D_hat (fused).

    `count` is the number of EMA updates including this one (Adam's bias correction).
    """
    if h.name == "identity":
        kernels.sgd(x, g, lr, wd)
    elif h.name == "rmsprop":
        kernels.rmsprop(x, g, mom.v, lr, h.b2, h.alpha, h.eps, wd)
    elif h.name == "adam":
        kernels.adam(x, g, mom.m, mom.v, lr, h.b1, h.b2, count, h.alpha, h.eps, wd, h.bias_correction)
    else:  # oasis
        observe(h, mom, g, zhz)
        kernels.scaled(x, g, mom.v, lr, h.alpha, wd)
    return mom


def decayed(g, x, wd: float):
    """g' = g + wd * x (coupled weight decay), in the arrays' precision; g itself if wd = 0."""
    if not wd:
        return g
    return g + x.dtype.type(wd) * x


def step_frozen(h: Hyper, kernels, x, g, mom: Moments, D, lr: float, count: int, wd: float = 0.0,
                zhz=None) -> Moments:
    """Global scaling: update the moments with g' = g + wd x, step with the frozen D_hat of
    this round (the decay enters the moments and the step once, as in `step_local`)."""
    if h.name == "identity":
        kernels.sgd(x, g, lr, wd)
        return mom
    g = decayed(g, x, wd)
    observe(h, mom, g, zhz)
    if h.name == "adam":
        bc1 = 1.0 - h.b1 ** count if h.bias_correction else 1.0
        kernels.scaled(x, mom.m, D, lr / bc1, h.alpha, 0.0)
    else:
        kernels.scaled(x, g, D, lr, h.alpha, 0.0)
    return mom


def rademacher(seed: int, nodes, step: int, d: int, dtype=np.float32) -> np.ndarray:
    """(len(nodes), d) probes of +-1 keyed by (seed, node, step) (stream 7)."""
    from .data import keyed_bits
    bits = keyed_bits(seed, nodes, step, d, stream=7) & np.uint64(1)
    return (bits.astype(dtype) * 2 - 1).astype(dtype)
