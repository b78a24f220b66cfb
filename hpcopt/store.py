"""HDF5 run files and checkpoints: writing, verifying, resuming, reading for analysis.

Run directory `runs/<name>/`:

run.h5 (rank 0 only)
  /config            resolved YAML text (a resume that changes allowed keys writes the new
                     text; its `resume` event lists the changes); attrs: versions, MPI
                     vendor, CUDA-awareness, ranks, nodes, placement, kernels, git describe
  /metrics/<name>    one row per step: shapes (rows,), (rows, nodes) or (rows, ranks);
                     after a resume on more ranks the per-rank columns widen (NaN-padded)
  /eval/<name>       one row per evaluation
  /events/{step,kind,message}   resume, stop requests, skipped checkpoints, ...
  /summary           attrs with the final figures
  The file is opened, appended to and closed at every flush, so between flushes it is
  complete and readable (also while the run goes on). A copy, run.h5.bak, is taken at
  every checkpoint; should a crash hit the middle of a flush, resume and readers fall
  back to it.

ckpt/step-<N>/rank-<R>.h5 + ckpt/step-<N>/COMPLETE
  Each rank writes its nodes' rows of every sharded state field (and rank 0 the
  replicated fields) to a temporary name, fsyncs and renames it. Rank 0 then writes
  COMPLETE (JSON: step, node ranges, per-shard SHA-256) the same way. Resume takes the
  newest step whose COMPLETE exists and whose shards match their checksums; shards
  hold nodes, so a run may resume on a different number of ranks. No pickle anywhere.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from typing import Dict, Iterator, List, Optional, Tuple

import h5py
import numpy as np

RUN_FILE = "run.h5"
CKPT_DIR = "ckpt"


class RunFileError(OSError):
    """A file that is not an hpcopt run file (an OSError: callers that report "cannot
    read the run file" handle it with every other read failure)."""


# ---------------------------------------------------------------------------------------
# small file helpers


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _discard(path: str) -> None:
    """Remove a temporary file after a failed write (a full disk must not fill up more)."""
    try:
        os.unlink(path)
    except OSError:
        pass


def atomic_write_text(path: str, text: str) -> None:
    """Write `path` through a temporary file and a rename: the old contents stay whole
    until the new ones are on disk; a failed write (e.g. a full disk) removes the
    temporary file and raises the OSError."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")


@contextlib.contextmanager
def flush_lock(h5_path: str, exclusive: bool, patience: float = 30.0) -> Iterator[None]:
    """Advisory lock on `<run.h5>.lock`: the writer holds it exclusively during a flush,
    readers share it while they read, so a reader never sees a half-written flush.

    HDF5's own file locking is off (a reader must never make the writer fail). Where the
    file system has no flock, or the lock stays busy for `patience` seconds, the work goes
    on without it (readers then retry, see read_run).
    """
    fd = None
    try:
        fd = os.open(h5_path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + patience
        while True:
            try:
                fcntl.flock(fd, mode)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.005)
    except OSError:
        pass
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


RUN_LOCK = "run.lock"  # held (flock, exclusive) by the run writing the directory, for its lifetime


def lock_run_dir(run_dir: str) -> Tuple[Optional[int], str]:
    """Take the exclusive lock of the run directory `run_dir` (which exists) for the rest of
    this process's life: returns (fd, "") -- keep the fd open; the OS releases the lock when
    the process ends, however it ends, so a killed run leaves no stale lock -- or
    (None, holder) where another process holds it, `holder` naming it (host, pid, Slurm job,
    since when) from what it wrote into the lock file; (None, "") where the file system has
    no locks (the run goes on without one)."""
    path = os.path.join(run_dir, RUN_LOCK)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None, ""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        finally:
            os.close(fd)
        try:
            who = json.loads(text)
        except ValueError:
            who = {}
        return None, _holder(who if isinstance(who, dict) else {})
    except OSError:
        os.close(fd)
        return None, ""
    env = os.environ
    who = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
           "slurm_job_id": env.get("SLURM_JOB_ID", ""),
           "slurm_array": (f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
                           if env.get("SLURM_ARRAY_JOB_ID") else "")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(who).encode(), 0)
    except OSError:
        pass  # the lock holds without the note
    return fd, ""


def _holder(who: dict) -> str:
    text = f"hpcopt pid {who.get('pid', '?')} on host {who.get('host', '?')}"
    if who.get("slurm_job_id"):
        text += f", Slurm job {who['slurm_job_id']}"
        if who.get("slurm_array"):
            text += f" (array task {who['slurm_array']})"
    if isinstance(who.get("since"), (int, float)):
        text += f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(who['since']))}"
    return text


# ---------------------------------------------------------------------------------------
# run file


class RunFile:
    """Writer of run.h5 (used on rank 0 only)."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, RUN_FILE)

    def create(self, config_text: str, attrs: Dict[str, object],
               arrays: Optional[Dict[str, np.ndarray]] = None) -> None:
        """A new run.h5: /config with the run's attributes, the empty groups, and the
        given top-level arrays (e.g. /node_ids, the nodes of run.node_metrics: sample)."""
        tmp = self.path + ".tmp"
        with h5py.File(tmp, "w", locking=False) as f:
            ds = f.create_dataset("config", data=config_text, dtype=h5py.string_dtype())
            for k, v in attrs.items():
                ds.attrs[k] = v
            for k, v in (arrays or {}).items():
                f.create_dataset(k, data=np.asarray(v))
            for g in ("metrics", "eval", "events", "summary"):
                f.create_group(g)
        os.replace(tmp, self.path)

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def append(self, group: str, columns: Dict[str, np.ndarray]) -> None:
        """Append rows to /group/<name>; every column has the same number of rows."""
        if not columns:
            return
        with flush_lock(self.path, exclusive=True), h5py.File(self.path, "a", locking=False) as f:
            g = f.require_group(group)
            for name, rows in columns.items():
                rows = np.asarray(rows)
                if rows.dtype.kind in "OUS":
                    rows = rows.astype(object)
                    dtype = h5py.string_dtype()
                else:
                    dtype = rows.dtype
                if name not in g:
                    # 2-D columns may widen later: a run resumed on more ranks adds
                    # per-rank columns; missing cells read as NaN
                    maxshape = (None,) + (None,) * (rows.ndim - 1)
                    chunk = (max(1, min(1024, len(rows) or 1)),) + rows.shape[1:]
                    fill = {"fillvalue": np.nan} if rows.dtype.kind == "f" else {}
                    g.create_dataset(name, shape=(0,) + rows.shape[1:], maxshape=maxshape,
                                     dtype=dtype, chunks=tuple(max(1, c) for c in chunk), **fill)
                ds = g[name]
                if rows.ndim == 2 and rows.shape[1] != ds.shape[1]:
                    if rows.shape[1] > ds.shape[1]:
                        ds.resize(rows.shape[1], axis=1)
                    else:
                        wide = np.full((len(rows), ds.shape[1]), np.nan)
                        wide[:, :rows.shape[1]] = rows
                        rows = wide
                start = ds.shape[0]
                ds.resize(start + len(rows), axis=0)
                ds[start:] = rows
            f.flush()

    def write_table(self, name: str, columns: Dict[str, np.ndarray]) -> None:
        """/tables/<name>/<column>, replaced if present (e.g. Teleportation's k search)."""
        with flush_lock(self.path, exclusive=True), h5py.File(self.path, "a", locking=False) as f:
            g = f.require_group("tables")
            if name in g:
                del g[name]
            t = g.create_group(name)
            for k, v in columns.items():
                t.create_dataset(k, data=np.asarray(v))

    def event(self, step: int, kind: str, message: str) -> None:
        self.append("events", {"step": np.array([step], np.int64), "kind": np.array([kind], object),
                               "message": np.array([message], object),
                               "time": np.array([time.time()])})

    def truncate(self, step: int) -> int:
        """Keep the rows written up to the checkpoint at `step` (on resume; 0: none): metric
        rows with step < `step` (a metric row's step is the step taken), eval and diag rows
        with step <= `step` (theirs counts the steps done; the one at `step` was written
        before that checkpoint). Returns rows dropped."""
        dropped = 0
        with flush_lock(self.path, exclusive=True), h5py.File(self.path, "a", locking=False) as f:
            for group in ("metrics", "eval", "diag"):
                g = f.get(group)
                if g is None or "step" not in g:
                    continue
                keep = int(np.searchsorted(g["step"][()], step, side="left" if group == "metrics" else "right"))
                dropped += g["step"].shape[0] - keep
                for name in g:
                    if g[name].shape[0] > keep:
                        g[name].resize(keep, axis=0)
        return dropped

    def truncate_rows(self, rows: int, groups=("metrics", "eval")) -> int:
        """Keep the first `rows` rows of each group (a resumed run whose rows are not
        keyed by a unique step, e.g. the hybrid method's time grid); returns rows dropped."""
        dropped = 0
        with flush_lock(self.path, exclusive=True), h5py.File(self.path, "a", locking=False) as f:
            for group in groups:
                g = f.get(group)
                if g is None:
                    continue
                for name in g:
                    if g[name].shape[0] > rows:
                        dropped = max(dropped, g[name].shape[0] - rows)
                        g[name].resize(rows, axis=0)
        return dropped

    def set_config(self, text: str) -> None:
        """Replace the /config text (a config changed on resume), keeping its attributes."""
        with flush_lock(self.path, exclusive=True), h5py.File(self.path, "a", locking=False) as f:
            f["config"][()] = text

    def set_summary(self, values: Dict[str, object]) -> None:
        with flush_lock(self.path, exclusive=True), h5py.File(self.path, "a", locking=False) as f:
            g = f.require_group("summary")
            for k, v in values.items():
                g.attrs[k] = v


def readable(path: str) -> bool:
    try:
        with flush_lock(path, exclusive=False, patience=5.0), h5py.File(path, "r", locking=False) as f:
            f["config"].attrs.keys()
        return True
    except (OSError, KeyError):
        return False


def backup_run_file(run_dir: str) -> None:
    """Copy run.h5 to run.h5.bak atomically (taken at every checkpoint)."""
    src = os.path.join(run_dir, RUN_FILE)
    tmp = src + ".bak.tmp"
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, src + ".bak")
    except BaseException:  # the previous run.h5.bak stays as it was
        _discard(tmp)
        raise
    fsync_dir(run_dir)


