-- A fencing token for batch runs (issue 14). The advisory lock keeps two
-- runs apart only while its session lives: a PostgreSQL restart (or a
-- dropped connection) releases it while the run goes on computing, and a
-- second run may take it. So each run, right after taking the lock, moves
-- the token on and keeps its value; its publish transaction locks this row
-- and publishes only if the token is still its own. A run that lost its
-- lock to a newer one therefore publishes nothing.
CREATE TABLE ops.run_fence (
    id    boolean PRIMARY KEY DEFAULT true CHECK (id),
    token bigint NOT NULL
);
INSERT INTO ops.run_fence (id, token) VALUES (true, 0);

GRANT SELECT, UPDATE ON ops.run_fence TO batch_writer;
