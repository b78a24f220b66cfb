"""Large simulated networks on one rank: cost per node-step against the number of nodes.

Run:  python bench/large.py [--json FILE] [--quick] [--only ROW,...]

Rows (every ratio measured in one run, same d, batch and data per node at both sizes):
  dsgd_ring, dsgd_one_peer   D-SGD (combine-then-adapt, logistic regression, d = 31) on a
                             ring / one-peer exponential graph: node-steps/s at n = 1e5
                             over node-steps/s at n = 1e3 (target >= 0.7);
  teleport                   Teleportation, k = 16 (ring token graph), d = 11 (10 features,
                             8 samples per node): step time at n = 1e5 over n = 1e3
                             (target <= 1.3) and the process's peak RSS at n = 1e5
                             (target < 2 GB);
  local_adam                 Local SGD with Adam, 1e5 nodes x d = 100: peak memory of
                             NumPy's allocations (tracemalloc, from before the data are
                             built) over state + data bytes (target <= 1.3);
  run_1e5                    a 1e5-node D-SGD run of 200 steps through `hpcopt run` (the
                             runner: data, checkpoints, run.h5) in a subprocess on this
                             machine's cores, evaluating at steps 100 and 200
                             (run.node_metrics: auto = a 1024-node sample): wall time,
                             peak RSS (target: completes within 24 GiB), run.h5 size.
The first four rows drive the algorithms' step functions directly (a Context built here,
as the runner builds it), so per-step evaluation and run.h5 writing are not in them;
steps are timed after one warm-up step.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


def problem(n: int, *, algorithm: str = "dsgd", topology: str = "ring", dim: int = 30, samples: int = 16,
            batch: int = 8, k: int = 16, optimizer=None, extra=None) -> dict:
    cfg = {"nodes": {"n": n},
           "data": {"dataset": "classification", "dim": dim, "classes": 2, "samples_per_node": samples,
                    "batch_size": batch, "partition": "iid", "test_fraction": 0.2},
           "model": {"name": "logistic"}, "algorithm": {"name": algorithm}, "topology": {"name": topology},
           "optimizer": dict(optimizer or {"lr": 0.1}),
           "run": {"steps": 100, "eval_every": 0, "progress": False}}
    if algorithm == "teleport":
        cfg["algorithm"]["k"] = k
    for sec, vals in (extra or {}).items():
        cfg.setdefault(sec, {}).update(vals)
    return cfg


def context(cfg_dict: dict, comm=None):
    """(Context, algorithm module) for a config dict, built the way the runner builds it
    (one rank unless `comm` is given)."""
    from hpcopt import algorithms, backend, config, data, models
    from hpcopt import topology as topology_mod
    from hpcopt.comm import Comm
    from hpcopt.kernels import Kernels
    cfg = config.from_dict(cfg_dict)
    n = cfg.nodes.n
    b = backend.cpu()
    kernels = Kernels(on_gpu=False, mode="auto")
    comm = comm or Comm(n, backend=b, kernels=kernels)
    comm.backend, comm.kernels = b, kernels
    topo = topology_mod.from_config(cfg.topology, n) if cfg.algorithm.name.value == "dsgd" else None
    ds = data.load(cfg.data, n)
    parts = data.partition(ds, n, cfg.data.partition.value, cfg.data.alpha, cfg.data.shards_per_node,
                           cfg.data.seed)
    model = models.build(cfg.model, ds, backend=b)
    nd = data.NodeData(b.xp, ds, parts, range(comm.lo, comm.hi), cfg.data.batch_size, cfg.run.seed)
    ctx = algorithms.Context(cfg, comm, b, kernels, model, nd, topo, {})
    return ctx, algorithms.get(cfg.algorithm.name.value), ds


def step_seconds(ctx, algo, steps: int, lr: float = 0.1):
    """(seconds per step after one warm-up step, final state)."""
    state = algo.init(ctx, ctx.model.init(0))
    state, _ = algo.step(ctx, state, 0, lr)
    t0 = time.perf_counter()
    for t in range(1, steps + 1):
        state, _ = algo.step(ctx, state, t, lr)
    return (time.perf_counter() - t0) / steps, state


def peak_rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def _child(args) -> dict:
    """One measurement in a fresh process (peak RSS of that process alone)."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(args)],
                         check=True, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(spec: dict) -> dict:
    kind = spec["kind"]
    if kind == "rate":
        ctx, algo, _ = context(problem(spec["n"], **spec["problem"]))
        sec, _ = step_seconds(ctx, algo, spec["steps"])
        return {"seconds_per_step": sec, "node_steps_per_s": spec["n"] / sec, "peak_rss": peak_rss()}
    if kind == "local_adam":
        tracemalloc.start()
        ctx, algo, ds = context(problem(spec["n"], algorithm="local_sgd", dim=spec["dim"] - 1, samples=2, batch=1,
                                        optimizer={"lr": 1e-3, "scaling": "adam"},
                                        extra={"algorithm": {"local_steps": 5, "scaling": "local"}}))
        data_bytes = (ds.X_train.nbytes + ds.y_train.nbytes + ds.X_test.nbytes + ds.y_test.nbytes
                      + ctx.data._flat_X.nbytes + ctx.data._flat_y.nbytes)
        state = algo.init(ctx, ctx.model.init(0))
        for t in range(spec["steps"]):
            state, _ = algo.step(ctx, state, t, 1e-3)
        _, peak = tracemalloc.get_traced_memory()
        state_bytes = sum(getattr(state, f).nbytes for f in state._fields)
        return {"peak": peak, "state": state_bytes, "data": data_bytes, "peak_rss": peak_rss()}
    raise ValueError(kind)


