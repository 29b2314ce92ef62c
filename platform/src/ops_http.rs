//! The operations endpoint every long-running process serves:
//! `/metrics` (Prometheus), `/healthz` (the process lives) and `/readyz`
//! (its dependencies answer, as the process last saw them).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// Readiness as the process reports it; cheap to clone and set.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Installs the global Prometheus recorder (once per process) and returns
/// its handle.
pub fn install_metrics() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Another recorder may be installed already (tests); keep ours for rendering.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// The ops routes, to serve alone or to merge into a larger router.
pub fn router(metrics: PrometheusHandle, ready: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(move || std::future::ready(metrics.render())))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(ready)
}

async fn readyz(State(ready): State<Readiness>) -> (StatusCode, &'static str) {
    if ready.get() { (StatusCode::OK, "ready\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready\n") }
}

/// Serves the ops routes on `addr` until `shutdown`; returns the bound
/// address (port 0 picks a free one).
pub async fn serve(
    addr: SocketAddr,
    ready: Readiness,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(install_metrics(), ready);
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
        if let Err(e) = served {
            tracing::error!(error = %e, "ops endpoint stopped");
        }
    });
    Ok((bound, task))
}

/// [`serve`] for a command's `--ops-addr`: a port that cannot be bound is
/// one line naming the flag and its `variable`; the bound address is logged.
pub async fn serve_for_command(
    addr: SocketAddr,
    ready: Readiness,
    shutdown: CancellationToken,
    variable: &str,
) -> anyhow::Result<SocketAddr> {
    let (bound, _) = serve(addr, ready, shutdown)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e} (set --ops-addr or {variable})"))?;
    tracing::info!(%bound, "serving /metrics, /healthz, /readyz");
    Ok(bound)
}
