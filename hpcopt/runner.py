"""Build a run from a config and drive it: the loop, evaluation, logging, checkpoints, signals.

Exit statuses (also in the README): 0 finished; 2 bad config or input (also: the run
directory is in use by another run); 75 stopped early by SIGUSR1 / SIGINT / run.max_wall /
run.stop_after after writing a checkpoint ("requeue me"); 143 stopped by SIGTERM after
writing a checkpoint (scancel, preemption: the job ends, it is not requeued); 130
a second SIGINT (the job is aborted at once); 1 other failures. Only rank 0 prints and
writes run.h5; every rank writes its checkpoint shard.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, Optional

import numpy as np
import yaml

from . import __version__, algorithms, metrics, models, optim, store
from . import comm as comm_mod
from . import config as config_mod
from . import data as data_mod
from . import topology as topology_mod
from .backend import select as select_backend
from .comm import Comm
from .config import Config, ConfigError
from .kernels import Kernels

EXIT_REQUEUE = 75  # stopped after a checkpoint because time runs out (USR1, run.max_wall, run.stop_after): requeue me
EXIT_TERMINATED = 143  # stopped after a checkpoint by SIGTERM (scancel, preemption): ended, do not requeue
REFERENCE_STEPS = 10  # run.divergence_factor: the reference is the mean loss of the first steps
REFERENCE = "divergence_reference"  # its (sum, count) in checkpoints (a replicated array)


class Faults:
    """Fault injection for the fault tests, from the environment variable HPCOPT_FAULT.

    "kind@step:rank[:seconds]" with kind one of
      kill           SIGKILL this rank at the start of `step`;
      kill-shard     SIGKILL this rank while it writes its checkpoint shard for `step`
                     (the temporary file exists, the rename has not happened);
      kill-complete  SIGKILL rank 0 after every shard of `step` is written, before COMPLETE;
      sleep          stop answering: sleep `seconds` at the start of `step`;
      term           send this rank SIGTERM at the start of `step` (the hybrid method's
                     simulated clock: after update `step`), as a scheduler would;
      int            send this rank SIGINT there (what Ctrl-C sends).
    `step` -1 is in setup, once MPI is up (before the data set is built). Unset (the
    normal case), nothing happens.
    """

    def __init__(self, spec: str = ""):
        self.kind, self.step, self.rank, self.seconds = "", -1, -1, 0.0
        if spec:
            try:
                kind, rest = spec.split("@", 1)
                parts = rest.split(":")
                self.kind, self.step, self.rank = kind, int(parts[0]), int(parts[1])
                self.seconds = float(parts[2]) if len(parts) > 2 else 0.0
            except (ValueError, IndexError):
                raise ConfigError(f"HPCOPT_FAULT = {spec!r} is not allowed: "
                                  "expected KIND@STEP:RANK[:SECONDS]") from None
            if kind not in ("kill", "kill-shard", "kill-complete", "sleep", "term", "int"):
                raise ConfigError(f"HPCOPT_FAULT = {spec!r} is not allowed: kinds are kill, kill-shard, "
                                  f"kill-complete, sleep, term, int")
            if not (math.isfinite(self.seconds) and self.seconds >= 0):
                raise ConfigError(f"HPCOPT_FAULT = {spec!r} is not allowed: SECONDS must be a finite number >= 0")

    def _hit(self, kind: str, step: int, rank: int) -> bool:
        return self.kind == kind and self.step == step and self.rank == rank

    def at_step(self, step: int, rank: int) -> None:
        if self._hit("kill", step, rank):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._hit("sleep", step, rank):
            time.sleep(self.seconds)
        if self._hit("term", step, rank):
            os.kill(os.getpid(), signal.SIGTERM)
        if self._hit("int", step, rank):
            os.kill(os.getpid(), signal.SIGINT)

    def in_shard(self, step: int, rank: int) -> None:
        if self._hit("kill-shard", step, rank):
            os.kill(os.getpid(), signal.SIGKILL)

    def before_complete(self, step: int) -> None:
        if self._hit("kill-complete", step, 0):
            os.kill(os.getpid(), signal.SIGKILL)


class StopFlag:
    """Set by SIGTERM / SIGUSR1 / SIGINT; read at step boundaries, where all ranks agree to
    checkpoint and stop. A SIGINT after a stop request (Ctrl-C twice) aborts the whole job
    at once: MPI_Abort(130), or KeyboardInterrupt where MPI is not started or has one rank.
    A thread also counts the signals (through the wakeup fd), so the second SIGINT aborts
    even while the main thread is inside a blocking MPI call, where no Python handler runs.
    Installed before setup, so no signal in setup leaves a rank gone and its peers waiting.
    """

    def __init__(self):
        self.signal: Optional[int] = None
        self.speak = True  # whether this rank says so on stderr (rank 0, once it is known)
        self._aborting = threading.Lock()

    def __call__(self, signum, frame):  # noqa: ARG002 -- signal handler signature
        if signum == signal.SIGINT and self.signal is not None:
            self.abort()
            raise KeyboardInterrupt  # no MPI, or one rank
        if signum == signal.SIGINT and self.speak:
            os.write(2, b"hpcopt: interrupt: stopping at the next step boundary with a checkpoint "
                        b"(interrupt again to abort at once)\n")  # not print: a handler may interrupt one
        self.signal = signum

    def abort(self) -> None:
        if self._aborting.acquire(blocking=False):  # once, from the handler or the thread
            os.write(2, b"hpcopt: interrupted again: aborting the job\n")
            comm_mod.abort_if_started(130)

    def _watch(self, fd: int) -> None:
        stop_requested = False
        while True:
            for signum in os.read(fd, 64):
                if signum == signal.SIGINT and stop_requested:
                    self.abort()
                stop_requested = True

    def install(self) -> None:
        for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(s, self)
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        signal.set_wakeup_fd(write_end)
        threading.Thread(target=self._watch, args=(read_end,), name="hpcopt-signals", daemon=True).start()


def _git_describe() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=here,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _threads_per_rank(local_size: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_size))


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _fmt_bytes(b: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    i = 0
    while b >= 1024 and i < len(units) - 1:
        b, i = b / 1024, i + 1
    return f"{b:.0f} B" if i == 0 else f"{b:.1f} {units[i]}"


# ---------------------------------------------------------------------------------------
# memory estimate (before the big allocations)


def _model_dim(cfg: Config, features: int, classes: int) -> Optional[int]:
    """Parameters per node of the NumPy models and torch_mlp from the data's shape, without
    allocating; None for the other torch models (known once their module is built)."""
    name = cfg.model.name.value
    if name == "auto":
        name = "quadratic" if classes == 0 else ("logistic" if classes == 2 else "softmax")
    if name in ("mlp", "torch_mlp"):
        return models.MLP(features, cfg.model.hidden, classes).d
    if name in models.NUMPY_MODELS:
        return models.LinearModel(name, features, classes).d
    return None


def data_shape(cfg: Config, ds=None) -> Optional[tuple]:
    """(train rows, test rows, features, classes) of the data set `ds`, or, before data.load
    makes it, of a generated one from the config alone; None for files not read yet."""
    if ds is not None:
        return len(ds.X_train), len(ds.X_test), ds.features, ds.classes
    d, n = cfg.data, cfg.nodes.n
    if d.dataset.value == "quadratic":
        test = max(1, int(round(d.samples_per_node * d.test_fraction / max(1e-9, 1 - d.test_fraction))))
        return n * d.samples_per_node, n * test, d.dim, 0
    if d.dataset.value == "classification":
        total = int(math.ceil(n * d.samples_per_node / (1 - d.test_fraction)))
        return total - int(total * d.test_fraction), int(total * d.test_fraction), d.dim, d.classes
    return None


def memory_terms(cfg: Config, nodes: int, arrays: int, shape: Optional[tuple], d: Optional[int]) -> list:
    """The big per-rank allocations as (what, bytes, factors), factors being (config key,
    size) pairs; terms whose sizes are not known yet (None) are left out. `nodes`: the
    nodes this rank computes; `arrays`: (nodes, d) float32 arrays per node (state and
    gradient); `shape`: data_shape. Every rank holds the whole data set; the NumPy models
    evaluate every node on the whole test set at once (torch models in model.eval_batch
    chunks); dsgd builds sparse (CSR) mixing matrices, one per phase (edge lists: counted as dense)."""
    n, B, name = cfg.nodes.n, cfg.data.batch_size, cfg.model.name.value
    synthetic = cfg.data.dataset.value in ("quadratic", "classification")
    fkey = "data.dim" if synthetic else ("data.path" if cfg.data.path else "data.dataset")
    rkey = "data.samples_per_node" if synthetic else fkey
    dkey = "model.hidden" if name in ("mlp", "torch_mlp") else ("model.name" if name in config_mod.TORCH_MODELS
                                                                else fkey)
    terms = []
    if d is not None:
        terms.append(("state", 4.0 * nodes * d * arrays, [("nodes.n", nodes), (dkey, d)]))
    if shape is not None:
        train, test, features, classes = shape
        terms.append(("data", 4.0 * (train + test) * features,
                      [("nodes.n", n), (rkey, (train + test) / n), (fkey, features)]))
        terms.append(("minibatch", 4.0 * nodes * (B or math.ceil(train / n)) * features,
                      [("nodes.n", nodes), ("data.batch_size", B), (fkey, features)]))
        if name not in config_mod.TORCH_MODELS:
            width = max((*cfg.model.hidden, classes, 1)) if name == "mlp" else max(classes, 1)
            held = nodes
            if cfg.algorithm.name.value == "teleport" and cfg.algorithm.k:  # only the token rows are evaluated
                held = max(1, math.ceil(nodes * cfg.algorithm.k / n))
            # the NumPy models evaluate shared data in chunks of about 2**24 logits (a few temporaries each)
            terms.append(("evaluation", 4.0 * min(held * test * width, 6 * 2 ** 24),
                          [("nodes.n", held), (rkey, test / n), (dkey, width)]))
    if cfg.algorithm.name.value == "dsgd":
        topo = cfg.topology.name.value
        phases = max(1, math.ceil(math.log2(n))) if topo == "one_peer_exponential" else 1
        terms.append(("topology", (16.0 * _edges_per_node(cfg, n) + 8.0) * n * phases, [("nodes.n", n)]))
    return terms


def _edges_per_node(cfg: Config, n: int) -> float:
    """Nonzeros per row of a topology's sparse (CSR) mixing matrix, self weight included."""
    logn = max(1, math.ceil(math.log2(max(2, n))))
    return {"ring": 3, "torus": 5, "exponential": 2 * logn + 1, "exponential_directed": logn + 1,
            "one_peer_exponential": 2, "complete": n, "star": 2, "hypercube": logn + 1,
            "erdos_renyi": cfg.topology.p * n + 1}.get(cfg.topology.name.value, n)


