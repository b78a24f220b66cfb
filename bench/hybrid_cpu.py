"""CPU use of the hybrid parameter server's wall clock when ranks outnumber cores.

Run:  python bench/hybrid_cpu.py [--ranks 8] [--seconds 10] [--json FILE]

Launches `mpiexec -n RANKS` (1 server + RANKS-1 workers, half of them with injected delays
|N(0, 0.25)| s) on this machine's cores and prints every rank's CPU seconds over wall
seconds: waiting ranks sleep between polls, so the server and the waiting workers should
stay well below 0.5 even when the ranks outnumber the cores.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--json", default="")
    args = p.parse_args()
    from hpcopt import store
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = here if os.path.exists(here) else shutil.which("mpiexec")
    W = args.ranks - 1
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run")
        env = dict(os.environ, PYTHONPATH=os.path.join(HERE, "..") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        subprocess.run([mpiexec, "-n", str(args.ranks), sys.executable, "-m", "mpi4py", "-m", "hpcopt", "run",
                        "quickstart", "--out", out, "--set", "algorithm.name=hybrid", "--set", f"nodes.n={W}",
                        "--set", "algorithm.clock=wall", "--set", f"algorithm.budget_seconds={args.seconds}",
                        "--set", "algorithm.k_every=100", "--set", "optimizer.schedule=constant",
                        "--set", "optimizer.lr=0.1"], check=True, env=env, stdout=subprocess.DEVNULL)
        run = store.read_run(out)
    w, s = run["tables"]["workers"], run["summary"]
    cores = len(os.sched_getaffinity(0))
    print(f"hybrid wall clock: {args.ranks} ranks on {cores} cores for {args.seconds:g} s: "
          f"{int(s['updates'])} updates from {int(s['received'])} gradients")
    print(f"  server CPU / wall  {s['server_cpu_fraction']:.3f}")
    for i in range(W):
        print(f"  worker {i} ({'delayed' if w['delayed'][i] else 'prompt '}) CPU / wall  {w['cpu_fraction'][i]:.3f}  "
              f"(blocked {w['blocked_seconds'][i]:.1f} s, sent {int(w['sent'][i])})")
    rows = [{"rank": 0, "role": "server", "cpu_fraction": float(s["server_cpu_fraction"])}] + [
        {"rank": i + 1, "role": "delayed worker" if w["delayed"][i] else "worker",
         "cpu_fraction": float(w["cpu_fraction"][i])} for i in range(W)]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
