"""Simulation throughput: many nodes per rank, vectorised over the node axis.

Run:  python bench/simulation.py [--json FILE] [--profile]

(a) 256 nodes of D-SGD on a ring with logistic regression (29 features + bias: d = 30) on ONE rank: hpcopt (one
    (256, d) block, batched gradients, one fused mix kernel) against a straightforward
    per-node Python loop written here (a list of per-node vectors, NumPy per node); both
    run ROUNDS times, alternating, and each side's best round counts. hpcopt runs as
    `hpcopt run` would on this machine: its compiled kernels with one OpenMP thread per
    core of the rank (the fused loss/gradient pass splits the nodes between them); the
    baseline is single-threaded Python, as such loops are. A second row (no target) runs
    hpcopt with the process held to one core, so one kernel thread.
(b) 16 nodes placed as 1 rank x 16 nodes against 16 ranks x 1 node (one process per node,
    as a one-process-per-worker framework runs it), on the same cores.
Figures are node-steps per second (nodes x steps / seconds of the training loop). For
hpcopt the seconds are read off its own per-step clock (`/metrics/wall`, the time after
each step) from the end of the first step to the end of the last, so set-up, the first
(warm-up) step and the final evaluation of every node on the test set are left out, as
the baseline loops have none of them. `--profile` adds where one step's time goes
(microseconds per call of each part of a D-SGD step at 256 nodes, measured in isolation:
the fused keyed minibatch loss/gradient pass the step uses, and for comparison the
unfused keyed gather then NumPy loss/gradient; mix; update).
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
from typing import Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

PROBLEM = {"data": {"dataset": "classification", "dim": 29, "classes": 2, "samples_per_node": 64,
                    "batch_size": 16, "partition": "iid"},
           "model": {"name": "logistic"}, "algorithm": {"name": "dsgd"}, "topology": {"name": "ring"},
           "optimizer": {"lr": 0.1}}


ROUNDS = 3  # (a) runs both sides this many times, alternating, and keeps each side's best


def config(n: int, steps: int) -> dict:
    cfg = {k: dict(v) for k, v in PROBLEM.items()}
    cfg["nodes"] = {"n": n}
    cfg["run"] = {"steps": steps, "eval_every": 0, "log_every": steps, "progress": False}
    return cfg


def hpcopt_rate(n: int, steps: int, workdir: str) -> float:
    """Node-steps/s of hpcopt on this process (one rank)."""
    from hpcopt import config as config_mod
    from hpcopt import runner
    cfg = config_mod.from_dict(config(n, steps))
    r = runner.Runner(cfg, "", os.path.join(workdir, f"hp{n}"), force=True, out=io.StringIO())
    assert r.run() == 0
    return loop_seconds_rate(os.path.join(workdir, f"hp{n}"), n)


def one_core_rate(n: int, steps: int, workdir: str) -> Optional[float]:
    """hpcopt_rate with this process held to one of its cores (so one kernel thread), best
    of ROUNDS; None where the affinity cannot be set."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cores = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(cores)})
        return max(hpcopt_rate(n, steps, workdir) for _ in range(ROUNDS))
    finally:
        os.sched_setaffinity(0, cores)


def loop_seconds_rate(run_dir: str, n: int) -> float:
    """Node-steps/s of a finished run over its training loop (steps 2..T, /metrics/wall)."""
    from hpcopt import store
    wall = store.read_run(run_dir)["metrics"]["wall"]
    return n * (len(wall) - 1) / (wall[-1] - wall[0])


def loop_rate(n: int, steps: int) -> float:
    """The same D-SGD written as a per-node Python loop (what a first implementation does)."""
    from hpcopt import config as config_mod
    from hpcopt import data
    cfg = config_mod.from_dict(config(n, steps))
    ds = data.load(cfg.data, n)
    parts = data.partition(ds, n, "iid")
    Xs = [ds.X_train[p].astype(np.float32) for p in parts]
    ys = [ds.y_train[p].astype(np.float32) for p in parts]
    d = ds.features + 1
    x = [np.zeros(d, np.float32) for _ in range(n)]
    rng = np.random.default_rng(0)
    lr = np.float32(0.1)
    t0 = time.perf_counter()
    for _ in range(steps):
        grads = []
        for i in range(n):
            idx = rng.integers(0, len(Xs[i]), 16)
            A, y = Xs[i][idx], ys[i][idx]
            z = A @ x[i][:-1] + x[i][-1]
            p = 1.0 / (1.0 + np.exp(-z))
            r = (p - y) / 16
            grads.append(np.concatenate([A.T @ r, [r.sum()]]).astype(np.float32))
        x = [(x[i - 1] + x[i] + x[(i + 1) % n]) / 3 - lr * grads[i] for i in range(n)]
    return n * steps / (time.perf_counter() - t0)


