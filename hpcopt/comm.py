"""All MPI in hpcopt: node placement, neighbour mixing, means, token moves, gathers.

n nodes are placed on P ranks in contiguous blocks (the first n mod P ranks hold one
extra node). A rank holds its nodes' rows as one `(local_n, d)` array; `mix`, `mean` and
`move` take and return such blocks, so algorithms never see ranks.

* `mix(X, W)`: rows of W @ X for this rank's nodes; W is a `topology.Sparse` (CSR; a
  dense array is accepted for small n). From the sparsity of W and the placement a
  plan (built vectorised over W's entries, O(nnz), no dense n x n array) lists, per peer
  rank, which local rows it needs and where received rows land; plans are cached per
  matrix. Messages are Isend/Irecv of row blocks (a view when the rows are contiguous),
  and the weighted sum is one fused kernel over local rows plus received rows
  (`Kernels.mix_rows`). Terms are summed in increasing
  global node order, so results do not depend on the number of ranks.
* `mean(X)`: average of all nodes' rows (local sum, then one Allreduce).
* `move(X, src, dst)`: row of node src[i] is written to node dst[i] (Teleportation's
  token moves); a local copy when both ends share a rank.
* Device buffers: with a CUDA-aware MPI (detected once, lazily; overridable) device
  arrays go to MPI directly after the producing stream is synchronised; otherwise they
  are staged through pinned host buffers.
  The stream rule: everything that writes a device buffer (the fused kernels, CuPy, and
  torch, which the torch backend runs on an external stream wrapping CuPy's current
  stream, exchanging arrays through DLPack without copies) is queued on the rank's one
  current stream, and that stream is synchronised before MPI is handed the buffer (send
  or receive) and before a staged copy is read on the host. Buffers handed to MPI are
  C-contiguous with positive strides (rows of the `(local_n, d)` blocks, or the blocks).
* Waits are polite (test and yield the core for a few milliseconds, then test and sleep
  with a back-off) so oversubscribed CPU ranks leave the cores to each other, and a wait
  longer than `timeout` seconds aborts the
  whole job with a message naming the operation, the step and the peer.
* Small operations (all-reduces of at most `blocking_bytes`, mixes sending at most that
  much) use the MPI library's blocking `Allreduce` / `Waitall` instead: for a few
  kilobytes a nonblocking all-reduce plus polling from Python costs more than the
  transfer itself (10-40 us per call with 4 ranks on 2 cores). The timeout still holds:
  a watchdog thread, armed for the duration of the call, aborts the job with the same
  message. The price: a rank waiting there for a late peer keeps its core busy (the
  library polls). So the default (`blocking_bytes = -1`, auto) blocks up to 1 MiB only
  where every host has a core per rank (the union of the ranks' CPU affinities), and
  waits politely everywhere when ranks share cores; all ranks agree on the choice, since
  blocking and nonblocking collectives do not match each other. (Needs
  MPI_THREAD_MULTIPLE; with a lower thread level every wait is polite.)
* Every operation counts calls, bytes sent and seconds (`counters`).
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import backend as backend_mod
from .kernels import Kernels

TAG_MIX, TAG_MOVE, TAG_TOKEN = 11, 12, 14
AUTO_BLOCKING_BYTES = 1 << 20  # comm.blocking_bytes = auto where ranks do not share cores


class Placement:
    """Contiguous block placement of n nodes over `size` ranks (uneven allowed).

    With `server=True` rank 0 holds no node (a parameter server) and the nodes go to
    ranks 1..size-1.
    """

    def __init__(self, n: int, size: int, server: bool = False):
        workers = size - 1 if server else size
        if workers > n or workers < 1:
            raise ValueError(f"{workers} worker ranks for {n} nodes: every worker rank needs at least one node")
        base, extra = divmod(n, workers)
        counts = ([0] if server else []) + [base + (1 if r < extra else 0) for r in range(workers)]
        self.n, self.size = n, size
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def range(self, rank: int) -> Tuple[int, int]:
        return int(self.starts[rank]), int(self.starts[rank + 1])

    def count(self, rank: int) -> int:
        lo, hi = self.range(rank)
        return hi - lo

    def owner(self, node) -> Any:
        return np.searchsorted(self.starts, node, side="right") - 1

    def counts(self) -> np.ndarray:
        return np.diff(self.starts)


@dataclass
class OpCounter:
    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0


@dataclass
class MixPlan:
    indptr: Any  # int64 (local_n + 1,) on the device
    indices: Any  # int64, < local_n: local row; >= local_n: received row
    weights: Any  # float32
    recv: List[Tuple[int, int, int]]  # (peer, first slot, number of rows)
    send: List[Tuple[int, Any]]  # (peer, local row indices, sorted)
    n_remote: int
    buffers: Dict[int, Any]  # d -> (remote rows, {peer: send buffer})


class CommTimeout(RuntimeError):
    pass


def world_size() -> int:
    """Number of ranks in the job (initialises MPI on first use); checks the launcher."""
    from mpi4py import MPI
    size = MPI.COMM_WORLD.Get_size()
    check_launcher(size)
    return size


# the world size the launcher gave this process: MPI launchers' own variables first (an
# mpiexec inside a Slurm allocation starts its proxies as one Slurm task per host), then
# the Slurm step's task count (set in an srun step, not in the batch script)
LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_size(environ=None) -> Tuple[Optional[int], str]:
    """(number of processes the launcher started as one job, the variable that says so),
    or (None, "") where no launcher variable is set (a plain `python` run)."""
    env = os.environ if environ is None else environ
    for var in LAUNCHER_SIZE_VARS:
        if env.get(var, "").isdigit():
            return int(env[var]), var
    if env.get("SLURM_STEP_ID", "") != "":
        for var in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
            if env.get(var, "").isdigit():
                return int(env[var]), var
    return None, ""


def check_launcher(size: int, environ=None) -> None:
    """Raise ConfigError when the launcher started more (or other) processes than MPI's
    world holds: `srun` without a working MPI plugin, or an `mpiexec` of another MPI
    library, starts N copies that each see a world of 1 and would all write one run."""
    launched, var = launched_size(environ)
    if launched is None or launched == size:
        return
    from .config import ConfigError
    raise ConfigError(
        f"launcher mismatch: this process is one of {launched} tasks ({var}={launched}) but MPI sees a world of "
        f"{size}, so the tasks are not one MPI job (srun without a working MPI plugin, or an mpiexec of another "
        f"MPI library than mpi4py's); with the mpich wheel use `srun --mpi=pmi2` or `mpiexec -n {launched}` inside "
        f"the allocation, with a site MPI the srun --mpi type it supports (`srun --mpi=list`); nothing was written")


def library_versions() -> Dict[str, str]:
    import mpi4py
    from mpi4py import MPI
    return {"mpi_vendor": MPI.Get_library_version().splitlines()[0].strip(), "mpi4py_version": mpi4py.__version__}


def finalize_if_started() -> None:
    """End MPI cleanly on an exit every rank reached together (config error, requeue).

    Under `python -m mpi4py` a non-zero exit status otherwise turns into MPI_Abort, which
    adds launcher noise to the one-line message.
    """
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()


def abort_if_started(code: int) -> None:
    """Abort the whole job after an unexpected error on this rank, instead of letting the
    other ranks hang in their next collective."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized() and mpi.COMM_WORLD.Get_size() > 1:
        mpi.COMM_WORLD.Abort(code)


