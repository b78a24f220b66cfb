#!/usr/bin/env bash
# hpcopt-job.sh CONFIG [hpcopt run options ...]
#
# The body every sbatch script shares (they source it): launch `hpcopt run CONFIG ...
# --resume` on all tasks of the allocation, forward SIGUSR1 / SIGTERM to it, and requeue
# the job only when hpcopt exits with 75 ("stopped at a step boundary after a checkpoint,
# requeue me"). A requeued job runs the same command and resumes from the newest complete
# checkpoint.
#
# Signals:
#   USR1  "time is running out" (Slurm's --signal=B:USR1@N before the time limit, or
#         `scancel --signal=USR1 --batch`): hpcopt checkpoints and exits 75; the job is
#         requeued.
#   TERM  `scancel`, preemption: hpcopt checkpoints and stops; the job ends for good and is
#         never requeued by this script (where Slurm preempts with requeue, it requeues the
#         job itself). This script then exits 143 (128 + SIGTERM).
#   A signal that arrives in the first HPCOPT_SIGNAL_GRACE seconds after the launch is held
#   and forwarded when they have passed: ranks that are still starting (interpreter, MPI)
#   have no handler yet, and the signal would kill them instead of asking for a checkpoint.
#
# Environment (all optional):
#   HPCOPT_LAUNCHER      launcher command, word-split (default: "srun --mpi=pmi2 -c
#                        $SLURM_CPUS_PER_TASK"; --mpi takes $SLURM_MPI_TYPE if set, e.g.
#                        pmix for an Open MPI built with PMIx); e.g. "mpiexec -n 4" to run
#                        these scripts on a workstation or in tests, or inside an allocation
#   HPCOPT_PYTHON        Python interpreter with hpcopt installed (default: python3)
#   HPCOPT_REQUEUE       command run on exit 75, word-split (default: "scontrol requeue $SLURM_JOB_ID")
#   HPCOPT_SIGNAL_GRACE  seconds a signal is held after the launch (default: 10)
# Arguments are passed to hpcopt as separate words and never evaluated by the shell, so
# no config value can inject shell code.
set -uo pipefail

EXIT_REQUEUE=75      # hpcopt: stopped after a checkpoint, requeue me (USR1, run.max_wall, run.stop_after)
EXIT_TERMINATED=143  # hpcopt and this script: stopped by SIGTERM after a checkpoint; do not requeue

# signals first
pending=""  # the signal to forward once the ranks can take it ("" = none)
got_term=0
# shellcheck disable=SC2317  # invoked through the traps below
note() {
    if [ "$1" = TERM ]; then
        got_term=1
        pending=TERM  # TERM wins over USR1: the job ends
    elif [ "$pending" != TERM ]; then
        pending="$1"
    fi
}
trap 'note USR1' USR1
trap 'note TERM' TERM
# one the sbatch script that sourced this file caught before (its first lines trap them)
if [ -n "${hpcopt_signal:-}" ]; then note "$hpcopt_signal"; fi

if [ $# -lt 1 ]; then
    echo "usage: $(basename "${BASH_SOURCE[0]}") CONFIG [--set KEY=VALUE ...] [--out DIR]" >&2
    exit 2
fi

if [ -n "${HPCOPT_LAUNCHER:-}" ]; then
    read -r -a launcher <<< "$HPCOPT_LAUNCHER"
else
    # The mpich wheel works under srun only with PMI-2 (`--mpi=pmix`: "unsupported PMI
    # version"); srun in Slurm 22.05 does not take -c from the batch job by itself.
    launcher=(srun "--mpi=${SLURM_MPI_TYPE:-pmi2}")
    if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then launcher+=(-c "$SLURM_CPUS_PER_TASK"); fi
fi
python="${HPCOPT_PYTHON:-python3}"
grace="${HPCOPT_SIGNAL_GRACE:-10}"
case "$grace" in
    ''|*[!0-9.]*|*.*.*|.) echo "hpcopt-job: HPCOPT_SIGNAL_GRACE = '$grace' is not allowed: give seconds (e.g. 3 or 0.5)" >&2
                          exit 2;;
esac
# one BLAS / OpenMP thread per CPU of the task unless the user chose otherwise
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-$OMP_NUM_THREADS}"
export MKL_NUM_THREADS="${MKL_NUM_THREADS:-$OMP_NUM_THREADS}"

now_us() {  # microseconds since the epoch
    if [ -n "${EPOCHREALTIME:-}" ]; then echo "${EPOCHREALTIME//[!0-9]/}"; else date +%s%6N; fi
}
grace_us="$(awk -v g="$grace" 'BEGIN { printf "%d", g * 1000000 }')"

"${launcher[@]}" "$python" -m mpi4py -m hpcopt run "$@" --resume &
child=$!
started="$(now_us)"
forwarded=""
# `wait` returns early when a trapped signal arrives: forward it, then wait again
while kill -0 "$child" 2>/dev/null; do
    if [ -n "$pending" ] && [ "$pending" != "$forwarded" ]; then
        left=$(( grace_us - ($(now_us) - started) ))
        if [ "$left" -gt 0 ]; then
            sleep "$(awk -v u="$left" 'BEGIN { printf "%.3f", u / 1000000 }')"
        fi
        echo "hpcopt-job: got $pending, asking hpcopt to checkpoint and stop" >&2
        forwarded="$pending"
        kill -s "$pending" "$child" 2>/dev/null
        continue  # another signal may have come during the grace sleep
    fi
    wait "$child"
done
wait "$child"  # the launcher's exit status (bash keeps it for a finished background job)
status=$?

if [ "$got_term" -eq 1 ]; then
    if [ "$status" -eq "$EXIT_REQUEUE" ] || [ "$status" -eq "$EXIT_TERMINATED" ]; then
        echo "hpcopt-job: hpcopt stopped at a checkpoint after SIGTERM (scancel or preemption); not requeueing" >&2
        exit "$EXIT_TERMINATED"
    fi
    exit "$status"
fi
if [ "$status" -eq "$EXIT_REQUEUE" ]; then
    read -r -a requeue <<< "${HPCOPT_REQUEUE:-scontrol requeue ${SLURM_JOB_ID:-}}"
    echo "hpcopt-job: hpcopt stopped at a checkpoint; requeueing: ${requeue[*]}" >&2
    "${requeue[@]}"
    exit 0
fi
exit "$status"
