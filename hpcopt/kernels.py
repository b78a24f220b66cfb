"""Fused kernels: one CUDA source, three targets.

`kernels/*.cu` (installed as `hpcopt.kernel_sources`) run
1. on a GPU through `cupy.RawModule`, compiled once per process and cached;
2. on the CPU: the same text compiled by the system C++ compiler with `cpu_shim.h`
   (OpenMP, one contiguous chunk per thread, fp-contract off so results equal the NumPy
   references bit for bit), cached on disk by a hash of source + flags + compiler + CPU
   and loaded with ctypes; concurrent compiles by many ranks are safe (atomic rename);
3. as the NumPy references below, which tests compare both against and which serve when
   no compiler is present (`Kernels.impl == "numpy"`).

`Kernels` is the one entry point: every optimizer update and every mix goes through it.
Scalars are converted to float32 / int64 on the host exactly once, and the same values
are handed to whichever implementation runs.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import uuid
import weakref
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

F32 = np.float32
KERNEL_FILES = ("fused_update.cu", "mix_rows.cu", "keyed_gather.cu", "linear_loss_grad.cu")
CPU_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-ffp-contract=off",
             "-fPIC", "-shared", "-std=c++14", "-x", "c++")
# x86: 256-bit vectors even where AVX-512 exists. Node rows are short (d of a few dozen:
# 16-float vectors leave most of a row to the scalar remainder), and the kernels' 8-lane
# sums fill one 256-bit register; results are the same bits at any vector width.
if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
    CPU_FLAGS = CPU_FLAGS + ("-mprefer-vector-width=256",)

# argument kinds: p = float32 array, q = int64 array, f = float32 scalar, n = int64 scalar
SIGNATURES: Dict[str, str] = {
    "sgd_update": "ppffn",
    "momentum_update": "pppfffnn",
    "rmsprop_update": "pppffffffn",
    "adam_update": "ppppffffffffffn",
    "scaled_update": "pppfffn",
    "mix_rows": "pppnqqpnn",
    "keyed_gather": "pqpnqqnqqnn",
    "keyed_linear_loss_grad": "pppppqqnqqffnnnn",
}


class KernelError(RuntimeError):
    """The compiled kernels were required but could not be built or loaded."""


def source_dir() -> Path:
    """Directory holding the .cu sources and cpu_shim.h (installed or in a checkout)."""
    try:
        from . import kernel_sources  # type: ignore[attr-defined]
        return Path(kernel_sources.__path__[0])
    except ImportError:
        return Path(__file__).resolve().parent.parent / "kernels"


def read_sources() -> str:
    d = source_dir()
    return "\n".join((d / f).read_text() for f in KERNEL_FILES)


# ---------------------------------------------------------------------------------------
# NumPy references (work on any array module with NumPy semantics)


def ref_sgd(x, g, lr, wd):
    gg = g + wd * x
    x -= lr * gg


def ref_momentum(x, g, m, lr, mu, wd, nesterov):
    gg = g + wd * x
    m *= mu
    m += gg
    x -= lr * (gg + mu * m if nesterov else m)


def ref_rmsprop(x, g, v, lr, beta, omb, alpha, eps, wd):
    xp = _xp(x)
    gg = g + wd * x
    v *= beta
    v += omb * (gg * gg)
    x -= (lr * gg) / (xp.maximum(alpha, xp.sqrt(v)) + eps)


def ref_adam(x, g, m, v, lr, b1, omb1, b2, omb2, inv_bc1, inv_bc2, alpha, eps, wd):
    xp = _xp(x)
    gg = g + wd * x
    m *= b1
    m += omb1 * gg
    v *= b2
    v += omb2 * (gg * gg)
    denom = xp.maximum(alpha, xp.sqrt(v * inv_bc2)) + eps
    x -= (lr * (m * inv_bc1)) / denom


def ref_scaled(x, g, d, lr, alpha, wd):
    xp = _xp(x)
    gg = g + wd * x
    x -= (lr * gg) / xp.maximum(alpha, xp.abs(d))


def ref_mix_rows(out, local, remote, indptr, indices, weights):
    """out[r] = sum_k w[k] * src(idx[k]) in CSR order, vectorised over rows per term."""
    xp = _xp(out)
    n_local = local.shape[0]
    ip = np.asarray(_host(indptr))
    deg = np.diff(ip)
    out[...] = 0
    for k in range(int(deg.max()) if deg.size else 0):
        rows = np.nonzero(deg > k)[0]
        pos = ip[rows] + k
        j = np.asarray(_host(indices))[pos]
        w = weights[xp.asarray(pos)][:, None]
        src = xp.empty((len(rows), out.shape[1]), dtype=out.dtype)
        here = j < n_local
        if here.any():
            src[xp.asarray(np.nonzero(here)[0])] = local[xp.asarray(j[here])]
        if (~here).any():
            src[xp.asarray(np.nonzero(~here)[0])] = remote[xp.asarray(j[~here] - n_local)]
        out[xp.asarray(rows)] += w * src


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _ref_mix64(z):
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def ref_keyed_gather(A, idx, X, keys, steps, step_stride, counts, starts):
    """idx[r, j] = mix(mix(keys[r] ^ (steps[r] * G + 2)) + (j + 1) G) % counts[r] + starts[r];
    A[r, j] = X[idx[r, j]] (see keyed_gather.cu); A (rows, B, f), idx (rows, B)."""
    rows, B = idx.shape
    with np.errstate(over="ignore"):
        k = np.asarray(keys).view(np.uint64)[:, None]
        s = np.asarray(steps).view(np.uint64)
        s = np.broadcast_to(s[:1] if step_stride == 0 else s[:rows], (rows,))[:, None]
        k = _ref_mix64(k ^ (s * _GOLDEN + np.uint64(2)))
        bits = _ref_mix64(k + (np.arange(B, dtype=np.uint64)[None, :] + np.uint64(1)) * _GOLDEN)
    flat = (bits % np.asarray(counts).view(np.uint64)[:, None]).view(np.int64) + np.asarray(starts)[:, None]
    idx[...] = flat
    A[...] = X[flat]


_LANES = 8  # partial sums of the dot product in linear_loss_grad.cu
_EXP_TAYLOR = ("0.0001984127", "0.0013888889", "0.008333334", "0.041666668", "0.16666667", "0.5", "1.0", "1.0")
_ATANH_SERIES = ("0.05882353", "0.06666667", "0.07692308", "0.09090909", "0.11111111", "0.14285715", "0.2",
                 "0.33333334", "1.0")


def ref_exp_nonpos(x):
    """linear_loss_grad.cu's exp(x) for x <= 0, in the same float32 operations."""
    f32 = np.float32
    with np.errstate(over="ignore", invalid="ignore"):
        n = np.rint(x * f32(1.442695))
        r = (x - n * f32(0.6933594)) - n * f32(-0.00021219444)
        p = np.full_like(x, f32(_EXP_TAYLOR[0]))
        for c in _EXP_TAYLOR[1:]:
            p = p * r + f32(c)
        e = np.ldexp(p, np.nan_to_num(n, nan=0.0).astype(np.int32))
    return np.where(x < f32(-87.0), f32(0.0), e).astype(f32, copy=False)


