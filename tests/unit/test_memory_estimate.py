"""The per-rank memory estimate runner.setup makes before the big allocations: its terms
match what the run builds, and a run that cannot fit is refused with one line naming the
key, before anything is allocated or written."""
import os
import subprocess
import sys

import numpy as np
import pytest

from hpcopt import config, data, models, runner
from tests.helpers import REPO, check, env, run_cli

QUICK = str(REPO / "configs" / "quickstart.yaml")
SMALL = {"run": {"steps": 3, "log_every": 1, "eval_every": 0, "progress": False}, "nodes": {"n": 2},
         "data": {"dataset": "quadratic", "dim": 4, "samples_per_node": 8}}


def cfg_of(**sections):
    tree = {k: dict(v) for k, v in SMALL.items()}
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return config.from_dict(tree)


@pytest.mark.parametrize("data_cfg", [{"dataset": "quadratic", "samples_per_node": 7, "test_fraction": 0.3},
                                      {"dataset": "classification", "samples_per_node": 13, "classes": 3,
                                       "test_fraction": 0.25, "dim": 5}], ids=["quadratic", "classification"])
def test_generated_data_shape_is_known_before_the_data_are_made(data_cfg):
    cfg = cfg_of(data=data_cfg, nodes={"n": 6})
    ds = data.load(cfg.data, 6)
    assert runner.data_shape(cfg) == runner.data_shape(cfg, ds) == (len(ds.X_train), len(ds.X_test),
                                                                    ds.features, ds.classes)
    assert runner.data_shape(config.from_dict({})) is None  # digits: known once read


@pytest.mark.parametrize("model", [{"name": "auto"}, {"name": "logistic"}, {"name": "softmax"},
                                   {"name": "mlp", "hidden": [7, 5]}, {"name": "torch_mlp", "hidden": [6]}],
                         ids=lambda m: m["name"])
def test_model_dim_without_building_is_the_built_models(model):
    if model["name"] == "torch_mlp":
        pytest.importorskip("torch")
    cfg = cfg_of(data={"dataset": "classification", "classes": 3 if model["name"] != "logistic" else 2},
                 model=model)
    ds = data.load(cfg.data, 2)
    assert runner._model_dim(cfg, ds.features, ds.classes) == models.build(cfg.model, ds, threads=1).d


def test_terms_and_the_key_they_blame():
    cfg = cfg_of(nodes={"n": 10 ** 9})
    terms = {what: (b, factors) for what, b, factors in runner.memory_terms(cfg, 10 ** 9, 3, runner.data_shape(cfg), 4)}
    assert set(terms) == {"state", "data", "minibatch", "evaluation", "topology"}
    # a ring's CSR: 3 nonzeros per row (16 bytes each: value and column) plus a row pointer
    assert terms["topology"][0] == (16.0 * 3 + 8) * 1e9 and terms["state"][0] == 4.0 * 1e9 * 4 * 3
    assert terms["minibatch"][0] == 4.0 * 1e9 * 32 * 4  # nodes x batch x features x 4 bytes
    one_peer = cfg_of(nodes={"n": 1000}, topology={"name": "one_peer_exponential"})
    terms = dict((w, b) for w, b, _ in runner.memory_terms(one_peer, 500, 3, None, None))
    assert terms["topology"] == (16.0 * 2 + 8) * 1000 * 10  # 2 nonzeros per row, 10 phases
    sync = cfg_of(algorithm={"name": "sync_sgd"})
    assert "topology" not in [w for w, _, _ in runner.memory_terms(sync, 2, 3, None, None)]


def test_available_memory_is_the_hosts_share_or_the_address_space_limit():
    one, why = runner.available_memory(1)
    two, _ = runner.available_memory(2)
    if not os.path.exists("/proc/meminfo"):
        pytest.skip("no /proc/meminfo")
    assert 0 < two <= one < np.inf and why


@pytest.mark.parametrize("override, message", [
    ("nodes.n=1000000000", "nodes.n = 1000000000 is not allowed: this run needs about"),
    ("data.batch_size=1000000000000", "data.batch_size = 1000000000000 is not allowed"),
    ("data.samples_per_node=1000000000000", "data.samples_per_node = 1000000000000 is not allowed"),
    ("nodes.n=100000 topology.name=complete", "nodes.n = 100000 is not allowed"),
], ids=["nodes-dsgd", "batch", "samples", "nodes-complete-graph"])
def test_a_run_that_cannot_fit_is_refused_before_anything_is_made(tmp_path, override, message):
    (tmp_path / "c.yaml").write_text("run: {steps: 3, progress: false}\nnodes: {n: 2}\n"
                                     "data: {dataset: quadratic, dim: 4, samples_per_node: 8}\n")
    sets = [a for o in override.split() for a in ("--set", o)]
    proc = run_cli(["run", "c.yaml", "--out", "out", *sets], cwd=tmp_path, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert message in lines[0] and " per rank (state " in lines[0] and "available (" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra", [
    ["--set", "model.name=mlp", "--set", "model.hidden=[100000000]"],
    ["--set", "model.name=torch_mlp", "--set", "model.hidden=[100000000]"],
], ids=["mlp", "torch_mlp"])
def test_huge_hidden_layer_is_refused_before_the_model_is_built(tmp_path, extra):
    if "model.name=torch_mlp" in extra:
        pytest.importorskip("torch")
    # under a 4 GiB address-space limit (64 x 1e8 float32 weights are 24 GiB): a model
    # built before the check fails with MemoryError, not this line
    limited = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30)); "
               "sys.argv[0] = 'hpcopt'; runpy.run_module('hpcopt', run_name='__main__', alter_sys=True)")
    proc = subprocess.run([sys.executable, "-c", limited, "run", QUICK, "--out", str(tmp_path / "out"), *extra],
                          env=env(), capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "model.hidden = [100000000] is not allowed: this run needs about" in lines[0]
    assert not (tmp_path / "out").exists()


def test_header_line_reports_the_estimate(tmp_path):
    proc = check(run_cli(["run", QUICK, "--out", tmp_path / "out", "--set", "run.steps=2"]))
    assert "memory ~" in proc.stdout and " per rank, device " in proc.stdout
