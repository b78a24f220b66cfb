"""Tables and plots from run files: `hpcopt analyse RUN [RUN ...]`.

Works on finished runs and on runs still being written (figures then come from the
last evaluation and the last flushed metrics row). Plots need matplotlib (the `plot`
extra); everything else needs only NumPy and h5py.
"""
from __future__ import annotations

import csv
import glob
import os
import sys
from typing import List

import numpy as np
import yaml

from . import store
from .config import ConfigError, _show


def _last(a, default=float("nan")):
    return float(a[-1]) if a is not None and len(a) else default


def _best(a, mode="max"):
    if a is None or not len(a):
        return float("nan")
    a = np.asarray(a, dtype=float)
    if np.all(np.isnan(a)):
        return float("nan")
    return float(np.nanmax(a) if mode == "max" else np.nanmin(a))


def session_wall(m: dict) -> np.ndarray:
    """Wall seconds since the first start, across resumed sessions (each restarts at 0)."""
    wall = np.asarray(m.get("wall", np.zeros(0)), dtype=float)
    if wall.size < 2:
        return wall
    jumps = np.nonzero(np.diff(wall) < 0)[0]
    out = wall.copy()
    for j in jumps:
        out[j + 1:] += out[j]
    return out


def eval_wall(run: dict) -> np.ndarray:
    """Wall time of each evaluation row (the end of the step before it)."""
    m, e = run["metrics"], run["eval"]
    if "step" not in e or "step" not in m or not len(m["step"]):
        return np.full(len(e.get("step", [])), np.nan)
    return np.interp(np.asarray(e["step"]) - 1, m["step"], session_wall(m))


def time_to_target(run: dict, target: float):
    """(step, seconds) of the first evaluation with test accuracy >= target, or (nan, nan)."""
    acc = np.asarray(run["eval"].get("test_accuracy", []), dtype=float)
    hit = np.nonzero(acc >= target)[0]
    if not hit.size:
        return float("nan"), float("nan")
    return float(run["eval"]["step"][hit[0]]), float(eval_wall(run)[hit[0]])


def run_row(run: dict, target=None) -> dict:
    cfg = yaml.safe_load(run["config_text"]) or {}
    algo = cfg.get("algorithm", {}).get("name", "?")
    if algo == "dsgd":
        algo += f" ({cfg.get('topology', {}).get('name', '?')})"
    m, e, s, attrs = run["metrics"], run["eval"], run["summary"], run["attrs"]
    steps_total = cfg.get("run", {}).get("steps", 0)
    done = int(m["step"][-1]) + 1 if "step" in m and len(m["step"]) else 0
    nodes = int(attrs.get("nodes", cfg.get("nodes", {}).get("n", 0)))
    bytes_sent = np.asarray(m.get("bytes_sent", np.zeros((0, 1))))
    comm_s = np.asarray(m.get("comm_seconds", np.zeros((0, 1))))
    comp_s = np.asarray(m.get("compute_seconds", np.zeros((0, 1))))
    total_s = comm_s.sum() + comp_s.sum()
    return {
        "run": os.path.basename(os.path.dirname(os.path.abspath(run["path"]))),
        "method": algo, "nodes": nodes, "ranks": int(attrs.get("ranks", 0)),
        "steps": (f"{done}/{steps_total}" if not s or s.get("diverged") else str(s.get("steps", done)))
                 + (" diverged" if s.get("diverged") else ""),
        "final_acc": _last(e.get("test_accuracy")), "best_acc": _best(e.get("test_accuracy")),
        "final_loss": _last(e.get("test_loss")), "best_loss": _best(e.get("test_loss"), "min"),
        "wall_s": float(s["wall_seconds"]) if "wall_seconds" in s else _last(m.get("wall")),
        "MB_per_node": float(bytes_sent.sum()) / max(1, nodes) / 1e6,
        "comm_share": float(comm_s.sum() / total_s) if total_s > 0 else float("nan"),
        "status": ("diverged" if s.get("diverged") else "finished") if s else "running or stopped",
        **({} if target is None else dict(zip(("target_step", "target_s"), time_to_target(run, target)))),
    }


COLUMNS = [("run", "run", "{}"), ("method", "method", "{}"), ("nodes", "nodes", "{}"), ("ranks", "ranks", "{}"),
           ("steps", "steps", "{}"), ("final_acc", "final acc", "{:.4f}"), ("best_acc", "best acc", "{:.4f}"),
           ("final_loss", "final loss", "{:.4g}"), ("best_loss", "best loss", "{:.4g}"),
           ("wall_s", "wall s", "{:.1f}"), ("MB_per_node", "MB/node", "{:.2f}"), ("comm_share", "comm", "{:.0%}")]


