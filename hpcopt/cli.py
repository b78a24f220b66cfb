"""Command line: hpcopt run | analyse | sweep | config | export | topology (also `python -m hpcopt`).

Configuration errors print ONE line and exit with status 2 on every rank, before MPI
work starts; only rank 0 prints (the rank is read from the launcher's environment).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback

EXIT_CONFIG = 2
RANK_VARS = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID", "MV2_COMM_WORLD_RANK")
LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE",
                   "MV2_COMM_WORLD_LOCAL_SIZE")


def _launcher_rank() -> int:
    for var in RANK_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _limit_threads() -> None:
    """Give each rank its share of the cores for BLAS (before NumPy is imported)."""
    size = next((int(os.environ[v]) for v in LOCAL_SIZE_VARS if os.environ.get(v, "").isdigit()), 1)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    share = str(max(1, cores // max(1, size)))
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(var, share)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _fail(msg: str, code: int = EXIT_CONFIG) -> int:
    if _launcher_rank() == 0:
        print("hpcopt: " + " ".join(str(msg).splitlines()), file=sys.stderr, flush=True)  # always ONE line
    return code


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`hpcopt: ...`, exit 2) like every other."""

    def error(self, message: str):
        command = self.prog.partition(" ")[2]  # "hpcopt run" -> "run"
        sys.exit(_fail(f"{command + ': ' if command else ''}{message} (see {self.prog} --help)"))


def check_run_dir(run_dir: str, what: str) -> None:
    """Raise ConfigError unless `run_dir` can be (or already is) a directory this process
    may write: checked before any rank starts work, creating nothing."""
    from .config import ConfigError, _show
    where = f"{what} = {_show(run_dir)} is not allowed"
    if not run_dir.strip():
        raise ConfigError(f"{where}: give the path of a run directory")
    if "\0" in run_dir:
        raise ConfigError(f"{where}: a path has no NUL character")
    path = os.path.abspath(run_dir)
    probe = path
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    try:
        base = probe if os.path.isdir(probe) else os.path.dirname(probe)
        name_max, path_max = os.pathconf(base, "PC_NAME_MAX"), os.pathconf(base, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    long = [c for c in path.split(os.sep) if len(os.fsencode(c)) > name_max]
    if long:
        raise ConfigError(f"{where}: the name {_show(long[0])} has {len(os.fsencode(long[0]))} bytes; a file "
                          f"name has at most {name_max}")
    if len(os.fsencode(path)) >= path_max:
        raise ConfigError(f"{where}: the path has {len(os.fsencode(path))} bytes; at most {path_max - 1}")
    if not os.path.isdir(probe):
        kind = "a broken symbolic link" if not os.path.exists(probe) else "a file"
        if probe == path:
            raise ConfigError(f"{where}: it is {kind}, not a directory; give a directory (new or holding a run)")
        raise ConfigError(f"{where}: {probe} is {kind}, not a directory, so nothing can be created under it")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: {'it' if probe == path else probe} is not writable; give a directory "
                          "this user may write")


def builtin_config(name: str):
    """Path of a config shipped with the package (e.g. 'quickstart'), or None."""
    try:
        from . import builtin_configs  # type: ignore[attr-defined]
        base = builtin_configs.__path__[0]
    except ImportError:
        base = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    path = os.path.join(base, name if name.endswith(".yaml") else name + ".yaml")
    return path if os.path.exists(path) else None


class EarlyStop:
    """Records SIGTERM / SIGUSR1 from the first line of `hpcopt run` until the runner's
    StopFlag takes over, so a signal while the config is read, NumPy is imported or the run
    is set up asks for a checkpoint instead of killing the rank (TERM wins over USR1)."""

    def __init__(self):
        self.signal = None

    def __call__(self, signum, frame):  # noqa: ARG002 -- signal handler signature
        if self.signal != signal.SIGTERM:
            self.signal = signum

    def install(self) -> "EarlyStop":
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self)
        return self


def cmd_run(args) -> int:
    early = EarlyStop().install()  # first thing: see EarlyStop
    from . import config
    path = args.config
    if not os.path.exists(path) and builtin_config(path):
        path = builtin_config(path)
    cfg = config.load(path, args.set or [])
    run_dir = args.out if args.out is not None else os.path.join(cfg.run.out, cfg.run.name)
    check_run_dir(run_dir, "--out" if args.out is not None else "run.out/run.name")
    _limit_threads()
    from . import runner
    return runner.run_config(cfg, runner.resolved_text(cfg), run_dir, resume=args.resume, force=args.force,
                             early=early)


def cmd_analyse(args) -> int:
    from . import analyse
    return analyse.main(args)


def cmd_sweep(args) -> int:
    from . import sweep
    path = args.config if os.path.exists(args.config) else (builtin_config(args.config) or args.config)
    return sweep.main(path, args.grid, args.set or [], args.ranks, args.dry_run)


def cmd_topology(args) -> int:
    from . import topology
    topo = topology.build(args.name, args.n, weights=args.weights, p=args.p, seed=args.seed,
                          path=args.path, rows=args.rows, keys=topology.CLI_KEYS)
    s = topology.summary(topo)
    print(f"topology {s['name']} on {s['n']} nodes ({'directed, ' if s['directed'] else ''}"
          f"{s['phases']} phase{'s' if s['phases'] > 1 else ''})")
    deg = f"{s['degree_min']}" if s['degree_min'] == s['degree_max'] else f"{s['degree_min']}..{s['degree_max']}"
    print(f"  degree               {deg}")
    print(f"  spectral gap         {s['spectral_gap']:.6g}" + (
        f"  (one period: {s['spectral_gap_period']:.6g})" if s['phases'] > 1 else ""))
    print(f"  messages per step    {s['edges_per_step']:.0f}")
    print(f"  neighbour weights    {s['weight_min']:.4g} .. {s['weight_max']:.4g}")
    print(f"  self weights         {s['self_weight_min']:.4g} .. {s['self_weight_max']:.4g}")
    if args.matrix:
        if args.n > 4096:
            return _fail(f"--matrix is not allowed with --n = {args.n}: the dense matrix is printed up to 4096 nodes")
        import numpy as np
        with np.printoptions(precision=3, suppress=True, linewidth=200):
            print(topo.mixing_matrix(0))
    return 0


