#!/usr/bin/env bash
# `make bench-dashboard`: the dashboard API's latency as history grows. For
# one and for four weeks of hourly demand (PRODUCTS products every hour,
# the shop of the batch benchmark), with the current hours in the speed
# layer above the cut, each endpoint the dashboard page calls is run under
# wrk through `serving-layer serve` (release profile). Uses its own
# database (bench_dashboard) on the local stack. Prints a table and
# rewrites the "## Dashboard API" section of docs/BENCHMARKS.md.
#
#   PRODUCTS=500 DURATION=10s CONNECTIONS=4 scripts/bench-dashboard.sh
set -euo pipefail
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

PG_SERVER=${BENCH_PG_SERVER:-postgres://postgres@127.0.0.1:5433}
DB=${BENCH_DATABASE:-bench_dashboard}
URL="$PG_SERVER/$DB"
PRODUCTS=${PRODUCTS:-500}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-4}
ADDR=${BENCH_ADDR:-127.0.0.1:18090}
OPS_ADDR=${BENCH_OPS_ADDR:-127.0.0.1:18091}

serve_bench_ready "$PG_SERVER"

# fill WEEKS: a fresh database with WEEKS weeks of hourly demand in the
# batch, the last three hours in the speed layer above the cut (4
# partitions, 2 segments each), a catalog of 12 categories and a baseline.
fill() {
    local weeks=$1
    psql "$PG_SERVER/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
    "$BIN" --database-url "$URL" migrate 2>/dev/null
    psql "$URL" -v ON_ERROR_STOP=1 -q -v hours=$((weeks * 168)) -v products="$PRODUCTS" <<'SQL'
-- Written where the batch layer writes: the active tables of each pair.
INSERT INTO ops.cut (kafka_partition, cut_offset) SELECT p, 1000000 FROM generate_series(0, 3) AS p;
INSERT INTO batch.products__a SELECT 'p-' || i, 'Product ' || i, 'c-' || (i % 12), 1000 + i
FROM generate_series(1, :products) AS i;
INSERT INTO batch.demand_baseline__a
SELECT 'p-' || i, (1.0 / i) / (SELECT sum(1.0 / j) FROM generate_series(1, :products) AS j), 300, 1000, 1.5
FROM generate_series(1, :products) AS i;
INSERT INTO batch.item_similarity__a SELECT 'p-' || p, 'p-' || ((p + j * 37) % :products + 1), 1.0 / j, j
FROM generate_series(1, :products) AS p, generate_series(1, 20) AS j;
-- Every product every hour, Zipf-like, up to three hours ago.
INSERT INTO batch.product_demand_hourly__a (hour, product_id, views, cart_adds, cart_removes, purchases, units, revenue_cents)
SELECT date_trunc('hour', now()) - h * interval '1 hour', 'p-' || i,
       1 + 3000 / i, 300 / i, 30 / i, 100 / i, 100 / i, 1000 * (100 / i)
FROM generate_series(3, :hours) AS h, generate_series(1, :products) AS i;
-- The speed layer's rows of the last three hours, above the cut.
INSERT INTO speed.product_demand_hourly (hour, product_id, kafka_partition, segment, views, cart_adds, cart_removes,
                                         purchases, units, revenue_cents)
SELECT date_trunc('hour', now()) - h * interval '1 hour', 'p-' || i, p, s, 1 + 400 / i, 40 / i, 4 / i, 12 / i, 12 / i,
       12000 / i
FROM generate_series(0, 2) AS h, generate_series(1, :products) AS i, generate_series(0, 3) AS p,
     generate_series(100, 101) AS s;
-- The rollups are filled by `migrate` when the generated set changes, as
-- after a release; here the batch rows were written by hand.
DELETE FROM ops.generated_views;
ANALYZE;
SQL
    "$BIN" --database-url "$URL" migrate 2>/dev/null
    psql "$URL" -qc ANALYZE
}

LOG=$(mktemp)
LUA=$(mktemp --suffix .lua)
server=
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; rm -f "$LOG" "$LUA"' EXIT

