-- Views defined in SQL files (issue 20). `serving-layer migrate` reads the
-- views folder, checks every file and registers each view's SQL here, with
-- the tables it needs; every service loads the views from this table at
-- start (never from its own copy of the files), so the batch, the speed
-- layer and the serving views on any host execute one definition.

CREATE TABLE ops.views (
    name          text PRIMARY KEY,
    -- Publish order: the shipped views first, then the others by name.
    position      integer NOT NULL,
    sql           text NOT NULL,
    -- The batch SQL's fingerprint (ViewDef::fingerprint), as
    -- ops.view_definitions records the one published.
    fingerprint   text NOT NULL,
    -- The tables' DDL fingerprint (ViewDef::shape): a redefined view keeps
    -- its tables when this is unchanged, and gets new ones otherwise.
    shape         text NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT now(),
    changed_at    timestamptz NOT NULL DEFAULT now()
);

-- Bumped by every registration that adds, changes or drops a view, in its
-- transaction, which holds an advisory lock (platform::views::VIEWS_FENCE)
-- exclusively. A speed-layer flush takes that lock shared until its commit
-- and compares the version with the one its views were loaded at: a flush
-- never commits
-- deltas of a set of views older than the registered one (it reloads and
-- computes again), so from the registration on, every committed flush
-- includes the new view.
CREATE TABLE ops.views_version (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version   bigint NOT NULL DEFAULT 0
);
INSERT INTO ops.views_version DEFAULT VALUES;

-- Per view added or redefined, per partition: the first offset the speed
-- layer computes it for (the speed layer's next offset at registration).
-- Until the batch cut reaches it in every partition, the view lacks the
-- records between the cut and this offset: `serving.views` says so.
CREATE TABLE ops.view_speed_start (
    name            text NOT NULL REFERENCES ops.views ON DELETE CASCADE,
    kafka_partition integer NOT NULL,
    start_offset    bigint NOT NULL,
    PRIMARY KEY (name, kafka_partition)
);

-- Services read the registered views through this function, as they read
-- the schema state: the reader roles hold no grant on ops.
CREATE FUNCTION serving.view_sources(OUT version bigint, OUT name text, OUT sql text)
RETURNS SETOF record
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (SELECT version FROM ops.views_version), v.name, v.sql FROM ops.views AS v ORDER BY v.position
$$;
REVOKE ALL ON FUNCTION serving.view_sources() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION serving.view_sources()
    TO batch_writer, speed_writer, serving_writer, dashboard_reader, recommender_reader;

GRANT SELECT ON ops.views_version TO speed_writer;

-- Views over the catalog are computed by the speed layer too: it reads the
-- published catalog.
GRANT USAGE ON SCHEMA batch TO speed_writer;
GRANT SELECT ON batch.products TO speed_writer;

-- Each registered view and whether it is complete: `backfilling` until the
-- batch has published its definition with a cut at or past the offsets the
-- speed layer started it at, `current` after.
CREATE VIEW serving.views AS
SELECT v.name,
       v.registered_at,
       v.changed_at,
       CASE
           WHEN d.fingerprint IS DISTINCT FROM v.fingerprint THEN 'backfilling'
           WHEN EXISTS (
               SELECT 1 FROM ops.view_speed_start AS s
               LEFT JOIN ops.cut AS c USING (kafka_partition)
               WHERE s.name = v.name AND COALESCE(c.cut_offset, 0) < s.start_offset
           ) THEN 'backfilling'
           ELSE 'current'
       END AS state,
       d.published_at AS batch_published_at
FROM ops.views AS v
LEFT JOIN ops.view_definitions AS d USING (name);
GRANT SELECT ON serving.views TO dashboard_reader, recommender_reader;
