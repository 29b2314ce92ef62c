//! `batch-cluster executor`: a Ballista executor that reads our lake.
//!
//! It registers with the scheduler, runs the stages it is given and serves
//! their shuffle output over Arrow Flight. It reads the lake itself: local
//! files, or `s3://` through a client built from its own `AWS_*` variables.
//! On SIGTERM it deregisters and exits (Ballista handles the signal).

use std::path::PathBuf;
use std::sync::Arc;

use ballista_core::error::BallistaError;
use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
use batch_layer::lake_files::LakeCodec;
use datafusion::prelude::SessionConfig;

/// How to run the executor.
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
    /// Folder for shuffle files (created if missing).
    pub work_dir: PathBuf,
    /// Tasks run at once.
    pub vcores: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error("--scheduler {0:?}: expected HOST:PORT, e.g. 127.0.0.1:50050")]
    SchedulerAddress(String),
    #[error("--port {0}: the gRPC port after it must exist too (at most 65534)")]
    Port(u16),
    #[error("an executor bound to every interface needs --external-host: the name others reach it by")]
    NoExternalHost,
    #[error("cannot create the work folder {}: {source}", .path.display())]
    WorkDir { path: PathBuf, source: std::io::Error },
    #[error("executor on ports {port} and {grpc_port}: {source}")]
    Run { port: u16, grpc_port: u16, source: BallistaError },
}

/// Runs the executor until it is told to stop (SIGTERM) or fails.
pub async fn run(options: ExecutorOptions) -> Result<(), ExecutorError> {
    let grpc_port = options.port.checked_add(1).ok_or(ExecutorError::Port(options.port))?;
    let (scheduler_host, scheduler_port) = batch_layer::engine::host_port(&options.scheduler)
        .ok_or_else(|| ExecutorError::SchedulerAddress(options.scheduler.clone()))?;
    let external_host = options.external_host.clone().unwrap_or_else(|| options.bind_host.clone());
    if external_host == "0.0.0.0" || external_host == "::" {
        return Err(ExecutorError::NoExternalHost);
    }
    std::fs::create_dir_all(&options.work_dir)
        .map_err(|source| ExecutorError::WorkDir { path: options.work_dir.clone(), source })?;
    let config = ExecutorProcessConfig {
        bind_host: options.bind_host.clone(),
        external_host: Some(external_host),
        port: options.port,
        grpc_port,
        scheduler_host,
        scheduler_port,
        scheduler_connect_timeout_seconds: 30,
        work_dir: Some(options.work_dir.display().to_string()),
        vcores: options.vcores.max(1),
        print_thread_info: false,
        override_logical_codec: Some(Arc::new(LakeCodec::default())),
        override_runtime_producer: Some(Arc::new(|_config: &SessionConfig| batch_layer::stores::runtime_env())),
        ..ExecutorProcessConfig::default()
    };
    tracing::info!(port = options.port, scheduler = %options.scheduler, "Ballista executor starting");
    start_executor_process(Arc::new(config)).await.map_err(|source| ExecutorError::Run {
        port: options.port,
        grpc_port,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> ExecutorOptions {
        ExecutorOptions {
            scheduler: "127.0.0.1:50050".into(),
            bind_host: "127.0.0.1".into(),
            external_host: None,
            port: 50051,
            work_dir: PathBuf::from("/nonexistent/never-created"),
            vcores: 1,
        }
    }

    /// Each mistake is refused before anything starts or is created.
    #[tokio::test]
    async fn mistakes_are_refused_before_the_executor_starts() {
        let e = run(ExecutorOptions { port: u16::MAX, ..options() }).await.unwrap_err();
        assert!(matches!(e, ExecutorError::Port(u16::MAX)), "{e}");
        let e = run(ExecutorOptions { scheduler: "127.0.0.1".into(), ..options() }).await.unwrap_err();
        assert!(matches!(e, ExecutorError::SchedulerAddress(_)), "{e}");
        let e = run(ExecutorOptions { bind_host: "0.0.0.0".into(), ..options() }).await.unwrap_err();
        assert!(matches!(e, ExecutorError::NoExternalHost), "{e}");
        assert!(!options().work_dir.exists());
    }
}
