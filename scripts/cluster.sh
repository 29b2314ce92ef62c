#!/usr/bin/env bash
# A local Ballista cluster for `batch-layer run --engine ballista://…`: one
# `batch-cluster scheduler` and two `batch-cluster executor`s on loopback,
# state and logs under .local/ballista.
#
#   scripts/cluster.sh up      start them (idempotent) and wait until the
#                              scheduler has both executors
#   scripts/cluster.sh down    stop them (SIGTERM, then SIGKILL after 10 s)
#   scripts/cluster.sh status  what runs where
#
# Executors read the lake themselves: for an s3:// lake, export the AWS_*
# variables before `up`. Ports: BALLISTA_PORT (scheduler, default 50050);
# executor i takes 50051+2i (data) and the next port (gRPC).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
LOCAL=${LOCAL_DIR:-$ROOT/.local}
DIR=$LOCAL/ballista
CACHE=${LAMBDA_CACHE:-$HOME/.cache/lambda-platform}
BIN=${BATCH_CLUSTER:-${CARGO_TARGET_DIR:-$CACHE/target}/debug/batch-cluster}
PORT=${BALLISTA_PORT:-50050}
EXECUTORS=${BALLISTA_EXECUTORS:-2}

say() { printf '\033[1m==>\033[0m %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

running() { [ -f "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

start() {
    local name=$1; shift
    if running "$name"; then return; fi
    nohup "$BIN" "$@" >"$DIR/$name.log" 2>&1 &
    echo $! >"$DIR/$name.pid"
}

ready() { curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1; }

start_executor() {
    local i=$1 port=$2
    echo "$port" >"$DIR/executor-$i.port"
    start "executor-$i" executor --scheduler "127.0.0.1:$PORT" --port "$port" --work-dir "$DIR/executor-$i"
}

up() {
    [ -x "$BIN" ] || die "$BIN is missing: run \`make build\` first"
    mkdir -p "$DIR"
    start scheduler scheduler --bind "127.0.0.1:$PORT" --min-executors "$EXECUTORS"
    for i in $(seq 0 $((EXECUTORS - 1))); do
        start_executor "$i" $((PORT + 1 + 2 * i))
    done
    say "waiting for the scheduler and $EXECUTORS executors"
    local moves=0
    for _ in $(seq 1 300); do
        if ready; then
            say "Ballista cluster ready: batch-layer run --engine ballista://127.0.0.1:$PORT"
            return
        fi
        for f in "$DIR"/*.pid; do
            local name; name=$(basename "$f" .pid)
            running "$name" && continue
            # Ports here lie in Linux's ephemeral range: an outgoing
            # connection may hold one for a moment. Move the executor on.
            if [[ $name == executor-* ]] && grep -q "Address already in use" "$DIR/$name.log" && [ $moves -lt 5 ]; then
                moves=$((moves + 1))
                local port; port=$(( $(cat "$DIR/$name.port") + 2 * EXECUTORS ))
                say "$name: port taken, moving to $port"
                rm -f "$f"
                start_executor "${name#executor-}" "$port"
                continue
            fi
            die "$name exited; its log: $DIR/$name.log ($(tail -n 3 "$DIR/$name.log" | tr '\n' ' '))"
        done
        sleep 0.2
    done
    die "the cluster did not become ready in 60 s; logs in $DIR"
}

down() {
    local pids=()
    for f in "$DIR"/*.pid; do
        [ -f "$f" ] || continue
        local pid; pid=$(cat "$f")
        kill "$pid" 2>/dev/null && pids+=("$pid")
        rm -f "$f" "${f%.pid}.port"
    done
    for _ in $(seq 1 50); do
        local alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && break
        sleep 0.2
    done
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    say "Ballista cluster stopped"
}

status() {
    for f in "$DIR"/*.pid; do
        [ -f "$f" ] || { echo "Ballista cluster: not running"; return; }
        local name; name=$(basename "$f" .pid)
        if running "$name"; then echo "$name  running (pid $(cat "$f"))"; else echo "$name  stopped"; fi
    done
    if ready; then echo "scheduler   ready on 127.0.0.1:$PORT"; fi
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
