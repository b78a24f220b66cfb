"""PNG plots of one or several runs (`hpcopt analyse RUN ... --plot DIR`).

Needs matplotlib (`pip install "hpcopt[plot]"`); without it a one-line error says so.
Written files:
  train_loss.png                 mean training loss against step
  test_accuracy.png, test_loss.png               average model against step
  test_accuracy_time.png, test_loss_time.png     the same against wall time
  consensus_distance.png         mean_i ||x_i - x_bar||^2 against step
  time_per_rank.png              compute and communication seconds of every rank
  nodes_<quantity>.png           spread over nodes (median, 25-75%, 5-95%) of the training
                                 loss, the nodes' test loss and accuracy, weight deviation
  <group>_<name>.png             every other quantity a method records (one line per run;
                                 per-node or per-rank arrays are averaged over the axis)
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence

import numpy as np

from .config import ConfigError

STANDARD = {
    "metrics": {"step", "lr", "wall", "train_loss", "train_loss_mean", "compute_seconds", "comm_seconds",
                "bytes_sent", "wait_seconds", "bytes_mix", "bytes_move"},
    "eval": {"step", "test_loss", "test_accuracy", "node_test_loss", "node_test_accuracy", "consensus_distance"},
    "diag": {"step"},
}


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'hpcopt[plot]' (or pip install matplotlib)") from None
    return plt


def _line_plot(plt, path, series, xlabel, ylabel, logy=False):
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    drawn = 0
    for label, x, y in series:
        x, y = np.asarray(x, float), np.asarray(y, float)
        keep = np.isfinite(x) & np.isfinite(y)  # per-round metrics are NaN between rounds
        x, y = x[keep], y[keep]
        if len(x):
            ax.plot(x, y, label=label, linewidth=1.4, marker="o" if len(x) < 30 else None, markersize=3)
            drawn += 1
    if drawn and logy and all((np.asarray(y, float)[np.isfinite(np.asarray(y, float))] > 0).all()
                              for _, _, y in series):
        ax.set_yscale("log")
    return _finish(plt, fig, ax, path, drawn, xlabel, ylabel)


def _finish(plt, fig, ax, path, drawn, xlabel, ylabel):
    """Label, save and close a line figure; None (nothing written) if no line was drawn."""
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _time_bars(plt, path, runs, labels):
    data = []
    for run, label in zip(runs, labels):
        m = run["metrics"]
        if "comm_seconds" in m and len(m["comm_seconds"]):
            data.append((label, np.nansum(np.asarray(m["compute_seconds"], float), axis=0),
                         np.nansum(np.asarray(m["comm_seconds"], float), axis=0)))
    if not data:
        return None
    fig, axes = plt.subplots(1, len(data), figsize=(max(4.0, 2.6 * len(data)), 4.2), dpi=110, sharey=True,
                             squeeze=False)
    for ax, (label, comp, comm) in zip(axes[0], data):
        xs = np.arange(len(comp))
        ax.bar(xs, comp, color="tab:blue", label="compute")
        ax.bar(xs, comm, bottom=comp, color="tab:orange", label="communication")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"r{r}" for r in xs], fontsize=7)
        ax.set_title(label if len(label) <= 28 else "..." + label[-25:], fontsize=7)
        ax.set_xlabel("rank", fontsize=8)
    axes[0][0].set_ylabel("seconds")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("compute and communication time per rank", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _spread_plot(plt, path, runs, labels, group, name, title):
    """Median over nodes with the 25-75% and 5-95% bands, one colour per run (from the
    stored `<name>_stats`, or computed from the per-node column of an older run file)."""
    from .analyse import node_stats
    from .metrics import NODE_STATS
    col = {k: i for i, k in enumerate(NODE_STATS)}
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    drawn = 0
    for k, (run, label) in enumerate(zip(runs, labels)):
        st = node_stats(run, group, name)
        if st is None:
            continue
        x = np.asarray(run[group]["step"], float)[:len(st)]
        ok = np.isfinite(st[:, col["q50"]])
        if not ok.any():
            continue
        colour = f"C{k % 10}"
        ax.plot(x[ok], st[ok, col["q50"]], color=colour, linewidth=1.4, label=f"{label} (median)")
        ax.fill_between(x[ok], st[ok, col["q25"]], st[ok, col["q75"]], color=colour, alpha=0.3, linewidth=0)
        ax.fill_between(x[ok], st[ok, col["q05"]], st[ok, col["q95"]], color=colour, alpha=0.12, linewidth=0)
        drawn += 1
    ax.set_title(f"{title} over nodes: median, 25-75% and 5-95% bands", fontsize=9)
    return _finish(plt, fig, ax, path, drawn, "step", title)


def write_all(runs: Sequence[dict], labels: Sequence[str], out_dir: str) -> List[str]:
    from .analyse import NODE_QUANTITIES, eval_wall
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    written: List[str] = []

    def keep(p):
        if p:
            written.append(p)

    def series(group, name, x="step"):
        out = []
        for run, label in zip(runs, labels):
            g = run[group]
            if name in g and len(g[name]):
                y = np.asarray(g[name], float)
                if y.ndim > 1:
                    y = np.nanmean(y.reshape(len(y), -1), axis=1)
                xs = eval_wall(run) if x == "wall" else g["step"]
                out.append((label, xs, y))
        return out

    keep(_line_plot(plt, os.path.join(out_dir, "train_loss.png"), series("metrics", "train_loss_mean"),
                    "step", "mean training loss (minibatch)", logy=True))
    for name, ylabel in (("test_accuracy", "test accuracy (average model)"),
                         ("test_loss", "test loss (average model)")):
        keep(_line_plot(plt, os.path.join(out_dir, f"{name}.png"), series("eval", name), "step", ylabel))
        keep(_line_plot(plt, os.path.join(out_dir, f"{name}_time.png"), series("eval", name, x="wall"),
                        "wall seconds", ylabel))
    keep(_line_plot(plt, os.path.join(out_dir, "consensus_distance.png"), series("eval", "consensus_distance"),
                    "step", "consensus distance", logy=True))
    keep(_time_bars(plt, os.path.join(out_dir, "time_per_rank.png"), runs, labels))
    for group, name, title in NODE_QUANTITIES:
        keep(_spread_plot(plt, os.path.join(out_dir, f"nodes_{name}.png"), runs, labels, group, name, title))
    extra: Dict[str, set] = {"metrics": set(), "eval": set(), "diag": set()}
    for run in runs:
        for group in extra:
            extra[group] |= {k for k, v in run[group].items() if k not in STANDARD[group]
                             and not k.endswith("_stats") and np.asarray(v).dtype.kind in "fiu"}
    for group, names in extra.items():
        for name in sorted(names):
            keep(_line_plot(plt, os.path.join(out_dir, f"{group}_{name}.png"), series(group, name), "step", name))
    return written
