"""Hybrid asynchronous -> synchronous parameter-server SGD (Vora, Joshi, Patel 2024,
arXiv 2407.00101), on a deterministic simulated clock.

W workers (the run's nodes) pull the parameters theta, compute a minibatch gradient on
their own data, and push it tagged with the version they read. The server buffers
gradients; as soon as the buffer holds K or more it applies their mean (or sum,
`algorithm.aggregate`) as one update and releases exactly the workers whose gradients
were used, which pull the new theta. The threshold K follows a schedule:
  step      K = min(W, K0 + K_inc * floor(u / S)), u = gradients received (the paper's),
            counted before the arriving one: the decision on the (u+1)-th gradient uses
            K(u), so K first rises for gradient S + 1 (with K0 = 1, S = 3 and W = 4 the
            updates hold 1, 1, 1, 2, 3, 4, 4, ... gradients; tested);
  linear    K = min(W, K0 + (W - K0) * time / ramp)  (rounded down);
  constant  K = K0: K = 1 is asynchronous SGD, K = W synchronous SGD, one code path.
Defaults where the paper leaves a choice: K0 = 1, increment 1, mean, and delays
|N(0, s)| (negative draws folded) added per gradient on a fixed fraction of the workers.

Clock `simulated`: a discrete-event simulation. A gradient takes `compute_time` seconds
plus its injected delay; events are processed in time order (ties by worker id), so a
run is reproducible to the bit and independent of the number of ranks (every rank runs
the same simulation over all workers' data; rank 0 records it). Workers released
together read the same theta and compute their gradients as one batch; the buffered
gradients are combined in worker order with the same fused row-sum as `comm.mean`, so
K = W reproduces synchronous SGD exactly. Staleness of an applied gradient = server
version at the update minus the version the worker read. The whole simulation state
(event queue, buffered and in-flight gradients, counters) is part of a checkpoint, so a
stopped run resumes bit for bit; a checkpoint is taken after an update, its step is the
server version.
"""
from __future__ import annotations

import heapq
import time
from typing import Callable, Dict, NamedTuple, Optional

import numpy as np

from .. import optim
from ..data import keyed_bits, step_rng

SHARDED: tuple = ()
# the simulated clock's state beyond theta and m, saved with every checkpoint
SIM_FIELDS = ("sim_grads", "sim_losses", "sim_read", "sim_count", "sim_sent", "sim_compute_seconds",
              "sim_delay_seconds", "sim_blocked_seconds", "sim_sent_at", "sim_event_time", "sim_event_worker",
              "sim_buffer", "sim_staleness", "sim_buffer_sizes", "sim_clock")


class State(NamedTuple):
    theta: object  # (d,) the server's parameters
    m: object  # (d,) momentum buffer, or (0,)


def threshold(alg, W: int, received: int, now: float) -> int:
    """K for the next update: a pure function of gradients received and time."""
    kind = alg.threshold.value
    if kind == "constant":
        k = alg.k0
    elif kind == "step":
        k = alg.k0 + alg.k_increment * (received // alg.k_every)
    else:
        k = alg.k0 + int((W - alg.k0) * now / alg.k_ramp)
    return int(max(1, min(W, k)))


def delayed_workers(seed: int, W: int, fraction: float) -> np.ndarray:
    """Which workers get injected delays: a seeded choice of round(fraction * W)."""
    mask = np.zeros(W, bool)
    mask[step_rng(seed, 0, 23).permutation(W)[:int(round(fraction * W))]] = True
    return mask


def injected_delay(seed: int, worker: int, count: int, std: float) -> float:
    """|N(0, std)| for the count-th gradient of a worker (Box-Muller on keyed bits)."""
    bits = keyed_bits(seed, [worker], count, 2, stream=29)[0]
    u1, u2 = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)
    return float(abs(std * np.sqrt(-2.0 * np.log(u1)) * np.cos(2 * np.pi * u2)))


def row_mean(ctx, G, scale: float):
    """scale * sum of G's rows in row order: the fused row-sum `comm.mean` uses."""
    out = ctx.backend.empty((G.shape[1],))
    ctx.kernels.row_sum(out, G, scale)
    return out


def init(ctx, x0) -> State:
    b = ctx.backend
    theta = b.asarray(x0).copy()
    return State(theta, b.zeros(theta.shape if optim.uses_momentum(ctx.cfg.optimizer) else (0,)))


