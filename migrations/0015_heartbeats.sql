-- Dead-man alerts (issue 18): each long-running process writes a heartbeat
-- here every few seconds; `serving-layer watchdog`, a process of its own
-- under its own role, notifies when one falls silent (and when it
-- returns), when the batch views are stale, when the speed layer lags,
-- and when PostgreSQL cannot be reached. A process stopped on purpose
-- (SIGTERM) marks its row stopped, and is not missed.
CREATE TABLE ops.heartbeats (
    process    text NOT NULL,
    instance   text NOT NULL,
    beat_at    timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz NOT NULL DEFAULT now(),
    stopped_at timestamptz,
    PRIMARY KEY (process, instance)
);
GRANT SELECT, INSERT, UPDATE ON ops.heartbeats TO batch_writer, speed_writer;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ops_watchdog') THEN
        CREATE ROLE ops_watchdog LOGIN;
    END IF;
END
$$;
GRANT USAGE ON SCHEMA ops TO ops_watchdog;
GRANT SELECT ON ops.heartbeats, ops.batch_runs, ops.speed_offsets TO ops_watchdog;
GRANT SELECT, INSERT, UPDATE ON ops.notifications TO ops_watchdog;
GRANT USAGE ON SEQUENCE ops.notifications_id_seq TO ops_watchdog;
GRANT EXECUTE ON FUNCTION serving.schema_state() TO ops_watchdog;
GRANT USAGE ON SCHEMA serving TO ops_watchdog;
