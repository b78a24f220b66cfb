"""What a second session may do to a run: resume only with the config it was started with
(save the keys that change no result), continue without stale rows, stop on Ctrl-C like
on SIGTERM (twice: abort at once), --force only on runs hpcopt wrote, and decide
divergence against a reference that survives the resume."""
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import yaml

from hpcopt import config, store
from tests.helpers import REPO, check, env, mpiexec_path, run_cli, run_hpcopt_mpi

QUICK = str(REPO / "configs" / "quickstart.yaml")
SHORT = ["--set", "run.steps=40", "--set", "run.eval_every=10", "--set", "run.log_every=5",
         "--set", "run.progress=false"]


def final(run_dir):
    info, _ = store.latest(str(run_dir))
    return info, store.read_state(str(run_dir), info, 0, info["nodes"], ["X", "M"], [])


def one_line(proc):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A 2-rank run of 40 steps stopped at step 20 (checkpoint, exit 75)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    proc = run_hpcopt_mpi(2, ["run", QUICK, "--out", out, *SHORT, "--set", "run.stop_after=20"])
    assert proc.returncode == 75, proc.stderr[-2000:]
    return out


# -- 1. resume compares the config with the one the run was started with -----------------

@pytest.mark.parametrize("change, old", [
    ("optimizer.lr=0.05", "0.5"), ("nodes.n=8", "16"), ("model.name=mlp", "'softmax'"),
    ("algorithm.name=sync_sgd", "'dsgd'"), ("data.dataset=breast_cancer", "'digits'"),
    ("run.divergence_factor=3", "0.0"),
], ids=lambda v: v.split("=")[0] if "=" in v else None)
def test_resume_refuses_a_changed_key_on_every_rank(stopped, change, old):
    before = tree(stopped)
    events = store.read_run(str(stopped))["events"]["kind"].tolist()
    proc = run_hpcopt_mpi(2, ["run", QUICK, "--out", stopped, *SHORT, "--set", change, "--resume"], timeout=60)
    key, value = change.split("=")
    line = one_line(proc)
    assert f"{key} = " in line and f"is not allowed on resume: the run was started with {old}; only run.steps" in line
    assert "(or use --force to start over)" in line
    assert tree(stopped) == before  # nothing trained, written or deleted
    assert store.read_run(str(stopped))["events"]["kind"].tolist() == events


def test_allowed_changes_are_recorded_and_replace_the_config_text(tmp_path):
    out = tmp_path / "run"
    proc = run_hpcopt_mpi(2, ["run", QUICK, "--out", out, *SHORT, "--set", "run.stop_after=20"])
    assert proc.returncode == 75, proc.stderr[-2000:]
    check(run_hpcopt_mpi(1, ["run", QUICK, "--out", out, *SHORT, "--set", "run.steps=50", "--set",
                             "comm.timeout=100", "--set", "device.kernels=numpy", "--resume"]))
    run = store.read_run(str(out))
    resume = [m for k, m in zip(run["events"]["kind"], run["events"]["message"]) if k == "resume"]
    assert len(resume) == 1
    assert ("config changes: run.steps 40 -> 50, run.stop_after 20 -> 0, device.kernels 'auto' -> 'numpy', "
            "comm.timeout 300.0 -> 100.0") in resume[0]
    assert "on 1 ranks (checkpoint written by 2 ranks)" in resume[0]
    text = run["config_text"]
    assert config.from_dict(yaml.safe_load(text)).run.steps == 50
    assert "timeout: 100.0" in text and run["attrs"]["ranks"] == 2  # the attributes stay
    assert run["metrics"]["step"].tolist() == list(range(50))


# -- 2. no stale rows: truncated to the checkpoint, or to nothing --------------------------

def test_resume_without_a_checkpoint_drops_the_rows_of_the_crashed_session(tmp_path):
    args = ["run", QUICK, "--set", "run.steps=40", "--set", "run.checkpoint_every=10", "--set", "run.log_every=1",
            "--set", "run.progress=false"]
    check(run_hpcopt_mpi(2, [*args, "--out", tmp_path / "full"]))
    part = tmp_path / "part"
    proc = run_hpcopt_mpi(2, [*args, "--out", part], HPCOPT_FAULT="kill@5:0")
    assert proc.returncode != 0 and store.latest(str(part))[0] is None
    assert store.read_run(str(part))["metrics"]["step"].tolist() == list(range(5))
    check(run_hpcopt_mpi(2, [*args, "--out", part, "--resume"]))
    run, ref = store.read_run(str(part)), store.read_run(str(tmp_path / "full"))
    assert run["metrics"]["step"].tolist() == list(range(40))
    assert np.array_equal(run["metrics"]["train_loss"], ref["metrics"]["train_loss"])
    assert "5 rows of the earlier session dropped" in run["events"]["message"][0]


