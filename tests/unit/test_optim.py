import math

import pytest

from hpcopt import config, optim


def opt(**kw):
    return config.from_dict({"optimizer": kw}).optimizer


def test_schedules():
    assert optim.lr_at(opt(lr=0.5), 123, 1000) == 0.5
    o = opt(lr=1.0, schedule="step", milestones=[10, 20], gamma=0.5)
    assert [optim.lr_at(o, t, 100) for t in (0, 9, 10, 19, 20, 99)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    o = opt(lr=1.0, schedule="cosine", min_lr=0.1)
    assert optim.lr_at(o, 0, 100) == pytest.approx(1.0)
    assert optim.lr_at(o, 50, 100) == pytest.approx(0.55)
    assert optim.lr_at(o, 100, 100) == pytest.approx(0.1)
    o = opt(lr=1.0, schedule="inverse", decay=10)
    assert optim.lr_at(o, 30, 100) == pytest.approx(0.25)
    o = opt(lr=1.0, warmup_steps=4)
    assert [optim.lr_at(o, t, 100) for t in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert math.isfinite(optim.lr_at(opt(lr=1.0, schedule="cosine"), 10**6, 100))
