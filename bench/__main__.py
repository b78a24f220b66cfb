"""Every benchmark, one table: `python -m bench [--json FILE]`.

Runs, each in its own process (the MPI ones under mpiexec), measuring hpcopt and its
baseline in the same run:
  kernels     fused Adam vs NumPy in place vs the two-core triad; mix_rows vs NumPy
  comm        mix vs hand-written Isend/Irecv; mean vs raw Allreduce (4 ranks)
  gloo        mean vs torch.distributed all_reduce (gloo) at 2/4/8 ranks, when torch is installed
              (bench/gloo.py: both communicators in the same ranks, alternating)
  simulation  256 nodes on one rank vs a per-node Python loop; 1 rank x 16 nodes vs 16 ranks x 1
  hybrid      CPU seconds / wall seconds of the parameter server and workers, 8 ranks on 2 cores
  memory      1024 nodes x d = 1e4 with Adam: peak allocation vs state bytes
  torch       when torch is installed (bench/torch_nets.py, lenet on the MNIST sample, batch 32
              per node, 1 torch thread per process): loss_grad with vmap vs the per-node loop
              (16 and 64 nodes on one rank); hpcopt sync SGD and D-SGD (ring) vs
              DistributedDataParallel (gloo) at 4 ranks x 1 node; engine step over plain torch
              forward + backward (1 and 4 ranks)
and prints one table of ratios with the targets, then saves it as JSON
(default bench/results/bench.json).

`python -m bench --gpu` runs only bench/gpu.py: the GPU tests (pytest) and GPU benchmarks
(fused kernels vs the device's copy bandwidth, resnet20 vmap vs loop on CUDA, DLPack
zero-copy checks, a short GPU run of the engine) in under 8 minutes on one GPU, saved to
bench/results/gpu.json; without a GPU (or CuPy) it prints one line saying so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _mpiexec():
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.path.exists(here) else shutil.which("mpiexec")


def _run(cmd, tmp, name):
    out = os.path.join(tmp, f"{name}.json")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    proc = subprocess.run(cmd + ["--json", out], env=env, capture_output=True, text=True)
    print(f"  {name}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench: {name} failed:\n{proc.stderr[-2000:]}")
    with open(out) as fh:
        return json.load(fh)


def gloo_rows(mpiexec, tmp):
    """hpcopt's mean vs torch.distributed gloo (bench/gloo.py) at 2, 4 and 8 ranks."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return [{"bench": "gloo", "case": "mean vs torch.distributed gloo all_reduce", "hpcopt": None,
                 "baseline": None, "ratio": None, "target": "< 1", "note": "skipped: torch is not installed "
                 "(pip install torch to compare)"}]
    if mpiexec is None:
        return [{"bench": "gloo", "case": "mean vs torch.distributed gloo all_reduce", "note": "skipped: no mpiexec"}]
    rows = []
    for ranks in (2, 4, 8):
        res = _run([mpiexec, "-n", str(ranks), sys.executable, os.path.join(HERE, "gloo.py")], tmp, f"gloo{ranks}")
        for r in res["rows"]:
            rows.append({"bench": "gloo", "case": f"mean vs gloo all_reduce d={r['d']:.0e} (ms, {ranks} ranks)",
                         "hpcopt": r["hpcopt_ms"], "baseline": r["gloo_ms"], "ratio": r["ratio"], "target": "< 1"})
    return rows


