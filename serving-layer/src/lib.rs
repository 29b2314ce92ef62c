//! Serving layer: what dashboards and the shop read.
//!
//! * [`recommend`]: personalised recommendations with the popular fallback;
//! * [`popular`]: the in-memory popular list that survives database outages;
//! * [`models`]: imported model outputs (`import-recommendations`);
//! * [`export`]: every user's top k in bulk (`export-recommendations`);
//! * [`dashboard`]: the dashboard API and page;
//! * [`server`]: `serve`, the HTTP server that puts them together;
//! * [`telemetry`]: `serving_*` metrics;
//! * [`ids`]: the one check of ids that arrive from outside.
//!
//! The merged `serving.*` relations themselves are generated from the view
//! definitions (`platform::db`); this crate only reads them, and writes
//! nothing but `serving.model_recommendations`.

pub mod auth;
pub mod cli;
pub mod dashboard;
pub mod export;
pub mod ids;
pub mod models;
pub mod popular;
pub mod recommend;
pub mod server;
pub mod telemetry;
pub mod watchdog;
