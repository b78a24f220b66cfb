"""Directed (non-symmetric, doubly stochastic) mixing across ranks: `mix` receives from a
node's in-neighbours and sends to its out-neighbours, and equals W @ X exactly.

Run by pytest, this file launches itself under mpiexec (the part under __main__).
"""
import sys

import numpy as np
import pytest

from hpcopt import store, topology
from tests.helpers import REPO, check, run_hpcopt_mpi, run_mpi, run_script

QUICK = str(REPO / "configs" / "quickstart.yaml")


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_mix_with_a_non_symmetric_matrix_is_w_times_x_on_any_number_of_ranks(ranks):
    proc = check(run_mpi(ranks, [__file__], timeout=120))
    assert proc.stdout.count("directed mix ok") == ranks


def rows_sent(W, ranks):
    """Rows all ranks send per mix with 16 nodes in equal blocks: for every pair of ranks,
    the sender's nodes named in the receiver's rows of W."""
    block = 16 // ranks
    return sum(int((W[q * block:(q + 1) * block, r * block:(r + 1) * block] != 0).any(axis=0).sum())
               for q in range(ranks) for r in range(ranks) if q != r)


def test_dsgd_on_the_directed_exponential_graph_is_rank_count_invariant_and_converges(tmp_path):
    finals = []
    for ranks in (1, 4):
        out = tmp_path / f"r{ranks}"
        check(run_hpcopt_mpi(ranks, ["run", QUICK, "--out", out, "--set", "run.steps=30", "--set", "run.eval_every=0",
                                     "--set", "topology.name=exponential_directed"]))
        info, _ = store.latest(str(out))
        finals.append(store.read_state(str(out), info, 0, 16, ["X"], [])["X"])
        if ranks > 1:  # a rank sends each peer the rows its nodes' out-neighbours there need
            run = store.read_run(str(out))
            d = finals[0].shape[1]
            directed = rows_sent(topology.build("exponential_directed", 16).mixing_matrix(0), ranks)
            undirected = rows_sent(topology.build("exponential", 16).mixing_matrix(0), ranks)
            assert (directed, undirected) == (32, 48)
            assert np.all(run["metrics"]["bytes_mix"].sum(axis=1) == directed * d * 4)
    assert np.array_equal(finals[0], finals[1])  # neighbour sums in global node order: the same bits
    proc = check(run_script(2, "conformance.py", "exponential_directed", "1e-2", str(tmp_path), timeout=300))
    assert "exponential_directed:" in proc.stdout


def _main():
    from mpi4py import MPI

    from hpcopt.comm import Comm
    from hpcopt.kernels import Kernels

    n = 16
    c = Comm(n, kernels=Kernels(), timeout=60)
    full = np.random.default_rng(7).integers(-64, 64, size=(n, 9)).astype(np.float32)
    X = np.ascontiguousarray(full[c.lo:c.hi])
    rng = np.random.default_rng(11)
    perms = [np.eye(n)[rng.permutation(n)] for _ in range(3)]
    W_dyadic = 0.5 * perms[0] + 0.25 * perms[1] + 0.25 * perms[2]  # products and sums exact in float32
    topology.check_mixing_matrix(W_dyadic, symmetric=False)
    assert not np.array_equal(W_dyadic, W_dyadic.T)
    got = c.mix(X, W_dyadic)
    assert np.array_equal(got, (W_dyadic @ full.astype(np.float64)).astype(np.float32)[c.lo:c.hi]), "dyadic W"
    W = topology.build("exponential_directed", n).mixing_matrix(0)
    got = c.mix(X, W)
    ref = np.zeros_like(full)  # float32 sums in increasing node order, as the plan adds them
    for i in range(n):
        for j in np.nonzero(W[i])[0]:
            ref[i] += np.float32(W[i, j]) * full[j]
    assert np.array_equal(got, ref[c.lo:c.hi]), "exponential_directed"
    assert np.allclose(got, (W @ full.astype(np.float64))[c.lo:c.hi], atol=1e-4)
    # in- and out-neighbours differ: the plan receives from the owners of the columns of
    # this rank's rows and sends to the owners of the rows that name this rank's columns
    plan = c.plan(W)
    owner = c.placement.owner(np.arange(n))
    mine = (owner == c.rank)
    expect_recv = sorted({int(owner[j]) for i in np.nonzero(mine)[0] for j in np.nonzero(W[i])[0] if not mine[j]})
    expect_send = sorted({int(owner[i]) for j in np.nonzero(mine)[0] for i in np.nonzero(W[:, j])[0] if not mine[i]})
    assert sorted(q for q, _, _ in plan.recv) == expect_recv, (plan.recv, expect_recv)
    assert sorted(q for q, _ in plan.send) == expect_send, (plan.send, expect_send)
    if MPI.COMM_WORLD.size == 4:
        r = c.rank
        assert expect_recv == sorted({(r - 1) % 4, (r - 2) % 4}) and expect_send == sorted({(r + 1) % 4, (r + 2) % 4})
    print(f"rank {c.rank}: directed mix ok", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _main()
