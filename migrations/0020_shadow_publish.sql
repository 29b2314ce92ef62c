-- A publish readers never notice (issue 17). Each batch relation becomes a
-- pair of tables, `batch.<name>__a` and `batch.<name>__b`, and
-- `batch.<name>` a view over the active one. A run that replaces a
-- relation whole loads the other table (the shadow) with COPY, with its
-- indexes dropped and rebuilt after the load, and the publish swaps the
-- view onto it in the run's one transaction: readers never wait on a
-- TRUNCATE or on rows written twice, only on the swap itself, which holds
-- its lock for the last statements before the commit. Incremental writes
-- (hours, upserts) go through the view into the active table.
--
-- The batch writer runs no DDL of its own: the three functions below are
-- the owner's, do only this, and only for the relations listed in
-- `ops.batch_shadows`.

CREATE TABLE ops.batch_shadows (
    name   text PRIMARY KEY,
    active text NOT NULL CHECK (active IN ('a', 'b'))
);
GRANT SELECT ON ops.batch_shadows TO batch_writer;

-- The indexes of a shadow while it is loaded, to rebuild them after.
CREATE TABLE ops.batch_shadow_indexes (
    name       text NOT NULL,
    position   integer NOT NULL,
    definition text NOT NULL,
    PRIMARY KEY (name, position)
);

DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['product_demand_hourly', 'user_product_state', 'products', 'demand_baseline',
                             'item_similarity'] LOOP
        EXECUTE format('ALTER TABLE batch.%I RENAME TO %I', r, r || '__a');
        EXECUTE format('ALTER INDEX batch.%I RENAME TO %I', r || '_pkey', r || '__a_pkey');
        EXECUTE format('CREATE TABLE batch.%I (LIKE batch.%I INCLUDING ALL)', r || '__b', r || '__a');
        EXECUTE format('CREATE VIEW batch.%I AS SELECT * FROM batch.%I', r, r || '__a');
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON batch.%I TO batch_writer', r || '__b');
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON batch.%I TO batch_writer', r);
        INSERT INTO ops.batch_shadows (name, active) VALUES (r, 'a');
    END LOOP;
END $$;

-- The serving views were bound to the renamed tables: `migrate` re-creates
-- them over the new views when it finds no fingerprint.
DELETE FROM ops.generated_views;

-- The table of `relation`'s pair that `batch.<relation>` does not show (its
-- name in the `batch` schema), the registry row locked for the
-- transaction; an error for a relation without a pair.
CREATE FUNCTION batch.shadow_table(relation text) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    shadow text;
BEGIN
    SELECT relation || '__' || CASE active WHEN 'a' THEN 'b' ELSE 'a' END INTO shadow
    FROM ops.batch_shadows WHERE name = relation FOR UPDATE;
    IF shadow IS NULL THEN
        RAISE EXCEPTION 'batch.% has no shadow table', relation;
    END IF;
    RETURN shadow;
END $$;
REVOKE ALL ON FUNCTION batch.shadow_table(text) FROM PUBLIC;

-- The shadow of `relation`, emptied and without indexes, ready for COPY;
-- returns its qualified name. Called again before `shadow_end` (the
-- publish runs begin, COPY and end in one transaction, so only a caller
-- that committed between them can), it empties the table again and keeps
-- the indexes saved the first time.
CREATE FUNCTION batch.shadow_begin(relation text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    shadow text;
    oid_ regclass;
    i record;
    n integer := 0;
BEGIN
    shadow := batch.shadow_table(relation);
    oid_ := format('batch.%I', shadow)::regclass;
    IF NOT EXISTS (SELECT 1 FROM ops.batch_shadow_indexes WHERE name = relation) THEN
        -- Constraints first (their indexes go with them), then the others.
        FOR i IN
            SELECT format('ALTER TABLE batch.%I ADD CONSTRAINT %I %s', shadow, c.conname, pg_get_constraintdef(c.oid))
                       AS definition,
                   format('ALTER TABLE batch.%I DROP CONSTRAINT %I', shadow, c.conname) AS drop_
            FROM pg_constraint c WHERE c.conrelid = oid_ AND c.contype IN ('p', 'u')
            UNION ALL
            SELECT pg_get_indexdef(x.indexrelid), format('DROP INDEX batch.%I', ic.relname)
            FROM pg_index x JOIN pg_class ic ON ic.oid = x.indexrelid
            WHERE x.indrelid = oid_
              AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid AND c.conrelid = oid_)
        LOOP
            n := n + 1;
            INSERT INTO ops.batch_shadow_indexes (name, position, definition) VALUES (relation, n, i.definition);
            EXECUTE i.drop_;
        END LOOP;
        IF n = 0 THEN
            -- A table without indexes still marks the load as begun.
            INSERT INTO ops.batch_shadow_indexes (name, position, definition) VALUES (relation, 0, '');
        END IF;
    END IF;
    EXECUTE format('TRUNCATE batch.%I', shadow);
    RETURN format('batch.%I', shadow);
