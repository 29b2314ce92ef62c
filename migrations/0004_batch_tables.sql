-- Tables the batch layer computes whole (shared-schema/src/derived.rs,
-- BatchTable::table_ddl; the integration test
-- `migrated_tables_match_view_definitions` keeps the two in step), and what
-- the derived serving views need to know about each layer.

CREATE TABLE batch.products (
    product_id text NOT NULL,
    name text,
    category text,
    price_cents bigint,
    PRIMARY KEY (product_id)
);

CREATE TABLE batch.demand_baseline (
    product_id text NOT NULL,
    share double precision,
    hours bigint,
    demand bigint,
    PRIMARY KEY (product_id)
);

CREATE TABLE batch.item_similarity (
    product_id text NOT NULL,
    similar_product_id text NOT NULL,
    score double precision,
    rank bigint,
    PRIMARY KEY (product_id, similar_product_id)
);

GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON batch.products, batch.demand_baseline, batch.item_similarity
    TO batch_writer;

-- The newest event hour below a run's cut (the anchor of its windows), and
-- when each batch table was last computed.
ALTER TABLE ops.batch_runs ADD COLUMN newest_hour timestamptz;

CREATE TABLE ops.batch_tables (
    name        text PRIMARY KEY,
    run_id      bigint NOT NULL,
    anchor      timestamptz,
    computed_at timestamptz NOT NULL DEFAULT now()
);
GRANT SELECT, INSERT, UPDATE ON ops.batch_tables TO batch_writer;

-- The end of each partition as the speed layer last saw it, for its lag.
ALTER TABLE ops.speed_offsets ADD COLUMN end_offset bigint;
