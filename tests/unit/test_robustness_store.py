"""Resuming from damaged checkpoints, end to end (one rank, no mpiexec needed): a
malformed COMPLETE marker is skipped with its reason, and a checkpoint whose buffers do
not fit the resumed config fails in Python, never in the compiled kernels."""
import json
import os

import pytest

from hpcopt import kernels as K
from hpcopt import store
from tests.helpers import check, run_cli

STOPPED = ["run", "quickstart", "--set", "run.steps=40", "--set", "run.checkpoint_every=10",
           "--set", "run.log_every=10"]


@pytest.fixture
def stopped_run(tmp_path):
    """A quickstart run stopped at step 25 (checkpoints at 20 and 25), as Slurm leaves one."""
    out = tmp_path / "r1"
    proc = run_cli([*STOPPED, "--set", "run.stop_after=25", "--out", out], cwd=tmp_path)
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert store.list_steps(str(out)) == [20, 25]
    return out


def test_resume_skips_a_malformed_complete_marker_and_says_why(stopped_run, tmp_path):
    marker = os.path.join(store.step_dir(str(stopped_run), 25), "COMPLETE")
    with open(marker) as fh:
        info = json.load(fh)
    info["shards"] = []  # valid JSON, a marker with nothing in it
    with open(marker, "w") as fh:
        json.dump(info, fh)
    proc = check(run_cli([*STOPPED, "--out", stopped_run, "--resume"], cwd=tmp_path))
    said = proc.stdout + proc.stderr
    assert ("checkpoint step 25 is incomplete: its COMPLETE marker is malformed (it lists no shards); skipped"
            in said)
    assert "resuming quickstart at step 20" in said
    events = store.read_run(str(stopped_run))["events"]
    assert "checkpoint_skipped" in list(events["kind"])
    assert store.read_run(str(stopped_run))["summary"]["steps"] == 40


@pytest.mark.parametrize("kernels", ["compiled", "numpy"])
def test_resume_with_momentum_from_a_momentum_free_checkpoint_fails_in_python(stopped_run, tmp_path, kernels):
    # the checkpoint holds an empty (nodes, 0) momentum buffer; handing it to the fused
    # momentum kernel used to corrupt the heap ("double free or corruption", SIGABRT)
    if kernels == "compiled" and K._compiler() is None:
        pytest.skip("no C++ compiler (g++/c++/clang++) to build the CPU kernels")
    proc = run_cli([*STOPPED, "--set", "optimizer.momentum=0.9", "--set", f"device.kernels={kernels}",
                    "--out", stopped_run, "--resume"], cwd=tmp_path)
    assert proc.returncode in (1, 2), (proc.returncode, proc.stderr[-2000:])  # a Python error, not a signal
    for crash in ("corruption", "double free", "Segmentation fault", "malloc", "core dumped"):
        assert crash not in proc.stderr
    if proc.returncode == 1:  # until resume checks the config against the checkpoint
        assert "kernel momentum_update: m has shape (16, 0) (0 elements)" in proc.stderr
