"""The large-learning-rate study of Zhang et al. 2021 (DPSGD vs SSGD), shrunk.

An MLP on the bundled digits data (64-64-10 tanh, and a deeper 64-64-64-64-10 ReLU
variant), n = 8 learners; DPSGD on a ring against synchronous SGD and against SSGD plus
isotropic noise matched to the DPSGD run's measured grad_deviation (same lr, batch and
seed); global batch 64 and 1024; no warmup; 3 seeds. Learning rates: a coarse geometric
grid (x2), then x1.1 steps above each method's largest stable coarse value.

A run is *stable* if its training loss stays finite and its last 10 steps average below
3x its first loss; *useful* if, in addition, every seed reaches 85% test accuracy.
Prints the table of final loss and accuracy per (arch, method, batch, lr) with diverged
runs marked, the largest stable and useful lr per method, and writes plots of the final
loss against lr and of alpha_eff/alpha, Xi^2 and lr*lambda_max against step
(landscape_*.png) plus landscape.json to --out.

Run:  python bench/experiments/landscape.py [--steps 300] [--out bench/results]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from hpcopt import config, runner, store  # noqa: E402

N = 8
ARCHS = {"tanh 64-64": ([64], "tanh"), "relu 64-64-64-64": ([64, 64, 64], "relu")}
COARSE = [0.05 * 2 ** i for i in range(10)]  # 0.05 .. 25.6
SEEDS = (0, 1, 2)


def run_one(workdir, arch, method, batch, lr, seed, steps, noise_run=""):
    hidden, act = ARCHS[arch]
    name = f"{arch.split()[0]}-{method}-b{batch}-lr{lr:.4g}-s{seed}"
    algo = {"DPSGD": "dsgd", "SSGD": "sync_sgd", "SSGD+noise": "sync_sgd"}[method]
    cfg = config.from_dict({
        "run": {"name": name, "steps": steps, "seed": seed, "eval_every": 0, "log_every": steps, "progress": False,
                "divergence_factor": 1e3},
        "nodes": {"n": N},
        "data": {"dataset": "digits", "partition": "iid", "batch_size": batch // N},
        "model": {"name": "mlp", "hidden": hidden, "activation": act},
        "algorithm": {"name": algo, **({"noise": "matched", "noise_run": noise_run} if noise_run else {})},
        "topology": {"name": "ring"},
        "optimizer": {"lr": lr},
        "diagnostics": {"every": max(1, steps // 12), "batch_size": 128, "power_iters": 10}})
    out = os.path.join(workdir, name)
    runner.Runner(cfg, "", out, force=True, out=io.StringIO()).run()
    run = store.read_run(out)
    loss = np.asarray(run["metrics"]["train_loss_mean"], float)
    s = run["summary"]
    diverged = bool(s.get("diverged")) or not np.all(np.isfinite(loss))
    stable = (not diverged) and len(loss) >= steps and loss[-10:].mean() < 3 * loss[0]
    diag = run["diag"]
    return out, {"arch": arch, "method": method, "batch": batch, "lr": lr, "seed": seed, "diverged": diverged,
                 "stable": bool(stable), "final_loss": float(loss[-10:].mean()) if len(loss) else float("nan"),
                 "first_loss": float(loss[0]) if len(loss) else float("nan"),
                 "test_accuracy": float(s.get("final_test_accuracy", float("nan"))),
                 "diag_step": np.asarray(diag.get("step", []), float).tolist(),
                 "alpha_ratio": np.asarray(diag.get("alpha_ratio", []), float).tolist(),
                 "weight_variance": np.asarray(diag.get("weight_variance", []), float).tolist(),
                 "stability": np.asarray(diag.get("stability", []), float).tolist()}


def sweep(workdir, arch, batch, lrs, steps, results, log):
    for lr in lrs:
        for seed in SEEDS:
            if any(r["arch"] == arch and r["batch"] == batch and r["lr"] == lr and r["seed"] == seed for r in results):
                continue
            dp_dir, dp = run_one(workdir, arch, "DPSGD", batch, lr, seed, steps)
            results.append(dp)
            results.append(run_one(workdir, arch, "SSGD", batch, lr, seed, steps)[1])
            noise_src = dp_dir if dp["diag_step"] else ""
            if noise_src:
                results.append(run_one(workdir, arch, "SSGD+noise", batch, lr, seed, steps, noise_src)[1])
            log(f"{arch:<17} b={batch:<5} lr={lr:<8.4g} seed={seed} "
                + " ".join(f"{r['method']}:{'ok' if r['stable'] else 'X'}" for r in results[-3:]))


def largest(results, arch, method, batch, useful=False):
    lrs = sorted({r["lr"] for r in results if r["arch"] == arch and r["batch"] == batch})
    best = None
    for lr in lrs:
        runs = [r for r in results if (r["arch"], r["method"], r["batch"], r["lr"]) == (arch, method, batch, lr)]
        if runs and all(r["stable"] for r in runs) and (not useful or all(r["test_accuracy"] >= 0.85 for r in runs)):
            best = lr
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    results = []

    def log(msg):
        print(f"[{time.time() - t0:5.0f}s] {msg}", flush=True)

    with tempfile.TemporaryDirectory() as workdir:
        for arch in ARCHS:
            for batch in (64, 1024):
                sweep(workdir, arch, batch, COARSE, args.steps, results, log)
                edges = [largest(results, arch, m, batch) or COARSE[0] for m in ("DPSGD", "SSGD")]
                fine = sorted({round(e * 1.1 ** k, 6) for e in edges for k in range(1, 8)})
                sweep(workdir, arch, batch, fine, args.steps, results, log)
    with open(os.path.join(args.out, "landscape.json"), "w") as fh:
        json.dump(results, fh)
    report(results, args.out)


def report(results, out):
    print("\nfinal training loss / test accuracy (mean over seeds; X = diverged or unstable in some seed)")
    for arch in ARCHS:
        for batch in (64, 1024):
            print(f"\n{arch}, global batch {batch}")
            print(f"{'lr':>9}" + "".join(f"{m:>24}" for m in ("SSGD", "DPSGD", "SSGD+noise")))
            for lr in sorted({r["lr"] for r in results if r["arch"] == arch and r["batch"] == batch}):
                cells = []
                for m in ("SSGD", "DPSGD", "SSGD+noise"):
                    rs = [r for r in results if (r["arch"], r["method"], r["batch"], r["lr"]) == (arch, m, batch, lr)]
                    if not rs:
                        cells.append("-")
                        continue
                    mark = "" if all(r["stable"] for r in rs) else " X"
                    cells.append(f"{np.nanmean([r['final_loss'] for r in rs]):.3g} / "
                                 f"{np.nanmean([r['test_accuracy'] for r in rs]):.3f}{mark}")
                print(f"{lr:>9.4g}" + "".join(f"{c:>24}" for c in cells))
    print("\nlargest stable / useful lr (grid x2, refined x1.1 above the coarse edge)")
    for arch in ARCHS:
        for batch in (64, 1024):
            parts = []
            for m in ("SSGD", "DPSGD", "SSGD+noise"):
                s, u = largest(results, arch, m, batch), largest(results, arch, m, batch, useful=True)
                parts.append(f"{m}: {s if s is not None else '-'} / {u if u is not None else '-'}")
            dp, ss = largest(results, arch, "DPSGD", batch), largest(results, arch, "SSGD", batch)
            ratio = (dp or np.nan) / (ss or np.nan)
            print(f"  {arch:<17} b={batch:<5} " + "; ".join(parts) + f"; DPSGD/SSGD stable lr ratio {ratio:.2f}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    for arch in ARCHS:
        fig, axes = plt.subplots(1, 4, figsize=(18, 4), dpi=100)
        for batch, ls in ((64, "--"), (1024, "-")):
            for m in ("SSGD", "DPSGD", "SSGD+noise"):
                lrs = sorted({r["lr"] for r in results if (r["arch"], r["method"], r["batch"]) == (arch, m, batch)})
                vals = [np.nanmean([r["final_loss"] if r["stable"] else np.nan for r in results
                                    if (r["arch"], r["method"], r["batch"], r["lr"]) == (arch, m, batch, lr)])
                        for lr in lrs]
                axes[0].plot(lrs, vals, ls, marker="o", markersize=3, label=f"{m} b={batch}")
            big = [r for r in results if (r["arch"], r["method"], r["batch"]) == (arch, "DPSGD", batch)
                   and r["stable"] and r["diag_step"]]
            if big:
                top = max(big, key=lambda r: r["lr"])
                for ax, key in zip(axes[1:], ("alpha_ratio", "weight_variance", "stability")):
                    ax.plot(top["diag_step"], top[key], ls, label=f"DPSGD b={batch} lr={top['lr']:.3g}")
        axes[0].set_xscale("log")
        axes[0].set_yscale("log")
        axes[0].set_xlabel("lr")
        axes[0].set_ylabel("final training loss (stable runs)")
        for ax, lab in zip(axes[1:], ("alpha_eff / alpha", "weight variance Xi^2", "lr * lambda_max")):
            ax.set_xlabel("step")
            ax.set_ylabel(lab)
        axes[3].axhline(2, color="gray", lw=0.8)
        for ax in axes:
            ax.legend(fontsize=7)
        fig.suptitle(arch)
        fig.tight_layout()
        path = os.path.join(out, f"landscape_{arch.split()[0]}.png")
        fig.savefig(path)
        plt.close(fig)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
