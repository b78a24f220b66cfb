"""Local SGD with and without diagonal scaling on badly and well scaled logistic regression.

A shrunk version of the comparison in Chezhegov et al. 2024 ("Local Methods with
Adaptivity via Scaling"): Local SGD against Local RMSProp / Adam / OASIS, global and
local scaling, logistic regression (L2 1e-4) on the bundled breast-cancer data with RAW
features (scales ~0.001..4000) and standardized (the well-conditioned control); 4 nodes;
iid and label-skewed (Dirichlet 0.3) splits; H in {1, 5, 20}; 3 seeds.

Measure: communication rounds until the FULL training loss of the averaged model is
within a gap of f* (gaps 0.1 and 0.03), capped at --max-rounds (--oasis-max-rounds for
the OASIS rows). f* comes from a full-batch Newton run in float64.

Tuning, per (method, cell): a configuration is a step size lr on half-decades from 1e-8
to 1e2, and for OASIS jointly a clipping alpha on half-decades from 1e-5 to 10 (13 x 21
pairs, all run side by side). The chosen configuration has the smallest key (mean
rounds to the 0.03 gap over the seeds, then mean rounds to the 0.1 gap, then the larger
lr, then the smaller alpha), where a seed that never arrived counts as its lower bound
(the last round simulated + 1, so cap + 1 for a seed that ran to the cap) and a diverged
seed (non-finite loss or a gap above 1e6; its rows are dropped) as infinitely many
rounds. Fixed: beta2 0.99 (RMSProp, Adam; eps 1e-8) and 0.9 (OASIS, no eps), beta1 0.9,
10 warm-start probes, batch 16 per node. Edges: when the chosen lr or alpha is the
smallest or largest value of its grid, that grid is extended by two more half-decades on
that side and only the new configurations are run (pruned against the best answer so
far), up to three times; the row records the final grids and whether the chosen values
still sit on an edge. (No extension when the chosen configuration reached not even the
0.1 gap on any seed: then no configuration arrived and the choice is the tie-break.)

Certainty and the adaptive stop: a cell's answer is CERTAIN when the chosen
configuration reached the 0.03 gap on every seed within the cap and no configuration
that has not could still beat it, i.e. for every other configuration that is not
diverged, the mean of its seeds' lower bounds (its rounds where it arrived, the last
simulated round + 1 where it has not: a censored seed's true rounds exceed it) is above
the chosen mean (at equality it could still win on the tie-breaks and keeps running).
While run_grid simulates, a (configuration, seed) leaves the simulation once it reached
the 0.03 gap (its rounds are known) or diverged, and a configuration leaves once it can
no longer win; the run stops as soon as the answer is certain. So a large cap costs
only what the cells that need it use. Rows record `certain`, the round at which the
search stopped and how many configurations could still win at the cap. An uncertain
row's chosen configuration is the best by the same key; its censored seeds are shown
at the cap (">=mean(k/3)": k seeds arrived) and the row is marked "?".

The harness runs hpcopt's own pieces (data partition and samplers, the logistic model,
precond's scaling math and the NumPy reference kernels) vectorised over rows
(configuration, seed, node), so a grid runs in one pass. OASIS's per-row alpha is an
(rows, 1) float32 array in precond.Hyper: precond.diagonal and the NumPy reference
kernel (Kernels(mode="numpy").scaled, ref_scaled) compute max(alpha, |v|) with it by
broadcasting, the same float32 formula as with a scalar alpha. Hutchinson probes are
the runtime's default: independent per node in both global and local scaling, keyed
like hpcopt's local_sgd by (run seed, node, step) (precond.rademacher; the warm start at
steps WARM_START_STEP + k on the probe data stream), so every (lr, alpha) of a seed sees
the same probes and the same minibatches, as separate hpcopt runs with that seed would.
`tests/mpi/test_local_sgd.py` checks the same pieces inside the real MPI algorithm.

Run:  python bench/experiments/local_scaling.py [--max-rounds 1000] [--oasis-max-rounds N]
          [--methods all|oasis|"Adam global",...] [--data raw,std] [--H 1,5,20]
          [--alphas A1,A2,...] [--max-extensions 3] [--merge OLD.json] [--out DIR]
      python bench/experiments/local_scaling.py --report RUN.json [--out DIR]
Prints the table and writes local_scaling.png and local_scaling.json to --out; with
--merge, the rows of OLD.json that were not re-run are kept (each row records its cap,
grids, certainty and command); --report only prints and plots a JSON. The figures of
bench/RESULTS.md (73 minutes on a shared 2-core machine, most of it in the raw-feature
OASIS cells, whose answers needed up to ~48600 rounds to become certain):
    python bench/experiments/local_scaling.py --max-rounds 2000 --oasis-max-rounds 50000
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from hpcopt import config, data, models, precond  # noqa: E402
from hpcopt.algorithms.local_sgd import PROBE_STREAM, WARM_START_STEP  # noqa: E402
from hpcopt.backend import cpu  # noqa: E402
from hpcopt.kernels import Kernels  # noqa: E402

NODES, BATCH, L2, PROBES = 4, 16, 1e-4, 10
LRS = 10.0 ** np.arange(-8, 2.01, 0.5)
ALPHAS = 10.0 ** np.arange(-5, 1.01, 0.5)
SEEDS = (0, 1, 2)
GAPS = (0.1, 0.03)
EXTEND, MAX_EXTENSIONS = 2, 3  # half-decades added at an edge, and how often
METHODS = [("Local SGD", "identity", "global"), ("RMSProp global", "rmsprop", "global"),
           ("RMSProp local", "rmsprop", "local"), ("Adam global", "adam", "global"), ("Adam local", "adam", "local"),
           ("OASIS global", "oasis", "global"), ("OASIS local", "oasis", "local")]


def problem(standardize: bool, split: str):
    cfg = config.from_dict({"data": {"dataset": "breast_cancer", "standardize": standardize, "test_fraction": 0.2,
                                     "partition": "iid" if split == "iid" else "dirichlet", "alpha": 0.3}})
    ds = data.load(cfg.data, NODES)
    parts = data.partition(ds, NODES, cfg.data.partition.value, cfg.data.alpha, seed=cfg.data.seed)
    return ds, parts


def f_star(ds) -> float:
    """Full-batch damped Newton in float64 on the training loss (+ L2)."""
    A = np.hstack([ds.X_train.astype(np.float64), np.ones((len(ds.X_train), 1))])
    y = ds.y_train.astype(np.float64)
    x = np.zeros(A.shape[1])

    def f(x):
        z = A @ x
        return np.mean(np.logaddexp(0, z) - y * z) + 0.5 * L2 * x @ x

    for _ in range(200):
        p = 1 / (1 + np.exp(-(A @ x)))
        g = A.T @ (p - y) / len(y) + L2 * x
        H = (A * (p * (1 - p))[:, None]).T @ A / len(y) + L2 * np.eye(len(x))
        step = np.linalg.solve(H, g)
        t, fx = 1.0, f(x)
        while f(x - t * step) > fx - 0.25 * t * g @ step and t > 1e-12:
            t *= 0.5
        x = x - t * step
        if np.abs(g).max() < 1e-12:
            break
    return float(f(x))


# --- the tuning key and the certainty rule --------------------------------------------


def keys(g):
    """Sort keys of every configuration of the grid record g (lower is better): mean rounds
    to 0.03, then to 0.1, where a censored seed counts as its lower bound (the last round
    simulated + 1: cap + 1 for a seed that ran to the cap) and a diverged one as infinite;
    then the larger lr, then the smaller alpha."""
    def mean(r):
        return np.where(g["dead"], np.inf, np.where(np.isinf(r), g["last"] + 1, r)).mean(axis=1)
    m03, m01 = mean(g["r03"]), mean(g["r01"])
    return [(m03[c], m01[c], -g["lr"][c], g["alpha"][c]) for c in range(len(g["lr"]))]


def choose(g) -> int:
    """The chosen configuration: the smallest key (with `standing`'s best when certain)."""
    k = keys(g)
    return min(range(len(k)), key=lambda c: k[c])


def standing(g, bound=None):
    """(best key among configurations that arrived on every seed, or the external bound if
    lower; None if neither) and the mask of configurations that could still beat it."""
    full = np.isfinite(g["r03"]).all(axis=1)
    possible = ~g["dead"].any(axis=1)
    cands = [(g["r03"][c].mean(), g["r01"][c].mean(), -g["lr"][c], g["alpha"][c]) for c in np.flatnonzero(full)]
    if bound is not None:
        cands.append(tuple(bound))
    if not cands:
        return None, possible & ~full
    best = min(cands)
    lb = np.where(np.isfinite(g["r03"]), g["r03"], g["last"] + 1).mean(axis=1)
    return best, possible & ~full & (lb <= best[0])


def merge(a, b):
    return {k: np.concatenate([a[k], b[k]]) for k in a}


# --- one grid ------------------------------------------------------------------------


def run_grid(ds, parts, scaling, mode, H, lrs, alphas, max_rounds, fstar, bound=None, log=None, every=120.0):
    """Rounds to each gap for the configurations (lrs[c], alphas[c]) and every seed, with the
    adaptive stop (see the module docstring). Returns the grid record: lr, alpha (C,) and
    r01, r03 (rounds, inf = not arrived), dead (diverged), last (last round simulated), (C, S)."""
    model = models.LinearModel("logistic", ds.features, 2, L2)
    kern = Kernels(mode="numpy")  # per-row step sizes and alphas broadcast through the references
    oasis = scaling == "oasis"
    lrs = np.asarray(lrs, float)
    alphas = np.asarray(alphas, float) if oasis else np.zeros(len(lrs))
    C, S, d = len(lrs), len(SEEDS), model.d
    g_cfg, g_seed = np.repeat(np.arange(C), S), np.tile(np.arange(S), C)  # groups: (configuration, seed)
    act = np.arange(C * S)  # groups still simulated; rows = (group, node)

    def per_row(v):
        return np.repeat(np.asarray(v)[g_cfg[act]], NODES).astype(np.float32)[:, None]

    def hyper():
        return precond.Hyper(scaling, 0.9, 0.99 if not oasis else 0.9, per_row(alphas) if oasis else 0.0,
                             1e-8 if not oasis else 0.0)

    h, lr = hyper(), per_row(lrs)
    R = len(act) * NODES
    samplers = [data.NodeData(np, ds, parts, range(NODES), BATCH, seed) for seed in SEEDS]
    X = np.zeros((R, d), np.float32)
    mom = precond.init(h, cpu(), R, d)
    A_full, y_full = ds.X_train, ds.y_train
    w_full = np.full((1, len(A_full)), 1 / len(A_full), np.float32)
    w_batch = np.full((R, BATCH), 1 / BATCH, np.float32)

    def batch(t, stream=0):
        parts_ = [s.batch(t, stream) for s in samplers]  # each (NODES, B, f): the draws of seed s
        sel = g_seed[act]
        A = np.stack([p[0] for p in parts_])[sel].reshape(len(act) * NODES, BATCH, -1)
        y = np.stack([p[1] for p in parts_])[sel].reshape(len(act) * NODES, BATCH)
        return A, y, w_batch[:len(A)]

    def group_mean(a):
        return np.repeat(a.reshape(len(act), NODES, -1).mean(axis=1), NODES, axis=0)

    def hz(Xc, A, y, w, t):
        # the runtime's default probes: one per node, keyed by (run seed, node, step), in both modes
        Z = np.stack([precond.rademacher(seed, range(NODES), t, d) for seed in SEEDS])
        z = np.ascontiguousarray(Z[g_seed[act]].reshape(-1, d))
        return z * model.hvp(Xc, z, A, y, w)

    if scaling in ("rmsprop", "oasis") or (scaling == "adam" and mode == "global"):
        stat = np.zeros((R, d), np.float32)
        for k in range(PROBES):
            A, y, w = batch(k, stream=PROBE_STREAM)
            _, Gr = model.loss_grad(X, A, y, w)
            stat += precond.statistic(h, Gr, hz(X, A, y, w, WARM_START_STEP + k) if oasis else None)
        stat /= np.float32(PROBES)
        mom = precond.warm_start(h, mom, group_mean(stat) if mode == "global" else stat, mode == "global")
    D = precond.diagonal(h, mom.v, 0) if scaling != "identity" else None
    warm = scaling != "adam" or mode == "global"
    g = {"lr": lrs, "alpha": alphas, "r01": np.full((C, S), np.inf), "r03": np.full((C, S), np.inf),
         "dead": np.zeros((C, S), bool), "last": np.zeros((C, S), np.int64)}
    r01, r03, dead, last = (g[k].reshape(-1) for k in ("r01", "r03", "dead", "last"))  # views by group
    t, shown = 0, time.time()
    for r in range(1, max_rounds + 1):
        with np.errstate(all="ignore"):  # diverging rows overflow until they are dropped
            for _ in range(H):
                A, y, w = batch(t)
                _, Gr = model.loss_grad(X, A, y, w)
                zhz = hz(X, A, y, w, t) if oasis else None
                if scaling == "identity":
                    kern.sgd(X, Gr, lr, 0.0)
                elif mode == "global":
                    precond.step_frozen(h, kern, X, Gr, mom, D, lr, t + 1, 0.0, zhz)
                else:
                    precond.step_local(h, kern, X, Gr, mom, lr, t + 1, 0.0, zhz)
                t += 1
            X[...] = group_mean(X)
            if scaling != "identity":
                mom.v[...] = group_mean(mom.v)
                if scaling == "adam":
                    mom.m[...] = group_mean(mom.m)
                if mode == "global":
                    D = precond.diagonal(h, mom.v, 0 if warm else t)
            xbar = X[::NODES]
            f = model.loss(xbar, A_full, y_full, np.broadcast_to(w_full, (len(xbar), len(A_full))))
            gap = f - fstar
        bad = ~np.isfinite(gap) | (gap > 1e6)
        dead[act[bad]] = True
        last[act] = r
        for rk, target in ((r01, GAPS[0]), (r03, GAPS[1])):
            hit = ~bad & (gap <= target) & np.isinf(rk[act])
            rk[act[hit]] = r
        best, can_win = standing(g, bound)
        if log is not None and time.time() - shown > every:
            shown = time.time()
            log(f"    round {r}: {len(act)} of {C * S} (configuration, seed) pairs still simulated, best mean "
                + ("none yet" if best is None else f"{best[0]:.1f} at lr {-best[2]:.1e}, alpha {best[3]:.1e}"))
        if best is not None and not can_win.any():
            break  # certain
        keep = ~dead[act] & np.isinf(r03[act]) & (can_win[g_cfg[act]] if best is not None else True)
        if not keep.any():
            break
        if not keep.all():  # drop the finished groups' rows
            rows = np.repeat(keep, NODES)
            act = act[keep]
            X, lr = np.ascontiguousarray(X[rows]), lr[rows]
            mom = precond.Moments(np.ascontiguousarray(mom.m[rows]), np.ascontiguousarray(mom.v[rows]))
            if D is not None:
                D = np.ascontiguousarray(D[rows])
            h = hyper()
    return g


def edges(g, c, lr_grid, alpha_grid):
    """Per axis ("lr", "alpha"): "low" / "high" if the chosen value is its grid's smallest /
    largest, else None; and whether a configuration with the chosen one's exact mean rounds
    at both gaps (a tie, decided by the tie-breaks) has an interior value on that axis."""
    k = keys(g)
    tied = [j for j in range(len(k)) if k[j][:2] == k[c][:2]]
    out = {}
    for axis, grid in (("lr", lr_grid), ("alpha", alpha_grid)):
        v = g[axis][c]
        side = "low" if v == min(grid) and len(grid) > 1 else "high" if v == max(grid) and len(grid) > 1 else None
        out[axis] = (side, side is not None and any(min(grid) < g[axis][j] < max(grid) for j in tied))
    return out, tied


def tune_cell(ds, parts, scaling, mode, H, cap, fstar, log, alphas=ALPHAS, extensions=MAX_EXTENSIONS):
    """Runs the (lr, alpha) grid with edge extensions; returns the merged record and grids."""
    oasis = scaling == "oasis"
    lr_grid, alpha_grid = [float(v) for v in LRS], [float(v) for v in alphas] if oasis else [0.0]
    cfgs = [(a, lr) for a in alpha_grid for lr in lr_grid]
    g = run_grid(ds, parts, scaling, mode, H, [c[1] for c in cfgs], [c[0] for c in cfgs], cap, fstar, log=log)
    extended = []
    for _ in range(extensions):
        c = choose(g)
        if not np.isfinite(g["r01"][c]).any():  # nothing arrived anywhere: the choice is the tie-break
            break
        side, _ = edges(g, c, lr_grid, alpha_grid)
        new = {}
        for axis, grid in (("lr", lr_grid), ("alpha", alpha_grid)):
            where, tie_inside = side[axis]
            if where is None or tie_inside:  # interior, or on the edge only by a tie-break
                continue
            end, sign = (min(grid), -1) if where == "low" else (max(grid), 1)
            new[axis] = [float(end * 10.0 ** (sign * 0.5 * k)) for k in range(1, EXTEND + 1)]
        if not new:
            break
        new_lr, new_alpha = new.get("lr", []), new.get("alpha", [])
        cfgs = [(a, lr) for a in alpha_grid + new_alpha for lr in lr_grid + new_lr
                if a in new_alpha or lr in new_lr]
        extended.append({"lr": new_lr, "alpha": new_alpha})
        log(f"    chosen lr {g['lr'][c]:.1e} alpha {g['alpha'][c]:.1e} on an edge: running {len(cfgs)} more "
            f"configurations (lr {[f'{v:.1e}' for v in new_lr]}, alpha {[f'{v:.1e}' for v in new_alpha]})")
        bound, _ = standing(g)
        lr_grid, alpha_grid = sorted(lr_grid + new_lr), sorted(alpha_grid + new_alpha)
        g = merge(g, run_grid(ds, parts, scaling, mode, H, [c[1] for c in cfgs], [c[0] for c in cfgs], cap, fstar,
                              bound, log))
    return g, lr_grid, alpha_grid, extended


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--max-rounds", type=int, default=1000)
    p.add_argument("--oasis-max-rounds", type=int, default=0, help="cap of the OASIS rows (0: --max-rounds)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--H", default="1,5,20")
    p.add_argument("--methods", default="all", help="'all', 'oasis', or comma-separated method labels")
    p.add_argument("--data", default="raw,std")
    p.add_argument("--merge", default="", help="JSON of an earlier run: its rows not re-run here are kept")
    p.add_argument("--report", default="", help="only print the table and plot of this JSON (no runs)")
    p.add_argument("--alphas", default="", help="OASIS's alpha grid, comma-separated (default: half-decades "
                                                  "1e-5..10)")
    p.add_argument("--max-extensions", type=int, default=MAX_EXTENSIONS,
                   help="how often a grid is extended where the chosen value sits on its edge")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.report:
        with open(args.report) as fh:
            report(json.load(fh), args.out)
        return
    Hs = [int(h) for h in args.H.split(",")]
    if args.methods == "all":
        methods = METHODS
    else:
        wanted = [m.strip().lower() for m in args.methods.split(",")]
        methods = [m for m in METHODS if m[0].lower() in wanted or m[1] in wanted]
        if not methods:
            p.error(f"--methods {args.methods!r} names none of {[m[0] for m in METHODS]}")
    kinds = [k.strip() for k in args.data.split(",")]
    alphas = [float(a) for a in args.alphas.split(",")] if args.alphas else ALPHAS
    results = []
    t_start = time.time()

    def log(text):
        print(f"{text}  [{time.time() - t_start:.0f}s]", flush=True)

    for standardize in (False, True):
        if ("std" if standardize else "raw") not in kinds:
            continue
        for split in ("iid", "skew"):
            ds, parts = problem(standardize, split)
            fstar = f_star(ds)
            for H in Hs:
                for label, scaling, mode in methods:
                    cap = args.oasis_max_rounds if scaling == "oasis" and args.oasis_max_rounds else args.max_rounds
                    g, lr_grid, alpha_grid, extended = tune_cell(ds, parts, scaling, mode, H, cap, fstar, log,
                                                                 alphas, args.max_extensions)
                    c = choose(g)
                    best, can_win = standing(g)
                    certain = best is not None and not can_win.any()
                    oasis = scaling == "oasis"
                    side, tied = edges(g, c, lr_grid, alpha_grid)

                    def seeds(r):
                        return [cap if np.isinf(v) else int(v) for v in r[c]]

                    row = {"data": "std" if standardize else "raw", "split": split, "H": H, "method": label,
                           "lr": float(g["lr"][c]), "alpha": float(g["alpha"][c]),
                           "lr_on_edge": side["lr"][0] or False, "lr_edge_tied_inside": side["lr"][1],
                           "alpha_on_edge": (side["alpha"][0] or False) if oasis else False,
                           "alpha_edge_tied_inside": side["alpha"][1],
                           "tied": [[float(g["lr"][j]), float(g["alpha"][j])] for j in tied[:40]],
                           "lr_grid": [float(min(lr_grid)), float(max(lr_grid)), len(lr_grid)],
                           "alpha_grid": [float(min(alpha_grid)), float(max(alpha_grid)), len(alpha_grid)] if oasis
                           else None, "extended": extended,
                           "rounds_0.1": seeds(g["r01"]), "rounds_0.03": seeds(g["r03"]),
                           "arrived_0.1": np.isfinite(g["r01"][c]).tolist(),
                           "arrived_0.03": np.isfinite(g["r03"][c]).tolist(),
                           "diverged": g["dead"][c].tolist(), "cap": cap, "certain": bool(certain),
                           "stopped_at": int(g["last"].max()), "could_still_win": int(can_win.sum()),
                           "configurations": len(g["lr"]), "command": " ".join(sys.argv)}
                    results.append(row)
                    edge = "".join(f" {a}-EDGE({row[f'{a}_on_edge']}"
                                   + (", tied with an interior value)" if row[f"{a}_edge_tied_inside"] else ")")
                                   for a in ("lr", "alpha") if row[f"{a}_on_edge"])
                    log(f"{row['data']:>3} {split:>4} H={H:<2} {label:<15} lr={row['lr']:.1e}"
                        + (f" alpha={row['alpha']:.1e}" if oasis else "") + edge
                        + f" rounds@0.1={_cell(row, '0.1')} rounds@0.03={_cell(row, '0.03')} "
                        + ("certain" if certain else f"UNCERTAIN ({row['could_still_win']} could still win)")
                        + f", stopped at round {row['stopped_at']} of {cap}")
    if args.merge:
        with open(args.merge) as fh:
            old = json.load(fh)
        done = {(r["data"], r["split"], r["H"], r["method"]) for r in results}
        results = [r for r in old if (r["data"], r["split"], r["H"], r["method"]) not in done] + results
    with open(os.path.join(args.out, "local_scaling.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    report(results, args.out)


def _cell(row, gap):
    """mean±sd if every seed arrived; >=mean (k/3) with censored seeds at the cap; >cap if none."""
    r, ok = np.asarray(row[f"rounds_{gap}"], float), np.asarray(row.get(f"arrived_{gap}", [True] * 3))
    cap = row["cap"]
    if "arrived_0.03" not in row:  # a row of the older format: misses stored as the cap
        ok = r < cap
    if not ok.any():
        return f">{cap}"
    mark = "" if row.get("certain", True) else "?"
    if ok.all():
        return f"{r.mean():.0f}±{r.std():.0f}{mark}"
    return f">={r.mean():.0f}({ok.sum()}/{len(ok)}){mark}"


def _arrived(row, gap):
    return all(row.get(f"arrived_{gap}", [v < row["cap"] for v in row[f"rounds_{gap}"]]))


def _half(rows, scaling, gap):
    """Whether the better of `scaling` global / local needs <= half of Local SGD's mean rounds
    at `gap`: True / False, or None where censored seeds leave it open (a censored mean is a
    lower bound of the true one)."""
    base = rows["Local SGD"]
    b, b_exact = np.mean(base[f"rounds_{gap}"]), _arrived(base, gap)
    verdicts = []
    for mode in ("global", "local"):
        row = rows[f"{scaling} {mode}"]
        m, m_exact = np.mean(row[f"rounds_{gap}"]), _arrived(row, gap)
        verdicts.append(True if m_exact and m <= 0.5 * b else False if b_exact and m > 0.5 * b else None)
    return True if True in verdicts else False if all(v is False for v in verdicts) else None


def report(results, out):
    print("\nrounds to gap (mean±sd over 3 seeds; >cap: no seed arrived; >=m(k/3): k seeds arrived, the others "
          "counted as the cap; ?: the cell's answer is not certain) — tuned lr (and alpha) per method and cell")
    cells = sorted({(r["data"], r["split"], r["H"]) for r in results}, key=lambda c: (c[0], c[1], c[2]))
    methods = [m for m, _, _ in METHODS if any(r["method"] == m for r in results)]
    for gap in ("0.1", "0.03"):
        print(f"\ngap {gap}")
        print(f"{'cell':<16}" + "".join(f"{m:>16}" for m in methods))
        for c in cells:
            rows = {r["method"]: r for r in results if (r["data"], r["split"], r["H"]) == c}
            print(f"{c[0]} {c[1]} H={c[2]:<5}" + "".join(f"{_cell(rows[m], gap) if m in rows else '-':>16}"
                                                        for m in methods))
    print("\nchosen lr / alpha (E: on the edge of its grid) and the cap / round the search stopped at")
    for r in results:
        if r["method"].startswith("OASIS"):
            print(f"  {r['data']} {r['split']} H={r['H']:<2} {r['method']:<13} lr={r['lr']:.1e}"
                  f"{'E' if r['lr_on_edge'] else ' '} alpha={r['alpha']:.1e}{'E' if r['alpha_on_edge'] else ' '} "
                  f"cap={r['cap']} stopped={r.get('stopped_at', '?')} certain={r.get('certain', '?')}")
    print("\nchecks (paper's claims, shrunk):")
    for c in cells:
        rows = {r["method"]: r for r in results if (r["data"], r["split"], r["H"]) == c}
        if len(rows) < len(METHODS):
            continue
        base = {g: np.mean(rows["Local SGD"][f"rounds_{g}"]) for g in ("0.1", "0.03")}
        if c[0] == "raw":
            verdicts = {s: [_half(rows, s, g) for g in ("0.1", "0.03")] for s in ("Adam", "OASIS")}
            every = [v for vs in verdicts.values() for v in vs]
            ok = False if False in every else True if all(every) else "undecided"
            print(f"  raw {c[1]} H={c[2]}: Adam and OASIS need <= half of Local SGD's rounds at both gaps: {ok} "
                  f"(per method at 0.1, 0.03: {verdicts}; None: undecided, Local SGD censored at its cap "
                  f"{rows['Local SGD']['cap']})")
        else:
            best = min(np.mean(rows[m]["rounds_0.03"]) for m in methods[1:])
            ratio = best / base["0.03"]
            print(f"  std {c[1]} H={c[2]}: best scaled / Local SGD rounds at 0.03 = {ratio:.2f} (0.5..1.5: "
                  f"{0.5 <= ratio <= 1.5})")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    datasets = [k for k in ("raw", "std") if any(r["data"] == k for r in results)]
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), dpi=110, squeeze=False)
    axes = axes[0]
    for ax, dataset in zip(axes, datasets):
        Hs = sorted({r["H"] for r in results})
        labels = [f"{s} H={h}" for s in ("iid", "skew") for h in Hs]
        xs = np.arange(len(labels))
        for k, m in enumerate(methods):
            rows = [next((r for r in results if r["data"] == dataset and r["split"] == s and r["H"] == h
                          and r["method"] == m), None) for s in ("iid", "skew") for h in Hs]
            vals = [np.mean(r["rounds_0.03"]) if r else np.nan for r in rows]
            bars = ax.bar(xs + (k - 3) * 0.11, vals, width=0.11, label=m)
            for bar, r in zip(bars, rows):
                if r and not _arrived(r, "0.03"):  # censored: the bar is a lower bound
                    bar.set_hatch("//")
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"breast cancer, {dataset} features: rounds to gap 0.03")
        ax.set_ylabel("communication rounds (hatched: censored at the cap)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, "local_scaling.png")
    fig.savefig(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
