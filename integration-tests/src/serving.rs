//! What the serving-layer tests share: known contents for the `serving.*`
//! relations the API reads, and a minimal HTTP client.
//!
//! Data is written where the pipeline puts it: `batch.*` tables behind the
//! generated `serving.*` views, and the `ops.*` rows that freshness is
//! computed from. Everything derived (category demand, popularity, spikes)
//! is then computed by the real views; each writer of a relation the
//! batch's rollups read refills them, as a publish would.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use sqlx::{AssertSqlSafe, PgPool};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The current hour, UTC: the newest hour of the seeded demand.
pub fn current_hour() -> DateTime<Utc> {
    let now = Utc::now();
    now.duration_trunc(TimeDelta::hours(1)).unwrap_or(now)
}

/// A catalog entry.
#[derive(Debug, Clone)]
pub struct Product {
    pub id: String,
    pub name: String,
    pub category: String,
}

/// Into `batch.products`, the catalog copy behind `serving.products`.
pub async fn insert_products(pool: &PgPool, products: &[Product]) -> anyhow::Result<()> {
    for p in products {
        sqlx::query("INSERT INTO batch.products (product_id, name, category, price_cents) VALUES ($1, $2, $3, 999)")
            .bind(&p.id)
            .bind(&p.name)
            .bind(&p.category)
            .execute(pool)
            .await?;
    }
    // As a publish would: the rollups follow what the batch holds.
    platform::db::refill_rollups(pool).await?;
    Ok(())
}

/// One hour of a product's demand, added into `batch.product_demand_hourly`
/// (units = purchases, 999 cents each).
pub async fn insert_product_demand(
    pool: &PgPool,
    hour: DateTime<Utc>,
    product: &str,
    views: i64,
    cart_adds: i64,
    purchases: i64,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO batch.product_demand_hourly
         (hour, product_id, views, cart_adds, cart_removes, purchases, units, revenue_cents)
         VALUES ($1, $2, $3, $4, 0, $5, $5, $5 * 999)
         ON CONFLICT (hour, product_id) DO UPDATE SET
             views = batch.product_demand_hourly.views + EXCLUDED.views,
             cart_adds = batch.product_demand_hourly.cart_adds + EXCLUDED.cart_adds,
             purchases = batch.product_demand_hourly.purchases + EXCLUDED.purchases,
             units = batch.product_demand_hourly.units + EXCLUDED.units,
             revenue_cents = batch.product_demand_hourly.revenue_cents + EXCLUDED.revenue_cents",
    )
    .bind(hour)
    .bind(product)
    .bind(views)
    .bind(cart_adds)
    .bind(purchases)
    .execute(pool)
    .await?;
    platform::db::refill_rollups(pool).await?;
    Ok(())
}

/// Makes `ids` the popular list, `ids[0]` first: views in the current
/// hour, 1000 for the first and one less for each next, so (with no other
/// demand) `serving.popular_products` scores them exactly 1000, 999, ...
pub async fn insert_popular(pool: &PgPool, ids: &[&str]) -> anyhow::Result<()> {
    let hour = current_hour();
    for (i, id) in ids.iter().enumerate() {
        insert_product_demand(pool, hour, id, 1000 - i as i64, 0, 0).await?;
    }
    Ok(())
}

