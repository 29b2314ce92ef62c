#!/usr/bin/env bash
# `make bench-recovery`: how long the two recovery drills of
# docs/OPERATIONS.md take at benchmark size, with the release binaries.
#
#  A. PostgreSQL lost: a new database (`serving-layer migrate`), then
#     `batch-layer recover --skip-ingest` over the 20-million-event lake of
#     `make bench-batch` (cached under $LAMBDA_CACHE/bench/; run that first).
#  B. The lake lost: `batch-layer recover` into an empty lake from a topic
#     of RECOVERY_EVENTS events (default 5 million, the speed benchmark's
#     size; generated once into the local broker and reused).
#
# Writes the "## Recovery" section of docs/BENCHMARKS.md.
set -euo pipefail
source "$(dirname "$0")/bench-lib.sh"

EVENTS=${RECOVERY_EVENTS:-5000000}
TANSU=${TANSU:-$LAMBDA_CACHE/tools/bin/tansu}
SERVER=${DATABASE_URL%/*}

step "machine"
MACHINE=$(machine)
echo "$MACHINE"

step "local stack"
ensure_stack

step "build (release profile)"
cargo build --release --locked -p batch-layer --bin batch-layer -p serving-layer --bin serving-layer -p tools --bin generate

LAKE=$(ls -d "$LAMBDA_CACHE"/bench/lake-v3-e20000000-* 2>/dev/null | head -n1 || true)
[ -n "$LAKE" ] || { echo "no benchmark lake under $LAMBDA_CACHE/bench: run \`make bench-batch\` first" >&2; exit 1; }

fresh_db() {
    psql "$SERVER/postgres" -qc "DROP DATABASE IF EXISTS $1 WITH (FORCE)" -c "CREATE DATABASE $1"
    "$RELEASE/serving-layer" migrate --database-url "$SERVER/$1" >/dev/null
}

step "drill A: PostgreSQL lost; recover from the lake at $LAKE"
fresh_db bench_recovery_a
start=$(date +%s.%N)
A=$(DATABASE_URL="$SERVER/bench_recovery_a" LAKE_URI="$LAKE" "$RELEASE/batch-layer" recover --skip-ingest --no-catalog --topic events)
A_WALL=$(echo "$(date +%s.%N) - $start" | bc)
echo "$A"

TOPIC=bench-recovery-$EVENTS
step "drill B: the lake lost; rebuild it from topic $TOPIC"
if ! "$TANSU" topic list --broker "tcp://${KAFKA_BROKERS}" | grep -q "\"name\":\"$TOPIC\""; then
    "$TANSU" topic create "$TOPIC" --partitions 4 --broker "tcp://${KAFKA_BROKERS}" >/dev/null
    # 24 hours of history at the rate that makes EVENTS events.
    "$RELEASE/generate" --topic "$TOPIC" --no-catalog --backfill-hours 24 \
        --rate "$(echo "$EVENTS / 86400" | bc -l)" --truth "$LAMBDA_CACHE/bench/$TOPIC.json"
fi
fresh_db bench_recovery_b
RLAKE=$LAMBDA_CACHE/bench/recovery-lake
rm -rf "$RLAKE"
start=$(date +%s.%N)
B=$(DATABASE_URL="$SERVER/bench_recovery_b" LAKE_URI="$RLAKE" "$RELEASE/batch-layer" recover --no-catalog --topic "$TOPIC")
B_WALL=$(echo "$(date +%s.%N) - $start" | bc)
echo "$B"
rm -rf "$RLAKE"
psql "$SERVER/postgres" -qc "DROP DATABASE IF EXISTS bench_recovery_a WITH (FORCE)" -c "DROP DATABASE IF EXISTS bench_recovery_b WITH (FORCE)"

READ=$(echo "$B" | sed -n 's/.*(\([0-9]*\) records read in \([0-9.]*\) s.*/\1/p')
INGEST_S=$(echo "$B" | sed -n 's/.*(\([0-9]*\) records read in \([0-9.]*\) s.*/\2/p')
RATE=$(echo "$READ / $INGEST_S" | bc)
A_RUN=$(echo "$A" | sed -n 's/.* rows in \([0-9.]*\) s;.*/\1/p')
# The benchmark lake's events (docs/BENCHMARKS.md, "Batch layer").
LAKE_EVENTS=21064834
SCALED=$(echo "$LAKE_EVENTS / $RATE + $A_RUN" | bc)

SECTION=$(cat <<MD
## Recovery

Command: \`make bench-recovery\` (\`scripts/bench-recovery.sh\`, release
binaries): the two drills of OPERATIONS.md "Backup and recovery", each
\`batch-layer recover\` timed from start to exit.

\`\`\`
$MACHINE
\`\`\`

| drill | what \`recover\` printed | wall clock |
| --- | --- | --- |
| A. PostgreSQL lost: new database, \`recover --skip-ingest\` over the 21,064,834-event benchmark lake | $A | $(printf '%.1f' "$A_WALL") s |
| B. lake lost: \`recover\` into an empty lake from a topic of $READ records (4 partitions, 24 h of shop traffic) | $B | $(printf '%.1f' "$B_WALL") s |

- **Recovery point**: 0 in both: every record was still in Kafka. A lake
  rebuilt after retention removed records counts them as offsets stepped
  over; those records are the loss.
- **Recovery time at the benchmark size**: PostgreSQL lost, $(printf '%.0f' "$A_WALL") s (drill A,
  measured at that size). Lake lost, about $SCALED s: the 21,064,834
  events read at drill B's ingest rate ($RATE records/s), plus drill A's
  full run; scaled, not measured (the local broker slows as its sqlite file
  grows, so the topic is kept at drill B's size). The speed layer's
  catch-up from the cut comes on top, for the records above the cut only.
MD
)
write_section "## Recovery"
echo "written: docs/BENCHMARKS.md, section Recovery"
