-- An incremental run may leave a view whose measures all merge by `max` or
-- `min` (user_product_state) unfolded while the speed layer holds every
-- record the fold would add (issue 17, item 5): the serving merge takes
-- the greatest of both sides, so which side holds a record changes
-- nothing readers see. The batch then folds the pending range at most
-- `--fold-every` later, in one statement instead of one per run.
--
-- For that the batch must know where the speed layer's records begin. A
-- position row is inserted only where the batch's cut stood (or at 0), so
-- that offset is recorded with it; rows written before this release
-- started at or below the cut of now, which the batch has folded.
ALTER TABLE ops.speed_offsets ADD COLUMN started_offset bigint;
UPDATE ops.speed_offsets AS o
SET started_offset = COALESCE((SELECT c.cut_offset FROM ops.cut AS c WHERE c.kafka_partition = o.kafka_partition), 0);

-- A view whose batch rows lag the published cut: they hold every record
-- below `folded_cut` (partition -> offset, as ops.batch_runs.cut), and the
-- speed layer holds the rest since `pending_since`. No row: the view's
-- batch rows reach ops.cut.
CREATE TABLE ops.view_folds (
    view_name text PRIMARY KEY,
    folded_cut jsonb NOT NULL,
    pending_since timestamptz NOT NULL
);
GRANT SELECT, INSERT, UPDATE, DELETE ON ops.view_folds TO batch_writer;
GRANT SELECT ON ops.view_folds TO speed_writer;
-- Where the speed layer began each view registered since (migration 0024).
GRANT SELECT ON ops.view_speed_start TO batch_writer;