/// Similarity pairs `(product, similar product, score)` into
/// `batch.item_similarity`; ranks follow the score per product.
pub async fn insert_similarity(pool: &PgPool, pairs: &[(&str, &str, f64)]) -> anyhow::Result<()> {
    for (p, q, score) in pairs {
        let rank =
            1 + pairs.iter().filter(|(p2, q2, s2)| p2 == p && (*s2 > *score || (*s2 == *score && q2 < q))).count();
        sqlx::query(
            "INSERT INTO batch.item_similarity (product_id, similar_product_id, score, rank) VALUES ($1, $2, $3, $4)",
        )
        .bind(p)
        .bind(q)
        .bind(score)
        .bind(rank as i64)
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// What a user did to a product, for `batch.user_product_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Did {
    Viewed,
    Carted,
    Removed,
    Purchased,
}

/// Records that `user` did `what` to `product` at `at` (folded in with the
/// view's max rule, as the batch layer does).
pub async fn record(pool: &PgPool, user: &str, product: &str, what: Did, at: DateTime<Utc>) -> anyhow::Result<()> {
    let column = match what {
        Did::Viewed => "last_viewed_at",
        Did::Carted => "last_carted_at",
        Did::Removed => "last_removed_at",
        Did::Purchased => "last_purchased_at",
    };
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO batch.user_product_state (user_id, product_id, {column}) VALUES ($1, $2, $3)
         ON CONFLICT (user_id, product_id) DO UPDATE SET {column} = GREATEST(batch.user_product_state.{column}, EXCLUDED.{column})"
    )))
    .bind(user)
    .bind(product)
    .bind(at)
    .execute(pool)
    .await?;
    Ok(())
}

/// A product's normal share of each hour's demand, into
/// `batch.demand_baseline` (what spike detection compares against).
pub async fn insert_baseline(pool: &PgPool, product: &str, share: f64) -> anyhow::Result<()> {
    sqlx::query("INSERT INTO batch.demand_baseline (product_id, share, hours, demand, dispersion) VALUES ($1, $2, 336, 1000, 1.0)")
        .bind(product)
        .bind(share)
        .execute(pool)
        .await?;
    platform::db::refill_rollups(pool).await?;
    Ok(())
}

/// The `ops` rows `serving.freshness` reads: the speed layer consumed up to
/// `speed_event` and committed at `speed_update`; the last published batch
/// run finished at `batch_finished`, its newest hour `batch_hour`.
pub async fn insert_freshness(
    pool: &PgPool,
    speed_event: DateTime<Utc>,
    speed_update: DateTime<Utc>,
    batch_hour: DateTime<Utc>,
    batch_finished: DateTime<Utc>,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO ops.speed_offsets (kafka_partition, next_offset, last_event_time, updated_at, end_offset)
         VALUES (0, 1500, $1, $2, 1500)",
    )
    .bind(speed_event)
    .bind(speed_update)
    .execute(pool)
    .await?;
    sqlx::query("INSERT INTO ops.cut (kafka_partition, cut_offset) VALUES (0, 1000)").execute(pool).await?;
    sqlx::query(
        "INSERT INTO ops.batch_runs (started_at, finished_at, status, mode, newest_hour)
         VALUES ($1 - interval '1 minute', $1, 'published', 'full', $2)",
    )
    .bind(batch_finished)
    .bind(batch_hour)
    .execute(pool)
    .await?;
    Ok(())
}

/// The dashboard's products: (id, name, category, baseline share).
const DASHBOARD_PRODUCTS: &[(&str, &str, &str, f64)] = &[
    ("p-1", "Rust in Action", "Books", 0.4),
    ("p-2", "Garden hose <20 m>", "Garden & Outdoor", 0.3),
    ("p-3", "Wooden train", "Toys", 0.1),
    ("p-4", "Kite", "Toys", 0.1),
    ("p-5", "Seed mix", "Garden & Outdoor", 0.1),
];

/// Views of a dashboard product `ago` hours before the current hour (0..6):
/// normally its baseline share of 100 an hour; p-3 spikes to 100 for the
/// last four hours, p-5 to 80 for the last two.
pub fn dashboard_views(product: &str, ago: i64) -> i64 {
    match (product, ago) {
        ("p-3", 0..=3) => 100,
        ("p-5", 0..=1) => 80,
        _ => DASHBOARD_PRODUCTS.iter().find(|p| p.0 == product).map_or(0, |p| (p.3 * 100.0).round() as i64),
    }
}