def restore_run_file(run_dir: str) -> bool:
    """Replace an unreadable run.h5 by its last backup; False if there is none."""
    src = os.path.join(run_dir, RUN_FILE)
    if not readable(src + ".bak"):
        return False
    shutil.copyfile(src + ".bak", src + ".tmp")
    os.replace(src + ".tmp", src)
    RunFile(run_dir).event(-1, "restored", "run.h5 was unreadable; restored from run.h5.bak")
    return True


def read_run(run_dir: str) -> dict:
    """Everything in run.h5 as plain Python/NumPy objects (works while it is written).

    If run.h5 cannot be read (a crash in the middle of a flush), the copy taken at the
    last checkpoint (run.h5.bak) is read instead and `out["from_backup"]` is True.
    A file that opens as HDF5 but has no /config or /metrics raises RunFileError (an
    OSError); anything else that cannot be read raises OSError.
    """
    path = run_dir if run_dir.endswith(".h5") else os.path.join(run_dir, RUN_FILE)
    out: dict = {"path": path, "from_backup": False}
    if not readable(path) and readable(path + ".bak"):
        path, out["from_backup"] = path + ".bak", True
    for attempt in range(5):  # without flock the writer may be in the middle of a flush
        try:
            with flush_lock(path, exclusive=False):
                return _read(path, out)
        except (OSError, KeyError) as exc:
            if attempt == 4:
                if isinstance(exc, KeyError):
                    raise RunFileError(f"{path} is not a readable hpcopt run file ({exc})") from None
                raise
            time.sleep(0.05 * (attempt + 1))
    return out


