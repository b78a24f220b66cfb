"""End-to-end runs under mpiexec: rank-count invariance, resume, stop requests, config errors."""
import numpy as np
import pytest

from hpcopt import store
from tests.helpers import REPO, check, run_hpcopt_mpi

QUICK = str(REPO / "configs" / "quickstart.yaml")


def final_state(run_dir, fields):
    info, _ = store.latest(str(run_dir))
    assert info is not None
    replicated = [f for f in fields if f in ("x", "m")]  # sync SGD's single model
    return info, store.read_state(str(run_dir), info, 0, info["nodes"], [f for f in fields if f not in replicated],
                                  replicated)


@pytest.mark.parametrize("algo, fields", [("dsgd", ["X", "M"]), ("sync_sgd", ["x", "m"])])
def test_rank_count_invariance(tmp_path, algo, fields):
    states = []
    for ranks in (1, 2, 4):
        out = tmp_path / f"{algo}-{ranks}"
        check(run_hpcopt_mpi(ranks, ["run", QUICK, "--out", out, "--set", f"algorithm.name={algo}",
                                     "--set", "run.steps=120", "--set", "optimizer.momentum=0.5",
                                     "--set", "run.eval_every=40"]))
        info, st = final_state(out, fields)
        assert info["ranks"] == ranks and info["step"] == 120
        states.append(st)
    key = fields[0]
    ref = states[0][key]
    assert np.abs(ref).max() > 0.1  # training moved the parameters
    for st in states[1:]:
        for f in fields:
            scale = max(1e-30, float(np.abs(states[0][f]).max()))
            assert np.abs(st[f] - states[0][f]).max() <= 1e-5 * scale, f


def test_resume_is_bit_identical(tmp_path):
    common = ["--set", "run.steps=100", "--set", "optimizer.momentum=0.9", "--set", "run.eval_every=30",
              "--set", "run.log_every=10", "--set", "optimizer.lr=0.1"]
    full = tmp_path / "full"
    check(run_hpcopt_mpi(4, ["run", QUICK, "--out", full, *common]))
    part = tmp_path / "part"
    proc = run_hpcopt_mpi(4, ["run", QUICK, "--out", part, *common, "--set", "run.stop_after=60"])
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert "stopped at step 60" in proc.stdout
    check(run_hpcopt_mpi(2, ["run", QUICK, "--out", part, *common, "--resume"]))
    _, a = final_state(full, ["X", "M"])
    info, b = final_state(part, ["X", "M"])
    assert info["ranks"] == 2
    assert np.array_equal(a["X"], b["X"]) and np.array_equal(a["M"], b["M"])
    run = store.read_run(str(part))
    assert run["metrics"]["step"].tolist() == list(range(100))
    assert run["metrics"]["train_loss"].shape == (100, 16)
    assert "resume" in run["events"]["kind"].tolist()
    ref = store.read_run(str(full))
    assert np.array_equal(ref["metrics"]["train_loss"], run["metrics"]["train_loss"])


def test_existing_run_is_not_overwritten_and_ranks_above_nodes_rejected(tmp_path):
    out = tmp_path / "r"
    check(run_hpcopt_mpi(2, ["run", QUICK, "--out", out, "--set", "run.steps=10"]))
    proc = run_hpcopt_mpi(2, ["run", QUICK, "--out", out, "--set", "run.steps=10"])
    assert proc.returncode != 0 and "--resume" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    proc = run_hpcopt_mpi(4, ["run", QUICK, "--out", tmp_path / "s", "--set", "nodes.n=2"])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "nodes.n = 2" in proc.stderr and proc.stderr.strip().count("\n") == 0


def test_compiled_kernels_give_the_numpy_result(tmp_path):
    finals = {}
    for mode in ("compiled", "numpy"):
        out = tmp_path / mode
        check(run_hpcopt_mpi(2, ["run", QUICK, "--out", out, "--set", f"device.kernels={mode}",
                                 "--set", "run.steps=200", "--set", "optimizer.momentum=0.9"]))
        run = store.read_run(str(out))
        assert run["attrs"]["kernels"] == ("cpu" if mode == "compiled" else "numpy")
        finals[mode] = final_state(out, ["X", "M"])[1]
    # the CPU build rounds exactly like the references, so whole trajectories agree bit for bit
    assert np.array_equal(finals["compiled"]["X"], finals["numpy"]["X"])
    assert np.array_equal(finals["compiled"]["M"], finals["numpy"]["M"])


@pytest.mark.parametrize("algo, extra, fields", [
    ("local_sgd", ["--set", "algorithm.local_steps=4", "--set", "optimizer.scaling=adam", "--set",
                   "optimizer.lr=0.01", "--set", "algorithm.scaling=global"], ["X", "M", "V", "D", "P"]),
    ("teleport", ["--set", "algorithm.k=4"], ["X"]),
], ids=["local_sgd", "teleport"])
def test_resume_is_bit_identical_for_every_algorithm(tmp_path, algo, extra, fields):
    common = ["--set", "run.steps=40", "--set", f"algorithm.name={algo}", "--set", "run.eval_every=10", *extra]
    check(run_hpcopt_mpi(2, ["run", QUICK, "--out", tmp_path / "full", *common]))
    proc = run_hpcopt_mpi(2, ["run", QUICK, "--out", tmp_path / "part", *common, "--set", "run.stop_after=18"])
    assert proc.returncode == 75, proc.stderr[-2000:]
    # same rank count: bit-identical (a different count changes the all-reduce's rounding
    # for Local SGD's averages, within the 1e-5 of the rank-count invariance tests)
    check(run_hpcopt_mpi(2, ["run", QUICK, "--out", tmp_path / "part", *common, "--resume"]))
    a = final_state(tmp_path / "full", fields)[1]
    b = final_state(tmp_path / "part", fields)[1]
    for f in fields:
        assert np.array_equal(a[f], b[f]), f
