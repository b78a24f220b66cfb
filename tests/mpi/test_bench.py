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


def _cupy_sees_a_gpu() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 -- no CuPy, no driver, no device
        return False


def test_torch_vmap_bench_runs_and_checks_its_gradients(tmp_path):
    pytest.importorskip("torch", reason="torch is not installed")
    import subprocess
    out = tmp_path / "vmap.json"
    proc = subprocess.run([sys.executable, str(BENCH / "torch_nets.py"), "vmap", "--nodes", "2", "--reps", "1",
                           "--json", str(out)], env=env(), capture_output=True, text=True, timeout=120)
    check(proc)  # the script asserts vmap's and the loop's losses and gradients agree
    (row,) = json.loads(out.read_text())["rows"]
    assert row["nodes"] == 2 and row["vmap_s"] > 0 and row["loop_s"] > 0 and row["one_module_s"] > 0


def test_torch_engines_bench_runs_and_matches_ddp(tmp_path):
    pytest.importorskip("torch", reason="torch is not installed")
    out = tmp_path / "engines.json"
    check(run_mpi(2, [str(BENCH / "torch_nets.py"), "engines", "--steps", "2", "--warmup", "1", "--vectorize", "loop",
                      "--json", str(out)], timeout=180))
    res = json.loads(out.read_text())
    assert res["ranks"] == 2 and res["check_max_abs_diff"] < 1e-5  # one sync SGD step == one DDP step
    cases = {(r["case"], r["vectorize"]) for r in res["rows"]}
    assert {("sync_sgd vs ddp", "loop"), ("dsgd vs ddp", "loop"), ("sync_sgd vs plain", "loop"),
            ("dsgd vs plain", "loop"), ("loss_grad vs plain", "loop"), ("ddp vs plain", "")} == cases
    assert all(r["hpcopt_ms"] > 0 and r["baseline_ms"] > 0 for r in res["rows"])


def test_gpu_bench_without_a_gpu_prints_one_line_and_exits_0():
    if _cupy_sees_a_gpu():
        pytest.skip("CuPy sees a GPU: `python -m bench --gpu` runs the real GPU benchmarks there")
    import subprocess
    proc = subprocess.run([sys.executable, "-m", "bench", "--gpu"], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=60)
    check(proc)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "no GPU/CuPy available" in lines[0], lines
