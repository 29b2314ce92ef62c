-- Erasure everywhere (issue 16).
--
-- The forgotten set's version: `forget-user` bumps it in the transaction
-- that adds hashes, holding the exclusive forget fence (an advisory lock);
-- every writer takes the fence shared inside its commit and compares the
-- version with the one it filtered with, so no write that loaded the set
-- before a request commits after it (see platform::forgotten).
CREATE TABLE ops.forgotten_set (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version   bigint NOT NULL DEFAULT 0
);
INSERT INTO ops.forgotten_set (version) SELECT count(*) FROM ops.forgotten_users;

-- The version at which each user joined the set (exports written at a lower
-- version may hold them), when the topic copies of their events age out
-- (the topic's retention after the request), and when a verification scan
-- found no trace (completed_at is set only then).
ALTER TABLE ops.forgotten_users
    ADD COLUMN set_version bigint,
    ADD COLUMN topic_copies_gone_by timestamptz,
    ADD COLUMN verified jsonb;

-- Every `export-training` run: where, as of when, from which lake version,
-- and which forgotten-set version it excluded. `forget-user` rewrites the
-- exports written before a request that hold the user (rewritten_at).
CREATE TABLE ops.training_exports (
    export_id         bigserial PRIMARY KEY,
    location          text NOT NULL,
    as_of             timestamptz NOT NULL,
    delta_version     bigint NOT NULL,
    forgotten_version bigint NOT NULL,
    rows              bigint NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    rewritten_at      timestamptz
);

GRANT SELECT ON ops.forgotten_set TO batch_writer, speed_writer, serving_writer;
GRANT UPDATE ON ops.forgotten_set TO batch_writer;
-- The import drops forgotten users: it needs their hashes.
GRANT SELECT ON ops.forgotten_users TO serving_writer;
GRANT SELECT, INSERT, UPDATE ON ops.training_exports TO batch_writer;
GRANT USAGE ON SEQUENCE ops.training_exports_export_id_seq TO batch_writer;
-- Rejected records of forgotten users waiting in the DLQ outbox go with the
-- rest of their data.
GRANT SELECT, DELETE ON ops.dlq_outbox TO batch_writer;
