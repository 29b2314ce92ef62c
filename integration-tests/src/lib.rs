//! The platform under test: the load generator and its shop model, the bad
//! records, and (for the end-to-end tests in `tests/e2e/`) the fixture that
//! talks to the local stack and the serving layer's test data, and a local
//! Ballista cluster and S3 server. The programs built on it (`generate`,
//! `quality`, the benchmarks) are in the `tools` crate.

pub mod broker;
pub mod checks;
pub mod cluster;
pub mod fixture;
pub mod generator;
pub mod malformed;
pub mod private_stack;
pub mod quality;
pub mod serving;
pub mod shop;