def _read(path: str, out: dict) -> dict:
    # no HDF5 file lock: the run's writer (rank 0) must never be blocked by a reader
    with h5py.File(path, "r", locking=False) as f:
        missing = [name for name, kind in (("config", h5py.Dataset), ("metrics", h5py.Group))
                   if not isinstance(f.get(name), kind)]
        if missing:  # RunFile.create writes both at once, so this is no run file at all
            raise RunFileError(f"{path} is not an hpcopt run file: it has no "
                               f"{' or '.join('/' + m for m in missing)}")
        cfg = f["config"]
        text = cfg[()]
        out["config_text"] = text.decode() if isinstance(text, bytes) else str(text)
        out["attrs"] = {k: _plain(v) for k, v in cfg.attrs.items()}
        for group in ("metrics", "eval", "events", "diag"):
            g = f.get(group)
            out[group] = {k: _plain(g[k][()]) for k in g} if g is not None else {}
        ids = f.get("node_ids")  # run.node_metrics: sample; otherwise the columns are nodes 0..n-1
        out["node_ids"] = ids[()] if isinstance(ids, h5py.Dataset) else None
        s = f.get("summary")
        out["summary"] = {k: _plain(v) for k, v in s.attrs.items()} if s is not None else {}
        t = f.get("tables")
        out["tables"] = {name: {k: _plain(t[name][k][()]) for k in t[name]} for name in t} if t is not None else {}
    return out


def node_layout(run_dir: str) -> Tuple[str, Optional[np.ndarray]]:
    """(run.node_metrics mode, sampled node ids or None) of an existing run file; a file
    written before the mode was recorded keeps every node's column ("all")."""
    path = os.path.join(run_dir, RUN_FILE)
    with flush_lock(path, exclusive=False), h5py.File(path, "r", locking=False) as f:
        mode = f["config"].attrs.get("node_metrics", "all")
        ids = f.get("node_ids")
        return (mode.decode() if isinstance(mode, bytes) else str(mode),
                ids[()] if isinstance(ids, h5py.Dataset) else None)


