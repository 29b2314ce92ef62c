//! `serving-layer serve`: the HTTP server.
//!
//! Routes: `/api/recommendations/{user_id}` (keys of scope
//! `recommendations`), the dashboard API (scope `dashboard`, by key or
//! session cookie) and page ([`crate::dashboard`], signing in through
//! `POST /session`), all behind [`crate::auth`]; `/metrics`, `/healthz` and
//! `/readyz` on a separate ops address (loopback by default). Two
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
use axum::extract::{FromRef, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use platform::ops_http::Readiness;
use serde::Deserialize;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use crate::auth::{Keys, Refusal, SESSION_COOKIE, SESSION_TTL, Scope};
use crate::dashboard;
use crate::ids::UserId;
use crate::popular::{self, PopularCache};
use crate::recommend::{K, Recommendations, Recommender};
use crate::telemetry;

/// Settings of `serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub addr: SocketAddr,
    /// What the recommendations read, as `recommender_reader` in a
    /// deployment (a hot standby will do).
    pub recommender_url: String,
    /// What the dashboard and the popular list read, as `dashboard_reader`.
    pub dashboard_url: String,
    /// Database time a recommendation may spend before the popular list answers.
    pub budget: Duration,
    /// How often the popular list is reloaded.
    pub popular_refresh: Duration,
    /// Connections of the recommender's pool (the dashboard's has a few more).
    pub max_connections: u32,
    /// Where `/metrics`, `/healthz` and `/readyz` listen.
    pub ops_addr: SocketAddr,
    /// Requests per second per API key (and the burst); more get 429.
    pub rate_limit: f64,
    /// Signs dashboard session cookies; random per process when `None`.
    pub session_secret: Option<String>,
    /// Origins whose pages may call the API from a browser (CORS); none by default.
    pub cors_origins: Vec<String>,
    /// The shop's currency, for the dashboard.
    pub currency: Currency,
}

