//! `serving-layer serve`: the HTTP server.
//!
//! Routes: `/api/recommendations/{user_id}`, the dashboard API and page
//! ([`crate::dashboard`]), and `/metrics`, `/healthz`, `/readyz`. Two
//! connection pools keep the recommender's short, budgeted queries from
//! queueing behind dashboard queries. The process starts only once the
//! schema is prepared; after that it keeps answering recommendations from
//! the popular list while PostgreSQL is away, and stops gracefully on
//! SIGINT/SIGTERM (in-flight requests finish).
//!
//! The port opens only once the recommender's connections are open, its
//! query prepared and the popular list loaded, so the first request after a
//! start is answered in full; `/readyz` (the probe a load balancer uses) is
//! ready from then on and stays ready while PostgreSQL is down: the
//! fallback still answers, and taking every instance out of a load balancer
//! would stop recommendations altogether. `/healthz` only says the process
//! lives.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRef, Path, Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use platform::ops_http::Readiness;
use serde::Deserialize;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use crate::dashboard;
use crate::ids::UserId;
use crate::popular::{self, PopularCache};
use crate::recommend::{K, Recommendations, Recommender};
use crate::telemetry;

/// Settings of `serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub addr: SocketAddr,
    pub database_url: String,
    /// Database time a recommendation may spend before the popular list answers.
    pub budget: Duration,
    /// How often the popular list is reloaded.
    pub popular_refresh: Duration,
    /// Connections of the recommender's pool (the dashboard's has a few more).
    pub max_connections: u32,
}

impl ServeConfig {
    /// On any free loopback port, with a 100 ms budget, the popular list
    /// reloaded every second and 4 connections (tools and tests).
    pub fn any_port(database_url: impl Into<String>) -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            database_url: database_url.into(),
            budget: Duration::from_millis(100),
            popular_refresh: Duration::from_secs(1),
            max_connections: 4,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Db(#[from] platform::db::DbError),
    #[error("invalid DATABASE_URL: {0}")]
    Url(sqlx::Error),
    #[error("cannot listen on {addr}: {source} (another process on that port? set --addr or SERVING_ADDR)")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
}

/// A JSON error answer: `{"error": "..."}` on one line.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: one_line(message.into()) }
    }

    /// The database failed: 503, the error is logged, not shown.
    pub fn database(error: sqlx::Error) -> Self {
        tracing::warn!(error = %error, "dashboard query failed");
        Self { status: StatusCode::SERVICE_UNAVAILABLE, message: "the database is unavailable, try again".into() }
    }

    fn unavailable(message: impl Into<String>) -> Self {
        Self { status: StatusCode::SERVICE_UNAVAILABLE, message: one_line(message.into()) }
    }
}

fn one_line(s: String) -> String {
    if s.contains(['\n', '\r']) { s.replace(['\n', '\r'], " ") } else { s }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(serde_json::json!({ "error": self.message }))).into_response()
    }
}

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    pub recommender: Recommender,
    /// The dashboard's pool.
    pub dashboard: PgPool,
}

impl FromRef<AppState> for PgPool {
    fn from_ref(state: &AppState) -> PgPool {
        state.dashboard.clone()
    }
}

#[derive(Debug, Deserialize)]
struct RecommendQuery {
    k: Option<String>,
}

async fn recommendations(
    State(state): State<AppState>,
    user: Result<Path<String>, PathRejection>,
    query: Result<Query<RecommendQuery>, QueryRejection>,
) -> Result<Json<Recommendations>, ApiError> {
    let Path(raw) = user.map_err(|e| ApiError::bad_request(format!("user_id: {}", e.body_text())))?;
    let user = UserId::parse(&raw).map_err(|e| ApiError::bad_request(format!("user_id {e}")))?;
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let k = K::parse(q.k.as_deref()).map_err(ApiError::bad_request)?;
    let answer = state.recommender.recommend(&user, k).await.map_err(|e| ApiError::unavailable(e.to_string()))?;
    Ok(Json(answer))
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError { status: StatusCode::NOT_FOUND, message: format!("no such resource: {}", uri.path()) }
}