def format_table(rows: List[dict], columns=COLUMNS) -> str:
    cells = [[title for _, title, _ in columns]]
    for r in rows:
        line = []
        for key, _, fmt in columns:
            v = r.get(key)
            line.append("n/a" if isinstance(v, float) and v != v else fmt.format(v))
        cells.append(line)
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def node_ids(run: dict, width: int) -> np.ndarray:
    """The node of each per-node column: /node_ids (run.node_metrics: sample) or 0..width-1."""
    ids = run.get("node_ids")
    return np.arange(width) if ids is None or len(ids) != width else np.asarray(ids)


def node_stats(run: dict, group: str, name: str):
    """(rows, len(NODE_STATS)) distribution of a per-node quantity: the stored
    `<name>_stats` (over all nodes, or the evaluated sample for test metrics), else
    computed from the per-node column of an older run file; None if neither exists."""
    from .metrics import node_stats as compute
    g = run.get(group, {})
    if f"{name}_stats" in g and len(g[f"{name}_stats"]):
        return np.asarray(g[f"{name}_stats"], float)
    if name in g and len(g[name]) and np.ndim(g[name]) == 2:
        return compute(g[name])
    return None


NODE_QUANTITIES = (("metrics", "train_loss", "train loss (minibatch)"), ("eval", "node_test_loss", "test loss"),
                   ("eval", "node_test_accuracy", "test accuracy"), ("diag", "node_weight_dev", "weight deviation"))


def spread_table(run: dict) -> str:
    """The last row's distribution over nodes of each per-node quantity the run recorded."""
    from .metrics import NODE_STATS
    rows = []
    for group, name, title in NODE_QUANTITIES:
        st = node_stats(run, group, name)
        if st is not None:
            sampled = group == "eval" and run.get("node_ids") is not None  # evaluated on the sample only
            rows.append({"what": title + (" (the sample)" if sampled else ""), **dict(zip(NODE_STATS, st[-1]))})
    if not rows:
        return "no per-node quantities recorded"
    cols = [("what", "over nodes (last row)", "{}")] + [(k, k, "{:.4g}") for k in NODE_STATS]
    return format_table(rows, cols)


def per_node_table(run: dict) -> str:
    e = run["eval"]
    mode = run.get("attrs", {}).get("node_metrics", "all")
    if "node_test_loss" not in e or not len(e["node_test_loss"]):
        why = ("per-node columns not kept (run.node_metrics: none)" if mode == "none" and "step" in e
               and len(e["step"]) else "no evaluation yet")
        return why + "\n" + spread_table(run)
    loss, acc = e["node_test_loss"][-1], e["node_test_accuracy"][-1]
    ids = node_ids(run, len(loss))
    rows = [{"node": int(i), "test_loss": float(lo), "test_acc": float(a)} for i, lo, a in zip(ids, loss, acc)]
    cols = [("node", "node", "{}"), ("test_loss", "test loss", "{:.4g}"), ("test_acc", "test acc", "{:.4f}")]
    head = (f"the {len(ids)} nodes of the fixed sample (run.node_metrics: sample; test metrics evaluated on "
            f"these only)\n" if run.get("node_ids") is not None else "")
    return head + format_table(rows, cols) + "\n" + spread_table(run)


def per_rank_table(run: dict) -> str:
    m = run["metrics"]
    if "comm_seconds" not in m or not len(m["comm_seconds"]):
        return "no metrics yet"
    comp, comm, sent = (np.nansum(np.asarray(m[k], float), axis=0)
                        for k in ("compute_seconds", "comm_seconds", "bytes_sent"))
    wait = (np.nansum(np.asarray(m["wait_seconds"], float), axis=0) if "wait_seconds" in m
            else np.full_like(comm, np.nan))
    rows = [{"rank": r, "compute": comp[r], "comm": comm[r], "wait": wait[r], "MB": sent[r] / 1e6,
             "share": comm[r] / max(1e-12, comm[r] + comp[r])} for r in range(len(comp))]
    cols = [("rank", "rank", "{}"), ("compute", "compute s", "{:.3f}"), ("comm", "comm s", "{:.3f}"),
            ("wait", "of which waiting s", "{:.3f}"), ("MB", "MB sent", "{:.2f}"), ("share", "comm share", "{:.0%}")]
    return format_table(rows, cols)


def expand(paths: List[str]) -> List[str]:
    out = []
    for p in paths:
        hits = sorted(glob.glob(p)) or [p]
        for h in hits:
            f = h if h.endswith(".h5") else os.path.join(h, store.RUN_FILE)
            if not os.path.exists(f) and not os.path.exists(f + ".bak"):
                raise ConfigError(f"{h}: no {store.RUN_FILE} here (expected a run directory)")
            out.append(h)
    return out


