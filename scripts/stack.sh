#!/usr/bin/env bash
# The local stack, without Docker: PostgreSQL (Debian's server, run as the
# `postgres` user) and the tansu Kafka broker, on loopback, state under .local/.
#
#   scripts/stack.sh tools     install what is missing (PostgreSQL, tansu, chromium, wrk, moto, promtool)
#   scripts/stack.sh up        start both (idempotent), topics, migrations
#   scripts/stack.sh up-replica a streaming replica of PostgreSQL (hot standby) on $REPLICA_PORT
#   scripts/stack.sh down-replica   stop it (its copy stays; `make clean` deletes it)
#   scripts/stack.sh down      stop both
#   scripts/stack.sh status    what runs where
#   scripts/stack.sh logs      follow the logs
#   scripts/stack.sh restart-postgres | restart-broker   (fault injection)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
LOCAL=${LOCAL_DIR:-$ROOT/.local}
CACHE=${LAMBDA_CACHE:-$HOME/.cache/lambda-platform}
TANSU=${TANSU:-$CACHE/tools/bin/tansu}
TANSU_VERSION=0.6.0
# The broker's storage: `sqlite` (a file under .local/tansu) or `postgres` (a
# `tansu` database on the local PostgreSQL; see docs/BENCHMARKS.md, "Broker").
BROKER_STORAGE=${BROKER_STORAGE:-sqlite}
MOTO=$CACHE/tools/moto/bin/moto_server
MOTO_PIP=$CACHE/tools/moto/bin/pip
MOTO_VERSION=5.2.5
# How long the broker keeps records of `events` and `events.dlq` (ms): the
# bound `forget-user` reports for Kafka's copies of a forgotten user's
# records (docs/PRIVACY.md). Default 7 days.
TOPIC_RETENTION_MS=${TOPIC_RETENTION_MS:-604800000}
PG_PORT=${PG_PORT:-5433}
REPLICA_PORT=${REPLICA_PORT:-5434}
KAFKA_PORT=${KAFKA_PORT:-9092}
PG_URL="postgres://postgres@127.0.0.1:$PG_PORT"
LOGS=$LOCAL/logs

