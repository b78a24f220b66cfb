"""Tokens moved by the Teleportation schedule are never duplicated or lost, across ranks."""
import numpy as np
from mpi4py import MPI

from hpcopt.algorithms.teleport import active_nodes
from hpcopt.comm import Comm

n, k, d = 12, 5, 6
c = Comm(n, timeout=60)
X = np.full((c.local_n, d), -1.0, np.float32)
nodes = active_nodes(4, 0, n, [k])
for j, v in enumerate(nodes):  # token j carries its id in every coordinate
    if c.lo <= v < c.hi:
        X[v - c.lo] = j
for t in range(200):
    nxt = active_nodes(4, t + 1, n, [k])
    c.move(X, nodes, nxt)
    nodes = nxt
    ids = c.allgather_nodes(X[:, 0])
    found = ids[nodes]
    assert np.array_equal(found, np.arange(k)), (t, found)  # each token exactly where scheduled
    assert np.all(c.allgather_nodes(X.std(axis=1)) == 0)  # rows moved whole
sent = c.counters["move"].bytes
total = c.allreduce_scalars([float(sent)])[0]
if MPI.COMM_WORLD.size > 1:
    assert total > 0
print(f"rank {c.rank}: tokens conserved", flush=True)