def _plain(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray) and v.dtype.kind == "O":
        return np.array([x.decode() if isinstance(x, bytes) else x for x in v], dtype=object)
    return v


# ---------------------------------------------------------------------------------------
# checkpoints


def ckpt_root(run_dir: str) -> str:
    return os.path.join(run_dir, CKPT_DIR)


def step_dir(run_dir: str, step: int) -> str:
    return os.path.join(ckpt_root(run_dir), f"step-{step:09d}")


def write_shard(run_dir: str, step: int, rank: int, lo: int, hi: int,
                sharded: Dict[str, np.ndarray], replicated: Dict[str, np.ndarray],
                before_rename=None) -> Tuple[str, str]:
    """Write this rank's shard atomically; returns (file name, sha256).

    `before_rename` (tests only) runs when the temporary file is written, before the rename.
    """
    d = step_dir(run_dir, step)
    os.makedirs(d, exist_ok=True)
    name = f"rank-{rank:05d}.h5"
    final = os.path.join(d, name)
    tmp = f"{final}.tmp"
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["step"] = step
            f.attrs["lo"] = lo
            f.attrs["hi"] = hi
            gs = f.create_group("sharded")
            for k, v in sharded.items():
                gs.create_dataset(k, data=v)
            gr = f.create_group("replicated")
            for k, v in replicated.items():
                gr.create_dataset(k, data=v)
        if before_rename is not None:
            before_rename()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        digest = sha256(tmp)
        if os.path.exists(final):
            # this step was checkpointed before (a stop request at a checkpoint step): an
            # identical shard stays as it is, so the earlier checkpoint is never at risk;
            # a different one voids the old COMPLETE before the shard is replaced
            if _same_file(final, digest):
                _discard(tmp)
                return name, digest
            _discard(os.path.join(d, "COMPLETE"))
        os.replace(tmp, final)
    except BaseException:  # e.g. a full disk: no partial file is left behind
        _discard(tmp)
        raise
    fsync_dir(d)
    return name, digest


def _same_file(path: str, digest: str) -> bool:
    try:
        return sha256(path) == digest
    except OSError:
        return False


def write_complete(run_dir: str, step: int, shards: List[dict], meta: Dict[str, object]) -> None:
    d = step_dir(run_dir, step)
    body = {"step": step, "shards": shards, "written": time.time(), **meta}
    atomic_write_text(os.path.join(d, "COMPLETE"), json.dumps(body, indent=1))
    fsync_dir(ckpt_root(run_dir))


def list_steps(run_dir: str) -> List[int]:
    root = ckpt_root(run_dir)
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        if name.startswith("step-") and name[5:].isdigit():
            steps.append(int(name[5:]))
    return sorted(steps)


def _shape_error(info, step: int) -> str:
    """What is wrong with the structure of a parsed COMPLETE marker ("" if nothing).

    The marker must be what write_complete writes: an object with this step, a non-empty
    list of shards (rank, plain file name, SHA-256, node range lo..hi) held by distinct
    ranks including rank 0 (it holds the replicated fields), whose ranges tile the
    nodes 0..nodes-1 without gaps or overlaps.
    """
    if not isinstance(info, dict):
        return f"it holds a JSON {type(info).__name__}, not an object"
    if type(info.get("step")) is not int or info["step"] != step:
        return f"its step is {info.get('step')!r}, not {step}"
    shards = info.get("shards")
    if not isinstance(shards, list):
        return f"'shards' is {type(shards).__name__}, not a list"
    if not shards:
        return "it lists no shards"
    for i, sh in enumerate(shards):
        if not isinstance(sh, dict):
            return f"shard {i} is a JSON {type(sh).__name__}, not an object"
        bad = [k for k in ("rank", "lo", "hi") if type(sh.get(k)) is not int or sh[k] < 0]
        if bad:
            return f"shard {i} has no non-negative integer {bad[0]!r}"
        f = sh.get("file")
        if not isinstance(f, str) or f in ("", ".", "..") or os.path.basename(f) != f:
            return f"shard {i} has no plain file name (got {f!r})"
        h = sh.get("sha256")
        if not isinstance(h, str) or len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
            return f"shard {i} has no SHA-256 (64 hex digits)"
        if sh["lo"] > sh["hi"]:
            return f"shard {i} has the node range {sh['lo']}..{sh['hi']}"
    ranks = [sh["rank"] for sh in shards]
    if len(set(ranks)) != len(ranks) or len({sh["file"] for sh in shards}) != len(shards):
        return "two shards have the same rank or file"
    if 0 not in ranks:
        return "no shard of rank 0"
    pos = 0
    for sh in sorted(shards, key=lambda sh: (sh["lo"], sh["hi"])):
        if sh["lo"] != pos:
            return f"the shards' node ranges leave a gap or overlap at node {min(pos, sh['lo'])}"
        pos = sh["hi"]
    nodes = info.get("nodes", pos)
    if type(nodes) is not int or nodes != pos:
        return f"the shards cover nodes 0..{pos - 1}, but 'nodes' is {nodes!r}"
    return ""


