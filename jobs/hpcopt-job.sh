#!/usr/bin/env bash
# hpcopt-job.sh CONFIG [hpcopt run options ...]
#
# The body every sbatch script shares: launch `hpcopt run CONFIG ... --resume` on all tasks
# of the allocation, forward SIGUSR1 / SIGTERM to it (Slurm sends B:USR1 before the time
# limit, and SIGTERM on preemption), and requeue the job when hpcopt exits with 75
# ("stopped at a step boundary after a checkpoint"). A requeued job runs the same command
# and resumes from the newest complete checkpoint.
#
# Environment (all optional):
#   HPCOPT_LAUNCHER  launcher command, word-split (default: "srun"); e.g. "mpiexec -n 4"
#                    to run these scripts on a workstation or in tests
#   HPCOPT_PYTHON    Python interpreter with hpcopt installed (default: python3)
#   HPCOPT_REQUEUE   command run on exit 75, word-split (default: "scontrol requeue $SLURM_JOB_ID")
# Arguments are passed to hpcopt as separate words and never evaluated by the shell, so
# no config value can inject shell code.
set -uo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $(basename "$0") CONFIG [--set KEY=VALUE ...] [--out DIR]" >&2
    exit 2
fi

read -r -a launcher <<< "${HPCOPT_LAUNCHER:-srun}"
python="${HPCOPT_PYTHON:-python3}"
# one BLAS / OpenMP thread per CPU of the task unless the user chose otherwise
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-$OMP_NUM_THREADS}"
export MKL_NUM_THREADS="${MKL_NUM_THREADS:-$OMP_NUM_THREADS}"

child=""
# shellcheck disable=SC2317  # invoked through the traps below
forward() {
    echo "hpcopt-job: got $1, asking hpcopt to checkpoint and stop" >&2
    if [ -n "$child" ]; then kill -s "$1" "$child" 2>/dev/null; fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

"${launcher[@]}" "$python" -m mpi4py -m hpcopt run "$@" --resume &
child=$!
# `wait` returns early when a trapped signal arrives; wait again until hpcopt has exited
status=0
while true; do
    wait "$child"
    status=$?
    if ! kill -0 "$child" 2>/dev/null; then break; fi
done

if [ "$status" -eq 75 ]; then
    read -r -a requeue <<< "${HPCOPT_REQUEUE:-scontrol requeue ${SLURM_JOB_ID:-}}"
    echo "hpcopt-job: hpcopt stopped at a checkpoint; requeueing: ${requeue[*]}" >&2
    "${requeue[@]}"
    exit 0
fi
exit "$status"