def detect_cuda_aware() -> Tuple[bool, str]:
    """Whether the loaded MPI library accepts device pointers, and how we know."""
    try:
        fn = ctypes.CDLL(None).MPIX_Query_cuda_support
        fn.restype = ctypes.c_int
        return bool(fn()), "MPIX_Query_cuda_support"
    except (AttributeError, OSError):
        pass
    for var in ("MV2_USE_CUDA", "MPICH_GPU_SUPPORT_ENABLED", "OMPI_MCA_opal_cuda_support"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes"):
            return True, f"environment {var}"
    return False, "no CUDA support reported by the MPI library"


class Comm:
    """The communication layer of one rank; see the module docstring."""

    def __init__(self, n_nodes: int, *, backend: Optional[backend_mod.Backend] = None,
                 kernels: Optional[Kernels] = None, timeout: float = 300.0, poll: float = 2e-4,
                 spin: float = 0.01, cuda_aware: str = "auto", mpi_comm: Any = None, server: bool = False,
                 blocking_bytes: int = -1):
        from mpi4py import MPI
        self.MPI = MPI
        if mpi_comm is None:
            check_launcher(MPI.COMM_WORLD.Get_size())
        self.comm = (mpi_comm if mpi_comm is not None else MPI.COMM_WORLD).Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.placement = Placement(n_nodes, self.size, server)
        self.n = n_nodes
        self._inv_n = np.float32(1.0 / n_nodes)
        self.lo, self.hi = self.placement.range(self.rank)
        self.local_n = self.hi - self.lo
        shared = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = shared.Get_rank(), shared.Get_size()
        # cores this host's ranks may run on (the union of their CPU affinities)
        cores = set().union(*shared.allgather(sorted(os.sched_getaffinity(0))))
        shared.Free()
        self.oversubscribed = bool(self.comm.allreduce(int(self.local_size > len(cores)), op=MPI.MAX))
        self.backend = backend or backend_mod.cpu()
        self.kernels = kernels or Kernels(on_gpu=self.backend.on_gpu, mode="numpy")
        self.timeout, self.poll, self.spin = float(timeout), float(poll), float(spin)
        self.cuda_aware_setting = cuda_aware
        self._cuda_aware: Optional[bool] = None
        self.cuda_aware_reason = "not needed: host arrays"
        self.counters: Dict[str, OpCounter] = {}
        self._totals: Tuple[int, float] = (0, 0.0)  # totals() of the counters
        self.wait_seconds = 0.0  # time spent blocked in waits (part of the ops' seconds)
        self.step = -1  # set by the runner; named in timeout messages
        self._plans: Dict[int, Tuple[np.ndarray, MixPlan]] = {}
        self._pinned: Dict[Tuple, Any] = {}  # staging buffers and small cached operands
        self._mpi_ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
        self._in_place = MPI.IN_PLACE
        # small collectives block under a watchdog only where a second thread may call MPI;
        # auto (-1): 1 MiB when every host has a core per rank, else polite (ranks share cores)
        threaded = MPI.Query_thread() >= MPI.THREAD_MULTIPLE
        if blocking_bytes < 0:
            blocking_bytes = 0 if self.oversubscribed else AUTO_BLOCKING_BYTES
        self.blocking_bytes = int(blocking_bytes) if threaded and blocking_bytes > 0 else -1  # -1: always polite
        self._armed: Optional[Tuple[float, str, Sequence[int]]] = None  # (deadline, op, peers) of a blocking call
        self._closed = False
        if self.blocking_bytes >= 0 and self.size > 1:
            threading.Thread(target=_watchdog, args=(weakref.ref(self), min(0.5, self.timeout / 8)),
                             name="hpcopt-comm-watchdog", daemon=True).start()

    # ---------------------------------------------------------------------------------
    # bookkeeping

    def _count(self, op: str, nbytes: int, seconds: float) -> None:
        c = self.counters.get(op)
        if c is None:
            c = self.counters[op] = OpCounter()
        c.calls += 1
        c.bytes += int(nbytes)
        c.seconds += seconds
        self._totals = (self._totals[0] + int(nbytes), self._totals[1] + seconds)

    def totals(self) -> Tuple[int, float]:
        """(bytes sent, seconds) summed over all operations so far (kept as they are
        counted: the runner reads them twice a step)."""
        return self._totals

    @property
    def cuda_aware(self) -> bool:
        if self._cuda_aware is None:
            if self.cuda_aware_setting == "yes":
                self._cuda_aware, self.cuda_aware_reason = True, "config device.cuda_aware: yes"
            elif self.cuda_aware_setting == "no":
                self._cuda_aware, self.cuda_aware_reason = False, "config device.cuda_aware: no"
            else:
                self._cuda_aware, self.cuda_aware_reason = detect_cuda_aware()
        return self._cuda_aware

    def _abort(self, op: str, peers: Sequence[int]) -> None:
        who = f"rank {', '.join(map(str, peers))}" if peers else "the other ranks (collective)"
        msg = (f"hpcopt: rank {self.rank}: waited more than comm.timeout = {self.timeout:g} s in {op} "
               f"at step {self.step} for {who}; aborting the job")
        print(msg, file=sys.stderr, flush=True)
        self.comm.Abort(3)
        raise CommTimeout(msg)  # only reached with a fake communicator in tests

    def _blocking(self, op: str, peers: Sequence[int], call, *args) -> None:
        """call(*args), a blocking MPI call, with the watchdog armed for `timeout` seconds
        (its time counts as waiting: it cannot be told apart from the transfer)."""
        t0 = time.perf_counter()
        self._armed = (t0 + self.timeout, op, peers)
        try:
            call(*args)
        finally:
            self._armed = None
            self.wait_seconds += time.perf_counter() - t0

    # -- parameter-server messages (the hybrid method's wall clock) ----------------------

    def irecv_any(self, buf, tag: int):
        """Post a receive from any rank; returns (request, status) for `test_any`."""
        return self.comm.Irecv(buf, source=self.MPI.ANY_SOURCE, tag=tag), self.MPI.Status()

    def test_any(self, pending) -> int:
        """Source rank of a completed `irecv_any`, or -1 while it is pending."""
        req, status = pending
        return status.Get_source() if req.Test(status) else -1

    def cancel(self, pending) -> None:
        req, _ = pending
        req.Cancel()
        req.Wait()

    def isend(self, buf, dest: int, tag: int, op: str = "send"):
        t0 = time.perf_counter()
        req = self.comm.Isend(buf, dest=dest, tag=tag)
        self._count(op, buf.nbytes, time.perf_counter() - t0)
        return req

    def recv(self, buf, source: int, tag: int, op: str = "recv", spin: Optional[float] = None) -> None:
        """Receive into buf with a polite wait (spin 0: sleep from the start)."""
        t0 = time.perf_counter()
        saved = self.spin
        if spin is not None:
            self.spin = spin
        try:
            self.wait([self.comm.Irecv(buf, source=source, tag=tag)], op, [source])
        finally:
            self.spin = saved
        self._count(op, 0, time.perf_counter() - t0)

    def wait(self, requests: List[Any], op: str, peers: Sequence[int] = ()) -> None:
        """Complete all requests politely.

        For the first `spin` seconds the rank tests and yields its core (sched_yield), so
        a peer sharing the core runs at once and shared-memory transfers, which need both
        ends to make progress, keep moving. After that it tests and sleeps with a back-off
        up to `poll` seconds, so a rank waiting for a straggler uses almost no CPU.
        """
        if not requests:
            return
        MPI = self.MPI
        if MPI.Request.Testall(requests):
            return
        t0 = time.perf_counter()
        nap = 1e-5
        try:
            self._poll(requests, op, peers, t0, nap)
        finally:
            self.wait_seconds += time.perf_counter() - t0

    def _poll(self, requests, op, peers, t0, nap) -> None:
        MPI = self.MPI
        while not MPI.Request.Testall(requests):
            waited = time.perf_counter() - t0
            if waited < self.spin:
                os.sched_yield()
                continue
            if waited > self.timeout:
                pending = [p for r, p in zip(requests, peers) if not r.Test()] if peers else []
                self._abort(op, pending)
            time.sleep(nap)
            nap = min(nap * 2, self.poll)

    # ---------------------------------------------------------------------------------
    # device buffers

    def _host(self, tag: str, peer: int, shape: Tuple[int, ...]) -> np.ndarray:
        key = (tag, peer, tuple(shape))
        buf = self._pinned.get(key)
        if buf is None:
            buf = self.backend.pinned_empty(shape)
            self._pinned[key] = buf
        return buf

    def _send_buf(self, a, tag: str, peer: int):
        if not self.backend.is_device_array(a):
            return a
        if self.cuda_aware:
            self.backend.synchronize()
            return self.backend.device_view(a)
        host = self._host("s" + tag, peer, a.shape)
        self.backend.copy_to_host(a, host)
        return host

    def _recv_buf(self, a, tag: str, peer: int):
        """(buffer to hand MPI, callback to run after completion or None)."""
        if not self.backend.is_device_array(a):
            return a, None
        if self.cuda_aware:
            self.backend.synchronize()
            return self.backend.device_view(a), None
        host = self._host("r" + tag, peer, a.shape)
        return host, (lambda: self.backend.copy_from_host(host, a))

    # ---------------------------------------------------------------------------------
    # mixing

    MAX_PLANS = 64  # static graphs need one plan, time-varying ones one per phase (17 at n = 1e5)

    def plan(self, W) -> MixPlan:
        """The message plan of W (a topology.Sparse or, for small n, a dense array), built
        once per matrix object and cached while it lives in the cache."""
        hit = self._plans.get(id(W))
        if hit is not None and hit[0] is W:
            return hit[1]
        plan = self._build_plan(W)
        if len(self._plans) >= self.MAX_PLANS:
            self._plans.pop(next(iter(self._plans)))
        self._plans[id(W)] = (W, plan)
        return plan

    def bytes_by_op(self, ops: Sequence[str]) -> List[int]:
        return [self.counters[o].bytes if o in self.counters else 0 for o in ops]

    def _build_plan(self, W) -> MixPlan:
        """Vectorised over the matrix's entries (no loop over nodes or edges): O(nnz)."""
        from .topology import Sparse
        if not isinstance(W, Sparse):
            if getattr(W, "shape", None) != (self.n, self.n):
                raise ValueError(f"mixing matrix is {getattr(W, 'shape', None)}, expected ({self.n}, {self.n})")
            W = Sparse.from_dense(W)
        elif W.n != self.n:
            raise ValueError(f"mixing matrix is ({W.n}, {W.n}), expected ({self.n}, {self.n})")
        lo, hi = self.lo, self.hi
        a, b = int(W.indptr[lo]), int(W.indptr[hi])
        cols = W.indices[a:b]  # my rows' entries, columns ascending within each row
        local = (cols >= lo) & (cols < hi)
        remote = _unique(cols[~local])  # sorted, so grouped by owner rank
        indices = np.where(local, cols - lo, self.local_n + np.searchsorted(remote, cols))
        indptr = W.indptr[lo:hi + 1] - a
        weights = W.data[a:b].astype(np.float32)
        recv = []
        if remote.size:
            owners = self.placement.owner(remote)
            peers, first, count = np.unique(owners, return_index=True, return_counts=True)
            recv = [(int(q), int(f), int(c)) for q, f, c in zip(peers, first, count)]
        # rows of mine that other ranks' rows name: entries (row r elsewhere, column c mine)
        rows = W.row_ids()
        mine_col = (W.indices >= lo) & (W.indices < hi)
        other_row = (rows < lo) | (rows >= hi)
        sel = mine_col & other_row
        send = []
        if sel.any():
            q = self.placement.owner(rows[sel]).astype(np.int64)
            key = _unique(q * self.n + W.indices[sel])  # sorted by peer, then by node
            qs, cs = key // self.n, key % self.n
            peers, first = np.unique(qs, return_index=True)
            bounds = list(first) + [len(qs)]
            send = [(int(p), cs[bounds[i]:bounds[i + 1]] - lo) for i, p in enumerate(peers)]
        xp = self.backend.xp
        return MixPlan(xp.asarray(np.ascontiguousarray(indptr, np.int64)),
                       xp.asarray(np.ascontiguousarray(indices, np.int64)),
                       xp.asarray(weights), recv, send, int(remote.size), {})

    def _plan_buffers(self, plan: MixPlan, d: int):
        bufs = plan.buffers.get(d)
        if bufs is None:
            remote = self.backend.empty((plan.n_remote, d))
            packs = {}
            for q, rows in plan.send:
                if not _contiguous(rows):
                    packs[q] = (self.backend.empty((len(rows), d)), self.backend.xp.asarray(rows))
            bufs = (remote, packs)
            plan.buffers[d] = bufs
        return bufs

    def mix_begin(self, X, W):
        """Post the messages of X -> W @ X; finish with `mix_end` (compute may overlap)."""
        t0 = time.perf_counter()
        plan = self.plan(W)
        d = X.shape[1]
        remote, packs = self._plan_buffers(plan, d)
        reqs, peers, after = [], [], []
        for q, first, count in plan.recv:
            buf, cb = self._recv_buf(remote[first:first + count], "mix", q)
            reqs.append(self.comm.Irecv(buf, source=q, tag=TAG_MIX))
            peers.append(q)
            if cb:
                after.append(cb)
        nbytes = 0
        for q, rows in plan.send:
            if q in packs:
                buf, idx = packs[q]
                self.backend.xp.take(X, idx, axis=0, out=buf)
            else:
                buf = X[int(rows[0]):int(rows[-1]) + 1]
            reqs.append(self.comm.Isend(self._send_buf(buf, "mix", q), dest=q, tag=TAG_MIX))
            peers.append(q)
            nbytes += buf.nbytes
        return (X, plan, remote, reqs, peers, after, nbytes, time.perf_counter() - t0)

    def mix_end(self, handle, out=None):
        X, plan, remote, reqs, peers, after, nbytes, spent = handle
        t0 = time.perf_counter()
        if not reqs:  # every row is local (one rank, or a rank whose rows mix only with its own)
            pass
        elif nbytes <= self.blocking_bytes:
            self._blocking("mix", peers, self.MPI.Request.Waitall, reqs)
        else:
            self.wait(reqs, "mix", peers)
        for cb in after:
            cb()
        if out is None:
            out = self.backend.empty(X.shape)
        self.kernels.mix_rows(out, X, remote, plan.indptr, plan.indices, plan.weights)
        self._count("mix", nbytes, spent + time.perf_counter() - t0)
        return out

    def mix(self, X, W, out=None):
        """Rows lo..hi of W @ X_all, where X_all stacks every rank's X."""
        return self.mix_end(self.mix_begin(X, W), out)

    def mix_tokens(self, X, nodes, W) -> Any:
        """In place: x_{nodes[j]} <- sum_l W[j, l] x_{nodes[l]} for the K rows `nodes` (distinct
        global node ids, the same list on every rank) and a K x K `topology.Sparse` W.

        Only the K rows move: a plan of O(nnz(W) + K) is built per call (vectorised), each
        rank receives the rows its rows of W name and sends its rows to the ranks whose rows
        name them; terms are summed in increasing global node order with float32 weights,
        exactly as `mix` sums the same rows of the n x n matrix that embeds W (rows of other
        nodes being the identity), so results do not depend on the number of ranks.
        """
        t0 = time.perf_counter()
        nodes = np.asarray(nodes, np.int64)
        lo, hi, me = self.lo, self.hi, self.rank
        owner = self.placement.owner(nodes)
        rows, cols, vals = W.row_ids(), W.indices, W.data
        keep = vals != 0
        rows, cols, vals = rows[keep], cols[keep], vals[keep]
        mine_row = owner[rows] == me
        # what I compute: my slots' rows, terms in increasing node order of the source slot
        r, c, v = rows[mine_row], cols[mine_row], vals[mine_row]
        order = np.lexsort((nodes[c], nodes[r]))
        r, c, v = r[order], c[order], v[order]
        out_nodes = _unique(nodes[r]) if r.size else r
        src = nodes[c]
        here = (src >= lo) & (src < hi)
        remote = _unique(src[~here])
        indices = np.where(here, src - lo, self.local_n + np.searchsorted(remote, src))
        indptr = np.zeros(len(out_nodes) + 1, np.int64)
        np.cumsum(np.bincount(np.searchsorted(out_nodes, nodes[r]), minlength=len(out_nodes)), out=indptr[1:])
        # what I send: my slots' rows named by other ranks' rows
        sel = (~mine_row) & (owner[cols] == me)
        sends = []
        if sel.any():
            key = _unique(owner[rows[sel]].astype(np.int64) * self.n + nodes[cols[sel]])
            qs, ns = key // self.n, key % self.n
            peers, first = np.unique(qs, return_index=True)
            bounds = list(first) + [len(qs)]
            sends = [(int(q), ns[bounds[i]:bounds[i + 1]] - lo) for i, q in enumerate(peers)]
        xp, d = self.backend.xp, X.shape[1]
        buf = self.backend.empty((len(remote), d))
        reqs, peers_, after, nbytes = [], [], [], 0
        if remote.size:
            rown = self.placement.owner(remote)
            qs, first, count = np.unique(rown, return_index=True, return_counts=True)
            for q, f, k in zip(qs, first, count):
                rb, cb = self._recv_buf(buf[f:f + k], "token", int(q))
                reqs.append(self.comm.Irecv(rb, source=int(q), tag=TAG_TOKEN))
                peers_.append(int(q))
                if cb:
                    after.append(cb)
        for q, lrows in sends:
            sb = xp.ascontiguousarray(X[xp.asarray(lrows)])
            reqs.append(self.comm.Isend(self._send_buf(sb, "token", q), dest=q, tag=TAG_TOKEN))
            peers_.append(q)
            nbytes += sb.nbytes
        if reqs:
            self.wait(reqs, "mix", peers_)
        for cb in after:
            cb()
        if len(out_nodes):
            out = self.backend.empty((len(out_nodes), d))
            self.kernels.mix_rows(out, X, buf, xp.asarray(indptr), xp.asarray(np.ascontiguousarray(indices)),
                                  xp.asarray(v.astype(np.float32)))
            X[xp.asarray(out_nodes - lo)] = out
        self._count("mix", nbytes, time.perf_counter() - t0)
        return X

    # ---------------------------------------------------------------------------------
    # collectives

    def _allreduce(self, send, recv, nbytes: int, mpi_op, name: str) -> None:
        """One all-reduce of MPI-ready buffers: blocking under the watchdog when small,
        otherwise nonblocking with a polite wait."""
        if nbytes <= self.blocking_bytes:
            self._blocking(name, (), self.comm.Allreduce, send, recv, mpi_op)
        else:
            self.wait([self.comm.Iallreduce(send, recv, op=mpi_op)], name)

    def _reduce(self, a, op: str, name: str, out=None):
        mpi_op = self._mpi_ops[op]
        if out is None:
            out = self.backend.xp.empty_like(a) if self.backend.is_device_array(a) else np.empty_like(a)
        if self.size == 1:
            out[...] = a
            return out
        send = self._send_buf(a, name, -1)
        recv, cb = self._recv_buf(out, name, -1)
        self._allreduce(send, recv, out.nbytes, mpi_op, name)
        if cb:
            cb()
        return out

    def allreduce(self, a, op: str = "sum", name: str = "allreduce", out=None):
        """Element-wise reduction (sum, max, min) of a host or device array over ranks."""
        t0 = time.perf_counter()
        out = self._reduce(a, op, name, out)
        self._count(name, a.nbytes if self.size > 1 else 0, time.perf_counter() - t0)
        return out

    def _reduce_inplace(self, buf, op: str, name: str):
        """Reduce `buf` over ranks in place (MPI_IN_PLACE)."""
        if self.size == 1:
            return buf
        mpi_op = self._mpi_ops[op]
        if type(buf) is np.ndarray or not self.backend.is_device_array(buf):  # host arrays: the common case first
            self._allreduce(self._in_place, buf, buf.nbytes, mpi_op, name)
            return buf
        if not self.cuda_aware:
            host = self._host("r" + name, -1, buf.shape)
            self.backend.copy_to_host(buf, host)
            self._allreduce(self._in_place, host, buf.nbytes, mpi_op, name)
            self.backend.copy_from_host(host, buf)
            return buf
        self.backend.synchronize()
        self._allreduce(self._in_place, self.backend.device_view(buf), buf.nbytes, mpi_op, name)
        return buf

    def mean(self, X, out=None):
        """Average of all n nodes' rows: shape (d,), written to `out` or a new array.

        One fused pass writes sum_i x_i / n over the local rows into `out` (the copy an
        all-reduce makes anyway), then one in-place all-reduce sums over ranks.
        """
        t0 = time.perf_counter()
        if out is None:
            out = self.backend.empty((X.shape[1],))
        self.kernels.row_sum(out, X, self._inv_n)
        self._reduce_inplace(out, "sum", "mean")
        self._count("mean", out.nbytes if self.size > 1 else 0, time.perf_counter() - t0)
        return out

    def mean_many(self, blocks: Sequence[Any], out=None):
        """Node averages of several (local_n, d_k) blocks in ONE all-reduce: returns the
        concatenation (sum_k d_k,) without ever concatenating the blocks themselves."""
        t0 = time.perf_counter()
        widths = [b.shape[1] for b in blocks]
        if out is None:
            out = self.backend.empty((sum(widths),))
        off = 0
        for b, w in zip(blocks, widths):
            self.kernels.row_sum(out[off:off + w], b, 1.0 / self.n)
            off += w
        self._reduce_inplace(out, "sum", "mean")
        self._count("mean", out.nbytes if self.size > 1 else 0, time.perf_counter() - t0)
        return out

    def allreduce_scalars(self, values, op: str = "sum") -> np.ndarray:
        """Reduce a small host float64 vector over ranks."""
        a = np.array(values, dtype=np.float64)
        if self.size == 1:  # every step calls this: one rank has nothing to reduce
            self._count("scalars", 0, 0.0)
            return a
        return self.allreduce(a, op, name="scalars")

    def agree(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank (used for stop requests)."""
        return bool(self.allreduce(np.array([1.0 if flag else 0.0]), "max", name="agree")[0])

    def allgather_nodes(self, values) -> np.ndarray:
        """Per-local-node host values (local_n, ...) -> all nodes (n, ...) on every rank."""
        t0 = time.perf_counter()
        v = np.ascontiguousarray(values, dtype=np.float64)
        inner = int(np.prod(v.shape[1:])) if v.ndim > 1 else 1
        out = np.empty((self.n,) + v.shape[1:], dtype=np.float64)
        counts = self.placement.counts() * inner
        displs = self.placement.starts[:-1] * inner
        if self.size == 1:
            out[...] = v
        else:
            req = self.comm.Iallgatherv(v, [out, counts, displs, self.MPI.DOUBLE])
            self.wait([req], "allgather")
        self._count("allgather", v.nbytes if self.size > 1 else 0, time.perf_counter() - t0)
        return out

    def gather_ranks(self, values) -> Optional[np.ndarray]:
        """A host float64 vector per rank -> (size, len) on rank 0 (None elsewhere)."""
        v = np.ascontiguousarray(values, dtype=np.float64)
        out = np.empty((self.size,) + v.shape, dtype=np.float64) if self.rank == 0 else None
        if self.size == 1:
            out[0] = v
            return out
        self.wait([self.comm.Igather(v, out, root=0)], "gather")
        return out

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return self.comm.bcast(obj, root=root)

    def gather_obj(self, obj: Any, root: int = 0) -> Optional[List[Any]]:
        return self.comm.gather(obj, root=root)

    def barrier(self) -> None:
        if self.size > 1:
            self.wait([self.comm.Ibarrier()], "barrier")

    # ---------------------------------------------------------------------------------
    # token moves

    def move(self, X, src: Sequence[int], dst: Sequence[int]):
        """In place: row of node src[i] is written to node dst[i], for all i at once.

        Every rank passes the same (src, dst) lists; dst entries must be distinct.
        Pairs with src == dst are skipped; pairs within a rank are row copies; rows for
        one peer rank travel as one message. Sources are read before any destination is
        written, so moves may form cycles.
        """
        t0 = time.perf_counter()
        src = np.asarray(src, dtype=np.int64)
        dst = np.asarray(dst, dtype=np.int64)
        keep = src != dst
        src, dst = src[keep], dst[keep]
        own_s, own_d = self.placement.owner(src), self.placement.owner(dst)
        xp = self.backend.xp
        me = self.rank
        reqs, peers, after, nbytes = [], [], [], 0
        d = X.shape[1]
        incoming = {}
        for q in np.unique(own_s[(own_d == me) & (own_s != me)]):
            sel = np.nonzero((own_d == me) & (own_s == q))[0]
            buf = self.backend.empty((len(sel), d))
            rbuf, cb = self._recv_buf(buf, "move", int(q))
            reqs.append(self.comm.Irecv(rbuf, source=int(q), tag=TAG_MOVE))
            peers.append(int(q))
            if cb:
                after.append(cb)
            incoming[int(q)] = (sel, buf)
        for q in np.unique(own_d[(own_s == me) & (own_d != me)]):
            sel = np.nonzero((own_s == me) & (own_d == q))[0]
            buf = xp.ascontiguousarray(X[xp.asarray(src[sel] - self.lo)])
            reqs.append(self.comm.Isend(self._send_buf(buf, "move", int(q)), dest=int(q), tag=TAG_MOVE))
            peers.append(int(q))
            nbytes += buf.nbytes
        local = np.nonzero((own_s == me) & (own_d == me))[0]
        rows = X[xp.asarray(src[local] - self.lo)].copy() if local.size else None
        self.wait(reqs, "move", peers)
        for cb in after:
            cb()
        if rows is not None:
            X[xp.asarray(dst[local] - self.lo)] = rows
        for sel, buf in incoming.values():
            X[xp.asarray(dst[sel] - self.lo)] = buf
        self._count("move", nbytes, time.perf_counter() - t0)
        return X

    def free(self) -> None:
        self._closed = True  # ends the watchdog thread
        try:
            self.comm.Free()
        except Exception:  # noqa: BLE001 -- already finalized at interpreter exit
            pass


def _watchdog(ref, period: float) -> None:
    """The watchdog thread of one Comm: wakes every `period` seconds and aborts the job when
    a blocking call has outlived its deadline. It holds no lock and only a weak reference,
    so the calling thread pays two assignments per call and a dropped or freed Comm ends it."""
    while True:
        time.sleep(period)
        comm = ref()
        if comm is None or comm._closed:
            return
        armed = comm._armed
        if armed is not None and time.perf_counter() > armed[0] and comm._armed is armed:
            comm._abort(armed[1], sorted(set(armed[2])))
        del comm


def _unique(a: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an int64 array (sort-based: NumPy 2's hash-based unique is
    several times slower on millions of entries)."""
    a = np.sort(a)
    return a[np.concatenate([[True], a[1:] != a[:-1]])] if a.size else a


def _contiguous(rows) -> bool:
    rows = np.asarray(rows)
    return rows.size > 0 and int(rows[-1]) - int(rows[0]) + 1 == rows.size
