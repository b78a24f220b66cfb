"""Analysis users look at: comparison tables, plots, CSV, runs still being written, sweeps."""
import csv
import subprocess
import sys
import time

import numpy as np
import pytest

from hpcopt import analyse, store
from tests.helpers import REPO, check, env, mpiexec_path, run_cli, run_hpcopt_mpi

QUICK = str(REPO / "configs" / "quickstart.yaml")
SYNC = str(REPO / "configs" / "sync_baseline.yaml")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for cfg, name in ((QUICK, "quickstart"), (SYNC, "sync_baseline")):
        check(run_hpcopt_mpi(2, ["run", cfg, "--out", root / name, "--set", "run.steps=300",
                                 "--set", "run.eval_every=50"]))
    return root


def test_comparison_table_csv_round_trip(two_runs, tmp_path):
    out = check(run_cli(["analyse", two_runs / "quickstart", two_runs / "sync_baseline", "--csv",
                         tmp_path / "t.csv", "--target", "0.8"])).stdout
    assert "dsgd (ring)" in out and "sync_sgd" in out and "step to 0.8" in out
    rows = {r["run"]: r for r in csv.DictReader(open(tmp_path / "t.csv"))}
    for name in ("quickstart", "sync_baseline"):
        ref = analyse.run_row(store.read_run(str(two_runs / name)), 0.8)
        for key in ("final_acc", "best_acc", "final_loss", "wall_s", "MB_per_node", "target_step"):
            assert float(rows[name][key]) == ref[key] or (np.isnan(ref[key]) and rows[name][key] == "nan")
        assert rows[name]["method"] == ref["method"] and int(rows[name]["nodes"]) == 16


def test_plots_are_written_and_not_blank(two_runs, tmp_path):
    mpl = pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'hpcopt[plot]')")
    import matplotlib.image as mpimg
    check(run_cli(["analyse", two_runs / "quickstart", two_runs / "sync_baseline", "--plot", tmp_path / "p"]))
    names = sorted(p.name for p in (tmp_path / "p").glob("*.png"))
    for expect in ("train_loss.png", "test_accuracy.png", "test_accuracy_time.png", "test_loss.png",
                   "consensus_distance.png", "time_per_rank.png"):
        assert expect in names
    for name in names:
        img = mpimg.imread(tmp_path / "p" / name)
        assert img.shape[0] >= 300 and img.shape[1] >= 400, name
        gray = img[..., :3].mean(axis=2)
        assert gray.std() > 0.02 and (gray < 0.5).mean() > 0.001, f"{name} looks blank"
    assert mpl.__version__


def test_plot_without_matplotlib_says_how_to_install(two_runs, tmp_path):
    fake = tmp_path / "fake"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('blocked for the test')\n")
    proc = subprocess.run([sys.executable, "-m", "hpcopt", "analyse", str(two_runs / "quickstart"), "--plot",
                           str(tmp_path / "p")], env=env(PYTHONPATH=f"{fake}:{REPO}"), capture_output=True, text=True)
    assert proc.returncode == 2 and "pip install 'hpcopt[plot]'" in proc.stderr


def test_analyse_a_run_while_it_is_written(tmp_path):
    exe = mpiexec_path()
    if exe is None:
        pytest.skip("no mpiexec on PATH or beside the Python interpreter (install the mpich wheel)")
    out = tmp_path / "live"
    p = subprocess.Popen([exe, "-n", "2", sys.executable, "-m", "mpi4py", "-m", "hpcopt", "run", QUICK, "--out",
                          str(out), "--set", "run.steps=1000000", "--set", "run.log_every=5",
                          "--set", "run.eval_every=25"], env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        seen = 0
        deadline = time.monotonic() + 120
        while seen < 5 and time.monotonic() < deadline:
            if store.readable(str(out / "run.h5")):
                run = store.read_run(str(out))
                m, e = run["metrics"], run["eval"]
                if "step" in m:
                    n = len(m["step"])
                    assert m["step"].tolist() == list(range(n))  # a prefix, nothing missing
                    assert all(len(m[k]) == n for k in m)
                    assert all(len(e[k]) == len(e["step"]) for k in e)
                    seen += n > 0
                    table = check(run_cli(["analyse", out])).stdout
                    assert "/1000000" in table and "live" in table
            time.sleep(0.3)
        assert seen == 5
    finally:
        p.terminate()
        p.communicate(timeout=60)


def test_sweep_runs_the_product_and_skips_finished_runs(tmp_path):
    args = ["sweep", QUICK, "--grid", "optimizer.lr=0.2,0.4", "--grid", "topology.name=ring",
            "--set", "run.steps=30", "--set", f"run.out={tmp_path}", "--ranks", "2"]
    out = check(run_cli(args, timeout=300)).stdout
    dirs = sorted(p.name for p in tmp_path.iterdir())
    assert dirs == ["quickstart-lr=0.2-name=ring", "quickstart-lr=0.4-name=ring"]
    assert out.count("dsgd (ring)") >= 2
    again = check(run_cli(args, timeout=300)).stdout
    assert again.count("finished already, skipped") == 2
    bad = run_cli(["sweep", QUICK, "--grid", "optimizer.lr=0.1,-1", "--set", f"run.out={tmp_path / 'x'}"])
    assert bad.returncode == 2 and "optimizer.lr = -1" in bad.stderr and not (tmp_path / "x").exists()
