"""Hybrid async->sync parameter server vs async and sync SGD (Vora et al. 2024, shrunk).

Synthetic data as in the paper's sensitivity studies (20 features, 10 classes, 10,000
samples, 80/20 split), softmax regression and an MLP 20-64-10; W = 8 and 25 workers,
half of them delayed |N(0, s)| s per gradient, s in {0.05, 0.25}, 0.01 s per gradient;
sync (K = W), async (K = 1) and hybrid (K = 1 + floor(u / S), S = 3/lr and 5/lr) over the
same time budget, chosen so that the hybrid with S = 3/lr reaches K = W at about half of
it; repeats from a shared initial theta. The paper's lr 0.01 (5 repeats) and a sweep
0.03 .. 1 (2 repeats) so each method is also compared at its own best lr.

Prints, per cell, the paper's metric -- the time-averaged (hybrid - async) test accuracy
and loss, mean +- sd over repeats -- and the final accuracies, and writes plots of test
accuracy against time. Everything runs on the simulated clock; the W = 8, s = 0.25,
softmax cell also runs on the wall clock (real MPI, `mpiexec -n 9`) to compare the
orderings of the three methods.

Run:  python bench/experiments/hybrid.py [--out bench/results] [--quick]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from hpcopt import config, runner, store  # noqa: E402

MODELS = {"softmax": {"name": "softmax"}, "mlp 20-64-10": {"name": "mlp", "hidden": [64], "activation": "relu"}}


SEPARATION = [5.0]  # distance scale of the class means (set by --separation)


def cfg_dict(model, W, s, method, lr, seed, budget, S_factor=3.0):
    alg = {"name": "hybrid", "clock": "simulated", "delay_fraction": 0.5, "delay_std": s, "compute_time": 0.01,
           "budget_seconds": budget, "time_grid": budget / 40}
    if method == "sync":
        alg.update(threshold="constant", k0=W)
    elif method == "async":
        alg.update(threshold="constant", k0=1)
    else:
        alg.update(threshold="step", k0=1, k_every=max(1, int(round(S_factor / lr))))
    return {"run": {"steps": 1, "seed": seed, "progress": False, "eval_every": 0},
            "nodes": {"n": W},
            "data": {"dataset": "classification", "dim": 20, "classes": 10, "samples_per_node": 8000 // W,
                     "separation": SEPARATION[0], "partition": "iid", "batch_size": 32, "test_fraction": 0.2},
            "model": {**MODELS[model], "init_seed": 0}, "algorithm": alg,
            "optimizer": {"lr": lr, "schedule": "constant"}}


def run_sim(workdir, d):
    cfg = config.from_dict(d)
    out = os.path.join(workdir, "r")
    runner.Runner(cfg, "", out, force=True, out=io.StringIO()).run()
    run = store.read_run(out)
    return {"time": run["eval"]["time"].tolist(), "acc": run["eval"]["test_accuracy"].tolist(),
            "loss": run["eval"]["test_loss"].tolist(), "K": run["metrics"]["K"].tolist(),
            "updates": int(run["summary"]["updates"])}


def run_wall(workdir, d):
    import yaml
    path = os.path.join(workdir, "wall.yaml")
    d = json.loads(json.dumps(d))
    d["algorithm"]["clock"] = "wall"
    with open(path, "w") as fh:
        yaml.safe_dump(d, fh)
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = here if os.path.exists(here) else shutil.which("mpiexec")
    out = os.path.join(workdir, "w")
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    subprocess.run([mpiexec, "-n", str(d["nodes"]["n"] + 1), sys.executable, "-m", "mpi4py", "-m", "hpcopt", "run",
                    path, "--out", out, "--force"], check=True, env=env, stdout=subprocess.DEVNULL)
    run = store.read_run(out)
    return {"time": run["eval"]["time"].tolist(), "acc": run["eval"]["test_accuracy"].tolist(),
            "loss": run["eval"]["test_loss"].tolist(), "K": run["metrics"]["K"].tolist(),
            "updates": int(run["summary"]["updates"])}


def budget_for(workdir, model, W, s, lr):
    """Seconds such that the hybrid (S = 3/lr) reaches K = W at about half of them."""
    probe = run_sim(workdir, cfg_dict(model, W, s, "hybrid", lr, 0, 400.0))
    t, K = np.asarray(probe["time"]), np.asarray(probe["K"])
    full = t[np.argmax(K >= W)] if (K >= W).any() else t[-1]
    return float(max(2.0, 2 * full))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results")
    p.add_argument("--quick", action="store_true", help="softmax, W = 8 only, fewer repeats")
    p.add_argument("--separation", type=float, default=5.0, help="class-mean separation of the synthetic data")
    p.add_argument("--wall-repeats", type=int, default=2, help="0: skip the wall-clock cross-check")
    args = p.parse_args()
    SEPARATION[0] = args.separation
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    models = ["softmax"] if args.quick else list(MODELS)
    Ws = [8] if args.quick else [8, 25]
    methods = ["sync", "async", "hybrid S=3/lr", "hybrid S=5/lr"]
    cells = []
    with tempfile.TemporaryDirectory() as workdir:
        for model in models:
            for W in Ws:
                for s in (0.05, 0.25):
                    budget = budget_for(workdir, model, W, s, 0.01)
                    for lr, repeats in [(0.01, 2 if args.quick else 5)] + [(x, 1 if args.quick else 2)
                                                                         for x in (0.03, 0.1, 0.3, 1.0)]:
                        cell = {"model": model, "W": W, "s": s, "lr": lr, "budget": budget, "runs": {}}
                        for m in methods:
                            factor = 5.0 if m.endswith("5/lr") else 3.0
                            kind = m.split()[0]
                            cell["runs"][m] = [run_sim(workdir, cfg_dict(model, W, s, kind, lr, rep, budget, factor))
                                               for rep in range(repeats)]
                        cells.append(cell)
                        fin = {m: np.mean([r["acc"][-1] for r in cell["runs"][m]]) for m in methods}
                        print(f"[{time.time() - t0:4.0f}s] {model:<13} W={W:<3} s={s:<5} lr={lr:<5} budget "
                              f"{budget:6.1f}s  " + "  ".join(f"{m}:{fin[m]:.3f}" for m in methods), flush=True)
        wall = None
        if args.wall_repeats and (shutil.which("mpiexec")
                                  or os.path.exists(os.path.join(os.path.dirname(sys.executable), "mpiexec"))):
            cell = next(c for c in cells if (c["model"], c["W"], c["s"], c["lr"]) == ("softmax", 8, 0.25, 0.01))
            wall = {m: [run_wall(workdir, cfg_dict("softmax", 8, 0.25, m.split()[0], 0.01, rep, cell["budget"],
                                                   5.0 if m.endswith("5/lr") else 3.0))
                        for rep in range(args.wall_repeats)]
                    for m in methods}
    with open(os.path.join(args.out, "hybrid.json"), "w") as fh:
        json.dump({"cells": cells, "wall": wall}, fh)
    report(cells, wall, methods, args.out)


def time_avg(run):
    return np.mean(run["acc"]), np.mean(run["loss"])


def report(cells, wall, methods, out):
    print("\ntime-averaged (hybrid - async) test accuracy / loss, mean +- sd over repeats; final accuracies")
    for c in cells:
        if c["lr"] != 0.01:
            continue
        parts = []
        for h in ("hybrid S=3/lr", "hybrid S=5/lr"):
            da = [time_avg(a)[0] - time_avg(b)[0] for a, b in zip(c["runs"][h], c["runs"]["async"])]
            dl = [time_avg(a)[1] - time_avg(b)[1] for a, b in zip(c["runs"][h], c["runs"]["async"])]
            parts.append(f"{h}: {np.mean(da):+.4f}±{np.std(da):.4f} / {np.mean(dl):+.4f}±{np.std(dl):.4f}")
        fin = "  ".join(f"{m}={np.mean([r['acc'][-1] for r in c['runs'][m]]):.3f}" for m in methods)
        print(f"  {c['model']:<13} W={c['W']:<3} s={c['s']:<5} lr=0.01: " + "; ".join(parts) + f"\n      final: {fin}")
    print("\nat each method's best lr (by time-averaged accuracy):")
    keys = sorted({(c["model"], c["W"], c["s"]) for c in cells})
    for key in keys:
        sub = [c for c in cells if (c["model"], c["W"], c["s"]) == key]
        best = {}
        for m in methods:
            scores = [(np.mean([time_avg(r)[0] for r in c["runs"][m]]), c["lr"]) for c in sub]
            best[m] = max(scores)
        delta = best["hybrid S=3/lr"][0] - best["async"][0]
        print(f"  {key[0]:<13} W={key[1]:<3} s={key[2]:<5} " + "  ".join(
            f"{m}: {v[0]:.3f} (lr {v[1]:g})" for m, v in best.items()) + f"  hybrid-async {delta:+.4f}")
    if wall:
        print("\nW = 8, s = 0.25, softmax, lr 0.01: time-averaged accuracy, simulated vs wall clock")
        sim = next(c for c in cells if (c["model"], c["W"], c["s"], c["lr"]) == ("softmax", 8, 0.25, 0.01))
        order = {}
        for name, runs in (("simulated", sim["runs"]), ("wall", wall)):
            means = {m: np.mean([time_avg(r)[0] for r in runs[m]]) for m in methods}
            order[name] = [m for m, _ in sorted(means.items(), key=lambda kv: -kv[1])]
            print(f"  {name:<9} " + "  ".join(f"{m}: {v:.3f}" for m, v in means.items()))
        three = ["sync", "async", "hybrid S=3/lr"]
        agree = [m for m in order["simulated"] if m in three] == [m for m in order["wall"] if m in three]
        print(f"  ordering of sync / async / hybrid agrees between the clocks: {agree}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    sel = [c for c in cells if c["lr"] == 0.01]
    fig, axes = plt.subplots(1, len(sel), figsize=(4 * len(sel), 3.6), dpi=90, squeeze=False)
    for ax, c in zip(axes[0], sel):
        for m in methods:
            r = c["runs"][m][0]
            ax.plot(r["time"], r["acc"], label=m)
        ax.set_title(f"{c['model']} W={c['W']} s={c['s']}", fontsize=8)
        ax.set_xlabel("seconds")
        ax.set_ylabel("test accuracy")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "hybrid.png"))
    print(f"wrote {os.path.join(out, 'hybrid.png')}")


if __name__ == "__main__":
    main()
