"""Torch-backend benchmarks: vmap vs a per-node loop, hpcopt's engines vs DDP, engine overhead.

Run:  python bench/torch_nets.py vmap [--nodes 16 64] [--reps 7] [--threads 1] [--profile] [--json FILE]
      mpiexec -n P python bench/torch_nets.py engines [--steps 60] [--threads 1] [--json FILE]

Model `lenet` (hpcopt.models.nets.LeNet, GroupNorm, d = 61750) on the installed MNIST
sample (1x28x28), batch 32 per node; torch intra-op threads fixed by `--threads` (default
1: this machine's 2 cores are shared, and a second thread that loses its core stalls
every parallel region; `--threads 2` measures that case).

vmap   L nodes on one process: `model.loss_grad(X, A, y, w)` of the model built by
       `hpcopt.models.build` with `model.vectorize: vmap` against the same model with
       `model.vectorize: loop` (one torch call per node), on the same rows and batches,
       alternating which goes first. Figures: node-steps/s (L / seconds per call); the
       two gradients are checked to agree. Column `ceiling`: the loop's time over ONE
       LeNet's plain forward + backward on all L x 32 samples at once, the same
       arithmetic in the fewest, largest torch calls (and shared weights, so an
       optimistic bound on what any batching over nodes, vmap included, can gain on
       this machine). `--profile` prints
       torch.profiler's top operators of one call of each.
engines  one node per rank, P ranks (run at 1 and 4): per repetition, in rotating order,
       one step of each of
         hpcopt sync_sgd / dsgd (ring), `model.vectorize` auto (the default) and loop:
           a runner.Runner's setup() (the real engine: Comm, kernels, NodeData, model),
           then what Runner.loop does per step: lr_at, `algo.step`, the loss to the host
           and the loop's per-step flag all-reduce (its run.h5 bookkeeping left out);
         hpcopt `model.loss_grad` alone (auto and loop): the model's part of a step;
         DDP: torch.distributed DistributedDataParallel (gloo, file store, ranks from
           MPI) of LeNet from the same initial row, torch.optim.SGD at the same lr:
           zero_grad, forward, cross-entropy, backward (DDP all-reduces), step;
         plain: forward + backward of the same module on the same batch shape (no
           communication, no update): the model's own cost.
       Each figure is the median over repetitions of the slowest rank's step (barrier
       before each), after warm-up steps. Before timing, one hpcopt sync SGD step and
       one DDP step on the same batches from the same row are checked to give the same
       model. Ratios: sync SGD / DDP (target <= 1), D-SGD / DDP (target < 1), and each
       engine over plain (engine overhead, target <= 1.10 at one node per rank; at 4
       ranks the engine's step includes its communication, plain has none).
Every torch computation here runs under torch.use_deterministic_algorithms(True), which
hpcopt's torch backend sets process-wide on the CPU.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

BATCH = 32
LR = 0.05


def lenet_config(vectorize: str, n: int = 1, method: str = "sync_sgd", threads: int = 1, steps: int = 1000):
    from hpcopt import config
    return config.from_dict({
        "nodes": {"n": n},
        "model": {"name": "lenet", "vectorize": vectorize, "threads": threads},
        "data": {"dataset": "mnist", "batch_size": BATCH, "partition": "iid"},
        "algorithm": {"name": method}, "topology": {"name": "ring"},
        "optimizer": {"lr": LR}, "device": {"kind": "cpu"},
        "run": {"steps": steps, "eval_every": 0, "log_every": steps, "progress": False},
    })


# ---------------------------------------------------------------------------------------
# vmap vs loop on one process


def profile_top(fn, label: str, rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return f"-- torch.profiler, one call, {label}\n" + prof.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=rows)


def vmap_bench(args) -> None:
    import torch
    import torch.nn.functional as F

    from hpcopt import data, models
    torch.set_num_threads(args.threads)
    rows, profiles = [], []
    for L in args.nodes:
        ds = data.load(lenet_config("loop", n=L).data, L)
        built = {vec: models.build(lenet_config(vec, n=L, threads=args.threads).model, ds, threads=args.threads)
                 for vec in ("vmap", "loop")}
        parts = data.partition(ds, L, "iid")
        nd = data.NodeData(np, ds, parts, range(L), BATCH, seed=0, shape=ds.shape)
        rng = np.random.default_rng(0)
        x0 = built["loop"].init(0)
        X = (x0[None, :] + 0.01 * rng.standard_normal((L, x0.size))).astype(np.float32)  # distinct nodes
        batches = [nd.batch(t) for t in range(4)]
        calls = {vec: 0 for vec in built}
        # the ceiling of any batching over nodes: ONE module on all L * 32 samples at once
        # (the same arithmetic as L nodes' steps, in the fewest and largest torch calls)
        big = built["loop"].make()
        big_batches = [(torch.from_numpy(np.ascontiguousarray(A).reshape(L * BATCH, *ds.shape)),
                        torch.from_numpy(np.asarray(y).reshape(-1)).long()) for A, y, _ in batches]
        calls["one"] = 0

        def one_module():
            a, yy = big_batches[calls["one"] % len(big_batches)]
            calls["one"] += 1
            big.zero_grad(set_to_none=True)
            F.cross_entropy(big(a), yy).backward()

        def call(vec):
            A, y, w = batches[calls[vec] % len(batches)]
            calls[vec] += 1
            return built[vec].loss_grad(X, A, y, w)

        lv, gv = call("vmap")
        ll, gl = call("loop")
        assert np.allclose(lv, ll, rtol=1e-4, atol=1e-5), "vmap and loop losses differ"
        assert np.allclose(gv, gl, rtol=1e-3, atol=1e-5 * max(1.0, float(np.abs(gl).max()))), \
            "vmap and loop gradients differ"
        fns = {"vmap": lambda: call("vmap"), "loop": lambda: call("loop"), "one": one_module}
        fns["one"]()
        t = {k: [] for k in fns}
        for i in range(args.reps):
            for k in (("vmap", "loop", "one") if i % 2 else ("one", "loop", "vmap")):
                t0 = time.perf_counter()
                fns[k]()
                t[k].append(time.perf_counter() - t0)
        tv, tl, to = (float(np.median(t[k])) for k in ("vmap", "loop", "one"))
        rows.append({"nodes": L, "d": int(X.shape[1]), "threads": args.threads, "vmap_s": tv, "loop_s": tl,
                     "one_module_s": to, "vmap_node_steps_s": L / tv, "loop_node_steps_s": L / tl,
                     "ratio": tl / tv, "ceiling": tl / to})
        if args.profile and L == args.nodes[0]:
            profiles += [profile_top(lambda: call("vmap"), f"vmap, {L} nodes"),
                         profile_top(lambda: call("loop"), f"loop, {L} nodes")]
    print(f"lenet loss_grad, vmap vs per-node loop: 1 process, {args.threads} torch thread(s), batch {BATCH} "
          f"per node, 1x28x28, median of {args.reps} alternating calls (torch {torch.__version__})")
    print(f"{'nodes':>6}{'vmap ms':>10}{'loop ms':>10}{'1 module':>10}{'vmap n-s/s':>12}{'loop n-s/s':>12}"
          f"{'vmap/loop':>11}{'ceiling':>9}")
    for r in rows:
        print(f"{r['nodes']:>6}{r['vmap_s'] * 1e3:>10.1f}{r['loop_s'] * 1e3:>10.1f}{r['one_module_s'] * 1e3:>10.1f}"
              f"{r['vmap_node_steps_s']:>12.0f}{r['loop_node_steps_s']:>12.0f}{r['ratio']:>11.2f}{r['ceiling']:>9.2f}")
    print("target at 16 nodes: vmap/loop >= 3 (node-steps/s); ceiling = loop / one module on all nodes' samples "
          "at once (plain forward + backward of batch nodes x 32, shared weights): an optimistic bound on what any "
          "batching over nodes can gain here")
    for p in profiles:
        print(p)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"torch": torch.__version__, "threads": args.threads, "rows": rows}, fh, indent=1)


# ---------------------------------------------------------------------------------------
# engines vs DDP and plain torch, one node per rank, under MPI


def engines_bench(args) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from mpi4py import MPI
    from torch.nn.parallel import DistributedDataParallel as DDP

    from bench.comm import slowest  # barrier, time, max over ranks
    from hpcopt import optim, runner
    from hpcopt.models.nets import LeNet

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    torch.set_num_threads(args.threads)
    tmp = world.bcast(tempfile.mkdtemp(prefix="hpcopt-torch-nets-") if rank == 0 else None)
    steps_total = 10**6  # the schedule is constant; only lr_at's arithmetic runs

    engines = {}
    for vec in args.vectorize:
        for method in ("sync_sgd", "dsgd"):
            cfg = lenet_config(vec, n=size, method=method, threads=args.threads, steps=steps_total)
            r = runner.Runner(cfg, "", os.path.join(tmp, f"{method}-{vec}"), force=True, out=io.StringIO())
            r.setup()
            engines[(method, vec)] = r
    ref = engines[("sync_sgd", args.vectorize[0])]
    x0 = ref.model.init(ref.cfg.run.seed)
    vec_chosen = {}

    # DDP and plain torch: LeNet from the same row
    def lenet_from(row):
        net = LeNet((1, 28, 28), 10)
        net.load_state_dict({k: torch.from_numpy(v) for k, v in ref.model.state_dict(row).items()}, strict=True)
        return net

    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=rank,
                            world_size=size)
    ddp_net = lenet_from(x0)
    ddp = DDP(ddp_net)
    sgd = torch.optim.SGD(ddp.parameters(), lr=LR)
    plain_net = lenet_from(x0)
    pool = []  # this rank's node's batches, drawn as hpcopt draws them, as torch tensors
    for t in range(16):
        A, y, _ = ref.ctx.data.batch(t)
        pool.append((torch.from_numpy(np.ascontiguousarray(A[0]).reshape(BATCH, 1, 28, 28).copy()),
                     torch.from_numpy(np.asarray(y[0])).long()))

    def ddp_step(i):
        x, y = pool[i % len(pool)]
        sgd.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(x), y).backward()
        sgd.step()

    # check: one sync SGD step (vectorize loop where measured, else the first) == one DDP step
    chk = engines[("sync_sgd", "loop" if "loop" in args.vectorize else args.vectorize[0])]
    st = chk.algo.init(chk.ctx, x0)
    st, _ = chk.algo.step(chk.ctx, st, 0, optim.lr_at(chk.cfg.optimizer, 0, steps_total))
    ddp_step(0)
    flat = ref.model.spec.flatten(ddp_net)
    err = float(np.abs(flat - np.asarray(st.x)).max())
    assert err < 1e-5 * max(1.0, float(np.abs(flat).max())), f"sync SGD and DDP disagree after one step ({err:g})"
    ddp_net.load_state_dict(lenet_from(x0).state_dict())  # back to x0 (DDP keeps the same tensors)

    fns = {}
    for (method, vec), r in engines.items():
        holder = {"state": r.algo.init(r.ctx, x0), "t": 0}

        def step(r=r, holder=holder):  # what Runner.loop does per step, minus run.h5 bookkeeping
            c, t = r.comm, holder["t"]
            c.step = t
            lr = optim.lr_at(r.cfg.optimizer, t, steps_total)
            holder["state"], stats = r.algo.step(r.ctx, holder["state"], t, lr)
            loss = r.backend.to_host(stats["loss"]).astype(np.float64)
            c.allreduce_scalars([0.0, float(not np.all(np.isfinite(loss)))], op="max")
            holder["t"] = t + 1

        fns[f"{method} {vec}"] = step
    for vec in args.vectorize:
        r = engines[("dsgd", vec)]
        X = np.tile(x0[None, :], (1, 1))
        lg = {"t": 0}

        def loss_grad(r=r, X=X, lg=lg):
            A, y, w = r.ctx.data.batch(lg["t"] % 16)
            lg["t"] += 1
            r.model.loss_grad(X, A, y, w)

        fns[f"loss_grad {vec}"] = loss_grad
    counter = {"ddp": 1, "plain": 0}

    def ddp_fn():
        ddp_step(counter["ddp"])
        counter["ddp"] += 1

    def plain_fn():
        x, y = pool[counter["plain"] % len(pool)]
        counter["plain"] += 1
        plain_net.zero_grad(set_to_none=True)
        F.cross_entropy(plain_net(x), y).backward()

    fns["ddp"], fns["plain"] = ddp_fn, plain_fn
    names = list(fns)
    for _ in range(args.warmup):
        for k in names:
            fns[k]()
    for (method, vec), r in engines.items():
        vec_chosen[f"{method} {vec}"] = r.model.vectorize  # what auto picked on the first batch
    times = {k: [] for k in names}
    for i in range(args.steps):
        order = names[i % len(names):] + names[: i % len(names)]
        if i % 2:
            order = order[::-1]
        for k in order:
            times[k].append(slowest(fns[k]))
    med = {k: float(np.median(v)) for k, v in times.items()}
    dist.destroy_process_group()
    rows = []
    for vec in args.vectorize:
        for method in ("sync_sgd", "dsgd"):
            key = f"{method} {vec}"
            rows.append({"case": f"{method} vs ddp", "method": method, "vectorize": vec,
                         "vectorize_used": vec_chosen[key], "ranks": size, "hpcopt_ms": med[key] * 1e3,
                         "baseline_ms": med["ddp"] * 1e3, "ratio": med[key] / med["ddp"]})
            rows.append({"case": f"{method} vs plain", "method": method, "vectorize": vec,
                         "vectorize_used": vec_chosen[key], "ranks": size, "hpcopt_ms": med[key] * 1e3,
                         "baseline_ms": med["plain"] * 1e3, "ratio": med[key] / med["plain"]})
        key = f"loss_grad {vec}"
        rows.append({"case": "loss_grad vs plain", "method": "loss_grad", "vectorize": vec,
                     "vectorize_used": engines[("dsgd", vec)].model.vectorize, "ranks": size,
                     "hpcopt_ms": med[key] * 1e3, "baseline_ms": med["plain"] * 1e3,
                     "ratio": med[key] / med["plain"]})
    rows.append({"case": "ddp vs plain", "method": "ddp", "vectorize": "", "vectorize_used": "", "ranks": size,
                 "hpcopt_ms": med["ddp"] * 1e3, "baseline_ms": med["plain"] * 1e3,
                 "ratio": med["ddp"] / med["plain"]})
    if rank == 0:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        k = ref.kernels
        print(f"lenet engines vs DDP (gloo) and plain torch: {size} ranks x 1 node, {len(os.sched_getaffinity(0))} "
              f"cores, {args.threads} torch thread(s) per rank, hpcopt kernels {k.impl} ({k.threads} thread(s)), "
              f"batch {BATCH} per rank, median of {args.steps} steps of the slowest rank after {args.warmup} "
              f"warm-up (torch {torch.__version__}); check: one sync SGD step == one DDP step (max |diff| "
              f"{err:.1e})")
        print(f"{'case':<22}{'vectorize':>12}{'hpcopt ms':>11}{'base ms':>10}{'ratio':>8}")
        for r in rows:
            used = r["vectorize"] + (f"->{r['vectorize_used']}" if r["vectorize"] == "auto" else "")
            print(f"{r['case']:<22}{used:>12}{r['hpcopt_ms']:>11.2f}{r['baseline_ms']:>10.2f}{r['ratio']:>8.2f}")
        print("targets: sync_sgd/ddp <= 1.0, dsgd/ddp < 1, engine/plain <= 1.10")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"ranks": size, "threads": args.threads, "torch": torch.__version__,
                           "check_max_abs_diff": err, "times_ms": {k: v * 1e3 for k, v in med.items()},
                           "rows": rows}, fh, indent=1)


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="what", required=True)
    v = sub.add_parser("vmap", help="vmap vs per-node loop on one process")
    v.add_argument("--nodes", type=int, nargs="+", default=[16, 64])
    v.add_argument("--reps", type=int, default=7)
    v.add_argument("--profile", action="store_true", help="print torch.profiler's top operators")
    e = sub.add_parser("engines", help="hpcopt engines vs DDP and plain torch (under mpiexec)")
    e.add_argument("--steps", type=int, default=60, help="timed steps of each")
    e.add_argument("--warmup", type=int, default=3)
    e.add_argument("--vectorize", nargs="+", default=["auto", "loop"], choices=["auto", "vmap", "loop"])
    for q in (v, e):
        q.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process")
        q.add_argument("--json", default="")
    args = p.parse_args()
    (vmap_bench if args.what == "vmap" else engines_bench)(args)


if __name__ == "__main__":
    main()
