-- API keys for the serving edge (issue 15): recommender clients and
-- dashboard viewers. `serving-layer keys create` prints a key once and
-- stores only its SHA-256; `keys revoke` sets revoked_at. `serve` reads one
-- key by id through serving.api_key(), so its reader roles can check a key
-- but never list the table.
CREATE TABLE ops.api_keys (
    key_id      bigserial PRIMARY KEY,
    name        text NOT NULL,
    scope       text NOT NULL CHECK (scope IN ('recommendations', 'dashboard')),
    secret_hash bytea NOT NULL CHECK (length(secret_hash) = 32),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE FUNCTION serving.api_key(p_key_id bigint, OUT scope text, OUT secret_hash bytea)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT k.scope, k.secret_hash FROM ops.api_keys k WHERE k.key_id = p_key_id AND k.revoked_at IS NULL
$$;
REVOKE ALL ON FUNCTION serving.api_key(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION serving.api_key(bigint) TO recommender_reader, dashboard_reader;