impl ServeConfig {
    /// On any free loopback port, with a 100 ms budget, the popular list
    /// reloaded every second and 4 connections (tools and tests).
    pub fn any_port(database_url: impl Into<String>) -> Self {
        let database_url = database_url.into();
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            recommender_url: database_url.clone(),
            dashboard_url: database_url,
            budget: Duration::from_millis(100),
            popular_refresh: Duration::from_secs(1),
            max_connections: 4,
            ops_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            rate_limit: 1000.0,
            session_secret: None,
            cors_origins: Vec::new(),
            currency: Currency::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Db(#[from] platform::db::DbError),
    #[error("invalid database URL {url}: {source}")]
    Url { url: String, source: sqlx::Error },
    #[error("cannot listen on {addr}: {source} (another process on that port? set --addr/--ops-addr)")]
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
    pub currency: Currency,
}

/// The ISO 4217 code of the shop's prices, which the dashboard shows money in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Currency(pub String);

impl Currency {
    /// Three ASCII capital letters, such as `EUR`.
    pub fn parse(raw: &str) -> Option<Self> {
        (raw.len() == 3 && raw.bytes().all(|b| b.is_ascii_uppercase())).then(|| Self(raw.to_owned()))
    }
}

impl Default for Currency {
    fn default() -> Self {
        Self("USD".into())
    }
}

impl FromRef<AppState> for Currency {
    fn from_ref(state: &AppState) -> Currency {
        state.currency.clone()
    }
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
    let answer = state.recommender.recommend(&user, k).await.map_err(|e| {
        tracing::warn!(error = %e, "recommendation failed");
        ApiError::unavailable("recommendations are unavailable, try again")
    })?;
    Ok(Json(answer))
}

/// The credentials a request carries: a bearer key, a session cookie.
fn credentials(headers: &HeaderMap) -> (Option<&str>, Option<&str>) {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let session = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(SESSION_COOKIE)?.strip_prefix('='));
    (bearer, session)
}

fn refused(refusal: Refusal) -> Response {
    let (status, message) = match refusal {
        Refusal::Missing => {
            (StatusCode::UNAUTHORIZED, "an API key is required: Authorization: Bearer <key>".to_string())
        }
        Refusal::Invalid => (StatusCode::UNAUTHORIZED, "the API key or session is not valid".to_string()),
        Refusal::Scope { has, needs } => (
            StatusCode::FORBIDDEN,
            format!("this key's scope is {}; this resource needs {}", has.as_str(), needs.as_str()),
        ),
        Refusal::RateLimited => {
            (StatusCode::TOO_MANY_REQUESTS, "too many requests for this key; slow down".to_string())
        }
        Refusal::Unavailable => {
            (StatusCode::SERVICE_UNAVAILABLE, "keys cannot be checked right now, try again".to_string())
        }
    };
    let mut response = ApiError { status, message }.into_response();
    match status {
        StatusCode::UNAUTHORIZED => {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        StatusCode::TOO_MANY_REQUESTS => {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        _ => {}
    }
    response
}

/// Every `/api/*` request: a key (or a dashboard session) of the scope the
/// route needs, within the key's rate.
async fn require_key(State(keys): State<Keys>, request: Request, next: Next) -> Response {
    let needs = if request.uri().path().starts_with("/api/recommendations/") {
        Scope::Recommendations
    } else {
        Scope::Dashboard
    };
    let (bearer, session) = credentials(request.headers());
    match keys.authorize(bearer, session, needs).await {
        Ok(_) => next.run(request).await,
        Err(refusal) => refused(refusal),
    }
}

#[derive(Debug, Deserialize)]
struct SignIn {
    key: String,
}

fn session_cookie(value: &str, max_age: u64) -> HeaderValue {
    let cookie = format!("{SESSION_COOKIE}={value}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={max_age}");
    HeaderValue::from_str(&cookie).unwrap_or_else(|_| HeaderValue::from_static("invalid=1"))
}

/// `POST /session` (form field `key`): a dashboard key buys a session cookie.
async fn sign_in(
    State(keys): State<Keys>,
    form: Result<Form<SignIn>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Ok(Form(SignIn { key })) = form else { return refused(Refusal::Missing) };
    match keys.check_key(key.trim()).await {
        Ok((id, Scope::Dashboard)) => {
            let value = keys.session_for(id, chrono::Utc::now().timestamp());
            let mut response = StatusCode::NO_CONTENT.into_response();
            response.headers_mut().insert(header::SET_COOKIE, session_cookie(&value, SESSION_TTL.as_secs()));
            response
        }
        Ok((_, has)) => refused(Refusal::Scope { has, needs: Scope::Dashboard }),
        Err(refusal) => refused(refusal),
    }
}

/// `DELETE /session`: signs out.
async fn sign_out() -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(header::SET_COOKIE, session_cookie("", 0));
    response
}

/// CORS: closed unless origins are configured; then those origins may call
/// the API with a key (preflight answered here, before authentication).
async fn cors(State(origins): State<std::sync::Arc<Vec<String>>>, request: Request, next: Next) -> Response {
    let origin = request.headers().get(header::ORIGIN).and_then(|o| o.to_str().ok()).map(str::to_owned);
    let allowed = origin.filter(|o| origins.iter().any(|a| a == o));
    if request.method() == Method::OPTIONS && allowed.is_some() {
        let mut response = StatusCode::NO_CONTENT.into_response();
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET"));
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("authorization"));
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
        allow_origin(h, allowed.as_deref());
        return response;
    }
    let mut response = next.run(request).await;
    allow_origin(response.headers_mut(), allowed.as_deref());
    response
}

fn allow_origin(headers: &mut HeaderMap, origin: Option<&str>) {
    if let Some(value) = origin.and_then(|o| HeaderValue::from_str(o).ok()) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
        headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError { status: StatusCode::NOT_FOUND, message: format!("no such resource: {}", uri.path()) }
}

/// The application: the API behind keys, the page and its sign-in. The
/// ops routes are served apart ([`platform::ops_http::router`]).
pub fn router(state: AppState, keys: Keys, cors_origins: Vec<String>) -> Router {
    let api = Router::new()
        .route("/api/recommendations/{user_id}", get(recommendations))
        .route("/api/demand/hourly", get(dashboard::demand_hourly))
        .route("/api/spikes", get(dashboard::spikes))
        .route("/api/popular", get(dashboard::popular))
        .route("/api/freshness", get(dashboard::freshness))
        .route("/api/meta", get(dashboard::meta))
        .route("/api/products", get(dashboard::search_products))
        .route("/api/products/{product_id}", get(dashboard::product_page))
        .route("/api/spikes/history", get(dashboard::spike_history))
        .route_layer(axum::middleware::from_fn_with_state(keys.clone(), require_key))
        .with_state(state);
    let page = Router::new()
        .route("/", get(dashboard::index))
        .route("/assets/dashboard.js", get(dashboard::script))
        .route("/assets/dashboard.css", get(dashboard::stylesheet))
        .route("/session", post(sign_in).delete(sign_out))
        .with_state(keys);
    api.merge(page)
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(std::sync::Arc::new(cors_origins), cors))
        .layer(axum::middleware::from_fn(telemetry::track))
}

