#!/usr/bin/env bash
# `make serve`: the whole stack on this machine, on loopback, for trying the deployments.
#
#   Prefect server (UI + API, SQLite)        http://127.0.0.1:$PREFECT_PORT   (4200)
#   MLflow server (SQLite + local artifacts) http://127.0.0.1:$MLFLOW_PORT    (5000)
#   the work pool `vlmops-process`, prefect.yaml's deployments, and a process worker
#
# Everything lives under $VLMOPS_STATE_DIR (.vlmops-stack/): databases, artifacts, Prefect's
# home (result storage), logs/, one PID file per server / worker, and stack.env, which points
# a shell at the stack (`source .vlmops-stack/stack.env; .venv/bin/vlmops run ...`).
# Each server and the worker runs as the leader of its own session (setsid), so its PID is
# its process group id: `make stop` (infra/local/stop.sh) stops the whole group, including
# the children `mlflow server` and the worker spawn.
#
# Refuses to start when its PID files name running processes or a port is taken; if anything
# fails to come up, stops what it started and prints the log's tail.
set -euo pipefail
set +m  # no job control: a background child stays out of its own group, so setsid does not fork

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"  # prefect.yaml's pull step records $PWD: flow runs start in this checkout

STATE="${VLMOPS_STATE_DIR:-.vlmops-stack}"
PREFECT_PORT="${PREFECT_PORT:-4200}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
HOST=127.0.0.1
POOL=vlmops-process
BIN="$REPO/.venv/bin"
SERVICES=(prefect-server mlflow-server worker)

for tool in prefect mlflow python; do
    [[ -x "$BIN/$tool" ]] || { echo "serve: $BIN/$tool is missing; run 'make venv' first" >&2; exit 1; }
done
mkdir -p "$STATE/logs"
STATE="$(cd "$STATE" && pwd)"
LOGS="$STATE/logs"

group_alive() {  # pgid: true while any non-zombie process of the group exists
    ps -e -o pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ {found = 1} END {exit !found}'
}

for name in "${SERVICES[@]}"; do
    pidfile="$STATE/$name.pid"
    if [[ -f "$pidfile" ]]; then
        if group_alive "$(cat "$pidfile")"; then
            echo "serve: $name is already running (process group $(cat "$pidfile"), $pidfile); 'make stop' first" >&2
            exit 1
        fi
        rm -f "$pidfile"  # stale: left by a stack that died without `make stop`
    fi
done

port_taken() {
    "$BIN/python" - "$1" <<'EOF'
import socket, sys
with socket.socket() as sock:
    sock.settimeout(1)
    sys.exit(0 if sock.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)
EOF
}
for port in "$PREFECT_PORT" "$MLFLOW_PORT"; do
    if port_taken "$port"; then
        echo "serve: port $port on $HOST is taken; choose another (PREFECT_PORT=... MLFLOW_PORT=... make serve)" >&2
        exit 1
    fi
done

# Loopback only, nothing phones home, no proxy between us and our own servers.
export NO_PROXY="$HOST,localhost" no_proxy="$HOST,localhost"
export DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false
# Prefect's database, settings and result storage stay in the state dir, not ~/.prefect.
export PREFECT_HOME="$STATE/prefect"
PREFECT_URL="http://$HOST:$PREFECT_PORT"
MLFLOW_URL="http://$HOST:$MLFLOW_PORT"

