//! `batch-cluster scheduler`: a Ballista scheduler that knows our codec.
//!
//! It plans each query a `run` submits (turning a lake table into
//! DataFusion's Parquet scan), hands the stages to the registered executors,
//! and answers `/healthz` and `/readyz` (200 once `min_executors` have
//! registered) over HTTP on its gRPC port. It runs until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::sync::Arc;

use ballista_core::error::BallistaError;
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;
use batch_layer::lake_files::LakeCodec;
use tokio_util::sync::CancellationToken;

/// How to run the scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    pub bind: SocketAddr,
    /// The host name executors and clients reach it by (default: the bind
    /// address).
    pub external_host: Option<String>,
    /// `/readyz` answers 200 once this many executors are registered.
    pub min_executors: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("setting up the scheduler's state: {0}")]
    State(#[source] BallistaError),
    #[error("scheduler on {bind}: {source}")]
    Serve { bind: SocketAddr, source: BallistaError },
}

/// Runs the scheduler until `shutdown`.
pub async fn run(options: SchedulerOptions, shutdown: CancellationToken) -> Result<(), SchedulerError> {
    let config = SchedulerConfig {
        bind_host: options.bind.ip().to_string(),
        bind_port: options.bind.port(),
        external_host: options.external_host.clone().unwrap_or_else(|| options.bind.ip().to_string()),
        min_ready_executors: options.min_executors,
        override_logical_codec: Some(Arc::new(LakeCodec::default())),
        override_session_builder: Some(Arc::new(batch_layer::stores::session_state)),
        ..SchedulerConfig::default()
    };
    let cluster = BallistaCluster::new_from_config(&config).await.map_err(SchedulerError::State)?;
    tracing::info!(bind = %options.bind, min_executors = options.min_executors, "Ballista scheduler starting");
    tokio::select! {
        r = ballista_scheduler::scheduler_process::start_server(cluster, options.bind, Arc::new(config)) => {
            r.map_err(|source| SchedulerError::Serve { bind: options.bind, source })
        }
        () = shutdown.cancelled() => {
            tracing::info!("scheduler stopped");
            Ok(())
        }
    }
}
