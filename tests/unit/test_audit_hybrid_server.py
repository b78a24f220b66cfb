"""The hybrid parameter server without MPI: the wall-clock server against a fake comm
(send buffers, requests, the K schedule) and the simulated clock's K schedule, both
against a hand-computed schedule."""
from collections import deque

import numpy as np

from hpcopt import algorithms, backend, config, data, models
from hpcopt.algorithms import hybrid
from hpcopt.kernels import Kernels

# W = 4 workers, K = min(W, 1 + floor(u / 3)) with u the gradients received BEFORE the one
# arriving. Workers answer in the order they were released (ties by worker id):
#   gradient  1  2  3 | 4  5 | 6  7  8 | 9 10 11 12 | 13..16 | ...
#   u         0  1  2 | 3  4 | 5  6  7 | 8  9 10 11 |
#   K         1  1  1 | 2  2 | 2  3  3 | 3  4  4  4 |   4
#   update    1  1  1 |    2 |       3 |          4 |   4
HAND_SCHEDULE = [1, 1, 1, 2, 3, 4]


def hybrid_cfg(**alg):
    return config.from_dict({"nodes": {"n": 4}, "optimizer": {"lr": 0.1},
                             "algorithm": {"name": "hybrid", "threshold": "step", "k0": 1, "k_every": 3, **alg}})


class Request:
    def __init__(self, buf):
        self.buf, self.copy = buf, buf.copy()


class FakeServerComm:
    """What `hybrid.serve` uses of comm.Comm. Workers answer every GO at once, in the order
    the GOs were sent; a send request completes only in `wait` (as MPI's does in Wait/Test),
    and every call checks that no pending send's buffer was written."""

    def __init__(self, W, d):
        self.n, self.d, self.poll = W, d, 1e-4
        self.pending, self.answers = [], deque()
        self.max_pending, self.overwritten, self.sent = 0, 0, 0

    def _check(self):
        for r in self.pending:
            if not np.array_equal(r.buf, r.copy):
                self.overwritten += 1
                r.copy = r.buf.copy()

    def isend(self, buf, dest, tag, op="send"):
        self._check()
        r = Request(buf)
        self.pending.append(r)
        self.max_pending = max(self.max_pending, len(self.pending))
        if buf[self.d] == hybrid.GO:
            self.answers.append((dest, buf[self.d + 1], buf[self.d + 2]))
        return r

    def wait(self, requests, op, peers=()):
        self._check()
        for r in requests:
            self.pending.remove(r)

    def irecv_any(self, buf, tag):
        return buf

    def test_any(self, buf):
        self._check()
        if not self.answers:
            return -1
        src, v0, v1 = self.answers.popleft()
        buf[:self.d] = 0.01 * src
        buf[self.d], buf[self.d + 1], buf[self.d + 2] = 1.0, v0, v1
        self.sent += 1
        return src

    def cancel(self, pending):
        pass


def test_wall_clock_server_reuses_a_send_buffer_only_after_its_send_completed():
    W, d = 4, 3
    cfg = hybrid_cfg(clock="wall", budget_gradients=40)
    comm = FakeServerComm(W, d)
    ctx = algorithms.Context(cfg, comm, backend.cpu(), Kernels(mode="numpy"), None, None, None, {})
    state = hybrid.State(np.zeros(d, np.float32), np.zeros(0, np.float32))
    res = hybrid.serve(ctx, state, lambda row: None)
    assert comm.overwritten == 0  # no buffer written while its send was pending
    assert comm.max_pending <= W  # one request per worker at most, completed ones dropped
    assert comm.pending == []  # nothing left pending at the end
    assert res["buffer_sizes"].tolist() == HAND_SCHEDULE + [4] * 7  # 12 + 7 * 4 = 40 gradients applied
    assert res["received"] == comm.sent == res["applied"] + res["dropped"] and res["applied"] == 40


def test_simulated_clock_raises_k_after_the_paper_schedule():
    cfg = hybrid_cfg(delay_fraction=0.0, budget_gradients=20, compute_time=0.01)
    ds = data.load(cfg.data, 4)
    parts = data.partition(ds, 4, "iid", seed=cfg.data.seed)
    model = models.build(cfg.model, ds)
    nd = data.NodeData(np, ds, parts, range(4), cfg.data.batch_size, cfg.run.seed)
    comm = type("OnlyN", (), {"n": 4})()
    ctx = algorithms.Context(cfg, comm, backend.cpu(), Kernels(mode="numpy"), model, None, None, {"all_nodes": nd})
    state = hybrid.init(ctx, model.init(0))
    res = hybrid.simulate(ctx, state, lambda row: None)
    # no delays: all four answer at t = 0.01, 0.02, ... (ties by worker id), as above
    assert res["buffer_sizes"].tolist() == HAND_SCHEDULE + [4, 4]
    assert res["received"] == 20 and res["applied"] == 20
