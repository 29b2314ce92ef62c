#!/usr/bin/env bash
# `make test`: formatting, lints and the whole test suite, including the
# integration tests against a real PostgreSQL and Kafka broker that this
# script starts first and stops afterwards (unless they were already up).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
STACK=scripts/stack.sh

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "formatting (cargo fmt --check)"
cargo fmt --all --check

# The tools (PostgreSQL package, the tansu broker: 11 minutes to build on a
# fresh machine) install while the workspace builds; both are cached after.
step "tools (PostgreSQL server, tansu) in the background, while building"
mkdir -p .local/logs
$STACK tools >.local/logs/tools.log 2>&1 &
tools_pid=$!

was_up=false
if $STACK status | grep -q "PostgreSQL  running" && $STACK status | grep -q "Kafka       running"; then
    was_up=true
fi
if ! $was_up; then
    trap '$STACK down >/dev/null 2>&1 || true' EXIT
fi

# Lints while building: the workspace's own crates are compiled by clippy's
# driver (what `cargo clippy` runs), which lints them and still produces the
# binaries, so the dependencies are not checked a second time (on a fresh
# machine a separate `cargo clippy` cost 10 minutes). Exported for the test
# step too, so it reuses this build. `make lint` is the same check alone.
export RUSTC_WORKSPACE_WRAPPER=clippy-driver
export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"

step "build and lints (dev profile, clippy -D warnings)"
cargo build --workspace --all-targets --locked

step "waiting for the tools"
if ! wait "$tools_pid"; then
    cat .local/logs/tools.log >&2
    echo "error: installing the tools failed (log above: .local/logs/tools.log)" >&2
    exit 1
fi

step "local stack"
$STACK up
# Test topics are never deleted (tansu 0.6 deletes every topic's metadata
# with one), so a long-lived local broker grows, and past a gigabyte or two
# (e.g. after `make bench-speed`) it is too slow for the suite's waits.
broker_db=.local/tansu/tansu.db
if [ -f "$broker_db" ] && [ "$(stat -c %s "$broker_db")" -gt 1000000000 ]; then
    echo "warning: the local broker holds $(du -h "$broker_db" | cut -f1); if tests time out, \`make clean\` resets it" >&2
fi

step "make up-replica: a hot standby streams from the local server"
$STACK up-replica >/dev/null
replica="postgres://postgres@127.0.0.1:${REPLICA_PORT:-5434}/lambda"
psql "$DATABASE_URL" -qc "CREATE TABLE IF NOT EXISTS public.replica_probe (at timestamptz); INSERT INTO public.replica_probe VALUES (now())"
probe=$(psql "$DATABASE_URL" -qtAc "SELECT max(at) FROM public.replica_probe")
for _ in $(seq 1 100); do
    [ "$(psql "$replica" -qtAc "SELECT pg_is_in_recovery() AND max(at) = '$probe' FROM public.replica_probe" 2>/dev/null)" = t ] && break
    sleep 0.2
done
[ "$(psql "$replica" -qtAc "SELECT pg_is_in_recovery() AND max(at) = '$probe' FROM public.replica_probe" 2>/dev/null)" = t ] \
    || { echo "error: the replica on ${REPLICA_PORT:-5434} did not replay the primary's write; see .local/logs/replica.log" >&2; exit 1; }
psql "$DATABASE_URL" -qc "DROP TABLE public.replica_probe"
$STACK down-replica >/dev/null
echo "replica: in recovery, replayed the primary's write"

step "tests (nextest)"
# The target directory is shared between clones (see the Makefile), so a
# test binary may have been built in another clone: snapshots are this one's.
export INSTA_WORKSPACE_ROOT=$ROOT
cargo nextest run --workspace --locked --no-fail-fast
