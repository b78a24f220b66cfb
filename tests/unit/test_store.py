import json
import os

import numpy as np

from hpcopt import store


def write_ckpt(run, step, ranks=2, n=6):
    X = np.arange(n * 3, dtype=np.float32).reshape(n, 3) + step
    bounds = np.linspace(0, n, ranks + 1).astype(int)
    shards = []
    for r in range(ranks):
        lo, hi = bounds[r], bounds[r + 1]
        rep = {"x": np.full(3, step, np.float32)} if r == 0 else {}
        name, digest = store.write_shard(run, step, r, lo, hi, {"X": X[lo:hi]}, rep)
        shards.append({"rank": r, "file": name, "sha256": digest, "lo": int(lo), "hi": int(hi)})
    store.write_complete(run, step, shards, {"ranks": ranks, "nodes": n})
    return X


def test_checkpoint_round_trip_on_other_rank_counts(tmp_path):
    run = str(tmp_path)
    X = write_ckpt(run, 10, ranks=2)
    info, skipped = store.latest(run)
    assert info["step"] == 10 and not skipped
    for lo, hi in [(0, 6), (1, 4), (5, 6)]:
        got = store.read_state(run, info, lo, hi, ["X"], ["x"])
        assert np.array_equal(got["X"], X[lo:hi]) and np.array_equal(got["x"], np.full(3, 10))


def test_incomplete_and_corrupt_checkpoints_are_skipped(tmp_path):
    run = str(tmp_path)
    write_ckpt(run, 10)
    write_ckpt(run, 20)
    write_ckpt(run, 30)
    os.remove(os.path.join(store.step_dir(run, 30), "COMPLETE"))
    shard = os.path.join(store.step_dir(run, 20), "rank-00001.h5")
    with open(shard, "r+b") as fh:
        fh.seek(200)
        fh.write(b"garbage")
    info, skipped = store.latest(run)
    assert info["step"] == 10
    assert any("incomplete" in s for s in skipped) and any("checksum" in s for s in skipped)


def test_prune_keeps_newest_complete(tmp_path):
    run = str(tmp_path)
    for s in (1, 2, 3, 4):
        write_ckpt(run, s)
    removed = store.prune(run, 2)
    assert removed == [1, 2] and store.list_steps(run) == [3, 4]
    with open(os.path.join(store.step_dir(run, 4), "COMPLETE")) as fh:
        assert json.load(fh)["nodes"] == 6


def test_run_file_append_truncate_and_read(tmp_path):
    rf = store.RunFile(str(tmp_path))
    rf.create("run: {}\n", {"ranks": 2, "nodes": 4})
    rf.append("metrics", {"step": np.arange(5), "train_loss": np.ones((5, 4))})
    rf.append("metrics", {"step": np.arange(5, 8), "train_loss": np.zeros((3, 4))})
    rf.event(3, "resume", "hello")
    run = store.read_run(str(tmp_path))
    assert run["metrics"]["train_loss"].shape == (8, 4)
    assert run["events"]["kind"][0] == "resume" and run["attrs"]["nodes"] == 4
    assert rf.truncate(6) == 2
    assert store.read_run(str(tmp_path))["metrics"]["step"].tolist() == list(range(6))
