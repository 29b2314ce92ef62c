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
    let (from, to) = range(q.from.as_deref(), q.to.as_deref())?;
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

/// What the page needs to know about the deployment.
#[derive(Debug, Serialize)]
pub struct Meta {
    /// ISO 4217 code of the shop's prices (`--currency`).
    pub currency: String,
    /// Longest range one demand request may cover, in hours.
    pub max_range_hours: i64,
}

/// `GET /api/meta`: the shop's currency and the API's limits.
pub async fn meta(State(currency): State<crate::server::Currency>) -> Json<Meta> {
    Json(Meta { currency: currency.0, max_range_hours: MAX_RANGE_HOURS })
}

/// A product of the catalog.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Product {
    pub product_id: String,
    pub name: Option<String>,
    pub category: Option<String>,
    pub price_cents: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
pub struct SearchQuery {
    q: Option<String>,
    limit: Option<String>,
}

/// Longest search text.
const MAX_SEARCH_CHARS: usize = 100;

/// `GET /api/products?q=..&limit=`: catalog products whose id is `q`, or
/// whose name or id holds it (case-insensitive); the exact id first, then
/// by name.
pub async fn search_products(
    State(pool): State<PgPool>,
    query: Result<Query<SearchQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<Product>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let text = q.q.as_deref().map(str::trim).unwrap_or_default();
    if text.is_empty() || text.chars().count() > MAX_SEARCH_CHARS || text.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "q must be 1 to {MAX_SEARCH_CHARS} characters of a product's name or id"
        )));
    }
    let limit = parse_limit(q.limit.as_deref(), 20)?;
    let pattern = format!("%{}%", text.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_"));
    let rows = sqlx::query_as::<_, Product>(
        "SELECT product_id, name, category, price_cents FROM serving.products
         WHERE product_id = $1 OR name ILIKE $2 OR product_id ILIKE $2
         ORDER BY product_id = $1 DESC, name, product_id
         LIMIT $3",
    )
    .bind(text)
    .bind(pattern)
    .bind(limit)
    .fetch_all(&pool)
    .await
    .map_err(ApiError::database)?;
    Ok(Json(rows))
}

#[derive(Debug, Default, Deserialize)]
pub struct RangeQuery {
    from: Option<String>,
    to: Option<String>,
    category: Option<String>,
}

/// `[from, to)` of a query: the last 24 hours by default, at most
/// [`MAX_RANGE_HOURS`].
fn range(from: Option<&str>, to: Option<&str>) -> Result<(DateTime<Utc>, DateTime<Utc>), ApiError> {
    let to = match to {
        Some(raw) => parse_time("to", raw)?,
        None => Utc::now(),
    };
    let from = match from {
        Some(raw) => parse_time("from", raw)?,
        None => to - TimeDelta::hours(24),
    };
    if from >= to {
        return Err(ApiError::bad_request("from must be before to"));
    }
    if to - from > TimeDelta::hours(MAX_RANGE_HOURS) {
        return Err(ApiError::bad_request(format!("the range from..to may cover at most {MAX_RANGE_HOURS} hours")));
    }
    Ok((from, to))
}

/// One hour of one product: its demand measures, and what spike detection
/// made of it (absent before any baseline exists).
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct ProductHour {
    pub hour: DateTime<Utc>,
    pub views: i64,
    pub cart_adds: i64,
    pub purchases: i64,
    pub units: i64,
    pub revenue_cents: i64,
    /// Interest as spike detection counts it: views + cart adds + purchases.
    pub demand: i64,
    pub expected: Option<f64>,
    pub is_spike: Option<bool>,
    pub is_elevated: Option<bool>,
    /// What `expected` rests on: `product`, `category` or `shop`.
    pub basis: Option<String>,
}

/// A spike, from its first elevated hour to its latest, with its peak.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct SpikeEpisode {
    pub product_id: String,
    pub name: Option<String>,
    pub category: Option<String>,
    pub spike_start: DateTime<Utc>,
    pub latest_hour: DateTime<Utc>,
    /// Hours from the first to the latest elevated hour, both counted.
    pub duration_hours: i64,
    /// The highest hourly demand during the spike, and what was expected then.
    pub peak_demand: Option<f64>,
    pub peak_expected: Option<f64>,
    pub peak_score: f64,
    /// The stronger spike this one echoes (`null`: a spike of its own).
    pub driven_by: Option<String>,
}

