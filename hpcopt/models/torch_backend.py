"""The torch backend: PyTorch evaluates losses, gradients and HVPs on rows hpcopt owns.

hpcopt keeps the parameters, the optimizer math (fused kernels) and all communication;
torch only evaluates. A `FlatSpec` maps a module's parameters (then its floating-point
buffers, e.g. BatchNorm running statistics) onto one row of length d:

    row = [ p_1 | p_2 | ... | p_P | b_1 | ... ],   d = params + buffers

Node i's model is row i of the rank's (local_n, d) array X. Rows reach torch without
copies (`torch.from_numpy` on the CPU, DLPack between CuPy and torch on the GPU), and the
gradient comes back as one (local_n, d) array the kernels take directly (zeros in the
buffer block, so every fused update leaves the statistics as they are).

All local nodes in one call: `torch.func.functional_call` under `vmap` over the node
axis (`model.vectorize: vmap`), or one call per node (`loop`). `auto` takes the loop on
the CPU (measured faster there: vmap makes convolutions grouped, which oneDNN runs
slower) and on a GPU tries vmap on the first batch, falling back to the loop with one
logged line saying why. HVPs are exact,
forward-over-reverse (`jvp` of `grad`).

BatchNorm: the running statistics are the buffer block of each node's row, so they are
checkpointed, moved and averaged exactly where a method moves or averages the models
(D-SGD mixes them with W, Local SGD averages them at synchronisation, Teleportation
carries them with the tokens, sync SGD keeps the mean of the nodes' updated statistics).
A training step (`loss_grad`) updates them in place in the rows it was given, with
PyTorch's BatchNorm rule; `loss`/`accuracy` use them (eval mode); `hvp` and
`frozen_buffers()` use batch statistics without updating anything. In-place updates
cannot run under vmap, so BatchNorm takes the loop.

Determinism on the CPU: deterministic oneDNN kernels (`torch.backends.mkldnn.deterministic`)
and a fixed per-rank thread count (`model.threads`, else the host's cores / its ranks); on
the GPU deterministic cuDNN without autotuning. With `loop` every node's computation depends only on its own row and
batch, so trajectories are bit-identical on any number of ranks (given the same thread
count per rank); vmap batches the nodes of a rank into one kernel call whose rounding may
depend on how many nodes the rank holds (agreement to ~1e-6 relative, tested).

GPU: X and the data are CuPy arrays; torch runs on an external stream wrapping CuPy's
current stream, so kernels, torch and the synchronisation `comm` does before MPI touches
a device buffer are ordered on one stream. Buffers must be C-contiguous with positive
strides (asserted).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
import sys
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, grad_and_value, jvp, vmap

from ..config import ConfigError

_NULL = contextlib.nullcontext()  # reusable: the CPU needs no stream and GroupNorm no mode switch


class Entry(NamedTuple):
    name: str
    shape: Tuple[int, ...]
    offset: int
    size: int
    buffer: bool  # a floating-point buffer (running statistics), not trained


class FlatSpec:
    """Names, shapes and offsets of a module's parameters (then float buffers) in a row."""

    def __init__(self, module: nn.Module):
        self.entries: List[Entry] = []
        off = 0
        for name, p in module.named_parameters():
            self.entries.append(Entry(name, tuple(p.shape), off, p.numel(), False))
            off += p.numel()
        self.params = off
        self.fixed: Dict[str, torch.Tensor] = {}  # integer buffers (num_batches_tracked): constants
        for name, b in module.named_buffers():
            if b.is_floating_point():
                self.entries.append(Entry(name, tuple(b.shape), off, b.numel(), True))
                off += b.numel()
            else:
                self.fixed[name] = b
        self.d = off
        self.buffers = off - self.params
        self._names = [e.name for e in self.entries if not e.buffer]
        self._shapes = [e.shape for e in self.entries if not e.buffer]
        self._sizes = [e.size for e in self.entries if not e.buffer]
        self._buffer_entries = [e for e in self.entries if e.buffer]

    def flatten(self, module: nn.Module) -> np.ndarray:
        state = dict(module.named_parameters())
        state.update(dict(module.named_buffers()))
        row = np.empty(self.d, np.float32)
        for e in self.entries:
            row[e.offset: e.offset + e.size] = state[e.name].detach().cpu().reshape(-1).numpy()
        return row

    def unflatten(self, row: torch.Tensor, params: Optional[torch.Tensor] = None):
        """Views of one row (d,) as (parameters, buffers) dicts for functional_call; `params`
        (the row's first `self.params` entries as a separate leaf) replaces the parameter part."""
        src = row if params is None else params
        pieces = torch.split(src[: self.params], self._sizes)  # one call for all views (cheaper than slicing)
        p = {name: t.view(shape) for name, t, shape in zip(self._names, pieces, self._shapes)}
        b = dict(self.fixed)
        for e in self._buffer_entries:
            b[e.name] = row[e.offset: e.offset + e.size].view(e.shape)
        return p, b

    def state_dict(self, row: np.ndarray) -> Dict[str, np.ndarray]:
        """Named arrays of one row, plus the integer buffers, as `load_state_dict` wants them."""
        out = {e.name: np.ascontiguousarray(row[e.offset: e.offset + e.size].reshape(e.shape)) for e in self.entries}
        out.update({k: v.detach().cpu().numpy().copy() for k, v in self.fixed.items()})
        return out


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


