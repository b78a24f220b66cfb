"""The corpus of bad inputs in tests/cli/bad_inputs/: every case runs the CLI in a
subprocess and must end the way README.md promises ("Exit statuses"): status 2 and ONE
stderr line `hpcopt: ...` naming the key, file or argument, with no traceback and
nothing started (the case's scratch directory is left exactly as the case laid it out),
or, where the documented outcome is a clean result, status 0 with the expected text on
stdout.

cases.yaml describes each case (see its header). A case marked `xfail_until` waits for a
change in a file this corpus does not own: it is an xfail(strict=True), so it fails the
suite the day that change lands until the mark is removed. Besides cases.yaml, any other
`*.yaml` file in bad_inputs/ whose first line is `# expect: TEXT` is a config case, run
as `hpcopt run FILE --out DIR` like tests/cli/bad_configs/.

All cases run concurrently (a few at a time) in one module fixture, each under a time
limit and an address-space limit, so a case that runs away fails fast instead of
stalling or swapping the machine.
"""
from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, env

HERE = Path(__file__).parent / "bad_inputs"
MANIFEST = yaml.safe_load((HERE / "cases.yaml").read_text(encoding="utf-8"))
SMALL = MANIFEST["small_config"]
MEMORY_LIMIT = 4 << 30  # bytes of address space per case
WORKERS = 4  # cases at once: each is mostly interpreter start-up


def _file_cases():
    out = []
    for path in sorted(HERE.glob("*.yaml")):
        if path.name == "cases.yaml":
            continue
        first = path.read_text(encoding="utf-8", errors="replace").splitlines()[:1]
        if first and first[0].startswith("# expect:"):
            out.append({"id": f"file-{path.stem}", "argv": ["run", str(path), "--out", "out"],
                        "expect": first[0].split("expect:", 1)[1].strip()})
    return out


CASES = MANIFEST["cases"] + _file_cases()


def _content(spec):
    if isinstance(spec, str):
        return spec.encode("utf-8")
    if "small" in spec:
        return (SMALL + (spec["small"] or "")).encode("utf-8")
    if "latin1" in spec:
        return spec["latin1"].encode("latin-1")
    if "utf16" in spec:
        return spec["utf16"].encode("utf-16")
    if "repeat" in spec:
        return "".join(text * count for text, count in spec["repeat"]).encode("utf-8")
    raise ValueError(f"unknown file spec {spec!r}")


def lay_out(case, root: Path) -> None:
    """Create the case's files under root (its working directory)."""
    for rel, spec in (case.get("files") or {}).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(spec, dict) and spec.get("dir"):
            path.mkdir(exist_ok=True)
        elif isinstance(spec, dict) and "symlink" in spec:
            os.symlink(spec["symlink"], path)
        elif isinstance(spec, dict) and "hdf5" in spec:
            import h5py
            with h5py.File(path, "w") as f:
                for name in spec["hdf5"] or []:
                    f.create_group(name)
        else:
            path.write_bytes(_content(spec))
        if isinstance(spec, dict) and "mode" in spec:
            path.chmod(spec["mode"])


def _subst(text: str, root: Path) -> str:
    return str(text).replace("{tmp}", str(root)).replace("{bad}", str(HERE)).replace("{repo}", str(REPO))


def snapshot(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# `python -m hpcopt ARGS` under an address-space limit (set in the child itself: a
# preexec_fn is not safe with the threads that run the cases)
LAUNCH = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, ({0}, {0})); "
          "sys.argv[0] = 'hpcopt'; runpy.run_module('hpcopt', run_name='__main__', alter_sys=True)"
          ).format(MEMORY_LIMIT)


