#!/usr/bin/env bash
# `make demo`: everything a new user needs, from a fresh clone.
# Each step says what it does; a failure names the step and the log to read.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export LAMBDA_CACHE=${LAMBDA_CACHE:-$HOME/.cache/lambda-platform}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$LAMBDA_CACHE/target}
LOGS=$ROOT/.local/logs
mkdir -p "$LOGS"
BIN=$CARGO_TARGET_DIR/debug

current=""
trap 'rc=$?; if [ $rc -ne 0 ]; then printf "\nerror: demo step \"%s\" failed (exit %s); see the output above and %s/\n" "$current" "$rc" "$LOGS" >&2; fi' EXIT
step() { current=$1; printf '\n\033[1m[%s] %s\033[0m\n' "$(date +%H:%M:%S)" "$1"; }

step "install tools (PostgreSQL server, tansu broker) if missing"
scripts/stack.sh tools

step "build the platform (first time: about 20 minutes on 2 cores)"
cargo build --workspace --bins --locked 2>&1 | tee "$LOGS/build.log" | grep -E '^(error|warning: unused)' || true
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "build failed; see $LOGS/build.log" >&2; exit 1; }

step "start PostgreSQL and Kafka, create topics, apply migrations"
scripts/stack.sh up

step "generate one hour of shop history into topic 'events'"
"$BIN/generate" --backfill-hours "${DEMO_HISTORY_HOURS:-1}" --rate "${DEMO_RATE:-20}" --bad-fraction 0.01 \
    --truth .local/generator/truth.json

cat <<TXT

The stack is up and the topic 'events' holds an hour of shop traffic.

  where                 what
  --------------------  ---------------------------------------------------
  Kafka 127.0.0.1:9092  topics 'events' (4 partitions) and 'events.dlq'
  PostgreSQL :5433      databases 'lambda' (platform) and 'sales' (catalog)
  .local/generator/     truth.json: what was sent, and the injected spikes

  make psql                                  the platform database
  psql postgres://postgres@127.0.0.1:5433/sales -c 'TABLE products LIMIT 5'
  make generate ARGS="--duration 60s --rate 100"   more traffic, live
  make status | make logs | make down | make clean

The batch, speed and serving layers are being built (see the issues); this
demo grows with them.
TXT
