-- Tables of the views defined in shared-schema/src/views.rs. Generated text
-- of ViewDef::batch_table_ddl / speed_table_ddl; the integration test
-- `migrated_tables_match_view_definitions` keeps the two in step.

CREATE TABLE batch.product_demand_hourly (
    hour timestamptz NOT NULL,
    product_id text NOT NULL,
    views bigint,
    cart_adds bigint,
    cart_removes bigint,
    purchases bigint,
    units bigint,
    revenue_cents bigint,
    PRIMARY KEY (hour, product_id)
);

CREATE TABLE speed.product_demand_hourly (
    hour timestamptz NOT NULL,
    product_id text NOT NULL,
    kafka_partition bigint NOT NULL,
    segment bigint NOT NULL,
    views bigint,
    cart_adds bigint,
    cart_removes bigint,
    purchases bigint,
    units bigint,
    revenue_cents bigint,
    PRIMARY KEY (hour, product_id, kafka_partition, segment)
);

CREATE TABLE batch.user_product_state (
    user_id text NOT NULL,
    product_id text NOT NULL,
    last_viewed_at timestamptz,
    last_carted_at timestamptz,
    last_removed_at timestamptz,
    last_purchased_at timestamptz,
    PRIMARY KEY (user_id, product_id)
);

CREATE TABLE speed.user_product_state (
    user_id text NOT NULL,
    product_id text NOT NULL,
    last_viewed_at timestamptz,
    last_carted_at timestamptz,
    last_removed_at timestamptz,
    last_purchased_at timestamptz,
    PRIMARY KEY (user_id, product_id)
);

GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA batch TO batch_writer;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA speed TO speed_writer;
GRANT SELECT, DELETE ON ALL TABLES IN SCHEMA speed TO batch_writer;