/// A started server.
#[derive(Debug)]
pub struct Running {
    /// The bound address (port 0 in the config picks a free one).
    pub addr: SocketAddr,
    /// Where `/metrics`, `/healthz` and `/readyz` answer.
    pub ops_addr: SocketAddr,
    pub task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

/// Checks the schema under both roles, binds, starts the popular-list refresher and
/// serves until `shutdown`.
pub async fn start(config: ServeConfig, shutdown: CancellationToken) -> Result<Running, ServeError> {
    let metrics = telemetry::install();
    {
        // Each database once (by default both pools read the same one).
        let urls = std::collections::BTreeSet::from([&config.recommender_url, &config.dashboard_url]);
        for url in urls {
            let pool = platform::db::connect(url, 1, Duration::from_secs(30)).await?;
            platform::db::check(&pool).await?;
            pool.close().await;
        }
    }
    let options = |url: &str| {
        PgConnectOptions::from_str(url).map_err(|source| ServeError::Url { url: platform::db::redact(url), source })
    };
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
            options(&config.recommender_url)?
                .options([("statement_timeout", "2s"), ("plan_cache_mode", "force_generic_plan")]),
        );
    let dashboard_pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        // No JIT: the dashboard's queries are bounded by their hours, and
        // compiling their expressions (chosen past a cost that a few weeks
        // of history reach) took up to a second, many times the query.
        .connect_lazy_with(options(&config.dashboard_url)?.options([("statement_timeout", "10s"), ("jit", "off")]));

    let popular = PopularCache::new();
    let ready = Readiness::default();
    let recommender = Recommender::new(recommender_pool.clone(), popular.clone(), config.budget);
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
    tokio::spawn(crate::models::export_status(recommender_pool.clone(), shutdown.clone()));
    let keys = Keys::new(dashboard_pool.clone(), config.rate_limit, config.session_secret.as_deref());
    if config.session_secret.is_none() {
        tracing::info!("no SERVING_SESSION_SECRET: dashboard sessions end when this process does");
    }
    let state = AppState { recommender, dashboard: dashboard_pool, currency: config.currency.clone() };
    let bind = |addr: SocketAddr| async move {
        tokio::net::TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr, source })
    };
    let ops_listener = bind(config.ops_addr).await?;
    let ops_addr = ops_listener.local_addr().map_err(ServeError::Serve)?;
    let listener = bind(config.addr).await?;
    let addr = listener.local_addr().map_err(ServeError::Serve)?;
    tracing::info!(%addr, %ops_addr, budget = ?config.budget, "serving");
    let ops = platform::ops_http::router(metrics, ready);
    let ops_shutdown = shutdown.clone();
    tokio::spawn(async move {
        if let Err(e) = axum::serve(ops_listener, ops).with_graceful_shutdown(ops_shutdown.cancelled_owned()).await {
            tracing::error!(error = %e, "ops endpoint stopped");
        }
    });
    let app = router(state, keys, config.cors_origins);
    let task = tokio::spawn(async move {
        axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await.map_err(ServeError::Serve)
    });
    Ok(Running { addr, ops_addr, task })
}

/// [`start`], then wait until the server stopped.
pub async fn run(config: ServeConfig, shutdown: CancellationToken) -> Result<(), ServeError> {
    let running = start(config, shutdown).await?;
    match running.task.await {
        Ok(result) => result,
        Err(join) => Err(ServeError::Serve(std::io::Error::other(join))),
    }
}