def _cgroup_headroom() -> Optional[float]:
    """Bytes this process's memory cgroup (v2 or v1) may still take; None without a limit."""
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as fh:
            lines = [line.strip().split(":", 2) for line in fh if line.count(":") >= 2]
    except OSError:
        return None
    for _, controllers, path in lines:
        if controllers == "":
            files = (f"/sys/fs/cgroup{path}/memory.max", f"/sys/fs/cgroup{path}/memory.current")
        elif "memory" in controllers.split(","):
            files = (f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes",
                     f"/sys/fs/cgroup/memory{path}/memory.usage_in_bytes")
        else:
            continue
        try:
            limit, used = (open(f, encoding="utf-8").read().strip() for f in files)
        except OSError:
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" / v1's huge number: no limit
            return max(0.0, float(int(limit) - int(used)))
    return None


def available_memory(local_size: int) -> tuple:
    """(bytes, where from) one rank may allocate: the host's MemAvailable, or its memory
    cgroup's headroom where smaller, shared by the host's ranks; or this process's
    address-space limit (ulimit -v) where smaller still; (inf, "") where none is known."""
    found = []
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            kib = next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable:"))
        found.append((kib * 1024.0 / local_size, f"MemAvailable / {local_size} rank(s) on the host"))
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    headroom = _cgroup_headroom()
    if headroom is not None:
        found.append((headroom / local_size, f"the memory cgroup's headroom / {local_size} rank(s)"))
    import resource
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft != resource.RLIM_INFINITY:
        try:
            with open("/proc/self/statm", encoding="utf-8") as fh:
                mapped = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            mapped = 0
        found.append((max(0.0, float(soft - mapped)), "the address-space limit, ulimit -v"))
    return min(found, default=(math.inf, ""))


# ---------------------------------------------------------------------------------------
# resume: what may differ from the config a run was started with

RESUMABLE = ("run.steps", "run.max_wall", "run.stop_after", "run.eval_every", "run.log_every",
             "run.checkpoint_every", "run.keep_checkpoints", "run.progress", "run.name", "run.out", "comm.*",
             "device.kernels", "device.cuda_aware", "model.threads", "model.eval_batch")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old_text: str, cfg: Config) -> tuple:
    """([(key, old, new), ...], problem): the keys of `cfg` that differ from the config a
    run was started with (its run.h5 /config text), and a one-line error naming the first
    change a resume may not make ("" if all are allowed: RESUMABLE and the rank count)."""
    try:
        old = _flat(config_mod.to_dict(config_mod.from_dict(yaml.safe_load(old_text))))
    except (ConfigError, yaml.YAMLError) as exc:
        return [], (f"--resume is not allowed: the config recorded in run.h5 does not load today ({exc}); "
                    f"use --force to start over")
    new = _flat(config_mod.to_dict(cfg))
    changes = [(k, old.get(k), v) for k, v in new.items() if old.get(k) != v]
    for key, was, now in changes:
        if not any(key == a or (a.endswith("*") and key.startswith(a[:-1])) for a in RESUMABLE):
            return changes, (f"{key} = {config_mod._show(now)} is not allowed on resume: the run was started with "
                             f"{config_mod._show(was)}; only {', '.join(RESUMABLE)} and the number of ranks may "
                             f"change (or use --force to start over)")
    return changes, ""


# ---------------------------------------------------------------------------------------
# --force: delete only what hpcopt wrote

RUN_FILES = ("", ".bak", ".lock", ".tmp", ".bak.tmp")  # run.h5 and the files beside it


def _is_run_file(path: str) -> bool:
    import h5py
    try:
        with h5py.File(path, "r", locking=False) as f:
            return isinstance(f.get("config"), h5py.Dataset) and isinstance(f.get("metrics"), h5py.Group)
    except OSError:
        return False


