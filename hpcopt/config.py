"""YAML run configuration -> frozen dataclasses, with validation and dotted overrides.

Every key is documented in the README ("Config reference"). Loading is strict: an
unknown key, a value of the wrong type or an impossible value raises `ConfigError`
with ONE line naming the key, the value and what is allowed. The CLI turns that into
exit status 2 on every rank, before any training starts.
"""
from __future__ import annotations

import dataclasses
import enum
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Tuple

import yaml


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line (exit status 2)."""


class Dataset(str, enum.Enum):
    quadratic = "quadratic"
    classification = "classification"
    digits = "digits"
    breast_cancer = "breast_cancer"
    libsvm = "libsvm"
    npz = "npz"
    hdf5 = "hdf5"
    mnist = "mnist"
    fashion_mnist = "fashion_mnist"
    cifar10 = "cifar10"


IMAGE_DATASETS = ("mnist", "fashion_mnist", "cifar10")


class Partition(str, enum.Enum):
    iid = "iid"
    dirichlet = "dirichlet"
    shards = "shards"


class Model(str, enum.Enum):
    auto = "auto"
    quadratic = "quadratic"
    logistic = "logistic"
    softmax = "softmax"
    mlp = "mlp"
    torch_mlp = "torch_mlp"
    cnn = "cnn"
    lenet = "lenet"
    vgg11 = "vgg11"
    resnet20 = "resnet20"
    torch = "torch"


TORCH_MODELS = ("torch_mlp", "cnn", "lenet", "vgg11", "resnet20", "torch")


class Vectorize(str, enum.Enum):
    auto = "auto"
    vmap = "vmap"
    loop = "loop"


class Norm(str, enum.Enum):
    group = "group"
    batch = "batch"


class Activation(str, enum.Enum):
    relu = "relu"
    tanh = "tanh"


class Algorithm(str, enum.Enum):
    sync_sgd = "sync_sgd"
    dsgd = "dsgd"
    local_sgd = "local_sgd"
    teleport = "teleport"
    hybrid = "hybrid"


class Threshold(str, enum.Enum):
    step = "step"
    linear = "linear"
    constant = "constant"


class Aggregate(str, enum.Enum):
    mean = "mean"
    sum = "sum"


class Clock(str, enum.Enum):
    simulated = "simulated"
    wall = "wall"


class Scaling(str, enum.Enum):
    identity = "identity"
    rmsprop = "rmsprop"
    adam = "adam"
    oasis = "oasis"


class ScalingMode(str, enum.Enum):
    global_ = "global"
    local = "local"


class SyncMoments(str, enum.Enum):
    average = "average"
    keep = "keep"


class Order(str, enum.Enum):
    combine_then_adapt = "combine_then_adapt"
    adapt_then_combine = "adapt_then_combine"


class Schedule(str, enum.Enum):
    constant = "constant"
    step = "step"
    cosine = "cosine"
    inverse = "inverse"


class TopologyName(str, enum.Enum):
    ring = "ring"
    torus = "torus"
    exponential = "exponential"
    exponential_directed = "exponential_directed"
    one_peer_exponential = "one_peer_exponential"
    complete = "complete"
    star = "star"
    hypercube = "hypercube"
    erdos_renyi = "erdos_renyi"
    edgelist = "edgelist"


class Weights(str, enum.Enum):
    metropolis = "metropolis"
    uniform = "uniform"


class DeviceKind(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"


class Tristate(str, enum.Enum):
    auto = "auto"
    yes = "yes"
    no = "no"


class Noise(str, enum.Enum):
    none = "none"
    fixed = "fixed"
    matched = "matched"


class NodeMetrics(str, enum.Enum):
    auto = "auto"
    all = "all"
    sample = "sample"
    none = "none"


class KernelMode(str, enum.Enum):
    auto = "auto"
    compiled = "compiled"
    numpy = "numpy"


def _f(default: Any, help: str, **rules: Any) -> Any:
    """A dataclass field carrying its documentation and its range rules."""
    kw = {"default_factory": (lambda: default)} if isinstance(default, (list, tuple)) else {
        "default": default}
    return field(metadata={"help": help, **rules}, **kw)


@dataclass(frozen=True)
class RunCfg:
    name: str = _f("", "run name; the run directory is OUT/NAME (default: the config file stem)")
    out: str = _f("runs", "parent directory of run directories")
    steps: int = _f(1000, "number of optimization steps", gt=0)
    seed: int = _f(0, "seed of every random stream (keyed by seed, node, step)", ge=0, le=2**64 - 1)
    eval_every: int = _f(100, "evaluate test loss/accuracy every this many steps (0: only at the end)", ge=0)
    log_every: int = _f(50, "flush metrics to run.h5 and print progress every this many steps", gt=0)
    checkpoint_every: int = _f(0, "write a checkpoint every this many steps (0: only at the end and on stop)", ge=0)
    keep_checkpoints: int = _f(2, "how many complete checkpoints to keep", ge=1)
    max_wall: float = _f(0.0, "wall-clock budget in seconds; on expiry checkpoint and exit 75 (0: none)", ge=0)
    stop_after: int = _f(0, "stop like on a signal (checkpoint, exit 75) after this many steps of this "
                            "session (0: off)", ge=0)
    divergence_factor: float = _f(0.0, "stop as diverged when the mean training loss over the active nodes exceeds "
                                       "this multiple of its mean over the first 10 steps (0: only on non-finite loss)",
                                  ge=0)
    progress: bool = _f(True, "print a progress line with ETA on rank 0")
    node_metrics: NodeMetrics = _f(NodeMetrics.auto, "per-node columns in run.h5: all (every node), sample (the "
                                                     "run.node_sample nodes of a fixed random sample; per-node "
                                                     "test evaluation of those only), none (no per-node columns "
                                                     "or per-node evaluation); every mode also writes <name>_stats "
                                                     "(mean, std, min, max, quantiles); auto: all up to 1024 nodes, "
                                                     "sample above")
    node_sample: int = _f(1024, "nodes in the fixed sample of run.node_metrics: sample", gt=0)


@dataclass(frozen=True)
class NodesCfg:
    n: int = _f(4, "number of nodes (workers); placed on ranks in contiguous blocks", gt=0)


@dataclass(frozen=True)
class DataCfg:
    dataset: Dataset = _f(Dataset.digits, "data set")
    path: str = _f("", "file for libsvm / npz / hdf5 data sets; directory of the IDX (mnist, fashion_mnist) or "
                       "cifar-10-batches-bin files (mnist without a path: the installed 5,000-image sample)")
    seed: int = _f(0, "seed of data generation, train/test split and partition", ge=0)
    partition: Partition = _f(Partition.iid, "how samples are split over nodes (not used by quadratic)")
    alpha: float = _f(0.5, "Dirichlet concentration for partition: dirichlet", gt=0)
    shards_per_node: int = _f(2, "label shards per node for partition: shards", gt=0)
    batch_size: int = _f(32, "minibatch per node and step (0: the node's whole data)", ge=0)
    test_fraction: float = _f(0.2, "fraction of samples held out for test", ge=0, lt=1)
    val_fraction: float = _f(0.1, "teleport with k auto: fraction of each node's training samples carved out "
                                  "(from data.seed) as the k search's validation split and not trained on; "
                                  "other runs train on everything", ge=0, lt=1)
    standardize: bool = _f(False, "standardize features with train statistics")
    samples_per_node: int = _f(64, "synthetic data: samples per node", gt=0)
    dim: int = _f(10, "synthetic data: number of features", gt=0)
    classes: int = _f(2, "classification: number of classes", ge=2)
    separation: float = _f(2.0, "classification: distance between class means", ge=0)
    heterogeneity: float = _f(1.0, "quadratic: spread zeta of the nodes' own optima", ge=0)
    noise: float = _f(0.1, "quadratic: label noise; classification: unused", ge=0)
    feature_scale: float = _f(0.0, "classification: feature j scaled by 10**(s*(j/(dim-1)-0.5)); 0: none", ge=0)
    augment: bool = _f(False, "image data: random crop (padding 4) and horizontal flip of every training sample, "
                              "drawn from the (seed, node, step) streams")


@dataclass(frozen=True)
class ModelCfg:
    name: Model = _f(Model.auto, "model (auto: quadratic for quadratic data, logistic for 2 classes, else softmax)")
    hidden: Tuple[int, ...] = _f((64,), "mlp: hidden layer widths")
    activation: Activation = _f(Activation.tanh, "mlp: activation")
    l2: float = _f(0.0, "L2 penalty l2/2 * ||x||^2 on all parameters", ge=0)
    init_scale: float = _f(1.0, "mlp: scale of the Glorot-uniform initialisation", ge=0)
    init_seed: int = _f(-1, "seed of the initial parameters (-1: run.seed); fix it to share x0 across seeds", ge=-1)
    factory: str = _f("", "model torch: 'package.module:function' or 'path/to/file.py:function', a function "
                          "(input_shape, classes) -> torch.nn.Module")
    vectorize: Vectorize = _f(Vectorize.auto, "torch models: vmap (all local nodes in one call), loop (one call per "
                                              "node) or auto (vmap, falling back to loop with a logged reason)")
    norm: Norm = _f(Norm.group, "cnn / lenet / vgg11 / resnet20: GroupNorm or BatchNorm (per-node running "
                                "statistics, needs vectorize loop)")
    eval_batch: int = _f(1024, "torch models: samples per forward pass when evaluating (bounds memory)", gt=0)
    threads: int = _f(0, "torch models on the CPU: threads per rank (0: the host's cores / its ranks); fix it for "
                         "bit-identical results on any number of ranks", ge=0)


@dataclass(frozen=True)
class AlgorithmCfg:
    name: Algorithm = _f(Algorithm.dsgd, "method family")
    order: Order = _f(Order.combine_then_adapt, "dsgd: combine_then_adapt (DPSGD) or adapt_then_combine")
    overlap: bool = _f(True, "dsgd combine_then_adapt: compute gradients while neighbour rows are in flight")
    local_steps: int = _f(1, "local_sgd: local steps H between averages (the first round's H with a schedule)",
                          gt=0)
    local_steps_final: int = _f(0, "local_sgd: H grows linearly from local_steps to this over the run "
                                   "(0: H constant)", ge=0)
    scaling: ScalingMode = _f(ScalingMode.global_, "local_sgd: global (D_hat frozen per round, from averaged "
                                                   "statistics) or local (each node its own D_hat every step)")
    sync_moments: SyncMoments = _f(SyncMoments.average, "local_sgd with local scaling: average the moments at "
                                                        "synchronisation or keep them local")
    k: int = _f(0, "teleport: number of tokens (active nodes) per step; auto (or 0): search k first",
                ge=0, aliases={"auto": 0})
    teleport: bool = _f(True, "teleport: move the tokens to freshly sampled nodes every step (false: ablation)")
    search_steps: int = _f(200, "teleport with k auto: iterations T of each of the two search batches", gt=0)
    threshold: Threshold = _f(Threshold.step, "hybrid: K schedule: step (K0 + inc * floor(received / k_every)), "
                                              "linear in time (to W at k_ramp seconds) or constant (K0)")
    k0: int = _f(1, "hybrid: starting (or constant) threshold K0; 1 = asynchronous, nodes.n = synchronous", gt=0)
    k_increment: int = _f(1, "hybrid, threshold step: K grows by this", gt=0)
    k_every: int = _f(300, "hybrid, threshold step: gradients received per increment (S)", gt=0)
    k_ramp: float = _f(60.0, "hybrid, threshold linear: seconds until K = W", gt=0)
    aggregate: Aggregate = _f(Aggregate.mean, "hybrid: apply the mean or the sum of the buffered gradients")
    clock: Clock = _f(Clock.simulated, "hybrid: simulated (deterministic discrete-event clock) or wall (rank 0 "
                                       "serves, one worker per other rank: mpiexec -n nodes.n+1)")
    compute_time: float = _f(0.01, "hybrid: seconds one gradient takes (wall clock: shorter ones are padded)",
                             gt=0)
    delay_fraction: float = _f(0.5, "hybrid: fraction of workers with injected delays", ge=0, le=1)
    delay_std: float = _f(0.25, "hybrid: injected delay per gradient |N(0, s)| seconds on delayed workers", ge=0)
    budget_seconds: float = _f(0.0, "hybrid: (simulated) seconds of training (0: use budget_gradients)", ge=0)
    budget_gradients: int = _f(0, "hybrid: gradients received before stopping (0: use budget_seconds)", ge=0)
    time_grid: float = _f(0.0, "hybrid: seconds between metric rows (0: budget / 50)", ge=0)
    noise: Noise = _f(Noise.none, "sync_sgd: add isotropic Gaussian noise to the averaged gradient: none, fixed "
                                  "(norm noise_std) or matched (norm = a run's /diag/grad_deviation)")
    noise_std: float = _f(0.0, "sync_sgd with noise fixed: expected norm of the added noise", ge=0)
    noise_run: str = _f("", "sync_sgd with noise matched: run directory (or run.h5) of a DPSGD run with diagnostics")


@dataclass(frozen=True)
class OptimizerCfg:
    lr: float = _f(0.1, "step size", gt=0)
    schedule: Schedule = _f(Schedule.constant, "step-size schedule")
    warmup_steps: int = _f(0, "linear warm-up from lr/warmup_steps to lr", ge=0)
    milestones: Tuple[int, ...] = _f((), "schedule: step -- steps at which lr is multiplied by gamma")
    gamma: float = _f(0.1, "schedule: step -- factor", gt=0)
    min_lr: float = _f(0.0, "schedule: cosine -- final step size", ge=0)
    decay: float = _f(100.0, "schedule: inverse -- lr / (1 + t / decay)", gt=0)
    momentum: float = _f(0.0, "heavy-ball momentum", ge=0, lt=1)
    nesterov: bool = _f(False, "Nesterov momentum")
    weight_decay: float = _f(0.0, "coupled weight decay added to the gradient", ge=0)
    scaling: Scaling = _f(Scaling.identity, "local_sgd: diagonal scaling (identity, rmsprop, adam, oasis)")
    beta1: float = _f(0.9, "adam: first-moment EMA weight", ge=0, lt=1)
    beta2: float = _f(0.999, "rmsprop / adam / oasis: EMA weight of the scaling statistic", ge=0, lt=1)
    alpha: float = _f(0.0, "scaling: clip the diagonal below, D_hat = max(alpha, D)", ge=0)
    eps: float = _f(1e-8, "rmsprop / adam: added to the clipped diagonal", ge=0)
    bias_correction: bool = _f(True, "adam: bias-corrected moments")
    probes: int = _f(10, "rmsprop / oasis: statistics averaged at x0 for the warm start", gt=0)
    shared_probes: bool = _f(False, "oasis with global scaling: one Rademacher probe per step shared by all "
                                    "nodes (false: each node its own, keyed by seed, node and step)")


@dataclass(frozen=True)
class TopologyCfg:
    name: TopologyName = _f(TopologyName.ring, "communication graph (dsgd)")
    weights: Weights = _f(Weights.metropolis,
                          "mixing weights: metropolis (Metropolis-Hastings) or uniform (regular graphs)")
    p: float = _f(0.3, "erdos_renyi: edge probability", gt=0, le=1)
    seed: int = _f(0, "erdos_renyi: graph seed", ge=0)
    path: str = _f("", "edgelist: file with one 'i j' pair per line (0-based)")
    rows: int = _f(0, "torus: grid rows (0: the divisor of n closest to sqrt(n))", ge=0)


@dataclass(frozen=True)
class DeviceCfg:
    kind: DeviceKind = _f(DeviceKind.auto, "auto (GPU when CuPy sees one), cpu or gpu")
    cuda_aware: Tristate = _f(Tristate.auto, "hand device buffers to MPI directly (auto: detect)")
    kernels: KernelMode = _f(KernelMode.auto, "fused kernels: auto, compiled (required) or numpy (references)")


@dataclass(frozen=True)
class CommCfg:
    timeout: float = _f(300.0, "seconds a wait on a peer may take before the job is aborted", gt=0)
    spin: float = _f(0.01, "seconds a wait tests and yields the core before it starts sleeping", ge=0)
    poll: float = _f(2e-4, "longest sleep between polls of a pending request (seconds)", gt=0)
    blocking_bytes: int = _f(-1, "all-reduces of at most this many bytes, and mixes sending at most this many, "
                             "use the MPI library's blocking call (a watchdog thread enforces comm.timeout); larger "
                             "ones wait politely. 0: always polite; -1 (auto): 1 MiB where every host has a core "
                             "per rank, 0 where ranks share cores", ge=-1)


@dataclass(frozen=True)
class DiagnosticsCfg:
    every: int = _f(0, "compute the landscape diagnostics every this many steps (0: off)", ge=0)
    batch_size: int = _f(256, "fixed evaluation batch per node for the diagnostics (0: the node's whole data)", ge=0)
    power_iters: int = _f(20, "power iterations for the top Hessian eigenvalue (0: skip it)", ge=0)


@dataclass(frozen=True)
class Config:
    run: RunCfg = field(default_factory=RunCfg)
    nodes: NodesCfg = field(default_factory=NodesCfg)
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    algorithm: AlgorithmCfg = field(default_factory=AlgorithmCfg)
    optimizer: OptimizerCfg = field(default_factory=OptimizerCfg)
    topology: TopologyCfg = field(default_factory=TopologyCfg)
    device: DeviceCfg = field(default_factory=DeviceCfg)
    comm: CommCfg = field(default_factory=CommCfg)
    diagnostics: DiagnosticsCfg = field(default_factory=DiagnosticsCfg)


# ---------------------------------------------------------------------------------------
# conversion and checking


def _show(value: Any) -> str:
    """A value as an error message shows it: one line of at most 60 characters, made in
    bounded time whatever the value is (a billion-element list behind YAML aliases, a
    deeply nested one, an integer of thousands of digits): containers are abbreviated
    level by level instead of being stringified whole and cut afterwards."""
    import reprlib
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset, r.maxfrozenset = 3, 8, 8, 6, 6, 6
    r.maxstring, r.maxlong, r.maxother = 60, 40, 60
    try:
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 10000:
            text = f"<an integer of about {int(value.bit_length() * 0.30103) + 1} digits>"
        elif isinstance(value, (str, int, list, tuple, dict, set, frozenset)) and not isinstance(value, bool):
            text = r.repr(value)
        else:
            text = str(value)
    except (ValueError, RecursionError):  # e.g. int -> str beyond Python's digit limit
        text = f"<{type(value).__name__}>"
    text = " ".join(text.splitlines())
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key} = {_show(value)} is not allowed: {allowed}")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(args[0], value, key)
    if origin in (tuple, Tuple):
        (inner, _ellipsis) = typing.get_args(tp)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise _bad(key, value, f"expected a list of {inner.__name__}")
        return tuple(_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        names = [m.value for m in tp]
        if isinstance(value, bool) and "yes" in names:  # YAML 1.1 reads yes/no as booleans
            value = "yes" if value else "no"
        if isinstance(value, str) and value in names:
            return tp(value)
        raise _bad(key, value, "choose one of " + ", ".join(names))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _bad(key, value, "expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _bad(key, value, "expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _bad(key, value, "expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _bad(key, value, "expected a string")
    raise TypeError(f"unsupported config type {tp!r}")  # programming error


def _check_rules(key: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if v != v or v in (float("inf"), float("-inf")):
            raise _bad(key, value, "must be a finite number")
        for rule, test, word in (("gt", v.__gt__, ">"), ("ge", v.__ge__, ">="),
                                 ("lt", v.__lt__, "<"), ("le", v.__le__, "<=")):
            if rule in meta and not test(meta[rule]):
                raise _bad(key, value, f"must be {word} {meta[rule]}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _bad(prefix or "config", data, "expected a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            raise ConfigError(f"{key}: unknown key; allowed keys: {', '.join(fields)}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v, key)
        else:
            v = fields[k].metadata.get("aliases", {}).get(v, v) if isinstance(v, str) else v
            kwargs[k] = _coerce(tp, v, key)
            _check_rules(key, kwargs[k], fields[k].metadata)
    return cls(**kwargs)


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def validate(cfg: Config) -> None:
    """Cross-field checks that need more than one key."""
    n = cfg.nodes.n
    topo = cfg.topology
    if cfg.algorithm.name is Algorithm.teleport:
        if cfg.algorithm.k > n:
            raise _bad("algorithm.k", cfg.algorithm.k, f"at most nodes.n = {n} tokens")
        if cfg.optimizer.momentum > 0:
            raise _bad("optimizer.momentum", cfg.optimizer.momentum, "teleport takes plain SGD steps (momentum 0)")
        if cfg.algorithm.k == 0 and topo.name not in (TopologyName.ring, TopologyName.complete,
                                                       TopologyName.exponential, TopologyName.exponential_directed,
                                                       TopologyName.one_peer_exponential):
            raise _bad("topology.name", topo.name.value, "with algorithm.k auto the token graph must work for "
                                                          "every k: ring, complete, exponential, "
                                                          "exponential_directed, one_peer_exponential")
        if cfg.algorithm.k == 0 and cfg.data.val_fraction <= 0:
            raise _bad("data.val_fraction", cfg.data.val_fraction, "algorithm.k auto picks k on a validation split "
                                                                   "carved from the training data; needs > 0")
        n = cfg.algorithm.k or n  # the token graph has k vertices
    if topo.name is TopologyName.hypercube and not _is_pow2(n):
        raise _bad("topology.name", topo.name.value, f"hypercube needs a power of 2 vertices (here {n})")
    if topo.name is TopologyName.edgelist and not topo.path:
        raise _bad("topology.path", topo.path, "edgelist needs the path of an edge-list file")
    if topo.rows and n % topo.rows:
        raise _bad("topology.rows", topo.rows, f"must divide nodes.n = {n}")
    if cfg.data.dataset in (Dataset.libsvm, Dataset.npz, Dataset.hdf5) and not cfg.data.path:
        raise _bad("data.path", cfg.data.path, f"data.dataset {cfg.data.dataset.value} needs a file path")
    if cfg.data.dataset is Dataset.quadratic and cfg.model.name not in (Model.auto, Model.quadratic):
        raise _bad("model.name", cfg.model.name.value, "quadratic data go with model auto or quadratic")
    torch_model = cfg.model.name.value in TORCH_MODELS
    if cfg.model.name is Model.torch and not cfg.model.factory:
        raise _bad("model.factory", cfg.model.factory, "model torch needs 'package.module:function' or "
                                                       "'file.py:function'")
    if cfg.model.factory and cfg.model.name is not Model.torch:
        raise _bad("model.factory", cfg.model.factory, "a factory is used by model.name: torch only")
    if cfg.data.dataset.value in IMAGE_DATASETS and cfg.model.name.value in ("quadratic", "logistic"):
        raise _bad("model.name", cfg.model.name.value, f"{cfg.data.dataset.value} has 10 classes; use softmax, mlp "
                                                       "or a torch model")
    if cfg.model.norm is Norm.batch:
        if cfg.model.name.value not in ("cnn", "lenet", "vgg11", "resnet20"):
            raise _bad("model.norm", "batch", "BatchNorm is an option of cnn, lenet, vgg11 and resnet20")
        if cfg.model.vectorize is Vectorize.vmap:
            raise _bad("model.vectorize", "vmap", "BatchNorm's running statistics cannot be updated under vmap; "
                                                  "use model.vectorize: loop (or auto) or model.norm: group")
        if cfg.optimizer.weight_decay > 0:
            raise _bad("optimizer.weight_decay", cfg.optimizer.weight_decay, "with BatchNorm the decay would shrink "
                                                                             "the running statistics; use model.l2 "
                                                                             "(parameters only)")
        if cfg.algorithm.name is Algorithm.hybrid:
            raise _bad("model.norm", "batch", "the hybrid server never sees its workers' running statistics; "
                                              "use model.norm: group")
        if cfg.algorithm.noise is not Noise.none:
            raise _bad("model.norm", "batch", "the noise baseline would perturb the running statistics; "
                                              "use model.norm: group")
    if cfg.data.augment and cfg.data.dataset.value not in IMAGE_DATASETS:
        raise _bad("data.augment", True, "augmentation is for image data sets: " + ", ".join(IMAGE_DATASETS))
    if torch_model and cfg.data.dataset is Dataset.quadratic:
        raise _bad("model.name", cfg.model.name.value, "torch models are classifiers; quadratic data are regression")
    if any(h <= 0 for h in cfg.model.hidden):
        raise _bad("model.hidden", list(cfg.model.hidden), "widths must be > 0")
    ms = cfg.optimizer.milestones
    if any(m <= 0 for m in ms) or list(ms) != sorted(ms):
        raise _bad("optimizer.milestones", list(ms), "must be increasing positive steps")
    alg = cfg.algorithm
    if alg.name is Algorithm.hybrid:
        if alg.budget_seconds <= 0 and alg.budget_gradients <= 0:
            raise _bad("algorithm.budget_seconds", alg.budget_seconds, "hybrid needs budget_seconds > 0 or "
                                                                       "budget_gradients > 0")
        if alg.k0 > n:
            raise _bad("algorithm.k0", alg.k0, f"at most nodes.n = {n} (the number of workers)")
    if alg.noise is not Noise.none and alg.name is not Algorithm.sync_sgd:
        raise _bad("algorithm.noise", alg.noise.value, "the noise baseline is for algorithm.name: sync_sgd")
    if alg.noise is Noise.fixed and alg.noise_std <= 0:
        raise _bad("algorithm.noise_std", alg.noise_std, "noise fixed needs noise_std > 0")
    if alg.noise is Noise.matched and not alg.noise_run:
        raise _bad("algorithm.noise_run", alg.noise_run, "noise matched needs the run directory of a DPSGD run "
                                                          "with diagnostics")
    opt = cfg.optimizer
    if opt.scaling is not Scaling.identity and cfg.algorithm.name is not Algorithm.local_sgd:
        raise _bad("optimizer.scaling", opt.scaling.value, "diagonal scaling is used by algorithm.name: local_sgd")
    if opt.scaling is not Scaling.identity and opt.momentum > 0:
        raise _bad("optimizer.momentum", opt.momentum, "momentum goes with optimizer.scaling: identity only")
    if opt.scaling in (Scaling.rmsprop, Scaling.adam) and opt.alpha <= 0 and opt.eps <= 0:
        raise _bad("optimizer.eps", opt.eps, f"{opt.scaling.value} with optimizer.alpha = 0 needs eps > 0 (a "
                                             f"coordinate whose gradient is always 0, e.g. a BatchNorm statistic "
                                             f"or a dead unit, would step by 0/0)")
    if opt.scaling is Scaling.oasis and opt.alpha <= 0:
        raise _bad("optimizer.alpha", opt.alpha, "oasis needs alpha > 0 (the Hessian diagonal may be 0 or negative)")
    if cfg.optimizer.nesterov and cfg.optimizer.momentum == 0:
        raise _bad("optimizer.nesterov", True, "needs optimizer.momentum > 0")


def from_dict(data: Any, default_name: str = "run") -> Config:
    cfg = _build(Config, data, "")
    if not cfg.run.name:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=default_name))
    validate(cfg)
    check_run_name(cfg)
    return cfg


def parse_override(text: str) -> Tuple[list, Any]:
    """'optimizer.lr=0.05' -> (['optimizer', 'lr'], 0.05); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {_show(text)} is not allowed: expected KEY=VALUE, e.g. optimizer.lr=0.05")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {_show(text)} is not allowed: expected SECTION.KEY=VALUE, e.g. optimizer.lr=0.05")
    try:
        value = parse_yaml(raw, f"--set {_show(text)}", parts) if raw.strip() else ""
    except _YAMLSyntaxError:
        value = raw
    return parts, value