/// What [`seed_dashboard`] wrote, for the assertions.
#[derive(Debug, Clone)]
pub struct DashboardData {
    /// The current hour; demand covers it and the five before.
    pub hour: DateTime<Utc>,
    /// Categories, sorted.
    pub categories: Vec<&'static str>,
    pub products: Vec<Product>,
    /// The spiking products, strongest first.
    pub spikes: Vec<&'static str>,
    /// `serving.popular_products` as seeded, rank 1 first.
    pub popular: Vec<String>,
}

/// A small shop for the dashboard: five products in three categories with
/// six hours of views ([`dashboard_views`]), their baseline shares, and both
/// layers fresh. Category demand, popularity and the two spikes (p-3 from
/// three hours ago, p-5 from one hour ago) follow from the real views.
pub async fn seed_dashboard(pool: &PgPool) -> anyhow::Result<DashboardData> {
    let hour = current_hour();
    let products: Vec<Product> = DASHBOARD_PRODUCTS
        .iter()
        .map(|(id, name, category, _)| Product { id: (*id).into(), name: (*name).into(), category: (*category).into() })
        .collect();
    insert_products(pool, &products).await?;
    for (id, _, _, share) in DASHBOARD_PRODUCTS {
        insert_baseline(pool, id, *share).await?;
        for ago in 0..6 {
            insert_product_demand(pool, hour - TimeDelta::hours(ago), id, dashboard_views(id, ago), 0, 0).await?;
        }
    }
    let now = Utc::now();
    insert_freshness(
        pool,
        now - TimeDelta::seconds(2),
        now - TimeDelta::seconds(1),
        hour,
        now - TimeDelta::minutes(20),
    )
    .await?;
    let popular: Vec<String> =
        sqlx::query_scalar("SELECT product_id FROM serving.popular_products ORDER BY rank").fetch_all(pool).await?;
    Ok(DashboardData {
        hour,
        categories: vec!["Books", "Garden & Outdoor", "Toys"],
        products,
        spikes: vec!["p-3", "p-5"],
        popular,
    })
}

/// An HTTP answer: status and body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: String,
    /// Every header, names in lower case.
    pub headers: Vec<(String, String)>,
}

impl Answer {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// API keys the tests' requests carry, per server: `(recommendations,
/// dashboard)`. [`get`] sends the one the path's scope needs.
static KEYS: std::sync::Mutex<BTreeMap<SocketAddr, (String, String)>> = std::sync::Mutex::new(BTreeMap::new());

/// Creates a key of each scope (as `serving-layer keys create` does) in the
/// database `pool` reaches, for the server at `addr`: [`get`] uses them.
pub async fn sign_requests(addr: SocketAddr, pool: &PgPool) -> anyhow::Result<()> {
    use serving_layer::auth::{Scope, create_key};
    let recommendations = create_key(pool, "tests", Scope::Recommendations).await?.key;
    let dashboard = create_key(pool, "tests", Scope::Dashboard).await?.key;
    use_keys(addr, recommendations, dashboard);
    Ok(())
}

/// Makes [`get`] send these keys to the server at `addr`.
pub fn use_keys(addr: SocketAddr, recommendations: String, dashboard: String) {
    KEYS.lock().unwrap_or_else(|p| p.into_inner()).insert(addr, (recommendations, dashboard));
}

/// The key [`sign_requests`] made for `addr` and `path`'s scope, if any.
pub fn key_for(addr: SocketAddr, path: &str) -> Option<String> {
    let keys = KEYS.lock().unwrap_or_else(|p| p.into_inner());
    let (recommendations, dashboard) = keys.get(&addr)?;
    if path.starts_with("/api/recommendations/") {
        Some(recommendations.clone())
    } else if path.starts_with("/api/") {
        Some(dashboard.clone())
    } else {
        None
    }
}

/// `GET path` over HTTP/1.1 with `Connection: close`, with the key
/// [`sign_requests`] registered for `addr` (if any). `path` goes on the
/// wire as given (it may hold bytes a URL library would refuse to send).
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<Answer> {
    let headers: Vec<(String, String)> =
        key_for(addr, path).map(|k| ("Authorization".to_string(), format!("Bearer {k}"))).into_iter().collect();
    request(addr, "GET", path, &headers, "").await
}

/// One HTTP/1.1 request with `headers` and `body`, `Connection: close`.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &str,
) -> anyhow::Result<Answer> {
    let mut stream = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await.context("read timed out")??;
    let text = String::from_utf8(raw).context("answer is not UTF-8")?;
    let Some((head, body)) = text.split_once("\r\n\r\n") else { bail!("no header end in {text:?}") };
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).context("status line")?;
    let mut content_type = None;
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        if name.eq_ignore_ascii_case("transfer-encoding") && value.trim().eq_ignore_ascii_case("chunked") {
            bail!("chunked answers are not decoded here");
        }
        if name.eq_ignore_ascii_case("content-type") {
            content_type = Some(value.trim().to_owned());
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
    }
    Ok(Answer { status, content_type, body: body.to_owned(), headers })
}

