"""Analysis users look at: comparison tables, plots, CSV, runs still being written, sweeps."""
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

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


# -- one-line errors instead of tracebacks ------------------------------------------------


def one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcopt: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def small_run(tmp_path):
    """A run directory written through the store (no MPI): 3 steps, one evaluation."""
    run = tmp_path / "small"
    run.mkdir()
    rf = store.RunFile(str(run))
    rf.create("algorithm: {name: sync_sgd}\nrun: {steps: 3}\nnodes: {n: 2}\n", {"ranks": 1, "nodes": 2})
    rf.append("metrics", {"step": np.arange(3), "wall": np.arange(3, dtype=float)})
    rf.append("eval", {"step": np.array([3]), "test_accuracy": np.array([0.5]), "test_loss": np.array([1.0])})
    rf.set_summary({"steps": 3, "wall_seconds": 2.0})
    return run


def test_analyse_of_hdf5_files_that_are_not_runs_is_one_line(tmp_path):
    import h5py
    with h5py.File(tmp_path / "weights.h5", "w") as f:
        f.create_dataset("w", data=np.zeros(3))
    with h5py.File(tmp_path / "half.h5", "w") as f:
        f.create_dataset("config", data="run: {}", dtype=h5py.string_dtype())
    one_line_error(run_cli(["analyse", tmp_path / "weights.h5"]), "weights.h5 is not an hpcopt run file",
                   "no /config or /metrics")
    one_line_error(run_cli(["analyse", tmp_path / "half.h5"]), "half.h5 is not an hpcopt run file", "no /metrics")
    (tmp_path / "text.h5").write_text("not HDF5 at all\n")
    one_line_error(run_cli(["analyse", tmp_path / "text.h5"]), "cannot read the run file")


def test_analyse_csv_that_cannot_be_written_is_one_line(small_run, tmp_path):
    (tmp_path / "file").write_text("x")
    cases = [(tmp_path, "it is a directory"),
             (tmp_path / "missing" / "t.csv", f"its directory {tmp_path / 'missing'} does not exist"),
             (tmp_path / "file" / "t.csv", f"{tmp_path / 'file'} is a file, not a directory")]
    for target, why in cases:
        proc = run_cli(["analyse", small_run, "--csv", target])
        one_line_error(proc, "--csv = '", f"' is not allowed: {why}")  # long paths are shown abbreviated
        assert proc.stdout == ""  # nothing printed before the error


def test_analyse_csv_in_a_read_only_directory_is_one_line(small_run, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # root writes through permission bits; sysfs refuses even root
            if not os.path.isdir("/sys/kernel"):
                pytest.skip("running as root and no /sys: no directory this user cannot write")
            ro = Path("/sys/kernel")
        proc = run_cli(["analyse", small_run, "--csv", ro / "t.csv"])
        one_line_error(proc, "--csv = '", "t.csv' is not allowed:", "writ")
        assert proc.stdout == "" and not (ro / "t.csv").exists()
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_analyse_plot_onto_an_existing_file_is_one_line(small_run, tmp_path):
    target = tmp_path / "plots.png"
    target.write_bytes(b"keep me")
    proc = run_cli(["analyse", small_run, "--plot", target])
    one_line_error(proc, "--plot = '", "plots.png' is not allowed: it is a file, not a directory")
    assert target.read_bytes() == b"keep me" and proc.stdout == ""
    one_line_error(run_cli(["analyse", small_run, "--plot", target / "sub"]),
                   f"{target} is a file, so no directory can be created under it")


def test_analyse_says_when_it_reads_the_backup(small_run):
    check(run_cli(["analyse", small_run]))
    store.backup_run_file(str(small_run))
    (small_run / "run.h5").write_bytes(b"\0" * 64)  # a crash in the middle of a flush
    proc = check(run_cli(["analyse", small_run]))
    assert "small" in proc.stdout and "sync_sgd" in proc.stdout
    notes = [line for line in proc.stderr.splitlines() if line.startswith("hpcopt: note:")]
    assert len(notes) == 1 and "run.h5 is unreadable" in notes[0] and "read run.h5.bak" in notes[0]
    clean = check(run_cli(["analyse", small_run.parent / "small"]))
    assert "note" in clean.stderr  # still the backup: run.h5 is still broken


def test_analyse_of_an_intact_run_prints_no_note(small_run):
    proc = check(run_cli(["analyse", small_run, "--csv", small_run / "t.csv"]))
    assert "note" not in proc.stderr and (small_run / "t.csv").exists()


@pytest.mark.parametrize("ranks", ["0", "-2"])
def test_sweep_rejects_a_rank_count_below_one(tmp_path, ranks):
    proc = run_cli(["sweep", QUICK, "--grid", "optimizer.lr=0.1", "--set", f"run.out={tmp_path / 'x'}",
                    "--ranks", ranks, "--dry-run"])
    one_line_error(proc, f"--ranks = {ranks} is not allowed: must be an integer >= 1")
    assert proc.stdout == "" and not (tmp_path / "x").exists()


TOPOLOGY_BAD = [
    (["erdos_renyi", "--n", "8", "--p", "7"], "p", "7.0", "must be <= 1"),
    (["erdos_renyi", "--n", "8", "--p", "0"], "p", "0.0", "must be > 0"),
    (["erdos_renyi", "--n", "8", "--p", "nan"], "p", "nan", "must be a finite number"),
    (["torus", "--n", "8", "--rows", "-2"], "rows", "-2", "must be >= 0"),
    (["erdos_renyi", "--n", "8", "--seed", "-1"], "seed", "-1", "must be >= 0"),
]


@pytest.mark.parametrize("args, key, shown, why", TOPOLOGY_BAD, ids=[" ".join(a[2:]) for a, *_ in TOPOLOGY_BAD])
def test_topology_cli_rejects_what_the_config_rejects(args, key, shown, why):
    line = one_line_error(run_cli(["topology", *args]), f" = {shown} is not allowed: {why}")
    assert f"--{key} = " in line or f"topology.{key} = " in line
    name, value = args[0], args[-1]
    cfg = run_cli(["config", "quickstart", "--set", f"topology.name={name}", "--set", f"topology.{key}={value}"])
    one_line_error(cfg, f"topology.{key} = {shown} is not allowed: {why}")  # the same rule


def test_topology_rules_are_the_configs():
    from hpcopt import config, topology
    for key, value in [("p", 0.5), ("p", 1.0), ("rows", 2), ("seed", 3), ("p", 1.5), ("rows", -1), ("seed", -3),
                       ("p", float("inf"))]:
        try:
            config.load(str(QUICK), ["topology.name=torus", f"topology.{key}={value}"])
            config_ok = True
        except config.ConfigError:
            config_ok = False
        try:
            topology.check_params("torus", 8, **{key: value})
            topo_ok = True
        except config.ConfigError as exc:
            topo_ok = False
            assert str(exc).startswith(f"topology.{key} = ")
        assert config_ok == topo_ok, (key, value)
    with pytest.raises(config.ConfigError, match=r"^--p = 7\.0 is not allowed: must be <= 1$"):
        topology.build("erdos_renyi", 8, p=7, keys=topology.CLI_KEYS)
