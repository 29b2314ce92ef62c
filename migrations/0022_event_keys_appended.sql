-- The speed layer's duplicates history is read whole per partition (by
-- time, where a micro-batch starts) and judged in memory: nothing looks a
-- key up in PostgreSQL. The primary key on (kafka_partition, event_key)
-- made every flush insert its keys at random places of a B-tree (the keys
-- are SHA-256 prefixes), the largest part of a flush's commit at high
-- rates (issue 17, item 7). Without it a flush appends its keys, and the
-- time index grows at each partition's newest end. A key written again
-- (its earlier copy fell out of the window) has two rows until the older
-- one is pruned; loading keeps the newer.
ALTER TABLE speed.event_keys DROP CONSTRAINT event_keys_pkey;
