-- An incremental publish drops the duplicates seed's keys that left the
-- window (`event_time` below the floor) per partition: by this index it
-- reads only those, not the whole seed (issue 17: O(new data)).
CREATE INDEX dedup_seed_by_time ON ops.dedup_seed (kafka_partition, event_time);
