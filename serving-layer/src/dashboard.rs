//! What the marketing dashboard reads: hourly demand, live spikes, top
//! products and per-layer freshness as JSON, and the page at `/` that draws
//! them (plain HTML, CSS and JavaScript compiled into the binary: the
//! machines it runs on have no internet, so there is no CDN to load from).
//!
//! Every query reads only the aggregate `serving.*` relations that the
//! `dashboard_reader` role may read; nothing here touches user-level data.

use axum::Json;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use chrono::{DateTime, Duration as TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::server::ApiError;

/// Longest time range one demand request may cover.
pub const MAX_RANGE_HOURS: i64 = 24 * 31;
/// Largest `limit` of `/api/popular` and `/api/spikes`.
pub const MAX_LIMIT: i64 = 1_000;

/// A layer is fresh while its last update is at most this old: the speed
/// layer flushes within a second, so a minute of silence means it stalled.
const SPEED_FRESH_SECONDS: f64 = 60.0;
/// Batch runs are hourly; two hours without one means a run was missed.
const BATCH_FRESH_SECONDS: f64 = 2.0 * 3600.0;

pub const INDEX_HTML: &str = include_str!("../assets/index.html");
pub const DASHBOARD_JS: &str = include_str!("../assets/dashboard.js");
pub const DASHBOARD_CSS: &str = include_str!("../assets/dashboard.css");

pub async fn index() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], INDEX_HTML)
}

pub async fn script() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], DASHBOARD_JS)
}

pub async fn stylesheet() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], DASHBOARD_CSS)
}

/// Query of `/api/demand/hourly`. All fields arrive as text so that a bad
/// value gets this module's message, not a generic deserialisation error.
#[derive(Debug, Default, Deserialize)]
pub struct DemandQuery {
    product_id: Option<String>,
    category: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

/// One hour of demand for one product or one category.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct DemandRow {
    pub hour: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub product_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    pub views: i64,
    pub cart_adds: i64,
    pub cart_removes: i64,
    pub purchases: i64,
    pub units: i64,
    pub revenue_cents: i64,
}

#[derive(Debug, Serialize)]
pub struct DemandAnswer {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub rows: Vec<DemandRow>,
}

fn parse_time(name: &str, raw: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(raw).map(|t| t.with_timezone(&Utc)).map_err(|_| {
        let shown: String = raw.chars().take(40).collect();
        ApiError::bad_request(format!("{name} must be an RFC 3339 time such as 2026-11-24T13:00:00Z, got {shown:?}"))
    })
}

/// `GET /api/demand/hourly?product_id=..|category=..&from=..&to=..`:
/// hourly demand of one product or one category, or of every category
/// when neither is given, for hours in `[from, to)` (default: the last 24
/// hours), oldest first.
pub async fn demand_hourly(
    State(pool): State<PgPool>,
    query: Result<Query<DemandQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<DemandAnswer>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let to = match &q.to {
        Some(raw) => parse_time("to", raw)?,
        None => Utc::now(),
    };
    let from = match &q.from {
        Some(raw) => parse_time("from", raw)?,
        None => to - TimeDelta::hours(24),
    };
    if from >= to {
        return Err(ApiError::bad_request("from must be before to"));
    }
    if to - from > TimeDelta::hours(MAX_RANGE_HOURS) {
        return Err(ApiError::bad_request(format!("the range from..to may cover at most {MAX_RANGE_HOURS} hours")));
    }
    let rows = match (&q.product_id, &q.category) {
        (Some(_), Some(_)) => return Err(ApiError::bad_request("give product_id or category, not both")),
        (Some(product), None) => {
            crate::ids::check(product).map_err(|e| ApiError::bad_request(format!("product_id {e}")))?;
            sqlx::query_as::<_, DemandRow>(
                "SELECT hour, product_id, NULL::text AS category,
                        views, cart_adds, cart_removes, purchases, units, revenue_cents
                 FROM serving.product_demand_hourly
                 WHERE product_id = $1 AND hour >= $2 AND hour < $3 ORDER BY hour",
            )
            .bind(product)
            .bind(from)
            .bind(to)
            .fetch_all(&pool)
            .await
        }
        (None, category) => {
            if let Some(c) = category {
                check_category(c)?;
            }
            sqlx::query_as::<_, DemandRow>(
                "SELECT hour, NULL::text AS product_id, category,
                        views, cart_adds, cart_removes, purchases, units, revenue_cents
                 FROM serving.category_demand_hourly
                 WHERE ($1::text IS NULL OR category = $1) AND hour >= $2 AND hour < $3
                 ORDER BY hour, category",
            )
            .bind(category)
            .bind(from)
            .bind(to)
            .fetch_all(&pool)
            .await
        }
    }
    .map_err(ApiError::database)?;
    Ok(Json(DemandAnswer { from, to, rows }))
}

/// Categories are catalog names ("Home & Garden"), held to the ids' rule.
fn check_category(c: &str) -> Result<(), ApiError> {
    crate::ids::check(c).map_err(|e| ApiError::bad_request(format!("category {e}")))
}

#[derive(Debug, Default, Deserialize)]
pub struct LimitQuery {
    limit: Option<String>,
}

fn parse_limit(raw: Option<&str>, default: i64) -> Result<i64, ApiError> {
    let Some(raw) = raw else { return Ok(default) };
    raw.parse::<i64>().ok().filter(|l| (1..=MAX_LIMIT).contains(l)).ok_or_else(|| {
        let shown: String = raw.chars().take(20).collect();
        ApiError::bad_request(format!("limit must be an integer from 1 to {MAX_LIMIT}, got {shown:?}"))
    })
}

