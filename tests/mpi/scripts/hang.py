"""Rank 1 never takes part in the mix: rank 0 must abort the job after comm.timeout."""
import time

import numpy as np

from hpcopt import topology
from hpcopt.comm import Comm

c = Comm(2, timeout=1.0)
c.step = 42
if c.rank == 1:
    time.sleep(30)
else:
    c.mix(np.ones((1, 4), np.float32), topology.build("ring", 2).mixing_matrix(0))
print("not reached", flush=True)
