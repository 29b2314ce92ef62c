//! The `scheduler` and `executor` processes `run --engine ballista://…`
//! talks to: the `ballista-scheduler` and `ballista-executor` crates with two
//! additions, the [`LakeCodec`] and the [`stores`](crate::stores) for
//! `s3://` lakes configured from the usual `AWS_*` variables.

use std::net::SocketAddr;
use std::sync::Arc;

use datafusion::prelude::SessionConfig;

use crate::engine::host_port;
use crate::lake_files::LakeCodec;
use crate::stores::{runtime_env, session_state};

/// `batch-layer scheduler`: a Ballista scheduler that knows our codec.
#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    pub bind: SocketAddr,
    /// The host name executors and clients reach it by (default: the bind
    /// address).
    pub external_host: Option<String>,
    /// `/readyz` answers 200 once this many executors are registered.
    pub min_executors: usize,
}

pub async fn run_scheduler(
    options: SchedulerOptions,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    use ballista_scheduler::cluster::BallistaCluster;
    use ballista_scheduler::config::SchedulerConfig;
    let config = SchedulerConfig {
        bind_host: options.bind.ip().to_string(),
        bind_port: options.bind.port(),
        external_host: options.external_host.clone().unwrap_or_else(|| options.bind.ip().to_string()),
        min_ready_executors: options.min_executors,
        override_logical_codec: Some(Arc::new(LakeCodec::default())),
        override_session_builder: Some(Arc::new(session_state)),
        ..SchedulerConfig::default()
    };
    let cluster = BallistaCluster::new_from_config(&config).await?;
    tracing::info!(bind = %options.bind, min_executors = options.min_executors, "Ballista scheduler starting");
    tokio::select! {
        r = ballista_scheduler::scheduler_process::start_server(cluster, options.bind, Arc::new(config)) => {
            r.map_err(|e| anyhow::anyhow!("scheduler on {}: {e}", options.bind))
        }
        () = shutdown.cancelled() => {
            tracing::info!("scheduler stopped");
            Ok(())
        }
    }
}

/// `batch-layer executor`: a Ballista executor that reads our lake.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    /// The scheduler's `HOST:PORT`.
    pub scheduler: String,
    /// Address to listen on (`0.0.0.0` for every interface).
    pub bind_host: String,
    /// The host name the scheduler and other executors reach it by
    /// (default: the bind address).
    pub external_host: Option<String>,
    /// Flight (data) port; gRPC is the next one.
    pub port: u16,
    pub work_dir: std::path::PathBuf,
    /// Tasks run at once.
    pub vcores: usize,
}

pub async fn run_executor(options: ExecutorOptions) -> anyhow::Result<()> {
    use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
    std::fs::create_dir_all(&options.work_dir)
        .map_err(|e| anyhow::anyhow!("cannot create the work folder {}: {e}", options.work_dir.display()))?;
    let (scheduler_host, scheduler_port) = host_port(&options.scheduler).ok_or_else(|| {
        anyhow::anyhow!("--scheduler {:?}: expected HOST:PORT, e.g. 127.0.0.1:50050", options.scheduler)
    })?;
    let external_host = options.external_host.clone().unwrap_or_else(|| options.bind_host.clone());
    if external_host == "0.0.0.0" || external_host == "::" {
        anyhow::bail!("an executor bound to every interface needs --external-host: the name others reach it by");
    }
    let config = ExecutorProcessConfig {
        bind_host: options.bind_host.clone(),
        external_host: Some(external_host),
        port: options.port,
        grpc_port: options.port + 1,
        scheduler_host,
        scheduler_port,
        scheduler_connect_timeout_seconds: 30,
        work_dir: Some(options.work_dir.display().to_string()),
        vcores: options.vcores.max(1),
        print_thread_info: false,
        override_logical_codec: Some(Arc::new(LakeCodec::default())),
        override_runtime_producer: Some(Arc::new(|_config: &SessionConfig| runtime_env())),
        ..ExecutorProcessConfig::default()
    };
    tracing::info!(port = options.port, scheduler = %options.scheduler, "Ballista executor starting");
    // The executor process handles SIGTERM itself: it deregisters and exits.
    start_executor_process(Arc::new(config))
        .await
        .map_err(|e| anyhow::anyhow!("executor on ports {} and {}: {e}", options.port, options.port + 1))
}
