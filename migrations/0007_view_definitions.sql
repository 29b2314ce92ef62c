-- Which definition of each view the published batch tables were computed
-- with (a fingerprint of the view's batch SQL). When a deploy changes a
-- view (a measure added, say), the next batch run, even an incremental
-- one, recomputes that view over all history instead of only the new
-- hours: the new column is backfilled without anyone running --full.
CREATE TABLE ops.view_definitions (
    name         text PRIMARY KEY,
    fingerprint  text NOT NULL,
    run_id       bigint NOT NULL,
    published_at timestamptz NOT NULL DEFAULT now()
);

GRANT SELECT, INSERT, UPDATE ON ops.view_definitions TO batch_writer;
