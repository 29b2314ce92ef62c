//! Metrics of the serving layer (`serving_*`), and the middleware that
//! counts and times every request per route.
//!
//! Request latency is a Prometheus *histogram* (fixed buckets, aggregatable
//! across instances), not the exporter's default summary, so this crate
//! installs its own recorder; the ops routes of `platform` render it.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Requests by route and status code.
pub const REQUESTS: &str = "serving_requests_total";
/// Request latency by route.
pub const REQUEST_SECONDS: &str = "serving_request_seconds";
/// Recommendations answered, by source (`model`, `blended`, `personalized`,
/// `popular`): the share answered from the model is its coverage in use.
pub const RECOMMENDATIONS: &str = "serving_recommendations_total";
/// Popular fallbacks served, by reason.
pub const FALLBACKS: &str = "serving_fallbacks_total";
/// Seconds since the popular list was loaded.
pub const POPULAR_AGE: &str = "serving_popular_cache_age_seconds";
/// Products in the popular list.
pub const POPULAR_PRODUCTS: &str = "serving_popular_cache_products";
/// Failed reloads of the popular list.
pub const POPULAR_RELOAD_FAILURES: &str = "serving_popular_reload_failures_total";
/// Users the current model covered when it was imported (0: no model).
pub const MODEL_USERS: &str = "serving_model_users";
/// Seconds since the current model was imported.
pub const MODEL_AGE: &str = "serving_model_age_seconds";
/// Seconds the current model is still served; negative once it expired.
pub const MODEL_VALID: &str = "serving_model_valid_seconds";

/// Latency buckets: the recommender's budget is well under a second and
/// the goal is a p99 of a few milliseconds.
const BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// Installs the process's recorder (once) and returns its handle. If
/// another recorder was installed first (several layers in one test
/// process), metrics go there and this handle renders an empty page.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(REQUEST_SECONDS.to_owned()), BUCKETS)
                .expect("the bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Middleware: counts and times each request under its route template
/// (`/api/recommendations/{user_id}`, never the raw path, so the label set
/// stays bounded).
pub async fn track(request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", MatchedPath::as_str).to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::histogram!(REQUEST_SECONDS, "route" => route.clone()).record(started.elapsed().as_secs_f64());
    metrics::counter!(REQUESTS, "route" => route, "status" => status).increment(1);
    response
}

pub(crate) fn recommendation(source: &'static str) {
    metrics::counter!(RECOMMENDATIONS, "source" => source).increment(1);
}

pub(crate) fn fallback(reason: &'static str) {
    metrics::counter!(FALLBACKS, "reason" => reason).increment(1);
}

pub(crate) fn popular_age(age: Duration) {
    metrics::gauge!(POPULAR_AGE).set(age.as_secs_f64());
}

pub(crate) fn popular_products(n: usize) {
    metrics::gauge!(POPULAR_PRODUCTS).set(n as f64);
}

pub(crate) fn popular_reload_failed() {
    metrics::counter!(POPULAR_RELOAD_FAILURES).increment(1);
}

pub(crate) fn model_status(users: i64, age: Option<f64>, valid: Option<f64>) {
    metrics::gauge!(MODEL_USERS).set(users as f64);
    if let (Some(age), Some(valid)) = (age, valid) {
        metrics::gauge!(MODEL_AGE).set(age);
        metrics::gauge!(MODEL_VALID).set(valid);
    }
}
