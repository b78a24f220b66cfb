"""The job scripts under a real Slurm (the private single-node cluster of conftest.py).

Small runs on 1-4 tasks (the scripts' task counts are overridden on the command line, as
the README tells users of small nodes to do), so each job takes seconds; the time-limit
job, which has to wait for slurmctld's 30-second signal check, is submitted first and
checked last, so its waiting overlaps the other tests.
"""
from __future__ import annotations

import re
import subprocess
import sys
import time

import numpy as np
import pytest

from hpcopt import store
from tests.helpers import REPO, env, mpiexec_path

JOBS = REPO / "jobs"
QUICK = REPO / "configs" / "quickstart.yaml"
PY = sys.executable


def job_env(**extra):
    """What a user's shell exports to sbatch: hpcopt's interpreter and the repository on
    PYTHONPATH (no HPCOPT_JOBS: the scripts find their body themselves)."""
    e = {k: v for k, v in env(**extra).items() if k in ("PYTHONPATH", "OMP_NUM_THREADS", *extra)}
    e["HPCOPT_PYTHON"] = PY
    return e


def log_of(tmp, name, jid):
    return (tmp / f"{name}-{jid}.out").read_text(errors="replace")


def wait_readable(path, timeout=60, job=None, slurm=None):
    deadline = time.monotonic() + timeout
    while not (path.exists() and store.readable(str(path))):
        if slurm is not None and slurm.job(job)["JobState"] not in ("PENDING", "RUNNING"):
            raise AssertionError(f"job {job} ended before {path} was written: {slurm.job(job)}")
        assert time.monotonic() < deadline, f"{path} not written within {timeout} s"
        time.sleep(0.1)


def restarts(job) -> int:
    return int(job["Restarts"])


# -- (h) the time-limit path, started first -------------------------------------------------
# --time=1 with --signal=B:USR1@55: Slurm sends USR1 once fewer than 55 s remain, but
# checks only every 30 s, so it comes 5-35 s after the start. The single rank sleeps at step
# 3 for 36 s (HPCOPT_FAULT) so the signal always finds the run going and the stop comes
# well before the limit; the requeued start resumes at step 4 and finishes in seconds.

TIME_LIMIT_STEPS = 60


@pytest.fixture(scope="module", autouse=True)
def time_limit_job(request, slurm, tmp_path_factory):
    if not any(item.originalname == "test_time_limit_signal_requeues_and_the_run_finishes"
               for item in request.session.items):
        return None  # not selected: nothing to start
    tmp = tmp_path_factory.mktemp("time-limit")
    jid = slurm.sbatch(["--time=1", "--signal=B:USR1@55", "--ntasks-per-node=1", JOBS / "cpu.sbatch", QUICK,
                        "--set", f"run.steps={TIME_LIMIT_STEPS}", "--set", "run.log_every=10", "--out", tmp / "run"],
                       cwd=tmp, **job_env(HPCOPT_FAULT="sleep@3:0:36"))
    return tmp, jid


# -- (a) cpu.sbatch -------------------------------------------------------------------------

