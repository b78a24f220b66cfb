"""The command line as users drive it: errors, the quickstart, analyse, topology."""
from pathlib import Path

import numpy as np
import pytest

from hpcopt import store
from tests.helpers import REPO, check, run_cli, run_hpcopt_mpi

BAD = sorted((Path(__file__).parent / "bad_configs").glob("*.yaml"))


def test_corpus_is_large_enough():
    assert len(BAD) >= 20


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_malformed_config_exits_2_with_one_line(path, tmp_path):
    expect = path.read_text().splitlines()[0].split("expect:", 1)[1].strip()
    proc = run_cli(["run", path, "--out", tmp_path / "run"], timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("hpcopt: ") and "Traceback" not in proc.stderr
    assert expect in lines[0]
    assert not (tmp_path / "run" / "run.h5").exists()


def test_bad_override_and_missing_file(tmp_path):
    proc = run_cli(["run", REPO / "configs" / "quickstart.yaml", "--set", "optimizer.lr=-3"])
    assert proc.returncode == 2 and proc.stderr.startswith("hpcopt: optimizer.lr = -3")
    proc = run_cli(["run", tmp_path / "nope.yaml"])
    assert proc.returncode == 2 and "cannot read config" in proc.stderr


def test_quickstart_end_to_end_and_analyse(tmp_path):
    proc = check(run_hpcopt_mpi(4, ["run", "quickstart"], cwd=tmp_path, timeout=300))
    assert "step 1500/1500" in proc.stdout and "summary" in proc.stdout
    run = store.read_run(str(tmp_path / "runs" / "quickstart"))
    assert run["summary"]["final_test_accuracy"] >= 0.85
    assert run["attrs"]["ranks"] == 4 and run["attrs"]["nodes"] == 16
    assert run["attrs"]["kernels"] in ("cpu", "numpy")
    m = run["metrics"]
    assert m["train_loss"].shape == (1500, 16) and m["comm_seconds"].shape == (1500, 4)
    assert np.all(m["bytes_sent"] > 0) and m["train_loss_mean"][-100:].mean() < m["train_loss_mean"][:10].mean()
    assert run["eval"]["node_test_accuracy"].shape[1] == 16
    out = check(run_cli(["analyse", tmp_path / "runs" / "quickstart", "--per-node", "--per-rank",
                         "--csv", tmp_path / "t.csv"], cwd=tmp_path)).stdout
    assert "dsgd (ring)" in out and "per rank" in out and "per node" in out
    acc = f"{run['summary']['final_test_accuracy']:.4f}"
    assert acc in out
    assert (tmp_path / "t.csv").read_text().startswith("run,method")


def test_analyse_rejects_non_runs(tmp_path):
    proc = run_cli(["analyse", tmp_path])
    assert proc.returncode == 2 and "no run.h5" in proc.stderr


def test_topology_command():
    out = check(run_cli(["topology", "ring", "--n", "16"])).stdout
    assert "degree               2" in out and "spectral gap         0.050747" in out
    out = check(run_cli(["topology", "one_peer_exponential", "--n", "8"])).stdout
    assert "3 phases" in out and "one period: 1" in out
    proc = run_cli(["topology", "hypercube", "--n", "6"])
    assert proc.returncode == 2 and "power of 2" in proc.stderr
