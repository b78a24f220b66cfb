"""Neural-network configs and inputs from the command line: the papers' configs run on
stand-in data of the right shape, bad factories and image files end in one line, exit 2."""
import gzip
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from hpcopt import store
from tests.helpers import REPO, check, run_cli

PAPERS = sorted((REPO / "configs" / "papers").glob("*.yaml"))


def cifar_standin(root: Path, per_batch: int = 40, seed: int = 0) -> Path:
    """cifar-10-batches-bin with a few random records per file (label byte + 3072 pixels)."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        rec = np.zeros((per_batch, 3073), np.uint8)
        rec[:, 0] = np.arange(per_batch) % 10
        rec[:, 1:] = rng.integers(0, 256, (per_batch, 3072))
        (d / name).write_bytes(rec.tobytes())
    return d


def test_every_paper_config_is_here_and_documented():
    names = {p.stem for p in PAPERS}
    assert {"teleport_vgg11_cifar10", "dsgd_vgg11_cifar10", "dpsgd_resnet20_cifar10", "ssgd_resnet20_cifar10",
            "hybrid_cnn_cifar10", "local_adam_resnet20_cifar10"} <= names
    for p in PAPERS:
        head = p.read_text().split("run:")[0]
        assert "arXiv" in head and "Our choices" in head, p.name  # where the numbers come from


def _paper_run(path: Path, root: Path):
    data = cifar_standin(root / "data")
    sets = [f"data.path={data}", "run.steps=3", "nodes.n=2", "data.batch_size=2", "run.eval_every=0",
            "run.log_every=1", "run.checkpoint_every=0", "algorithm.search_steps=1", "algorithm.budget_gradients=3",
            "diagnostics.batch_size=4", "diagnostics.power_iters=2", "model.threads=1"]
    if "diagnostics:" in path.read_text():
        sets.append("diagnostics.every=3")
    args = ["run", path, "--out", root / "run"]
    for s in sets:
        args += ["--set", s]
    return run_cli(args, timeout=600)


@pytest.fixture(scope="module")
def paper_runs(tmp_path_factory):
    """Every paper config for 3 steps on stand-in CIFAR-10 files, two processes at a time."""
    base = tmp_path_factory.mktemp("papers")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {p.stem: (pool.submit(_paper_run, p, base / p.stem), base / p.stem) for p in PAPERS}
        return {stem: (f.result(), root) for stem, (f, root) in futures.items()}


@pytest.mark.parametrize("path", PAPERS, ids=[p.stem for p in PAPERS])
def test_paper_config_runs_three_steps_on_standin_data(paper_runs, path):
    proc, root = paper_runs[path.stem]
    check(proc)
    run = store.read_run(str(root / "run"))
    assert run["attrs"]["dataset"] == "cifar10" and np.isfinite(run["summary"]["final_test_loss"])


def write_idx(path: Path, arr: np.ndarray, magic: int, gz: bool = False) -> None:
    head = struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in arr.shape)
    raw = head + arr.astype(np.uint8).tobytes()
    (gzip.open(str(path) + ".gz", "wb") if gz else open(path, "wb")).write(raw)


def mnist_dir(root: Path, n: int = 64, bad: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for stem, count in (("train", n), ("t10k", n // 4)):
        imgs = rng.integers(0, 256, (count, 28, 28))
        labels = np.arange(count) % 10
        write_idx(root / f"{stem}-images-idx3-ubyte", imgs, 0x803 if bad != "magic" else 0x999)
        write_idx(root / f"{stem}-labels-idx1-ubyte", labels if bad != "label" else labels + 20, 0x801)
    if bad == "truncated":
        p = root / "train-images-idx3-ubyte"
        p.write_bytes(p.read_bytes()[:-100])
    return root


FACTORY_CASES = [
    ("no_colon", "just_a_name", "model.factory"),
    ("no_module", "hpcopt_missing_module:build", "no module named"),
    ("no_attribute", "hpcopt.models.nets:missing", "has no attribute"),
    ("no_file", "missing_dir/net.py:build", "no file"),
    ("not_callable", "{file}:VALUE", "not a function"),
    ("not_a_module", "{file}:returns_int", "not a torch.nn.Module"),
    ("wrong_output", "{file}:wrong_classes", "class scores"),
    ("raises", "{file}:raises", "failed"),
    ("syntax_error", "{bad}:build", "SyntaxError"),
]

USER_FILE = '''import torch
VALUE = 3
def returns_int(shape, classes):
    return 3
def wrong_classes(shape, classes):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, classes + 2))
def raises(shape, classes):
    raise ValueError("no such layer")
'''


IMAGE_CASES = [("magic", "magic"), ("label", "label"), ("truncated", "bytes"), ("missing", "data.path")]


def _factory_case(root: Path, spec: str):
    root.mkdir(parents=True)
    (root / "user_nets.py").write_text(USER_FILE)
    (root / "broken.py").write_text("def build(shape classes):\n")
    spec = spec.format(file=root / "user_nets.py", bad=root / "broken.py")
    return run_cli(["run", "quickstart", "--out", root / "run", "--set", "model.name=torch",
                    "--set", f"model.factory={spec}", "--set", "run.steps=1"], cwd=root, timeout=120)


def _image_case(root: Path, bad: str):
    d = root / "mnist"
    if bad != "missing":
        mnist_dir(d, bad=bad)
    return run_cli(["run", "quickstart", "--out", root / "run", "--set", "data.dataset=mnist",
                    "--set", f"data.path={d}", "--set", "model.name=lenet", "--set", "run.steps=1"], timeout=120)


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Every bad-factory and bad-image case at once, a few processes at a time (each is
    mostly interpreter and torch start-up): {("factory" | "image", case): (process, root)}."""
    base = tmp_path_factory.mktemp("bad_torch_inputs")
    jobs = {("factory", case): (_factory_case, base / f"factory-{case}", spec) for case, spec, _ in FACTORY_CASES}
    jobs.update({("image", bad): (_image_case, base / f"image-{bad}", bad) for bad, _ in IMAGE_CASES})
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {key: (pool.submit(fn, root, arg), root) for key, (fn, root, arg) in jobs.items()}
        return {key: (f.result(), root) for key, (f, root) in futures.items()}


def _one_line_exit_2(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.parametrize("case,spec,expect", FACTORY_CASES, ids=[c[0] for c in FACTORY_CASES])
def test_bad_factory_is_one_line_exit_2(bad_runs, case, spec, expect):
    proc, root = bad_runs["factory", case]
    line = _one_line_exit_2(proc)
    assert line.startswith("hpcopt: ") and expect in line, line
    assert not (root / "run" / "run.h5").exists()


@pytest.mark.parametrize("bad,expect", IMAGE_CASES)
def test_bad_image_files_are_one_line_exit_2(bad_runs, bad, expect):
    proc, _ = bad_runs["image", bad]
    assert expect in _one_line_exit_2(proc).lower()


def test_lenet_trains_on_idx_files(tmp_path):
    d = mnist_dir(tmp_path / "mnist", n=128)
    check(run_cli(["run", "quickstart", "--out", tmp_path / "run", "--set", "data.dataset=mnist",
                   "--set", f"data.path={d}", "--set", "model.name=lenet", "--set", "run.steps=3",
                   "--set", "nodes.n=4", "--set", "run.eval_every=0"], timeout=300))
    assert store.read_run(str(tmp_path / "run"))["attrs"]["dim"] == 61750
