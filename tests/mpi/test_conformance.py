"""Conformance table: D-SGD on every topology reaches the optimum of a heterogeneous
quadratic (relative tolerance 1e-2, measured errors are 1e-3 .. 7e-3) with a decaying step."""
import pytest

from tests.helpers import check, run_script

TOPOLOGIES = ["ring", "torus", "exponential", "one_peer_exponential", "complete", "star", "hypercube",
              "erdos_renyi", "edgelist"]


@pytest.mark.parametrize("half", [TOPOLOGIES[:5], TOPOLOGIES[5:]], ids=["first", "second"])
def test_dsgd_reaches_optimum_on_every_topology(tmp_path, half):
    proc = check(run_script(2, "conformance.py", ",".join(half), "1e-2", str(tmp_path), timeout=300))
    for name in half:
        assert f"{name}:" in proc.stdout