def run_case(case, root: Path):
    root.mkdir(parents=True, exist_ok=True)
    lay_out(case, root)
    before = snapshot(root)
    extra = {k: _subst(v, root) for k, v in (case.get("env") or {}).items()}
    argv = [sys.executable, "-c", LAUNCH, *(_subst(a, root) for a in case["argv"])]
    try:
        proc = subprocess.run(argv, cwd=root, env=env(**extra), capture_output=True, text=True,
                              errors="replace", timeout=case.get("timeout", 20))
    except subprocess.TimeoutExpired as exc:
        return {"timeout": exc.timeout, "before": before, "after": snapshot(root)}
    return {"proc": proc, "before": before, "after": snapshot(root)}


def _selected(request):
    ids = set()
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "case" in callspec.params and item.module.__name__ == __name__:
            ids.add(callspec.params["case"]["id"])
    return ids


@pytest.fixture(scope="module")
def results(request, tmp_path_factory):
    wanted = _selected(request)
    todo = [c for c in CASES if c["id"] in wanted and not (c.get("skip_if_root") and os.geteuid() == 0)]
    base = tmp_path_factory.mktemp("bad_inputs")
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures = {c["id"]: pool.submit(run_case, c, base / c["id"]) for c in todo}
        return {k: f.result() for k, f in futures.items()}


def _params():
    out = []
    for case in CASES:
        marks = []
        if case.get("xfail_until"):
            marks.append(pytest.mark.xfail(strict=True, reason=f"until {case['xfail_until']}"))
        if case.get("skip_if_root"):
            marks.append(pytest.mark.skipif(os.geteuid() == 0, reason=case["skip_if_root"]))
        out.append(pytest.param(case, id=case["id"], marks=marks))
    return out


def test_corpus_is_large_and_well_formed():
    ids = [c["id"] for c in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    assert len(MANIFEST["cases"]) >= 60
    for c in MANIFEST["cases"]:
        assert set(c) <= {"id", "argv", "files", "env", "exit", "expect", "xfail_until", "skip_if_root",
                          "timeout", "why", "may_create"}, c["id"]
        assert c.get("expect"), f"{c['id']}: every case names the text it expects"
        assert c.get("exit", 2) in (0, 2), c["id"]


@pytest.mark.parametrize("case", _params())
def test_bad_input(case, results):
    res = results[case["id"]]
    assert "timeout" not in res, f"no answer within {res.get('timeout')} s"
    proc = res["proc"]
    out, err = proc.stdout, proc.stderr
    want = case.get("exit", 2)
    assert "Traceback" not in err, err[-3000:]
    assert proc.returncode == want, f"exit {proc.returncode}\nstdout:\n{out[-2000:]}\nstderr:\n{err[-2000:]}"
    if want == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1, err[-3000:]
        assert lines[0].startswith("hpcopt: "), lines[0]
        assert case["expect"] in lines[0], lines[0]
        globs = case.get("may_create") or []
        changed = sorted(p for p in set(res["after"]) ^ set(res["before"])
                         if not (p not in res["before"] and any(fnmatch.fnmatch(p, g) for g in globs)))
        assert not changed, "the case created or removed files: " + ", ".join(changed)
    else:
        assert case["expect"] in out, out[-3000:]


def test_error_values_are_shown_without_stringifying_them_whole():
    """`_show` abbreviates containers level by level: a list of a million shared leaves
    (what YAML aliases build) has only the few leaves that are shown turned into text."""
    from hpcopt import config

    calls = []

    class Leaf:
        def __repr__(self):
            calls.append(1)
            return "leaf"

    value = [Leaf()] * 10
    for _ in range(5):
        value = [value] * 10  # 10**6 leaves, one object
    text = config._show(value)
    assert len(text) <= 60 and "\n" not in text
    assert len(calls) < 1000, f"{len(calls)} leaves stringified"
    assert config._show(10 ** 5000) == "<an integer of about 5001 digits>"
    assert config._show(10 ** 50) == "100000000000000000...0000000000000000000"
    assert config._show("x\ny") == "'x\\ny'" and config._show(-3) == "-3" and config._show([64]) == "[64]"
