//! The Ballista cluster `batch-layer run --engine ballista://HOST:PORT`
//! runs on: a scheduler and its executors, as their own processes.
//!
//! They are the `ballista-scheduler` and `ballista-executor` crates with two
//! additions from `batch-layer`: the codec that carries a lake table in a
//! plan ([`batch_layer::lake_files::LakeCodec`]), and the object stores for
//! `s3://` lakes configured from the usual `AWS_*` variables
//! ([`batch_layer::stores`]). The stock Ballista binaries would run plain
//! Parquet but not our lake table. Kept out of `batch-layer` so the client
//! (`run`) does not link the scheduler and executor.
//!
//! * [`scheduler`]: plans queries, hands stages to executors, `/readyz`;
//! * [`executor`]: runs stages, reading the lake itself;
//! * [`cli`]: the `batch-cluster` command line.

pub mod cli;
pub mod executor;
pub mod scheduler;