def _nearest_existing(path: str) -> str:
    probe = os.path.abspath(path)
    while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    return probe


def check_outputs(csv_path, plot_dir) -> None:
    """Raise ConfigError (one line) unless --csv names a file and --plot a directory that
    can be written; checked before any run is read, creating nothing."""
    if csv_path is not None:
        where = f"--csv = {_show(csv_path)} is not allowed"
        if not str(csv_path).strip():
            raise ConfigError(f"{where}: give the name of a CSV file to write")
        if os.path.isdir(csv_path):
            raise ConfigError(f"{where}: it is a directory; give the name of a CSV file to write")
        parent = os.path.dirname(os.path.abspath(csv_path))
        if not os.path.isdir(parent):
            probe = _nearest_existing(parent)
            if os.path.exists(probe) and not os.path.isdir(probe):
                raise ConfigError(f"{where}: {probe} is a file, not a directory; give a file in an existing directory")
            raise ConfigError(f"{where}: its directory {parent} does not exist; give a file in an existing "
                              f"directory")
        target = csv_path if os.path.exists(csv_path) else parent
        if not os.access(target, os.W_OK):
            raise ConfigError(f"{where}: {'it' if target == csv_path else parent} is not writable; "
                              f"give a file in a directory this user may write")
    if plot_dir is not None:
        where = f"--plot = {_show(plot_dir)} is not allowed"
        if not str(plot_dir).strip():
            raise ConfigError(f"{where}: give a directory for the PNG files")
        probe = _nearest_existing(plot_dir)
        if not os.path.isdir(probe):
            what = "a file" if os.path.exists(probe) else "a broken symbolic link"
            if probe == os.path.abspath(plot_dir):
                raise ConfigError(f"{where}: it is {what}, not a directory; give a directory (new or existing)")
            raise ConfigError(f"{where}: {probe} is {what}, so no directory can be created under it")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise ConfigError(f"{where}: {'it' if probe == os.path.abspath(plot_dir) else probe} is not "
                              f"writable; give a directory this user may write")


def write_csv(path: str, rows: List[dict], fieldnames: List[str]) -> None:
    try:
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fieldnames)
            w.writeheader()
            for row in rows:
                w.writerow({k: row[k] for k in w.fieldnames})
    except OSError as exc:  # e.g. a read-only file system, a full disk
        raise ConfigError(f"--csv = {_show(path)} is not allowed: cannot write it "
                          f"({exc.strerror or exc}); give a file in a directory this user may write") from None


def main(args) -> int:
    check_outputs(getattr(args, "csv", None), getattr(args, "plot", None))
    runs = []
    for p in expand(args.runs):
        try:
            run = store.read_run(p)
        except store.RunFileError as exc:
            raise ConfigError(f"RUN = {_show(p)} is not allowed: {exc}; give run directories "
                              f"(or their {store.RUN_FILE} files)") from None
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read the run file ({exc})") from None
        if run.get("from_backup"):
            print(f"hpcopt: note: {p}: {store.RUN_FILE} is unreadable (a crash during a metrics flush?); "
                  f"read {store.RUN_FILE}.bak, the copy taken at the last checkpoint", file=sys.stderr)
        runs.append(run)
    target = getattr(args, "target", None)
    rows = [run_row(r, target) for r in runs]
    columns = COLUMNS if target is None else COLUMNS[:-3] + [
        ("target_step", f"step to {target:g}", "{:.0f}"), ("target_s", f"s to {target:g}", "{:.1f}")] + COLUMNS[-3:]
    if args.csv:  # before anything is printed: a file that cannot be written is the only output
        write_csv(args.csv, rows, [k for k, _, _ in columns] + ["status"])
    print(format_table(rows, columns))
    if args.per_node:
        for r, row in zip(runs, rows):
            print(f"\nper node: {row['run']}\n{per_node_table(r)}")
    if args.per_rank:
        for r, row in zip(runs, rows):
            print(f"\nper rank: {row['run']}\n{per_rank_table(r)}")
    if getattr(args, "plot", None):
        from . import plots
        try:
            written = plots.write_all(runs, [r["run"] for r in rows], args.plot)
        except OSError as exc:
            raise ConfigError(f"--plot = {_show(args.plot)} is not allowed: cannot write plots there "
                              f"({exc.strerror or exc}); give a directory this user may write") from None
        print(f"wrote {len(written)} plots to {args.plot}", file=sys.stderr)
    if args.csv:
        print(f"wrote {args.csv}", file=sys.stderr)
    return 0
