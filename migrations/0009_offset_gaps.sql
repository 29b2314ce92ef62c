-- Offsets that hold no record either layer could read (issue 14): removed by
-- retention or DeleteRecords before a layer got to them, compacted away,
-- transaction markers, records of aborted transactions. Each layer records
-- the gaps it steps over (in the same transaction as the offsets that pass
-- them, for the speed layer; before the lake commit that passes them, for the
-- ingest), so "the batch and the speed layer skipped the same offsets" is a
-- query, and no gap passes unnoticed.
CREATE TABLE ops.offset_gaps (
    layer           text NOT NULL CHECK (layer IN ('speed', 'batch')),
    topic           text NOT NULL,
    kafka_partition integer NOT NULL,
    -- The gap is [from_offset, to_offset): to_offset is the record read next.
    from_offset     bigint NOT NULL CHECK (from_offset >= 0),
    to_offset       bigint NOT NULL,
    detected_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (layer, topic, kafka_partition, from_offset),
    CHECK (to_offset > from_offset)
);

GRANT SELECT, INSERT ON ops.offset_gaps TO batch_writer, speed_writer;
