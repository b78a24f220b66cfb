import math

import numpy as np
import pytest

from hpcopt import topology
from hpcopt.config import ConfigError

STATIC = ["ring", "torus", "exponential", "complete", "star", "hypercube", "erdos_renyi"]


@pytest.mark.parametrize("name", STATIC)
@pytest.mark.parametrize("n", [1, 2, 8, 16])
def test_static_graphs_are_symmetric_doubly_stochastic_connected(name, n):
    topo = topology.build(name, n, p=0.5, seed=3)
    W = topo.mixing_matrix(0)
    assert W.shape == (n, n)
    assert np.array_equal(W, W.T)
    assert np.allclose(W.sum(0), 1) and np.allclose(W.sum(1), 1) and (W >= 0).all()
    if n > 1:
        assert topology.spectral_gap(W) > 1e-9


def test_ring_gap_matches_closed_form():
    for n in (5, 8, 16):
        W = topology.build("ring", n).mixing_matrix(0)
        lams = [(1 + 2 * math.cos(2 * math.pi * k / n)) / 3 for k in range(1, n)]
        assert topology.spectral_gap(W) == pytest.approx(1 - max(abs(x) for x in lams), abs=1e-12)
        assert np.allclose(W[W > 0], 1 / 3)


def test_complete_is_exact_average_and_hypercube_gap():
    W = topology.build("complete", 8).mixing_matrix(0)
    assert np.allclose(W, 1 / 8) and topology.spectral_gap(W) == pytest.approx(1.0)
    for b in (2, 3, 4):
        W = topology.build("hypercube", 2 ** b).mixing_matrix(0)
        assert topology.spectral_gap(W) == pytest.approx(2 / (b + 1), abs=1e-12)


def test_star_metropolis_weights():
    W = topology.build("star", 5).mixing_matrix(0)
    assert np.allclose(W[0, 1:], 1 / 5) and np.allclose(W[0, 0], 1 / 5)
    assert np.allclose(np.diag(W)[1:], 4 / 5)
    with pytest.raises(ConfigError, match="regular"):
        topology.build("star", 5, weights="uniform")


def test_torus_is_four_regular_with_uniform_weights():
    W = topology.build("torus", 16, weights="uniform").mixing_matrix(0)
    assert ((W > 0).sum(1) == 5).all() and np.allclose(W[W > 0], 1 / 5)


def test_one_peer_exponential_is_time_varying_and_exact_over_a_period():
    topo = topology.build("one_peer_exponential", 16)
    assert topo.period == 4 and topo.directed
    prod = np.eye(16)
    for t in range(4):
        W = topo.mixing_matrix(t)
        topology.check_mixing_matrix(W, symmetric=False)
        assert ((W > 0).sum(1) == 2).all()
        prod = W @ prod
    assert np.allclose(prod, 1 / 16)
    assert topo.mixing_matrix(5) is topo.mixing_matrix(1)


def test_erdos_renyi_reproducible_and_edgelist(tmp_path):
    a = topology.build("erdos_renyi", 12, p=0.3, seed=7).mixing_matrix(0)
    b = topology.build("erdos_renyi", 12, p=0.3, seed=7).mixing_matrix(0)
    assert np.array_equal(a, b)
    f = tmp_path / "g.txt"
    f.write_text("# a path\n0 1\n1 2\n2 3\n")
    W = topology.build("edgelist", 4, path=str(f)).mixing_matrix(0)
    assert np.allclose(W, W.T) and (W[0, 2] == 0) and W[1, 2] > 0
    f.write_text("0 1\n2 3\n")
    with pytest.raises(ConfigError, match="not connected"):
        topology.build("edgelist", 4, path=str(f))
    f.write_text("0 9\n")
    with pytest.raises(ConfigError, match="outside"):
        topology.build("edgelist", 4, path=str(f))


def test_check_rejects_bad_matrices():
    with pytest.raises(ValueError):
        topology.check_mixing_matrix(np.array([[0.6, 0.4], [0.3, 0.7]]))
    with pytest.raises(ValueError):
        topology.check_mixing_matrix(np.array([[1.5, -0.5], [-0.5, 1.5]]))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 16, 17])
def test_directed_exponential_graph_is_the_papers(n):
    """Node i sends to (i + 2^j) mod n, j < ceil(log2 n), all weights 1/(ceil(log2 n) + 1):
    doubly stochastic, not symmetric (n > 3; n = 3 is the complete graph), tau in- and tau
    out-neighbours per node."""
    tau = math.ceil(math.log2(n)) if n > 1 else 0
    topo = topology.build("exponential_directed", n)
    W = topo.mixing_matrix(0)
    assert topo.static and topo.directed
    ref = np.zeros((n, n))
    for i in range(n):
        ref[i, i] += 1.0
        for j in range(tau):
            ref[(i + 2 ** j) % n, i] += 1.0  # row = receiver, column = sender
    assert np.array_equal(W, ref / (tau + 1))
    topology.check_mixing_matrix(W, symmetric=False)
    off = (W > 0) & ~np.eye(n, dtype=bool)
    assert (off.sum(axis=1) == tau).all() and (off.sum(axis=0) == tau).all()  # in- and out-degree
    if n > 3:
        assert not np.array_equal(W, W.T)
        with pytest.raises(ValueError, match="not symmetric"):
            topology.check_mixing_matrix(W, symmetric=True)


def test_directed_exponential_sends_about_half_of_the_undirected_one():
    d = topology.summary(topology.build("exponential_directed", 16))
    u = topology.summary(topology.build("exponential", 16))
    assert (d["degree_min"], d["degree_max"], u["degree_min"]) == (4, 4, 7)
    assert d["edges_per_step"] == 64 and u["edges_per_step"] == 112  # messages per step
    assert d["spectral_gap"] > 0.3  # ||W - 11^T/n||_2 = 0.6 at n = 16


def test_validation_accepts_doubly_stochastic_non_symmetric_matrices_only():
    P = np.roll(np.eye(4), 1, axis=1)
    topology.check_mixing_matrix(0.5 * np.eye(4) + 0.5 * P, symmetric=False)
    with pytest.raises(ValueError, match="columns"):
        bad = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5]])
        topology.check_mixing_matrix(bad, symmetric=False)
    cfg = __import__("hpcopt.config", fromlist=["from_dict"]).from_dict(
        {"algorithm": {"name": "dsgd"}, "topology": {"name": "exponential_directed"}})
    assert topology.from_config(cfg.topology, 16).directed
