-- `batch-layer replay-dlq` (issue 18): every rejected record re-injected
-- into the events topic, by its original position, so a second replay
-- sends nothing twice.
CREATE TABLE ops.dlq_replays (
    source_partition integer NOT NULL,
    source_offset    bigint NOT NULL,
    reason           text NOT NULL,
    replayed_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_partition, source_offset)
);
GRANT SELECT, INSERT ON ops.dlq_replays TO batch_writer;