def test_evaluations_at_the_checkpoint_step_are_kept(tmp_path):
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    check(run_hpcopt_mpi(2, ["run", QUICK, "--out", full, *SHORT]))
    proc = run_hpcopt_mpi(2, ["run", QUICK, "--out", stopped, *SHORT, "--set", "run.stop_after=20"])
    assert proc.returncode == 75, proc.stderr[-2000:]
    check(run_hpcopt_mpi(2, ["run", QUICK, "--out", stopped, *SHORT, "--resume"]))
    a, b = store.read_run(str(full))["eval"], store.read_run(str(stopped))["eval"]
    assert b["step"].tolist() == a["step"].tolist() == [10, 20, 30, 40]
    assert np.array_equal(a["test_loss"], b["test_loss"])
    again = check(run_hpcopt_mpi(2, ["run", QUICK, "--out", stopped, *SHORT, "--resume"]))  # finished: no new rows
    assert "resuming quickstart at step 40" in again.stdout
    assert store.read_run(str(stopped))["eval"]["step"].tolist() == [10, 20, 30, 40]


# -- 3. SIGINT: stop like SIGTERM; a second one aborts the job at once ----------------------

SIGNALLED = ["run", QUICK, "--set", "run.steps=30", "--set", "comm.timeout=120", "--set", "run.log_every=1",
             "--set", "run.progress=false", "--set", "optimizer.momentum=0.9"]


@pytest.mark.parametrize("fault, stopped_at", [("int@5:1", 6), ("int@-1:1", 1)], ids=["in-the-loop", "in-setup"])
def test_sigint_on_one_rank_checkpoints_and_stops_every_rank(tmp_path, fault, stopped_at):
    # without the stop path the other rank waits for comm.timeout = 120 s: the 60 s limit fails it
    out = tmp_path / "run"
    proc = run_hpcopt_mpi(2, [*SIGNALLED, "--out", out], HPCOPT_FAULT=fault, timeout=60)
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert f"stopped at step {stopped_at} by a stop request on another rank" in proc.stdout
    assert store.latest(str(out))[0]["step"] == stopped_at
    check(run_hpcopt_mpi(2, [*SIGNALLED, "--out", out, "--resume"]))
    check(run_hpcopt_mpi(2, [*SIGNALLED, "--out", tmp_path / "ref"]))
    a, b = final(out)[1], final(tmp_path / "ref")[1]
    assert np.array_equal(a["X"], b["X"]) and np.array_equal(a["M"], b["M"])


