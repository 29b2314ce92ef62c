-- Model outputs that data scientists import (`serving-layer
-- import-recommendations FILE.parquet --model-version V`); the
-- recommendations API serves them first, with source "model".
--
-- An import replaces every row in one transaction (readers see the old
-- model or the new one, never a mix) and records itself in
-- ops.model_imports.

CREATE TABLE serving.model_recommendations (
    user_id       text NOT NULL,
    rank          integer NOT NULL CHECK (rank >= 1),
    product_id    text NOT NULL,
    score         double precision NOT NULL,
    model_version text NOT NULL,
    PRIMARY KEY (user_id, rank),
    UNIQUE (user_id, product_id)
);

CREATE TABLE ops.model_imports (
    import_id     bigserial PRIMARY KEY,
    imported_at   timestamptz NOT NULL DEFAULT now(),
    model_version text NOT NULL,
    source_file   text NOT NULL,
    users         bigint NOT NULL,
    rows          bigint NOT NULL
);

-- User-level: the recommender reads it, dashboards never do.
GRANT SELECT ON serving.model_recommendations TO recommender_reader;
GRANT SELECT, INSERT, DELETE ON serving.model_recommendations TO serving_writer;
GRANT USAGE ON SCHEMA ops TO serving_writer;
GRANT SELECT, INSERT ON ops.model_imports TO serving_writer;
GRANT USAGE ON SEQUENCE ops.model_imports_import_id_seq TO serving_writer;
