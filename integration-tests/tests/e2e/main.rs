//! The end-to-end tests, against the real local stack (`make up`), as one
//! test binary: each former `tests/*.rs` file is a module here, so a test
//! change links the whole stack (DataFusion, deltalake, rdkafka, sqlx) once,
//! not once per file.
//!
//! A new end-to-end test goes into one of these modules or a new one listed
//! here, not into a new file directly under `tests/` (that would be a
//! binary of its own again). `cargo nextest` runs every test in its own
//! process, so tests that install global state (a metrics recorder, a
//! tracing subscriber) do not see each other's; pick a module's tests with
//! a filter, e.g. `cargo nextest run -p integration-tests --test e2e -E
//! 'test(/^chaos::/)'`.

mod bad_input_corpus;
mod batch_ingest;
mod batch_run;
mod chaos;
mod dashboard_api;
mod dashboard_chromium;
mod data_quality;
mod deploy_files;
mod derived_views;
mod exact_merge;
mod export_training;
mod faults;
mod forget_user;
mod foundation;
mod least_privilege;
mod maintain;
mod notifications;
mod publish;
mod recommendations;
mod recovery;
mod replica;
mod scale_out;
mod schema_evolution;
mod serving_api;
mod serving_faults;
mod serving_roles;
mod speed;
mod speed_faults;
mod view_files;
mod watchdog;