def rank_pids(root: int) -> dict:
    """{rank: pid} of the processes below `root` that the launcher gave a PMI_RANK."""
    children: dict = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as fh:
                children.setdefault(int(fh.read().rsplit(")", 1)[1].split()[1]), []).append(int(name))
        except (OSError, IndexError, ValueError):
            continue
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                pairs = dict(kv.split(b"=", 1) for kv in fh.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if b"PMI_RANK" in pairs:
            found[int(pairs[b"PMI_RANK"])] = pid
    return found


@pytest.mark.parametrize("blocking", ["0", "-1"], ids=["polite-waits", "blocking-waits"])
def test_second_sigint_aborts_the_job_while_a_peer_hangs(tmp_path, blocking):
    # rank 1 sleeps 100 s at step 5 and rank 0 waits for it (comm.timeout 120 s); two
    # SIGINTs to rank 0 alone must end the job within the 60 s limit -- also while rank 0
    # sits in a blocking MPI call, where no Python signal handler runs
    exe = mpiexec_path()
    if exe is None:
        pytest.skip("no mpiexec on PATH or beside the Python interpreter (install the mpich wheel)")
    out = tmp_path / "run"
    p = subprocess.Popen([exe, "-n", "2", sys.executable, "-m", "mpi4py", "-m", "hpcopt", *SIGNALLED, "--out",
                          str(out), "--set", f"comm.blocking_bytes={blocking}"],
                         env=env(HPCOPT_FAULT="sleep@5:1:100"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    err: list = []
    reader = threading.Thread(target=lambda: err.extend(p.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not (store.readable(str(out / "run.h5"))
                   and len(store.read_run(str(out))["metrics"].get("step", [])) >= 5):
            assert time.monotonic() < deadline and p.poll() is None, "".join(err)
            time.sleep(0.2)
        pid = rank_pids(p.pid)[0]
        os.kill(pid, signal.SIGINT)
        time.sleep(0.5)  # two deliveries, not one pending signal
        os.kill(pid, signal.SIGINT)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    reader.join(5)
    assert p.returncode not in (0, 75), "".join(err)
    assert "hpcopt: interrupted again: aborting the job" in "".join(err)
    assert store.latest(str(out))[0] is None  # no checkpoint: the job was aborted, not stopped


# -- 4. --force deletes only a run hpcopt wrote ---------------------------------------------

@pytest.mark.parametrize("layout, why", [
    ({"ckpt/step-000000010/rank-00000.h5": "data", "ckpt/notes.txt": "mine"}, "it holds ckpt/ but no run.h5"),
    ({"run.h5": "not hdf5", "ckpt/step-000000010/COMPLETE": "{}"}, "its run.h5 is not an hpcopt run file"),
], ids=["ckpt-without-run-file", "foreign-run-file"])
def test_force_refuses_a_directory_that_holds_no_hpcopt_run(tmp_path, layout, why):
    out = tmp_path / "dir"
    for rel, text in layout.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    before = tree(out)
    line = one_line(run_cli(["run", QUICK, "--out", out, "--set", "run.steps=5", "--force"]))
    assert f"--force is not allowed for {out}: {why}" in line and "nothing was deleted" in line
    assert tree(out) == before


def test_force_deletes_the_run_and_nothing_else(tmp_path):
    out = tmp_path / "run"
    check(run_cli(["run", QUICK, "--out", out, "--set", "run.steps=20", "--set", "run.checkpoint_every=5"]))
    (out / "notes.txt").write_text("mine")
    (out / "ckpt" / "mine").mkdir()
    check(run_cli(["run", QUICK, "--out", out, "--set", "run.steps=3", "--force"]))
    assert store.list_steps(str(out)) == [3]
    assert (out / "notes.txt").read_text() == "mine" and (out / "ckpt" / "mine").is_dir()
    run = store.read_run(str(out))
    assert run["metrics"]["step"].tolist() == [0, 1, 2] and "resume" not in run["events"]["kind"].tolist()


# -- 6. run.divergence_factor: a robust reference, kept in checkpoints ----------------------

def diverged(run):
    kinds, messages = run["events"]["kind"].tolist(), run["events"]["message"].tolist()
    return [m for k, m in zip(kinds, messages) if k == "diverged"]


def rule(run, factor):
    """The first step whose mean loss exceeds factor x the mean of the first 10 steps' (from run.h5)."""
    m = np.asarray(run["metrics"]["train_loss_mean"])
    ref = m[:10].mean()
    return next((s for s in range(9, len(m)) if m[s] > factor * ref), None), ref


QUADRATIC = ["--set", "data.dataset=quadratic", "--set", "model.name=auto", "--set", "data.partition=iid",
             "--set", "optimizer.schedule=constant", "--set", "run.steps=200", "--set", "run.divergence_factor=5",
             "--set", "run.progress=false", "--set", "run.log_every=5", "--set", "run.eval_every=0"]


def test_divergence_decision_is_the_same_after_a_resume(tmp_path):
    args = ["run", QUICK, *QUADRATIC, "--set", "optimizer.lr=0.05"]
    check(run_hpcopt_mpi(2, [*args, "--out", tmp_path / "full"]))
    full = store.read_run(str(tmp_path / "full"))
    step, _ = rule(full, 5)
    assert step is not None and 15 < step < 199 and full["summary"]["diverged_at_step"] == step
    part = tmp_path / "part"
    proc = run_hpcopt_mpi(2, [*args, "--out", part, "--set", "run.stop_after=15"])
    assert proc.returncode == 75, proc.stderr[-2000:]
    check(run_hpcopt_mpi(2, [*args, "--out", part, "--resume"]))
    run = store.read_run(str(part))
    assert run["summary"]["diverged_at_step"] == step
    assert diverged(run) == diverged(full) and "exceeded run.divergence_factor = 5 x" in diverged(run)[0]
    assert np.array_equal(run["metrics"]["train_loss"], full["metrics"]["train_loss"])


def test_noisy_healthy_run_is_not_declared_diverged(tmp_path):
    # batch 1 and a high step size: single losses jump by far more than 5x, the mean falls
    out = tmp_path / "run"
    check(run_hpcopt_mpi(2, ["run", QUICK, "--out", out, "--set", "data.batch_size=1", "--set", "optimizer.lr=0.5",
                             "--set", "run.steps=100", "--set", "run.divergence_factor=5", "--set", "run.log_every=10",
                             "--set", "run.progress=false"]))
    run = store.read_run(str(out))
    loss, mean = run["metrics"]["train_loss"], run["metrics"]["train_loss_mean"]
    assert not diverged(run) and run["summary"]["steps"] == 100 and "diverged" not in run["summary"]
    assert mean[-10:].mean() < 0.5 * mean[:10].mean()
    assert (loss[10:] > 5 * loss[0]).any()  # a single node's loss did exceed 5x its first one


def test_teleportation_reference_is_the_mean_over_the_active_nodes(tmp_path):
    out = tmp_path / "run"
    check(run_hpcopt_mpi(2, ["run", QUICK, "--out", out, *QUADRATIC, "--set", "optimizer.lr=0.5",
                             "--set", "algorithm.name=teleport", "--set", "algorithm.k=4"]))
    run = store.read_run(str(out))
    assert np.isnan(run["metrics"]["train_loss"][0]).sum() == 12  # 12 of 16 nodes hold no token at step 0
    step, ref = rule(run, 5)
    assert run["summary"]["diverged_at_step"] == step
    assert f"x {ref:.4g}, its mean over steps 0-9" in diverged(run)[0]
