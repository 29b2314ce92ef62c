-- Imported model outputs expire (issue 19, item 4). Each import says how
-- long its rows are valid (`import-recommendations --valid-for`, 7 days by
-- default); past that the recommender ignores them and answers from live
-- signals, so a model nobody refreshes stops overriding what users do.
-- Every row carries its import's time and end of validity, so a request
-- reads both with the rows it already reads.
--
-- Rows imported before this release count as imported at their import's
-- time (now, when none is recorded) and valid for 7 days from it.

ALTER TABLE ops.model_imports ADD COLUMN valid_until timestamptz;
UPDATE ops.model_imports SET valid_until = imported_at + interval '7 days';
ALTER TABLE ops.model_imports ALTER COLUMN valid_until SET NOT NULL;

ALTER TABLE serving.model_recommendations
    ADD COLUMN imported_at timestamptz,
    ADD COLUMN valid_until timestamptz;
UPDATE serving.model_recommendations
SET imported_at = COALESCE((SELECT max(imported_at) FROM ops.model_imports), now());
UPDATE serving.model_recommendations SET valid_until = imported_at + interval '7 days';
-- A row written without them (by hand, or an older importer) counts as
-- imported when written and is valid for 7 days, as an import's default.
ALTER TABLE serving.model_recommendations
    ALTER COLUMN imported_at SET NOT NULL,
    ALTER COLUMN imported_at SET DEFAULT now(),
    ALTER COLUMN valid_until SET NOT NULL,
    ALTER COLUMN valid_until SET DEFAULT now() + interval '7 days';

-- The current model, for the serving layer's metrics (version, age,
-- validity, users covered at import); nothing per user.
CREATE FUNCTION serving.model_status(
    OUT model_version text, OUT imported_at timestamptz, OUT valid_until timestamptz, OUT users bigint)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT m.model_version, m.imported_at, m.valid_until, m.users
    FROM ops.model_imports m ORDER BY m.import_id DESC LIMIT 1
$$;
REVOKE ALL ON FUNCTION serving.model_status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION serving.model_status() TO recommender_reader, serving_writer;