def clear_run(run_dir: str) -> str:
    """Delete the run in `run_dir` for --force: run.h5 and the files beside it, ckpt/step-<N>/
    and ckpt/ if that leaves it empty, and only where run.h5 (or its backup) is an hpcopt
    run file. Returns "" or, deleting nothing, the one-line reason it refuses."""
    path = os.path.join(run_dir, store.RUN_FILE)
    ours = [path + suffix for suffix in RUN_FILES if os.path.lexists(path + suffix)]
    ckpt = store.ckpt_root(run_dir)
    if not ours and not os.path.lexists(ckpt):
        return ""  # no run here: nothing to delete
    if not (_is_run_file(path) or _is_run_file(path + ".bak")):
        what = (f"its {store.RUN_FILE} is not an hpcopt run file" if os.path.lexists(path)
                else f"it holds {store.CKPT_DIR}/ but no {store.RUN_FILE}")
        return (f"--force is not allowed for {run_dir}: {what}, and hpcopt deletes only runs it wrote; nothing "
                f"was deleted (remove those files yourself or choose another run directory)")
    for step in store.list_steps(run_dir):
        shutil.rmtree(store.step_dir(run_dir, step))
    with contextlib.suppress(OSError):
        os.rmdir(ckpt)  # anything else in there was not written by hpcopt: it stays
    for p in ours:
        os.remove(p)
    return ""