/// The spikes overlapping `[$1, $2)`, of product `$3` or category `$4`
/// when given, newest first, with their peaks.
const SPIKE_HISTORY_SQL: &str = "
SELECT h.product_id, p.name, COALESCE(h.category, p.category) AS category, h.spike_start, h.latest_hour,
       (extract(epoch FROM h.latest_hour - h.spike_start) / 3600)::bigint + 1 AS duration_hours,
       peak.demand AS peak_demand, peak.expected AS peak_expected, h.peak_score, h.driven_by
FROM serving.demand_spike_history AS h
LEFT JOIN serving.products AS p ON p.product_id = h.product_id
LEFT JOIN LATERAL (
    SELECT x.demand, x.expected FROM serving.demand_spike_hours AS x
    WHERE x.product_id = h.product_id AND x.hour >= h.spike_start AND x.hour <= h.latest_hour
    ORDER BY x.demand DESC, x.hour LIMIT 1
) AS peak ON true
WHERE h.latest_hour >= $1 AND h.spike_start < $2
  AND ($3::text IS NULL OR h.product_id = $3)
  AND ($4::text IS NULL OR COALESCE(h.category, p.category) = $4)
ORDER BY h.spike_start DESC, h.product_id
LIMIT 500";

/// `GET /api/spikes/history?from=..&to=..&category=..`: every spike that
/// overlaps the range (echoes included, marked by `driven_by`), newest
/// first, at most 500.
pub async fn spike_history(
    State(pool): State<PgPool>,
    query: Result<Query<RangeQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<SpikeEpisode>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let (from, to) = range(q.from.as_deref(), q.to.as_deref())?;
    if let Some(c) = &q.category {
        check_category(c)?;
    }
    let rows = sqlx::query_as::<_, SpikeEpisode>(SPIKE_HISTORY_SQL)
        .bind(from)
        .bind(to)
        .bind(None::<String>)
        .bind(q.category.as_deref())
        .fetch_all(&pool)
        .await
        .map_err(ApiError::database)?;
    Ok(Json(rows))
}

/// The answer of `GET /api/products/{product_id}`.
#[derive(Debug, Serialize)]
pub struct ProductPage {
    /// The catalog entry; `null` for a product the catalog does not know.
    pub product: Option<Product>,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// Hours with demand, oldest first.
    pub hours: Vec<ProductHour>,
    /// Its spikes overlapping the range, newest first.
    pub spikes: Vec<SpikeEpisode>,
}

/// `GET /api/products/{product_id}?from=..&to=..`: one product's page: its
/// catalog entry, its hourly demand against the baseline's expectation, and
/// its spikes.
pub async fn product_page(
    State(pool): State<PgPool>,
    axum::extract::Path(product_id): axum::extract::Path<String>,
    query: Result<Query<RangeQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ProductPage>, ApiError> {
    crate::ids::check(&product_id).map_err(|e| ApiError::bad_request(format!("product_id {e}")))?;
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let (from, to) = range(q.from.as_deref(), q.to.as_deref())?;
    let product = sqlx::query_as::<_, Product>(
        "SELECT product_id, name, category, price_cents FROM serving.products WHERE product_id = $1",
    )
    .bind(&product_id)
    .fetch_optional(&pool)
    .await
    .map_err(ApiError::database)?;
    let hours = sqlx::query_as::<_, ProductHour>(
        "SELECT d.hour, d.views, d.cart_adds, d.purchases, d.units, d.revenue_cents,
                d.views + d.cart_adds + d.purchases AS demand,
                s.expected, s.is_spike, s.is_elevated, s.basis
         FROM serving.product_demand_hourly AS d
         LEFT JOIN serving.demand_spike_hours AS s
           ON s.product_id = d.product_id AND s.hour = d.hour AND s.hour >= $2 AND s.hour < $3
              AND s.product_id = $1
         WHERE d.product_id = $1 AND d.hour >= $2 AND d.hour < $3
         ORDER BY d.hour",
    )
    .bind(&product_id)
    .bind(from)
    .bind(to)
    .fetch_all(&pool)
    .await
    .map_err(ApiError::database)?;
    let spikes = sqlx::query_as::<_, SpikeEpisode>(SPIKE_HISTORY_SQL)
        .bind(from)
        .bind(to)
        .bind(&product_id)
        .bind(None::<String>)
        .fetch_all(&pool)
        .await
        .map_err(ApiError::database)?;
    Ok(Json(ProductPage { product, from, to, hours, spikes }))
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
