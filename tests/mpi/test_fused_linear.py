"""The fused keyed loss/gradient pass (kernels/linear_loss_grad.cu) inside real runs:
D-SGD with a logistic model gives the same bits on 1, 2 and 4 ranks
(Local SGD's all-reduce sums ranks' partial sums, so there only up to float32 rounding),
and the compiled pass equals the NumPy-reference kernels bit for bit."""
import numpy as np
import pytest

from hpcopt import store
from tests.helpers import REPO, check, run_hpcopt_mpi

QUICK = str(REPO / "configs" / "quickstart.yaml")
LOGISTIC = ["--set", "data.dataset=breast_cancer", "--set", "model.name=logistic", "--set", "data.standardize=true",
            "--set", "optimizer.lr=0.2", "--set", "run.steps=60", "--set", "run.eval_every=30",
            "--set", "run.log_every=20", "--set", "run.progress=false"]
CASES = {
    "dsgd_logistic": LOGISTIC + ["--set", "optimizer.momentum=0.5"],
    "local_adam_logistic": LOGISTIC + ["--set", "algorithm.name=local_sgd", "--set", "algorithm.local_steps=5",
                                       "--set", "optimizer.scaling=adam", "--set", "optimizer.lr=0.02"],
}


def final_X(run_dir):
    info, _ = store.latest(str(run_dir))
    return store.read_state(str(run_dir), info, 0, info["nodes"], ["X"], [])["X"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_runs_are_rank_count_invariant_and_equal_the_references(tmp_path, case):
    outs = {}
    for ranks, kernels in ((1, "compiled"), (2, "compiled"), (4, "compiled"), (2, "numpy")):
        out = tmp_path / f"{ranks}-{kernels}"
        check(run_hpcopt_mpi(ranks, ["run", QUICK, "--out", out, *CASES[case], "--set", f"device.kernels={kernels}"]))
        outs[ranks, kernels] = out
    ref = final_X(outs[1, "compiled"])
    start = np.zeros_like(ref)
    assert np.abs(ref - start).max() > 1e-3  # the models moved
    exact = case.startswith("dsgd")
    for key, out in outs.items():
        X = final_X(out)
        if exact:
            assert np.array_equal(X, ref), key
            a = store.read_run(str(out))["metrics"]["train_loss"]
            assert np.array_equal(a, store.read_run(str(outs[1, "compiled"]))["metrics"]["train_loss"]), key
        else:
            np.testing.assert_allclose(X, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    assert np.array_equal(final_X(outs[2, "numpy"]), final_X(outs[2, "compiled"]))