STARTED=()
declare -A LOG_OFFSET  # where each service's log stood when this serve started it (logs are appended to)
cleanup_on_failure() {
    local rc=$?
    if [[ $rc -ne 0 && ${#STARTED[@]} -gt 0 ]]; then
        echo "serve: failed (exit $rc); stopping what was started" >&2
        VLMOPS_STATE_DIR="$STATE" "$REPO/infra/local/stop.sh" >&2 || true
    fi
}
trap cleanup_on_failure EXIT

start_group() {  # name command...: runs in a new session; its PID (= process group id) goes to name.pid
    local name=$1
    shift
    LOG_OFFSET[$name]=$(stat -c %s "$LOGS/$name.log" 2>/dev/null || echo 0)
    setsid "$@" </dev/null >>"$LOGS/$name.log" 2>&1 &
    echo $! >"$STATE/$name.pid"
    STARTED+=("$name")
}

wait_until() {  # name timeout_s command...: polls the command until it succeeds
    local name=$1 timeout=$2 start=$SECONDS
    shift 2
    local pid
    pid="$(cat "$STATE/$name.pid")"
    until "$@" >/dev/null 2>&1; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "serve: $name exited before answering; last lines of $LOGS/$name.log:" >&2
            tail -n 40 "$LOGS/$name.log" >&2
            return 1
        fi
        if ((SECONDS - start > timeout)); then
            echo "serve: $name did not answer within ${timeout} s; last lines of $LOGS/$name.log:" >&2
            tail -n 40 "$LOGS/$name.log" >&2
            return 1
        fi
        sleep 1
    done
    # setsid made the process a session (and group) leader: the PID file is the group to stop.
    if [[ "$(ps -o pgid= -p "$pid" | tr -d ' ')" != "$pid" ]]; then
        echo "serve: $name (PID $pid) is not the leader of its own process group" >&2
        return 1
    fi
    echo "serve: $name answers ($((SECONDS - start)) s)"
}

http_ok() { curl --silent --fail --noproxy '*' --max-time 3 --output /dev/null "$1"; }

# 1. Both servers start at once (Prefect takes ~30 s to come up, MLflow ~10 s).
echo "serve: starting Prefect on $PREFECT_URL and MLflow on $MLFLOW_URL (state: $STATE)"
mkdir -p "$STATE/mlflow/artifacts" "$PREFECT_HOME"
# SQLite in the state dir, whatever database this shell points Prefect at.
PREFECT_SERVER_DATABASE_CONNECTION_URL="sqlite+aiosqlite:///$PREFECT_HOME/prefect.db" \
    PREFECT_UI_API_URL="$PREFECT_URL/api" \
    start_group prefect-server "$BIN/prefect" server start --host "$HOST" --port "$PREFECT_PORT"
# One uvicorn worker and no job-execution consumers: the UI and registry need neither.
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
    start_group mlflow-server "$BIN/mlflow" server --host "$HOST" --port "$MLFLOW_PORT" \
    --backend-store-uri "sqlite:///$STATE/mlflow/mlflow.db" \
    --artifacts-destination "$STATE/mlflow/artifacts" --serve-artifacts --workers 1
wait_until mlflow-server 120 http_ok "$MLFLOW_URL/health"
wait_until prefect-server 180 http_ok "$PREFECT_URL/api/health"

# From here on, every Prefect command and the worker talk to these servers.
export PREFECT_API_URL="$PREFECT_URL/api" PREFECT_UI_URL="$PREFECT_URL" MLFLOW_TRACKING_URI="$MLFLOW_URL"

# 2. The work pool prefect.yaml's deployments use, then the deployments themselves.
if ! http_ok "$PREFECT_API_URL/work_pools/$POOL"; then
    "$BIN/prefect" --no-prompt work-pool create "$POOL" --type process >>"$LOGS/deploy.log" 2>&1 \
        || { tail -n 40 "$LOGS/deploy.log" >&2; exit 1; }
fi
echo "serve: deploying prefect.yaml (log: $LOGS/deploy.log)"
"$BIN/prefect" --no-prompt deploy --all >>"$LOGS/deploy.log" 2>&1 || { tail -n 40 "$LOGS/deploy.log" >&2; exit 1; }

# 3. The worker: runs each flow run as a subprocess of this checkout's environment, with
# MLFLOW_TRACKING_URI / PREFECT_API_URL (and whatever else this shell exports) inherited.
PREFECT_WORKER_QUERY_SECONDS="${PREFECT_WORKER_QUERY_SECONDS:-5}" \
    start_group worker "$BIN/prefect" worker start --pool "$POOL" --type process
# Ready: this worker says it started, and the pool is READY (it has an online worker).
worker_ready() {
    tail -c +$((LOG_OFFSET[worker] + 1)) "$LOGS/worker.log" | grep -q "started!" \
        && curl --silent --fail --noproxy '*' --max-time 3 "$PREFECT_API_URL/work_pools/$POOL" \
        | grep -Eq '"status": ?"READY"'
}
wait_until worker 90 worker_ready

cat >"$STATE/stack.env" <<EOF
# source this file to point runs and the CLIs at the stack \`make serve\` started
export PREFECT_API_URL=$PREFECT_API_URL
export PREFECT_UI_URL=$PREFECT_UI_URL
export MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI
EOF
trap - EXIT

cat <<EOF

Prefect UI:  $PREFECT_URL   (Deployments -> finetune-manual -> Run)
MLflow UI:   $MLFLOW_URL
worker:      pool $POOL; logs in $LOGS
use it:      source $STATE/stack.env   (then .venv/bin/vlmops run -c configs/demo.yaml)
stop it:     make stop
EOF
