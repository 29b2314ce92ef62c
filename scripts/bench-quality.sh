#!/usr/bin/env bash
# `make bench-quality`: quality of results on generated weeks, one per
# seed. Spike detection (precision, recall, start error) against the
# generator's injected spikes, and the recommender's hit-rate@10 on held-out
# purchases against the popular list and the previous release's
# recommender; then the median and the worst over the seeds. Runs the
# `quality` tool on the local stack (its own topics, lakes and databases)
# and rewrites the "## Quality of results" section of docs/BENCHMARKS.md.
#
#   QUALITY_ARGS="--hours 168 --products 200 --users 3000 --rate 1.5 --seeds 1,2,3,4,5" scripts/bench-quality.sh
set -euo pipefail
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

CACHE=${LAMBDA_CACHE:-$HOME/.cache/lambda-platform}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE/target}
ARGS=${QUALITY_ARGS:---hours 168 --products 200 --users 3000 --rate 1.5 --seeds 1,2,3,4,5}
OUT=docs/BENCHMARKS.md

say "stack and build"
scripts/stack.sh up >/dev/null
cargo build --quiet --locked --workspace --bins
say "quality $ARGS (a generated week per seed: a few minutes each)"
# shellcheck disable=SC2086
result=$(RUST_LOG=error "$CARGO_TARGET_DIR/debug/quality" $ARGS --quiet-spikes 2>&1 | grep -E '^(seed|summary|error)')
echo "$result"

cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
section=$(cat <<MD
## Quality of results

Measured by \`make bench-quality\` (\`quality $ARGS\`) at commit $rev, on
$(nproc) cores ($cpu), $(date -u '+%Y-%m-%d %H:%M UTC'). The generator
injects demand spikes (one per 12 hours, 2-48 h long, 4-10x a popular
product's traffic) into a week of shop history, one shop and week per
seed; the batch runs in full; the spikes reported in
\`serving.demand_spike_history\` (echoes excluded) are matched to the
injected ones by product and overlap. Recommendations: the last 12 hours
are held out, the views the recommender reads are computed from the events
before them, and the serving layer's top 10 for each user who bought in the
held-out hours counts a hit when it holds one of those purchases (of
products they had not carted or bought before, which the recommender leaves
out on purpose). Baselines: the popular list, and the previous release's
recommender (seeds from views and carts only, no launches; its SQL is in
\`tools/src/bin/quality.rs\`) over the same database. Goal (issue 19):
spike precision and recall at least 0.9 each, the worst seed included.
Before the echo rules by excess demand (\`SPIKE_ECHO_EXCESS\`,
\`SPIKE_ECHO_EXCESS_ALIGNED\`), precision was median 0.700, worst 0.600:
complements of a spiking product, lifted high above their own small
baselines by its shoppers, were reported as spikes of their own. Earlier
variants measured on weeks generated back from the current hour (so each
run put the spikes at other times of day): one rule for spikes inside a
stronger one at 3x, precision 1.000 / 0.824 and recall 0.923 / 0.786; at
5x, 1.000 / 1.000 and 0.929 / 0.857 (median / worst). The week now ends at
a fixed time (\`--history-end\`, 2026-11-30 00:00 UTC by default), so
every run measures the same five weeks: on them, the inside rule alone
with a strength guard measured precision 1.000 / 0.833 and recall
0.929 / 0.929, and adding the rule for spikes that start and end with a
stronger one gave precision 1.000 / 0.938 and recall 1.000 / 0.929. Those
rules were chosen on these five weeks; on three other seeds (6, 7, 8)
they measured precision 1.000 / 0.923 and recall 0.923 / 0.857 (median /
worst): seed 8 took two spikes that began at 18:00 for echoes of a more
popular similar product whose own spike began at 19:00, and four more
seeds (9-12) showed the same kinds of mistakes (worst precision 0.875,
recall 0.857). Two rules of co-movement followed. An echo never leads its
driver: in the echo's first hour the driver drew at least as much excess
demand as the echo. And an echo that starts in a later hour than its
driver must already have ridden it in the three hours before (its excess
then at least a quarter of the share of the driver's it took in its
first hour, \`SPIKE_ECHO_RIDE\`); this replaced the strength guard. Later
the same day a dashboard test met a burst of its own on top of an echo
(300 views in an hour on a complement already riding its driver), so no
spike hour of an echo may draw more excess than the driver's same hour;
seeds 1-5 measured the same with it (below). With
the first two rules, seeds 1-12 measured precision 1.000 / 0.933 and recall
1.000 / 0.923, and seeds 13-16, never looked at while choosing any rule,
precision 1.000 / 0.941 and recall 1.000 / 0.929 (2026-12-02, same
machine). The spikes still missed are weak ones: 4x for a few night
hours, or a product whose own hourly variation hides a 5x spike (z at
most 3.6). Hit-rate@10 over seeds 1-12: median 0.305 this release, 0.307
the previous release, 0.183 the popular list; over 13-16: 0.421, 0.423,
0.217. The generator's buyers all viewed before buying and the tool has
no catalog, so purchase seeds and launches (tested on their own) barely
move it.

\`\`\`
$result
\`\`\`
MD
)
SECTION="$section" write_section "## Quality of results"
say "written to $OUT"
