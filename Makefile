# Lambda-architecture data platform: the two commands are `make demo` and
# `make test`; everything else here is for working on it.

SHELL := /bin/bash
.DEFAULT_GOAL := help

# Builds and installed tools live outside the clone, so a second run (or CI
# on the same machine) reuses them.
export LAMBDA_CACHE ?= $(HOME)/.cache/lambda-platform
export CARGO_TARGET_DIR ?= $(LAMBDA_CACHE)/target
export KAFKA_BROKERS ?= 127.0.0.1:9092
export DATABASE_URL ?= postgres://postgres@127.0.0.1:5433/lambda
export SALES_DATABASE_URL ?= postgres://postgres@127.0.0.1:5433/sales
export LAKE_URI ?= $(CURDIR)/.local/lake

STACK := scripts/stack.sh
BIN := $(CARGO_TARGET_DIR)/debug

.PHONY: help up up-replica down status logs psql clean build generate demo demo-stop test lint fmt

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

up: ## start PostgreSQL and the Kafka broker on loopback (idempotent)
	@$(STACK) up

up-replica: ## also a streaming replica of PostgreSQL (hot standby) on 127.0.0.1:5434, for serve
	@$(STACK) up-replica

down: ## stop them
	@$(STACK) down

status: ## what runs where
	@$(STACK) status

logs: ## follow the stack's logs
	@$(STACK) logs

psql: ## a psql shell on the platform database
	@psql "$(DATABASE_URL)"

clean: down ## stop the stack (and a local Ballista cluster) and delete its state (.local/)
	@scripts/cluster.sh down >/dev/null 2>&1 || true
	rm -rf .local

build: ## build every binary (dev profile, shared with the tests)
	cargo build --workspace --bins

generate: build ## generate shop traffic: make generate ARGS="--backfill-hours 24"
	$(BIN)/generate $(ARGS)

demo: ## set everything up and run the pipeline locally
	@scripts/demo.sh

demo-stop: ## stop what the demo started, then the stack
	@for f in .local/run/*.pid; do [ -f "$$f" ] || continue; kill "$$(cat "$$f")" 2>/dev/null || true; rm -f "$$f"; done
	@sleep 1
	@$(STACK) down

lint: ## rustfmt and clippy, as CI runs them
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

fmt: ## format the code
	cargo fmt --all

test: ## the whole suite against a real local stack (starts and stops it)
	@scripts/test.sh

.PHONY: cluster-up cluster-down

cluster-up: build ## a local Ballista cluster (scheduler + 2 executors) for run --engine ballista://127.0.0.1:50050
	@scripts/cluster.sh up

cluster-down: ## stop it
	@scripts/cluster.sh down

.PHONY: serve bench-serving bench-dashboard

serve: ## the recommendations API and dashboard on SERVING_ADDR (default 127.0.0.1:8080)
	cargo build -p serving-layer --bins
	$(BIN)/serving-layer serve

bench-serving: ## recommendation latency under wrk, 100k users; writes docs/BENCHMARKS.md
	@scripts/bench-serving.sh

bench-dashboard: ## dashboard API latency under wrk with one and four weeks of history
	@scripts/bench-dashboard.sh

.PHONY: chaos quality bench-quality screenshots

screenshots: ## the dashboard's pages against a running pipeline, as PNGs in docs/screenshots/ (needs `make up`)
	@scripts/stack.sh tools
	cargo build --workspace --bins --locked
	DASHBOARD_SCREENSHOTS=$(CURDIR)/docs/screenshots \
		cargo nextest run --workspace -E 'binary(e2e) & test(/analyst_pages_work_against_a_running_pipeline/)' --locked

chaos: ## the chaos test at full size: kills and restarts under live traffic (CHAOS_ROUNDS, CHAOS_RATE, CHAOS_SECONDS)
	@scripts/stack.sh tools
	cargo build --workspace --bins --locked
	CHAOS_ROUNDS=$${CHAOS_ROUNDS:-6} CHAOS_RATE=$${CHAOS_RATE:-400} CHAOS_SECONDS=$${CHAOS_SECONDS:-120} \
		cargo nextest run --workspace -E 'binary(e2e) & test(/^chaos::/)' --no-capture --locked

quality: build ## spike precision/recall and recommendation hit-rate on a generated week (needs `make up`)
	$(BIN)/quality $(ARGS)

bench-quality: ## the same, written into docs/BENCHMARKS.md
	@scripts/bench-quality.sh

.PHONY: bench bench-batch bench-speed bench-broker bench-forget bench-recovery

bench: bench-batch bench-recovery bench-speed bench-serving bench-dashboard bench-quality ## every benchmark; each rewrites its section of docs/BENCHMARKS.md

bench-batch: ## batch layer: DataFusion vs DuckDB on 20M events, full vs incremental run
	@scripts/bench-batch.sh $(ARGS)

bench-speed: ## speed layer: throughput vs a bare consumer, freshness at 10k events/s
	@scripts/bench-speed.sh $(ARGS)

bench-forget: ## forget-user for 1, 100 and 1,000 users on the 20M-event benchmark lake
	@scripts/bench-forget.sh $(ARGS)

bench-recovery: ## the recovery drills (PostgreSQL lost, lake lost) at benchmark size; after bench-batch
	@scripts/bench-recovery.sh

bench-broker: build ## the broker under parallel idempotent producers (SOAK_ARGS="--duration 10m --producers 4")
	@$(BIN)/soak_broker $(SOAK_ARGS)

.PHONY: fuzz

fuzz: ## fuzz the event decoder for FUZZ_SECONDS (default 60), seeded from integration-tests/corpus
	@scripts/fuzz.sh