say() { printf '\033[1m==>\033[0m %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

pg_bin() {
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
    [ -n "$dir" ] && [ -x "$dir/pg_ctl" ] && echo "$dir"
}

as_postgres() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

install_tools() {
    if [ -z "$(pg_bin)" ]; then
        say "installing PostgreSQL server (Debian package)"
        command -v apt-get >/dev/null || die "no PostgreSQL server and no apt-get; install PostgreSQL 15+ server binaries"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql postgresql-client >/dev/null
    fi
    [ -n "$(pg_bin)" ] || die "PostgreSQL server binaries not found under /usr/lib/postgresql"
    # Headless Chromium for the dashboard test, wrk for `make bench-serving`.
    if ! command -v chromium >/dev/null || ! command -v wrk >/dev/null; then
        say "installing chromium and wrk (Debian packages)"
        command -v apt-get >/dev/null || die "no chromium/wrk and no apt-get; install both"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium wrk >/dev/null
    fi
    # promtool checks the Prometheus alert rules under deploy/ in the tests.
    if ! command -v promtool >/dev/null; then
        say "installing promtool (Debian package prometheus)"
        command -v apt-get >/dev/null || die "promtool is missing and there is no apt-get; install Prometheus 2.x"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    fi
    command -v psql >/dev/null || die "psql not found; install postgresql-client"
    if [ ! -x "$TANSU" ] || ! "$TANSU" --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
        say "installing tansu $TANSU_VERSION into $CACHE/tools (first time only, about 11 minutes)"
        cargo install --quiet --locked --root "$CACHE/tools" tansu --version "$TANSU_VERSION" --features libsql
    fi
    # Python with venv (for moto) and curl (the cluster and S3 scripts).
    if ! python3 -c 'import ensurepip, venv' 2>/dev/null || ! command -v curl >/dev/null; then
        say "installing python3-venv and curl (Debian packages)"
        command -v apt-get >/dev/null || die "python3 with venv and curl are needed; install them"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv curl >/dev/null
    fi
    # moto: the local S3-compatible server of the lake-on-S3 tests (PyPI).
    if [ ! -x "$MOTO" ] || ! "$MOTO_PIP" show moto 2>/dev/null | grep "^Version: $MOTO_VERSION\$" >/dev/null; then
        say "installing moto $MOTO_VERSION (local S3 server) into $CACHE/tools/moto"
        python3 -m venv "$CACHE/tools/moto"
        "$MOTO_PIP" install --quiet "moto[server]==$MOTO_VERSION"
    fi
}

# PostgreSQL must be able to reach its data directory as the postgres user.
# When the clone sits under a directory it cannot traverse (a home folder
# with mode 700, say), the data lives in /var/tmp and .local/pg links to it.
pg_dir() {
    local want=$LOCAL/pg
    if [ -L "$want" ] || [ -d "$want" ]; then echo "$want"; return; fi
    mkdir -p "$LOCAL"
    if [ "$(id -u)" = 0 ] && ! runuser -u postgres -- test -x "$LOCAL" 2>/dev/null; then
        local alt
        alt=/var/tmp/lambda-platform-$(printf '%s' "$LOCAL" | md5sum | cut -c1-12)/pg
        mkdir -p "$alt"
        ln -sfn "$alt" "$want"
    else
        mkdir -p "$want"
    fi
    echo "$want"
}

pg_running() {
    local dir=$LOCAL/pg
    [ -e "$dir/data/postmaster.pid" ] && as_postgres "$(pg_bin)/pg_ctl" -D "$dir/data" status >/dev/null 2>&1
}

start_postgres() {
    local bin dir
    bin=$(pg_bin)
    dir=$(pg_dir)
    mkdir -p "$LOGS"
    if [ "$(id -u)" = 0 ]; then
        chown postgres: "$(readlink -f "$dir")"
        touch "$LOGS/postgres.log" && chown postgres: "$LOGS/postgres.log"
    fi
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        say "initialising PostgreSQL in $dir/data"
        as_postgres "$bin/initdb" -D "$dir/data" -U postgres --auth=trust --encoding=UTF8 --no-locale >"$LOGS/initdb.log" 2>&1 \
            || die "initdb failed; see $LOGS/initdb.log"
        mkdir -p "$dir/run" && [ "$(id -u)" = 0 ] && chown postgres: "$dir/run"
        cat >>"$dir/data/postgresql.conf" <<CONF
# lambda-platform local stack
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$(readlink -f "$dir")/run'
max_connections = 200
shared_buffers = 256MB
logging_collector = off
CONF
    fi
    if pg_running; then return; fi
    say "starting PostgreSQL on 127.0.0.1:$PG_PORT"
    as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$LOGS/postgres.log" -w -t 60 start >/dev/null \
        || die "PostgreSQL did not start; see $LOGS/postgres.log"
}

# The replica's data sits beside the primary's (same traversal rules).
replica_dir() { echo "$(dirname "$(readlink -m "$LOCAL/pg")")/pg-replica"; }

replica_running() {
    local dir
    dir=$(replica_dir)
    [ -e "$dir/data/postmaster.pid" ] && as_postgres "$(pg_bin)/pg_ctl" -D "$dir/data" status >/dev/null 2>&1
}

# A hot standby streaming from the local primary: pg_basebackup writes the
# copy and its primary_conninfo (-R), then it replays the primary's WAL.
start_replica() {
    pg_running || die "the replica copies the running primary: run \`make up\` first"
    local bin dir
    bin=$(pg_bin)
    dir=$(replica_dir)
    mkdir -p "$LOGS" "$dir"
    if [ "$(id -u)" = 0 ]; then
        chown postgres: "$dir"
        touch "$LOGS/replica.log" && chown postgres: "$LOGS/replica.log"
    fi
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        say "copying the primary into a streaming replica in $dir/data"
        as_postgres mkdir -p "$dir/run"
        as_postgres "$bin/pg_basebackup" -h 127.0.0.1 -p "$PG_PORT" -U postgres -D "$dir/data" -R -X stream -c fast \
            >"$LOGS/basebackup.log" 2>&1 || die "pg_basebackup failed; see $LOGS/basebackup.log"
        # Later lines win over the primary's copied settings.
        as_postgres tee -a "$dir/data/postgresql.conf" >/dev/null <<CONF
# lambda-platform local replica
port = $REPLICA_PORT
unix_socket_directories = '$dir/run'
hot_standby = on
hot_standby_feedback = on
CONF
    fi
    if replica_running; then return; fi
    say "starting the replica on 127.0.0.1:$REPLICA_PORT"
    as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$LOGS/replica.log" -w -t 60 start >/dev/null \
        || die "the replica did not start; see $LOGS/replica.log"
}

stop_replica() {
    if replica_running; then
        say "stopping the replica"
        as_postgres "$(pg_bin)/pg_ctl" -D "$(replica_dir)/data" -m fast -w stop >/dev/null || true
    fi
}

wait_postgres() {
    for _ in $(seq 1 120); do
        psql "$PG_URL/postgres" -qtAc 'SELECT 1' >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    die "PostgreSQL does not answer on 127.0.0.1:$PG_PORT; see $LOGS/postgres.log"
}

create_databases() {
    local db
    for db in lambda sales; do
        if [ -z "$(psql "$PG_URL/postgres" -qtAc "SELECT 1 FROM pg_database WHERE datname = '$db'")" ]; then
            psql "$PG_URL/postgres" -qc "CREATE DATABASE $db" >/dev/null
        fi
    done
}

tansu_pid() { cat "$LOCAL/tansu/tansu.pid" 2>/dev/null || true; }

tansu_running() {
    local pid
    pid=$(tansu_pid)
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

storage_url() {
    case "$BROKER_STORAGE" in
        sqlite) echo "sqlite://tansu.db" ;;
        postgres) echo "$PG_URL/tansu" ;;
        *) die "BROKER_STORAGE is $BROKER_STORAGE; use sqlite or postgres" ;;
    esac
}

