"""Teleportation's k search selects on a validation split carved from the training data."""
import numpy as np
import pytest

from hpcopt import config, data
from hpcopt.algorithms import teleport
from hpcopt.config import ConfigError


def setup(**data_keys):
    cfg = config.from_dict({"nodes": {"n": 16}, "algorithm": {"name": "teleport", "k": "auto"},
                            "data": {"partition": "dirichlet", "alpha": 0.5, **data_keys}})
    ds = data.load(cfg.data, 16)
    parts = data.partition(ds, 16, "dirichlet", cfg.data.alpha, seed=cfg.data.seed)
    return cfg, ds, parts


def test_carve_takes_floor_of_each_nodes_share_and_keeps_one_sample():
    parts = [np.arange(0, 10), np.arange(10, 13), np.arange(13, 14), np.arange(14, 64)]
    train, val = teleport.carve(parts, 0.25, seed=3)
    assert [len(p) for p in train] == [8, 3, 1, 38]  # floor(2.5), floor(0.75), at most m - 1, floor(12.5)
    assert len(val) == 2 + 0 + 0 + 12
    for p, t in zip(parts, train):
        assert set(t) <= set(p)
    assert sorted(np.concatenate(train).tolist() + val.tolist()) == list(range(64))  # disjoint, nothing lost
    again = teleport.carve(parts, 0.25, seed=3)
    assert np.array_equal(again[1], val) and all(np.array_equal(a, b) for a, b in zip(again[0], train))
    assert not np.array_equal(teleport.carve(parts, 0.25, seed=4)[1], val)


def test_validation_split_comes_from_the_training_data_and_leaves_the_test_split_alone():
    cfg, ds, parts = setup(val_fraction=0.1)
    train, val = teleport.validation_split(cfg, ds, parts)
    assert isinstance(val, teleport.Validation) and val.from_train
    expected = sum(min(int(0.1 * len(p)), len(p) - 1) for p in parts)
    assert val.samples == expected == len(val.y) > 0
    carved = sorted(set(np.concatenate(parts).tolist()) - set(np.concatenate(train).tolist()))
    assert np.array_equal(val.X, ds.X_train[carved]) and np.array_equal(val.y, ds.y_train[carved])
    # other methods and fixed k: no split, the nodes keep all their samples
    for other in ({"name": "teleport", "k": 4}, {"name": "dsgd"}):
        c = config.from_dict({"nodes": {"n": 16}, "algorithm": other})
        same, none = teleport.validation_split(c, ds, parts)
        assert none is None and same is parts


def test_k_auto_needs_a_validation_fraction():
    with pytest.raises(ConfigError, match="data.val_fraction"):
        config.from_dict({"nodes": {"n": 16}, "algorithm": {"name": "teleport", "k": "auto"},
                          "data": {"val_fraction": 0.0}})
    config.from_dict({"nodes": {"n": 16}, "algorithm": {"name": "teleport", "k": 4}, "data": {"val_fraction": 0.0}})
    cfg, ds, parts = setup(val_fraction=0.01)
    tiny = [p[:5] for p in parts]  # floor(0.01 * 5) = 0 everywhere
    with pytest.raises(ConfigError, match="carves no validation sample"):
        teleport.validation_split(cfg, ds, tiny)
