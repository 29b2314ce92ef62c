-- The duplicates seed, like `speed.event_keys` (migration 0022), is read
-- by partition and time and judged in memory: nothing looks a key up.
-- Its primary key made each incremental publish insert the new offsets'
-- keys at random places of a B-tree, about a second of an hour's publish
-- (issue 17, item 5). Without it the publish appends them; a key met
-- again (a lake written before duplicates were judged) has two rows, and
-- the speed layer keeps the newer when it loads the seed.
ALTER TABLE ops.dedup_seed DROP CONSTRAINT dedup_seed_pkey;