# tansu 0.6 does not create its PostgreSQL tables: ours, idempotent.
tansu_database() {
    [ "$BROKER_STORAGE" = postgres ] || return 0
    pg_running || die "the postgres broker storage needs PostgreSQL running"
    if [ -z "$(psql "$PG_URL/postgres" -qtAc "SELECT 1 FROM pg_database WHERE datname = 'tansu'")" ]; then
        psql "$PG_URL/postgres" -qc "CREATE DATABASE tansu" >/dev/null
    fi
    psql "$PG_URL/tansu" -q -v ON_ERROR_STOP=1 -f "$ROOT/scripts/tansu-postgres.sql" >/dev/null \
        || die "creating the broker's tables in database tansu failed"
}

start_tansu() {
    mkdir -p "$LOCAL/tansu" "$LOGS"
    if tansu_running; then return; fi
    tansu_database
    if port_open "$KAFKA_PORT"; then
        die "port $KAFKA_PORT is taken by another process; stop it or set KAFKA_PORT"
    fi
    say "starting tansu broker on 127.0.0.1:$KAFKA_PORT"
    (
        cd "$LOCAL/tansu"
        # setsid: the broker outlives this script and make.
        setsid "$TANSU" broker \
            --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
            --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
            --storage-engine "$(storage_url)" \
            >>"$LOGS/tansu.log" 2>&1 </dev/null &
        echo $! >tansu.pid
    )
}

wait_tansu() {
    for _ in $(seq 1 120); do
        if port_open "$KAFKA_PORT" && "$TANSU" topic list --broker "tcp://127.0.0.1:$KAFKA_PORT" >/dev/null 2>&1; then
            return 0
        fi
        tansu_running || die "tansu exited; see $LOGS/tansu.log"
        sleep 0.5
    done
    die "tansu does not answer on 127.0.0.1:$KAFKA_PORT; see $LOGS/tansu.log"
}