/// Rows of `sql` (one `$1` bind: the limit), at most `?limit=` of them
/// (`default` without one): the shape of every listing endpoint.
async fn limited<T>(
    pool: &PgPool,
    query: Result<Query<LimitQuery>, axum::extract::rejection::QueryRejection>,
    default: i64,
    sql: &'static str,
) -> Result<Json<Vec<T>>, ApiError>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = parse_limit(q.limit.as_deref(), default)?;
    let rows = sqlx::query_as::<_, T>(sql).bind(limit).fetch_all(pool).await.map_err(ApiError::database)?;
    Ok(Json(rows))
}

/// A currently active demand spike.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Spike {
    pub product_id: String,
    pub name: Option<String>,
    pub category: Option<String>,
    pub spike_start: DateTime<Utc>,
    pub latest_hour: DateTime<Utc>,
    pub current_demand: f64,
    pub baseline_demand: f64,
    pub score: f64,
}

/// `GET /api/spikes?limit=`: active spikes, strongest first.
pub async fn spikes(
    State(pool): State<PgPool>,
    query: Result<Query<LimitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<Spike>>, ApiError> {
    limited(
        &pool,
        query,
        100,
        "SELECT s.product_id, p.name, COALESCE(s.category, p.category) AS category, s.spike_start,
                s.latest_hour, s.current_demand, s.baseline_demand, s.score
         FROM serving.demand_spikes AS s
         LEFT JOIN serving.products AS p ON p.product_id = s.product_id
         ORDER BY s.score DESC, s.product_id
         LIMIT $1",
    )
    .await
}

/// A product of the popular list, with its catalog entry.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct PopularProduct {
    pub rank: i64,
    pub product_id: String,
    pub name: Option<String>,
    pub category: Option<String>,
    pub score: f64,
}

/// `GET /api/popular?limit=`: the most popular products, rank 1 first.
pub async fn popular(
    State(pool): State<PgPool>,
    query: Result<Query<LimitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<PopularProduct>>, ApiError> {
    limited(
        &pool,
        query,
        10,
        "SELECT pp.rank, pp.product_id, p.name, p.category, pp.score
         FROM serving.popular_products AS pp
         LEFT JOIN serving.products AS p ON p.product_id = pp.product_id
         ORDER BY pp.rank, pp.product_id
         LIMIT $1",
    )
    .await
}

/// How current one layer is.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct LayerFreshness {
    pub layer: String,
    pub last_event_time: Option<DateTime<Utc>>,
    pub last_offset: Option<i64>,
    pub lag_records: Option<i64>,
    pub last_update: Option<DateTime<Utc>>,
    /// Seconds since `last_update`, by the database's clock.
    pub update_age_seconds: Option<f64>,
    /// `fresh`, `stale`, or `unknown` (never updated).
    #[sqlx(skip)]
    pub status: &'static str,
}

/// `GET /api/freshness`: one entry per layer (`batch`, `speed`), and when
/// the dashboard reads a hot standby, one for `replication`: its lag behind
/// the primary (0 when it has replayed all it received, else the time since
/// the last transaction it replayed) as `update_age_seconds`.
pub async fn freshness(State(pool): State<PgPool>) -> Result<Json<Vec<LayerFreshness>>, ApiError> {
    let mut rows = sqlx::query_as::<_, LayerFreshness>(
        "SELECT layer, last_event_time, last_offset, lag_records, last_update,
                extract(epoch FROM now() - last_update)::float8 AS update_age_seconds
         FROM serving.freshness ORDER BY layer",
    )
    .fetch_all(&pool)
    .await
    .map_err(ApiError::database)?;
    let replication = sqlx::query_as::<_, LayerFreshness>(
        "SELECT 'replication' AS layer, NULL::timestamptz AS last_event_time, NULL::bigint AS last_offset,
                NULL::bigint AS lag_records, pg_last_xact_replay_timestamp() AS last_update,
                CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0
                     ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8
                END AS update_age_seconds
         WHERE pg_is_in_recovery()",
    )
    .fetch_optional(&pool)
    .await
    .map_err(ApiError::database)?;
    rows.extend(replication);
    for row in &mut rows {
        row.status = status(&row.layer, row.update_age_seconds);
    }
    Ok(Json(rows))
}

fn status(layer: &str, age: Option<f64>) -> &'static str {
    let limit = if layer == "batch" { BATCH_FRESH_SECONDS } else { SPEED_FRESH_SECONDS };
    match age {
        None => "unknown",
        Some(a) if a <= limit => "fresh",
        Some(_) => "stale",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freshness_thresholds_depend_on_the_layer() {
        assert_eq!(status("speed", Some(5.0)), "fresh");
        assert_eq!(status("speed", Some(61.0)), "stale");
        assert_eq!(status("batch", Some(3000.0)), "fresh");
        assert_eq!(status("batch", Some(8000.0)), "stale");
        assert_eq!(status("batch", None), "unknown");
    }

    #[test]
    fn limits_are_bounded() {
        assert_eq!(parse_limit(None, 10).unwrap(), 10);
        assert_eq!(parse_limit(Some("1000"), 10).unwrap(), 1000);
        for bad in ["0", "1001", "x", "-3"] {
            assert!(parse_limit(Some(bad), 10).is_err(), "{bad}");
        }
    }
}
