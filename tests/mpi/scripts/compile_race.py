"""Every rank builds the CPU kernels into the same empty cache at the same moment."""
import sys
from pathlib import Path

from mpi4py import MPI

from hpcopt import kernels

cache = Path(sys.argv[1])
MPI.COMM_WORLD.Barrier()
path = kernels.build_cpu_library(directory=cache)
k = kernels.Kernels(mode="compiled", cache=cache)
import numpy as np  # noqa: E402

x = np.ones(10, np.float32)
k.sgd(x, np.ones(10, np.float32), 0.5)
assert np.all(x == 0.5)
print(f"rank {MPI.COMM_WORLD.Get_rank()} built {path.name}", flush=True)
