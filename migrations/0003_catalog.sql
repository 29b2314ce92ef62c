-- The product catalog's schema as each batch run saw it in the shop's
-- database; a change is recorded here and in ops.notifications.
CREATE TABLE ops.catalog_schema (
    id          bigserial PRIMARY KEY,
    seen_at     timestamptz NOT NULL DEFAULT now(),
    fingerprint text NOT NULL,
    columns     jsonb NOT NULL,
    products    bigint NOT NULL
);

GRANT SELECT, INSERT ON ops.catalog_schema TO batch_writer;
GRANT USAGE ON SEQUENCE ops.catalog_schema_id_seq TO batch_writer;