def ref_log1p_unit(e):
    """linear_loss_grad.cu's log1p(e) for 0 <= e <= 1, in the same float32 operations."""
    f32 = np.float32
    s = e / (f32(2.0) + e)
    q = s * s
    p = np.full_like(e, f32(_ATANH_SERIES[0]))
    for c in _ATANH_SERIES[1:]:
        p = p * q + f32(c)
    return (f32(2.0) * s) * p


def ref_linear_loss_grad(loss, G, X, A, y, w, l2, logistic):
    """The linear models' per-node loss and gradient on gathered minibatches A (L, B, f),
    y and w (L, B), in linear_loss_grad.cu's float32 operations and order (8-lane dot
    product, samples in order); writes loss (L,) and G (L, d)."""
    L, B, f = A.shape
    f32 = np.float32
    lanes = np.zeros((L, B, _LANES), f32)
    x = X[:, :f]
    for t0 in range(0, f, _LANES):
        m = min(_LANES, f - t0)
        lanes[..., :m] += x[:, None, t0:t0 + m] * A[..., t0:t0 + m]
    s = lanes
    z = ((s[..., 0] + s[..., 1]) + (s[..., 2] + s[..., 3])) + ((s[..., 4] + s[..., 5]) + (s[..., 6] + s[..., 7]))
    y = y.astype(f32, copy=False)
    with np.errstate(over="ignore", invalid="ignore"):
        if logistic:
            z = z + X[:, f:f + 1]
            e = ref_exp_nonpos(-np.abs(z))
            sp = np.where(z > 0, z, f32(0)) + ref_log1p_unit(e)
            lj = sp - y * z
            dz = np.where(z >= 0, f32(1), e) / (f32(1) + e) - y
        else:
            res = z - y
            lj = f32(0.5) * (res * res)
            dz = res
    c = w * dz
    total = np.zeros(L, f32)
    g = np.zeros((L, f), f32)
    gb = np.zeros(L, f32)
    for j in range(B):
        total = total + w[:, j] * lj[:, j]
        g = g + c[:, j, None] * A[:, j]
        gb = gb + c[:, j]
    G[:, :f] = g
    if logistic:
        G[:, f] = gb
    if l2:
        l2 = f32(l2)
        sq = np.zeros(L, f32)
        for u in range(X.shape[1]):
            sq = sq + X[:, u] * X[:, u]
        G += l2 * X
        total = total + (f32(0.5) * l2) * sq
    loss[...] = total


