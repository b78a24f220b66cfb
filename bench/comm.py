"""Communication benchmark: hpcopt's mix and mean against hand-written mpi4py baselines.

Run:  mpiexec -n 4 python bench/comm.py [--reps 30] [--json FILE]

* mix on a ring, one node per rank: `Comm.mix` (plan + Isend/Irecv + fused kernel) against
  a hand-written Irecv/Isend of the two neighbours' rows, Waitall and a NumPy weighted
  sum into a preallocated output; d = 1e3 .. 1e7 (target at d = 1e6: ratio <= 1.1).
* mean: `Comm.mean` (the fused 1/n-scaled copy, then one in-place all-reduce: blocking
  under the watchdog up to comm.blocking_bytes, nonblocking with a polite wait above)
  against a raw blocking `Allreduce` of the same buffer; d = 1e3 .. 1e7 (target: ratio
  <= 1.05). Row `mean/hand`: the same `Comm.mean` against a hand-written mpi4py mean
  (raw Allreduce, then NumPy's in-place multiply by 1/n), i.e. the cheapest mean a user
  could write, which shows how much of the first ratio is the scaling pass itself; row
  `hand/raw` (hand-written mean against raw Allreduce, both columns baselines) is that
  floor. Rows `mean` use comm.blocking_bytes = 1 MiB (what auto picks where every rank
  has a core; `--blocking-bytes` changes it); row `mean polite` is the same mean with
  polite waits (blocking_bytes 0, what auto picks where ranks share cores, as 4 ranks
  on 2 cores do here).
  `Comm.allreduce` (a plain sum, no scaling) against the raw Allreduce isolates
  hpcopt's per-call overhead.

Each figure is the median over repetitions of the slowest rank's time; both sides are
measured in the same run, interleaved, so machine noise hits them alike.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from hpcopt import topology  # noqa: E402
from hpcopt.comm import Comm  # noqa: E402
from hpcopt.kernels import Kernels  # noqa: E402

world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()


def slowest(fn) -> float:
    world.Barrier()
    t0 = time.perf_counter()
    fn()
    return world.allreduce(time.perf_counter() - t0, op=MPI.MAX)


def paired(ours, base, reps: int):
    """Median times of both, measured in alternating order so noise hits them alike."""
    a, b = [], []
    for i in range(reps):
        if i % 2:
            a.append(slowest(ours))
            b.append(slowest(base))
        else:
            b.append(slowest(base))
            a.append(slowest(ours))
    return float(np.median(a)), float(np.median(b))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--json", default="")
    p.add_argument("--max-d", type=float, default=1e7, help="largest d (a quick run: 1e3)")
    p.add_argument("--blocking-bytes", type=int, default=1 << 20,
                   help="comm.blocking_bytes for hpcopt's rows (default 1 MiB, what auto picks where ranks "
                        "have a core each; row 'mean polite' always uses 0)")
    args = p.parse_args()
    threads = max(1, (len(os.sched_getaffinity(0)) // size))
    kernels = Kernels(mode="auto", threads=threads)
    comm = Comm(size, kernels=kernels, timeout=600, blocking_bytes=args.blocking_bytes)
    polite = Comm(size, kernels=kernels, timeout=600, blocking_bytes=0)
    W = topology.build("ring", size).mixing_matrix(0)
    peers = sorted({(rank - 1) % size, (rank + 1) % size} - {rank})
    w_self = np.float32(W[rank, rank])
    w_peer = [np.float32(W[rank, q]) for q in peers]
    rows = []
    for d in [10**k for k in range(3, 8) if 10**k <= args.max_d]:
        # small sizes take microseconds: many more repetitions for a stable median
        reps = max(5, args.reps // 3) if d >= 10**7 else args.reps * (10 if d <= 10**4 else 1)
        X = np.random.default_rng(rank).standard_normal((1, d)).astype(np.float32)
        bufs = [np.empty(d, np.float32) for _ in peers]
        out, tmp = np.empty(d, np.float32), np.empty(d, np.float32)

        def baseline_mix():
            reqs = [world.Irecv(b, source=q, tag=0) for b, q in zip(bufs, peers)]
            reqs += [world.Isend(X[0], dest=q, tag=0) for q in peers]
            MPI.Request.Waitall(reqs)
            np.multiply(X[0], w_self, out=out)
            for b, w in zip(bufs, w_peer):
                np.multiply(b, w, out=tmp)
                np.add(out, tmp, out=out)

        mixed = np.empty_like(X)
        ours_mix = lambda: comm.mix(X, W, out=mixed)  # noqa: E731
        ours_mix(), baseline_mix()
        assert np.allclose(mixed[0], out, rtol=1e-5, atol=1e-6)
        t_ours, t_base = paired(ours_mix, baseline_mix, reps)
        rows.append({"op": "mix ring", "d": d, "hpcopt_ms": t_ours * 1e3, "baseline_ms": t_base * 1e3,
                     "ratio": t_ours / t_base, "target": 1.1 if d == 10**6 else None})
        red = np.empty(d, np.float32)
        base_mean = lambda: world.Allreduce(X[0], red, op=MPI.SUM)  # noqa: E731
        mean_out = np.empty(d, np.float32)
        ours_mean = lambda: comm.mean(X, out=mean_out)  # noqa: E731
        ours_mean(), base_mean()
        t_ours, t_base = paired(ours_mean, base_mean, reps)
        rows.append({"op": "mean", "d": d, "hpcopt_ms": t_ours * 1e3, "baseline_ms": t_base * 1e3,
                     "ratio": t_ours / t_base, "target": 1.05})
        t_ours, t_base = paired(lambda: polite.mean(X, out=mean_out), base_mean, reps)
        rows.append({"op": "mean polite", "d": d, "hpcopt_ms": t_ours * 1e3, "baseline_ms": t_base * 1e3,
                     "ratio": t_ours / t_base, "target": None})
        inv_n = np.float32(1.0 / size)

        def hand_mean():
            world.Allreduce(X[0], red, op=MPI.SUM)
            np.multiply(red, inv_n, out=red)

        hand_mean()
        assert np.allclose(red, mean_out, rtol=1e-5, atol=1e-6)
        t_ours, t_base = paired(ours_mean, hand_mean, reps)
        rows.append({"op": "mean/hand", "d": d, "hpcopt_ms": t_ours * 1e3, "baseline_ms": t_base * 1e3,
                     "ratio": t_ours / t_base, "target": None})
        # the floor: what the 1/n pass costs a hand-written mean over the raw all-reduce
        t_hand, t_base = paired(hand_mean, base_mean, reps)
        rows.append({"op": "hand/raw", "d": d, "hpcopt_ms": t_hand * 1e3, "baseline_ms": t_base * 1e3,
                     "ratio": t_hand / t_base, "target": None})
        sum_out = np.empty(d, np.float32)
        ours_sum = lambda: comm.allreduce(X[0], "sum", out=sum_out)  # noqa: E731
        t_ours, t_base = paired(ours_sum, base_mean, reps)
        rows.append({"op": "allreduce", "d": d, "hpcopt_ms": t_ours * 1e3, "baseline_ms": t_base * 1e3,
                     "ratio": t_ours / t_base, "target": None})
    if rank == 0:
        print(f"comm benchmark: {size} ranks, one node per rank, float32, kernels {comm.kernels.impl}, "
              f"median of the slowest rank; comm.blocking_bytes {args.blocking_bytes} "
              f"(auto would pick {'0: ranks share cores' if comm.oversubscribed else '1 MiB'})")
        print(f"{'op':<12}{'d':>10}{'hpcopt ms':>12}{'baseline ms':>13}{'ratio':>8}  target")
        for r in rows:
            tgt = f"<= {r['target']}" if r["target"] else ""
            print(f"{r['op']:<12}{r['d']:>10.0e}{r['hpcopt_ms']:>12.3f}{r['baseline_ms']:>13.3f}"
                  f"{r['ratio']:>8.2f}  {tgt}")
        print("baselines: mix = hand-written Irecv/Isend + Waitall + NumPy weighted sum; "
              "mean and allreduce = raw blocking Allreduce (mean also scales by 1/n: one more pass over d); "
              "mean/hand = raw Allreduce + NumPy multiply by 1/n; hand/raw: that hand-written mean vs raw Allreduce "
              "(the cost of the 1/n pass itself)")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"ranks": size, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
