"""Shared helpers: launching hpcopt and MPI scripts in subprocesses.

Tests never initialise MPI in the pytest process; every multi-rank check runs under
`mpiexec -n N python -m mpi4py ...` with a timeout, so a failing rank aborts all and a
deadlock fails fast.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "tests" / "mpi" / "scripts"


def mpiexec_path():
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def env(**extra):
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    e.update({k: str(v) for k, v in extra.items()})
    return e


def run_cli(args, cwd=None, timeout=120, **extra):
    return subprocess.run([sys.executable, "-m", "hpcopt", *map(str, args)], cwd=cwd, env=env(**extra),
                          capture_output=True, text=True, timeout=timeout)


def run_mpi(n, args, cwd=None, timeout=180, **extra):
    exe = mpiexec_path()
    if exe is None:
        pytest.skip("no mpiexec on PATH or beside the Python interpreter (install the mpich wheel)")
    return subprocess.run([exe, "-n", str(n), sys.executable, "-m", "mpi4py", *map(str, args)], cwd=cwd,
                          env=env(**extra), capture_output=True, text=True, timeout=timeout)


def run_hpcopt_mpi(n, args, **kw):
    return run_mpi(n, ["-m", "hpcopt", *args], **kw)


def run_script(n, name, *args, **kw):
    return run_mpi(n, [str(SCRIPTS / name), *args], **kw)


def check(proc):
    assert proc.returncode == 0, (f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                                  f"stderr:\n{proc.stderr[-3000:]}")
    return proc
