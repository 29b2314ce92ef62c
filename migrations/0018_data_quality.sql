-- Data quality on real data (issue 18).
--
-- The lake reconciled with Kafka: what the deployment accepts as missing
-- (0 for a lake that began with the ledger; what an older lake missed when
-- reconciliation began; or what an operator accepted with
-- `run --accept-lake-loss`), and the last account.
CREATE TABLE ops.lake_reconciliation (
    singleton     boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    accepted      bigint NOT NULL,
    accepted_at   timestamptz NOT NULL DEFAULT now(),
    reason        text NOT NULL,
    checked_at    timestamptz,
    delta_version bigint,
    unaccounted   bigint,
    account       jsonb
);

-- Every complete hour, checked once: its events against its baseline, and
-- the events naming a product the catalog does not know.
CREATE TABLE ops.quality_hours (
    hour             timestamptz PRIMARY KEY,
    events           bigint NOT NULL,
    baseline         double precision,
    with_product     bigint,
    unknown_products bigint,
    findings         text[] NOT NULL DEFAULT '{}',
    checked_at       timestamptz NOT NULL DEFAULT now()
);

GRANT SELECT, INSERT, UPDATE ON ops.lake_reconciliation, ops.quality_hours TO batch_writer;
GRANT SELECT ON ops.lake_reconciliation, ops.quality_hours TO ops_watchdog;
