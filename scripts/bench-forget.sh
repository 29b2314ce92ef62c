#!/usr/bin/env bash
# `make bench-forget`: forget-user for 1, 100 and 1,000 users in one request
# each, on copies of the batch benchmark's lake (20 million events; made
# once and cached under $LAMBDA_CACHE/bench/, shared with `make
# bench-batch`). Extra arguments go to the tool, e.g. ARGS="--forget 1,10".
set -euo pipefail
source "$(dirname "$0")/bench-lib.sh"

step "machine"
machine

step "local stack"
ensure_stack

step "build (release profile)"
build_release bench_batch

step "benchmark"
"$RELEASE/bench_batch" --forget "${FORGET_SIZES:-1,100,1000}" "$@"
