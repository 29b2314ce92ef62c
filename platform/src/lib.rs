//! Runtime plumbing every binary of the platform shares, so each layer's
//! `main` stays a few lines and all of them behave alike:
//!
//! * [`backoff`]: the one capped exponential backoff with jitter;
//! * [`logging`]: `tracing` set-up (JSON when not on a terminal) and the
//!   one-line error report of a failed command;
//! * [`db`]: connecting to PostgreSQL, checking the schema at start, and the
//!   owner's migrations, segment size and generated `serving.*` views;
//! * [`forgotten`]: keyed hashes of forgotten users (GDPR) and the filter
//!   every writer applies;
//! * [`hex`]: lowercase hex of hashes, signatures and secrets;
//! * [`heartbeat`]: the `ops.heartbeats` a watchdog elsewhere reads;
//! * [`kafka`]: broker metadata (partition ends, for lag);
//! * [`gaps`]: offsets without records that both layers step over, recorded
//!   and notified;
//! * [`notify`]: operator notifications, recorded and POSTed to a webhook
//!   without ever blocking the pipeline;
//! * [`shutdown`]: one cancellation token fed by SIGINT/SIGTERM;
//! * [`ops_http`]: `/metrics`, `/healthz`, `/readyz` for long-running processes;
//! * [`oversize`]: what is kept of a rejected record too large to keep whole;
//! * [`pgcopy`]: Arrow batches → PostgreSQL binary `COPY`.
//!
//! Contracts (event, schemas, view definitions) live in `shared-schema`;
//! this crate is machinery.

pub mod backoff;
pub mod db;
pub mod forgotten;
pub mod gaps;
pub mod heartbeat;
pub mod hex;
pub mod kafka;
pub mod logging;
pub mod notify;
pub mod ops_http;
pub mod oversize;
pub mod pgcopy;
pub mod shutdown;
pub mod views;
