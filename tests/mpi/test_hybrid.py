"""Hybrid async->sync parameter server on the simulated and the wall clock."""
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from hpcopt import config, store
from hpcopt.algorithms import hybrid
from tests.helpers import REPO, check, env, mpiexec_path, run_hpcopt_mpi

QUICK = str(REPO / "configs" / "quickstart.yaml")
BASE = ["--set", "algorithm.name=hybrid", "--set", "nodes.n=8", "--set", "optimizer.schedule=constant",
        "--set", "optimizer.lr=0.2", "--set", "run.steps=30"]


def theta(run_dir):
    info, _ = store.latest(str(run_dir))
    return info, store.read_state(str(run_dir), info, 0, info["nodes"], [], ["theta"])["theta"]


def test_k_equal_w_is_sync_sgd_exactly_with_zero_staleness(tmp_path):
    check(run_hpcopt_mpi(1, ["run", QUICK, "--out", tmp_path / "h", *BASE, "--set", "algorithm.threshold=constant",
                             "--set", "algorithm.k0=8", "--set", "algorithm.budget_gradients=240"]))
    check(run_hpcopt_mpi(1, ["run", QUICK, "--out", tmp_path / "s", "--set", "algorithm.name=sync_sgd",
                             "--set", "nodes.n=8", "--set", "optimizer.schedule=constant", "--set", "optimizer.lr=0.2",
                             "--set", "run.steps=30"]))
    info, th = theta(tmp_path / "h")
    assert info["step"] == 30
    x = store.read_state(str(tmp_path / "s"), store.latest(str(tmp_path / "s"))[0], 0, 8, [], ["x"])["x"]
    assert np.array_equal(th, x)
    run = store.read_run(str(tmp_path / "h"))
    assert run["tables"]["staleness"]["staleness"].tolist() == [0]
    assert run["tables"]["updates"]["buffer_size"].tolist() == [8] * 30  # K = W: every update holds W
    s = run["summary"]
    assert s["received"] == 240 and s["applied"] == 240 and s["dropped"] == 0


def test_simulated_clock_is_reproducible_on_any_number_of_ranks(tmp_path):
    args = [*BASE, "--set", "algorithm.budget_seconds=20", "--set", "algorithm.k_every=50"]
    finals = []
    for ranks, name in ((1, "a"), (1, "b"), (2, "c")):
        check(run_hpcopt_mpi(ranks, ["run", QUICK, "--out", tmp_path / name, *args]))
        finals.append(theta(tmp_path / name)[1])
    assert np.array_equal(finals[0], finals[1]) and np.array_equal(finals[0], finals[2])
    run = store.read_run(str(tmp_path / "a"))
    K = run["metrics"]["K"]
    assert K[0] == 1 and np.all(np.diff(K) >= 0) and K[-1] > 1  # rising threshold
    st = run["tables"]["staleness"]
    assert st["staleness"].max() > 0  # asynchronous phase: stale gradients were applied
    w = run["tables"]["workers"]
    s = run["summary"]
    assert w["sent"].sum() == s["received"] == s["applied"] + s["dropped"]  # each gradient applied once or dropped
    assert np.all(w["delay_seconds"][w["delayed"] == 0] == 0) and w["delay_seconds"][w["delayed"] == 1].min() > 0


def test_threshold_and_delay_model_are_pure():
    alg = config.from_dict({"algorithm": {"name": "hybrid", "budget_seconds": 1, "k0": 2, "k_every": 10}}).algorithm
    assert [hybrid.threshold(alg, 4, u, 0.0) for u in (0, 9, 10, 25, 1000)] == [2, 2, 3, 4, 4]
    lin = config.from_dict({"algorithm": {"name": "hybrid", "budget_seconds": 1, "threshold": "linear",
                                          "k_ramp": 10}}).algorithm
    assert [hybrid.threshold(lin, 5, 0, t) for t in (0, 2.5, 5, 10, 99)] == [1, 2, 3, 5, 5]
    d = [hybrid.injected_delay(3, 1, k, 0.25) for k in range(4000)]
    assert min(d) >= 0 and abs(np.mean(d) - 0.25 * np.sqrt(2 / np.pi)) < 0.01
    assert d[:5] == [hybrid.injected_delay(3, 1, k, 0.25) for k in range(5)]
    assert hybrid.delayed_workers(0, 25, 0.5).sum() == 12