/// A `serving-layer serve` process: killed when dropped.
pub struct ServedBinary {
    pub addr: SocketAddr,
    pub ops_addr: SocketAddr,
    pub child: tokio::process::Child,
}

/// Starts the `serving-layer serve` binary on free ports against
/// `database_url`, with keys of both scopes for [`get`], and waits until it
/// is ready.
pub async fn serve_binary(database_url: &str) -> ServedBinary {
    serve_binary_with(database_url, &[]).await
}

/// [`serve_binary`] with more arguments (`--currency EUR`, the reader
/// roles' URLs); `database_url` is the owner's, which creates the keys.
pub async fn serve_binary_with(database_url: &str, args: &[&str]) -> ServedBinary {
    let port = || SocketAddr::from(([127, 0, 0, 1], crate::fixture::free_port().expect("a free port")));
    let (addr, ops_addr) = (port(), port());
    let child = tokio::process::Command::new(crate::fixture::binary("serving-layer"))
        .args(["serve", "--addr", &addr.to_string(), "--ops-addr", &ops_addr.to_string()])
        .args(args)
        .env("DATABASE_URL", database_url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("starting serving-layer serve");
    let pool = PgPool::connect(database_url).await.expect("connecting to create keys");
    sign_requests(addr, &pool).await.expect("creating keys");
    pool.close().await;
    wait_ready(ops_addr).await;
    ServedBinary { addr, ops_addr, child }
}

/// Waits until the ops endpoint at `addr` answers `/readyz` with 200 (30 s at most).
pub async fn wait_ready(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !get(addr, "/readyz").await.is_ok_and(|a| a.status == 200) {
        assert!(tokio::time::Instant::now() < deadline, "the server at {addr} did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes a model output file (`serving-layer import-recommendations`'s
/// input) to `path`: (user, product, score, rank) rows; the `rank` column
/// only when every row has one.
pub fn write_model_file(path: &std::path::Path, rows: &[(&str, &str, f64, Option<i64>)]) -> anyhow::Result<()> {
    use std::sync::Arc;

    use datafusion::arrow::array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
    use datafusion::parquet::arrow::ArrowWriter;
    let mut columns: Vec<(&str, ArrayRef)> = vec![
        ("user_id", Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0)))),
        ("product_id", Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1)))),
        ("score", Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.2)))),
    ];
    let ranks: Option<Vec<i64>> = rows.iter().map(|r| r.3).collect();
    if let Some(ranks) = ranks {
        columns.push(("rank", Arc::new(Int64Array::from(ranks))));
    }
    let batch = RecordBatch::try_from_iter(columns)?;
    let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut writer = ArrowWriter::try_new(file, batch.schema(), None)?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(())
}
