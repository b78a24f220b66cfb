"""hpcopt's `mean` against torch.distributed's gloo all_reduce, in the same processes.

Run:  mpiexec -n P python bench/gloo.py [--reps 20] [--json FILE]     (needs torch)

Every rank holds both communicators: hpcopt's (MPI, through `hpcopt.comm.Comm`) and a
gloo process group (rank and size from MPI, rendezvous through a file store). For
d = 1e3 .. 1e7 each repetition times one hpcopt mean of a (1, d) float32 row and one
gloo mean of the same data (`all_reduce(SUM)` on a tensor that shares the row's memory,
then division by P, which is how a torch user averages), alternating which goes first,
so machine noise hits both alike. Figures are medians over repetitions of the slowest
rank's time (target: hpcopt faster than gloo at every size, ratio < 1).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.comm import paired  # noqa: E402  (alternating medians of the slowest rank)
from hpcopt.comm import Comm  # noqa: E402
from hpcopt.kernels import Kernels  # noqa: E402

world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", default="")
    p.add_argument("--max-d", type=float, default=1e7, help="largest d (a quick run: 1e3)")
    args = p.parse_args()
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    store_dir = world.bcast(tempfile.mkdtemp(prefix="hpcopt-gloo-") if rank == 0 else None)
    store_file = os.path.join(store_dir, "store")
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=size)
    comm = Comm(size, kernels=Kernels(mode="auto", threads=1), timeout=600)
    rows = []
    for d in [10**k for k in range(3, 8) if 10**k <= args.max_d]:
        reps = max(5, args.reps // 4) if d >= 10**7 else args.reps * (5 if d <= 10**4 else 1)
        X = np.random.default_rng(rank).standard_normal((1, d)).astype(np.float32)
        ours_out = np.empty(d, np.float32)
        buf = np.empty(d, np.float32)
        t = torch.from_numpy(buf)  # shares buf's memory

        def ours():
            comm.mean(X, out=ours_out)

        def gloo():
            buf[:] = X[0]  # all_reduce works in place: start from the row each time
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(size)

        ours(), gloo()
        assert np.allclose(ours_out, buf, rtol=1e-4, atol=1e-5)
        t_ours, t_gloo = paired(ours, gloo, reps)
        rows.append({"d": d, "ranks": size, "hpcopt_ms": t_ours * 1e3, "gloo_ms": t_gloo * 1e3,
                     "ratio": t_ours / t_gloo})
    dist.destroy_process_group()
    if rank == 0:
        shutil.rmtree(store_dir, ignore_errors=True)
        print(f"mean vs torch {torch.__version__} gloo all_reduce + div: {size} ranks, float32, "
              f"median of the slowest rank")
        print(f"{'d':>10}{'hpcopt ms':>12}{'gloo ms':>10}{'ratio':>8}  target < 1")
        for r in rows:
            print(f"{r['d']:>10.0e}{r['hpcopt_ms']:>12.3f}{r['gloo_ms']:>10.3f}{r['ratio']:>8.2f}")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"ranks": size, "torch": torch.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