class Runner:
    def __init__(self, cfg: Config, config_text: str, run_dir: str, resume: bool = False,
                 force: bool = False, out=sys.stdout, early=None):
        self.cfg = cfg
        self.config_text = config_text
        self.run_dir = run_dir
        self.resume = resume
        self.force = force
        self.out = out
        self.stop = StopFlag()
        self.early = early  # cli.EarlyStop: the signals that came before the runner took over
        self.lock_fd: Optional[int] = None  # rank 0: the run directory's lock, held until exit
        self.base_totals: dict = {}  # run totals of the sessions before this one (from the checkpoint)
        self.t_begin = time.perf_counter()
        self.faults = Faults(os.environ.get("HPCOPT_FAULT", ""))

    # ---------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        if self.comm.rank == 0:
            print(text, file=self.out, flush=True)

    def setup(self) -> None:
        cfg = self.cfg
        n = cfg.nodes.n
        size = comm_mod.world_size()
        wall_server = cfg.algorithm.name.value == "hybrid" and cfg.algorithm.clock.value == "wall"
        if wall_server and size != n + 1:
            raise ConfigError(f"algorithm.clock = 'wall' is not allowed with {size} ranks for nodes.n = {n}: the "
                              f"wall clock runs the server on rank 0 and one worker per rank (mpiexec -n {n + 1})")
        if size > n and not wall_server:
            raise ConfigError(f"nodes.n = {n} is not allowed: the job has {size} ranks and every rank "
                              f"needs at least one node (use nodes.n >= {size} or fewer ranks)")
        self.comm = comm = Comm(n, timeout=cfg.comm.timeout, poll=cfg.comm.poll, spin=cfg.comm.spin,
                                cuda_aware=cfg.device.cuda_aware.value, server=wall_server,
                                blocking_bytes=cfg.comm.blocking_bytes)
        self.stop.speak = comm.rank == 0
        self.faults.at_step(-1, comm.rank)
        self.node_mode = metrics.node_mode(cfg.run, n)  # per-node columns of run.h5
        self.node_ids = (metrics.node_sample(n, cfg.run.node_sample, cfg.run.seed) if self.node_mode == "sample"
                         else None)
        # memory: refuse what cannot fit before it is allocated (the topology and generated
        # data from the config alone, then the model once the data's shape is known)
        shape = data_shape(cfg)
        self.check_memory(shape, None if shape is None else _model_dim(cfg, shape[2], shape[3]))
        self.backend = select_backend(cfg.device.kind.value, comm.local_rank)
        self.kernels = Kernels(on_gpu=self.backend.on_gpu, mode=cfg.device.kernels.value,
                               threads=_threads_per_rank(comm.local_size))
        comm.backend, comm.kernels = self.backend, self.kernels
        if cfg.algorithm.name.value == "dsgd":
            self.topology = topology_mod.from_config(cfg.topology, n)
        else:
            self.topology = None
        self.dataset = ds = data_mod.load(cfg.data, n)
        shape, d = data_shape(cfg, ds), _model_dim(cfg, ds.features, ds.classes)
        if d is not None:  # before building: a torch_mlp allocates its layers
            self.check_memory(shape, d)
        self.parts = data_mod.partition(ds, n, cfg.data.partition.value, cfg.data.alpha,
                                        cfg.data.shards_per_node, cfg.data.seed)
        self.algo = algorithms.get(cfg.algorithm.name.value)
        validation = None  # Teleportation's k search: a split carved out of the nodes' training parts
        if hasattr(self.algo, "validation_split"):
            self.parts, validation = self.algo.validation_split(cfg, ds, self.parts, self.backend.xp)
        threads = cfg.model.threads or _threads_per_rank(comm.local_size)
        self.model = models.build(cfg.model, ds, backend=self.backend, threads=threads,
                                  log=lambda text: self.say(f"hpcopt: {text}"))
        if d is None:  # the other torch models: a fixed architecture, cheap to build
            self.check_memory(shape, self.model.d)
        self.node_data = (data_mod.NodeData(self.backend.xp, ds, self.parts, range(comm.lo, comm.hi),
                                            cfg.data.batch_size, cfg.run.seed, augment=cfg.data.augment,
                                            shape=ds.shape) if comm.local_n else None)
        xp = self.backend.xp
        self.X_test = xp.asarray(ds.X_test)
        self.y_test = xp.asarray(ds.y_test)
        self.w_test = xp.full((1, len(ds.X_test)), 1.0 / max(1, len(ds.X_test)), dtype=np.float32)
        self.ctx = algorithms.Context(cfg, comm, self.backend, self.kernels, self.model, self.node_data,
                                      self.topology, {} if validation is None else {"validation": validation})
        if cfg.algorithm.name.value == "hybrid" and not wall_server:  # every rank simulates every worker
            self.ctx.workspace["all_nodes"] = data_mod.NodeData(self.backend.xp, ds, self.parts, range(n),
                                                                cfg.data.batch_size, cfg.run.seed,
                                                                augment=cfg.data.augment, shape=ds.shape)
        if cfg.algorithm.noise.value == "matched":
            self.ctx.workspace["noise_schedule"] = self.noise_schedule(cfg.algorithm.noise_run)

    def check_memory(self, shape: Optional[tuple], d: Optional[int]) -> None:
        """Raise ConfigError on every rank if any rank's estimate (memory_terms) exceeds the
        memory available to it; keeps the estimate for the header line."""
        cfg, c = self.cfg, self.comm
        name = cfg.algorithm.name.value
        nodes = cfg.nodes.n if name == "hybrid" and cfg.algorithm.clock.value == "simulated" else c.local_n
        terms = memory_terms(cfg, nodes, len(algorithms.get(name).State._fields) + 1, shape, d)
        self.memory_need = need = sum(b for _, b, _ in terms)
        have, source = available_memory(c.local_size)
        problem = ""
        if need > have:
            _, _, factors = max(terms, key=lambda t: t[1])
            key = max(factors, key=lambda f: f[1])[0]
            section, field = key.split(".")
            value = config_mod.to_dict(getattr(getattr(cfg, section), field))
            problem = (f"{key} = {config_mod._show(value)} is not allowed: this run needs about {_fmt_bytes(need)} "
                       f"per rank ({', '.join(f'{what} {_fmt_bytes(b)}' for what, b, _ in terms)}) and rank "
                       f"{c.rank} has {_fmt_bytes(have)} available ({source})")
        problem = next((p for p in c.bcast(c.gather_obj(problem)) if p), "")
        if problem:
            raise ConfigError(problem)

    def noise_schedule(self, path: str):
        """(steps, grad_deviation) of the DPSGD run a matched-noise baseline follows."""
        try:
            diag = store.read_run(path)["diag"]
        except OSError as exc:
            raise ConfigError(f"algorithm.noise_run = {path!r} is not allowed: cannot read it ({exc})") from None
        if "grad_deviation" not in diag or not len(diag["grad_deviation"]):
            raise ConfigError(f"algorithm.noise_run = {path!r} is not allowed: it has no diagnostics "
                              f"(run it with diagnostics.every > 0)")
        vals = np.asarray(diag["grad_deviation"], float)
        vals[~np.isfinite(vals)] = 0.0
        return np.asarray(diag["step"], float), vals

    def attrs(self) -> Dict[str, object]:
        import h5py
        c = self.comm
        return {
            "hpcopt_version": __version__, "numpy_version": np.__version__, "h5py_version": h5py.__version__,
            **comm_mod.library_versions(),
            "cuda_aware": str(c.cuda_aware) if self.backend.on_gpu else "not needed (host arrays)",
            "cuda_aware_source": c.cuda_aware_reason if self.backend.on_gpu else "",
            "ranks": c.size, "nodes": c.n, "placement": c.placement.starts,
            "comm_blocking_bytes": c.blocking_bytes, "oversubscribed": int(c.oversubscribed),
            "device": self.backend.device_name, "kernels": self.kernels.impl,
            "kernels_note": self.kernels.note, "kernel_threads": self.kernels.threads,
            "algorithm": self.cfg.algorithm.name.value, "model": self.model.kind, "dim": self.model.d,
            "dataset": self.dataset.name, "git": _git_describe(), "created": time.time(),
            "node_metrics": self.node_mode,
            "node_columns": c.n if self.node_ids is None else len(self.node_ids),
        }

    # ---------------------------------------------------------------------------------
    def prepare_dir(self) -> Optional[dict]:
        """Create or reuse the run directory; returns the checkpoint to resume from."""
        c = self.comm
        path = os.path.join(self.run_dir, store.RUN_FILE)
        problem = ""
        self.config_changes: list = []
        if c.rank == 0:
            holder = ""
            lock_path = os.path.join(self.run_dir, store.RUN_LOCK)
            lock_existed = os.path.exists(lock_path)
            if os.path.isdir(self.run_dir):
                self.lock_fd, holder = store.lock_run_dir(self.run_dir)
            if holder:
                problem = _in_use(self.run_dir, holder)
            elif os.path.exists(path) and not (self.resume or self.force):
                problem = (f"run directory {self.run_dir} already holds a run; pass --resume to "
                           f"continue it or --force to start over")
            elif self.resume and (os.path.exists(path) or os.path.exists(path + ".bak")):
                try:
                    old_text = store.read_run(self.run_dir)["config_text"]
                except OSError:
                    old_text = None  # unreadable and no backup: started anew below
                if old_text is not None:
                    self.config_changes, problem = config_changes(old_text, self.cfg)
            elif self.force and not self.resume and os.path.isdir(self.run_dir):
                problem = clear_run(self.run_dir)
            if not problem:
                os.makedirs(self.run_dir, exist_ok=True)
                if self.lock_fd is None:  # a new directory: lock it before anything is written
                    self.lock_fd, holder = store.lock_run_dir(self.run_dir)
                    if holder:
                        problem = _in_use(self.run_dir, holder)
            elif self.lock_fd is not None and not lock_existed:  # leave a refused directory as it was
                os.close(self.lock_fd)
                self.lock_fd = None
                os.remove(lock_path)
        problem = c.bcast(problem)
        if problem:
            raise ConfigError(problem)
        info, skipped = (store.latest(self.run_dir) if c.rank == 0 and self.resume else (None, []))
        info, skipped = c.bcast((info, skipped))
        self.rf = store.RunFile(self.run_dir) if c.rank == 0 else None
        if c.rank == 0:
            if self.rf.exists() and not store.readable(self.rf.path):
                restored = store.restore_run_file(self.run_dir)
                why = ("run.h5 was unreadable (a crash during a metrics flush); restored the copy taken at "
                       "the last checkpoint" if restored else "run.h5 was unreadable and had no backup; started anew")
                self.say(f"hpcopt: {why}")
                if not restored:
                    os.remove(self.rf.path)
            self.continued = self.rf.exists()  # a run of an earlier session is continued
            if not self.continued:
                self.rf.create(self.config_text, self.attrs(),
                               {} if self.node_ids is None else {"node_ids": self.node_ids})
            for why in skipped:
                self.say(f"hpcopt: {why}; skipped")
                self.rf.event(-1, "checkpoint_skipped", why)
        # a continued run keeps the per-node columns its file has (a file written before
        # run.node_metrics existed holds every node's column)
        layout = store.node_layout(self.run_dir) if c.rank == 0 and self.continued else None
        layout = c.bcast(layout)
        if layout is not None:
            self.node_mode, self.node_ids = layout
        return info

    def record_resume(self, step: int, message: str) -> None:
        """Rank 0: the `resume` event, with the config changes made on resuming (whose new
        text replaces /config; the events keep the history)."""
        if self.config_changes:
            message += "; config changes: " + ", ".join(f"{k} {config_mod._show(a)} -> {config_mod._show(b)}"
                                                        for k, a, b in self.config_changes)
            self.rf.set_config(self.config_text)
        self.rf.event(step, "resume", message)

    def restore(self, info: dict):
        names = self.algo.State._fields
        sharded = [k for k in names if k in self.algo.SHARDED]
        replicated = [k for k in names if k not in self.algo.SHARDED]
        arrays = store.read_state(self.run_dir, info, self.comm.lo, self.comm.hi, sharded, replicated)
        return self.algo.State(**{k: self.backend.asarray(arrays[k]) for k in names})

    def checkpoint(self, state, step: int, extra: Optional[Dict[str, np.ndarray]] = None) -> None:
        """Per-rank shards + COMPLETE; `extra`: more replicated host arrays (rank 0 writes them)."""
        c = self.comm
        self.backend.synchronize()
        names = state._fields
        sharded = {k: self.backend.to_host(getattr(state, k)) for k in names if k in self.algo.SHARDED}
        replicated = ({k: self.backend.to_host(getattr(state, k)) for k in names if k not in self.algo.SHARDED}
                      if c.rank == 0 else {})
        if extra and c.rank == 0:
            replicated.update(extra)
        try:
            name, digest = store.write_shard(self.run_dir, step, c.rank, c.lo, c.hi, sharded, replicated,
                                             before_rename=lambda: self.faults.in_shard(step, c.rank))
            mine = {"rank": c.rank, "file": name, "sha256": digest, "lo": c.lo, "hi": c.hi}
        except OSError as exc:
            mine = {"rank": c.rank, "error": str(exc)}
        shards = c.gather_obj(mine)
        totals = self.run_totals()
        if c.rank == 0:
            errors = [s["error"] for s in shards if "error" in s]
            if not errors:
                self.faults.before_complete(step)
                try:  # a full disk here must not stop rank 0 short of the barrier the others wait in
                    store.write_complete(self.run_dir, step, shards,
                                         {"ranks": c.size, "nodes": c.n, "algorithm": self.cfg.algorithm.name.value,
                                          "totals": totals})
                    store.backup_run_file(self.run_dir)
                    store.prune(self.run_dir, self.cfg.run.keep_checkpoints)
                except OSError as exc:
                    errors = [str(exc)]
            if errors:
                self.say(f"hpcopt: checkpoint at step {step} failed: {errors[0]}")
                try:
                    self.rf.event(step, "checkpoint_failed", errors[0])
                except OSError:
                    pass  # the disk that refused the checkpoint may refuse the event too; the line above says it
        c.barrier()

    def run_totals(self) -> Optional[dict]:
        """Collective: the whole run's totals so far (the sessions before this one, from the
        checkpoint it resumed, plus this one); a dict on rank 0, None elsewhere."""
        c, base = self.comm, self.base_totals
        mine = c.gather_ranks(np.array(c.totals()))
        if c.rank != 0:
            return None
        return {"bytes_sent_total": float(base.get("bytes_sent_total", 0.0) + mine[:, 0].sum()),
                "comm_seconds_max_rank": float(base.get("comm_seconds_max_rank", 0.0) + mine[:, 1].max()),
                "wall_seconds": float(base.get("wall_seconds", 0.0) + time.perf_counter() - self.t_begin),
                "sessions": int(base.get("sessions", 0)) + 1}

    # ---------------------------------------------------------------------------------
    def evaluate(self, state, step: int) -> dict:
        """Test loss/accuracy of the average model and of every node holding a model.

        Algorithms where only some nodes hold models (Teleportation's tokens) give
        `active_rows(ctx, state, step)`; the other nodes get NaN and stay out of the
        consensus distance. Per-node evaluation covers the nodes whose columns are kept
        (run.node_metrics: all nodes, the sample, or none): at 10^5 nodes evaluating every
        node on the whole test set would cost far more than the training.
        """
        c, xp = self.comm, self.backend.xp
        X = self.algo.node_params(self.ctx, state)
        xbar = self.algo.average(self.ctx, state)
        rows = getattr(self.algo, "active_rows", None)
        mask = np.asarray(rows(self.ctx, state, step), bool) if rows else np.ones(X.shape[0], bool)
        Xa = X[xp.asarray(np.nonzero(mask)[0])] if not mask.all() else X
        sq, holders = c.allreduce_scalars([metrics.sq_dist_sum(Xa, xbar), float(mask.sum())])
        cd = sq / max(1.0, holders)
        row = {"step": np.array([step], np.int64), "consensus_distance": np.array([cd])}
        if self.node_mode != "none":
            if self.node_ids is not None:  # only the sampled nodes of this rank
                mask &= np.isin(np.arange(c.lo, c.hi), self.node_ids)
                Xa = X[xp.asarray(np.nonzero(mask)[0])]
            node_loss = np.full(X.shape[0], np.nan)
            node_acc = np.full(X.shape[0], np.nan)
            if mask.any():
                w_test = xp.broadcast_to(self.w_test, (Xa.shape[0], self.w_test.shape[1]))
                node_loss[mask] = self.backend.to_host(self.model.loss(Xa, self.X_test, self.y_test, w_test))
                node_acc[mask] = self.backend.to_host(self.model.accuracy(Xa, self.X_test, self.y_test))
            per_node = c.allgather_nodes(np.stack([node_loss, node_acc], axis=1))
            row.update(node_test_loss=per_node[None, :, 0], node_test_accuracy=per_node[None, :, 1])
            row = self.node_columns(row)
        if c.rank == 0:
            xb = xbar[None, :]
            row["test_loss"] = np.array([float(self.backend.to_host(self.model.loss(xb, self.X_test, self.y_test,
                                                                                    self.w_test))[0])])
            row["test_accuracy"] = np.array([float(self.backend.to_host(
                self.model.accuracy(xb, self.X_test, self.y_test))[0])])
        return row

    def node_columns(self, columns: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Per-node columns as run.node_metrics keeps them, with their `<name>_stats`."""
        return metrics.node_columns(columns, metrics.NODE_COLUMNS, self.node_mode, self.node_ids)

    # ---------------------------------------------------------------------------------
    def run(self) -> int:
        try:
            return self._run()
        finally:
            self.release()

    def release(self) -> None:
        """Let go of the run directory's lock (the OS does at exit; a process that runs
        several Runners, e.g. a benchmark, needs it now)."""
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def _run(self) -> int:
        self.stop.install()
        if self.early is not None and self.early.signal is not None and self.stop.signal is None:
            self.stop.signal = self.early.signal
        self.setup()
        cfg, c = self.cfg, self.comm
        info = self.prepare_dir()
        x0 = self.model.init(cfg.run.seed if cfg.model.init_seed < 0 else cfg.model.init_seed)
        if info is not None and hasattr(self.algo, "restore_workspace"):  # e.g. Teleportation's searched k
            tables = c.bcast(store.read_run(self.run_dir).get("tables", {}) if c.rank == 0 else None)
            note = self.algo.restore_workspace(self.ctx, tables)
            if note:
                self.say(f"hpcopt: {note}")
        state = self.algo.init(self.ctx, x0)
        if c.rank == 0:
            for name, table in self.ctx.workspace.get("tables", {}).items():
                self.rf.write_table(name, table)
                self.say(f"hpcopt: {name}:\n" + "\n".join(
                    "  " + "  ".join(f"{k}={v[i]:.4g}" if isinstance(v[i], float) else f"{k}={v[i]}"
                                     for k, v in table.items()) for i in range(len(next(iter(table.values()))))))
        start = 0
        self.reference = np.zeros(2)  # (sum, count) of the mean training loss of the first steps
        hybrid_run = cfg.algorithm.name.value == "hybrid"  # resumes in run_hybrid (its own clock)
        if info is not None:
            self.base_totals = dict(info.get("totals") or {})
        if info is not None and not hybrid_run:
            state = self.restore(info)
            start = int(info["step"])
            try:
                self.reference = store.read_state(self.run_dir, info, 0, 0, [], [REFERENCE])[REFERENCE]
            except KeyError:
                pass  # a checkpoint of an earlier version: the reference starts over
            if c.rank == 0:
                dropped = self.rf.truncate(start)
                self.record_resume(start, f"resumed from checkpoint step {start} on {c.size} ranks "
                                          f"(checkpoint written by {info.get('ranks')} ranks); "
                                          f"{dropped} later rows dropped")
            self.say(f"hpcopt: resuming {cfg.run.name} at step {start}")
        elif self.resume and info is None:
            if c.rank == 0 and self.continued:  # the rows of a session that wrote no checkpoint go
                dropped = self.rf.truncate(0)
                self.record_resume(0, f"no checkpoint: started again at step 0 on {c.size} ranks; "
                                      f"{dropped} rows of the earlier session dropped")
            self.say(f"hpcopt: no checkpoint in {self.run_dir}; starting at step 0")
        if self.kernels.note:
            self.say(f"hpcopt: warning: {self.kernels.note}")
        self.say(f"hpcopt: {cfg.algorithm.name.value} on {cfg.nodes.n} nodes x {c.size} ranks, "
                 f"model {self.model.kind} (d = {self.model.d}), data {self.dataset.name}, "
                 f"memory ~{_fmt_bytes(self.memory_need)} per rank, device {self.backend.device_name}, "
                 f"kernels {self.kernels.impl} -> {self.run_dir}")
        c.step = start - 1
        if hybrid_run:
            return self.run_hybrid(state, info)
        code = self.loop(state, start)
        return code

    def run_hybrid(self, state, info: Optional[dict]) -> int:
        """Drive the hybrid parameter server (simulated or wall clock); metrics on its time grid.

        Simulated clock: checkpoints every run.checkpoint_every updates and at a signal
        (ranks agree after each update), each with the whole simulation state, so a
        resumed run continues bit for bit; grid rows are flushed at each checkpoint.
        Wall clock: a signal ends the run early through the server's clean shutdown and
        the run is recorded as it stands; a wall clock cannot be continued, so `--resume`
        of a wall-clock run that has its final checkpoint does nothing.
        """
        from .algorithms import hybrid
        c, cfg = self.comm, self.cfg
        wall_clock = cfg.algorithm.clock.value == "wall"
        resume = None
        if info is not None:
            if wall_clock:
                self.say(f"hpcopt: {self.run_dir} already holds the result of this wall-clock hybrid run "
                         f"(checkpoint at update {info['step']}); a wall clock cannot be continued, so there is "
                         f"nothing to resume (use --force to run it again)")
                return 0
            state = self.restore(info)
            try:
                resume = store.read_state(self.run_dir, info, 0, 0, [], list(hybrid.SIM_FIELDS))
            except KeyError:
                raise ConfigError(f"checkpoint step {info['step']} in {self.run_dir} holds no hybrid simulation "
                                  f"state (written by another method?); use --force to start over") from None
            if c.rank == 0:
                dropped = self.rf.truncate_rows(int(resume["sim_clock"][4]))
                self.record_resume(int(info["step"]), f"resumed the simulated clock at update {info['step']} "
                                                      f"on {c.size} ranks; {dropped} later rows dropped")
            self.say(f"hpcopt: resuming {cfg.run.name} at update {info['step']}")
        grid: Dict[str, list] = {k: [] for k in ("time", "version", "received", "K", "buffer", "train_loss",
                                                 "test_loss", "test_accuracy")}
        w_test = self.w_test

        def on_grid(row):
            theta = row.pop("theta")
            for k, v in row.items():
                grid[k].append(v)
            if c.rank == 0:
                grid["test_loss"].append(float(self.backend.to_host(
                    self.model.loss(theta[None, :], self.X_test, self.y_test, w_test))[0]))
                grid["test_accuracy"].append(float(self.backend.to_host(
                    self.model.accuracy(theta[None, :], self.X_test, self.y_test))[0]))

        def flush_grid():
            if c.rank == 0 and grid["time"]:
                steps = np.asarray(grid["version"], np.int64)
                self.rf.append("metrics", {"step": steps, "wall": np.asarray(grid["time"]),
                                           "train_loss_mean": np.asarray(grid["train_loss"]),
                                           "K": np.asarray(grid["K"], np.float64),
                                           "buffer": np.asarray(grid["buffer"], np.float64),
                                           "received": np.asarray(grid["received"], np.float64)})
                self.rf.append("eval", {"step": steps, "time": np.asarray(grid["time"]),
                                        "test_loss": np.asarray(grid["test_loss"]),
                                        "test_accuracy": np.asarray(grid["test_accuracy"])})
            for v in grid.values():
                v.clear()

        last_ckpt = int(info["step"]) if info is not None else -1
        stop_reason = ""

        def signalled() -> str:
            return f"signal {signal.Signals(self.stop.signal).name}" if self.stop.signal is not None else ""

        first_version = int(info["step"]) if info is not None else 0
        t_session = time.perf_counter()

        def control(version: int, snapshot) -> bool:
            nonlocal last_ckpt, stop_reason
            self.faults.at_step(version, c.rank)
            over_budget = ((cfg.run.stop_after > 0 and version - first_version >= cfg.run.stop_after)
                           or (cfg.run.max_wall > 0 and time.perf_counter() - t_session > cfg.run.max_wall))
            want = self.stop.signal is not None or over_budget
            if c.size > 1:
                want = c.agree(want)
            every = cfg.run.checkpoint_every
            if want or (every and version % every == 0):
                flush_grid()
                self.checkpoint(state, version, extra=snapshot())
                last_ckpt = version
            if want:
                stop_reason = signalled() or ("run.max_wall / run.stop_after" if over_budget
                                              else "a stop request on another rank")
            return want

        import resource
        t0 = time.perf_counter()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        if not wall_clock:
            res = hybrid.simulate(self.ctx, state, on_grid, control, resume)
        elif c.rank == 0:
            res = hybrid.serve(self.ctx, state, on_grid, stop=lambda: self.stop.signal is not None)
            stop_reason = signalled() if res["stopped"] else ""
        else:
            res = {"workers": hybrid.work(self.ctx)}
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / max(1e-9, wall)
        self.state = state
        if not wall_clock and res["stopped"]:
            flush_grid()
            if c.rank == 0:
                self.rf.event(res["updates"], "stopped", f"stopped at update {res['updates']} by {stop_reason}; "
                                                         f"checkpoint written")
            terminated = c.agree(self.stop.signal == signal.SIGTERM)
            code = EXIT_TERMINATED if terminated else EXIT_REQUEUE
            self.say(f"hpcopt: stopped at update {res['updates']} by {stop_reason}; checkpoint written; exit {code} "
                     + ("(ended by SIGTERM: not to be requeued; continue with --resume)" if terminated
                        else "(resume with --resume)"))
            return code
        if wall_clock:  # collect the workers' own statistics
            gathered = c.gather_obj((res.get("workers"), cpu))
            if c.rank == 0:
                res["workers"] = {k: np.array([g[0][k] for g in gathered[1:]]) for k in gathered[1][0]}
                res["workers"]["cpu_fraction"] = np.array([g[1] for g in gathered[1:]])
                res["delayed"] = hybrid.delayed_workers(cfg.run.seed, c.n, cfg.algorithm.delay_fraction)
                res["server_cpu_fraction"] = cpu
            res["updates"] = c.bcast(res.get("updates"))
            stop_reason = c.bcast(stop_reason)
        flush_grid()
        if res["updates"] != last_ckpt:
            self.checkpoint(state, res["updates"], extra=res.get("snapshot"))
        if c.rank == 0:
            ev = store.read_run(self.run_dir).get("eval", {})
            accs = np.asarray(ev.get("test_accuracy", []), np.float64)
            losses = np.asarray(ev.get("test_loss", []), np.float64)
            values, counts = np.unique(res["staleness"], return_counts=True)
            self.rf.write_table("staleness", {"staleness": values, "count": counts})
            self.rf.write_table("updates", {"buffer_size": np.asarray(res["buffer_sizes"], np.int64)})
            self.rf.write_table("workers", {"worker": np.arange(c.n), "delayed": res["delayed"].astype(np.int64),
                                            **{k: v for k, v in res["workers"].items()}})
            summary = {"steps": res["updates"], "updates": res["updates"], "received": res["received"],
                       "dropped": res["dropped"], "applied": res["applied"], "in_flight": res["in_flight"],
                       "simulated_seconds": res["end_time"],
                       "updates_per_second": res["updates"] / max(1e-12, res["end_time"]),
                       "final_test_accuracy": float(accs[-1]) if accs.size else float("nan"),
                       "best_test_accuracy": float(np.nanmax(accs)) if accs.size else float("nan"),
                       "final_test_loss": float(losses[-1]) if losses.size else float("nan"),
                       "wall_seconds": wall,
                       "mean_staleness": float(res["staleness"].mean()) if res["staleness"].size else 0.0,
                       **({"server_cpu_fraction": res["server_cpu_fraction"]} if "server_cpu_fraction" in res else {}),
                       **({"stopped_by": stop_reason} if stop_reason else {}),
                       "bytes_per_node": 0.0, "consensus_distance": 0.0, "steps_this_session": res["updates"]}
            self.rf.set_summary(summary)
            clock = "wall-clock" if wall_clock else "simulated"
            early = f", ended early by {stop_reason}" if stop_reason else ""
            self.rf.event(res["updates"], "finished", f"{clock} {res['end_time']:.3g} s{early}: {res['updates']} "
                                                      f"updates from {res['received']} gradients")
            self.say(summary_table(cfg, summary, c.size) + f"\n  updates / gradients received     "
                     f"{res['updates']} / {res['received']} (mean staleness {summary['mean_staleness']:.2f})"
                     + (f"\n  ended early by {stop_reason} (a wall clock cannot be continued)" if stop_reason else ""))
        return 0

    def loop(self, state, start: int) -> int:
        cfg, c, b = self.cfg, self.comm, self.backend
        T = cfg.run.steps
        buf: Dict[str, list] = {k: [] for k in ("step", "lr", "wall", "train_loss", "held", "rank", "extra", "ops")}
        extra_names = tuple(getattr(self.algo, "METRICS", ()))
        ops = ("mix", "move")
        t_begin = self.t_begin = time.perf_counter()
        last_eval: dict = {}
        best_acc = -np.inf
        stop_reason = ""
        terminated = False
        step = start
        steps_done = 0

        def flush(final: bool = False) -> None:
            if not buf["step"]:
                return
            losses = np.stack(buf["train_loss"], axis=1)  # (local_n, rows)
            held = np.stack(buf["held"], axis=1).astype(np.float64)
            per_node, held = c.allgather_nodes(np.concatenate([losses, held], axis=1)).T.reshape(2, -1, c.n)
            per_rank = c.gather_ranks(np.concatenate([np.stack(buf["rank"], axis=0),
                                                      np.stack(buf["ops"], axis=0)], axis=1).ravel())
            if c.rank == 0:
                rows = len(buf["step"])
                pr = per_rank.reshape(c.size, rows, 4 + len(ops)).transpose(1, 0, 2)
                self.rf.append("metrics", self.node_columns({
                    "step": np.array(buf["step"], np.int64), "lr": np.array(buf["lr"]),
                    "wall": np.array(buf["wall"]), "train_loss": per_node,
                    "train_loss_mean": _active_mean(per_node, held > 0),
                    "compute_seconds": pr[:, :, 0], "comm_seconds": pr[:, :, 1], "bytes_sent": pr[:, :, 2],
                    **{f"bytes_{op}": pr[:, :, 3 + i] for i, op in enumerate(ops)},
                    "wait_seconds": pr[:, :, 3 + len(ops)],
                    **{k: _column([row.get(k) for row in buf["extra"]]) for k in extra_names},
                }))
            for v in buf.values():
                v.clear()

        # run.divergence_factor compares the mean training loss over the active nodes with the
        # mean of that over the first REFERENCE_STEPS steps (kept in checkpoints)
        factor, window = cfg.run.divergence_factor, min(REFERENCE_STEPS, T)
        reference = np.array(self.reference, np.float64)
        diverged = ""
        all_active = None
        for step in range(start, T):
            c.step = step
            self.faults.at_step(step, c.rank)
            bytes0, comm0 = c.totals()
            ops0 = c.bytes_by_op(ops)
            wait0 = c.wait_seconds
            t0 = time.perf_counter()
            lr = optim.lr_at(cfg.optimizer, step, T)
            state, stats = self.algo.step(self.ctx, state, step, lr)
            loss = b.to_host(stats["loss"]).astype(np.float64)
            t1 = time.perf_counter()
            bytes1, comm1 = c.totals()
            buf["step"].append(step)
            buf["lr"].append(lr)
            buf["wall"].append(t1 - t_begin)
            buf["train_loss"].append(loss)
            buf["rank"].append([t1 - t0 - (comm1 - comm0), comm1 - comm0, bytes1 - bytes0])
            buf["ops"].append([b1 - b0 for b0, b1 in zip(ops0, c.bytes_by_op(ops))] + [c.wait_seconds - wait0])
            buf["extra"].append({k: v for k, v in stats.items() if k in extra_names})
            steps_done += 1
            done = step + 1
            if "active" in stats:  # Teleportation: the nodes holding a token
                active = np.asarray(b.to_host(stats["active"]), bool)
                held_loss, held = float(loss[active].sum()), float(active.sum())
            else:
                if all_active is None or all_active.shape != loss.shape:
                    all_active = np.ones(loss.shape, bool)  # made once, never written
                active, held_loss, held = all_active, float(loss.sum()), float(loss.size)
            buf["held"].append(active)
            over_budget = ((cfg.run.max_wall > 0 and time.perf_counter() - t_begin > cfg.run.max_wall)
                           or (cfg.run.stop_after > 0 and steps_done >= cfg.run.stop_after))
            want_stop = self.stop.signal is not None or over_budget
            # a float64 sum of losses is finite exactly when every loss is (finite losses that
            # overflow it would have diverged long before)
            flags = c.allreduce_scalars([float(want_stop), float(not math.isfinite(held_loss)), held_loss, held,
                                         float(self.stop.signal == signal.SIGTERM)])
            mean_loss = flags[2] / max(1.0, flags[3])
            if reference[1] < window:
                reference += (mean_loss, 1.0)
            ref = reference[0] / reference[1]
            if flags[1]:
                diverged = f"a training loss became non-finite at step {step}"
            elif factor > 0 and reference[1] >= window and mean_loss > factor * abs(ref):
                diverged = (f"the mean training loss {mean_loss:.4g} at step {step} exceeded run.divergence_factor "
                            f"= {factor:g} x {ref:.4g}, its mean over steps 0-{window - 1}")
            if diverged:
                break
            if cfg.diagnostics.every and done % cfg.diagnostics.every == 0:
                diag = metrics.diagnose(self.ctx, self.algo, state, done, lr)
                if c.rank == 0:
                    self.rf.append("diag", self.node_columns(
                        {"step": np.array([done], np.int64),
                         **{k: np.array([v]) if np.ndim(v) == 0 else np.asarray(v)[None, :]
                            for k, v in diag.items()}}))
            if cfg.run.eval_every and done % cfg.run.eval_every == 0 and done < T:
                last_eval = self.evaluate(state, done)
                if c.rank == 0:
                    self.rf.append("eval", last_eval)
                    best_acc = np.fmax(best_acc, float(last_eval["test_accuracy"][0]))
            if done % cfg.run.log_every == 0 or done == T:
                flush()
                if c.rank == 0 and cfg.run.progress:
                    rate = steps_done / max(1e-9, time.perf_counter() - t_begin)
                    ev = (f" | test acc {float(last_eval['test_accuracy'][0]):.4f}"
                          if last_eval and "test_accuracy" in last_eval else "")
                    self.say(f"step {done}/{T} ({100 * done / T:.0f}%) train loss {mean_loss:.4g}{ev} | "
                             f"{rate:.1f} steps/s | ETA {_fmt_time((T - done) / rate)}")
            if cfg.run.checkpoint_every and done % cfg.run.checkpoint_every == 0 and done < T:
                flush()
                self.checkpoint(state, done, extra={REFERENCE: reference})
            if done < T and flags[0]:
                stop_reason = (f"signal {signal.Signals(self.stop.signal).name}" if self.stop.signal
                               else ("run.max_wall / run.stop_after" if over_budget
                                     else "a stop request on another rank"))
                terminated = bool(flags[4])  # SIGTERM on any rank: the job ends, it is not requeued
                step = done
                break
        else:
            step = T
        flush()
        self.state = state
        if diverged:
            if c.rank == 0:
                self.rf.event(step, "diverged", diverged)
                self.rf.set_summary({"steps": T, "diverged": 1, "diverged_at_step": step,
                                     "wall_seconds": time.perf_counter() - t_begin,
                                     "steps_this_session": steps_done})
            self.say(f"hpcopt: diverged: {diverged}; run stopped (recorded in run.h5, no checkpoint written)")
            return 0
        if stop_reason:
            self.checkpoint(state, step, extra={REFERENCE: reference})
            code = EXIT_TERMINATED if terminated else EXIT_REQUEUE
            if c.rank == 0:
                self.rf.event(step, "stopped", f"stopped at step {step} by {stop_reason}; checkpoint written")
            self.say(f"hpcopt: stopped at step {step} by {stop_reason}; checkpoint written; exit {code} "
                     + ("(ended by SIGTERM: not to be requeued; continue with --resume)" if terminated
                        else "(resume with --resume)"))
            return code
        final = self.evaluate(state, T)
        wall = time.perf_counter() - t_begin
        if c.rank == 0 and start < T:  # before the checkpoint, like every row up to its step (see truncate)
            self.rf.append("eval", final)
        self.checkpoint(state, T, extra={REFERENCE: reference})
        run = self.run_totals()  # the whole run: every session, not only this one
        if c.rank == 0:
            acc = float(final["test_accuracy"][0])
            accs = np.asarray(store.read_run(self.run_dir)["eval"].get("test_accuracy", []), float)
            best_acc = float(np.nanmax(accs)) if np.isfinite(accs).any() else acc
            summary = {
                "steps": T, "final_test_accuracy": acc, "final_test_loss": float(final["test_loss"][0]),
                "best_test_accuracy": best_acc, "wall_seconds": run["wall_seconds"],
                "wall_seconds_this_session": wall, "steps_this_session": steps_done, "sessions": run["sessions"],
                "consensus_distance": float(final["consensus_distance"][0]),
                "bytes_sent_total": run["bytes_sent_total"],
                "bytes_per_node": run["bytes_sent_total"] / c.n,
                "comm_seconds_max_rank": run["comm_seconds_max_rank"],
            }
            self.rf.set_summary(summary)
            self.rf.event(T, "finished", f"finished {T} steps")
            self.say(summary_table(cfg, summary, c.size))
        return 0


def _in_use(run_dir: str, holder: str) -> str:
    return (f"run directory {run_dir} is in use by {holder} (it holds {store.RUN_LOCK}); a run directory takes "
            f"one run at a time: wait for that run to end, or stop it (scancel, kill)")


def _active_mean(per_node: np.ndarray, held: np.ndarray) -> np.ndarray:
    """Mean training loss of each row over the nodes that computed one (`held`; Teleportation's
    inactive nodes hold NaN); a non-finite loss of an active node still shows."""
    return np.where(held, per_node, 0.0).sum(axis=1) / np.maximum(1, held.sum(axis=1))


def _column(values) -> np.ndarray:
    """Rows of an algorithm metric: scalars (NaN where a step did not report one) or
    equal-length vectors."""
    first = next((v for v in values if v is not None), None)
    if first is None or np.ndim(first) == 0:
        return np.array([np.nan if v is None else float(v) for v in values], np.float64)
    width = len(first)
    return np.stack([np.full(width, np.nan) if v is None else np.asarray(v, np.float64) for v in values])


def method_label(cfg: Config) -> str:
    name = cfg.algorithm.name.value
    return f"{name} ({cfg.topology.name.value})" if name == "dsgd" else name


def summary_table(cfg: Config, s: dict, ranks: int) -> str:
    acc = s["final_test_accuracy"]
    rows = [
        ("method", method_label(cfg)),
        ("nodes x ranks", f"{cfg.nodes.n} x {ranks}"),
        ("steps", str(s["steps"])),
        ("test accuracy (average model)", "n/a" if acc != acc else f"{acc:.4f}"),
        ("test loss (average model)", f"{s['final_test_loss']:.5g}"),
        ("consensus distance", f"{s['consensus_distance']:.3g}"),
        ("wall time", f"{s['wall_seconds']:.1f} s"),
        ("bytes sent per node", f"{s['bytes_per_node'] / 1e6:.2f} MB"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(["summary"] + [f"  {k:<{w}}  {v}" for k, v in rows])


def run_config(cfg: Config, config_text: str, run_dir: Optional[str] = None, resume: bool = False,
               force: bool = False, early=None) -> int:
    run_dir = run_dir or os.path.join(cfg.run.out, cfg.run.name)
    return Runner(cfg, config_text, run_dir, resume=resume, force=force, early=early).run()


def resolved_text(cfg: Config) -> str:
    return config_mod.to_yaml(cfg)



def export(run_dir: str, out: str, node: Optional[int] = None) -> str:
    """Write the average model of a run's newest complete checkpoint (or node `node`'s
    model) as named tensors in a safetensors file that `load_state_dict(strict=True)`
    takes into the same torch module; returns a one-line description.

    The run is rebuilt in this process (one rank holding every node) from the config in
    run.h5, so any run can be exported on a workstation whatever ranks trained it.
    """
    if run_dir.endswith(".h5"):
        run_dir = os.path.dirname(run_dir) or "."
    if not os.path.exists(os.path.join(run_dir, store.RUN_FILE)):
        raise ConfigError(f"RUN = {run_dir!r} is not allowed: no {store.RUN_FILE} there (not a run directory)")
    if not out.endswith(".safetensors"):
        raise ConfigError(f"--out = {out!r} is not allowed: the file name must end in .safetensors")
    text = store.read_run(run_dir)["config_text"]
    cfg = config_mod.from_dict(yaml.safe_load(text))
    if cfg.model.name.value not in config_mod.TORCH_MODELS:
        raise ConfigError(f"model.name = {cfg.model.name.value!r} is not allowed for export: it writes torch "
                          f"models ({', '.join(config_mod.TORCH_MODELS)}); read NumPy models' rows from the "
                          f"checkpoints with hpcopt.store")
    if node is not None and not 0 <= node < cfg.nodes.n:
        raise ConfigError(f"--node = {node} is not allowed: the run has nodes 0..{cfg.nodes.n - 1}")
    info, _ = store.latest(run_dir)
    if info is None:
        raise ConfigError(f"RUN = {run_dir!r} is not allowed: it has no complete checkpoint to export")
    if cfg.algorithm.name.value == "hybrid" and cfg.algorithm.clock.value == "wall":
        cfg = dataclasses.replace(cfg, algorithm=dataclasses.replace(
            cfg.algorithm, clock=config_mod.Clock.simulated))  # the server's model; no workers are needed here
    r = Runner(cfg, text, run_dir, resume=True)
    r.setup()
    r.say = lambda _text: None
    if hasattr(r.algo, "restore_workspace"):  # Teleportation: k from the recorded search
        r.algo.restore_workspace(r.ctx, store.read_run(run_dir).get("tables", {}))
    x0 = r.model.init(cfg.run.seed if cfg.model.init_seed < 0 else cfg.model.init_seed)
    r.algo.init(r.ctx, x0)
    state = r.restore(info)
    r.comm.step = int(info["step"]) - 1
    if node is None:
        row, what = r.backend.to_host(r.algo.average(r.ctx, state)), "average model"
    else:
        row, what = r.backend.to_host(r.algo.node_params(r.ctx, state)[node]), f"node {node}'s model"
    tensors = r.model.state_dict(row)
    from safetensors.numpy import save_file
    tmp = out + ".tmp"
    try:
        save_file(tensors, tmp, metadata={"hpcopt_model": cfg.model.name.value, "step": str(info["step"]),
                                          "run": os.path.abspath(run_dir), "which": what})
        os.replace(tmp, out)
    except OSError as exc:
        raise ConfigError(f"--out = {out!r} is not allowed: cannot write it ({exc.strerror or exc})") from None
    return f"{what} at step {info['step']} ({len(tensors)} tensors, {r.model.d} values) -> {out}"