def ranks_rate(ranks: int, n: int, steps: int, workdir: str) -> float:
    import yaml

    path = os.path.join(workdir, f"cfg{ranks}.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(config(n, steps), fh)
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = here if os.path.exists(here) else shutil.which("mpiexec")
    out = os.path.join(workdir, f"r{ranks}")
    env = dict(os.environ, PYTHONPATH=os.path.join(HERE, "..") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    subprocess.run([mpiexec, "-n", str(ranks), sys.executable, "-m", "mpi4py", "-m", "hpcopt", "run", path,
                    "--out", out], check=True, env=env, stdout=subprocess.DEVNULL)
    return loop_seconds_rate(out, n)


def breakdown(n: int = 256, calls: int = 2000) -> dict:
    """Microseconds per call of the parts of one D-SGD step (1 rank, n nodes)."""
    from hpcopt import config as config_mod
    from hpcopt import runner
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_mod.from_dict(config(n, 10))
        r = runner.Runner(cfg, "", os.path.join(tmp, "b"), force=True, out=io.StringIO())
        r.setup()
        ctx = r.ctx
        state = r.algo.init(ctx, r.model.init(0))
        A, y, w = ctx.data.batch(0)
        W = ctx.topology.sparse(0)
        out = np.empty_like(state.X)
        _, G = ctx.model.loss_grad(state.X, A, y, w)

        def timed(fn):
            fn(0)
            t0 = time.perf_counter()
            for i in range(calls):
                fn(i)
            return (time.perf_counter() - t0) / calls * 1e6
        parts = {"fused keyed minibatch + loss + gradient": timed(
                     lambda i: ctx.data.linear_loss_grad(ctx.model, state.X, i)),
                 "(unfused: minibatch gather": timed(lambda i: ctx.data.batch(i)),
                 "then NumPy loss + gradient)": timed(lambda i: ctx.model.loss_grad(state.X, A, y, w)),
                 "mix": timed(lambda i: ctx.comm.mix(state.X, W, out=out)),
                 "update": timed(lambda i: ctx.kernels.sgd(out, G, 0.0)),
                 "whole step": timed(lambda i: r.algo.step(ctx, state, i, 0.0))}
        parts["kernels"] = ctx.kernels.impl
    return parts


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json", default="")
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    rows = []
    if args.profile:
        parts = breakdown()
        print("one D-SGD step, 256 nodes, 1 rank (us per call): " +
              ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in parts.items()))
    with tempfile.TemporaryDirectory() as tmp:
        # alternating rounds, the best of each side: a burst of load from a neighbour on a
        # shared host then slows one round of either side, not the ratio
        ours = base = 0.0
        for _ in range(ROUNDS):
            ours = max(ours, hpcopt_rate(256, 2000, tmp))
            base = max(base, loop_rate(256, 60))
        from hpcopt import runner
        threads = runner._threads_per_rank(1)
        print(f"(a) best of {ROUNDS} alternating rounds; hpcopt's kernels on {threads} thread(s)")
        rows.append({"case": "256 nodes on 1 rank: hpcopt vs per-node Python loop", "hpcopt": ours, "baseline": base,
                     "ratio": ours / base, "target": 30.0})
        single = one_core_rate(256, 2000, tmp) if threads > 1 else None
        if single is not None:  # for comparison: the rank held to one core (one kernel thread), no target
            rows.append({"case": "the same, hpcopt's rank on one core", "hpcopt": single, "baseline": base,
                         "ratio": single / base, "target": 0.0})
        one = ranks_rate(1, 16, 2000, tmp)
        many = ranks_rate(16, 16, 300, tmp)
        rows.append({"case": "16 nodes: 1 rank x 16 nodes vs 16 ranks x 1 node", "hpcopt": one, "baseline": many,
                     "ratio": one / many, "target": 5.0})
    print("simulation throughput (node-steps per second)")
    for r in rows:
        print(f"  {r['case']:<55} {r['hpcopt']:>12.0f} vs {r['baseline']:>10.0f}  ratio {r['ratio']:7.1f}"
              + (f"  (target >= {r['target']:g})" if r["target"] else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
