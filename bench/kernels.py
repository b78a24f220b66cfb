"""Kernel benchmark: fused updates and mix_rows against NumPy and the machine's bandwidth.

Run:  python bench/kernels.py [--json FILE]
      python bench/kernels.py --small [--json FILE]   # per-call cost of every entry point at small d

Measured in one run, on this machine's cores (OpenMP threads = all cores):
* triad bandwidth: a[i] = b[i] + s * c[i] compiled with the same flags as the kernels
  (STREAM counting: 12 bytes per element);
* fused Adam update (`Kernels.adam`, 28 bytes per element: reads x, g, m, v; writes x, m, v)
  at d = 1e5, 1e6, 1e7 against a careful in-place NumPy Adam (out= everywhere, one scratch
  buffer). Targets at 1e7: >= 0.8x triad bandwidth and >= 5x NumPy in place;
* mix_rows (the weighted neighbour sum of D-SGD on a ring) against NumPy in place.
The GPU build is measured the same way when CuPy sees a device (--gpu).

`--small` times one call of every `Kernels` entry point (compiled and NumPy builds) at
d = 16 and 1000, where the Python around the C call (argument checks, cached addresses)
is most of the cost: microseconds per call, best of repeated loops.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from hpcopt import kernels as K  # noqa: E402

TRIAD = r"""
extern "C" void triad(float* __restrict__ a, const float* __restrict__ b, const float* __restrict__ c,
                      float s, long long n) {
    #pragma omp parallel for simd schedule(static)
    for (long long i = 0; i < n; ++i) a[i] = b[i] + s * c[i];
}
"""


def best(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def triad_library(tmp: str):
    src = os.path.join(tmp, "triad.cpp")
    lib = os.path.join(tmp, "triad.so")
    with open(src, "w") as fh:
        fh.write(TRIAD)
    flags = [f for f in K.CPU_FLAGS if f not in ("-x", "c++")]
    subprocess.run([K._compiler(), *flags, src, "-o", lib], check=True)
    so = ctypes.CDLL(lib)
    so.triad.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_float, ctypes.c_longlong]
    return so


def numpy_adam(x, g, m, v, tmp, lr, b1, b2, step, eps=1e-8):
    f = np.float32
    inv1, inv2 = f(1 / (1 - b1 ** step)), f(1 / (1 - b2 ** step))
    m *= f(b1)
    np.multiply(g, f(1 - b1), out=tmp)
    m += tmp
    v *= f(b2)
    np.multiply(g, g, out=tmp)
    tmp *= f(1 - b2)
    v += tmp
    np.multiply(v, inv2, out=tmp)
    np.sqrt(tmp, out=tmp)
    tmp += f(eps)
    np.divide(m, tmp, out=tmp)
    tmp *= f(lr) * inv1
    x -= tmp


def per_call_us(fn, calls: int, repeats: int) -> float:
    """Best over `repeats` loops of `calls` calls, in microseconds per call."""
    fn()
    best_t = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best_t = min(best_t, time.perf_counter() - t0)
    return best_t / calls * 1e6


def small(args) -> None:
    """Per-call cost of every entry point at small d (the Python overhead around the kernel)."""
    builds = [("cpu", K.Kernels(mode="compiled", threads=1)), ("numpy", K.Kernels(mode="numpy"))]
    rows = []
    for d in (16, 1000):
        rng = np.random.default_rng(0)
        x, g, m, v, dg = (np.abs(rng.standard_normal(d)).astype(np.float32) for _ in range(5))
        X = rng.standard_normal((4, d)).astype(np.float32)
        remote = rng.standard_normal((2, d)).astype(np.float32)
        out, mean = np.empty_like(X), np.empty(d, np.float32)
        indptr = np.arange(0, 13, 3, dtype=np.int64)
        indices = np.array([4, 0, 1, 0, 1, 2, 1, 2, 3, 2, 3, 5], np.int64)
        weights = np.full(12, 1 / 3, np.float32)
        for impl, k in builds:
            cases = {
                "sgd": lambda: k.sgd(x, g, 1e-3, 0.0),
                "momentum": lambda: k.momentum(x, g, m, 1e-3, 0.9),
                "rmsprop": lambda: k.rmsprop(x, g, v, 1e-3, 0.99),
                "adam": lambda: k.adam(x, g, m, v, 1e-3, 0.9, 0.999, 10),
                "scaled": lambda: k.scaled(x, g, dg, 1e-3, 1e-2),
                "mix_rows 4x3": lambda: k.mix_rows(out, X, remote, indptr, indices, weights),
                "row_sum 4": lambda: k.row_sum(mean, X, 0.25),
            }
            for name, fn in cases.items():
                rows.append({"kernel": name, "impl": impl, "d": d,
                             "us_per_call": per_call_us(fn, args.calls, args.repeats)})
    print(f"per-call cost, best of {args.repeats} loops of {args.calls} calls (1 OpenMP thread)")
    print(f"{'kernel':<14}{'impl':>7}{'d':>6}{'us/call':>10}")
    for r in rows:
        print(f"{r['kernel']:<14}{r['impl']:>7}{r['d']:>6}{r['us_per_call']:>10.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json", default="")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--small", action="store_true", help="per-call cost of every entry point at small d")
    p.add_argument("--calls", type=int, default=5000, help="--small: calls per timed loop")
    p.add_argument("--repeats", type=int, default=9, help="--small: timed loops (the best is kept)")
    args = p.parse_args()
    if args.small:
        small(args)
        return
    cores = len(os.sched_getaffinity(0))
    kern = K.Kernels(mode="compiled", threads=cores)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tri = triad_library(tmp)
        for n in (10**5, 10**6, 10**7):
            reps = args.reps if n < 10**7 else max(5, args.reps // 2)
            rng = np.random.default_rng(0)
            a, b, c = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
            t_tri = best(lambda: tri.triad(a.ctypes.data, b.ctypes.data, c.ctypes.data, 0.5, n), reps)
            x, g, m = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
            v = np.abs(rng.standard_normal(n)).astype(np.float32)
            tmpbuf = np.empty_like(x)
            t_fused = best(lambda: kern.adam(x, g, m, v, 1e-3, 0.9, 0.999, 10), reps)
            t_np = best(lambda: numpy_adam(x, g, m, v, tmpbuf, 1e-3, 0.9, 0.999, 10), reps)
            bw_tri = 12 * n / t_tri / 1e9
            bw_fused = 28 * n / t_fused / 1e9
            rows.append({"kernel": "adam", "d": n, "ms": t_fused * 1e3, "GB/s": bw_fused,
                         "numpy_ms": t_np * 1e3, "speedup_vs_numpy": t_np / t_fused,
                         "triad_GB/s": bw_tri, "fraction_of_triad": bw_fused / bw_tri})
        for R, d in ((1, 10**6), (16, 10**5), (1, 10**7)):
            rng = np.random.default_rng(1)
            X = rng.standard_normal((R, d)).astype(np.float32)
            remote = rng.standard_normal((2, d)).astype(np.float32)
            # ring rows: self, left, right; rows 0 and R-1 take one neighbour from `remote`
            idx, w = [], []
            for r in range(R):
                left = r - 1 if r > 0 else R
                right = r + 1 if r < R - 1 else R + 1
                idx += [left, r, right]
                w += [1 / 3] * 3
            indptr = np.arange(0, 3 * R + 1, 3, dtype=np.int64)
            indices, weights = np.array(idx, np.int64), np.array(w, np.float32)
            out = np.empty_like(X)
            src = np.concatenate([X, remote])  # the NumPy baseline needs one source array
            li = np.array(idx[0::3]), np.array(idx[2::3])
            tmpbuf = np.empty_like(X)
            third = np.float32(1 / 3)

            def numpy_mix():
                np.multiply(src[li[0]], third, out=out)
                np.multiply(X, third, out=tmpbuf)
                out.__iadd__(tmpbuf)
                np.multiply(src[li[1]], third, out=tmpbuf)
                out.__iadd__(tmpbuf)

            t_k = best(lambda: kern.mix_rows(out, X, remote, indptr, indices, weights), args.reps)
            t_np = best(numpy_mix, args.reps)
            bw = 16 * R * d / t_k / 1e9
            rows.append({"kernel": f"mix_rows {R}x3", "d": d, "ms": t_k * 1e3, "GB/s": bw, "numpy_ms": t_np * 1e3,
                         "speedup_vs_numpy": t_np / t_k, "triad_GB/s": rows[1]["triad_GB/s"] if d == 10**6 else
                         rows[2 if d == 10**7 else 0]["triad_GB/s"], "fraction_of_triad": None})
            rows[-1]["fraction_of_triad"] = rows[-1]["GB/s"] / rows[-1]["triad_GB/s"]
    print(f"kernel benchmark: {kern.impl} build, {kern.threads} OpenMP threads on {cores} cores, median of repeats")
    print(f"{'kernel':<16}{'d':>8}{'ms':>9}{'GB/s':>8}{'numpy ms':>10}{'x numpy':>9}{'triad GB/s':>12}{'/triad':>8}")
    for r in rows:
        print(f"{r['kernel']:<16}{r['d']:>8.0e}{r['ms']:>9.3f}{r['GB/s']:>8.1f}{r['numpy_ms']:>10.3f}"
              f"{r['speedup_vs_numpy']:>9.1f}{r['triad_GB/s']:>12.1f}{r['fraction_of_triad']:>8.2f}")
    print("targets at d = 1e7 for adam: /triad >= 0.8, x numpy >= 5")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
