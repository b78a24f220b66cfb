"""Fault tests: kills, kills inside checkpoint writes, signals, corrupted shards, hung peers,
divergence. Every resumed run must end bit-identical to an uninterrupted one."""
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from hpcopt import store
from tests.helpers import REPO, check, env, mpiexec_path, run_hpcopt_mpi, run_script

QUICK = str(REPO / "configs" / "quickstart.yaml")
STEPS = 60
COMMON = ["--set", f"run.steps={STEPS}", "--set", "run.checkpoint_every=10", "--set", "run.log_every=5",
          "--set", "run.eval_every=20", "--set", "optimizer.momentum=0.9", "--set", "run.keep_checkpoints=3"]


def final(run_dir):
    info, _ = store.latest(str(run_dir))
    assert info is not None and info["step"] == STEPS
    return store.read_state(str(run_dir), info, 0, info["nodes"], ["X", "M"], [])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    check(run_hpcopt_mpi(2, ["run", QUICK, "--out", out, *COMMON]))
    return final(out)


def same(a, b):
    return np.array_equal(a["X"], b["X"]) and np.array_equal(a["M"], b["M"])


def test_kill_9_at_random_steps_then_resume_is_bit_identical(tmp_path, reference):
    rng = random.Random(1234)
    steps = rng.sample(range(2, STEPS - 1), 10)
    ok = 0
    for trial, step in enumerate(steps):
        out = tmp_path / f"t{trial}"
        proc = run_hpcopt_mpi(2, ["run", QUICK, "--out", out, *COMMON], HPCOPT_FAULT=f"kill@{step}:{trial % 2}")
        assert proc.returncode != 0, f"trial {trial}: a killed job must fail"
        run = store.read_run(str(out))  # stays readable
        assert len(run["metrics"].get("step", [])) <= step
        check(run_hpcopt_mpi(2, ["run", QUICK, "--out", out, *COMMON, "--resume"]))
        ok += same(final(out), reference)
    assert ok == 10


def test_kill_during_checkpoint_write_never_loads_the_partial_one(tmp_path, reference):
    ok = 0
    for trial in range(10):
        step = 10 * (1 + trial % 5)
        fault = f"kill-shard@{step}:{trial % 2}" if trial % 3 else f"kill-complete@{step}:0"
        out = tmp_path / f"t{trial}"
        proc = run_hpcopt_mpi(2, ["run", QUICK, "--out", out, *COMMON], HPCOPT_FAULT=fault)
        assert proc.returncode != 0
        partial = store.step_dir(str(out), step)
        assert not os.path.exists(os.path.join(partial, "COMPLETE"))
        info, skipped = store.latest(str(out))
        assert info is None or info["step"] < step
        res = check(run_hpcopt_mpi(2, ["run", QUICK, "--out", out, *COMMON, "--resume"]))
        if os.path.isdir(partial) and info is not None:
            assert f"checkpoint step {step} is incomplete" in res.stdout
        ok += same(final(out), reference)
    assert ok == 10


def test_flipped_bytes_in_a_shard_fall_back_to_the_previous_checkpoint(tmp_path, reference):
    out = tmp_path / "run"
    proc = run_hpcopt_mpi(2, ["run", QUICK, "--out", out, *COMMON, "--set", "run.stop_after=40"])
    assert proc.returncode == 75
    assert store.list_steps(str(out)) == [20, 30, 40]
    shard = os.path.join(store.step_dir(str(out), 40), "rank-00001.h5")
    with open(shard, "r+b") as fh:
        fh.seek(os.path.getsize(shard) // 2)
        b = fh.read(8)
        fh.seek(-8, 1)
        fh.write(bytes(x ^ 0xFF for x in b))
    res = check(run_hpcopt_mpi(2, ["run", QUICK, "--out", out, *COMMON, "--resume"]))
    assert "checkpoint step 40: rank-00001.h5 does not match its checksum; skipped" in res.stdout
    assert "resuming quickstart at step 30" in res.stdout
    assert same(final(out), reference)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["TERM", "USR1"])
