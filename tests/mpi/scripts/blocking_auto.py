"""comm.blocking_bytes auto: blocking small collectives only where ranks have a core each."""
import os
import sys

from mpi4py import MPI

from hpcopt.comm import AUTO_BLOCKING_BYTES, Comm

c = Comm(MPI.COMM_WORLD.Get_size())
cores = len(os.sched_getaffinity(0))  # mpiexec here binds nothing: every rank sees the same set
expect_over = c.size > cores
assert c.oversubscribed == expect_over, (c.oversubscribed, c.size, cores)
assert c.blocking_bytes == (-1 if expect_over else AUTO_BLOCKING_BYTES), c.blocking_bytes
agreed = MPI.COMM_WORLD.allgather(c.blocking_bytes)
assert len(set(agreed)) == 1, agreed  # one choice on every rank: collectives must match
assert Comm(c.size, blocking_bytes=4096).blocking_bytes == 4096  # an explicit value wins
print("auto", c.blocking_bytes, file=sys.stdout, flush=True)
