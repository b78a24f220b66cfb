import pytest

from tests.helpers import check, run_script


@pytest.mark.parametrize("ranks", [1, 2, 4])
@pytest.mark.parametrize("mode", ["host", "direct", "staged"])
def test_collectives_exact(ranks, mode):
    proc = check(run_script(ranks, "collectives.py", mode, timeout=120))
    assert proc.stdout.count("collectives ok") == ranks