END $$;

-- Rebuilds the shadow's indexes after its load and gathers its statistics.
CREATE FUNCTION batch.shadow_end(relation text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    shadow text;
    d text;
BEGIN
    shadow := batch.shadow_table(relation);
    FOR d IN SELECT definition FROM ops.batch_shadow_indexes WHERE name = relation AND definition <> ''
             ORDER BY position LOOP
        EXECUTE d;
    END LOOP;
    DELETE FROM ops.batch_shadow_indexes WHERE name = relation;
    EXECUTE format('ANALYZE batch.%I', shadow);
END $$;

-- Points `batch.<relation>` at its loaded shadow; the previous table is the
-- next load's shadow. Refuses a shadow whose load has not ended.
CREATE FUNCTION batch.shadow_swap(relation text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    shadow text;
BEGIN
    shadow := batch.shadow_table(relation);
    IF EXISTS (SELECT 1 FROM ops.batch_shadow_indexes WHERE name = relation) THEN
        RAISE EXCEPTION 'the shadow of batch.% is still being loaded', relation;
    END IF;
    EXECUTE format('CREATE OR REPLACE VIEW batch.%I AS SELECT * FROM batch.%I', relation, shadow);
    UPDATE ops.batch_shadows SET active = right(shadow, 1) WHERE name = relation;
END $$;

-- For migrations (the owner's only): after a column was added to or
-- dropped from both tables of a pair, points `batch.<relation>` at the
-- active one again, with its grants. An added column is appended in place
-- (CREATE OR REPLACE: the serving views over it stay, readers never miss
-- them); a dropped column (whose CASCADE took the views) re-creates the
-- view and has `migrate` re-create the serving views.
CREATE FUNCTION batch.shadow_view(relation text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    active_ text;
    body text;
BEGIN
    SELECT active INTO active_ FROM ops.batch_shadows WHERE name = relation;
    IF active_ IS NULL THEN
        RAISE EXCEPTION 'batch.% has no shadow table', relation;
    END IF;
    body := format('VIEW batch.%I AS SELECT * FROM batch.%I', relation, relation || '__' || active_);
    IF to_regclass(format('batch.%I', relation)) IS NOT NULL THEN
        BEGIN
            EXECUTE 'CREATE OR REPLACE ' || body;
        EXCEPTION WHEN invalid_table_definition THEN
            -- A column removed or retyped: only a new view will do.
            EXECUTE format('DROP VIEW batch.%I CASCADE', relation);
        END;
    END IF;
    IF to_regclass(format('batch.%I', relation)) IS NULL THEN
        EXECUTE 'CREATE ' || body;
        DELETE FROM ops.generated_views;
    END IF;
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON batch.%I TO batch_writer', relation);
END $$;
REVOKE ALL ON FUNCTION batch.shadow_view(text) FROM PUBLIC;

REVOKE ALL ON FUNCTION batch.shadow_begin(text), batch.shadow_end(text), batch.shadow_swap(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION batch.shadow_begin(text), batch.shadow_end(text), batch.shadow_swap(text)
    TO batch_writer;

-- The catalog is republished only when the lake's copy changed: the Delta
-- version each batch table was computed from (the catalog's only).
ALTER TABLE ops.batch_tables ADD COLUMN source_version bigint;
