#!/usr/bin/env bash
# `make bench-speed`: the speed layer's throughput against a bare Kafka
# consumer on 5 million pre-loaded events, and its freshness (produce to
# visible in serving.product_demand_hourly) at 10,000 events/s. Extra
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