def simulate(ctx, state: State, on_grid: Callable[[Dict], None],
             control: Optional[Callable[[int, Callable[[], Dict]], bool]] = None,
             resume: Optional[Dict] = None) -> Dict:
    """Run the simulated budget; `on_grid(row)` is called at every grid time.

    `control(version, snapshot)` runs after every update; `snapshot()` gives the
    simulation state (SIM_FIELDS) for a checkpoint, and a true return value stops the
    run there (result "stopped"). `resume` is such a snapshot to continue from, with
    `state` restored from the same checkpoint.
    """
    cfg, alg, b, xp = ctx.cfg, ctx.cfg.algorithm, ctx.backend, ctx.backend.xp
    W = ctx.comm.n
    data, model = ctx.workspace["all_nodes"], ctx.model
    seed = cfg.run.seed
    slow = delayed_workers(seed, W, alg.delay_fraction)
    budget_t = alg.budget_seconds if alg.budget_seconds > 0 else np.inf
    budget_g = alg.budget_gradients if alg.budget_gradients > 0 else np.inf
    grid_dt = alg.time_grid if alg.time_grid > 0 else (budget_t / 50 if np.isfinite(budget_t) else 1.0)
    d = state.theta.shape[0]
    grads = b.zeros((W, d))
    losses = np.zeros(W)
    read = np.zeros(W, np.int64)  # version each worker's current gradient was computed at
    count = np.zeros(W, np.int64)  # gradients each worker has computed
    stats = {k: np.zeros(W) for k in ("sent", "compute_seconds", "delay_seconds", "blocked_seconds")}
    sent_at = np.zeros(W)
    events: list = []
    version, received, now = 0, 0, 0.0
    buffer: list = []
    staleness: list = []
    buffer_sizes: list = []
    lr_total = cfg.run.steps
    next_grid = 0.0
    if resume is not None:
        grads[...] = b.asarray(resume["sim_grads"])
        losses[:], read[:], count[:], sent_at[:] = (resume[k] for k in ("sim_losses", "sim_read", "sim_count",
                                                                       "sim_sent_at"))
        for k in stats:
            stats[k][:] = resume["sim_" + k]
        events = [(float(t), int(r)) for t, r in zip(resume["sim_event_time"], resume["sim_event_worker"])]
        buffer = [int(r) for r in resume["sim_buffer"]]
        staleness = [int(v) for v in resume["sim_staleness"]]
        buffer_sizes = [int(v) for v in resume["sim_buffer_sizes"]]
        clock = resume["sim_clock"]
        version, received, now, next_grid = int(clock[0]), int(clock[1]), float(clock[2]), float(clock[3])
        emitted = int(clock[4])
    else:
        emitted = 0  # grid rows handed to on_grid

    def snapshot() -> Dict:
        """The simulation state after the current event (host arrays; the heap kept in its order)."""
        return {"sim_grads": b.to_host(grads), "sim_losses": losses.copy(), "sim_read": read.copy(),
                "sim_count": count.copy(), "sim_sent_at": sent_at.copy(),
                **{"sim_" + k: v.copy() for k, v in stats.items()},
                "sim_event_time": np.array([e[0] for e in events], np.float64),
                "sim_event_worker": np.array([e[1] for e in events], np.int64),
                "sim_buffer": np.array(buffer, np.int64), "sim_staleness": np.array(staleness, np.int64),
                "sim_buffer_sizes": np.array(buffer_sizes, np.int64),
                "sim_clock": np.array([version, received, now, next_grid, emitted], np.float64)}

    def release(workers: np.ndarray, t: float) -> None:
        rows = np.sort(workers)
        if not len(rows):
            return
        A, y, w = data.batch_for(rows, count[rows])  # keyed by (seed, worker, gradient count)
        X = xp.broadcast_to(state.theta[None, :], (len(rows), d))
        loss, G = model.loss_grad(X, A, y, w)
        grads[xp.asarray(rows)] = G
        losses[rows] = b.to_host(loss)
        for r in rows:
            delay = injected_delay(seed, int(r), int(count[r]), alg.delay_std) if slow[r] else 0.0
            stats["blocked_seconds"][r] += t - sent_at[r] if count[r] else 0.0
            stats["compute_seconds"][r] += alg.compute_time
            stats["delay_seconds"][r] += delay
            read[r] = version
            heapq.heappush(events, (t + alg.compute_time + delay, int(r)))
            count[r] += 1

    def emit_until(t: float) -> None:
        nonlocal next_grid, emitted
        while next_grid <= min(t, budget_t):
            emitted += 1
            on_grid({"time": next_grid, "version": version, "received": received,
                     "K": threshold(alg, W, received, next_grid), "buffer": len(buffer),
                     "train_loss": float(losses[count > 0].mean()) if (count > 0).any() else np.nan,
                     "theta": state.theta})
            next_grid += grid_dt

    if resume is None:
        release(np.arange(W), 0.0)
    stopped = False
    while events:
        t, r = heapq.heappop(events)
        if t > budget_t or received >= budget_g:
            heapq.heappush(events, (t, r))
            break
        emit_until(t)
        now = t
        K = threshold(alg, W, received, now)  # u = gradients received before this one
        received += 1
        stats["sent"][r] += 1
        sent_at[r] = t
        buffer.append(r)
        if len(buffer) >= K:
            rows = np.sort(np.asarray(buffer))
            buffer_sizes.append(len(rows))
            staleness.extend((version - read[rows]).tolist())
            G = grads[xp.asarray(rows)]
            g = row_mean(ctx, G, 1.0 if alg.aggregate.value == "sum" else 1.0 / len(rows))
            lr = optim.lr_at(cfg.optimizer, version, lr_total)
            optim.apply(ctx.kernels, state.theta, g, state.m, lr, cfg.optimizer)
            version += 1
            buffer = []
            release(rows, now)
            if control is not None and control(version, snapshot):
                stopped = True
                break
    end = now if stopped or not np.isfinite(budget_t) else budget_t
    if not stopped:
        emit_until(end)
    # every received gradient is applied once or dropped (still buffered at the end);
    # gradients being computed at the end were never sent
    return {"updates": version, "received": received, "dropped": len(buffer), "in_flight": len(events),
            "applied": len(staleness), "staleness": np.asarray(staleness),
            "buffer_sizes": np.asarray(buffer_sizes), "workers": stats, "delayed": slow, "end_time": end,
            "stopped": stopped, "snapshot": snapshot()}


