-- Services never run DDL (issue 15): the schema owner applies migrations
-- (`serving-layer migrate`), and every service checks at start, under its
-- own role, that the database is what it was built for. This function is
-- that check's one window onto the owner's bookkeeping: the migrations
-- applied, the fingerprint of the generated serving views and the
-- deployment's settings, and nothing else.
CREATE FUNCTION serving.schema_state(
    OUT applied bigint[],
    OUT views_fingerprint text,
    OUT segment_size bigint,
    OUT dedup_window_micros bigint
)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
    SELECT
        (SELECT coalesce(array_agg(version ORDER BY version), '{}') FROM _sqlx_migrations WHERE success),
        (SELECT fingerprint FROM ops.generated_views WHERE name = 'serving.*'),
        (SELECT d.segment_size FROM ops.deployment d),
        (SELECT (extract(epoch FROM d.dedup_window) * 1000000)::bigint FROM ops.deployment d)
$$;
REVOKE ALL ON FUNCTION serving.schema_state() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION serving.schema_state()
    TO batch_writer, speed_writer, serving_writer, dashboard_reader, recommender_reader;
