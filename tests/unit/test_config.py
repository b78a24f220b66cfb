import dataclasses
import re

import pytest

from hpcopt import config
from hpcopt.config import ConfigError
from tests.helpers import REPO


def test_defaults_are_valid_and_frozen():
    cfg = config.from_dict({})
    assert cfg.optimizer.lr > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optimizer.lr = 1.0


def test_types_are_coerced_and_enums_parsed():
    cfg = config.from_dict({"optimizer": {"lr": "1e-3", "milestones": 5}, "device": {"cuda_aware": True},
                            "topology": {"name": "torus"}, "model": {"hidden": [32, 16]}})
    assert cfg.optimizer.lr == 1e-3
    assert cfg.optimizer.milestones == (5,)
    assert cfg.device.cuda_aware is config.Tristate.yes
    assert cfg.topology.name is config.TopologyName.torus
    assert cfg.model.hidden == (32, 16)


@pytest.mark.parametrize("data, key", [
    ({"optimizer": {"lr": 0}}, "optimizer.lr"),
    ({"optimizer": {"lr": True}}, "optimizer.lr"),
    ({"run": {"steps": 2.5}}, "run.steps"),
    ({"nodes": {"n": "four"}}, "nodes.n"),
    ({"topology": {"name": "grid"}}, "topology.name"),
    ({"bogus": {}}, "bogus"),
    ({"data": {"alpha": -1}}, "data.alpha"),
    ({"optimizer": {"lr": float("nan")}}, "optimizer.lr"),
    ({"nodes": {"n": 6}, "topology": {"name": "hypercube"}}, "topology.name"),
])
def test_errors_name_the_key_in_one_line(data, key):
    with pytest.raises(ConfigError) as info:
        config.from_dict(data)
    msg = str(info.value)
    assert msg.startswith(key) and "\n" not in msg


def test_overrides_apply_dotted_keys_and_reject_malformed():
    data = config.apply_overrides({"optimizer": {"lr": 0.1}}, ["optimizer.lr=0.05", "topology.name=star"])
    cfg = config.from_dict(data)
    assert cfg.optimizer.lr == 0.05 and cfg.topology.name.value == "star"
    for bad in ["optimizer.lr", "lr=3", "a.b.c=1"]:
        with pytest.raises(ConfigError):
            config.apply_overrides({}, [bad])


def test_round_trip_through_yaml():
    cfg = config.from_dict({"optimizer": {"lr": 0.3, "milestones": [10, 20]}, "run": {"name": "x"}})
    again = config.from_dict(__import__("yaml").safe_load(config.to_yaml(cfg)))
    assert again == cfg


def test_readme_documents_every_key():
    readme = (REPO / "README.md").read_text()
    missing = [key for key, *_ in config.reference() if not re.search(r"`" + re.escape(key) + r"`", readme)]
    assert not missing, f"README lacks config keys: {missing}"
    assert config.reference_markdown() in readme, "README table is stale: paste `hpcopt config --reference`"