/// The whole application: API, dashboard and ops routes.
pub fn router(state: AppState, metrics: metrics_exporter_prometheus::PrometheusHandle, ready: Readiness) -> Router {
    let app = Router::new()
        .route("/api/recommendations/{user_id}", get(recommendations))
        .route("/api/demand/hourly", get(dashboard::demand_hourly))
        .route("/api/spikes", get(dashboard::spikes))
        .route("/api/popular", get(dashboard::popular))
        .route("/api/freshness", get(dashboard::freshness))
        .route("/", get(dashboard::index))
        .route("/assets/dashboard.js", get(dashboard::script))
        .route("/assets/dashboard.css", get(dashboard::stylesheet))
        .fallback(not_found)
        .with_state(state);
    app.merge(platform::ops_http::router(metrics, ready)).layer(axum::middleware::from_fn(telemetry::track))
}

/// A started server.
#[derive(Debug)]
pub struct Running {
    /// The bound address (port 0 in the config picks a free one).
    pub addr: SocketAddr,
    pub task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

/// Prepares the schema, binds, starts the popular-list refresher and
/// serves until `shutdown`.
pub async fn start(config: ServeConfig, shutdown: CancellationToken) -> Result<Running, ServeError> {
    let metrics = telemetry::install();
    {
        let pool = platform::db::connect(&config.database_url, 2, Duration::from_secs(30)).await?;
        platform::db::prepare(&pool, None).await?;
        pool.close().await;
    }
    let options = PgConnectOptions::from_str(&config.database_url).map_err(ServeError::Url)?;
    // Lazy pools reconnect by themselves after an outage. The recommender
    // skips the ping before each use (a round trip per request): a dead
    // connection fails one query, which falls back and is discarded. Its
    // statements are all key lookups, so one generic plan per prepared
    // statement serves every user and saves planning each request (about
    // as long as executing it).
    let recommender_pool = PgPoolOptions::new()
        .max_connections(config.max_connections)
        .min_connections(1)
        .acquire_timeout(config.budget.max(Duration::from_secs(1)))
        .test_before_acquire(false)
        .connect_lazy_with(
            options.clone().options([("statement_timeout", "2s"), ("plan_cache_mode", "force_generic_plan")]),
        );
    let dashboard_pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options.options([("statement_timeout", "10s")]));

    let popular = PopularCache::new();
    let ready = Readiness::default();
    let recommender = Recommender::new(recommender_pool, popular.clone(), config.budget);
    // Ready before the port opens: the popular list loaded (the refresher
    // below retries if this fails) and the recommender's connections warm.
    let (loaded, ()) = tokio::join!(popular.reload(&dashboard_pool), recommender.warm_up(config.max_connections));
    match loaded {
        Ok(n) => {
            telemetry::popular_products(n);
            ready.set(true);
        }
        Err(e) => tracing::warn!(error = %e, "cannot load the popular list yet; not ready until it loads"),
    }
    // The popular list is computed from a week of merged demand: a
    // dashboard-sized query, so it runs on that pool and its time limit.
    tokio::spawn(popular::keep_fresh(
        popular.clone(),
        dashboard_pool.clone(),
        config.popular_refresh,
        ready.clone(),
        shutdown.clone(),
    ));
    let state = AppState { recommender, dashboard: dashboard_pool };
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .map_err(|source| ServeError::Bind { addr: config.addr, source })?;
    let addr = listener.local_addr().map_err(ServeError::Serve)?;
    tracing::info!(%addr, budget = ?config.budget, "serving");
    let app = router(state, metrics, ready);
    let task = tokio::spawn(async move {
        axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await.map_err(ServeError::Serve)
    });
    Ok(Running { addr, task })
}

/// [`start`], then wait until the server stopped.
pub async fn run(config: ServeConfig, shutdown: CancellationToken) -> Result<(), ServeError> {
    let running = start(config, shutdown).await?;
    match running.task.await {
        Ok(result) => result,
        Err(join) => Err(ServeError::Serve(std::io::Error::other(join))),
    }
}