def test_wall_clock_applies_or_drops_every_gradient_and_stops_cleanly(tmp_path):
    out = tmp_path / "w"
    proc = check(run_hpcopt_mpi(5, ["run", QUICK, "--out", out, *BASE, "--set", "nodes.n=4",
                                    "--set", "algorithm.clock=wall", "--set", "algorithm.budget_seconds=3",
                                    "--set", "algorithm.k_every=40", "--set", "algorithm.delay_std=0.05"], timeout=120))
    assert "updates / gradients received" in proc.stdout
    run = store.read_run(str(out))
    s, w = run["summary"], run["tables"]["workers"]
    assert s["received"] > 20 and s["updates"] > 5
    assert w["sent"].sum() == s["received"] == s["applied"] + s["dropped"]
    assert s["applied"] == run["tables"]["staleness"]["count"].sum() == run["tables"]["updates"]["buffer_size"].sum()
    assert s["server_cpu_fraction"] < 0.5 and np.all(w["cpu_fraction"] < 0.5)
    assert np.all(w["delay_seconds"][w["delayed"] == 0] == 0)
    bad = run_hpcopt_mpi(4, ["run", QUICK, "--out", tmp_path / "bad", *BASE, "--set", "nodes.n=4",
                             "--set", "algorithm.clock=wall", "--set", "algorithm.budget_seconds=1"])
    assert bad.returncode == 2 and "mpiexec -n 5" in bad.stderr


def test_simulated_run_stopped_by_a_signal_resumes_bit_for_bit(tmp_path):
    args = [*BASE, "--set", "algorithm.budget_seconds=20", "--set", "algorithm.k_every=50",
            "--set", "run.checkpoint_every=50"]
    check(run_hpcopt_mpi(1, ["run", QUICK, "--out", tmp_path / "ref", *args]))
    # rank 1 of 2 gets SIGTERM after update 120: both ranks agree, checkpoint, exit 143 (ended, not requeued)
    out = tmp_path / "run"
    stopped = run_hpcopt_mpi(2, ["run", QUICK, "--out", out, *args], HPCOPT_FAULT="term@120:1")
    assert stopped.returncode == 143, stopped.stderr
    assert "stopped at update 120 by" in stopped.stdout
    assert store.latest(str(out))[0]["step"] == 120
    # a second session stops itself after 30 updates (run.stop_after), like a time limit
    again = run_hpcopt_mpi(1, ["run", QUICK, "--out", out, *args, "--resume", "--set", "run.stop_after=30"])
    assert again.returncode == 75 and "stopped at update 150 by run.max_wall / run.stop_after" in again.stdout
    check(run_hpcopt_mpi(1, ["run", QUICK, "--out", out, *args, "--resume"]))  # on another rank count
    ref, run = store.read_run(str(tmp_path / "ref")), store.read_run(str(out))
    assert np.array_equal(theta(tmp_path / "ref")[1], theta(out)[1])
    for group in ("metrics", "eval"):  # the rows after the checkpoint were dropped and written again
        for k, v in ref[group].items():
            assert np.array_equal(v, run[group][k], equal_nan=True), (group, k)
    for name, table in ref["tables"].items():
        for k, v in table.items():
            assert np.array_equal(v, run["tables"][name][k]), (name, k)
    for k in ("received", "applied", "dropped", "in_flight", "final_test_accuracy", "best_test_accuracy"):
        assert ref["summary"][k] == run["summary"][k], k
    assert run["events"]["kind"].tolist() == ["stopped", "resume", "stopped", "resume", "finished"]
    # resuming a finished run changes nothing
    check(run_hpcopt_mpi(1, ["run", QUICK, "--out", out, *args, "--resume"]))
    again = store.read_run(str(out))
    assert np.array_equal(again["eval"]["test_accuracy"], ref["eval"]["test_accuracy"])
    assert np.array_equal(theta(out)[1], theta(tmp_path / "ref")[1])


def test_wall_clock_run_ends_early_on_sigterm_and_is_not_run_twice(tmp_path):
    exe = mpiexec_path()
    if exe is None:
        pytest.skip("no mpiexec on PATH or beside the Python interpreter (install the mpich wheel)")
    out = tmp_path / "w"
    args = ["run", QUICK, "--out", str(out), *BASE, "--set", "nodes.n=4", "--set", "algorithm.clock=wall",
            "--set", "algorithm.budget_seconds=120"]
    p = subprocess.Popen([exe, "-n", "5", sys.executable, "-m", "mpi4py", "-m", "hpcopt", *args], env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = threading.Event()
    lines = []

    def read():
        for line in p.stdout:
            lines.append(line)
            if line.startswith("hpcopt: hybrid on"):
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert started.wait(60), p.stderr.read()
    time.sleep(2)  # the server is serving
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=30)  # well before the 120 s budget
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    reader.join(5)
    assert p.returncode == 0, p.stderr.read()
    run = store.read_run(str(out))
    s, w = run["summary"], run["tables"]["workers"]
    assert s["stopped_by"] == "signal SIGTERM" and s["simulated_seconds"] < 60
    assert w["sent"].sum() == s["received"] == s["applied"] + s["dropped"]  # the same clean shutdown
    assert len(run["eval"]["step"]) > 0
    again = check(run_hpcopt_mpi(5, args + ["--resume"], timeout=60))
    assert "nothing to resume" in again.stdout
    assert store.read_run(str(out))["summary"]["received"] == s["received"]
