"""Does D-SGD slow down with n, and does Teleportation? (Takezawa & Stich 2025, shrunk)

Problem: f_i(x) = 1/2 (x - c_i)^T A_i (x - c_i), A_i diagonal with entries U[0.5, 1.5],
d = 10; the centres are scaled so that the heterogeneity (1/n) sum_i ||grad f_i(x*)||^2
equals zeta^2 (zeta in {1, 10}); stochastic gradients add N(0, sigma^2 I), sigma = 1;
n in {8, 16, 32, 64, 128}.

Error: the nodes' OWN models, (1/n) sum_i f(x_i) - f* for D-SGD and (1/k) sum_j f(x_j) - f*
over the tokens for Teleportation (the average of D-SGD's models follows centralised SGD
on quadratics whatever the graph, so it would hide the effect). Iterations until that
error, averaged over a trailing window of 20 iterations, falls below --target.
Methods: D-SGD on a ring and on the static exponential graph (Metropolis weights, the
engine's topology builders), Teleportation with k in 1, 2, 4, ... <= n (the engine's
active-set schedule and token ring); step size tuned per (method, n, zeta) on the
paper's grid, then the chosen settings re-run on fresh seeds. The k search of
`algorithm.k: auto` (two batches of T iterations on disjoint node sets, lowest f of the
average token) is run too, with its own lr tuning, and compared with the grid-best k.
Gradient evaluations per iteration differ: n for D-SGD, k for Teleportation.

The harness runs the same mixing matrices and schedules as hpcopt, vectorised over
(lr, seed) in NumPy, so the whole study takes minutes.

Part (b), with the engine itself (configs/teleport_digits.yaml): digits over n = 32 nodes
split by Dirichlet alpha in {0.1, 10}, softmax regression, D-SGD on a ring against
Teleportation (k from the k search): test accuracy of the average model against step;
iterations are not gradient evaluations (32 per D-SGD step, k per Teleportation step).
Run:  python bench/experiments/teleport_scaling.py [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from hpcopt import topology  # noqa: E402
from hpcopt.algorithms.teleport import active_nodes, search_batches  # noqa: E402

D = 10
SIGMA = 1.0
LRS = np.array([0.1, 0.075, 0.05, 0.025, 0.01, 0.0075, 0.005, 0.0025, 0.001])
NS = (8, 16, 32, 64, 128)
ZETAS = (1.0, 10.0)
WINDOW = 20


class Quadratic:
    """f_i(x) = 1/2 (x - c_i)^T diag(a_i) (x - c_i); models start at 0, about 10 from x*."""

    def __init__(self, n: int, zeta: float, seed: int = 0):
        rng = np.random.default_rng([seed, n, int(zeta * 10)])
        a = rng.uniform(0.5, 1.5, (n, D))
        c = rng.standard_normal((n, D))
        xs = (a * c).sum(0) / a.sum(0)
        # heterogeneity mean_i ||a_i (x* - c_i)||^2 scaled to zeta^2, optimum moved 10 away from 0
        c = xs + (c - xs) * zeta / np.sqrt(np.mean(((a * (xs - c)) ** 2).sum(1)))
        shift = rng.standard_normal(D)
        c = c - (a * c).sum(0) / a.sum(0) + 10 * shift / np.linalg.norm(shift)
        self.a, self.c = a, c
        # f(x) = 1/2 sum_d (abar_d x_d^2 - 2 x_d acbar_d + ac2bar_d)
        self.abar, self.acbar, self.ac2bar = a.mean(0), (a * c).mean(0), (a * c * c).mean(0)
        self.xstar = self.acbar / self.abar
        self.fstar = float(self.f(self.xstar))

    def f(self, X):
        """mean_i f_i(x) for every row of X (..., D), in O(D)."""
        return 0.5 * (self.abar * X * X - 2 * X * self.acbar + self.ac2bar).sum(-1)


def run_dsgd(n, zeta, graph, steps, seeds, target, lrs=LRS):
    q = Quadratic(n, zeta)
    a, c = q.a, q.c
    W = topology.build(graph, n).mixing_matrix(0)
    S = len(seeds)
    X = np.zeros((len(lrs), S, n, D))
    lr = lrs[:, None, None, None]
    rng = [np.random.default_rng([s, 99]) for s in seeds]
    hist = []
    hit = np.full((len(lrs), S), np.inf)
    for t in range(steps):
        noise = np.stack([r.standard_normal((n, D)) for r in rng], 0)[None]
        G = a * (X - c) + SIGMA * noise
        X = np.einsum("ij,lsjd->lsid", W, X - lr * G)  # adapt-then-combine, like the tokens
        err = q.f(X).mean(-1) - q.fstar  # (lr, seed): mean over nodes of f(x_i)
        hist.append(err)
        if t >= WINDOW:
            avg = np.mean(hist[-WINDOW:], axis=0)
            new = (avg < target) & np.isinf(hit)
            hit[new] = t + 1
            if np.isfinite(hit).all() or not np.isfinite(avg).any():
                break
    return hit


def run_teleport(n, zeta, sizes, steps, seeds, target, lrs=LRS, start=0):
    """Teleportation with one or more groups of tokens (the k search runs several)."""
    q = Quadratic(n, zeta)
    a, c = q.a, q.c
    Ws = [topology.build("ring", k).mixing_matrix(0) for k in sizes]
    S, K = len(seeds), sum(sizes)
    X = np.zeros((len(lrs), S, K, D))
    lr = lrs[:, None, None, None]
    rng = [np.random.default_rng([s, 98]) for s in seeds]
    hist = []
    hit = np.full((len(lrs), S, len(sizes)), np.inf)
    bounds = np.cumsum([0] + list(sizes))
    for t in range(start, start + steps):
        nodes = np.stack([active_nodes(s + 1000, t, n, sizes) for s in seeds])  # (S, K)
        noise = np.stack([r.standard_normal((K, D)) for r in rng], 0)[None]
        G = a[nodes] * (X - c[nodes]) + SIGMA * noise
        Y = X - lr * G
        for g, Wt in enumerate(Ws):
            sl = slice(bounds[g], bounds[g + 1])
            Y[:, :, sl] = np.einsum("ij,lsjd->lsid", Wt, Y[:, :, sl])
        X = Y  # tokens move with their rows; their data next step comes from `nodes`
        f = q.f(X) - q.fstar  # (lr, seed, K)
        err = np.stack([f[..., bounds[g]:bounds[g + 1]].mean(-1) for g in range(len(sizes))], -1)
        hist.append(err)
        if len(hist) > WINDOW:
            avg = np.mean(hist[-WINDOW:], axis=0)
            new = (avg < target) & np.isinf(hit)
            hit[new] = t + 1 - start
            if np.isfinite(hit).all() or not np.isfinite(avg).any():
                break
    return hit, X


def tuned(hit, cap):
    """(best lr index, iterations per seed) by mean iterations (cap for misses)."""
    h = np.where(np.isinf(hit), cap, hit)
    i = int(np.argmin(h.mean(axis=1)))
    return i, h[i]


def k_search(n, zeta, T, seeds, lrs=LRS):
    """hpcopt's k search: two batches of T iterations on disjoint node sets; the winner
    has the lowest f of its average token (mean over seeds), per lr."""
    q = Quadratic(n, zeta)
    scores = {}
    for sizes in search_batches(n):
        _, X = run_teleport(n, zeta, sizes, T, seeds, -np.inf, lrs)
        bounds = np.cumsum([0] + list(sizes))
        for g, k in enumerate(sizes):
            avg = X[:, :, bounds[g]:bounds[g + 1]].mean(2)  # (lr, seed, D)
            scores[k] = np.nanmin(q.f(avg).mean(1))  # best lr for this candidate
    return min(scores, key=lambda k: scores[k])


def digits_part(out: str, steps: int = 1000) -> list:
    import io
    import tempfile

    from hpcopt import config as config_mod
    from hpcopt import runner, store
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs", "teleport_digits.yaml")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for alpha in (0.1, 10.0):
            for algo in ("dsgd", "teleport"):
                cfg = config_mod.load(path, [f"data.alpha={alpha}", f"algorithm.name={algo}", f"run.steps={steps}",
                                             "run.eval_every=50", "run.progress=false"])
                run_dir = os.path.join(tmp, f"{algo}-{alpha}")
                runner.Runner(cfg, "", run_dir, out=io.StringIO()).run()
                run = store.read_run(run_dir)
                k = int(run["metrics"]["token_node"].shape[1]) if algo == "teleport" else 32
                rows.append({"alpha": alpha, "method": "D-SGD ring" if algo == "dsgd" else f"Teleportation k={k}",
                             "k": k, "step": run["eval"]["step"].tolist(),
                             "test_accuracy": run["eval"]["test_accuracy"].tolist()})
    print("\n(b) digits, n = 32: test accuracy of the average model (gradient evaluations per step in brackets)")
    for r in rows:
        acc = r["test_accuracy"]
        mid = acc[len(acc) // 4]
        print(f"  alpha={r['alpha']:<4g} {r['method']:<20} [{r['k']:>2}/step]  step {r['step'][len(acc) // 4]}: "
              f"{mid:.3f}   final ({r['step'][-1]}): {acc[-1]:.3f}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
        for ax, alpha in zip(axes, (0.1, 10.0)):
            for r in rows:
                if r["alpha"] == alpha:
                    ax.plot(r["step"], r["test_accuracy"], marker="o", markersize=3, label=r["method"])
            ax.set_title(f"digits, n = 32, Dirichlet alpha = {alpha:g}")
            ax.set_xlabel("step")
            ax.set_ylabel("test accuracy (average model)")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "teleport_digits.png"))
    except ImportError:
        pass
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results")
    p.add_argument("--target", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--search-steps", type=int, default=300)
    p.add_argument("--only", choices=["quadratics", "digits"], default=None)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.only != "quadratics":
        digits = digits_part(args.out)
        with open(os.path.join(args.out, "teleport_digits.json"), "w") as fh:
            json.dump(digits, fh, indent=1)
        if args.only == "digits":
            return
    t0 = time.time()
    tune_seeds, fresh_seeds = (0, 1), (10, 11, 12)
    rows = []
    for zeta in ZETAS:
        for n in NS:
            row = {"n": n, "zeta": zeta}
            for graph in ("ring", "exponential"):
                i, _ = tuned(run_dsgd(n, zeta, graph, args.steps, tune_seeds, args.target), args.steps)
                _, it = tuned(run_dsgd(n, zeta, graph, args.steps, fresh_seeds, args.target, LRS[i:i + 1]),
                              args.steps)
                row[f"dsgd_{graph}"] = float(np.mean(it))
                row[f"dsgd_{graph}_lr"] = float(LRS[i])
            ks = [1 << j for j in range(n.bit_length()) if (1 << j) <= n]
            per_k = {}
            for k in ks:
                hit, _ = run_teleport(n, zeta, [k], args.steps, tune_seeds, args.target)
                i, _ = tuned(hit[..., 0], args.steps)
                fresh, _ = run_teleport(n, zeta, [k], args.steps, fresh_seeds, args.target, LRS[i:i + 1])
                per_k[k] = (float(np.mean(np.where(np.isinf(fresh), args.steps, fresh))), float(LRS[i]))
            best_k = min(per_k, key=lambda k: per_k[k][0])
            row["teleport_best"] = per_k[best_k][0]
            row["teleport_best_k"] = best_k
            row["teleport_per_k"] = {str(k): v for k, v in per_k.items()}
            chosen = k_search(n, zeta, args.search_steps, tune_seeds)
            row["search_k"] = chosen
            row["search_within_10pct"] = bool(per_k[chosen][0] <= 1.1 * per_k[best_k][0])
            rows.append(row)
            print(f"[{time.time() - t0:4.0f}s] zeta={zeta:g} n={n:<4} ring {row['dsgd_ring']:7.0f}  exp "
                  f"{row['dsgd_exponential']:7.0f}  teleport best k={best_k:<3} {row['teleport_best']:7.0f}  "
                  f"search k={chosen} ({per_k[chosen][0]:.0f}, within 10%: {row['search_within_10pct']})", flush=True)
    with open(os.path.join(args.out, "teleport_scaling.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    print(f"\niterations to error < {args.target} (fresh seeds, mean; cap {args.steps}); gradient evaluations "
          f"per iteration: n for D-SGD, k for Teleportation")
    print(f"{'zeta':>5} {'n':>5} {'D-SGD ring':>11} {'D-SGD exp':>10} {'Teleport':>9} {'best k':>7} {'search k':>9}")
    for r in rows:
        print(f"{r['zeta']:>5g} {r['n']:>5} {r['dsgd_ring']:>11.0f} {r['dsgd_exponential']:>10.0f} "
              f"{r['teleport_best']:>9.0f} {r['teleport_best_k']:>7} {r['search_k']:>9}")
    for zeta in ZETAS:
        sel = {r["n"]: r for r in rows if r["zeta"] == zeta}
        print(f"zeta={zeta:g}: ring n=128/n=8 = {sel[128]['dsgd_ring'] / sel[8]['dsgd_ring']:.2f} (claim >= 4); "
              f"teleport n=128/n=8 = {sel[128]['teleport_best'] / sel[8]['teleport_best']:.2f} (claim <= 1.5)")
    share = np.mean([r["search_within_10pct"] for r in rows])
    print(f"k search within 10% of the grid-best k: {share:.0%} of (n, zeta) cases (claim >= 80%)")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(ZETAS), figsize=(11, 4), dpi=100)
    for ax, zeta in zip(axes, ZETAS):
        sel = [r for r in rows if r["zeta"] == zeta]
        for key, label in (("dsgd_ring", "D-SGD ring"), ("dsgd_exponential", "D-SGD exponential"),
                           ("teleport_best", "Teleportation (best k)")):
            ax.plot([r["n"] for r in sel], [r[key] for r in sel], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("n")
        ax.set_ylabel(f"iterations to error < {args.target}")
        ax.set_title(f"zeta = {zeta:g}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "teleport_scaling.png"))
    print(f"wrote {os.path.join(args.out, 'teleport_scaling.png')}")


if __name__ == "__main__":
    main()
