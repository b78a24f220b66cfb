import pytest

from tests.helpers import check, run_script


@pytest.mark.parametrize("ranks", [1, 2, 4])
@pytest.mark.parametrize("mode", ["host", "direct", "staged"])
def test_collectives_exact(ranks, mode):
    proc = check(run_script(ranks, "collectives.py", mode, timeout=120))
    assert proc.stdout.count("collectives ok") == ranks


def test_watchdog_thread_lives_as_long_as_its_comm():
    proc = check(run_script(2, "watchdog_lifetime.py", timeout=60))
    assert proc.stdout.count("ok") == 2


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_blocking_bytes_auto_follows_cores_per_rank(ranks):
    proc = check(run_script(ranks, "blocking_auto.py", timeout=60))
    assert proc.stdout.count("auto") == ranks