def read_marker(run_dir: str, step: int) -> Tuple[Optional[dict], str]:
    """(COMPLETE contents, "") if the marker exists, parses and has the right structure,
    else (None, reason); the shards themselves are not read (see verify)."""
    marker = os.path.join(step_dir(run_dir, step), "COMPLETE")
    if not os.path.exists(marker):
        return None, f"checkpoint step {step} is incomplete (no COMPLETE marker)"
    try:
        with open(marker, "r", encoding="utf-8") as fh:
            info = json.load(fh)
    except (OSError, ValueError) as exc:
        return None, f"checkpoint step {step} has an unreadable COMPLETE marker ({exc})"
    why = _shape_error(info, step)
    if why:
        return None, f"checkpoint step {step} is incomplete: its COMPLETE marker is malformed ({why})"
    return info, ""


def verify(run_dir: str, step: int) -> Tuple[Optional[dict], str]:
    """(COMPLETE contents, "") if the checkpoint is whole and intact, else (None, reason)."""
    info, why = read_marker(run_dir, step)
    if info is None:
        return None, why
    d = step_dir(run_dir, step)
    for shard in info["shards"]:
        path = os.path.join(d, shard["file"])
        if not os.path.isfile(path):
            return None, f"checkpoint step {step} misses {shard['file']}"
        try:
            digest = sha256(path)
        except OSError as exc:
            return None, f"checkpoint step {step}: {shard['file']} cannot be read ({exc.strerror or exc})"
        if digest != shard["sha256"]:
            return None, f"checkpoint step {step}: {shard['file']} does not match its checksum"
    return info, ""


def latest(run_dir: str) -> Tuple[Optional[dict], List[str]]:
    """Newest intact checkpoint and the reasons newer ones were skipped."""
    skipped = []
    for step in reversed(list_steps(run_dir)):
        info, why = verify(run_dir, step)
        if info is not None:
            return info, skipped
        skipped.append(why)
    return None, skipped


def read_state(run_dir: str, info: dict, lo: int, hi: int, sharded: List[str],
               replicated: List[str]) -> Dict[str, np.ndarray]:
    """Rows lo..hi of the sharded fields (from whichever shards hold them) + replicated."""
    d = step_dir(run_dir, info["step"])
    out: Dict[str, np.ndarray] = {}
    parts: Dict[str, list] = {k: [] for k in sharded}
    for shard in sorted(info["shards"], key=lambda s: s["lo"]):
        if shard["hi"] <= lo or shard["lo"] >= hi:
            if shard["rank"] != 0 or not replicated:
                continue
        with h5py.File(os.path.join(d, shard["file"]), "r") as f:
            a, b = max(lo, shard["lo"]), min(hi, shard["hi"])
            if a < b:
                for k in sharded:
                    parts[k].append(f["sharded"][k][a - shard["lo"]: b - shard["lo"]])
            if shard["rank"] == 0:
                for k in replicated:
                    out[k] = f["replicated"][k][()]
    for k in sharded:
        out[k] = np.concatenate(parts[k], axis=0)
        if out[k].shape[0] != hi - lo:
            raise ValueError(f"checkpoint step {info['step']} does not cover nodes {lo}..{hi - 1}")
    return out


def prune(run_dir: str, keep: int) -> List[int]:
    """Remove all but the newest `keep` complete checkpoints (and older incomplete ones).

    Complete means a COMPLETE marker of the right structure (read_marker): a malformed
    one never counts toward `keep`, so it cannot push out an intact older checkpoint.
    """
    steps = list_steps(run_dir)
    complete = [s for s in steps if read_marker(run_dir, s)[0] is not None]
    keep_set = set(complete[-keep:])
    newest = complete[-1] if complete else -1
    removed = []
    for s in steps:
        if s in keep_set or s > newest:
            continue
        shutil.rmtree(step_dir(run_dir, s), ignore_errors=True)
        removed.append(s)
    return removed
