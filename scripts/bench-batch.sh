#!/usr/bin/env bash
# `make bench-batch`: DataFusion against DuckDB on a lake of 20 million
# events, a full `batch-layer run` against an incremental one, and the full
# run on a local Ballista cluster (1 scheduler, 2 executors, release build)
# against the in-process one (BENCH_BALLISTA=0 skips it). Extra
# arguments go to the tool (`--help` lists them), e.g. ARGS="--reps 3".
# The lake is cached under $LAMBDA_CACHE/bench/; DuckDB is installed from
# PyPI into $LAMBDA_CACHE/tools/venv.
set -euo pipefail
source "$(dirname "$0")/bench-lib.sh"

step "machine"
machine

step "local stack"
ensure_stack

VENV=$LAMBDA_CACHE/tools/venv
step "DuckDB (PyPI) in $VENV"
if ! "$VENV/bin/python" -c 'import duckdb' 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet duckdb
fi
"$VENV/bin/python" -c 'import duckdb; print("duckdb", duckdb.__version__)'

step "build (release profile)"
build_release bench_batch
cargo build --release --locked -p batch-layer --bin batch-layer -p batch-cluster --bin batch-cluster

ballista=()
if [ "${BENCH_BALLISTA:-1}" != 0 ]; then
    step "local Ballista cluster (release build, port ${BALLISTA_PORT:=50060})"
    export BALLISTA_PORT BATCH_CLUSTER=$RELEASE/batch-cluster LOCAL_DIR=$LAMBDA_CACHE/bench/cluster
    trap 'scripts/cluster.sh down >/dev/null 2>&1 || true' EXIT
    scripts/cluster.sh up
    ballista=(--ballista "ballista://127.0.0.1:$BALLISTA_PORT")
fi

step "benchmark"
"$RELEASE/bench_batch" --python "$VENV/bin/python" --duckdb-script scripts/bench_duckdb.py "${ballista[@]}" "$@"
