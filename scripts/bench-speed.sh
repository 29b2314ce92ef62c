#!/usr/bin/env bash
# `make bench-speed`: the speed layer's own ceiling (1 million events from
# memory, no broker), its throughput against a bare Kafka consumer on 5
# million pre-loaded events, and its freshness (produce to visible in
# serving.product_demand_hourly) at 10,000 events/s. Extra
# arguments go to the tool (`--help` lists them), e.g. ARGS="--reps 2".
set -euo pipefail
source "$(dirname "$0")/bench-lib.sh"

step "machine"
machine

step "local stack"
ensure_stack

step "build (release profile)"
build_release bench_speed

step "benchmark"
"$RELEASE/bench_speed" "$@"

# The pre-loaded topic stays (later runs reuse it), so the local broker is
# now large; the test suite wants a fresh one.
if [ -f .local/tansu/tansu.db ]; then
    echo "note: the local broker now holds $(du -h .local/tansu/tansu.db | cut -f1); run \`make clean\` before \`make test\`"
fi
