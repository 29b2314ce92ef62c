-- Duplicates (issue 14): the same event_id delivered twice in a partition
-- counts once, by one rule both layers apply (shared_schema::dedup): a valid
-- record is a duplicate when a lower offset of its partition carried the
-- same event_id, both copies no older than the partition's newest event
-- time minus the window. Both layers read the window from here.
ALTER TABLE ops.deployment
    ADD COLUMN dedup_window interval NOT NULL DEFAULT interval '24 hours'
    CHECK (dedup_window > interval '0');

-- The greatest event_time of the valid records below next_offset (speed)
-- and below cut_offset (batch): the "newest time" of the rule.
ALTER TABLE ops.speed_offsets ADD COLUMN newest_event_time timestamptz;
ALTER TABLE ops.cut ADD COLUMN newest_event_time timestamptz;

-- The speed layer's keys (first 16 bytes of the SHA-256 of the event_id) of
-- the valid records within the window, written in the flush transaction
-- that passes them and pruned there past the window.
CREATE TABLE speed.event_keys (
    kafka_partition integer NOT NULL,
    event_key       bytea NOT NULL CHECK (length(event_key) = 16),
    event_time      timestamptz NOT NULL,
    PRIMARY KEY (kafka_partition, event_key)
);
CREATE INDEX event_keys_by_time ON speed.event_keys (kafka_partition, event_time);
GRANT SELECT, INSERT, UPDATE, DELETE ON speed.event_keys TO speed_writer;

-- The keys within the window below the cut, written by the batch publish for
-- the partitions the speed layer holds no position in: a speed layer that
-- starts there (at the cut) takes them as its history, so the first copy of
-- a record below the cut is known above it. Replaced with every publish.
CREATE TABLE ops.dedup_seed (
    kafka_partition integer NOT NULL,
    event_key       bytea NOT NULL CHECK (length(event_key) = 16),
    event_time      timestamptz NOT NULL,
    PRIMARY KEY (kafka_partition, event_key)
);
GRANT SELECT, INSERT, DELETE ON ops.dedup_seed TO batch_writer;
GRANT SELECT ON ops.dedup_seed TO speed_writer;
