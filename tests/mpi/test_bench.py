"""Smoke runs of the benchmarks at their smallest sizes: they run, check their own
results against their baselines (bench/comm.py asserts hpcopt's mix and mean equal the
hand-written ones) and write the JSON that `python -m bench` tabulates. No timing is
asserted here; the figures belong to the benchmark runs."""
import json
import sys

import pytest

from tests.helpers import REPO, check, env, run_mpi

BENCH = REPO / "bench"


def test_comm_bench_runs_and_checks_its_results(tmp_path):
    out = tmp_path / "comm.json"
    check(run_mpi(2, [str(BENCH / "comm.py"), "--reps", "2", "--max-d", "1000", "--json", str(out)], timeout=120))
    rows = json.loads(out.read_text())["rows"]
    assert [r["op"] for r in rows] == ["mix ring", "mean", "mean polite", "mean/hand", "hand/raw", "allreduce"]
    assert all(r["d"] == 1000 and r["hpcopt_ms"] > 0 and r["baseline_ms"] > 0 for r in rows)


def test_gloo_bench_runs_when_torch_is_installed(tmp_path):
    pytest.importorskip("torch", reason="torch is not installed (the gloo baseline needs it)")
    out = tmp_path / "gloo.json"
    check(run_mpi(2, [str(BENCH / "gloo.py"), "--reps", "2", "--max-d", "1000", "--json", str(out)], timeout=180))
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["gloo_ms"] > 0 and rows[0]["hpcopt_ms"] > 0


def test_memory_bench_measures_at_least_the_state(tmp_path):
    import subprocess
    out = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, str(BENCH / "memory.py"), "--nodes", "64", "--dim", "500",
                           "--json", str(out)], env=env(), capture_output=True, text=True, timeout=120)
    check(proc)
    (row,) = json.loads(out.read_text())
    assert row["peak_MB"] >= row["state_MB"] > 0  # the state itself is allocated
