//! Runtime plumbing every binary of the platform shares, so each layer's
//! `main` stays a few lines and all of them behave alike:
//!
//! * [`logging`]: `tracing` set-up (JSON when not on a terminal) and the
//!   one-line error report of a failed command;
//! * [`db`]: connecting to PostgreSQL, migrations, the deployment's segment
//!   size and the generated `serving.*` views;
//! * [`shutdown`]: one cancellation token fed by SIGINT/SIGTERM.
//!
//! Contracts (event, schemas, view definitions) live in `shared-schema`;
//! this crate is machinery.

pub mod db;
pub mod logging;
pub mod shutdown;
