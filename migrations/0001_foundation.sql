-- Foundation: schemas, roles, the deployment's segment size and the ops tables
-- that every layer shares. The tables of each view are created by migration
-- 0002; the serving.* views are generated from the view definitions at start.

CREATE SCHEMA IF NOT EXISTS ops;
CREATE SCHEMA IF NOT EXISTS batch;
CREATE SCHEMA IF NOT EXISTS speed;
CREATE SCHEMA IF NOT EXISTS serving;

-- Roles are cluster-wide; create each once. They have no password here: local
-- runs use trust authentication on loopback, production sets passwords (or
-- certificates) with ALTER ROLE.
DO $$
DECLARE r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['batch_writer', 'speed_writer', 'serving_writer',
                             'dashboard_reader', 'recommender_reader'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            EXECUTE format('CREATE ROLE %I LOGIN', r);
        END IF;
    END LOOP;
END $$;

-- One row: settings fixed when the schema is created. Both layers read the
-- segment size from here so they can never disagree.
CREATE TABLE ops.deployment (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    segment_size bigint NOT NULL CHECK (segment_size > 0),
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- The offset cut of the last published batch: per partition, the batch covers
-- exactly the offsets below cut_offset (a multiple of segment_size).
CREATE TABLE ops.cut (
    kafka_partition integer PRIMARY KEY,
    cut_offset      bigint NOT NULL CHECK (cut_offset >= 0),
    batch_run_id    bigint,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- The speed layer's next offset per partition, committed in the same
-- transaction as its deltas.
CREATE TABLE ops.speed_offsets (
    kafka_partition integer PRIMARY KEY,
    next_offset     bigint NOT NULL CHECK (next_offset >= 0),
    last_event_time timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ops.batch_runs (
    run_id        bigserial PRIMARY KEY,
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    status        text NOT NULL CHECK (status IN ('running', 'published', 'unchanged', 'failed', 'rejected')),
    mode          text NOT NULL CHECK (mode IN ('incremental', 'full')),
    delta_version bigint,
    cut           jsonb,
    rows_per_view jsonb,
    durations_ms  jsonb,
    message       text
);

CREATE TABLE ops.notifications (
    id         bigserial PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    kind       text NOT NULL,
    severity   text NOT NULL CHECK (severity IN ('info', 'warning', 'critical')),
    summary    text NOT NULL,
    details    jsonb NOT NULL DEFAULT '{}',
    delivered  boolean NOT NULL DEFAULT false
);

-- Fingerprints of the generated serving views, so a binary re-creates them
-- only when a view definition changed.
CREATE TABLE ops.generated_views (
    name        text PRIMARY KEY,
    fingerprint text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Least privilege: writers write their own schema; readers read serving.*
-- (grants on the generated views are given when they are created).
GRANT USAGE ON SCHEMA ops, batch, speed, serving TO batch_writer;
GRANT USAGE ON SCHEMA ops, speed, serving TO speed_writer;
GRANT USAGE ON SCHEMA serving TO serving_writer, dashboard_reader, recommender_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA ops TO batch_writer, speed_writer;
GRANT INSERT, UPDATE, DELETE ON ops.cut, ops.batch_runs, ops.notifications TO batch_writer;
GRANT INSERT, UPDATE ON ops.speed_offsets, ops.notifications TO speed_writer;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA ops TO batch_writer, speed_writer;
