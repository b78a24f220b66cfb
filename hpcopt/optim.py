"""Step-size schedules and the SGD / momentum update, as pure functions of the step.

Schedules (t counts from 0, T = run.steps):
  constant  lr
  step      lr * gamma ** (number of milestones <= t)
  cosine    min_lr + (lr - min_lr) * (1 + cos(pi t / T)) / 2
  inverse   lr / (1 + t / decay)
Warm-up multiplies any of them by (t + 1) / warmup_steps while t < warmup_steps.

The update goes through the fused kernels: x -= lr (g + wd x) without momentum;
with momentum mu, m = mu m + (g + wd x) and x -= lr m (heavy ball) or
x -= lr (g + wd x + mu m) (Nesterov).
"""
from __future__ import annotations

import bisect
import math


def lr_at(opt, t: int, total_steps: int) -> float:
    base = opt.lr
    kind = opt.schedule.value
    if kind == "step":
        lr = base * opt.gamma ** bisect.bisect_right(list(opt.milestones), t)
    elif kind == "cosine":
        frac = min(1.0, t / max(1, total_steps))
        lr = opt.min_lr + (base - opt.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))
    elif kind == "inverse":
        lr = base / (1.0 + t / opt.decay)
    else:
        lr = base
    if t < opt.warmup_steps:
        lr *= (t + 1) / opt.warmup_steps
    return lr


def uses_momentum(opt) -> bool:
    return opt.momentum > 0


def apply(kernels, x, g, m, lr: float, opt) -> None:
    """In-place step of x (any shape, C-contiguous float32) with gradient g."""
    if opt.momentum > 0:
        kernels.momentum(x, g, m, lr, opt.momentum, opt.weight_decay, opt.nesterov)
    else:
        kernels.sgd(x, g, lr, opt.weight_decay)
