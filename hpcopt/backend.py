"""Array backend: NumPy on the CPU or CuPy on one GPU per rank.

Nothing is probed at import time. `select(kind, local_rank)` decides once per run:
`cpu` always gives NumPy; `gpu` requires CuPy and a visible device (else a one-line
error); `auto` takes the GPU when CuPy imports and sees a device. A rank binds device
`local_rank % device_count`, where local_rank is the rank's index among the ranks on its
own host (an MPI shared-memory split done by `comm`), so job scripts need no
`--gpus-per-task` binding. The dtype of all parameters and state is float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

DTYPE = np.float32


class BackendError(RuntimeError):
    """The requested device is not available (reported as one line)."""


@dataclass
class Backend:
    xp: Any
    name: str  # "cpu" or "gpu"
    device: int = -1  # GPU ordinal, -1 on the CPU
    device_name: str = "cpu"

    @property
    def on_gpu(self) -> bool:
        return self.name == "gpu"

    def asarray(self, a, dtype=DTYPE):
        return self.xp.asarray(a, dtype=dtype)

    def zeros(self, shape, dtype=DTYPE):
        return self.xp.zeros(shape, dtype=dtype)

    def empty(self, shape, dtype=DTYPE):
        return self.xp.empty(shape, dtype=dtype)

    def to_host(self, a) -> np.ndarray:
        if isinstance(a, (np.ndarray, np.generic)) or not hasattr(a, "get"):
            return np.asarray(a)
        return a.get()

    def synchronize(self) -> None:
        if self.on_gpu:
            self.xp.cuda.get_current_stream().synchronize()

    # -- used by comm for host staging of device buffers --------------------------
    def is_device_array(self, a) -> bool:
        return self.on_gpu and not isinstance(a, np.ndarray)

    def device_view(self, a):
        """What MPI receives for a device array on the CUDA-aware path (CuPy: itself)."""
        return a

    def copy_to_host(self, dev, host: np.ndarray) -> None:
        dev.get(out=host)

    def copy_from_host(self, host: np.ndarray, dev) -> None:
        dev.set(host)

    def pinned_empty(self, shape, dtype=DTYPE) -> np.ndarray:
        if not self.on_gpu:
            return np.empty(shape, dtype=dtype)
        import cupy
        count = int(np.prod(shape))
        mem = cupy.cuda.alloc_pinned_memory(max(1, count) * np.dtype(dtype).itemsize)
        return np.frombuffer(mem, dtype=dtype, count=count).reshape(shape)


def cpu() -> Backend:
    return Backend(np, "cpu")


def select(kind: str = "auto", local_rank: int = 0) -> Backend:
    if kind == "cpu":
        return cpu()
    try:
        import cupy
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 -- ImportError, CUDA driver errors, ...
        if kind == "gpu":
            raise BackendError(f"device.kind = 'gpu' is not possible here: CuPy has no usable GPU "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                               f"install hpcopt[gpu] or use device.kind: cpu") from None
        return cpu()
    if count == 0:
        if kind == "gpu":
            raise BackendError("device.kind = 'gpu' is not possible here: CuPy sees no GPU; use device.kind: cpu")
        return cpu()
    dev = local_rank % count
    cupy.cuda.Device(dev).use()
    try:
        name = cupy.cuda.runtime.getDeviceProperties(dev)["name"].decode()
    except Exception:  # noqa: BLE001 -- the name is cosmetic
        name = f"cuda:{dev}"
    return Backend(cupy, "gpu", dev, name)
