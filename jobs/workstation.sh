#!/usr/bin/env bash
# workstation.sh NRANKS CONFIG [hpcopt run options ...]
#
# mpiexec on one machine with sane thread settings: each rank gets its share of the
# cores for OpenMP / BLAS, and waiting OpenMP threads sleep instead of spinning.
#   jobs/workstation.sh 4 configs/quickstart.yaml --set optimizer.lr=0.3
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: workstation.sh NRANKS CONFIG [--set KEY=VALUE ...] [--resume] [--out DIR]" >&2
    exit 2
fi
ranks="$1"
shift
bad_ranks() {
    echo "workstation.sh: NRANKS = '$1' is not allowed: must be a positive integer (1, 2, ...; at most 9 digits)" >&2
    exit 2
}
case "$ranks" in ''|*[!0-9]*) bad_ranks "$ranks";; esac
[ "${#ranks}" -le 9 ] || bad_ranks "$ranks"  # longer ones would overflow the shell's arithmetic
[ $(( 10#$ranks )) -ge 1 ] || bad_ranks "$ranks"  # 0 ranks: nothing to run (and no share of the cores)
ranks=$(( 10#$ranks ))  # 08 is eight, not a bad octal number
cores="$(nproc 2>/dev/null || echo 1)"
per=$(( cores / ranks ))
[ "$per" -ge 1 ] || per=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$per}"
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-$OMP_NUM_THREADS}"
export MKL_NUM_THREADS="${MKL_NUM_THREADS:-$OMP_NUM_THREADS}"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec "${HPCOPT_MPIEXEC:-mpiexec}" -n "$ranks" "${HPCOPT_PYTHON:-python3}" -m mpi4py -m hpcopt run "$@"