# ---------------------------------------------------------------------------------------
# wall clock: rank 0 is the server, rank w + 1 is worker w (real MPI messages)

TAG_GRAD, TAG_PARAM = 21, 22
STOP, GO = 1.0, 0.0


def _pack_version(v: int):
    return float(v % 65536), float(v // 65536)  # both exact in float32


def serve(ctx, state: State, on_grid: Callable[[Dict], None],
          stop: Optional[Callable[[], bool]] = None) -> Dict:
    """The parameter server's loop (rank 0): buffer, apply at >= K, release, stop cleanly.

    Waits poll a posted any-source receive and sleep between polls (back-off up to
    comm.poll), so a waiting server uses little CPU. A true `stop()` (a signal) ends the
    run early through the same clean shutdown as the end of the budget.

    Each worker has one send buffer and at most one send request: before the buffer is
    written again the previous send to that worker is completed (MPI forbids touching a
    buffer whose send is pending; it has normally completed long before, since the
    worker answered it), and the completed request is dropped, so at most W requests
    are alive at any time.
    """
    cfg, alg, b, comm = ctx.cfg, ctx.cfg.algorithm, ctx.backend, ctx.comm
    W, d = comm.n, state.theta.shape[0]
    budget_t = alg.budget_seconds if alg.budget_seconds > 0 else np.inf
    budget_g = alg.budget_gradients if alg.budget_gradients > 0 else np.inf
    grid_dt = alg.time_grid if alg.time_grid > 0 else (budget_t / 50 if np.isfinite(budget_t) else 1.0)
    grads = np.zeros((W, d), np.float32)
    last_loss = np.full(W, np.nan)
    read = np.zeros(W, np.int64)
    recv_buf = np.empty(d + 3, np.float32)
    send_bufs = [np.empty(d + 3, np.float32) for _ in range(W)]
    sends: list = [None] * W  # the pending (or completed, not yet collected) send to each worker
    version, received = 0, 0
    buffer: list = []
    staleness: list = []
    buffer_sizes: list = []
    in_flight = set()

    def release(workers, cmd=GO):
        for w in workers:
            if sends[w] is not None:  # complete the previous send before its buffer is reused
                comm.wait([sends[w]], "hybrid_param", [w + 1])
                sends[w] = None
            buf = send_bufs[w]
            buf[:d] = b.to_host(state.theta)
            buf[d], buf[d + 1], buf[d + 2] = cmd, *_pack_version(version)
            sends[w] = comm.isend(buf, w + 1, TAG_PARAM, "hybrid_param")
            if cmd == GO:
                in_flight.add(w)

    def receive(src):
        nonlocal received
        w = src - 1
        grads[w] = recv_buf[:d]
        last_loss[w] = recv_buf[d]
        read[w] = int(recv_buf[d + 1]) + 65536 * int(recv_buf[d + 2])
        received += 1
        in_flight.discard(w)
        return w

    t0 = time.perf_counter()
    next_grid = 0.0

    def emit_until(now):
        nonlocal next_grid
        while next_grid <= now:
            on_grid({"time": next_grid, "version": version, "received": received,
                     "K": threshold(alg, W, received, next_grid), "buffer": len(buffer),
                     "train_loss": float(np.nanmean(last_loss)) if np.isfinite(last_loss).any() else np.nan,
                     "theta": state.theta})
            next_grid += grid_dt

    release(range(W))
    pending = comm.irecv_any(recv_buf, TAG_GRAD)
    nap = 1e-5
    stopped = False
    while True:
        now = time.perf_counter() - t0
        emit_until(min(now, budget_t))
        if now >= budget_t or received >= budget_g:
            break
        if stop is not None and stop():
            stopped = True
            break
        src = comm.test_any(pending)
        if src < 0:
            time.sleep(nap)
            nap = min(2 * nap, comm.poll)
            continue
        nap = 1e-5
        K = threshold(alg, W, received, now)  # u = gradients received before this one
        buffer.append(receive(src))
        pending = comm.irecv_any(recv_buf, TAG_GRAD)
        if len(buffer) >= K:
            rows = np.sort(np.asarray(buffer))
            buffer_sizes.append(len(rows))
            staleness.extend((version - read[rows]).tolist())
            G = b.asarray(grads[rows])
            g = row_mean(ctx, G, 1.0 if alg.aggregate.value == "sum" else 1.0 / len(rows))
            optim.apply(ctx.kernels, state.theta, g, state.m, optim.lr_at(cfg.optimizer, version, cfg.run.steps),
                        cfg.optimizer)
            version += 1
            buffer = []
            release(rows)
    end = min(time.perf_counter() - t0, budget_t) if np.isfinite(budget_t) else time.perf_counter() - t0
    # shutdown: the buffered gradients are dropped; workers still computing send one more
    # gradient, which is received and dropped, then every worker gets STOP
    dropped = len(buffer)
    release(buffer, STOP)
    while in_flight:
        src = comm.test_any(pending)
        if src < 0:
            time.sleep(nap)
            nap = min(2 * nap, comm.poll)
            continue
        w = receive(src)
        dropped += 1
        release([w], STOP)
        if in_flight:
            pending = comm.irecv_any(recv_buf, TAG_GRAD)
        else:
            pending = None
    if pending is not None:
        comm.cancel(pending)
    last = [(r, w + 1) for w, r in enumerate(sends) if r is not None]
    comm.wait([r for r, _ in last], "hybrid_param", [p for _, p in last])
    return {"updates": version, "received": received, "dropped": dropped, "in_flight": 0,
            "applied": len(staleness), "staleness": np.asarray(staleness), "end_time": end,
            "buffer_sizes": np.asarray(buffer_sizes), "stopped": stopped}


def work(ctx) -> Dict[str, float]:
    """A worker's loop: pull theta, compute, sleep the injected delay, push; until STOP."""
    cfg, alg, b, comm = ctx.cfg, ctx.cfg.algorithm, ctx.backend, ctx.comm
    w = comm.lo  # this rank's single node is worker w
    d = ctx.model.d
    slow = delayed_workers(cfg.run.seed, comm.n, alg.delay_fraction)[w]
    buf = np.empty(d + 3, np.float32)
    out = np.empty(d + 3, np.float32)
    stats = {"sent": 0.0, "compute_seconds": 0.0, "delay_seconds": 0.0, "blocked_seconds": 0.0}
    count = 0
    while True:
        t0 = time.perf_counter()
        comm.recv(buf, 0, TAG_PARAM, "hybrid_param", spin=0.0)
        if count:
            stats["blocked_seconds"] += time.perf_counter() - t0
        if buf[d] == STOP:
            break
        t1 = time.perf_counter()
        A, y, wts = ctx.data.batch_for([0], [count])
        loss, G = ctx.model.loss_grad(b.asarray(buf[:d])[None, :], A, y, wts)
        out[:d] = b.to_host(G[0])
        out[d] = float(b.to_host(loss)[0])
        out[d + 1], out[d + 2] = buf[d + 1], buf[d + 2]
        spent = time.perf_counter() - t1
        if spent < alg.compute_time:  # a gradient takes compute_time, as on the simulated clock
            time.sleep(alg.compute_time - spent)
        stats["compute_seconds"] += time.perf_counter() - t1
        delay = injected_delay(cfg.run.seed, w, count, alg.delay_std) if slow else 0.0
        time.sleep(delay)
        stats["delay_seconds"] += delay
        comm.wait([comm.isend(out, 0, TAG_GRAD, "hybrid_grad")], "hybrid_grad", [0])
        stats["sent"] += 1
        count += 1
    return stats
