import errno
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

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


# -- COMPLETE markers of the wrong structure are incomplete ------------------------------


def marker_path(run, step):
    return os.path.join(store.step_dir(run, step), "COMPLETE")


def rewrite_marker(run, step, change):
    with open(marker_path(run, step)) as fh:
        info = json.load(fh)
    info = change(info)
    with open(marker_path(run, step), "w") as fh:
        json.dump(info, fh)


def _set(key, value):
    def change(info):
        info[key] = value
        return info
    return change


def _shard(i, key, value):
    def change(info):
        if value is None:
            del info["shards"][i][key]
        else:
            info["shards"][i][key] = value
        return info
    return change


MALFORMED = {
    "a list": (lambda info: [info], "a JSON list, not an object"),
    "a string": (lambda info: "COMPLETE", "a JSON str, not an object"),
    "null": (lambda info: None, "a JSON NoneType, not an object"),
    "an empty object": (lambda info: {}, "its step is None, not 30"),
    "no shards key": (lambda info: {k: v for k, v in info.items() if k != "shards"}, "'shards' is NoneType"),
    "empty shard list": (_set("shards", []), "it lists no shards"),
    "shards a string": (_set("shards", "rank-00000.h5"), "'shards' is str, not a list"),
    "shard a string": (_set("shards", ["rank-00000.h5"]), "shard 0 is a JSON str"),
    "other step": (_set("step", 20), "its step is 20, not 30"),
    "step a string": (_set("step", "30"), "its step is '30', not 30"),
    "no sha256": (_shard(1, "sha256", None), "shard 1 has no SHA-256"),
    "short sha256": (_shard(0, "sha256", "abc"), "shard 0 has no SHA-256"),
    "no file": (_shard(0, "file", None), "shard 0 has no plain file name"),
    "file outside the step": (_shard(0, "file", "../step-000000020/rank-00000.h5"), "shard 0 has no plain file name"),
    "lo a float": (_shard(0, "lo", 0.0), "shard 0 has no non-negative integer 'lo'"),
    "negative hi": (_shard(1, "hi", -1), "shard 1 has no non-negative integer 'hi'"),
    "no rank": (_shard(1, "rank", None), "shard 1 has no non-negative integer 'rank'"),
    "same rank twice": (_shard(1, "rank", 0), "two shards have the same rank or file"),
    "no rank 0": (lambda info: {**info, "shards": [{**s, "rank": s["rank"] + 1} for s in info["shards"]]},
                  "no shard of rank 0"),
    "a gap": (_shard(1, "lo", 4), "leave a gap or overlap at node 3"),
    "an overlap": (_shard(1, "lo", 2), "leave a gap or overlap at node 2"),
    "fewer nodes than written": (_set("nodes", 5), "the shards cover nodes 0..5, but 'nodes' is 5"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_complete_marker_of_the_wrong_structure_is_skipped(tmp_path, case):
    change, reason = MALFORMED[case]
    run = str(tmp_path)
    write_ckpt(run, 20)
    write_ckpt(run, 30)
    rewrite_marker(run, 30, change)
    info, skipped = store.latest(run)
    assert info is not None and info["step"] == 20  # resume falls back to the previous one
    assert len(skipped) == 1
    assert skipped[0].startswith("checkpoint step 30 is incomplete: its COMPLETE marker is malformed (")
    assert reason in skipped[0]


def test_valid_markers_still_verify(tmp_path):
    run = str(tmp_path)
    write_ckpt(run, 30, ranks=3)
    info, why = store.verify(run, 30)
    assert why == "" and info["step"] == 30 and len(info["shards"]) == 3


def test_prune_never_counts_a_malformed_marker(tmp_path):
    # keep=1 after a malformed newest marker must keep the intact older checkpoint
    run = str(tmp_path)
    for s in (1, 2, 3):
        write_ckpt(run, s)
    rewrite_marker(run, 3, _set("shards", []))
    store.prune(run, 1)
    assert 2 in store.list_steps(run)
    info, skipped = store.latest(run)
    assert info["step"] == 2 and "lists no shards" in skipped[0]


def test_unreadable_shard_is_a_reason_not_a_crash(tmp_path):
    run = str(tmp_path)
    write_ckpt(run, 10)
    write_ckpt(run, 20)
    shard = os.path.join(store.step_dir(run, 20), "rank-00001.h5")
    os.remove(shard)
    os.mkdir(shard)  # a directory where the shard should be
    info, skipped = store.latest(run)
    assert info["step"] == 10 and "misses rank-00001.h5" in skipped[0]


# -- a full disk during a checkpoint write ------------------------------------------------


def full_disk(monkeypatch, when=lambda path: True):
    """os.fsync of the store fails with ENOSPC (what a full disk does to a buffered write)."""
    real = os.fsync

    def fsync(fd):
        if when(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(store.os, "fsync", fsync)


def leftovers(run):
    return sorted(p.name for p in Path(run).rglob("*") if ".tmp" in p.name)


def test_full_disk_while_writing_a_shard_keeps_the_earlier_checkpoint(tmp_path, monkeypatch):
    run = str(tmp_path)
    X10 = write_ckpt(run, 10)
    full_disk(monkeypatch, lambda path: path.endswith(".tmp"))
    with pytest.raises(OSError, match="No space left on device"):
        write_ckpt(run, 20)
    monkeypatch.undo()
    assert leftovers(run) == []  # no partial file left to fill the disk further
    info, skipped = store.latest(run)
    assert info["step"] == 10 and skipped == ["checkpoint step 20 is incomplete (no COMPLETE marker)"]
    assert np.array_equal(store.read_state(run, info, 0, 6, ["X"], [])["X"], X10)


def test_hdf5_error_while_writing_a_shard_is_a_python_error(tmp_path, monkeypatch):
    run = str(tmp_path)
    write_ckpt(run, 10)

    def no_space(self, *a, **k):
        raise OSError(errno.ENOSPC, "Can't write data (file write failed: No space left on device)")

    monkeypatch.setattr(h5py.Group, "create_dataset", no_space)
    with pytest.raises(OSError, match="No space left"):
        store.write_shard(run, 20, 0, 0, 3, {"X": np.zeros((3, 3), np.float32)}, {})
    monkeypatch.undo()
    assert leftovers(run) == [] and store.latest(run)[0]["step"] == 10


def test_full_disk_while_writing_complete_keeps_the_earlier_checkpoint(tmp_path, monkeypatch):
    run = str(tmp_path)
    write_ckpt(run, 10)
    full_disk(monkeypatch, lambda path: "COMPLETE" in path)
    with pytest.raises(OSError, match="No space left on device"):
        write_ckpt(run, 20)
    monkeypatch.undo()
    assert leftovers(run) == [] and not os.path.exists(marker_path(run, 20))
    assert store.latest(run)[0]["step"] == 10


def test_rewriting_a_checkpointed_step_leaves_it_intact_when_the_disk_fills(tmp_path, monkeypatch):
    # a stop request at a checkpoint step writes that step twice; the second write
    # failing on a full disk must not break the first
    run = str(tmp_path)
    write_ckpt(run, 10)
    X20 = write_ckpt(run, 20)
    shard = os.path.join(store.step_dir(run, 20), "rank-00000.h5")
    inode = os.stat(shard).st_ino
    full_disk(monkeypatch, lambda path: "COMPLETE" in path)
    with pytest.raises(OSError):
        write_ckpt(run, 20)
    monkeypatch.undo()
    assert os.stat(shard).st_ino == inode  # an identical shard is not rewritten
    info, skipped = store.latest(run)
    assert info["step"] == 20 and not skipped
    assert np.array_equal(store.read_state(run, info, 0, 6, ["X"], [])["X"], X20)


def test_a_different_shard_for_a_checkpointed_step_voids_its_marker(tmp_path):
    run = str(tmp_path)
    write_ckpt(run, 10)
    write_ckpt(run, 20)
    store.write_shard(run, 20, 0, 0, 3, {"X": np.ones((3, 3), np.float32)}, {})
    info, skipped = store.latest(run)  # the old marker no longer describes the shards
    assert info["step"] == 10 and skipped == ["checkpoint step 20 is incomplete (no COMPLETE marker)"]


def test_full_disk_while_backing_up_the_run_file_keeps_the_old_backup(tmp_path, monkeypatch):
    rf = store.RunFile(str(tmp_path))
    rf.create("run: {}\n", {"ranks": 1, "nodes": 2})
    rf.append("metrics", {"step": np.arange(3)})
    store.backup_run_file(str(tmp_path))
    rf.append("metrics", {"step": np.arange(3, 5)})
    full_disk(monkeypatch, lambda path: path.endswith(".bak.tmp"))
    with pytest.raises(OSError, match="No space left on device"):
        store.backup_run_file(str(tmp_path))
    monkeypatch.undo()
    assert leftovers(str(tmp_path)) == []
    with h5py.File(tmp_path / "run.h5.bak", "r") as f:
        assert f["metrics/step"][()].tolist() == [0, 1, 2]


# -- files that are not run files -----------------------------------------------------


def test_hdf5_files_that_are_not_runs_raise_run_file_error(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("weights", data=np.zeros(3))
    with pytest.raises(store.RunFileError, match=r"other\.h5 is not an hpcopt run file: it has no /config or "
                                                 r"/metrics"):
        store.read_run(str(tmp_path / "other.h5"))
    with h5py.File(tmp_path / "half.h5", "w") as f:
        f.create_dataset("config", data="run: {}", dtype=h5py.string_dtype())
    with pytest.raises(store.RunFileError, match=r"half\.h5 is not an hpcopt run file: it has no /metrics$"):
        store.read_run(str(tmp_path / "half.h5"))
    assert issubclass(store.RunFileError, OSError)  # callers' "cannot read" handling covers it