def run_1e5(steps: int, ranks: int = 1) -> dict:
    """A 1e5-node D-SGD run through `hpcopt run` (wall seconds, peak RSS of the process tree)."""
    import yaml
    cfg = problem(100_000, dim=30, samples=8, batch=8)
    # run.node_metrics: auto -> sample above 1024 nodes: the per-node columns and the per-node
    # test evaluation cover a fixed sample of 1024 nodes, the _stats columns all 1e5
    cfg["run"] = {"steps": steps, "eval_every": max(1, steps // 2), "log_every": max(1, steps // 4),
                  "progress": False, "checkpoint_every": 0}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "large.yaml")
        with open(path, "w") as fh:
            yaml.safe_dump(cfg, fh)
        cmd = [sys.executable, "-m", "hpcopt", "run", path, "--out", os.path.join(tmp, "run")]
        if ranks > 1:
            here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
            cmd = [here, "-n", str(ranks), sys.executable, "-m", "mpi4py", *cmd[1:]]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=os.path.join(HERE, "..")))
        wall = time.perf_counter() - t0
        h5 = os.path.join(tmp, "run", "run.h5")
        h5_bytes = os.path.getsize(h5) if os.path.exists(h5) else float("nan")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024.0
    return {"returncode": proc.returncode, "wall_s": wall, "peak_rss": rss, "run_h5_MB": h5_bytes / 1e6,
            "message": (proc.stderr.strip().splitlines() or [""])[-1][:300]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json", default="")
    p.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    p.add_argument("--only", default="", help="comma-separated rows")
    p.add_argument("--child", default="")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    only = set(filter(None, args.only.split(",")))

    def want(r):
        return not only or r in only

    steps_big, steps_small = (5, 20) if args.quick else (30, 300)
    rows = []
    for row, topo in (("dsgd_ring", "ring"), ("dsgd_one_peer", "one_peer_exponential")):
        if not want(row):
            continue
        prob = {"topology": topo, "dim": 30, "samples": 16, "batch": 8}
        small = _child({"kind": "rate", "n": 1000, "steps": steps_small, "problem": prob})
        big = _child({"kind": "rate", "n": 100_000, "steps": steps_big, "problem": prob})
        rows.append({"case": f"D-SGD {topo}, d=31, node-steps/s n=1e5 vs n=1e3", "hpcopt": big["node_steps_per_s"],
                     "baseline": small["node_steps_per_s"],
                     "ratio": big["node_steps_per_s"] / small["node_steps_per_s"], "target": ">= 0.7",
                     "peak_rss_MB_1e5": big["peak_rss"] / 1e6})
    if want("teleport"):
        prob = {"algorithm": "teleport", "k": 16, "dim": 10, "samples": 8, "batch": 8}
        small = _child({"kind": "rate", "n": 1000, "steps": 10 * steps_small, "problem": prob})
        big = _child({"kind": "rate", "n": 100_000, "steps": 10 * steps_small, "problem": prob})
        rows.append({"case": "Teleportation k=16, d=11, step time n=1e5 vs n=1e3 (us)",
                     "hpcopt": big["seconds_per_step"] * 1e6, "baseline": small["seconds_per_step"] * 1e6,
                     "ratio": big["seconds_per_step"] / small["seconds_per_step"], "target": "<= 1.3",
                     "peak_rss_MB_1e5": big["peak_rss"] / 1e6, "rss_target": "< 2000 MB"})
    if want("local_adam"):
        r = _child({"kind": "local_adam", "n": 100_000, "dim": 100, "steps": 10})
        rows.append({"case": "Local SGD + Adam, 1e5 nodes x d=100: peak allocation vs state + data (MB)",
                     "hpcopt": r["peak"] / 1e6, "baseline": (r["state"] + r["data"]) / 1e6,
                     "ratio": r["peak"] / (r["state"] + r["data"]), "target": "<= 1.3",
                     "peak_rss_MB": r["peak_rss"] / 1e6})
    if want("run_1e5"):
        r = run_1e5(20 if args.quick else 200)
        rows.append({"case": f"hpcopt run: D-SGD ring, 1e5 nodes, {20 if args.quick else 200} steps, 1 rank",
                     "hpcopt": r["wall_s"], "baseline": float("nan"), "ratio": float("nan"),
                     "target": "completes within 24 GiB", "peak_rss_MB": r["peak_rss"] / 1e6,
                     "run_h5_MB": r["run_h5_MB"],
                     "returncode": r["returncode"], "message": r["message"]})
    print("large networks on one rank")
    for r in rows:
        extra = "".join(f"  {k}={v:.0f}" for k, v in r.items() if k.startswith(("peak_rss", "run_h5")))
        print(f"  {r['case']:<78} {r['hpcopt']:>12.4g} vs {r['baseline']:>10.4g}  ratio {r['ratio']:6.3f}"
              f"  (target {r['target']}){extra}" + (f"  exit {r['returncode']}: {r['message']}"
                                                   if r.get("returncode") else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
