"""Rank 1 never takes part in the operation named by argv[1]: rank 0 must abort the job
after comm.timeout. `mix` waits on a peer; `mean` is a small all-reduce (the blocking call
guarded by the watchdog thread); `mean-polite` forces the nonblocking polite path."""
import sys
import time

import numpy as np

from hpcopt import topology
from hpcopt.comm import Comm

op = sys.argv[1]
c = Comm(2, timeout=1.0, blocking_bytes=0 if op == "mean-polite" else 1 << 20)
c.step = 42
X = np.ones((1, 4), np.float32)
if c.rank == 1:
    time.sleep(30)
elif op == "mix":
    c.mix(X, topology.build("ring", 2).mixing_matrix(0))
else:
    c.mean(X)
print("not reached", flush=True)
