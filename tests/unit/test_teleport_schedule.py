"""Teleportation's pure pieces: active sets, k-search batches, node-level mixing."""
import numpy as np
import pytest

from hpcopt import topology
from hpcopt.algorithms import teleport


def test_every_token_visits_every_node_uniformly():
    n, k, T = 8, 3, 20000
    counts = np.zeros((k, n))
    prev = None
    stay = 0
    for t in range(T):
        a = teleport.active_nodes(7, t, n, [k])
        assert len(set(a.tolist())) == k  # a token never shares a node
        counts[np.arange(k), a] += 1
        if prev is not None:
            stay += (a == prev).sum()
        prev = a
    expect, sd = T / n, np.sqrt(T / n * (1 - 1 / n))
    assert np.abs(counts - expect).max() < 5 * sd  # frequency 1/n within 5 standard deviations
    # moves are independent of the past: a token stays put with probability 1/n
    assert abs(stay / ((T - 1) * k) - 1 / n) < 0.01


def test_active_sets_are_pure_and_blocks_are_disjoint():
    a = teleport.active_nodes(3, 11, 16, [1, 2, 4, 8])
    assert np.array_equal(a, teleport.active_nodes(3, 11, 16, [1, 2, 4, 8])) and len(set(a.tolist())) == 15
    assert not np.array_equal(a, teleport.active_nodes(3, 12, 16, [1, 2, 4, 8]))
    assert np.array_equal(teleport.active_nodes(3, 11, 16, [5], teleport=False), np.arange(5))


@pytest.mark.parametrize("n", [1, 2, 5, 8, 12, 16, 100, 128])
def test_search_batches_cover_candidates_within_n(n):
    batches = teleport.search_batches(n)
    cands = sorted(k for b in batches for k in b)
    assert cands == [1 << i for i in range(n.bit_length()) if (1 << i) <= n]
    assert len(batches) <= 2 and all(sum(b) <= n for b in batches)


def test_node_mixing_matrix_embeds_the_token_graph():
    Wt = topology.build("ring", 4).mixing_matrix(0)
    nodes = np.array([7, 2, 5, 0])
    W = teleport.node_mixing_matrix(8, nodes, [Wt])
    topology.check_mixing_matrix(W, symmetric=True)
    assert np.allclose(W[np.ix_(nodes, nodes)], Wt)
    idle = [1, 3, 4, 6]
    assert np.array_equal(W[np.ix_(idle, idle)], np.eye(4))
    two = teleport.node_mixing_matrix(8, np.array([3, 1, 6]), [np.ones((1, 1)), np.full((2, 2), 0.5)])
    assert two[3, 3] == 1 and two[1, 6] == 0.5 and two[3, 1] == 0


def test_local_sgd_round_schedule():
    from hpcopt.algorithms.local_sgd import round_ends
    assert round_ends(5, 0, 20).tolist() == [5, 10, 15, 20]
    ends = round_ends(1, 21, 100)
    gaps = np.diff(np.concatenate([[0], ends]))
    assert gaps[0] == 1 and gaps[-1] > 10 and np.all(np.diff(gaps) >= 0) and ends[-1] >= 100
