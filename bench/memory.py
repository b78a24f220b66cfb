"""Memory: 1024 nodes x d = 1e4 with Adam (Local SGD, local scaling) on one rank.

Run:  python bench/memory.py [--json FILE]

Reports the peak memory allocated while the state is built and 20 steps run (NumPy's
allocations as traced by tracemalloc, so the data set loaded before is not counted)
against the bytes of the algorithm state (parameters + Adam's two moments), and the
process's peak RSS for reference.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import tempfile
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json", default="")
    p.add_argument("--nodes", type=int, default=1024)
    p.add_argument("--dim", type=int, default=10000)
    args = p.parse_args()
    from hpcopt import config, optim, runner
    cfg = config.from_dict({
        "run": {"steps": 20, "eval_every": 0, "log_every": 20, "progress": False},
        "nodes": {"n": args.nodes},
        "data": {"dataset": "quadratic", "dim": args.dim, "samples_per_node": 2, "batch_size": 1,
                 "test_fraction": 0.3},
        "algorithm": {"name": "local_sgd", "local_steps": 5, "scaling": "local"},
        "optimizer": {"lr": 1e-4, "scaling": "adam"}})
    with tempfile.TemporaryDirectory() as tmp:
        r = runner.Runner(cfg, "", os.path.join(tmp, "mem"), out=io.StringIO())
        r.setup()
        tracemalloc.start()
        base, _ = tracemalloc.get_traced_memory()
        state = r.algo.init(r.ctx, r.model.init(0))
        for t in range(20):
            state, _ = r.algo.step(r.ctx, state, t, optim.lr_at(cfg.optimizer, t, 20))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    state_bytes = sum(getattr(state, f).nbytes for f in state._fields)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = {"case": f"{args.nodes} nodes x d={args.dim}, Adam", "state_MB": state_bytes / 1e6,
           "peak_MB": (peak - base) / 1e6, "ratio": (peak - base) / state_bytes, "target": 1.3,
           "peak_rss_MB": rss / 1e6}
    print(f"memory: {row['case']}: state {row['state_MB']:.1f} MB, peak allocated {row['peak_MB']:.1f} MB "
          f"(ratio {row['ratio']:.2f}, target <= 1.3), process peak RSS {row['peak_rss_MB']:.0f} MB")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([row], fh, indent=1)


if __name__ == "__main__":
    main()