def test_cpu_sbatch_completes_when_submitted_from_outside_the_repository(slurm, tmp_path):
    jid = slurm.sbatch(["--ntasks-per-node=4", JOBS / "cpu.sbatch", QUICK, "--set", "run.steps=200"], cwd=tmp_path,
                       **job_env())
    job = slurm.wait(jid, timeout=90)
    log = (tmp_path / f"hpcopt-cpu-{jid}.out")  # the log: <job name>-<job id>.out in the submit directory
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", (job, log.read_text())
    run = store.read_run(str(tmp_path / "runs" / "quickstart"))  # run.out is relative to the submit directory
    assert run["summary"]["steps"] == 200 and run["attrs"]["ranks"] == 4
    assert run["metrics"]["step"].tolist() == list(range(200))
    proc = subprocess.run([PY, "-m", "hpcopt", "analyse", str(tmp_path / "runs" / "quickstart")], env=env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "dsgd (ring)" in proc.stdout, proc.stderr


def test_shipped_scripts_fit_the_node_as_they_are(slurm, tmp_path):
    """sbatch --test-only: cpu.sbatch (16 tasks) and a 3-task sweep unchanged; gpu.sbatch
    (4 tasks x 8 CPUs, 4 GPUs per node) on one node against the fake GPU GRES."""
    for argv in ([JOBS / "cpu.sbatch", QUICK], [JOBS / "sweep.sbatch", QUICK, "lines.txt"],
                 ["--nodes=1", JOBS / "gpu.sbatch", QUICK, "--set", "device.kind=gpu"]):
        p = slurm.run(["sbatch", "--test-only", *argv], cwd=tmp_path)
        assert p.returncode == 0 and "to start at" in p.stderr, (argv, p.stdout, p.stderr)
    p = slurm.run(["sbatch", "--test-only", "--nodes=1", "--gpus-per-node=5", JOBS / "gpu.sbatch", QUICK],
                  cwd=tmp_path)
    assert p.returncode != 0, "the fake node has 4 GPUs: asking for 5 must be refused"


def test_gpu_sbatch_gives_each_rank_its_cpus(slurm, tmp_path):
    """gpu.sbatch's srun passes -c $SLURM_CPUS_PER_TASK (srun in 22.05 does not take it from
    the job): the step asks for cpus-per-task CPUs per task, not one. CPU ranks here, on one
    node with 2 of the fake GPUs; rank 0 sleeps 3 s so the step can be looked at."""
    jid = slurm.sbatch(["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=4", "--gpus-per-node=2",
                        JOBS / "gpu.sbatch", QUICK, "--set", "run.steps=20", "--set", "device.kind=cpu",
                        "--out", tmp_path / "run"], cwd=tmp_path, **job_env(HPCOPT_FAULT="sleep@5:0:3"))
    deadline = time.monotonic() + 60
    step = ""
    while time.monotonic() < deadline and "NumTasks=" not in step and "Tasks=" not in step:
        p = slurm.run(["scontrol", "show", "step", "-o", f"{jid}.0"], timeout=20)
        step = p.stdout if p.returncode == 0 else ""
        if slurm.job(jid)["JobState"] not in ("PENDING", "RUNNING"):
            break
        time.sleep(0.1)
    job = slurm.wait(jid, timeout=60)
    log = log_of(tmp_path, "hpcopt-gpu", jid)
    assert job["JobState"] == "COMPLETED", (job, log)
    fields = dict(re.findall(r"(\w+)=(\S*)", step))
    # without -c: TresPerStep=cpu:2 and no TresPerTask (each rank bound to one core under task/affinity)
    assert fields.get("Tasks") == "2" and fields.get("TresPerTask") == "cpu:4", step
    assert fields.get("TresPerStep") == "cpu:8", step
    assert store.read_run(str(tmp_path / "run"))["attrs"]["ranks"] == 2


# -- (b) sweep.sbatch -----------------------------------------------------------------------

def test_sweep_array_runs_each_task_in_its_own_directory(slurm, tmp_path):
    lines = tmp_path / "sweep.txt"
    lines.write_text("# lr sweep\noptimizer.lr=0.1\n\noptimizer.lr=0.2 topology.name=torus\noptimizer.lr=0.3\n")
    jid = slurm.sbatch(["--array=0-2", "--ntasks-per-node=2", JOBS / "sweep.sbatch", QUICK, lines,
                        "--set", "run.steps=100", "--set", f"run.out={tmp_path / 'runs'}"], cwd=tmp_path, **job_env())
    jobs = slurm.wait(jid, timeout=90)
    assert sorted(j["ArrayTaskId"] for j in jobs) == ["0", "1", "2"]
    for j in jobs:
        task = j["ArrayTaskId"]
        log = (tmp_path / f"hpcopt-sweep-{jid}_{task}.out").read_text()
        assert j["JobState"] == "COMPLETED", (j, log)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [f"quickstart-task{i}" for i in range(3)]
    for i, (lr, topo) in enumerate([("0.1", "ring"), ("0.2", "torus"), ("0.3", "ring")]):
        run = store.read_run(str(tmp_path / "runs" / f"quickstart-task{i}"))
        assert f"lr: {lr}" in run["config_text"] and f"name: {topo}" in run["config_text"]
        assert run["summary"]["steps"] == 100


# -- (c) USR1 -> checkpoint -> 75 -> requeue -> resume, and (e) a signal at a requeued start --
# Every start sleeps 4 s in setup (HPCOPT_FAULT sleep@-1), after hpcopt has installed its
# handlers; a signal in the first 3 s after the launch (HPCOPT_SIGNAL_GRACE) is held by the
# job script, so the signal sent 0.3 s into the requeued start reaches the ranks in setup.

REQUEUE_SETS = ["--set", "run.steps=1500", "--set", "run.log_every=50", "--set", "run.eval_every=100"]


@pytest.fixture(scope="module")
def requeued(slurm, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("requeue")
    exe = mpiexec_path()
    assert exe, "no mpiexec beside the Python interpreter (install the mpich wheel)"
    reference = subprocess.Popen([exe, "-n", "2", PY, "-m", "mpi4py", "-m", "hpcopt", "run", str(QUICK), *REQUEUE_SETS,
                                  "--out", str(tmp / "reference")], env=env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    out = tmp / "run"
    jid = slurm.sbatch(["--ntasks-per-node=2", JOBS / "cpu.sbatch", QUICK, *REQUEUE_SETS, "--out", out], cwd=tmp,
                       **job_env(HPCOPT_FAULT="sleep@-1:0:4", HPCOPT_SIGNAL_GRACE="3"))
    wait_readable(out / "run.h5", job=jid, slurm=slurm)  # written after setup: the handlers are installed
    assert slurm.run(["scancel", "--signal=USR1", "--batch", jid]).returncode == 0
    slurm.wait(jid, timeout=60, until=lambda j: restarts(j) >= 1 and j["JobState"] == "RUNNING")
    time.sleep(0.3)  # (e): within the first second of the requeued start
    assert slurm.run(["scancel", "--signal=USR1", "--batch", jid]).returncode == 0
    job = slurm.wait(jid, timeout=90)
    ref_out, ref_err = reference.communicate(timeout=120)
    assert reference.returncode == 0, ref_err
    return {"job": job, "log": log_of(tmp, "hpcopt-cpu", jid), "run": store.read_run(str(out)),
            "reference": store.read_run(str(tmp / "reference"))}


def test_usr1_checkpoints_requeues_and_the_resumed_run_equals_an_uninterrupted_one(requeued):
    job, log, run, ref = requeued["job"], requeued["log"], requeued["run"], requeued["reference"]
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", (job, log)
    assert restarts(job) >= 1 and log.count("requeueing: scontrol requeue") >= 1, log
    assert "by signal SIGUSR1; checkpoint written" in log and "resuming quickstart at step" in log, log
    resumes = [m for k, m in zip(run["events"]["kind"], run["events"]["message"]) if k == "resume"]
    assert len(resumes) == restarts(job), run["events"]
    assert run["metrics"]["step"].tolist() == list(range(1500))
    np.testing.assert_allclose(run["metrics"]["train_loss"], ref["metrics"]["train_loss"], rtol=1e-6, atol=0)
    assert run["eval"]["step"].tolist() == ref["eval"]["step"].tolist()
    np.testing.assert_allclose(run["eval"]["test_accuracy"], ref["eval"]["test_accuracy"], rtol=1e-6)
    assert run["summary"]["final_test_accuracy"] == pytest.approx(ref["summary"]["final_test_accuracy"], rel=1e-6)


def test_a_signal_in_the_first_second_of_a_requeued_start_requeues_again(requeued):
    job, log = requeued["job"], requeued["log"]
    assert job["JobState"] == "COMPLETED", (job, log)
    assert restarts(job) == 2 and log.count("requeueing: scontrol requeue") == 2, log
    second = log.split("requeueing: scontrol requeue")[1]  # the requeued start's part of the log
    assert "got USR1" in second and "resuming quickstart at step" in second, log
    assert log.count("by signal SIGUSR1; checkpoint written") == 2 and "exited with exit code 138" not in log.lower()


def test_summary_describes_the_whole_run_after_resumes(requeued):
    run, ref = requeued["run"]["summary"], requeued["reference"]["summary"]
    assert run["steps"] == ref["steps"] == 1500
    assert run["best_test_accuracy"] == pytest.approx(ref["best_test_accuracy"], rel=1e-9)
    assert run["bytes_per_node"] == pytest.approx(ref["bytes_per_node"], rel=1e-9)
    assert run["bytes_sent_total"] == pytest.approx(ref["bytes_sent_total"], rel=1e-9)
    assert run["steps_this_session"] < 1500 and run.get("sessions") == 3


# -- (d) scancel ends the job --------------------------------------------------------------

@pytest.fixture(scope="module")
def cancelled(slurm, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scancel")
    out = tmp / "run"
    jid = slurm.sbatch(["--ntasks-per-node=2", JOBS / "cpu.sbatch", QUICK, "--set", "run.steps=1000000",
                        "--set", "run.log_every=50", "--out", out], cwd=tmp, **job_env(HPCOPT_SIGNAL_GRACE="1"))
    wait_readable(out / "run.h5", job=jid, slurm=slurm)
    deadline = time.monotonic() + 30
    while not len(store.read_run(str(out))["metrics"].get("step", [])):  # stepping, handlers long installed
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert slurm.run(["scancel", jid]).returncode == 0
    log = tmp / f"hpcopt-cpu-{jid}.out"
    deadline = time.monotonic() + 30  # the job script's last word
    while "requeueing" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # a requeue would show at once (Restarts counts up when it is asked for)
    return {"job": slurm.job(jid), "log": log.read_text(), "out": out}


def test_scancel_ends_the_job_for_good_with_its_checkpoint(cancelled):
    job, log, out = cancelled["job"], cancelled["log"], cancelled["out"]
    assert job["JobState"] == "CANCELLED" and restarts(job) == 0, (job, log)
    assert "not requeueing" in log and "requeueing: scontrol" not in log, log
    info, skipped = store.latest(str(out))
    assert info is not None and not skipped, log
    run = store.read_run(str(out))
    stops = [m for k, m in zip(run["events"]["kind"], run["events"]["message"]) if k == "stopped"]
    assert len(stops) == 1 and "SIGTERM" in stops[0] and f"step {info['step']}" in stops[0], run["events"]


def test_scancel_stop_has_its_own_exit_status(cancelled):
    assert "exited with exit code 143" in cancelled["log"].lower(), cancelled["log"]


# -- (f) a launcher mismatch -----------------------------------------------------------------

def test_srun_without_an_mpi_plugin_fails_with_one_line_and_writes_nothing(slurm, tmp_path):
    out = tmp_path / "run"
    p = slurm.run(["srun", "--mpi=none", "-n", "2", PY, "-m", "hpcopt", "run", QUICK, "--set", "run.steps=20",
                   "--out", out], cwd=tmp_path, extra_env=job_env(), timeout=90)
    assert p.returncode == 2, (p.stdout, p.stderr)
    ours = [line for line in (p.stdout + p.stderr).splitlines() if line.startswith("hpcopt")]
    assert len(ours) == 1, p.stderr
    assert "one of 2 tasks" in ours[0] and "world of 1" in ours[0] and "srun --mpi=pmi2" in ours[0], ours
    assert not out.exists() and not (tmp_path / "runs").exists()
    # the fix it names works
    p = slurm.run(["srun", "--mpi=pmi2", "-n", "2", PY, "-m", "mpi4py", "-m", "hpcopt", "run", QUICK,
                   "--set", "run.steps=20", "--out", out], cwd=tmp_path, extra_env=job_env(), timeout=90)
    assert p.returncode == 0, p.stderr
    assert store.read_run(str(out))["attrs"]["ranks"] == 2


# -- a second job on the same run directory ------------------------------------------------------

def test_a_second_job_on_the_same_run_directory_exits_2_naming_the_first(slurm, tmp_path):
    out = tmp_path / "run"
    args = ["--ntasks-per-node=1", JOBS / "cpu.sbatch", QUICK, "--set", "run.steps=60", "--set", "run.log_every=10",
            "--out", out]
    first = slurm.sbatch(args, cwd=tmp_path, **job_env(HPCOPT_FAULT="sleep@20:0:8"))
    wait_readable(out / "run.h5", job=first, slurm=slurm)
    second = slurm.sbatch(args, cwd=tmp_path, **job_env())
    job2 = slurm.wait(second, timeout=60)
    job1 = slurm.wait(first, timeout=60)
    log2 = log_of(tmp_path, "hpcopt-cpu", second)
    assert job1["JobState"] == "COMPLETED", log_of(tmp_path, "hpcopt-cpu", first)
    assert job2["JobState"] == "FAILED" and job2["ExitCode"] == "2:0", (job2, log2)
    lines = [line for line in log2.splitlines() if line.startswith("hpcopt:")]
    assert len(lines) == 1 and f"Slurm job {first}" in lines[0] and "pid" in lines[0], log2
    run = store.read_run(str(out))
    assert run["metrics"]["step"].tolist() == list(range(60))
    assert list(run["events"]["kind"]).count("finished") == 1


# -- (h) checked last --------------------------------------------------------------------------

def test_time_limit_signal_requeues_and_the_run_finishes(slurm, time_limit_job):
    tmp, jid = time_limit_job
    job = slurm.wait(jid, timeout=150)
    log = log_of(tmp, "hpcopt-cpu", jid)
    assert job["JobState"] == "COMPLETED" and restarts(job) >= 1, (job, log)
    assert "got USR1" in log and "by signal SIGUSR1; checkpoint written" in log, log
    run = store.read_run(str(tmp / "run"))
    assert run["summary"]["steps"] == TIME_LIMIT_STEPS
    assert run["metrics"]["step"].tolist() == list(range(TIME_LIMIT_STEPS))
