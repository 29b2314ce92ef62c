#!/usr/bin/env bash
# `make bench-batch`: DataFusion against DuckDB on a lake of 20 million
# events, and a full `batch-layer run` against an incremental one. Extra
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

step "benchmark"
"$RELEASE/bench_batch" --python "$VENV/bin/python" --duckdb-script scripts/bench_duckdb.py "$@"
