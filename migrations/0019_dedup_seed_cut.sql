-- The seed of duplicates (0011) per partition is kept up to date from one
-- publish to the next instead of rewritten whole: the cut each partition's
-- seed reaches, so a publish adds only the keys of the new offsets (issue
-- 17: an incremental run is O(new data)).
CREATE TABLE ops.dedup_seed_cut (
    kafka_partition integer PRIMARY KEY,
    cut_offset      bigint NOT NULL
);
GRANT SELECT, INSERT, UPDATE, DELETE ON ops.dedup_seed_cut TO batch_writer;
GRANT UPDATE ON ops.dedup_seed TO batch_writer;
