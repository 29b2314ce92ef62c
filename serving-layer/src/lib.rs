//! Serving layer: the merged `serving.*` views and what reads them.
//!
//! At this stage it owns schema preparation for local runs (`migrate`); the
//! HTTP API and dashboard build on the same library.

pub mod cli;
