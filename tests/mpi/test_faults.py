import time

from tests.helpers import run_script


def test_hung_peer_aborts_the_job_naming_op_step_and_peer():
    t0 = time.monotonic()
    proc = run_script(2, "hang.py", timeout=60)
    assert proc.returncode != 0
    assert "not reached" not in proc.stdout
    assert "in mix at step 42 for rank 1" in proc.stderr
    assert time.monotonic() - t0 < 30  # aborted well before the sleeping rank woke up
