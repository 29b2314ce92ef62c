-- The speed layer's dead-letter outbox (issue 14). A flush writes its
-- rejected records here in the same transaction as its deltas and offsets,
-- so a reject can neither be lost nor stop the stream; a background task
-- ships them to the DLQ topic and deletes what the broker acknowledged. A
-- DLQ topic that is away, or a record larger than a Kafka message may be,
-- only delays the shipping. Records larger than 64 KiB keep their first
-- 64 KiB here, with their size and SHA-256.
CREATE TABLE ops.dlq_outbox (
    id              bigserial PRIMARY KEY,
    source_topic    text NOT NULL,
    kafka_partition integer NOT NULL,
    kafka_offset    bigint NOT NULL,
    kafka_key       bytea,
    payload         bytea NOT NULL,
    original_size   bigint NOT NULL,
    -- Hex SHA-256 of the whole original, when `payload` is only its prefix.
    original_sha256 text,
    reason          text NOT NULL,
    field           text,
    detail          text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (source_topic, kafka_partition, kafka_offset)
);

GRANT SELECT, INSERT, DELETE ON ops.dlq_outbox TO speed_writer;
GRANT USAGE ON SEQUENCE ops.dlq_outbox_id_seq TO speed_writer;