def _xp(a) -> Any:
    if isinstance(a, np.ndarray):
        return np
    import cupy  # only reached with CuPy arrays
    return cupy


def _host(a):
    return a if isinstance(a, np.ndarray) else a.get()


REFERENCES = {
    "sgd_update": ref_sgd, "momentum_update": ref_momentum, "rmsprop_update": ref_rmsprop,
    "adam_update": ref_adam, "scaled_update": ref_scaled, "mix_rows": ref_mix_rows,
    "keyed_gather": ref_keyed_gather,
}


# ---------------------------------------------------------------------------------------
# CPU build


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.machine()


def cache_dir() -> Path:
    root = os.environ.get("HPCOPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hpcopt")
    return Path(root) / "kernels"


def build_cpu_library(cxx: Optional[str] = None, directory: Optional[Path] = None) -> Path:
    """Compile all kernel sources into one shared library, cached by content hash.

    Safe when many ranks build at once: each compiles to a private temporary name in
    the cache directory and renames it into place atomically.
    """
    cxx = cxx or _compiler()
    if cxx is None:
        raise KernelError("no C++ compiler found (set CXX or install g++)")
    src_dir = source_dir()
    shim = src_dir / "cpu_shim.h"
    text = shim.read_text() + read_sources()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([text, " ".join(CPU_FLAGS), cxx, version,
                                    _cpu_signature()]).encode()).hexdigest()[:20]
    directory = Path(directory) if directory else cache_dir()
    target = directory / f"hpcopt_kernels_{key}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hpcopt-build-") as tmp:
        unit = Path(tmp) / "all_kernels.cu"
        unit.write_text(read_sources())
        out = directory / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        cmd = [cxx, *CPU_FLAGS, "-include", str(shim), str(unit), "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            out.unlink(missing_ok=True)
            first = (proc.stderr.strip().splitlines() or ["unknown error"])[0]
            raise KernelError(f"compiling the CPU kernels failed: {first}")
        os.replace(out, target)
    return target


_CT = {"p": ctypes.c_void_p, "q": ctypes.c_void_p, "f": ctypes.c_float, "n": ctypes.c_longlong}


class _CpuLibrary:
    def __init__(self, path: Path, threads: int):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # oversubscribed ranks must not spin
        self.lib = ctypes.CDLL(str(path))
        self.path = path
        for name, sig in SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.restype = None
            fn.argtypes = [_CT[c] for c in sig]
        self.lib.hpcopt_set_threads.argtypes = [ctypes.c_int]
        self.lib.hpcopt_get_threads.restype = ctypes.c_int
        if threads > 0:
            self.lib.hpcopt_set_threads(threads)
        self._fns = {name: getattr(self.lib, name) for name in SIGNATURES}
        self._ptrs: Dict[int, Tuple[Any, int]] = {}  # id -> (weak reference, data address)

    @property
    def threads(self) -> int:
        return int(self.lib.hpcopt_get_threads())

    def call(self, name: str, args) -> None:
        ptr = self._pointer
        self._fns[name](*[ptr(a) if kind in "pq" else a for kind, a in zip(SIGNATURES[name], args)])

    def _pointer(self, a) -> int:
        """Data address of a NumPy array.

        `a.ctypes.data` costs about 1 us, more than a kernel on a few thousand floats, so
        the addresses of live arrays are remembered (an array's buffer never moves while
        it lives); a weak reference drops the entry when the array dies, so a new array
        that reuses the id is never given a stale address.
        """
        key = id(a)
        hit = self._ptrs.get(key)
        if hit is not None and hit[0]() is a:
            return hit[1]
        ptrs = self._ptrs

        def forget(ref, key=key):
            if ptrs.get(key, (None,))[0] is ref:
                del ptrs[key]

        address = a.ctypes.data
        ptrs[key] = (weakref.ref(a, forget), address)
        return address


class _CudaModule:
    _cache: Dict[str, Any] = {}

    def __init__(self):
        import cupy
        self.cupy = cupy
        src = read_sources()
        mod = self._cache.get(src)
        if mod is None:
            # no FMA contraction: the GPU then rounds exactly like the references
            mod = cupy.RawModule(code=src, options=("-std=c++14", "--fmad=false"))
            self._cache[src] = mod
        self.functions = {name: mod.get_function(name) for name in SIGNATURES}

    def call(self, name: str, args, work: int) -> None:
        block = 256
        grid = max(1, min((work + block - 1) // block, 65535 * 4))
        self.functions[name]((grid,), (block,), tuple(args))


# ---------------------------------------------------------------------------------------
# the entry point


# argument names of each kernel's arrays, for the messages
ARRAYS: Dict[str, Tuple[str, ...]] = {
    "sgd_update": ("x", "g"),
    "momentum_update": ("x", "g", "m"),
    "rmsprop_update": ("x", "g", "v"),
    "adam_update": ("x", "g", "m", "v"),
    "scaled_update": ("x", "g", "d"),
    "mix_rows": ("out", "local", "remote", "indptr", "indices", "weights"),
    "keyed_gather": ("A", "idx", "X", "keys", "steps", "counts", "starts"),
    "keyed_linear_loss_grad": ("loss", "G", "X", "data", "y", "keys", "steps", "counts", "starts"),
}
_F32 = np.dtype(np.float32)
_I64 = np.dtype(np.int64)


def _describe(a) -> str:
    return f"shape {tuple(a.shape)} ({a.size} elements)"


def _check(op: str, arg, a, dtype) -> None:
    """Kernels take C-contiguous arrays of one dtype; the message is built only on failure."""
    if a.dtype != dtype or not a.flags.c_contiguous:
        where = f"{op}[{arg}]" if isinstance(arg, int) else f"{op}.{arg}"
        raise ValueError(f"kernel argument {where} must be a C-contiguous {np.dtype(dtype).name} array, "
                         f"got {a.dtype} (contiguous={a.flags.c_contiguous})")


def _check_named(op: str, named) -> None:
    """`_check` on each (name, array, dtype) of a kernel's arguments; a non-array is named too."""
    for name, a, dt in named:
        if not hasattr(a, "dtype") or not hasattr(a, "flags"):
            raise ValueError(f"kernel argument {op}.{name} must be a C-contiguous {np.dtype(dt).name} array, "
                             f"got {type(a).__name__}")
        _check(op, name, a, dt)


def _check_all(op: str, arrays, dtypes) -> None:
    """`_check` on each of a kernel's arrays (named by ARRAYS[op])."""
    _check_named(op, zip(ARRAYS[op], arrays, dtypes))


def _update_error(op: str, arrays) -> ValueError:
    """The first thing wrong with an update kernel's arrays (called only on failure)."""
    names = ARRAYS[op]
    for name, a in zip(names, arrays):
        if not hasattr(a, "dtype") or not hasattr(a, "flags"):
            return ValueError(f"kernel argument {op}.{name} must be a C-contiguous float32 array, "
                              f"got {type(a).__name__}")
        try:
            _check(op, name, a, F32)
        except ValueError as exc:
            return exc
    x = arrays[0]
    for name, a in zip(names[1:], arrays[1:]):
        if a.shape != x.shape:
            return ValueError(f"kernel {op}: {name} has {_describe(a)} but x has {_describe(x)}; "
                              f"{', '.join(names)} must all have the same shape")
    return ValueError(f"kernel {op}: invalid arguments")  # not reached


def _indptr_bounds(a) -> Tuple[int, int, bool]:
    """(first, last, nondecreasing) of a CSR row-pointer array (one host copy, once)."""
    h = np.asarray(_host(a))
    if h.size == 0:
        return 0, 0, True
    return int(h[0]), int(h[-1]), bool((h[1:] >= h[:-1]).all())


def _index_bounds(a) -> Tuple[int, int]:
    """(min, max) of a CSR column-index array, (0, -1) when empty."""
    h = np.asarray(_host(a))
    return (int(h.min()), int(h.max())) if h.size else (0, -1)


_CURRENT: Any = None  # weak reference to the most recently created Kernels


def current() -> Optional["Kernels"]:
    """The most recently created Kernels of this process (the runner's), or None."""
    return _CURRENT() if _CURRENT is not None else None


def _remember(table: dict, a, b, *values) -> tuple:
    """Store (weakref(a), weakref(b), *values) in `table` under the pair's ids, dropped when
    either array dies (a new array reusing an id is then checked afresh); arrays without
    weak references get (a, b as callables, *values), not stored: checked on every call."""
    key = (id(a), id(b))

    def forget(_ref, key=key):
        entry = table.get(key)
        if entry is not None and (entry[0] is _ref or entry[1] is _ref):
            del table[key]

    try:
        entry = (weakref.ref(a, forget), weakref.ref(b, forget), *values)
    except TypeError:
        return (lambda: a, lambda: b, *values)
    table[key] = entry
    return entry


class Kernels:
    """Fused update and mixing kernels on one device.

    mode: "auto" (compiled when possible, else NumPy with a warning recorded in
    `self.note`), "compiled" (fail if the kernels cannot be built) or "numpy".
    `impl` is "cuda", "cpu" or "numpy"; `threads` is the CPU build's OpenMP thread count.
    """

    def __init__(self, on_gpu: bool = False, mode: str = "auto", threads: int = 0,
                 cache: Optional[Path] = None):
        self.note = ""
        self.impl = "numpy"
        self._lib: Any = None
        self._row_sum_ops: Dict[tuple, Any] = {}
        # (id(indptr), id(indices)) -> (weak refs to both, CSR bounds hold, largest index)
        self._csr: Dict[Tuple[int, int], Tuple[Any, Any, bool, int]] = {}
        self._gathers: Dict[Tuple[int, int], Tuple[Any, Any, int]] = {}  # keyed_gather bounds
        global _CURRENT
        _CURRENT = weakref.ref(self)  # the rank's kernels, for code built without a handle (NodeData)
        if mode == "numpy":
            return
        try:
            if on_gpu:
                self._lib = _CudaModule()
                self.impl = "cuda"
            else:
                self._lib = _CpuLibrary(build_cpu_library(directory=cache), threads)
                self.impl = "cpu"
        except Exception as exc:  # noqa: BLE001 -- any build failure falls back or fails clearly
            if mode == "compiled":
                raise KernelError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
            self.note = f"compiled kernels unavailable, using NumPy references: {str(exc).splitlines()[0]}"

    @property
    def threads(self) -> int:
        return self._lib.threads if self.impl == "cpu" else 0

    @property
    def library(self) -> str:
        return str(self._lib.path) if self.impl == "cpu" else ""

    def _run(self, name: str, arrays, scalars, work: int) -> None:
        # every array of an update is float32, C-contiguous and of x's shape: the kernels
        # walk `work` = x.size elements of each, so a shorter one would be overrun in C
        # (the NumPy references would broadcast instead); the message is built on failure
        try:
            shape = arrays[0].shape
            for a in arrays:
                if (a.dtype is not _F32 and a.dtype != _F32) or not a.flags.c_contiguous or a.shape != shape:
                    raise _update_error(name, arrays)
        except AttributeError:  # not an array at all
            raise _update_error(name, arrays) from None
        if self.impl == "numpy":
            REFERENCES[name](*arrays, *scalars)
            return
        if self.impl == "cpu":
            self._lib.call(name, [*arrays, *scalars, work])
        else:
            self._lib.call(name, [*arrays, *scalars, np.int64(work)], work)

    # -- updates -------------------------------------------------------------------
    def sgd(self, x, g, lr: float, wd: float = 0.0) -> None:
        self._run("sgd_update", (x, g), (F32(lr), F32(wd)), x.size)

    def momentum(self, x, g, m, lr: float, mu: float, wd: float = 0.0, nesterov: bool = False) -> None:
        if self.impl == "numpy":
            self._run("momentum_update", (x, g, m), (F32(lr), F32(mu), F32(wd), bool(nesterov)), x.size)
        else:
            self._run("momentum_update", (x, g, m), (F32(lr), F32(mu), F32(wd), np.int64(nesterov)), x.size)

    def rmsprop(self, x, g, v, lr: float, beta: float, alpha: float = 0.0, eps: float = 1e-8,
                wd: float = 0.0) -> None:
        b = F32(beta)
        self._run("rmsprop_update", (x, g, v),
                  (F32(lr), b, F32(1) - b, F32(alpha), F32(eps), F32(wd)), x.size)

    def adam(self, x, g, m, v, lr: float, b1: float, b2: float, step: int, alpha: float = 0.0,
             eps: float = 1e-8, wd: float = 0.0, bias_correction: bool = True) -> None:
        """Adam step; `step` counts from 1 (bias corrections 1 - b^step)."""
        f1, f2 = F32(b1), F32(b2)
        if bias_correction:
            inv1 = F32(1.0 / (1.0 - float(b1) ** step))
            inv2 = F32(1.0 / (1.0 - float(b2) ** step))
        else:
            inv1 = inv2 = F32(1)
        self._run("adam_update", (x, g, m, v),
                  (F32(lr), f1, F32(1) - f1, f2, F32(1) - f2, inv1, inv2, F32(alpha), F32(eps), F32(wd)),
                  x.size)

    def scaled(self, x, g, d, lr: float, alpha: float, wd: float = 0.0) -> None:
        self._run("scaled_update", (x, g, d), (F32(lr), F32(alpha), F32(wd)), x.size)

    # -- data ----------------------------------------------------------------------
    def keyed_gather(self, A, idx, X, keys, steps, counts, starts) -> None:
        """The keyed minibatch gather (see keyed_gather.cu): A (rows, B, f) float32 and idx
        (rows, B) int64 are written; X (N, f) float32; keys (rows,) int64 (uint64 bits of
        data._node_keys); steps (rows,) or (1,) int64; counts (>= 1), starts (rows,) int64
        with starts + counts <= N. Everything is checked before any call into C."""
        rows, B = idx.shape
        f = X.shape[1] if X.ndim == 2 else -1
        _check_all("keyed_gather", (A, idx, X, keys, steps, counts, starts), (F32, _I64, F32, _I64, _I64, _I64, _I64))
        if f < 0 or A.shape != (rows, B, f):
            raise ValueError(f"kernel keyed_gather: shapes A {A.shape}, idx {idx.shape}, X {X.shape} do not fit "
                             f"(rows, B) = {(rows, B)}")
        stride = self._keyed_stride("keyed_gather", rows, X.shape[0], "rows of X", keys, steps, counts, starts)
        if self.impl == "numpy" or not rows or not B:
            ref_keyed_gather(A, idx, X, keys, steps, stride, counts, starts)
        elif self.impl == "cpu":
            self._lib.call("keyed_gather", [A, idx, X, f, keys, steps, stride, counts, starts, rows, B])
        else:
            self._lib.call("keyed_gather", [A, idx, X, np.int64(f), keys, steps, np.int64(stride), counts, starts,
                                            np.int64(rows), np.int64(B)], rows * B)

    def _keyed_stride(self, op: str, rows: int, data_rows: int, what: str, keys, steps, counts, starts) -> int:
        """Check the keyed-draw arguments of keyed_gather and keyed_linear_loss_grad (keys,
        counts, starts (rows,), steps (rows,) or (1,), counts >= 1, 0 <= starts, starts +
        counts <= data_rows) and return the step stride (0: one step for every row)."""
        if (keys.shape != (rows,) or counts.shape != (rows,) or starts.shape != (rows,)
                or steps.shape not in ((rows,), (1,))):
            raise ValueError(f"kernel {op}: shapes keys {keys.shape}, steps {steps.shape}, counts {counts.shape}, "
                             f"starts {starts.shape} do not fit {rows} rows")
        if rows and self._gather_end(counts, starts) > data_rows:
            raise ValueError(f"kernel {op}: every row needs counts >= 1 and 0 <= starts, "
                             f"starts + counts <= {data_rows} ({what})")
        return 0 if steps.shape == (1,) and rows != 1 else 1

    def _gather_end(self, counts, starts) -> int:
        """max(starts + counts), or a huge value when some count < 1 or start < 0; kept per
        (counts, starts) pair while both live (NodeData passes the same arrays every step),
        like the CSR bounds of mix_rows (writing into them afterwards is not supported)."""
        key = (id(counts), id(starts))
        hit = self._gathers.get(key)
        if hit is not None and hit[0]() is counts and hit[1]() is starts:
            return hit[2]
        ok = int(counts.min()) >= 1 and int(starts.min()) >= 0
        end = int((starts + counts).max()) if ok else 1 << 62
        return _remember(self._gathers, counts, starts, end)[2]

    # -- linear models -------------------------------------------------------------
    def keyed_linear_loss_grad(self, loss, G, X, data, y, keys, steps, counts, starts, B: int, w: float,
                               l2: float, logistic: bool) -> None:
        """Per-node loss (rows,) and gradient (rows, d) of the quadratic (logistic False,
        d = f) or logistic (d = f + 1, the bias last) model X (rows, d) on the keyed
        minibatch of B samples that keyed_gather draws from `data` (N, f), targets y (N,)
        float32, every sample weighted w (see linear_loss_grad.cu); keys, steps, counts
        and starts as for keyed_gather. Everything is checked before any call into C.
        A caller that repeats the call with the same data every step binds it once with
        `linear_pass` (this is that, bound for one call)."""
        self.linear_pass(data, y, keys, counts, starts, B, w, l2, logistic)(loss, G, X, steps)

    def linear_pass(self, data, y, keys, counts, starts, B: int, w: float, l2: float,
                    logistic: bool) -> "LinearPass":
        """keyed_linear_loss_grad with the operands that stay fixed over a run (data,
        targets, node keys, counts, starts, B, w, l2, the model kind) checked and converted
        once; the returned pass takes (loss, G, X, steps) (see LinearPass)."""
        return LinearPass(self, data, y, keys, counts, starts, B, w, l2, logistic)

    # -- mixing --------------------------------------------------------------------
    def row_sum(self, out, X, scale: float) -> None:
        """out (d,) = scale * sum of X's rows, in row order, in one fused pass.

        The CSR operands (one output row taking every input row with weight `scale`) are
        built once per (rows, d, scale) and kept on the device.
        """
        for a in (out, X):
            if (a.dtype is not _F32 and a.dtype != _F32) or not a.flags.c_contiguous:
                _check("row_sum", "out" if a is out else "X", a, F32)
        if X.ndim != 2 or out.shape != X.shape[1:]:
            raise ValueError(f"kernel row_sum: X must be 2-D (rows, d) and out of shape (d,), "
                             f"got X {_describe(X)} and out {_describe(out)}")
        if len(X) == 1:  # the same float32 product as the kernel's 0 + w * x
            (np if type(out) is np.ndarray else _xp(out)).multiply(X[0], F32(scale), out=out)
            return
        L, d = X.shape
        key = (L, d, float(scale))
        ops = self._row_sum_ops.get(key)
        if ops is None:
            xp = _xp(out)
            ops = (xp.asarray(np.array([0, L], np.int64)), xp.asarray(np.arange(L, dtype=np.int64)),
                   xp.asarray(np.full(L, scale, np.float32)), xp.empty((0, d), np.float32))
            self._row_sum_ops[key] = ops
        indptr, indices, weights, none = ops
        self._mix(out.reshape(1, d), X, none, indptr, indices, weights)  # operands checked above / built here

    def mix_rows(self, out, local, remote, indptr, indices, weights) -> None:
        """out[r] = sum_k weights[k] * src(indices[k]) over CSR row r (see mix_rows.cu).

        Checked before any call into C: dtypes and contiguity; out (rows, d), local
        (n_local, d), remote (n_remote, d), indptr (rows + 1,), indices and weights of one
        length nnz; indptr non-decreasing from >= 0 to <= nnz and every index in
        [0, n_local + n_remote). Sizes and shapes are checked on every call, the CSR
        contents once per (indptr, indices) pair (see _csr_bounds).
        """
        f, i = _F32, _I64
        try:  # unrolled: this runs on every mix, where a few hundred nanoseconds count
            ok = ((out.dtype is f or out.dtype == f) and (local.dtype is f or local.dtype == f)
                  and (remote.dtype is f or remote.dtype == f) and (weights.dtype is f or weights.dtype == f)
                  and (indptr.dtype is i or indptr.dtype == i) and (indices.dtype is i or indices.dtype == i)
                  and out.flags.c_contiguous and local.flags.c_contiguous and remote.flags.c_contiguous
                  and weights.flags.c_contiguous and indptr.flags.c_contiguous and indices.flags.c_contiguous)
            if ok:
                shape = out.shape
                ok = (len(shape) == 2 and local.ndim == 2 and remote.ndim == 2 and indptr.ndim == 1
                      and indices.ndim == 1 and local.shape[1] == shape[1] and remote.shape[1] == shape[1]
                      and indptr.size == shape[0] + 1 and weights.shape == indices.shape)
            if ok:
                hit = self._csr.get((id(indptr), id(indices)))
                if hit is None or hit[0]() is not indptr or hit[1]() is not indices:
                    hit = self._csr_bounds(indptr, indices)
                ok = hit[2] and hit[3] < local.shape[0] + remote.shape[0]
        except AttributeError:
            ok = False
        if not ok:
            raise self._mix_error((out, local, remote, indptr, indices, weights))
        self._mix(out, local, remote, indptr, indices, weights)

    def _mix(self, out, local, remote, indptr, indices, weights) -> None:
        rows, d = out.shape
        if self.impl == "numpy":
            ref_mix_rows(out, local, remote, indptr, indices, weights)
            return
        if self.impl == "cpu":  # ctypes takes Python ints (faster than NumPy scalars)
            self._lib.call("mix_rows", [out, local, remote, local.shape[0], indptr, indices, weights, rows, d])
        else:  # CuPy passes NumPy scalars with their exact C type
            self._lib.call("mix_rows", [out, local, remote, np.int64(local.shape[0]), indptr, indices, weights,
                                        np.int64(rows), np.int64(d)], rows * d)

    def _csr_bounds(self, indptr, indices) -> Tuple[Any, Any, bool, int]:
        """Check a CSR pair's contents once and remember the result while both live.

        Reading the bounds costs a pass over both arrays (and a copy to the host from a
        GPU), more than a small mix; plans are built once and never modified, so the
        result is kept, keyed by the two arrays' ids with weak references that drop the
        entry when either array dies (a new array reusing an id is checked afresh).
        Writing into a pair's contents after its first mix is therefore not supported.
        """
        first, last, monotone = _indptr_bounds(indptr)
        lo, hi = _index_bounds(indices)
        return _remember(self._csr, indptr, indices,
                         first >= 0 and last <= indices.shape[0] and monotone and lo >= 0, hi)

    def _mix_error(self, arrays) -> ValueError:
        """The first thing wrong with mix_rows' arguments (built only on failure)."""
        names = ARRAYS["mix_rows"]
        for name, a, dt in zip(names, arrays, (F32, F32, F32, np.int64, np.int64, F32)):
            if not hasattr(a, "dtype") or not hasattr(a, "flags"):
                return ValueError(f"kernel argument mix_rows.{name} must be a C-contiguous "
                                  f"{np.dtype(dt).name} array, got {type(a).__name__}")
            try:
                _check("mix_rows", name, a, dt)
            except ValueError as exc:
                return exc
        out, local, remote, indptr, indices, weights = arrays
        if out.ndim != 2:
            return ValueError(f"kernel mix_rows: out must be 2-D (rows, d), got {_describe(out)}")
        rows, d = out.shape
        for name, a in (("local", local), ("remote", remote)):
            if a.ndim != 2 or a.shape[1] != d:
                return ValueError(f"kernel mix_rows: {name} must be 2-D with out's row length d = {d}, "
                                  f"got {_describe(a)}")
        if indptr.shape != (rows + 1,):
            return ValueError(f"kernel mix_rows: indptr must have shape ({rows + 1},) (out's rows + 1), "
                              f"got {_describe(indptr)}")
        if indices.ndim != 1 or weights.shape != indices.shape:
            return ValueError(f"kernel mix_rows: indices and weights must be 1-D of one length, "
                              f"got indices {_describe(indices)} and weights {_describe(weights)}")
        first, last, monotone = _indptr_bounds(indptr)
        if first < 0 or last > indices.shape[0] or not monotone:
            return ValueError(f"kernel mix_rows: indptr must be non-decreasing within [0, {indices.shape[0]}] "
                              f"(the length of indices), got first {first}, last {last}, "
                              f"non-decreasing={monotone}")
        lo, hi = _index_bounds(indices)
        n_src = local.shape[0] + remote.shape[0]
        return ValueError(f"kernel mix_rows: indices must lie in [0, {n_src}) (local rows {local.shape[0]} "
                          f"+ remote rows {remote.shape[0]}), got min {lo}, max {hi}")


class LinearPass:
    """One bound keyed_linear_loss_grad: the fixed operands are checked (dtypes, shapes,
    counts >= 1 and starts + counts within the data) and, for the CPU build, turned into
    C arguments once, and kept alive while the pass lives. A call checks only what
    changes, loss (rows,), G (rows, d), X (rows, d) and steps ((rows,) or (1,) int64), so
    a simulation's per-step cost is the C pass itself, not the Python checks around it.
    """

    OP = "keyed_linear_loss_grad"

    def __init__(self, kernels: Kernels, data, y, keys, counts, starts, B: int, w: float, l2: float,
                 logistic: bool):
        op = self.OP
        _check_named(op, (("data", data, F32), ("y", y, F32), ("keys", keys, _I64), ("counts", counts, _I64),
                          ("starts", starts, _I64)))
        rows = keys.shape[0] if keys.ndim == 1 else -1
        f = data.shape[1] if data.ndim == 2 else -1
        if rows < 0 or f < 0 or B < 1 or y.shape != (data.shape[0],):
            raise ValueError(f"kernel {op}: shapes data {data.shape}, y {y.shape}, keys {keys.shape} do not fit "
                             f"data (N, f), y (N,), keys (rows,) with B = {B} >= 1")
        kernels._keyed_stride(op, rows, data.shape[0], "rows of data", keys, np.zeros(1, np.int64), counts, starts)
        self.rows, self.f, self.d, self.B = rows, f, f + (1 if logistic else 0), int(B)
        self.shape_x = (rows, self.d)  # the models' (and the gradients') shape a call takes
        self.w, self.l2, self.logistic = F32(w), F32(l2), bool(logistic)
        self._kernels = kernels
        self._operands = (data, y, keys, counts, starts)
        if kernels.impl == "cpu":
            c = ctypes

            def ptr(a):
                return c.c_void_p(a.ctypes.data)
            self._fn = kernels._lib._fns[op]
            self._middle = (ptr(data), ptr(y), ptr(keys))
            self._tail = (ptr(counts), ptr(starts), c.c_float(float(self.w)), c.c_float(float(self.l2)),
                          c.c_longlong(rows), c.c_longlong(self.B), c.c_longlong(f), c.c_longlong(int(logistic)))

    def __call__(self, loss, G, X, steps) -> None:
        op, rows, d = self.OP, self.rows, self.d
        for name, a, dt in (("loss", loss, _F32), ("G", G, _F32), ("X", X, _F32), ("steps", steps, _I64)):
            if not hasattr(a, "flags") or a.dtype != dt or not a.flags.c_contiguous:
                _check_named(op, ((name, a, dt),))
        if X.shape != (rows, d) or G.shape != (rows, d) or loss.shape != (rows,):
            raise ValueError(f"kernel {op}: shapes loss {loss.shape}, G {G.shape}, X {X.shape} do not fit "
                             f"(rows, d) = ({rows}, {d}) of this pass")
        if steps.shape != (1,) and steps.shape != (rows,):
            raise ValueError(f"kernel {op}: steps has shape {steps.shape}; it must be (1,) or ({rows},)")
        stride = 0 if steps.shape == (1,) and rows != 1 else 1
        data, y, keys, counts, starts = self._operands
        impl = self._kernels.impl
        if impl == "numpy" or not rows:
            f, B = self.f, self.B
            A = np.empty((rows, B, f), np.float32)
            idx = np.empty((rows, B), np.int64)
            ref_keyed_gather(A, idx, data, keys, steps, stride, counts, starts)
            ref_linear_loss_grad(loss, G, X, A, y[idx], np.full((rows, B), self.w, np.float32), self.l2,
                                 self.logistic)
        elif impl == "cpu":
            self._fn(loss.ctypes.data, G.ctypes.data, X.ctypes.data, *self._middle, steps.ctypes.data, stride,
                     *self._tail)
        else:
            self._kernels._lib.call(op, [loss, G, X, data, y, keys, steps, np.int64(stride), counts, starts,
                                         self.w, self.l2, np.int64(rows), np.int64(self.B), np.int64(self.f),
                                         np.int64(self.logistic)], rows)