def torch_rows(py, mpiexec, tmp):
    """bench/torch_nets.py: vmap vs loop on one rank; engines vs DDP and plain torch at 1 and 4 ranks."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return [{"bench": "torch", "case": "lenet: vmap vs loop, engines vs DDP", "note": "skipped: torch is not "
                 "installed (pip install torch to compare)"}]
    script = os.path.join(HERE, "torch_nets.py")
    rows = []
    for r in _run([py, script, "vmap"], tmp, "torch_vmap")["rows"]:
        rows.append({"bench": "torch", "case": f"lenet loss_grad vmap vs loop, {r['nodes']} nodes on 1 rank "
                     f"(node-steps/s)", "hpcopt": r["vmap_node_steps_s"], "baseline": r["loop_node_steps_s"],
                     "ratio": r["ratio"], "target": ">= 3" if r["nodes"] == 16 else "",
                     "note": f"ceiling {r['ceiling']:.2f}: loop vs one module on all samples"})
    if mpiexec is None:
        return rows + [{"bench": "torch", "case": "engines vs DDP / plain torch", "note": "skipped: no mpiexec"}]
    for ranks in (1, 4):
        res = _run([mpiexec, "-n", str(ranks), py, script, "engines"], tmp, f"torch_engines{ranks}")
        rk = f"{ranks} rank{'s' if ranks > 1 else ''}"
        for r in res["rows"]:
            vec = r["vectorize"] + (f"->{r['vectorize_used']}" if r["vectorize"] == "auto" else "")
            method = {"sync_sgd": "sync SGD", "dsgd": "D-SGD ring", "loss_grad": "loss_grad",
                      "ddp": "DDP"}[r["method"]]
            default = r["vectorize"] == "auto"
            if r["case"].endswith("vs ddp"):
                if ranks == 1:
                    continue
                target = ("<= 1" if r["method"] == "sync_sgd" else "< 1") if default else ""
                case = f"lenet {method} ({vec}) vs DDP gloo: step ms, {rk} x 1 node"
            elif r["method"] == "ddp":
                target, case = "", f"lenet DDP step vs plain fwd+bwd (ms, {rk})"
            elif r["method"] == "loss_grad":
                target, case = "", f"lenet loss_grad ({vec}) vs plain fwd+bwd (ms, {rk})"
            else:
                target = "<= 1.1" if default else ""
                case = f"lenet {method} ({vec}) step vs plain fwd+bwd: overhead (ms, {rk})"
            rows.append({"bench": "torch", "case": case, "hpcopt": r["hpcopt_ms"], "baseline": r["baseline_ms"],
                         "ratio": r["ratio"], "target": target})
    return rows


def gpu_main(json_path: str) -> int:
    """bench/gpu.py (it prints its own progress and table); without a GPU it prints one line."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "gpu.json")
        proc = subprocess.run([sys.executable, os.path.join(HERE, "gpu.py"), "--json", out], env=env)
        try:
            with open(out) as fh:
                res = json.load(fh)
        except (OSError, ValueError):
            raise SystemExit(f"bench: gpu failed (exit {proc.returncode}) before writing its results") from None
    if not res["available"]:
        return proc.returncode
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as fh:
        json.dump({"time": time.time(), "rows": res["rows"], "failures": res["failures"]}, fh, indent=1)
    print(f"saved {json_path}", file=sys.stderr)
    return proc.returncode


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--json", default=None, help="where to save the table (default bench/results/bench.json, "
                                                "with --gpu bench/results/gpu.json)")
    p.add_argument("--gpu", action="store_true", help="only the GPU tests and benchmarks (bench/gpu.py); "
                                                     "without a GPU: one line, exit 0")
    args = p.parse_args()
    if args.gpu:
        sys.exit(gpu_main(args.json or os.path.join(HERE, "results", "gpu.json")))
    args.json = args.json or os.path.join(HERE, "results", "bench.json")
    py = sys.executable
    mpiexec = _mpiexec()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        print("running benchmarks ...", file=sys.stderr)
        for r in _run([py, os.path.join(HERE, "kernels.py")], tmp, "kernels"):
            if r["kernel"] == "adam":
                rows.append({"bench": "kernels", "case": f"fused adam d={r['d']:.0e}: GB/s vs triad",
                             "hpcopt": r["GB/s"], "baseline": r["triad_GB/s"], "ratio": r["fraction_of_triad"],
                             "target": ">= 0.8" if r["d"] == 10**7 else ""})
                rows.append({"bench": "kernels", "case": f"fused adam d={r['d']:.0e}: speed vs NumPy in place",
                             "hpcopt": r["ms"], "baseline": r["numpy_ms"], "ratio": r["speedup_vs_numpy"],
                             "target": ">= 5" if r["d"] == 10**7 else ""})
            else:
                rows.append({"bench": "kernels", "case": f"{r['kernel']} d={r['d']:.0e}: speed vs NumPy",
                             "hpcopt": r["ms"], "baseline": r["numpy_ms"], "ratio": r["speedup_vs_numpy"],
                             "target": ""})
        if mpiexec:
            comm = _run([mpiexec, "-n", "4", py, os.path.join(HERE, "comm.py")], tmp, "comm")
            for r in comm["rows"]:
                tgt = {"mix ring": "<= 1.1" if r["d"] == 10**6 else "", "mean": "<= 1.05"}.get(r["op"], "")
                rows.append({"bench": "comm", "case": f"{r['op']} d={r['d']:.0e} (ms, 4 ranks)",
                             "hpcopt": r["hpcopt_ms"], "baseline": r["baseline_ms"], "ratio": r["ratio"],
                             "target": tgt})
        else:
            rows.append({"bench": "comm", "case": "mix / mean", "note": "skipped: no mpiexec"})
        rows += gloo_rows(mpiexec, tmp)
        for r in _run([py, os.path.join(HERE, "simulation.py")], tmp, "simulation"):
            rows.append({"bench": "simulation", "case": r["case"] + " (node-steps/s)", "hpcopt": r["hpcopt"],
                         "baseline": r["baseline"], "ratio": r["ratio"],
                         "target": f">= {r['target']:g}" if r["target"] else ""})
        cpu = _run([py, os.path.join(HERE, "hybrid_cpu.py")], tmp, "hybrid_cpu")
        worst = max(cpu, key=lambda r: r["cpu_fraction"])
        rows.append({"bench": "hybrid", "case": f"wall clock, 8 ranks on 2 cores: highest CPU/wall ({worst['role']})",
                     "hpcopt": worst["cpu_fraction"], "baseline": None, "ratio": worst["cpu_fraction"],
                     "target": "<= 0.5"})
        for r in _run([py, os.path.join(HERE, "memory.py")], tmp, "memory"):
            rows.append({"bench": "memory", "case": r["case"] + ": peak MB vs state MB", "hpcopt": r["peak_MB"],
                         "baseline": r["state_MB"], "ratio": r["ratio"], "target": "<= 1.3"})
        rows += torch_rows(py, mpiexec, tmp)
    print(table(rows))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump({"time": time.time(), "rows": rows}, fh, indent=1)
    print(f"saved {args.json}", file=sys.stderr)


def met(r) -> str:
    t, v = r.get("target") or "", r.get("ratio")
    if not t or v is None:
        return ""
    op, num = t.split()
    ok = {">=": v >= float(num), "<=": v <= float(num), "<": v < float(num)}[op]
    return "yes" if ok else "NO"


def table(rows) -> str:
    def f(v):
        return "" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
    head = ["bench", "case", "hpcopt", "baseline", "ratio", "target", "met"]
    body = [[r["bench"], r["case"] + (f"  [{r['note']}]" if r.get("note") else ""), f(r.get("hpcopt")),
             f(r.get("baseline")), f(r.get("ratio")), r.get("target") or "", met(r)] for r in rows]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in body]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
