//! Batch layer: the lake is the source of truth.
//!
//! * [`lake`]: where the Delta Lake is, its tables, committed offsets;
//! * [`ingest`]: Kafka → Delta table `events`, each offset exactly once;
//! * [`cli`]: the `batch-layer` command line.

pub mod cli;
pub mod ingest;
pub mod lake;
