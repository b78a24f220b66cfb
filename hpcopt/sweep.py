"""`hpcopt sweep CONFIG --grid KEY=V1,V2 [--grid ...]`: the product of the grids on a workstation.

Each combination runs as its own `hpcopt run` (under `mpiexec -n RANKS` when RANKS > 1) in
its own run directory `<run.out>/<run.name>-<key>=<value>-...`; a combination whose run
already finished is skipped, an interrupted one is resumed. At the end the comparison
table of all of them is printed (`hpcopt analyse` over the same directories).
"""
from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
from typing import List, Sequence, Tuple

from . import config as config_mod
from . import store
from .config import ConfigError


def parse_grid(items: Sequence[str]) -> List[Tuple[str, List[str]]]:
    grid = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,... e.g. optimizer.lr=0.1,0.05")
        key, values = item.split("=", 1)
        vals = [v for v in values.split(",") if v != ""]
        if not vals:
            raise ConfigError(f"--grid {item!r}: no values")
        grid.append((key.strip(), vals))
    return grid


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", text)


def plan(path: str, grid_items: Sequence[str], overrides: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """(run directory, overrides) of every combination; every config is validated first."""
    grid = parse_grid(grid_items)
    out = []
    for combo in itertools.product(*[[(k, v) for v in vals] for k, vals in grid]):
        sets = list(overrides) + [f"{k}={v}" for k, v in combo]
        cfg = config_mod.load(path, sets)  # one-line error, before anything runs
        suffix = "-".join(_slug(f"{k.split('.')[-1]}={v}") for k, v in combo)
        out.append((os.path.join(cfg.run.out, f"{cfg.run.name}-{suffix}"), sets))
    return out


def _command(path: str, run_dir: str, sets: Sequence[str], ranks: int) -> List[str]:
    base = [sys.executable, "-m", "hpcopt", "run", path, "--out", run_dir, "--resume"]
    for s in sets:
        base += ["--set", s]
    if ranks <= 1:
        return base
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = here if os.path.exists(here) else shutil.which("mpiexec")
    if mpiexec is None:
        raise ConfigError("--ranks > 1 needs mpiexec on PATH (pip install mpich, or load your site MPI)")
    return [mpiexec, "-n", str(ranks), sys.executable, "-m", "mpi4py"] + base[1:]


def main(path: str, grid_items: Sequence[str], overrides: Sequence[str], ranks: int, dry_run: bool) -> int:
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ConfigError(f"--ranks = {config_mod._show(ranks)} is not allowed: must be an integer >= 1 "
                          f"(MPI ranks per run)")
    runs = plan(path, grid_items, overrides)
    failed = []
    for i, (run_dir, sets) in enumerate(runs, 1):
        cmd = _command(path, run_dir, sets, ranks)
        head = f"[{i}/{len(runs)}] {run_dir}"
        if dry_run:
            print(head + ": " + " ".join(cmd))
            continue
        if os.path.exists(os.path.join(run_dir, store.RUN_FILE)) and \
                store.read_run(run_dir)["summary"].get("steps") is not None:
            print(head + ": finished already, skipped", flush=True)
            continue
        print(head, flush=True)
        code = subprocess.call(cmd)
        if code not in (0,):
            failed.append((run_dir, code))
    if dry_run:
        return 0
    from . import analyse
    rows = [analyse.run_row(store.read_run(d)) for d, _ in runs if store.readable(os.path.join(d, store.RUN_FILE))]
    if rows:
        print(analyse.format_table(rows))
    for run_dir, code in failed:
        print(f"hpcopt: sweep run {run_dir} exited with status {code}", file=sys.stderr)
    return 1 if failed else 0