# Latency in ms from wrk's "50%  1.23ms" lines.
pct() { awk -v p="$1" '$1 == p { v = $2; if (v ~ /us$/) { sub(/us$/, "", v); v /= 1000 } else if (v ~ /ms$/) { sub(/ms$/, "", v) } else if (v ~ /s$/) { sub(/s$/, "", v); v *= 1000 } printf "%.2f", v }'; }
rps() { awk '/^Requests\/sec/ { printf "%.0f", $2 }'; }
errors() { awk '/Non-2xx|Socket errors/ { print }'; }

ENDPOINTS=(
    "/api/demand/hourly"
    "/api/demand/hourly?category=c-3"
    "/api/demand/hourly?product_id=p-7"
    "/api/spikes"
    "/api/popular?limit=20"
    "/api/freshness"
)
declare -A RESULT
for weeks in 1 4; do
    say "database $DB: $weeks week(s) of history, $PRODUCTS products"
    fill "$weeks"
    rows=$(psql "$URL" -Atqc "SELECT count(*) FROM batch.product_demand_hourly")
    KEY=$("$BIN" --database-url "$URL" keys create --scope dashboard --name bench 2>/dev/null)
    RUST_LOG=warn "$BIN" --database-url "$URL" serve --addr "$ADDR" --ops-addr "$OPS_ADDR" --rate-limit 1000000 \
        >"$LOG" 2>&1 &
    server=$!
    for _ in $(seq 1 300); do
        curl -fs "http://$OPS_ADDR/readyz" >/dev/null 2>&1 && break
        kill -0 "$server" 2>/dev/null || { cat "$LOG" >&2; die "serving-layer serve stopped"; }
        sleep 0.1
    done
    for path in "${ENDPOINTS[@]}"; do
        curl -fs -H "Authorization: Bearer $KEY" "http://$ADDR$path" >/dev/null ||
            die "$path fails: $(curl -s -H "Authorization: Bearer $KEY" "http://$ADDR$path")"
        cat >"$LUA" <<LUA
request = function()
  return wrk.format("GET", "$path", { ["Authorization"] = "Bearer $KEY" })
end
LUA
        say "$weeks week(s): $path"
        out=$(wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -s "$LUA" "http://$ADDR")
        [ -z "$(echo "$out" | errors)" ] || die "wrk saw errors on $path: $(echo "$out" | errors)"
        RESULT["$weeks|$path"]="$(echo "$out" | rps) | $(echo "$out" | pct 50%) | $(echo "$out" | pct 99%)"
        echo "  ${RESULT["$weeks|$path"]}"
    done
    RESULT["rows|$weeks"]=$rows
    kill "$server" && wait "$server" 2>/dev/null || true
    server=
done

cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
when=$(date -u '+%Y-%m-%d %H:%M UTC')
rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- . ':!docs/BENCHMARKS.md' 2>/dev/null || rev="$rev with local changes"
table=$(for path in "${ENDPOINTS[@]}"; do
    echo "| \`$path\` | ${RESULT["1|$path"]} | ${RESULT["4|$path"]} |"
done)
section=$(cat <<MD
## Dashboard API

\`make bench-dashboard\` ($when, commit $rev): each endpoint the dashboard
page calls, through \`serving-layer serve\` (release profile) and
PostgreSQL, under wrk (\`-t1 -c$CONNECTIONS -d$DURATION\`, closed loop) on
the same machine: $(nproc) cores ($cpu). History: $PRODUCTS products with
demand every hour, ${RESULT["rows|1"]} batch rows for one week and
${RESULT["rows|4"]} for four, the last three hours in the speed layer
above the cut. Requests/s, p50 ms, p99 ms:

| endpoint | 1 week: req/s | p50 | p99 | 4 weeks: req/s | p50 | p99 |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
$table

Reads cost the hours they ask for, not the history: category demand and
spike detection read the batch's per-hour rollups
(\`batch.category_demand_hourly\`, \`batch.demand_levels\`) and compute
only the hours the speed layer holds; popularity reads its rollup (a row
per product) and the speed layer's hours.
MD
)
echo
echo "$section"
SECTION="$section" write_section "## Dashboard API"
say "written to docs/BENCHMARKS.md"