class TorchModel:
    """A torch module evaluated on hpcopt's flat rows; the same surface as the NumPy models."""

    def __init__(self, kind: str, make: Callable[[], nn.Module], input_shape: Tuple[int, ...], classes: int,
                 l2: float = 0.0, vectorize: str = "auto", eval_batch: int = 1024, backend=None,
                 threads: int = 0, log: Optional[Callable[[str], None]] = None, init_row=None):
        self.kind = kind
        self.make = make
        self.input_shape = tuple(int(s) for s in input_shape)
        self.classes = classes
        self.l2 = float(l2)
        self.eval_batch = int(eval_batch)
        self.log = log or (lambda text: None)
        self.on_gpu = bool(backend is not None and backend.on_gpu)
        self.device = torch.device("cuda", backend.device) if self.on_gpu else torch.device("cpu")
        if self.on_gpu:
            torch.backends.cudnn.deterministic = True  # reproducible convolutions, no autotuning
            torch.backends.cudnn.benchmark = False
        else:
            if threads > 0:
                torch.set_num_threads(threads)
            # deterministic oneDNN kernels: torch.use_deterministic_algorithms(True) would route
            # convolutions to a reference path 4-5x slower on the CPU (measured with VGG-11)
            torch.backends.mkldnn.deterministic = True
        self.module = make().to(self.device)
        self.spec = FlatSpec(self.module)
        self.d = self.spec.d
        self.buffer_dim = self.spec.buffers
        self._init_row = init_row
        self._bn = [m for m in self.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.vectorize = vectorize
        if self._bn and vectorize == "auto":
            self.vectorize = "loop"
            self.log(f"model {kind}: BatchNorm updates running statistics in place, which vmap cannot do; "
                     f"using model.vectorize: loop")
        elif vectorize == "auto" and not self.on_gpu:
            # measured on the CPU (bench/torch_nets.py): vmap turns convolutions into grouped ones that
            # oneDNN runs slower than one call per node (LeNet, 16 nodes: vmap 0.65-0.88x the loop), and
            # the loop keeps results bit-identical on any number of ranks
            self.vectorize = "loop"
        self._frozen = 0

    # -- conversions --------------------------------------------------------------------
    def _t(self, a, writable: bool = False) -> torch.Tensor:
        """A torch view of a NumPy / CuPy array (no copy where the layout allows one)."""
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, np.ndarray):
            if writable and not (a.flags.c_contiguous and a.flags.writeable):
                raise ValueError("rows handed to torch for an in-place update must be C-contiguous and writable")
            if not a.flags.writeable or any(s < 0 for s in a.strides):
                a = np.ascontiguousarray(a).copy() if not a.flags.writeable else np.ascontiguousarray(a)
            return torch.from_numpy(a)
        if writable:  # torch writes these rows in place: only plain contiguous device buffers
            assert a.flags.c_contiguous and all(s > 0 for s in a.strides), "device rows must be C-contiguous"
        elif not a.flags.c_contiguous:  # broadcast views (shared weights, the average model): one copy
            a = a.copy(order="C")
        return torch.from_dlpack(a)

    def _out(self, t: torch.Tensor, like):
        """A torch result as the array type of `like` (NumPy view or CuPy via DLPack)."""
        t = t.detach()
        if isinstance(like, np.ndarray) or not self.on_gpu:
            return t.numpy()
        import cupy
        return cupy.from_dlpack(t.contiguous())

    def _stream(self):
        return self._device_stream() if self.on_gpu else _NULL

    @contextlib.contextmanager
    def _device_stream(self):
        import cupy
        stream = torch.cuda.ExternalStream(cupy.cuda.get_current_stream().ptr, device=self.device)
        with torch.cuda.stream(stream):
            yield

    @contextlib.contextmanager
    def frozen_buffers(self):
        """Training-mode evaluation that updates no running statistics (diagnostics, probes)."""
        self._frozen += 1
        try:
            yield
        finally:
            self._frozen -= 1

    def _mode(self, train: bool, update_stats: bool):
        if self.module.training != train:
            self.module.train(train)
        return self._bn_mode(train, update_stats) if self._bn else _NULL

    @contextlib.contextmanager
    def _bn_mode(self, train: bool, update_stats: bool):
        saved = [m.track_running_stats for m in self._bn]
        if train and not update_stats:
            for m in self._bn:  # batch statistics, no update, no in-place write
                m.track_running_stats = False
        try:
            yield
        finally:
            for m, s in zip(self._bn, saved):
                m.track_running_stats = s

    # -- the per-node functions -----------------------------------------------------------
    def _logits(self, row: torch.Tensor, a: torch.Tensor, params: Optional[torch.Tensor] = None) -> torch.Tensor:
        return functional_call(self.module, self.spec.unflatten(row, params), (a.reshape(-1, *self.input_shape),))

    def _node_loss(self, row, a, y, w, params=None):
        """Weighted cross-entropy of one node's batch + l2/2 ||parameters||^2 (not the buffers)."""
        loss = (w * F.cross_entropy(self._logits(row, a, params), y, reduction="none")).sum()
        if self.l2:
            p = row[: self.spec.params] if params is None else params
            loss = loss + 0.5 * self.l2 * (p * p).sum()
        return loss

    # -- the model surface ----------------------------------------------------------------
    def init(self, seed: int) -> np.ndarray:
        if self._init_row is not None:
            return self._init_row(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            module = self.make()
        return self.spec.flatten(module)

    def loss_grad(self, X, A, y, w):
        """Per-node loss (L,) and gradient (L, d); BatchNorm statistics in X are updated in place."""
        update = bool(self._bn) and not self._frozen
        with self._stream(), self._mode(True, update):
            Xt = self._t(X, writable=update)
            At, yt, wt = self._t(A), self._t(y).long(), self._t(w)
            if At.dim() == 2:  # shared data: every node sees the same batch
                At = At.expand(Xt.shape[0], *At.shape)
                yt = yt.expand(Xt.shape[0], *yt.shape[-1:])
            wt = wt.expand(Xt.shape[0], wt.shape[-1])
            if self.vectorize == "auto":
                self._choose(Xt, At, yt, wt)
            if self.vectorize == "vmap":
                G, loss = vmap(grad_and_value(self._node_loss))(Xt, At, yt, wt)
                if self.buffer_dim:
                    G[:, self.spec.params:] = 0
            else:
                G, loss = self._loop_grad(Xt, At, yt, wt)
            return self._out(loss, X), self._out(G, X)

    def _choose(self, Xt, At, yt, wt) -> None:
        try:
            vmap(grad_and_value(self._node_loss))(Xt[:1], At[:1], yt[:1], wt[:1])
            self.vectorize = "vmap"
        except Exception as exc:  # vmap has no batching rule for some module: one call per node
            self.vectorize = "loop"
            self.log(f"model {self.kind}: vmap over nodes failed ({_describe(exc)}); using model.vectorize: loop")

    def _flat_module(self, like: torch.Tensor):
        """The module with its parameters (and their .grad) as views of two flat tensors, so
        one node's step is: copy the row in, forward, backward, and the gradient is there."""
        key = (like.dtype, like.device)
        if getattr(self, "_flat_key", None) != key:
            P = self.spec.params
            self._pflat = torch.zeros(P, dtype=like.dtype, device=like.device)
            self._gflat = torch.zeros(P, dtype=like.dtype, device=like.device)
            params = dict(self.module.named_parameters())
            for name, t, shape in zip(self.spec._names, torch.split(self._pflat, self.spec._sizes), self.spec._shapes):
                params[name].data = t.view(shape)
            for name, t, shape in zip(self.spec._names, torch.split(self._gflat, self.spec._sizes), self.spec._shapes):
                params[name].grad = t.view(shape)
            self._buffers = dict(self.module.named_buffers())
            for e in self.spec._buffer_entries:
                self._buffers[e.name].data = self._buffers[e.name].data.to(like.dtype)
            self._flat_key = key
        return self.module

    def _loop_grad(self, Xt, At, yt, wt):
        """One forward and backward per node on the flat-backed module (BatchNorm statistics:
        the row's buffer block is copied in, updated by the forward, copied back)."""
        L, P = Xt.shape[0], self.spec.params
        G = torch.zeros(Xt.shape, dtype=Xt.dtype, device=Xt.device)
        loss = torch.empty(L, dtype=Xt.dtype, device=Xt.device)
        module = self._flat_module(Xt)
        buffers = self._buffers
        for i in range(L):
            with torch.no_grad():
                self._pflat.copy_(Xt[i, :P])
                self._gflat.zero_()
                for e in self.spec._buffer_entries:
                    buffers[e.name].copy_(Xt[i, e.offset: e.offset + e.size].view(e.shape))
            z = module(At[i].reshape(-1, *self.input_shape))
            li = (wt[i] * F.cross_entropy(z, yt[i], reduction="none")).sum()
            li.backward()
            with torch.no_grad():
                G[i, :P] = self._gflat
                if self.l2:  # the penalty l2/2 ||p||^2 on the parameters, added by hand
                    G[i, :P] += self.l2 * self._pflat
                    li = li + 0.5 * self.l2 * (self._pflat * self._pflat).sum()
                for e in self.spec._buffer_entries:
                    Xt[i, e.offset: e.offset + e.size] = buffers[e.name].reshape(-1)
            loss[i] = li.detach()
        return G, loss

    def _eval_chunks(self, X, A, y, fn):
        """fn(logits (L, chunk, C), labels (L, chunk)) -> (L, chunk) per-sample values, over
        chunks of `model.eval_batch` samples of the shared (B, f) or per-node (L, B, f) data."""
        with torch.no_grad(), self._stream(), self._mode(False, False):
            Xt, At, yt = self._t(X), self._t(A), self._t(y).long()
            shared = At.dim() == 2
            outs = []
            for s in range(0, At.shape[-2], self.eval_batch):
                Ac, yc = At[..., s: s + self.eval_batch, :], yt[..., s: s + self.eval_batch]
                if self.vectorize == "vmap":
                    Z = vmap(self._logits, in_dims=(0, None if shared else 0))(Xt, Ac)
                else:
                    Z = torch.stack([self._logits(Xt[i], Ac if shared else Ac[i]) for i in range(Xt.shape[0])])
                outs.append(fn(Z, yc.expand(Z.shape[:2])))
            return Xt, torch.cat(outs, dim=-1) if outs else torch.zeros(Xt.shape[0], 0)

    def loss(self, X, A, y, w):
        def ce(Z, yc):
            return F.cross_entropy(Z.reshape(-1, Z.shape[-1]), yc.reshape(-1), reduction="none").reshape(Z.shape[:2])

        Xt, per_sample = self._eval_chunks(X, A, y, ce)
        loss = (self._t(w).expand_as(per_sample) * per_sample).sum(dim=1)
        if self.l2:
            p = Xt[:, : self.spec.params]
            loss = loss + 0.5 * self.l2 * (p * p).sum(dim=1)
        return self._out(loss, X)

    def accuracy(self, X, A, y):
        _, hits = self._eval_chunks(X, A, y, lambda Z, yc: (Z.argmax(dim=-1) == yc).to(Z.dtype))
        return self._out(hits.mean(dim=1), X)

    def hvp(self, X, V, A, y, w):
        """Exact Hessian-vector products of each node's training loss (forward-over-reverse)."""
        with self._stream(), self._mode(True, False):
            Xt, Vt, At, yt, wt = self._t(X), self._t(V), self._t(A), self._t(y).long(), self._t(w)
            if At.dim() == 2:
                At = At.expand(Xt.shape[0], *At.shape)
                yt = yt.expand(Xt.shape[0], *yt.shape[-1:])
            wt = wt.expand(Xt.shape[0], wt.shape[-1])
            if self.buffer_dim:
                Vt = Vt.clone()
                Vt[:, self.spec.params:] = 0

            def one(row, v, a, yy, ww):
                return jvp(lambda r: grad(self._node_loss)(r, a, yy, ww), (row,), (v,))[1]

            H = None
            if self.vectorize != "loop" and not self._bn:
                try:
                    H = vmap(one)(Xt, Vt, At, yt, wt)
                except Exception as exc:  # no batching rule for the forward-over-reverse product
                    if self.vectorize == "vmap":
                        raise ConfigError(f"model.vectorize = 'vmap' is not allowed: Hessian-vector products of "
                                          f"{self.kind} fail under vmap ({_describe(exc)}); use loop or auto") from None
                    self.log(f"model {self.kind}: Hessian-vector products under vmap failed ({_describe(exc)}); "
                             f"computing them one node at a time")
                    self.vectorize = "loop"
            if H is None:
                H = torch.stack([one(Xt[i], Vt[i], At[i], yt[i], wt[i]) for i in range(Xt.shape[0])])
            if self.buffer_dim:
                H[:, self.spec.params:] = 0
            return self._out(H, X)

    def state_dict(self, row) -> Dict[str, np.ndarray]:
        return self.spec.state_dict(np.asarray(row, np.float32))


# ---------------------------------------------------------------------------------------
# building: built-ins and user factories


def input_shape_of(ds) -> Tuple[int, ...]:
    """(C, H, W) for image data; flat data whose width is a square k*k are read as 1 x k x k."""
    if getattr(ds, "shape", None):
        return tuple(ds.shape)
    f = ds.features
    k = int(math.isqrt(f))
    return (1, k, k) if k * k == f and k >= 4 else (f,)


def load_factory(spec: str) -> Callable:
    """'package.module:function' or 'path/to/file.py:function' -> the function."""
    key = "model.factory"
    if spec.count(":") < 1 or not spec.rsplit(":", 1)[1] or not spec.rsplit(":", 1)[0]:
        raise ConfigError(f"{key} = {spec!r} is not allowed: expected 'package.module:function' or "
                          f"'path/to/file.py:function'")
    where, fname = spec.rsplit(":", 1)
    if where.endswith(".py") or os.sep in where:
        path = os.path.abspath(where)
        if not os.path.isfile(path):
            raise ConfigError(f"{key} = {spec!r} is not allowed: no file {where}")
        modname = "hpcopt_user_model_" + os.path.splitext(os.path.basename(path))[0]
        try:
            spec_obj = importlib.util.spec_from_file_location(modname, path)
            mod = importlib.util.module_from_spec(spec_obj)
            sys.modules[modname] = mod
            spec_obj.loader.exec_module(mod)
        except Exception as exc:  # the user's file: any error it raises is reported in one line
            raise ConfigError(f"{key} = {spec!r} is not allowed: importing {where} failed ({_describe(exc)})") from None
    else:
        try:
            mod = importlib.import_module(where)
        except ModuleNotFoundError as exc:
            raise ConfigError(f"{key} = {spec!r} is not allowed: no module named {exc.name!r}") from None
        except Exception as exc:
            raise ConfigError(f"{key} = {spec!r} is not allowed: importing {where} failed ({_describe(exc)})") from None
    fn = getattr(mod, fname, None)
    if fn is None:
        raise ConfigError(f"{key} = {spec!r} is not allowed: {where} has no attribute {fname!r}")
    if not callable(fn):
        raise ConfigError(f"{key} = {spec!r} is not allowed: {fname} is not a function")
    return fn


def _checked_factory(name: str, fn: Callable, input_shape, classes: int) -> Callable[[], nn.Module]:
    what = "model.factory" if name == "torch" else "model.name"

    def make() -> nn.Module:
        try:
            m = fn(tuple(input_shape), classes)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"{what} = {name!r}: calling the factory with ({tuple(input_shape)}, {classes}) "
                              f"failed ({_describe(exc)})") from None
        if not isinstance(m, nn.Module):
            raise ConfigError(f"{what}: the factory returned {type(m).__name__}, not a torch.nn.Module")
        return m.float()

    module = make()
    if not any(True for _ in module.parameters()):
        raise ConfigError(f"{what}: the module has no parameters to train")
    try:
        with torch.no_grad():
            module.eval()
            out = module(torch.zeros(2, *input_shape))
    except Exception as exc:
        raise ConfigError(f"{what}: the module cannot take a batch of shape {(2, *input_shape)} from the data "
                          f"({_describe(exc)})") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{what}: the module's output for a batch of 2 has shape {got}; the data need "
                          f"(2, {classes}) class scores")
    return make


def build(name: str, cfg, ds, backend=None, threads: int = 0, log=None) -> TorchModel:
    from . import nets
    from .numpy_models import MLP
    if ds.classes < 2:
        raise ConfigError(f"model.name = {name!r} is not allowed: torch models are classifiers and data set "
                          f"{ds.name} has no class labels")
    shape = input_shape_of(ds)
    if name == "torch":
        fn = load_factory(cfg.factory)
    else:
        def fn(input_shape, classes):
            return nets.build(name, input_shape, classes, cfg)
    make = _checked_factory(name, fn, shape, ds.classes)
    init_row = None
    if name == "torch_mlp":  # the NumPy mlp's initialisation, so both backends start from the same row
        ref = MLP(ds.features, cfg.hidden, ds.classes, cfg.activation.value, cfg.l2, cfg.init_scale)
        init_row = ref.init
    return TorchModel(name, make, shape, ds.classes, l2=cfg.l2, vectorize=cfg.vectorize.value,
                      eval_batch=cfg.eval_batch, backend=backend, threads=threads, log=log, init_row=init_row)
