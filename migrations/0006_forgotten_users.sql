-- GDPR right to erasure (`batch-layer forget-user USER_ID`). One row per
-- forgotten user, keyed by HMAC-SHA256(FORGET_KEY, user_id) in hex: the
-- audit keeps proof that the request was carried out, never the id itself.
-- The ingest and the speed layer load these hashes and drop every later
-- event whose user hashes into them. key_id says which key made the hash
-- (HMAC of a fixed label), so a process started with another key refuses
-- to run instead of silently letting forgotten users back in.
CREATE TABLE ops.forgotten_users (
    user_hash         text PRIMARY KEY,
    key_id            text NOT NULL,
    first_requested_at timestamptz NOT NULL DEFAULT now(),
    last_requested_at timestamptz NOT NULL DEFAULT now(),
    requests          integer NOT NULL DEFAULT 1,
    completed_at      timestamptz,
    -- What the last run removed: rows per lake table and PostgreSQL table.
    removed           jsonb NOT NULL DEFAULT '{}'
);

GRANT SELECT ON ops.forgotten_users TO batch_writer, speed_writer;
GRANT INSERT, UPDATE ON ops.forgotten_users TO batch_writer;
-- Forgetting removes the user's model recommendations too.
GRANT DELETE ON serving.model_recommendations TO batch_writer;
GRANT SELECT ON serving.model_recommendations TO batch_writer;
