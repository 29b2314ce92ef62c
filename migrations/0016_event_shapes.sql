-- What the events say about the contract (issue 18): every schema_version
-- and every field the contract does not know, with how many events carried
-- it. The ingest records them at each flush and notifies once: a new
-- schema_version (other than 1) when first seen, an unknown field when its
-- share of a flush's events first reaches 1%.
CREATE TABLE ops.event_shapes (
    kind        text NOT NULL CHECK (kind IN ('schema_version', 'unknown_field')),
    name        text NOT NULL,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    events      bigint NOT NULL DEFAULT 0,
    notified_at timestamptz,
    PRIMARY KEY (kind, name)
);
GRANT SELECT, INSERT, UPDATE ON ops.event_shapes TO batch_writer;
