"""The job scripts, run here with the launcher replaced by mpiexec or a stub (no Slurm
needed; tests/slurm runs them under a real one), and the launcher checks of `hpcopt run`."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from hpcopt import store
from tests.helpers import REPO, env, mpiexec_path, run_cli, run_hpcopt_mpi

JOBS = REPO / "jobs"
SCRIPTS = sorted(p for p in JOBS.iterdir() if p.suffix in (".sh", ".sbatch"))
QUICK = REPO / "configs" / "quickstart.yaml"


def job_env(tmp_path, ranks=2, **extra):
    exe = mpiexec_path()
    if exe is None:
        pytest.skip("no mpiexec on PATH or beside the Python interpreter (install the mpich wheel)")
    extra.setdefault("HPCOPT_SIGNAL_GRACE", "1")
    return env(HPCOPT_LAUNCHER=f"{exe} -n {ranks}", HPCOPT_PYTHON=sys.executable, HPCOPT_JOBS=str(JOBS),
               HPCOPT_REQUEUE=f"touch {tmp_path / 'requeued'}", **extra)


def stub(tmp_path, name="srun", code=0):
    """An executable `name` in tmp_path/bin that writes its arguments to tmp_path/<name>.args."""
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    exe = d / name
    exe.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path / (name + '.args')}\nexit {code}\n")
    exe.chmod(0o755)
    return d


def stub_env(tmp_path, **extra):
    e = env(PATH=f"{stub(tmp_path)}{os.pathsep}{os.environ.get('PATH', '')}", HPCOPT_JOBS=str(JOBS), **extra)
    for var in ("HPCOPT_LAUNCHER", "SLURM_MPI_TYPE", "SLURM_CPUS_PER_TASK", "SLURM_JOB_ID"):
        if var not in extra:
            e.pop(var, None)
    return e


def wait_for_steps(out, p, timeout=120):
    deadline = time.monotonic() + timeout
    while not store.readable(str(out / "run.h5")) or not len(store.read_run(str(out))["metrics"].get("step", [])):
        assert time.monotonic() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.1)


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


# -- launchers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("script, extra, expect", [
    ("cpu.sbatch", {"SLURM_CPUS_PER_TASK": "1"}, ["--mpi=pmi2", "-c", "1"]),
    ("cpu.sbatch", {}, ["--mpi=pmi2"]),
    ("cpu.sbatch", {"SLURM_MPI_TYPE": "pmix", "SLURM_CPUS_PER_TASK": "2"}, ["--mpi=pmix", "-c", "2"]),
    # Slurm 22.05's srun does not take -c from the job: without it --cpu-bind=cores gives a rank one core
    ("gpu.sbatch", {"SLURM_CPUS_PER_TASK": "8"}, ["--mpi=pmi2", "--cpu-bind=cores", "-c", "8"]),
], ids=["cpu", "cpu-no-cpus-per-task", "cpu-pmix", "gpu"])
def test_default_launcher_is_srun_with_pmi2_and_the_cpus_per_task(tmp_path, script, extra, expect):
    proc = subprocess.run(["bash", str(JOBS / script), str(QUICK), "--set", "run.steps=1"], cwd=tmp_path,
                          env=stub_env(tmp_path, HPCOPT_PYTHON="python3", **extra), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "srun.args").read_text().split() == [*expect, "python3", "-m", "mpi4py", "-m", "hpcopt", "run",
                                                            str(QUICK), "--set", "run.steps=1", "--resume"]


@pytest.mark.parametrize("task", ["entries[$(touch${IFS}pwned)0]", "$(touch pwned)", "-1", "1.5", "abc", " 1", "0x1",
                                  "1234567890", ""])
def test_sweep_rejects_an_array_task_id_that_is_not_a_non_negative_integer(tmp_path, task):
    lines = tmp_path / "sweep.txt"
    lines.write_text("optimizer.lr=0.1\noptimizer.lr=0.2\n")
    proc = subprocess.run(["bash", str(JOBS / "sweep.sbatch"), str(QUICK), str(lines)], cwd=tmp_path,
                          env=stub_env(tmp_path, SLURM_ARRAY_TASK_ID=task,
                                       HPCOPT_LAUNCHER=str(stub(tmp_path) / "srun")),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines_out = proc.stderr.strip().splitlines()
    assert len(lines_out) == 1 and lines_out[0].startswith("sweep.sbatch: SLURM_ARRAY_TASK_ID"), proc.stderr
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "srun.args").exists()


def test_sweep_reads_a_task_id_with_leading_zeros_as_decimal(tmp_path):
    lines = tmp_path / "sweep.txt"
    lines.write_text("".join(f"optimizer.lr=0.{i}\n" for i in range(1, 10)))
    proc = subprocess.run(["bash", str(JOBS / "sweep.sbatch"), str(QUICK), str(lines)], cwd=tmp_path,
                          env=stub_env(tmp_path, SLURM_ARRAY_TASK_ID="08", HPCOPT_LAUNCHER=str(stub(tmp_path) / "srun"),
                                       HPCOPT_PYTHON="python3"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "srun.args").read_text().split()
    assert "optimizer.lr=0.9" in args and "run.name=quickstart-task8" in args


def test_a_script_that_cannot_find_its_body_says_so(tmp_path):
    proc = subprocess.run(["bash", str(JOBS / "cpu.sbatch"), str(QUICK)], cwd=tmp_path,
                          env={k: v for k, v in stub_env(tmp_path).items() if k != "HPCOPT_JOBS"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"cpu.sbatch: no hpcopt-job.sh in {tmp_path}/jobs; set HPCOPT_JOBS to the jobs/ "
                                   f"directory of hpcopt")


@pytest.mark.parametrize("grace", ["x", "-1", "1.2.3", "."])
def test_a_bad_signal_grace_is_one_line(tmp_path, grace):
    proc = subprocess.run(["bash", str(JOBS / "hpcopt-job.sh"), str(QUICK)], cwd=tmp_path,
                          env=stub_env(tmp_path, HPCOPT_SIGNAL_GRACE=grace), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"hpcopt-job: HPCOPT_SIGNAL_GRACE = '{grace}' is not allowed: give seconds (e.g. 3 or 0.5)"]
    assert not (tmp_path / "srun.args").exists()


# -- signals -----------------------------------------------------------------------------------

def test_term_checkpoints_and_ends_the_job_without_a_requeue(tmp_path):
    """scancel / preemption: the script forwards TERM, hpcopt checkpoints, the job ends
    with 143 and is not requeued (the runner's 75 of today included)."""
    out = tmp_path / "run"
    p = subprocess.Popen(["bash", str(JOBS / "cpu.sbatch"), str(QUICK), "--set", "run.steps=1000000",
                          "--set", "run.log_every=20", "--out", str(out)], cwd=tmp_path, env=job_env(tmp_path),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(out, p)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=30)
    assert p.returncode == 143, stderr
    assert not (tmp_path / "requeued").exists() and "not requeueing" in stderr
    info, _ = store.latest(str(out))
    assert info is not None and f"stopped at step {info['step']} by signal SIGTERM" in stdout


def test_a_signal_in_the_first_seconds_is_held_until_the_ranks_can_take_it(tmp_path):
    """USR1 0.3 s after the start reaches the ranks after HPCOPT_SIGNAL_GRACE (here 3 s),
    while they sleep in setup (HPCOPT_FAULT sleep@-1): a checkpoint, 75, a requeue."""
    out = tmp_path / "run"
    p = subprocess.Popen(["bash", str(JOBS / "cpu.sbatch"), str(QUICK), "--set", "run.steps=1000000",
                          "--out", str(out)], cwd=tmp_path,
                         env=job_env(tmp_path, HPCOPT_SIGNAL_GRACE="3", HPCOPT_FAULT="sleep@-1:0:4"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    p.send_signal(signal.SIGUSR1)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0 and (tmp_path / "requeued").exists(), stderr
    assert "got USR1" in stderr and "by signal SIGUSR1; checkpoint written" in stdout
    assert store.latest(str(out))[0]["step"] == 1  # stopped at the first step boundary


def test_hpcopt_exits_143_after_a_sigterm_stop(tmp_path):
    out = tmp_path / "run"
    proc = run_hpcopt_mpi(2, ["run", QUICK, "--set", "run.steps=200", "--out", out], HPCOPT_FAULT="term@10:0")
    assert proc.returncode == 143, proc.stderr
    info, _ = store.latest(str(out))
    assert info["step"] == 11 and "stopped at step 11 by signal SIGTERM" in proc.stdout


def test_a_signal_while_hpcopt_reads_its_config_is_not_lost(tmp_path):
    fifo = tmp_path / "quick.yaml"  # hpcopt blocks reading its config until the test writes it
    os.mkfifo(fifo)
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "hpcopt", "run", str(fifo), "--set", "run.steps=1000000",
                          "--out", str(out)], env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while True:  # a non-blocking open for writing succeeds once hpcopt has opened the config
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.01)
    try:
        p.send_signal(signal.SIGUSR1)
        time.sleep(0.2)
        os.write(fd, QUICK.read_bytes())
    finally:
        os.close(fd)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 75, (p.returncode, stderr)
    assert "by signal SIGUSR1" in stdout


@pytest.mark.parametrize("launcher_env", [{"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0"},
                                          {"PMI_SIZE": "3", "PMI_RANK": "0"},
                                          {"OMPI_COMM_WORLD_SIZE": "4"}], ids=["srun-no-mpi", "pmi", "ompi"])
def test_a_launcher_mismatch_is_one_line_and_writes_nothing(tmp_path, launcher_env):
    """One of several launched tasks that MPI sees as a world of one (srun --mpi=none, or
    another library's launcher) stops before anything is written."""
    out = tmp_path / "run"
    proc = run_cli(["run", QUICK, "--out", out], cwd=tmp_path, **launcher_env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    if "OMPI_COMM_WORLD_SIZE" in launcher_env:  # mpi4py warns itself ("suspicious MPI execution environment")
        lines = [line for line in lines if line.startswith("hpcopt")]
    assert len(lines) == 1 and lines[0].startswith("hpcopt: launcher mismatch: this process is one of "), proc.stderr
    assert "srun --mpi=pmi2" in lines[0] and "world of 1" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("launcher_env", [{"SLURM_STEP_ID": "3", "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"},
                                          {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_PROCID": "0"}],
                         ids=["mpiexec-inside-an-allocation", "batch-script"])
def test_matching_launchers_run(tmp_path, launcher_env):
    """mpiexec inside an allocation starts its proxy as one Slurm task, but its PMI_SIZE
    is the world; a plain run in the batch script (no step) is one process."""
    out = tmp_path / "run"
    if "SLURM_STEP_ID" in launcher_env:
        proc = run_hpcopt_mpi(2, ["run", QUICK, "--set", "run.steps=2", "--out", out], **launcher_env)
    else:
        proc = run_cli(["run", QUICK, "--set", "run.steps=2", "--out", out], **launcher_env)
    assert proc.returncode == 0, proc.stderr
    assert store.read_run(str(out))["summary"]["steps"] == 2


def test_a_signal_before_the_body_is_sourced_is_kept_and_the_body_found_from_the_job_command(tmp_path):
    """The sbatch script traps USR1 / TERM on its first lines: a USR1 while it looks up its
    own path (`scontrol show job`: Slurm runs a copy of the script, so the submitted path
    comes from the job's Command) is forwarded once hpcopt runs."""
    out = tmp_path / "run"
    args = [str(QUICK), "--set", "run.steps=1000000", "--out", str(out)]
    d = stub(tmp_path, "unused")
    (d / "scontrol").write_text(f"#!/bin/sh\nsleep 1\necho '   Command={JOBS / 'cpu.sbatch'} {' '.join(args)}'\n")
    (d / "scontrol").chmod(0o755)
    e = job_env(tmp_path, HPCOPT_SIGNAL_GRACE="3", HPCOPT_FAULT="sleep@-1:0:4", SLURM_JOB_ID="42",
                PATH=f"{d}{os.pathsep}{os.environ.get('PATH', '')}")
    del e["HPCOPT_JOBS"]
    copy = tmp_path / "slurm_script"  # what slurmd runs: a copy, away from jobs/
    copy.write_text((JOBS / "cpu.sbatch").read_text())
    p = subprocess.Popen(["bash", str(copy), *args], cwd=tmp_path, env=e, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # inside the scontrol lookup: the body is not sourced yet
    p.send_signal(signal.SIGUSR1)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0 and (tmp_path / "requeued").exists(), stderr
    assert "got USR1" in stderr and "by signal SIGUSR1; checkpoint written" in stdout
