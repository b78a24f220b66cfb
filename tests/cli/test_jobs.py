"""The job scripts, run here with the launcher replaced by mpiexec (no Slurm needed)."""
import shutil
import signal
import subprocess
import sys
import time

import pytest

from hpcopt import store
from tests.helpers import REPO, env, mpiexec_path

JOBS = REPO / "jobs"
SCRIPTS = sorted(p for p in JOBS.iterdir() if p.suffix in (".sh", ".sbatch"))
QUICK = REPO / "configs" / "quickstart.yaml"


def job_env(tmp_path, ranks=2, **extra):
    exe = mpiexec_path()
    if exe is None:
        pytest.skip("no mpiexec on PATH or beside the Python interpreter (install the mpich wheel)")
    return env(HPCOPT_LAUNCHER=f"{exe} -n {ranks}", HPCOPT_PYTHON=sys.executable, HPCOPT_JOBS=str(JOBS),
               HPCOPT_REQUEUE=f"touch {tmp_path / 'requeued'}", **extra)


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    proc = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_cpu_sbatch_runs_to_the_end(tmp_path):
    proc = subprocess.run(["bash", str(JOBS / "cpu.sbatch"), str(QUICK), "--set", "run.steps=40",
                           "--out", str(tmp_path / "run")], cwd=tmp_path, env=job_env(tmp_path),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert store.read_run(str(tmp_path / "run"))["summary"]["steps"] == 40
    assert not (tmp_path / "requeued").exists()


def test_sweep_runs_each_line_in_its_own_directory(tmp_path):
    lines = tmp_path / "sweep.txt"
    lines.write_text("# lr sweep\noptimizer.lr=0.1\n\noptimizer.lr=0.2 topology.name=torus\noptimizer.lr=0.3\n"
                     "optimizer.lr=0.4 run.seed=$(touch${IFS}pwned)\n")
    for task in range(4):
        proc = subprocess.run(["bash", str(JOBS / "sweep.sbatch"), str(QUICK), str(lines), "--set", "run.steps=20",
                               "--set", f"run.out={tmp_path / 'runs'}"], cwd=tmp_path,
                              env=job_env(tmp_path, SLURM_ARRAY_TASK_ID=task), capture_output=True, text=True,
                              timeout=180)
        if task < 3:
            assert proc.returncode == 0, proc.stderr
        else:  # the shell text reached hpcopt as a literal value and was rejected, not run
            assert proc.returncode == 2 and "run.seed" in proc.stderr
    assert not (tmp_path / "pwned").exists()
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["quickstart-task0", "quickstart-task1", "quickstart-task2"]
    cfg = store.read_run(str(tmp_path / "runs" / "quickstart-task1"))["config_text"]
    assert "lr: 0.2" in cfg and "name: torus" in cfg
    proc = subprocess.run(["bash", str(JOBS / "sweep.sbatch"), str(QUICK), str(lines)], cwd=tmp_path,
                          env=job_env(tmp_path, SLURM_ARRAY_TASK_ID=7), capture_output=True, text=True)
    assert proc.returncode == 2 and "only 4 override lines" in proc.stderr


def test_usr1_checkpoints_and_requeues_then_resume_finishes(tmp_path):
    out = tmp_path / "run"
    args = ["bash", str(JOBS / "cpu.sbatch"), str(QUICK), "--set", "run.steps=1000000", "--set", "run.log_every=20",
            "--set", "optimizer.schedule=constant", "--out", str(out)]
    p = subprocess.Popen(args, cwd=tmp_path, env=job_env(tmp_path), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "run.h5").exists() or not store.readable(str(out / "run.h5")):
        assert time.monotonic() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.2)
    time.sleep(1.0)
    p.send_signal(signal.SIGUSR1)
    stdout, stderr = p.communicate(timeout=10)  # checkpointed and exited within 10 s, or TimeoutExpired
    assert p.returncode == 0, stderr
    assert (tmp_path / "requeued").exists() and "requeueing" in stderr
    info, _ = store.latest(str(out))
    stopped = info["step"]
    assert stopped > 0 and "stopped at step" in stdout
    # the requeued job runs the same script: it resumes and here runs to a nearer end
    proc = subprocess.run(args[:4] + [f"run.steps={stopped + 30}"] + args[5:], cwd=tmp_path, env=job_env(tmp_path),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert f"resuming quickstart at step {stopped}" in proc.stdout
    run = store.read_run(str(out))
    assert run["metrics"]["step"].tolist() == list(range(stopped + 30))


@pytest.mark.parametrize("ranks", ["0", "00", "-1", "abc", "", "1.5", "4x", "1234567890"])
def test_workstation_rejects_a_rank_count_that_is_not_a_positive_integer(tmp_path, ranks):
    launcher = tmp_path / "launcher"
    launcher.write_text(f"#!/bin/sh\ntouch {tmp_path / 'launched'}\n")
    launcher.chmod(0o755)
    proc = subprocess.run(["bash", str(JOBS / "workstation.sh"), ranks, str(QUICK)], cwd=tmp_path,
                          env=env(HPCOPT_MPIEXEC=str(launcher)), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"workstation.sh: NRANKS = '{ranks}' is not allowed: must be a positive integer "
                     f"(1, 2, ...; at most 9 digits)"]
    assert not (tmp_path / "launched").exists()


@pytest.mark.parametrize("ranks, expect", [("3", "3"), ("08", "8")])
def test_workstation_passes_a_good_rank_count_to_the_launcher(tmp_path, ranks, expect):
    launcher = tmp_path / "launcher"
    launcher.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path / 'args'}\n")
    launcher.chmod(0o755)
    proc = subprocess.run(["bash", str(JOBS / "workstation.sh"), ranks, str(QUICK), "--set", "run.steps=1"],
                          cwd=tmp_path, env=env(HPCOPT_MPIEXEC=str(launcher), HPCOPT_PYTHON="python3"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "args").read_text().split() == ["-n", expect, "python3", "-m", "mpi4py", "-m", "hpcopt", "run",
                                                       str(QUICK), "--set", "run.steps=1"]
