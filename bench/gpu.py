"""GPU tests and benchmarks on one GPU: `python -m bench --gpu` (or python bench/gpu.py [--json FILE]).

Without a GPU (CuPy missing, or CuPy sees no device) it prints one line saying so and
exits 0. With one, in about 3-5 minutes (a deadline of --budget seconds, default 450,
skips what no longer fits, with a note):

  tests       pytest tests/kernels (the CUDA kernels against the NumPy references, PTX,
              the CPU build) and every other test whose name says gpu or cuda (torch GPU
              tests), each under a timeout;
  dlpack      the zero-copy exchange the torch backend relies on: torch.from_dlpack of a
              CuPy (L, d) array, and hpcopt's own conversion of it, share its memory
              (data_ptr equal, a write through torch is seen by CuPy); a gradient handed
              back to CuPy (hpcopt's conversion) shares the torch tensor's memory; and
              `loss_grad` on CuPy rows returns C-contiguous (L, d) float32 CuPy arrays
              the fused kernels take;
  kernels     fused adam and sgd (d = 1e6 .. 1e8) and mix_rows (16 rows x 3 terms) from
              hpcopt.kernels with CuPy against the device's copy bandwidth: a
              device-to-device copy of the same number of bytes each kernel moves (adam
              28 B per element, sgd 12, mix_rows 16 per output element), CUDA events,
              median of repetitions; ratio = kernel GB/s / copy GB/s;
  resnet20    node-steps/s of `loss_grad` with model.vectorize vmap over 8 nodes against
              loop, on CUDA, data 3x32x32 random, batch 32 per node (and the ceiling: one
              resnet20 on all 8 x 32 samples at once);
  engine      a 5-step D-SGD run of lenet on 4 nodes with device.kind gpu in this process
              (the real runner: CuPy rows, DLPack, fused kernels, host staging), losses
              finite.
Checks that fail make the exit status 1 (the figures are still printed and saved).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def probe():
    """(cupy or None, why not, torch-with-CUDA or None, why not)."""
    try:
        import cupy
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 -- ImportError, CUDA driver or runtime errors
        first = str(exc).splitlines()[0] if str(exc) else ""
        return None, f"CuPy unavailable ({type(exc).__name__}{': ' + first if first else ''})", None, ""
    if count == 0:
        return None, "CuPy sees no GPU", None, ""
    try:
        import torch
        if not torch.cuda.is_available():
            return cupy, "", None, f"torch {torch.__version__} has no CUDA device"
        return cupy, "", torch, ""
    except ImportError:
        return cupy, "", None, "torch is not installed"


class Report:
    def __init__(self, budget: float):
        self.rows = []
        self.failures = []
        self.t0 = time.time()
        self.budget = budget

    def left(self) -> float:
        return self.budget - (time.time() - self.t0)

    def row(self, case, hpcopt=None, baseline=None, ratio=None, target="", note=""):
        self.rows.append({"bench": "gpu", "case": case, "hpcopt": hpcopt, "baseline": baseline, "ratio": ratio,
                          "target": target, "note": note})

    def check(self, case, ok: bool, note: str = ""):
        self.row(case, "ok" if ok else "FAILED", note=note)
        if not ok:
            self.failures.append(f"{case}: {note}")
        print(f"  {'ok    ' if ok else 'FAILED'} {case}{': ' + note if note else ''}", flush=True)

    def skip(self, case, why: str):
        self.row(case, note=f"skipped: {why}")
        print(f"  skip   {case}: {why}", flush=True)


def _first(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0][:300] if lines else ""


# ---------------------------------------------------------------------------------------
# tests


def _pytest(args, timeout: float):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    summary = next((ln.strip("= ") for ln in reversed(proc.stdout.splitlines()) if " in " in ln and
                    any(w in ln for w in ("passed", "failed", "error", "skipped", "deselected", "no tests"))), "")
    return proc, summary


def run_tests(rep: Report) -> None:
    budget = min(240.0, rep.left() - 150)
    if budget < 30:
        rep.skip("pytest tests/kernels", "no time left")
        return
    t0 = time.time()
    proc, summary = _pytest(["tests/kernels"], budget)
    if proc is None:
        rep.check("pytest tests/kernels", False, summary)
    else:
        gpu_skips = [ln for ln in proc.stdout.splitlines() if ln.startswith("SKIPPED") and
                     ("CuPy" in ln or "GPU" in ln)]
        ok = proc.returncode == 0 and not gpu_skips
        note = f"{summary} ({time.time() - t0:.0f} s)"
        if gpu_skips:
            note += f"; GPU tests skipped although CuPy sees a GPU: {_first(gpu_skips[0])}"
        if proc.returncode != 0:
            print(proc.stdout[-4000:] + proc.stderr[-2000:], flush=True)
        rep.check("pytest tests/kernels", ok, note)
    budget = min(120.0, rep.left() - 120)
    if budget < 20:
        rep.skip("pytest -k 'gpu or cuda' (other tests)", "no time left")
        return
    t0 = time.time()
    proc, summary = _pytest(["tests", "--ignore=tests/kernels", "-k", "gpu or cuda"], budget)
    if proc is None:
        rep.check("pytest -k 'gpu or cuda' (other tests)", False, summary)
    elif proc.returncode == 5:
        rep.row("pytest -k 'gpu or cuda' (other tests)", note="no such tests")
    else:
        if proc.returncode != 0:
            print(proc.stdout[-4000:] + proc.stderr[-2000:], flush=True)
        rep.check("pytest -k 'gpu or cuda' (other tests)", proc.returncode == 0,
                  f"{summary} ({time.time() - t0:.0f} s)")


# ---------------------------------------------------------------------------------------
# helpers on the device


def sync(cp=None, torch=None) -> None:
    if cp is not None:
        cp.cuda.get_current_stream().synchronize()
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()


def event_seconds(cp, fn, reps: int, inner: int) -> float:
    """Median over `reps` of the CUDA-event time of `inner` back-to-back calls, per call."""
    fn()
    sync(cp)
    times = []
    for _ in range(reps):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / 1e3 / inner)
    return float(np.median(times))


def random_dataset(n: int = 64, shape=(3, 32, 32), classes: int = 10, seed: int = 0):
    from hpcopt import data
    rng = np.random.default_rng(seed)
    f = int(np.prod(shape))
    X = rng.standard_normal((2 * n, f)).astype(np.float32)
    y = rng.integers(0, classes, 2 * n).astype(np.int64)
    return data.Dataset("random", X[:n], y[:n], X[n:], y[n:], classes, shape=tuple(shape))


def torch_model(name: str, vectorize: str, ds, backend):
    from hpcopt import config, models
    cfg = config.from_dict({"model": {"name": name, "vectorize": vectorize}})
    return models.build(cfg.model, ds, backend=backend)


def node_batch(xp, L: int, batch: int, ds, seed: int = 0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((L, batch, ds.features)).astype(np.float32)
    y = rng.integers(0, ds.classes, (L, batch)).astype(np.int64)
    w = np.full((L, batch), 1.0 / batch, np.float32)
    return xp.asarray(A), xp.asarray(y), xp.asarray(w)


# ---------------------------------------------------------------------------------------
# sections


def dlpack_checks(rep: Report, cp, torch, backend) -> None:
    L, d = 8, 1000
    X = cp.asarray(np.random.default_rng(0).standard_normal((L, d)).astype(np.float32))
    t = torch.from_dlpack(X)
    rep.check("dlpack: torch.from_dlpack(CuPy (L, d)) shares memory",
              t.is_cuda and t.data_ptr() == X.data.ptr and tuple(t.shape) == (L, d),
              f"data_ptr {t.data_ptr():#x} vs CuPy {X.data.ptr:#x}")
    ds = random_dataset(shape=(1, 8, 8))
    model = torch_model("cnn", "vmap", ds, backend)
    Xm = cp.asarray(np.tile(model.init(0)[None, :], (L, 1)))
    tm = model._t(Xm, writable=True)
    sync(cp, torch)
    with torch.no_grad():
        tm[0, 0] = 123.0
    sync(cp, torch)
    rep.check("dlpack: hpcopt's conversion of CuPy rows (TorchModel._t) shares memory",
              tm.data_ptr() == Xm.data.ptr and float(Xm[0, 0]) == 123.0,
              "a write through torch is seen by CuPy")
    g = torch.randn(L, model.d, device=tm.device)
    G = model._out(g, Xm)
    rep.check("dlpack: a gradient handed back to CuPy (TorchModel._out) shares memory",
              isinstance(G, cp.ndarray) and G.data.ptr == g.data_ptr() and G.shape == (L, model.d),
              f"data_ptr {g.data_ptr():#x} vs CuPy {G.data.ptr if isinstance(G, cp.ndarray) else None}")
    A, y, w = node_batch(cp, L, 16, ds)
    Xm[0, 0] = Xm[1, 0]
    loss, G = model.loss_grad(Xm, A, y, w)
    sync(cp, torch)
    ok = (isinstance(G, cp.ndarray) and isinstance(loss, cp.ndarray) and G.shape == (L, model.d)
          and G.dtype == np.float32 and G.flags.c_contiguous and bool(cp.isfinite(G).all()))
    rep.check("dlpack: loss_grad on CuPy rows returns (L, d) float32 C-contiguous CuPy arrays", ok,
              f"{type(G).__name__} {getattr(G, 'shape', None)} {getattr(G, 'dtype', None)}")
    from hpcopt.kernels import Kernels
    before = Xm.copy()
    Kernels(on_gpu=True, mode="compiled").sgd(Xm, G, 0.1)
    sync(cp)
    rep.check("dlpack: the fused sgd kernel takes that gradient", bool(cp.allclose(Xm, before - 0.1 * G, atol=1e-6)))


def kernel_bench(rep: Report, cp, reps: int, sizes) -> None:
    from hpcopt.kernels import Kernels
    kern = Kernels(on_gpu=True, mode="compiled")
    rng = cp.random.RandomState(0)

    def rand(n):
        return rng.standard_normal(n, dtype=cp.float32)

    def copy_seconds(nbytes: int, inner: int) -> float:
        n = max(1, nbytes // 4)
        src, dst = cp.empty(n, cp.float32), cp.empty(n, cp.float32)
        src.fill(1.0)
        return event_seconds(cp, lambda: dst.data.copy_from_device_async(src.data, n * 4), reps, inner)

    for d in sizes:
        if rep.left() < 60:
            rep.skip(f"kernels d={d:.0e}", "no time left")
            continue
        x, g, m = rand(d), rand(d), rand(d)
        v = cp.abs(rand(d))
        inner = max(1, int(2e9 // (28 * d)))
        t_adam = event_seconds(cp, lambda: kern.adam(x, g, m, v, 1e-3, 0.9, 0.999, 10), reps, inner)
        t_copy = copy_seconds(14 * d, inner)  # a copy of B bytes moves 2B: 28 B per element, as adam
        bw, bw_copy = 28 * d / t_adam / 1e9, 28 * d / t_copy / 1e9
        rep.row(f"fused adam d={d:.0e}: GB/s vs device copy", bw, bw_copy, bw / bw_copy,
                ">= 0.8" if d == 10**7 else "")
        t_sgd = event_seconds(cp, lambda: kern.sgd(x, g, 1e-3), reps, inner)
        t_copy = copy_seconds(6 * d, inner)
        rep.row(f"fused sgd d={d:.0e}: GB/s vs device copy", 12 * d / t_sgd / 1e9, 12 * d / t_copy / 1e9,
                t_copy / t_sgd)
        x = g = m = v = None  # free the device arrays before the next size
        cp.get_default_memory_pool().free_all_blocks()
    R, d = 16, 10**6
    X, remote = rand(R * d).reshape(R, d), rand(2 * d).reshape(2, d)
    idx, wts = [], []
    for r in range(R):  # ring rows: left, self, right; rows 0 and R-1 take one neighbour from `remote`
        idx += [r - 1 if r > 0 else R, r, r + 1 if r < R - 1 else R + 1]
        wts += [1 / 3] * 3
    indptr = cp.asarray(np.arange(0, 3 * R + 1, 3, dtype=np.int64))
    indices, weights = cp.asarray(np.array(idx, np.int64)), cp.asarray(np.array(wts, np.float32))
    out = cp.empty_like(X)
    inner = max(1, int(2e9 // (16 * R * d)))
    t_mix = event_seconds(cp, lambda: kern.mix_rows(out, X, remote, indptr, indices, weights), reps, inner)
    t_copy = copy_seconds(8 * R * d, inner)
    rep.row(f"mix_rows {R}x3 d={d:.0e}: GB/s vs device copy", 16 * R * d / t_mix / 1e9,
            16 * R * d / t_copy / 1e9, t_copy / t_mix)
    ref = (cp.concatenate([X, remote])[cp.asarray(np.array(idx[0::3]))] + X
           + cp.concatenate([X, remote])[cp.asarray(np.array(idx[2::3]))]) / 3
    rep.check("kernels: mix_rows on the GPU equals the ring average", bool(cp.allclose(out, ref, rtol=1e-5,
                                                                                      atol=1e-5)))


def resnet_bench(rep: Report, backend, cp, torch, nodes: int = 8, batch: int = 32, reps: int = 15) -> None:
    import torch.nn.functional as F
    xp = cp if cp is not None else np
    ds = random_dataset(shape=(3, 32, 32))
    models = {vec: torch_model("resnet20", vec, ds, backend) for vec in ("vmap", "loop")}
    x0 = models["loop"].init(0)
    rng = np.random.default_rng(1)
    X = xp.asarray((x0[None, :] + 0.01 * rng.standard_normal((nodes, x0.size))).astype(np.float32))
    batches = [node_batch(xp, nodes, batch, ds, seed=s) for s in range(3)]
    device = models["loop"].device
    one = models["loop"].make().to(device)
    big = [(torch.as_tensor(np.asarray(b[0].get() if cp is not None else b[0])).reshape(nodes * batch, 3, 32, 32)
            .to(device), torch.as_tensor(np.asarray(b[1].get() if cp is not None else b[1])).reshape(-1).to(device))
           for b in batches]
    count = {"vmap": 0, "loop": 0, "one": 0}

    def call(k):
        i = count[k] % len(batches)
        count[k] += 1
        if k == "one":
            one.zero_grad(set_to_none=True)
            F.cross_entropy(one(big[i][0]), big[i][1]).backward()
            return None
        return models[k].loss_grad(X, *batches[i])

    lv, gv = call("vmap")
    ll, gl = call("loop")
    sync(cp, torch)
    gv, gl = (np.asarray(g.get() if cp is not None else g) for g in (gv, gl))
    rel = float(np.linalg.norm(gv - gl) / max(1e-30, np.linalg.norm(gl)))
    rep.check("resnet20: vmap and loop gradients agree (CUDA, TF32 convolutions allowed)", rel < 2e-2,
              f"relative difference {rel:.1e}")
    for k in count:
        call(k)
    sync(cp, torch)
    times = {k: [] for k in count}
    for i in range(reps):
        for k in (("vmap", "loop", "one") if i % 2 else ("one", "loop", "vmap")):
            sync(cp, torch)
            t0 = time.perf_counter()
            call(k)
            sync(cp, torch)
            times[k].append(time.perf_counter() - t0)
    tv, tl, to = (float(np.median(times[k])) for k in ("vmap", "loop", "one"))
    rep.row(f"resnet20 vmap vs loop, {nodes} nodes, batch {batch} (node-steps/s)", nodes / tv, nodes / tl, tl / tv,
            ">= 3", note=f"ceiling (one resnet20 on all {nodes * batch} samples) {tl / to:.2f}x the loop")
    print(f"  resnet20 loss_grad on {getattr(backend, 'device_name', 'cpu')}: vmap {tv * 1e3:.2f} ms, "
          f"loop {tl * 1e3:.2f} ms, one module on all samples {to * 1e3:.2f} ms ({nodes} nodes x {batch})", flush=True)


def engine_run(rep: Report, device: str, steps: int = 5, nodes: int = 4) -> None:
    from hpcopt import config, runner, store
    cfg = config.from_dict({
        "nodes": {"n": nodes}, "model": {"name": "lenet"}, "device": {"kind": device},
        "data": {"dataset": "mnist", "batch_size": 32}, "algorithm": {"name": "dsgd"}, "topology": {"name": "ring"},
        "optimizer": {"lr": 0.05}, "run": {"steps": steps, "eval_every": 0, "log_every": steps, "progress": False}})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        r = runner.Runner(cfg, "", os.path.join(tmp, "run"), force=True, out=io.StringIO())
        code = r.run()
        loss = np.asarray(store.read_run(os.path.join(tmp, "run"))["metrics"]["train_loss"])
        ok = code == 0 and loss.shape == (steps, nodes) and bool(np.isfinite(loss).all())
        rep.check(f"engine: dsgd lenet {nodes} nodes x {steps} steps on device {device}", ok,
                  f"exit {code}, {r.backend.device_name}, kernels {r.kernels.impl}, {time.time() - t0:.1f} s")


def main() -> int:
    p = argparse.ArgumentParser(prog="python bench/gpu.py")
    p.add_argument("--json", default="")
    p.add_argument("--budget", type=float, default=450.0, help="seconds; sections that no longer fit are skipped")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--no-tests", action="store_true", help="benchmarks and checks only (no pytest)")
    args = p.parse_args()
    cp, why, torch, why_torch = probe()

    def save(rep=None):
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"available": cp is not None, "reason": why, "rows": rep.rows if rep else [],
                           "failures": rep.failures if rep else []}, fh, indent=1)

    if cp is None:
        print(f"bench --gpu: no GPU/CuPy available ({why}); nothing to run")
        save()
        return 0
    from hpcopt.backend import select
    backend = select("gpu", 0)
    rep = Report(args.budget)
    print(f"GPU checks and benchmarks on {backend.device_name} (CuPy {cp.__version__}"
          f"{', torch ' + torch.__version__ if torch is not None else ''}), budget {args.budget:.0f} s", flush=True)
    sections = [("tests", lambda: run_tests(rep), False)] if not args.no_tests else []
    sections += [("dlpack", lambda: dlpack_checks(rep, cp, torch, backend), True),
                 ("kernels", lambda: kernel_bench(rep, cp, max(5, args.reps // 2), (10**6, 10**7, 10**8)), False),
                 ("resnet20", lambda: resnet_bench(rep, backend, cp, torch, reps=args.reps), True),
                 ("engine", lambda: engine_run(rep, "gpu"), True)]
    for name, fn, needs_torch in sections:
        if needs_torch and torch is None:
            rep.skip(name, why_torch)
            continue
        if rep.left() < 20:
            rep.skip(name, "no time left")
            continue
        t0 = time.time()
        print(f"{name} ...", flush=True)
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 -- one failed section must not hide the others
            import traceback
            rep.check(f"{name}: ran to the end", False, f"{type(exc).__name__}: {_first(str(exc))}")
            traceback.print_exc()
        print(f"  ({time.time() - t0:.0f} s)", flush=True)
    save(rep)
    from bench.__main__ import table
    print(table(rep.rows))
    print(f"total {time.time() - rep.t0:.0f} s; {len(rep.failures)} failed check(s)")
    for f in rep.failures:
        print(f"FAILED {_first(f)}")
    return 1 if rep.failures else 0


if __name__ == "__main__":
    sys.exit(main())
