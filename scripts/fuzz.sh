#!/usr/bin/env bash
# `make fuzz`: the decoder's fuzz target (fuzz/fuzz_targets/decode.rs) for
# FUZZ_SECONDS (default 60), seeded from the committed bad-input corpus.
#
# cargo-fuzz passes unstable `-Z` flags (the address sanitizer, coverage
# passes) to rustc; RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them,
# so no nightly is needed. cargo-fuzz itself is installed into the tool
# cache when missing. A finding stops the run and is kept under
# fuzz/artifacts/decode/; replay it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run decode fuzz/artifacts/decode/<file>
# from fuzz/ (with the PATH and CARGO_TARGET_DIR below).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${LAMBDA_CACHE:-$HOME/.cache/lambda-platform}
CARGO_FUZZ_VERSION=0.13.2
FUZZ_SECONDS=${FUZZ_SECONDS:-60}

# Its own build directory: the sanitizer flags would invalidate the
# workspace's shared dev build.
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$CACHE/target-fuzz}
export PATH="$CACHE/tools/bin:$PATH"
if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
    echo "installing cargo-fuzz $CARGO_FUZZ_VERSION into $CACHE/tools (once)"
    cargo install --quiet --locked --root "$CACHE/tools" cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi
export RUSTC_BOOTSTRAP=1

cd "$ROOT/fuzz"
mkdir -p corpus/decode
# The first folder collects what the fuzzer learns; the corpus folders only seed it.
# -max_len leaves room for records just over the 16 KiB limit.
cargo fuzz run decode corpus/decode ../integration-tests/corpus/bad ../integration-tests/corpus/good -- \
    -max_total_time="$FUZZ_SECONDS" -max_len=20000 -dict=decode.dict -print_final_stats=1