def test_signal_checkpoints_then_resume_matches(tmp_path, sig):
    """USR1 (time running out) exits 75, "requeue me"; TERM (scancel) 143, "ended"."""
    exe = mpiexec_path()
    if exe is None:
        pytest.skip("no mpiexec on PATH or beside the Python interpreter (install the mpich wheel)")
    out = tmp_path / "run"
    args = ["run", QUICK, "--out", str(out), "--set", "optimizer.schedule=constant", "--set", "run.log_every=10",
            "--set", "optimizer.momentum=0.9"]
    p = subprocess.Popen([exe, "-n", "2", sys.executable, "-m", "mpi4py", "-m", "hpcopt", *args,
                          "--set", "run.steps=10000000"], env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not store.readable(str(out / "run.h5")) or "metrics" not in store.read_run(str(out)) or \
            not len(store.read_run(str(out))["metrics"].get("step", [])):
        assert time.monotonic() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.2)
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=10)  # checkpointed and exited within 10 s, or TimeoutExpired
    assert p.returncode == (143 if sig == signal.SIGTERM else 75), stderr
    info, _ = store.latest(str(out))
    stopped = info["step"]
    assert f"stopped at step {stopped} by signal {sig.name}" in stdout
    run = store.read_run(str(out))
    assert "stopped" in run["events"]["kind"].tolist()
    target = stopped + 25
    check(run_hpcopt_mpi(2, [*args, "--set", f"run.steps={target}", "--resume"]))
    ref = tmp_path / "ref"
    check(run_hpcopt_mpi(2, [*args[:3], str(ref), *args[4:], "--set", f"run.steps={target}"]))
    a = store.read_state(str(out), store.latest(str(out))[0], 0, 16, ["X", "M"], [])
    b = store.read_state(str(ref), store.latest(str(ref))[0], 0, 16, ["X", "M"], [])
    assert np.array_equal(a["X"], b["X"]) and np.array_equal(a["M"], b["M"])


@pytest.mark.parametrize("op,who", [("mix", "mix at step 42 for rank 1"),
                                    ("mean", "mean at step 42 for the other ranks (collective)"),
                                    ("mean-polite", "mean at step 42 for the other ranks (collective)")])
def test_hung_peer_aborts_the_job_naming_op_step_and_peer(op, who):
    # the silent rank sleeps 30 s: only the 1 s timeout can end the job inside the 20 s limit
    # (mean: a blocking Allreduce ended by the watchdog thread; mean-polite: the polled wait)
    proc = run_script(2, "hang.py", op, timeout=20)
    assert proc.returncode != 0
    assert "not reached" not in proc.stdout
    assert f"waited more than comm.timeout = 1 s in {who}" in proc.stderr


def test_rank_that_stops_answering_in_a_run_aborts_within_the_timeout(tmp_path):
    # the rank sleeps 120 s; a limit of 40 s means the job was ended by comm.timeout = 2 s
    proc = run_hpcopt_mpi(2, ["run", QUICK, "--out", tmp_path / "run", "--set", "comm.timeout=2",
                              "--set", "run.steps=100"], HPCOPT_FAULT="sleep@20:1:120", timeout=40)
    assert proc.returncode != 0
    assert "waited more than comm.timeout = 2 s in mix at step 20 for rank 1" in proc.stderr


def test_nan_loss_stops_cleanly_with_an_event(tmp_path):
    out = tmp_path / "run"
    proc = run_hpcopt_mpi(2, ["run", QUICK, "--out", out, "--set", "data.dataset=quadratic", "--set", "model.name=auto",
                              "--set", "optimizer.lr=1000", "--set", "data.partition=iid",
                              "--set", "run.steps=500"])
    assert proc.returncode == 0, proc.stderr
    assert "hpcopt: diverged: a training loss became non-finite at step" in proc.stdout
    run = store.read_run(str(out))
    assert "diverged" in run["events"]["kind"].tolist() and run["summary"]["diverged"] == 1
    steps = run["metrics"]["step"]
    assert len(steps) < 500 and not np.all(np.isfinite(run["metrics"]["train_loss"][-1]))
    from hpcopt import analyse
    assert "diverged" in analyse.run_row(run)["steps"]
