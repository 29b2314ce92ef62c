-- The tables tansu 0.6's PostgreSQL storage engine (`--storage-engine
-- postgres://…`) reads and writes, for a database of its own on the local
-- server (`scripts/stack.sh`, BROKER_STORAGE=postgres). tansu 0.6 does not
-- create them itself. Table and column names and types are what its SQL
-- (tansu-storage 0.6.0, src/sql/*.sql and src/pg/*.sql) expects: the
-- PostgreSQL client binds typed parameters, so an int where it sends a
-- bigint is an error. Written for this repository from those queries; no
-- views, no partitioning (the engine needs neither). Idempotent.

CREATE TABLE IF NOT EXISTS cluster (
    id           int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name         text NOT NULL UNIQUE,
    last_updated timestamp NOT NULL DEFAULT current_timestamp,
    created_at   timestamp NOT NULL DEFAULT current_timestamp
);

CREATE TABLE IF NOT EXISTS topic (
    id                 int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    cluster            int NOT NULL REFERENCES cluster (id) ON DELETE CASCADE,
    name               text NOT NULL,
    uuid               uuid DEFAULT gen_random_uuid(),
    partitions         int NOT NULL,
    replication_factor int NOT NULL,
    is_internal        bool NOT NULL DEFAULT false,
    last_updated       timestamp NOT NULL DEFAULT current_timestamp,
    created_at         timestamp NOT NULL DEFAULT current_timestamp,
    UNIQUE (cluster, name)
);

-- A topic's partition.
CREATE TABLE IF NOT EXISTS topition (
    id           int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic        int REFERENCES topic (id) ON DELETE CASCADE,
    partition    int,
    last_updated timestamp NOT NULL DEFAULT current_timestamp,
    created_at   timestamp NOT NULL DEFAULT current_timestamp,
    UNIQUE (topic, partition)
);

CREATE TABLE IF NOT EXISTS watermark (
    id           int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topition     int UNIQUE REFERENCES topition (id) ON DELETE CASCADE,
    low          bigint,
    high         bigint,
    last_updated timestamp NOT NULL DEFAULT current_timestamp,
    created_at   timestamp NOT NULL DEFAULT current_timestamp
);

CREATE TABLE IF NOT EXISTS topic_configuration (
    id           int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic        int REFERENCES topic (id) ON DELETE CASCADE,
    name         text NOT NULL,
    value        text,
    last_updated timestamp NOT NULL DEFAULT current_timestamp,
    created_at   timestamp NOT NULL DEFAULT current_timestamp,
    UNIQUE (topic, name)
);

-- The log. The fetch compares transaction_id with the snapshot's xmin to
-- tell records of transactions still in flight.
CREATE TABLE IF NOT EXISTS record (
    topition       int REFERENCES topition (id) ON DELETE CASCADE,
    offset_id      bigint NOT NULL,
    transaction_id xid8 NOT NULL DEFAULT pg_current_xact_id(),
    attributes     smallint,
    producer_id    bigint,
    producer_epoch smallint,
    timestamp      timestamp,
    k              bytea,
    v              bytea,
    last_updated   timestamp NOT NULL DEFAULT current_timestamp,
    created_at     timestamp NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (topition, offset_id)
);

CREATE TABLE IF NOT EXISTS header (
    topition     int,
    offset_id    bigint,
    k            bytea,
    v            bytea,
    last_updated timestamp NOT NULL DEFAULT current_timestamp,
    created_at   timestamp NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (topition, offset_id, k),
    FOREIGN KEY (topition, offset_id) REFERENCES record (topition, offset_id) ON DELETE CASCADE
);

CREATE TABLE IF NOT EXISTS consumer_group (
    id           int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    cluster      int NOT NULL REFERENCES cluster (id) ON DELETE CASCADE,
    name         text NOT NULL,
    last_updated timestamp NOT NULL DEFAULT current_timestamp,
    created_at   timestamp NOT NULL DEFAULT current_timestamp,
    UNIQUE (cluster, name)
);

-- The group coordinator's state, updated with an e-tag check.
CREATE TABLE IF NOT EXISTS consumer_group_detail (
    id             int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer_group int UNIQUE REFERENCES consumer_group (id) ON DELETE CASCADE,
    e_tag          uuid NOT NULL,
    detail         json NOT NULL,
    last_updated   timestamp NOT NULL DEFAULT current_timestamp,
    created_at     timestamp NOT NULL DEFAULT current_timestamp
);

CREATE TABLE IF NOT EXISTS consumer_offset (
    id               int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer_group   int REFERENCES consumer_group (id) ON DELETE CASCADE,
    topition         int REFERENCES topition (id) ON DELETE CASCADE,
    committed_offset bigint,
    leader_epoch     int,
    timestamp        timestamp,
    metadata         text,
    last_updated     timestamp NOT NULL DEFAULT current_timestamp,
    created_at       timestamp NOT NULL DEFAULT current_timestamp,
    UNIQUE (consumer_group, topition)
);

-- Idempotent producers: ids, epochs and the last sequence per partition.
CREATE TABLE IF NOT EXISTS producer (
    id           bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    cluster      int NOT NULL REFERENCES cluster (id) ON DELETE CASCADE,
    last_updated timestamp NOT NULL DEFAULT current_timestamp,
    created_at   timestamp NOT NULL DEFAULT current_timestamp
);

CREATE TABLE IF NOT EXISTS producer_epoch (
    id           int GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    producer     bigint REFERENCES producer (id) ON DELETE CASCADE,
    epoch        smallint NOT NULL DEFAULT 0,
    last_updated timestamp NOT NULL DEFAULT current_timestamp,
    created_at   timestamp NOT NULL DEFAULT current_timestamp,
    UNIQUE (producer, epoch)
);

CREATE TABLE IF NOT EXISTS producer_detail (
    id             bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    producer_epoch int REFERENCES producer_epoch (id) ON DELETE CASCADE,
    topition       int REFERENCES topition (id) ON DELETE CASCADE,
    sequence       int NOT NULL DEFAULT 0,
    last_updated   timestamp NOT NULL DEFAULT current_timestamp,
    created_at     timestamp NOT NULL DEFAULT current_timestamp,
    UNIQUE (producer_epoch, topition)
);

-- Transactions (tansu 0.6 answers EndTxn as unsupported, but the produce
-- path still looks these up).
CREATE TABLE IF NOT EXISTS txn (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    cluster      int REFERENCES cluster (id) ON DELETE CASCADE,
    name         text,
    producer     bigint REFERENCES producer (id) ON DELETE CASCADE,
    last_updated timestamp NOT NULL DEFAULT current_timestamp,
    created_at   timestamp NOT NULL DEFAULT current_timestamp,
    UNIQUE (cluster, name)
);

CREATE TABLE IF NOT EXISTS txn_detail (
    id                     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transaction            bigint REFERENCES txn (id) ON DELETE CASCADE,
    producer_epoch         int REFERENCES producer_epoch (id) ON DELETE CASCADE,
    transaction_timeout_ms int NOT NULL,
    started_at             timestamp,
    status                 text,
    last_updated           timestamp NOT NULL DEFAULT current_timestamp,
    created_at             timestamp NOT NULL DEFAULT current_timestamp,
    UNIQUE (transaction, producer_epoch)
);

CREATE TABLE IF NOT EXISTS txn_topition (
    id           int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    txn_detail   int REFERENCES txn_detail (id) ON DELETE CASCADE,
    topition     int REFERENCES topition (id) ON DELETE CASCADE,
    last_updated timestamp NOT NULL DEFAULT current_timestamp,
    created_at   timestamp NOT NULL DEFAULT current_timestamp,
    UNIQUE (txn_detail, topition)
);

CREATE TABLE IF NOT EXISTS txn_produce_offset (
    id           int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    txn_topition int UNIQUE REFERENCES txn_topition (id) ON DELETE CASCADE,
    offset_start bigint,
    offset_end   bigint,
    last_updated timestamp NOT NULL DEFAULT current_timestamp,
    created_at   timestamp NOT NULL DEFAULT current_timestamp
);

CREATE TABLE IF NOT EXISTS txn_offset_commit (
    id             int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    txn_detail     int REFERENCES txn_detail (id) ON DELETE CASCADE,
    consumer_group int REFERENCES consumer_group (id) ON DELETE CASCADE,
    generation_id  int,
    member_id      text,
    last_updated   timestamp NOT NULL DEFAULT current_timestamp,
    created_at     timestamp NOT NULL DEFAULT current_timestamp,
    UNIQUE (txn_detail, consumer_group)
);

CREATE TABLE IF NOT EXISTS txn_offset_commit_tp (
    id               int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    offset_commit    int REFERENCES txn_offset_commit (id) ON DELETE CASCADE,
    topition         int REFERENCES topition (id) ON DELETE CASCADE,
    committed_offset bigint,
    leader_epoch     int,
    metadata         text,
    last_updated     timestamp NOT NULL DEFAULT current_timestamp,
    created_at       timestamp NOT NULL DEFAULT current_timestamp,
    UNIQUE (offset_commit, topition)
);

CREATE TABLE IF NOT EXISTS scram_credential (
    id           bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    cluster      int NOT NULL REFERENCES cluster (id) ON DELETE CASCADE,
    username     text,
    mechanism    int,
    salt         bytea NOT NULL,
    iterations   int NOT NULL,
    stored_key   bytea NOT NULL,
    server_key   bytea NOT NULL,
    last_updated timestamp NOT NULL DEFAULT current_timestamp,
    created_at   timestamp NOT NULL DEFAULT current_timestamp,
    UNIQUE (cluster, username, mechanism)
);
