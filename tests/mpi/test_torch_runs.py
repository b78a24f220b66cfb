"""Neural networks end to end under mpiexec: every method trains LeNet, rank-count
invariance and resume with the torch backend, BatchNorm statistics through checkpoints and
averages, export to safetensors, a user factory from a file."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from hpcopt import config, data, models, store
from hpcopt.models import nets, torch_backend
from tests.helpers import check, run_cli, run_hpcopt_mpi

LENET = {
    "run": {"steps": 40, "eval_every": 0, "log_every": 10},
    "nodes": {"n": 8},
    "data": {"dataset": "mnist", "partition": "dirichlet", "alpha": 0.5, "batch_size": 16, "test_fraction": 0.1},
    "model": {"name": "lenet", "threads": 1},
    "algorithm": {"name": "dsgd"},
    "optimizer": {"lr": 0.05, "momentum": 0.9},
    "topology": {"name": "ring"},
}


def write_config(tmp_path, base, name="c.yaml", **sections):
    cfg = {k: dict(v) for k, v in base.items()}
    for sec, keys in sections.items():
        cfg.setdefault(sec, {}).update(keys)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def rows(run_dir, field="X"):
    info, _ = store.latest(str(run_dir))
    sharded = [] if field in ("x", "theta") else [field]
    st = store.read_state(str(run_dir), info, 0, info["nodes"], sharded, [field] if not sharded else [])
    return info, st[field]


def initial_accuracy(path) -> float:
    cfg = config.load(str(path))
    ds = data.load(cfg.data, cfg.nodes.n)
    m = models.build(cfg.model, ds, threads=1)
    return float(m.accuracy(m.init(cfg.run.seed)[None, :], ds.X_test, ds.y_test)[0])


# every method family (Local SGD with each scaling, global and local) trains LeNet
METHODS = [
    ("sync_sgd", {"algorithm": {"name": "sync_sgd"}}),
    ("dsgd", {}),
    ("local_sgd-identity", {"algorithm": {"name": "local_sgd", "local_steps": 4}}),
    ("local_sgd-rmsprop-local", {"algorithm": {"name": "local_sgd", "local_steps": 4, "scaling": "local"},
                                 "optimizer": {"lr": 0.002, "momentum": 0.0, "scaling": "rmsprop", "alpha": 1e-3,
                                               "probes": 2}}),
    ("local_sgd-adam-global", {"algorithm": {"name": "local_sgd", "local_steps": 4},
                               "optimizer": {"lr": 0.002, "momentum": 0.0, "scaling": "adam", "alpha": 1e-3,
                                             "probes": 2}}),
    ("local_sgd-oasis-global", {"algorithm": {"name": "local_sgd", "local_steps": 4},
                                "optimizer": {"lr": 0.02, "momentum": 0.0, "scaling": "oasis", "alpha": 0.1,
                                              "probes": 2}}),
    ("hybrid", {"algorithm": {"name": "hybrid", "budget_gradients": 320, "k_every": 40, "delay_std": 0.05,
                              "time_grid": 0.5}, "optimizer": {"momentum": 0.0}}),
    ("teleport", {"algorithm": {"name": "teleport", "k": 2}, "optimizer": {"lr": 0.15, "momentum": 0.0}}),
]


@pytest.mark.parametrize("label,sections", METHODS, ids=[m[0] for m in METHODS])
def test_every_method_trains_lenet(tmp_path, label, sections):
    path = write_config(tmp_path, LENET, **{"nodes": {"n": 4}, **sections})  # 2 ranks x 2 nodes
    check(run_hpcopt_mpi(2, ["run", path, "--out", tmp_path / "run"], timeout=300))
    run = store.read_run(str(tmp_path / "run"))
    acc = float(run["summary"]["final_test_accuracy"])
    before = initial_accuracy(path)
    assert before < 0.3 and acc > before + 0.35, (label, before, acc)
    assert run["attrs"]["model"] == "lenet"


def test_rank_invariance_and_resume_with_lenet(tmp_path):
    finals = {}
    for vec in ("loop", "vmap"):
        path = write_config(tmp_path, LENET, f"{vec}.yaml", run={"steps": 12}, model={"vectorize": vec})
        for ranks in ((1, 4) if vec == "loop" else (2,)):  # vmap: several ranks, four nodes each
            out = tmp_path / f"{vec}-{ranks}"
            check(run_hpcopt_mpi(ranks, ["run", path, "--out", out], timeout=300))
            info, X = rows(out)
            assert info["ranks"] == ranks and info["step"] == 12
            finals[vec, ranks] = (X, rows(out, "M")[1])
    X0 = np.tile(models.build(config.load(str(path)).model,
                              data.load(config.load(str(path)).data, 8), threads=1).init(0), (8, 1))
    assert np.abs(finals["loop", 1][0] - X0).max() > 1e-3  # training moved the models
    for ranks in (4,):  # the loop: each node's arithmetic is its own, bit for bit on any rank count
        assert np.array_equal(finals["loop", ranks][0], finals["loop", 1][0]), ranks
        assert np.array_equal(finals["loop", ranks][1], finals["loop", 1][1]), ranks
    for ranks in (2,):  # vmap batches a rank's nodes: rounding may differ, 1e-6 relative
        X, ref = finals["vmap", ranks][0], finals["loop", 1][0]
        assert np.linalg.norm(X - ref) <= 1e-6 * np.linalg.norm(ref), ranks
    # stop at 6 on 2 ranks, resume to 12 on 1: bit for bit the uninterrupted run
    loop = tmp_path / "loop.yaml"
    part = tmp_path / "part"
    proc = run_hpcopt_mpi(2, ["run", loop, "--out", part, "--set", "run.stop_after=6"], timeout=300)
    assert proc.returncode == 75, proc.stderr[-2000:]
    check(run_hpcopt_mpi(1, ["run", loop, "--out", part, "--resume"], timeout=300))
    assert np.array_equal(rows(part)[1], finals["loop", 1][0])
    assert np.array_equal(rows(part, "M")[1], finals["loop", 1][1])
    a, b = store.read_run(str(part)), store.read_run(str(tmp_path / "loop-4"))
    assert np.array_equal(a["metrics"]["train_loss"], b["metrics"]["train_loss"])


def test_export_reproduces_the_final_accuracy(tmp_path):
    path = write_config(tmp_path, LENET, run={"steps": 30})
    out = tmp_path / "run"
    check(run_hpcopt_mpi(2, ["run", path, "--out", out], timeout=300))
    for which in (["--average"], ["--node", "3"]):
        f = tmp_path / f"model{which[-1]}.safetensors"
        proc = check(run_cli(["export", out, *which, "--out", f]))
        assert "exported" in proc.stdout and f.exists()
    from safetensors.torch import load_file
    cfg = config.load(str(path))
    ds = data.load(cfg.data, cfg.nodes.n)
    net = nets.LeNet((1, 28, 28), 10)
    net.load_state_dict(load_file(str(tmp_path / "model--average.safetensors")), strict=True)
    net.eval()
    with torch.no_grad():
        pred = net(torch.from_numpy(ds.X_test).reshape(-1, 1, 28, 28)).argmax(dim=1).numpy()
    acc = float((pred == ds.y_test).mean())
    summary = store.read_run(str(out))["summary"]
    assert abs(acc - summary["final_test_accuracy"]) <= 1.0 / len(ds.y_test)
    assert acc > 0.5
    net.load_state_dict(load_file(str(tmp_path / "model3.safetensors")), strict=True)
    _, X = rows(out)
    assert np.array_equal(torch_backend.FlatSpec(net).flatten(net), X[3])  # node 3's row, name by name


RESNET_BN = {
    "run": {"steps": 12, "eval_every": 0, "log_every": 4},
    "nodes": {"n": 4},
    "data": {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "batch_size": 16},
    "model": {"name": "resnet20", "norm": "batch", "threads": 1},
    "algorithm": {"name": "dsgd"},
    "optimizer": {"lr": 0.05},
}


def bn_layout():
    ds = SimpleNamespace(name="digits", shape=None, classes=10, features=64)
    m = torch_backend.build("resnet20", config.from_dict({"model": RESNET_BN["model"]}).model, ds, threads=1)
    return m.spec.params, m.buffer_dim, m.init(0)


def test_batchnorm_statistics_survive_resume_and_are_averaged(tmp_path):
    P, nb, x0 = bn_layout()
    assert nb > 0
    path = write_config(tmp_path, RESNET_BN)
    check(run_hpcopt_mpi(2, ["run", path, "--out", tmp_path / "full"], timeout=300))
    proc = run_hpcopt_mpi(2, ["run", path, "--out", tmp_path / "part", "--set", "run.stop_after=6"], timeout=300)
    assert proc.returncode == 75, proc.stderr[-2000:]
    check(run_hpcopt_mpi(1, ["run", path, "--out", tmp_path / "part", "--resume"], timeout=300))
    _, full = rows(tmp_path / "full")
    _, part = rows(tmp_path / "part")
    assert np.array_equal(full, part)  # parameters and running statistics, bit for bit
    stats = full[:, P:]
    assert np.abs(stats - x0[None, P:]).max() > 1e-3  # the statistics were updated ...
    assert np.abs(stats[0] - stats[1]).max() > 1e-6  # ... per node, mixed but not equal on a ring
    # Local SGD averages the statistics with the models: after a round all nodes agree
    path = write_config(tmp_path, RESNET_BN, "local.yaml", algorithm={"name": "local_sgd", "local_steps": 3})
    check(run_hpcopt_mpi(2, ["run", path, "--out", tmp_path / "local"], timeout=300))
    _, X = rows(tmp_path / "local")
    assert np.abs(X[:, P:] - x0[None, P:]).max() > 1e-3
    assert np.abs(X[:, P:] - X[:1, P:]).max() <= 1e-6 * np.abs(X[:, P:]).max()
    # sync SGD: the one model keeps the mean of the nodes' updated statistics
    path = write_config(tmp_path, RESNET_BN, "sync.yaml", algorithm={"name": "sync_sgd"})
    check(run_hpcopt_mpi(2, ["run", path, "--out", tmp_path / "sync"], timeout=300))
    _, x = rows(tmp_path / "sync", "x")
    assert np.abs(x[P:] - x0[P:]).max() > 1e-3 and np.all(np.isfinite(x))


FACTORY = '''import torch
from torch import nn


def tiny_cnn(input_shape, classes):
    c, h, w = input_shape
    return nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * h * w, classes))
'''


def test_user_factory_from_a_file_trains(tmp_path):
    src = tmp_path / "elsewhere" / "my_nets.py"
    src.parent.mkdir()
    src.write_text(FACTORY)
    path = write_config(tmp_path, {"run": {"steps": 60, "eval_every": 0}, "nodes": {"n": 4},
                                   "data": {"dataset": "digits", "batch_size": 16},
                                   "model": {"name": "torch", "factory": f"{src}:tiny_cnn"},
                                   "algorithm": {"name": "dsgd"}, "optimizer": {"lr": 0.1}})
    check(run_hpcopt_mpi(2, ["run", path, "--out", tmp_path / "run"], timeout=300))
    run = store.read_run(str(tmp_path / "run"))
    assert run["attrs"]["model"] == "torch" and run["summary"]["final_test_accuracy"] > 0.8