create_topic() {
    local name=$1 partitions=$2 list
    # Never create blind: if the listing fails, stop (re-creating an existing
    # topic must not be attempted on a broker we cannot see).
    list=$("$TANSU" topic list --broker "tcp://127.0.0.1:$KAFKA_PORT" 2>>"$LOGS/tansu.log") \
        || die "cannot list topics on 127.0.0.1:$KAFKA_PORT; see $LOGS/tansu.log"
    if printf '%s' "$list" | grep -q "\"name\":\"$name\""; then
        return 0
    fi
    [[ "$TOPIC_RETENTION_MS" =~ ^[0-9]+$ ]] || die "TOPIC_RETENTION_MS must be a number of milliseconds, e.g. 604800000 (7 days)"
    # retention.ms only: cleanup.policy stays Kafka's default (delete). tansu
    # 0.6 enforces retention only on topics that set cleanup.policy=delete
    # explicitly, and its sqlite engine's retention pass then stalls
    # producers under the test suite's load until it panics (lite.rs:503);
    # TOPIC_CLEANUP_POLICY=delete asks for it anyway.
    local policy=()
    [ -n "${TOPIC_CLEANUP_POLICY:-}" ] && policy=(--config "cleanup.policy=$TOPIC_CLEANUP_POLICY")
    "$TANSU" topic create "$name" --partitions "$partitions" --broker "tcp://127.0.0.1:$KAFKA_PORT" \
        "${policy[@]}" --config "retention.ms=$TOPIC_RETENTION_MS" >>"$LOGS/tansu.log" 2>&1 \
        || die "creating topic $name failed; see $LOGS/tansu.log"
}

migrate() {
    say "applying migrations"
    # Built with the whole workspace (as `make test` and `make build` do), so
    # dependencies keep one feature set and one build: `cargo run -p` alone
    # would rebuild DataFusion and friends for a narrower set.
    cargo build --quiet --workspace --bins --locked || die "building the binaries failed"
    # The views folder: its files are checked and registered with their tables.
    "${CARGO_TARGET_DIR:-$ROOT/target}/debug/serving-layer" migrate --database-url "$PG_URL/lambda" \
        --views-dir "${VIEWS_DIR:-$ROOT/views}" || die "migrations failed (see the message above)"
}

up() {
    install_tools
    start_postgres
    wait_postgres
    create_databases
    start_tansu
    wait_tansu
    create_topic events 4
    create_topic events.dlq 1
    migrate
    status
}

stop_tansu() {
    local pid
    pid=$(tansu_pid)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        say "stopping tansu (pid $pid)"
        # SIGKILL on purpose: tansu 0.6.0 tears its storage down before its
        # listener on SIGTERM, and a broker stopped that way mid-stream comes
        # back unable to serve idempotent producers. Its sqlite storage
        # recovers from a kill like from a crash.
        kill -9 "$pid" 2>/dev/null || true
        for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    fi
    rm -f "$LOCAL/tansu/tansu.pid"
}

stop_postgres() {
    if pg_running; then
        say "stopping PostgreSQL"
        as_postgres "$(pg_bin)/pg_ctl" -D "$LOCAL/pg/data" -m fast -w stop >/dev/null || true
    fi
}

down() {
    stop_tansu
    stop_replica
    stop_postgres
}

status() {
    if pg_running; then
        echo "PostgreSQL  running   $PG_URL/lambda   (shop catalog: $PG_URL/sales)"
    else
        echo "PostgreSQL  stopped"
    fi
    if tansu_running; then
        echo "Kafka       running   127.0.0.1:$KAFKA_PORT  (tansu $TANSU_VERSION, $BROKER_STORAGE storage, topics: events x4, events.dlq)"
    else
        echo "Kafka       stopped"
    fi
    if replica_running; then
        echo "replica     running   postgres://postgres@127.0.0.1:$REPLICA_PORT/lambda   (hot standby of the above)"
    fi
    echo "lake        ${LAKE_URI:-$LOCAL/lake}"
    echo "logs        $LOGS/"
}

case "${1:-}" in
    tools) install_tools ;;
    up) up ;;
    up-replica) start_replica; status ;;
    down-replica) stop_replica ;;
    down) down ;;
    status) status ;;
    logs) mkdir -p "$LOGS"; touch "$LOGS/postgres.log" "$LOGS/tansu.log"; tail -n 50 -F "$LOGS"/*.log ;;
    restart-postgres) stop_postgres; start_postgres; wait_postgres ;;
    restart-broker) stop_tansu; start_tansu; wait_tansu ;;
    *) echo "usage: $0 tools|up|up-replica|down-replica|down|status|logs|restart-postgres|restart-broker" >&2; exit 2 ;;
esac