def apply_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (data or {}).items()}
    for text in overrides:
        (section, key), value = parse_override(text)
        sec = data.setdefault(section, {})
        if sec is None:  # "section:" with nothing under it
            sec = data[section] = {}
        if not isinstance(sec, dict):
            raise _bad(section, sec, "expected a mapping of keys to values")
        sec[key] = value
    return data


# ---------------------------------------------------------------------------------------
# reading YAML and text files, with the work bounded before anything is built

MAX_CONFIG_BYTES = 1 << 20  # a config is a few kilobytes
MAX_CONFIG_DEPTH = 20  # SECTION: {KEY: [values]} is 3 levels deep
MAX_CONFIG_VALUES = 10_000  # keys, scalars, lists, mappings; an alias counts its whole value at every use
MAX_KEY_CHARS = 200
MAX_INT_CHARS = 100


class _YAMLSyntaxError(ConfigError):
    """Text that is not YAML at all (`--set` then takes the text as a plain string)."""


def read_text(path: str, limit: int) -> Tuple[typing.Optional[str], str]:
    """(text, "") for a UTF-8 file of at most `limit` bytes (a leading BOM is dropped),
    else (None, why) with `why` a phrase for an error message. Reads at most limit + 1
    bytes, so /dev/zero or a pipe cannot make it run away. OSError propagates."""
    with open(path, "rb") as fh:
        raw = fh.read(limit + 1)
    if len(raw) > limit:
        size = f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit} bytes"
        return None, f"it is larger than {size}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        return None, (f"it is not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line}, column {col}); "
                      f"save it as UTF-8")
    return (text[1:] if text.startswith("\ufeff") else text), ""


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader with bounds checked while composing, before anything is built:
    nesting depth, the number of values (an alias counts its whole value at every use, so
    a 'billion laughs' file stops at once), duplicate keys (safe_load keeps the last one
    silently), key length and integer length (Python refuses int(s) beyond 4300 digits)."""

    def __init__(self, text: str, where: str, path: typing.Sequence[str] = ()):
        super().__init__(text)
        self.where = where
        self.depth = 0
        self.total = 0  # values composed so far, every use of an alias counted
        self.info: typing.Dict[int, Tuple[int, int]] = {}  # id(collection node) -> (values, depth)
        self.keys: typing.Dict[int, typing.Dict[Tuple[str, str], int]] = {}  # id(mapping) -> key -> line
        self.path: typing.List[str] = list(path)  # keys of the mappings being composed

    def fail(self, mark: Any, what: str, allowed: str) -> ConfigError:
        return ConfigError(f"{self.where}: {what} at line {mark.line + 1} is not allowed: {allowed}")

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.depth >= MAX_CONFIG_DEPTH:
            raise self.fail(self.peek_event().start_mark, f"nesting deeper than {MAX_CONFIG_DEPTH} levels",
                            "a config is SECTION: {KEY: VALUE}, a value at most a list")
        event = self.peek_event()
        target = self.anchors.get(event.anchor) if isinstance(event, yaml.AliasEvent) else None
        if target is not None and not isinstance(target, yaml.ScalarNode) and id(target) not in self.info:
            raise self.fail(event.start_mark, f"the alias *{event.anchor} inside its own anchor's value",
                            "a value cannot contain itself")
        self.total += self.info.get(id(target), (1, 0))[0] if target is not None else 1
        if self.total > MAX_CONFIG_VALUES:  # counted as the parser goes: a huge file stops early too
            raise self.fail(event.start_mark, f"more than {MAX_CONFIG_VALUES} values (every use of an alias "
                                              "counted)", "a config holds a few hundred values")
        named = isinstance(parent, yaml.MappingNode) and isinstance(index, yaml.ScalarNode)
        self.depth += 1
        if named:
            self.path.append(str(index.value))
        try:
            node = super().compose_node(parent, index)
        finally:
            self.depth -= 1
            if named:
                self.path.pop()
        self._count(node)
        if isinstance(parent, yaml.MappingNode) and index is None:
            self._check_key(parent, node)
        return node

    def _count(self, node: Any) -> None:
        if isinstance(node, yaml.ScalarNode) or id(node) in self.info:  # a scalar, or an alias
            return
        children = node.value if isinstance(node, yaml.SequenceNode) else [x for kv in node.value for x in kv]
        kids = [self.info.get(id(c), (1, 0)) for c in children]
        values = 1 + sum(v for v, _ in kids)
        depth = 1 + max((d for _, d in kids), default=0)
        self.info[id(node)] = (values, depth)
        if depth > MAX_CONFIG_DEPTH:
            raise self.fail(node.start_mark, f"nesting deeper than {MAX_CONFIG_DEPTH} levels (through aliases)",
                            "a config is SECTION: {KEY: VALUE}, a value at most a list")

    def _check_key(self, mapping: Any, key: Any) -> None:
        if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
            return
        if len(key.value) > MAX_KEY_CHARS:
            raise self.fail(key.start_mark, f"a key of {len(key.value)} characters",
                            f"keys are names of at most {MAX_KEY_CHARS} characters (see hpcopt config --reference)")
        seen = self.keys.setdefault(id(mapping), {})
        first = seen.get((key.tag, key.value))
        seen.setdefault((key.tag, key.value), key.start_mark.line + 1)
        if first is not None:
            name = ".".join(self.path + [key.value])
            what = "key" if self.path else "section"
            raise self.fail(key.start_mark, f"duplicate {what} {_show(name)} (first at line {first})",
                            f"each {what} appears once{' in its mapping' if self.path else ''}; merge them")

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except ConfigError:
            raise
        except (ValueError, OverflowError) as exc:  # e.g. a timestamp 2024-02-30
            raise self.fail(node.start_mark, f"the value {_show(node.value)}", str(exc)) from None

    def construct_yaml_int(self, node: Any) -> Any:
        if len(str(node.value)) > MAX_INT_CHARS:
            raise self.fail(node.start_mark, f"an integer of {len(node.value)} digits",
                            f"at most {MAX_INT_CHARS} digits")
        return super().construct_yaml_int(node)


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


def parse_yaml(text: str, where: str, path: typing.Sequence[str] = ()) -> Any:
    """One YAML document -> plain data, with _StrictLoader's bounds; every error is one
    ConfigError line naming `where` (a _YAMLSyntaxError when the text is not YAML). `path`:
    the keys the document sits under (a --set value), for naming duplicate keys."""
    loader = None
    try:
        loader = _StrictLoader(text, where, path)  # the reader checks the characters here
        return loader.get_single_data()
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise _YAMLSyntaxError(f"{where}: the character #x{exc.character:04x} at line {line} is not allowed: "
                               "YAML text has no control characters (tab and line breaks are fine)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        context, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context:  # e.g. "found duplicate anchor 'x'; first occurrence" at line 1, "second occurrence"
            problem = f"{context}{f' at line {cmark.line + 1}' if cmark else ''}, {problem}"
        raise _YAMLSyntaxError(" ".join(f"{where}: not valid YAML{at}: {problem}".split())) from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path: str) -> Tuple[dict, str]:
    """Read a YAML file; returns (mapping, text). Errors are one-line ConfigErrors."""
    try:
        text, why = read_text(path, MAX_CONFIG_BYTES)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    if text is None:
        raise ConfigError(f"config {path} is not allowed: {why}")
    data = parse_yaml(text, path)
    if data is None:
        raise ConfigError(f"config {path} is empty: a config with no section is not allowed (it would run on "
                          "defaults alone); write at least one SECTION: {KEY: VALUE}, see hpcopt config --reference")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data, text


def load(path: str, overrides: typing.Iterable[str] = ()) -> Config:
    data, _ = read_yaml(path)
    data = apply_overrides(data, overrides)
    stem = os.path.splitext(os.path.basename(path))[0]
    return from_dict(data, default_name=stem)


def check_run_name(cfg: Config) -> None:
    """run.name names the run directory inside run.out: one path component, so a name never
    writes outside run.out (no '/', not '.' or '..', not absolute)."""
    name = cfg.run.name
    seps = [s for s in (os.sep, os.altsep, "/") if s]
    if name in (".", "..") or any(s in name for s in seps) or "\0" in name or os.path.isabs(name):
        raise _bad("run.name", name, "a run name is one path component (no '/', not '.' or '..'); the run "
                                     "directory is run.out/run.name: choose the parent with run.out or --out")
    if len(os.fsencode(name)) > 255:
        raise _bad("run.name", name, f"a run name is one path component, at most 255 bytes (here "
                                     f"{len(os.fsencode(name))})")


def to_dict(cfg: Any) -> Any:
    """Config -> plain data (enums as strings, tuples as lists), for YAML dumps."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, enum.Enum):
        return cfg.value
    if isinstance(cfg, tuple):
        return [to_dict(v) for v in cfg]
    return cfg


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def reference(cls: type = Config, prefix: str = "") -> typing.List[Tuple[str, str, str, str]]:
    """(key, type, default, help) for every key: the README table is made from this."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(tp):
            rows += reference(tp, key)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = {v: k for k, v in f.metadata.get("aliases", {}).items()}.get(default, default)
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            tname = " \\| ".join(m.value for m in tp)
        else:
            tname = getattr(tp, "__name__", str(tp)).replace("typing.", "")
            if typing.get_origin(tp) is tuple:
                tname = f"list of {typing.get_args(tp)[0].__name__}"
        rows.append((key, tname, _show(to_dict(default)), f.metadata.get("help", "")))
    return rows



def reference_markdown() -> str:
    """The README's config table (README.md embeds exactly this text)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{k}` | {t} | `{d}` | {h} |" for k, t, d, h in reference()]
    return "\n".join(lines) + "\n"