def cmd_export(args) -> int:
    _limit_threads()
    from . import runner
    print(f"hpcopt: exported {runner.export(args.run, args.out, None if args.average else args.node)}")
    return 0


def cmd_config(args) -> int:
    from . import config
    if args.reference:
        print(config.reference_markdown(), end="")
        return 0
    path = args.config if os.path.exists(args.config) else (builtin_config(args.config) or args.config)
    cfg = config.load(path, args.set or [])
    print(config.to_yaml(cfg), end="")
    return 0


def parser() -> argparse.ArgumentParser:
    from .config import TopologyName  # config imports no NumPy (the thread limits come first)
    p = _Parser(prog="hpcopt", description="Distributed and decentralized SGD over MPI.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a config (under mpiexec / srun for several ranks)")
    r.add_argument("config", help="YAML file, or the name of a bundled config such as 'quickstart'")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. optimizer.lr=0.05")
    r.add_argument("--out", help="run directory (default: <run.out>/<run.name>)")
    r.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    r.add_argument("--force", action="store_true", help="replace an existing run in the run directory")
    r.set_defaults(func=cmd_run)
    a = sub.add_parser("analyse", aliases=["analyze"], help="summary table of one or more runs")
    a.add_argument("runs", nargs="+", help="run directories (or run.h5 files)")
    a.add_argument("--per-node", action="store_true", help="final test loss/accuracy of every node")
    a.add_argument("--per-rank", action="store_true", help="compute / comm seconds and bytes per rank")
    a.add_argument("--csv", help="also write the table to this CSV file")
    a.add_argument("--plot", metavar="DIR", help="write PNG plots to DIR (needs matplotlib)")
    a.add_argument("--target", type=float, help="also report step and seconds to this test accuracy")
    a.set_defaults(func=cmd_analyse)
    w = sub.add_parser("sweep", help="run the product of --grid values, one run directory each, then analyse")
    w.add_argument("config", help="YAML file or bundled config name")
    w.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2,...",
                   help="values of one key, e.g. optimizer.lr=0.1,0.05 (repeat for a product)")
    w.add_argument("--set", action="append", metavar="KEY=VALUE", help="override applied to every run")
    w.add_argument("--ranks", type=int, default=1, help="MPI ranks per run (mpiexec -n RANKS)")
    w.add_argument("--dry-run", action="store_true", help="print the commands only")
    w.set_defaults(func=cmd_sweep)
    c = sub.add_parser("config", help="print a config with every default filled in, or the key reference")
    c.add_argument("config", nargs="?", default="quickstart", help="YAML file or bundled config name")
    c.add_argument("--set", action="append", metavar="KEY=VALUE")
    c.add_argument("--reference", action="store_true", help="the table of every key (Markdown)")
    c.set_defaults(func=cmd_config)
    e = sub.add_parser("export", help="write a run's trained torch model as a safetensors file")
    e.add_argument("run", help="run directory")
    which = e.add_mutually_exclusive_group()
    which.add_argument("--average", action="store_true", help="the average model (default)")
    which.add_argument("--node", type=int, help="the model of node I")
    e.add_argument("--out", required=True, help="FILE.safetensors")
    e.set_defaults(func=cmd_export)
    t = sub.add_parser("topology", help="degree, spectral gap and weights of a graph")
    t.add_argument("name", choices=[m.value for m in TopologyName])
    t.add_argument("--n", type=int, required=True, help="number of nodes")
    t.add_argument("--weights", choices=["metropolis", "uniform"], default="metropolis")
    t.add_argument("--p", type=float, default=0.3, help="erdos_renyi edge probability")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--path", default="", help="edge-list file")
    t.add_argument("--rows", type=int, default=0, help="torus rows")
    t.add_argument("--matrix", action="store_true", help="print the mixing matrix")
    t.set_defaults(func=cmd_topology)
    return p


def _finalize_mpi() -> None:
    if "mpi4py.MPI" in sys.modules:  # only when this run started MPI
        from .comm import finalize_if_started
        finalize_if_started()


def _user_error(exc: BaseException) -> bool:
    """Errors reported as one line with exit status 2 (imported late: NumPy must not load
    before the per-rank thread limits are set)."""
    from .backend import BackendError
    from .config import ConfigError
    from .kernels import KernelError
    return isinstance(exc, (ConfigError, BackendError, KernelError))


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        code = args.func(args)
        if code:
            _finalize_mpi()
        return code
    except KeyboardInterrupt:
        if "mpi4py.MPI" in sys.modules:  # a rank that leaves must take the job with it
            from .comm import abort_if_started
            abort_if_started(130)
        return 130
    except Exception as exc:  # noqa: BLE001 -- user errors: one line; the rest: stop every rank
        if _user_error(exc):
            code = _fail(str(exc))
            _finalize_mpi()
            return code
        traceback.print_exc()
        if "mpi4py.MPI" in sys.modules:
            from .comm import abort_if_started
            abort_if_started(1)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
