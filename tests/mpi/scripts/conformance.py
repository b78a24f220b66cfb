"""D-SGD on a heterogeneous quadratic reaches the closed-form optimum on every topology.

Full-batch gradients, step size 0.1 divided by 10 at steps 1000, 3000 and 6000. With a
constant step D-SGD stops at a distance O(lr * heterogeneity / spectral gap) from x*;
the decaying step drives that distance down. argv: topology names, tolerance.
"""
import io
import sys

import numpy as np

from hpcopt import config, models, runner

names = sys.argv[1].split(",")
tol = float(sys.argv[2])
workdir = sys.argv[3]
edgelist = f"{workdir}/graph.txt"
with open(edgelist, "w") as fh:  # a ring with two chords
    fh.write("\n".join(f"{i} {(i + 1) % 8}" for i in range(8)) + "\n0 4\n2 6\n")
for name in names:
    cfg = config.from_dict({
        "run": {"steps": 10000, "eval_every": 0, "log_every": 5000, "progress": False},
        "nodes": {"n": 8},
        "data": {"dataset": "quadratic", "batch_size": 0, "samples_per_node": 20, "dim": 5, "heterogeneity": 1.0},
        "algorithm": {"name": "dsgd"},
        "optimizer": {"lr": 0.1, "schedule": "step", "milestones": [1000, 3000, 6000], "gamma": 0.1},
        "topology": {"name": name, "p": 0.4, "path": edgelist}})
    r = runner.Runner(cfg, "", f"{workdir}/{name}", out=io.StringIO())
    assert r.run() == 0
    xs = models.least_squares_optimum(r.dataset, r.parts)
    err = float(r.comm.allreduce(np.array([np.abs(r.state.X - xs).max()]), "max")[0] / np.abs(xs).max())
    if r.comm.rank == 0:
        print(f"{name}: max_i |x_i - x*| / |x*| = {err:.2e}", flush=True)
    assert err < tol, f"{name}: {err:.3e} >= {tol}"
