#!/usr/bin/env bash
# Start this host's ranks of an HCCL rank table, like the seeds' run.sh, and watch them.
#
#   bash launchers/run_ranks.sh RANK_TABLE CONFIG_INI PROGRAM ARGS...
#
# Each local rank runs in the background as
#   PROGRAM ARGS --device_id=D --rank_id=R --config_file=CONFIG_INI
# with RANK, WORLD_SIZE and LOCAL_RANK exported and every output line prefixed "[rank R] ".
# When one rank fails, the others get SIGTERM, then SIGKILL after STOP_TIMEOUT seconds, and the
# script exits with the failed rank's status (128 + signal number when a signal killed it).
# Ctrl-C (or SIGTERM) stops every rank the same way and exits 130 (143).
#
# Each rank runs under launchers/_rank_wrapper.py (the watcher `orchestrate launch mpi` puts under
# every MPI rank): it prefixes the rank's lines, and it dies with this script (a Linux parent-death
# signal), taking its rank and the rank's children along, even when the script itself is SIGKILLed,
# which no trap can catch.
#
# Environment: PYTHON (default python3; reads the rank table with the project's parser and runs each rank's watcher),
# SERVER_ID (this host's server_id in the table when its names do not match),
# STOP_TIMEOUT (default $ORCH_STOP_TIMEOUT, else 10).
set -u

usage() {
    echo "usage: bash $0 RANK_TABLE CONFIG_INI PROGRAM ARGS..." >&2
}
if [ $# -lt 3 ]; then
    usage
    exit 2
fi
RANK_TABLE=$1
CONFIG_INI=$2
shift 2
if [ ! -f "$CONFIG_INI" ]; then
    echo "run_ranks.sh: config file $CONFIG_INI does not exist" >&2
    exit 2
fi
PYTHON=${PYTHON:-python3}
STOP_TIMEOUT=${STOP_TIMEOUT:-${ORCH_STOP_TIMEOUT:-10}}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONFIG_INI=$(cd "$(dirname "$CONFIG_INI")" && pwd)/$(basename "$CONFIG_INI")

# One line per local rank: "rank_id device_id local_rank world_size", read with the project's parser
# (so a malformed table, or an ini the ranks could not read, fails here, before any rank starts).
LOCAL_RANKS=$(PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - "$RANK_TABLE" "${SERVER_ID:-}" "$CONFIG_INI" <<'PY'
import sys
from launchers._rank_table_launcher import check_config_file
from ranks._errors import ConfigError, RankTableError
from ranks._rank_table import RankTable

path, server, ini = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    check_config_file(ini)
    table = RankTable.load(path)
except (ConfigError, RankTableError) as exc:
    sys.exit(f"run_ranks.sh: {exc}")
devices = table.local_devices([server] if server else None)
if not devices:
    sys.exit(f"run_ranks.sh: rank table {path} lists no device for this host "
             f"(servers: {', '.join(table.servers())}); set SERVER_ID to this host's server_id")
for local_rank, d in enumerate(devices):
    print(d.rank_id, d.device_id, local_rank, table.world_size)
PY
) || exit 2

# Job control: every rank's watcher gets its own process group (Ctrl-C in a terminal reaches only
# this script, which stops the ranks in order); the watcher puts its rank in a session of its own.
set -m
declare -a PIDS=()
declare -A RANK_OF=()

stop_all() {
    local pid waited=0
    # Each watcher passes SIGTERM on (with SIGCONT, for a stopped rank) and SIGKILLs its rank after
    # STOP_TIMEOUT; it may then take 2 s more to pass on the rank's last lines.
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; kill -CONT -- "-$pid" 2>/dev/null; done
    while [ "$waited" -lt $(((STOP_TIMEOUT + 3) * 10)) ]; do
        local alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" -eq 0 ] && break
        sleep 0.1
        waited=$((waited + 1))
    done
    # A watcher still there past its deadline goes now (its rank goes with it: parent-death signal).
    for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null; done
    wait 2>/dev/null
}

on_signal() {
    echo "run_ranks.sh: interrupted by SIG$1, stopping every rank" >&2
    stop_all
    [ "$1" = INT ] && exit 130
    exit 143
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap 'on_signal HUP' HUP

export PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}
while read -r rank device local_rank world; do
    RANK=$rank WORLD_SIZE=$world LOCAL_RANK=$local_rank \
        "$PYTHON" "$HERE/_rank_wrapper.py" --rank "$rank" --parent $$ --report-as run_ranks.sh \
        --stop-timeout "$STOP_TIMEOUT" -- \
        "$@" "--device_id=$device" "--rank_id=$rank" "--config_file=$CONFIG_INI" < /dev/null &
    PIDS+=("$!")
    RANK_OF[$!]=$rank
done <<< "$LOCAL_RANKS"
set +m  # the groups exist now; without job control bash prints no "Terminated" notices

# Wait for all; the first rank to fail ends the job.
REMAINING=("${PIDS[@]}")
while [ "${#REMAINING[@]}" -gt 0 ]; do
    NEXT=()
    for pid in "${REMAINING[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            NEXT+=("$pid")
            continue
        fi
        wait "$pid"
        status=$?
        if [ "$status" -ne 0 ]; then
            # its watcher has said which rank (and program pid) failed, and how
            echo "run_ranks.sh: rank ${RANK_OF[$pid]} ended with status $status; stopping the other ranks" >&2
            stop_all
            exit "$status"
        fi
    done
    REMAINING=("${NEXT[@]}")
    [ "${#REMAINING[@]}" -gt 0 ] && sleep 0.1
done
exit 0
