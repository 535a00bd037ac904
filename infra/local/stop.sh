#!/usr/bin/env bash
# `make stop`: stops what `make serve` (infra/local/serve.sh) started under $VLMOPS_STATE_DIR
# (.vlmops-stack/). The worker first, then the servers: each recorded process group gets
# SIGTERM, some seconds to exit (the servers 20, to close their databases; the worker 5), then
# SIGKILL. Descendants that left the group (flow runs, which the worker starts in sessions of
# their own) are signalled with it: a run in progress is stopped too. Exits 1, naming them, if
# any process survives; the state (databases, artifacts, logs) is kept for the next `make serve`.
#
# Why the worker gets only 5 s: prefect 3.9.1's worker turns SIGTERM into a SIGINT to itself,
# which an idle worker swallows and keeps running (10 of 12 tries here); a second signal makes it
# SIGKILL itself. Waiting longer only delays the SIGKILL.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO" || exit 1
STATE="${VLMOPS_STATE_DIR:-.vlmops-stack}"
SERVICES=(worker mlflow-server prefect-server)
declare -A GRACE_S=([worker]=5 [mlflow-server]=20 [prefect-server]=20)

# Live (non-zombie) processes of group $1 and every descendant of them, whatever its group.
processes_of() {
    ps -e -o pid=,ppid=,pgid=,stat= | awk -v g="$1" '
        { pids[NR] = $1; parent[$1] = $2; group[$1] = $3; state[$1] = $4 }
        END {
            for (i = 1; i <= NR; i++) if (group[pids[i]] == g) picked[pids[i]] = 1
            for (grew = 1; grew;) {
                grew = 0
                for (i = 1; i <= NR; i++) {
                    p = pids[i]
                    if (!(p in picked) && (parent[p] in picked)) { picked[p] = 1; grew = 1 }
                }
            }
            for (p in picked) if (state[p] !~ /^Z/) print p
        }'
}

# Which of the given PIDs are still alive (zombies count as gone).
alive() {
    [[ $# -gt 0 ]] || return 0
    ps -o pid=,stat= -p "$(IFS=,; echo "$*")" 2>/dev/null | awk '$2 !~ /^Z/ {print $1}'
}

signal_all() {  # signal pgid pids...
    local sig=$1 pgid=$2
    shift 2
    kill "-$sig" -- "-$pgid" 2>/dev/null
    for pid in "$@"; do kill "-$sig" "$pid" 2>/dev/null; done
    return 0
}

wait_gone() {  # timeout_s pgid pids...: prints the survivors
    local deadline=$((SECONDS + $1)) pgid=$2 left
    shift 2
    while :; do
        left="$( (alive "$@"; processes_of "$pgid") | sort -un)"
        if [[ -z "$left" ]] || ((SECONDS >= deadline)); then
            echo "$left"
            return
        fi
        sleep 0.2
    done
}

if [[ ! -d "$STATE" ]]; then
    echo "stop: no state dir $STATE: nothing to stop"
    exit 0
fi

rc=0
stopped=0
for name in "${SERVICES[@]}"; do
    pidfile="$STATE/$name.pid"
    [[ -f "$pidfile" ]] || continue
    pgid="$(cat "$pidfile")"
    if ! [[ "$pgid" =~ ^[0-9]+$ ]] || ((pgid <= 1)); then
        echo "stop: $pidfile holds '$pgid', not a process group id; left alone" >&2
        rc=1
        continue
    fi
    mapfile -t pids < <(processes_of "$pgid")
    if [[ ${#pids[@]} -eq 0 ]]; then
        echo "stop: $name was not running"
        rm -f "$pidfile"
        continue
    fi
    began=$SECONDS
    signal_all TERM "$pgid" "${pids[@]}"
    survivors="$(wait_gone "${GRACE_S[$name]}" "$pgid" "${pids[@]}")"
    if [[ -n "$survivors" ]]; then
        echo "stop: $name: $(echo "$survivors" | wc -l) process(es) ignored SIGTERM; sending SIGKILL"
        mapfile -t more < <(echo "$survivors")
        signal_all KILL "$pgid" "${pids[@]}" "${more[@]}"
        survivors="$(wait_gone 10 "$pgid" "${pids[@]}" "${more[@]}")"
    fi
    if [[ -n "$survivors" ]]; then
        echo "stop: $name: processes survive SIGKILL:" >&2
        ps -o pid=,pgid=,stat=,args= -p "$(echo "$survivors" | paste -sd,)" >&2
        rc=1
    else
        echo "stop: $name stopped (process group $pgid, ${#pids[@]} process(es), $((SECONDS - began)) s)"
        rm -f "$pidfile"
        stopped=$((stopped + 1))
    fi
done

if [[ $rc -eq 0 ]]; then
    rm -f "$STATE/stack.env"
    [[ $stopped -gt 0 ]] || echo "stop: nothing was running"
fi
exit $rc
