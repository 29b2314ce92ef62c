//! Batch layer: the lake is the source of truth.
//!
//! * [`lake`]: where the Delta Lake is, its tables, committed offsets;
//! * [`catalog`]: read-only snapshot of the shop's products into the lake;
//! * [`ingest`]: Kafka → Delta table `events`, each offset exactly once;
//! * [`ledger`]: why an offset below the lake's position has no row (gaps, forgotten users, erasure);
//! * [`dedup`]: the lake's side of duplicates: the ingest's history, the speed layer's seed;
//! * [`recompute`]: views from one snapshot, published with the cut atomically;
//! * [`quality`]: the gate a batch must pass before it is published;
//! * [`recover`]: `recover`, the lake brought up to Kafka (or rebuilt from it) and every table recomputed;
//! * [`reconcile`]: the lake against Kafka: every offset held or accounted for;
//! * [`findings`]: what the data says of itself: missing hours, volume drops, unknown products;
//! * [`scope`]: which lake events a query sees (cut, offset range, hours), as DataFusion expressions;
//! * [`schedule`]: `run` every period, aligned to the clock;
//! * [`forget`]: `forget-user`, the GDPR erasure of users everywhere;
//! * [`topics`]: a topic's configuration as the broker reports it (retention);
//! * [`export`]: the recommender's training data as Parquet, as of a time;
//! * [`engine`]: where a run's SQL executes, in process or `ballista://…`;
//! * [`lake_files`]: a pinned snapshot as Parquet files, as a Ballista plan carries it;
//! * [`stores`]: the object stores a Ballista session reads the lake through;
//! * [`view_files`]: `views check`, the view files planned as the layers run them;
//! * [`cli`]: the `batch-layer` command line.

pub mod catalog;
pub mod cli;
pub mod dedup;
pub mod engine;
pub mod export;
pub mod findings;
pub mod forget;
pub mod ingest;
pub mod lake;
pub mod lake_files;
pub mod ledger;
pub mod maintain;
pub mod quality;
pub mod recompute;
pub mod reconcile;
pub mod recover;
pub mod replay;
pub mod schedule;
pub mod scope;
pub mod stores;
pub mod topics;
pub mod view_files;
