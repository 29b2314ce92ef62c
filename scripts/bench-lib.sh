# Shared by scripts/bench-*.sh (sourced): environment, the machine, the
# local stack and the release build.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export LAMBDA_CACHE=${LAMBDA_CACHE:-$HOME/.cache/lambda-platform}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$LAMBDA_CACHE/target}
export KAFKA_BROKERS=${KAFKA_BROKERS:-127.0.0.1:9092}
export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5433/lambda}
# Progress lines and tables, not info logs (override with RUST_LOG=info).
export RUST_LOG=${RUST_LOG:-warn,sqlx=error,buoyant_kernel::snapshot::builder=off}
RELEASE=$CARGO_TARGET_DIR/release

step() { printf '\n\033[1m[%s] %s\033[0m\n' "$(date -u +%H:%M:%S)" "$*"; }
say() { printf '\033[1m==>\033[0m %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# serve_bench_ready PG_SERVER: wrk and PostgreSQL are there, and the
# release `serving-layer` is built ($BIN); the serving benchmarks' start.
serve_bench_ready() {
    command -v wrk >/dev/null || die "wrk is missing: scripts/stack.sh tools installs it"
    psql "$1/postgres" -Atqc 'SELECT 1' >/dev/null 2>&1 || die "PostgreSQL does not answer at $1: make up"
    say "building serving-layer (release profile, as it runs in production)"
    cargo build --quiet --release --locked -p serving-layer --bin serving-layer
    BIN=$RELEASE/serving-layer
}

# What the figures were measured on (copied into docs/BENCHMARKS.md).
machine() {
    echo "date:    $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "machine: $(nproc) CPUs, $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n1), $(free -g | awk '/^Mem:/ {print $2}') GB RAM"
    echo "load:    $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min) before the run"
    echo "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
}

# The stack as `make up` starts it. A stack started from another clone of
# the repository (its state is in that clone's .local/) is used as it is.
ensure_stack() {
    local server=${DATABASE_URL%/*}
    if psql "$server/postgres" -qtAc 'SELECT 1' >/dev/null 2>&1 \
        && (exec 3<>"/dev/tcp/${KAFKA_BROKERS%:*}/${KAFKA_BROKERS##*:}") 2>/dev/null; then
        echo "PostgreSQL and Kafka answer; using them"
    else
        scripts/stack.sh up
    fi
}

# build_release BIN: the benchmark tool (crate `tools`), optimised (the dev profile would
# measure the compiler's debug settings, not the platform).
build_release() {
    cargo build --release --locked -p tools --bin "$1"
}

# write_section "## Title": replaces that section of docs/BENCHMARKS.md with
# the text in $SECTION (which starts with the same heading), keeping every
# other section; appends it if missing.
write_section() {
    local out=docs/BENCHMARKS.md
    [ -f "$out" ] || printf '# Benchmarks\n\nWhole-system figures; each section is written by its `make bench-*` target.\n' >"$out"
    HEADING="$1" SECTION="$SECTION" python3 - "$out" <<'PY'
import os, re, sys
path = sys.argv[1]
text = open(path).read()
section = os.environ["SECTION"].rstrip() + "\n"
pattern = re.compile("^" + re.escape(os.environ["HEADING"]) + r"\n.*?(?=^## |\Z)", re.S | re.M)
if pattern.search(text):
    text = pattern.sub(lambda _: section + "\n", text, count=1)
else:
    text = text.rstrip() + "\n\n" + section
open(path, "w").write(text.rstrip() + "\n")
PY
}
