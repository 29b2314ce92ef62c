//! What the serving-layer tests share: known contents for the `serving.*`
//! relations the API reads, and a minimal HTTP client.
//!
//! Data is written where the pipeline would put it (`batch.*` tables
//! behind the generated `serving.*` views). Relations of the serving
//! contract that no migration creates yet are stood in for by tables with
//! exactly the contract's columns and grants ([`stand_in_relations`]); each
//! disappears from here once the pipeline creates it.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, PgPool};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Stand-ins: (relation, columns, readers). Created only when the relation
/// does not exist.
const STAND_INS: &[(&str, &str, &str)] = &[
    (
        "serving.category_demand_hourly",
        "hour timestamptz NOT NULL, category text NOT NULL, views bigint, cart_adds bigint, cart_removes bigint,
         purchases bigint, units bigint, revenue_cents bigint, PRIMARY KEY (hour, category)",
        "dashboard_reader",
    ),
    (
        "serving.products",
        "product_id text PRIMARY KEY, name text, category text, price_cents bigint",
        "dashboard_reader, recommender_reader",
    ),
    (
        "serving.popular_products",
        "rank bigint NOT NULL, product_id text NOT NULL, score double precision NOT NULL",
        "dashboard_reader, recommender_reader",
    ),
    (
        "serving.item_similarity",
        "product_id text NOT NULL, similar_product_id text NOT NULL, score double precision NOT NULL,
         rank bigint NOT NULL, PRIMARY KEY (product_id, similar_product_id)",
        "recommender_reader",
    ),
    (
        "serving.demand_spikes",
        "product_id text NOT NULL, category text, spike_start timestamptz NOT NULL, latest_hour timestamptz NOT NULL,
         current_demand double precision NOT NULL, baseline_demand double precision NOT NULL,
         score double precision NOT NULL",
        "dashboard_reader",
    ),
    (
        "serving.freshness",
        "layer text PRIMARY KEY, last_event_time timestamptz, last_offset bigint, lag_records bigint,
         last_update timestamptz",
        "dashboard_reader",
    ),
];

/// Creates the serving relations of the contract that the migrations do
/// not create (yet), as plain tables. Run after `platform::db::prepare`.
pub async fn stand_in_relations(pool: &PgPool) -> anyhow::Result<()> {
    for (relation, columns, readers) in STAND_INS {
        let exists: bool =
            sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL").bind(relation).fetch_one(pool).await?;
        if !exists {
            sqlx::raw_sql(AssertSqlSafe(format!(
                "CREATE TABLE {relation} ({columns}); GRANT SELECT ON {relation} TO {readers};"
            )))
            .execute(pool)
            .await
            .with_context(|| format!("creating stand-in {relation}"))?;
        }
    }
    Ok(())
}

/// A catalog entry.
#[derive(Debug, Clone)]
pub struct Product {
    pub id: String,
    pub name: String,
    pub category: String,
}

pub async fn insert_products(pool: &PgPool, products: &[Product]) -> anyhow::Result<()> {
    for p in products {
        sqlx::query("INSERT INTO serving.products (product_id, name, category, price_cents) VALUES ($1, $2, $3, 999)")
            .bind(&p.id)
            .bind(&p.name)
            .bind(&p.category)
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// The popular list: `ids[0]` is rank 1; scores fall with the rank.
pub async fn insert_popular(pool: &PgPool, ids: &[&str]) -> anyhow::Result<()> {
    for (i, id) in ids.iter().enumerate() {
        sqlx::query("INSERT INTO serving.popular_products (rank, product_id, score) VALUES ($1, $2, $3)")
            .bind(i as i64 + 1)
            .bind(id)
            .bind(1000.0 - i as f64)
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// Similarity pairs `(product, similar product, score)`; ranks follow the
/// score per product.
pub async fn insert_similarity(pool: &PgPool, pairs: &[(&str, &str, f64)]) -> anyhow::Result<()> {
    for (p, q, score) in pairs {
        sqlx::query(
            "INSERT INTO serving.item_similarity (product_id, similar_product_id, score, rank) VALUES ($1, $2, $3, 0)",
        )
        .bind(p)
        .bind(q)
        .bind(score)
        .execute(pool)
        .await?;
    }
    sqlx::query(
        "UPDATE serving.item_similarity AS s SET rank = r.rank
         FROM (SELECT product_id, similar_product_id,
                      row_number() OVER (PARTITION BY product_id ORDER BY score DESC, similar_product_id) AS rank
               FROM serving.item_similarity) AS r
         WHERE r.product_id = s.product_id AND r.similar_product_id = s.similar_product_id",
    )
    .execute(pool)
    .await?;
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

/// One hour of a category's demand: views, cart adds, purchases (units =
/// purchases, revenue 999 cents per unit, no removals).
pub async fn insert_category_demand(
    pool: &PgPool,
    hour: DateTime<Utc>,
    category: &str,
    views: i64,
    cart_adds: i64,
    purchases: i64,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO serving.category_demand_hourly
         (hour, category, views, cart_adds, cart_removes, purchases, units, revenue_cents)
         VALUES ($1, $2, $3, $4, 0, $5, $5, $5 * 999)",
    )
    .bind(hour)
    .bind(category)
    .bind(views)
    .bind(cart_adds)
    .bind(purchases)
    .execute(pool)
    .await?;
    Ok(())
}

/// One hour of a product's demand, into `batch.product_demand_hourly`.
pub async fn insert_product_demand(
    pool: &PgPool,
    hour: DateTime<Utc>,
    product: &str,
    views: i64,
    purchases: i64,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO batch.product_demand_hourly
         (hour, product_id, views, cart_adds, cart_removes, purchases, units, revenue_cents)
         VALUES ($1, $2, $3, 0, 0, $4, $4, $4 * 999)",
    )
    .bind(hour)
    .bind(product)
    .bind(views)
    .bind(purchases)
    .execute(pool)
    .await?;
    Ok(())
}

/// An active spike, as `serving.demand_spikes` holds it.
#[derive(Debug, Clone)]
pub struct Spike {
    pub product_id: String,
    pub category: String,
    pub start: DateTime<Utc>,
    pub latest: DateTime<Utc>,
    pub current: f64,
    pub baseline: f64,
    pub score: f64,
}

pub async fn insert_spike(pool: &PgPool, s: &Spike) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO serving.demand_spikes
         (product_id, category, spike_start, latest_hour, current_demand, baseline_demand, score)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&s.product_id)
    .bind(&s.category)
    .bind(s.start)
    .bind(s.latest)
    .bind(s.current)
    .bind(s.baseline)
    .bind(s.score)
    .execute(pool)
    .await?;
    Ok(())
}

/// A layer's freshness row.
pub async fn insert_freshness(
    pool: &PgPool,
    layer: &str,
    last_event_time: DateTime<Utc>,
    last_update: DateTime<Utc>,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO serving.freshness (layer, last_event_time, last_offset, lag_records, last_update)
         VALUES ($1, $2, 1000, 0, $3)",
    )
    .bind(layer)
    .bind(last_event_time)
    .bind(last_update)
    .execute(pool)
    .await?;
    Ok(())
}

/// An HTTP answer: status and body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// `GET path` over HTTP/1.1 with `Connection: close`. `path` goes on the
/// wire as given (it may hold bytes a URL library would refuse to send).
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<Answer> {
    let mut stream = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await.context("read timed out")??;
    let text = String::from_utf8(raw).context("answer is not UTF-8")?;
    let Some((head, body)) = text.split_once("\r\n\r\n") else { bail!("no header end in {text:?}") };
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).context("status line")?;
    let mut content_type = None;
    for line in lines {
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        if name.eq_ignore_ascii_case("transfer-encoding") && value.trim().eq_ignore_ascii_case("chunked") {
            bail!("chunked answers are not decoded here");
        }
        if name.eq_ignore_ascii_case("content-type") {
            content_type = Some(value.trim().to_owned());
        }
    }
    Ok(Answer { status, content_type, body: body.to_owned() })
}

/// What [`seed_dashboard`] wrote, for the assertions.
#[derive(Debug, Clone)]
pub struct DashboardData {
    /// The current hour; demand covers it and the five before.
    pub hour: DateTime<Utc>,
    pub categories: Vec<&'static str>,
    pub products: Vec<Product>,
    /// Spiking products, strongest first.
    pub spikes: Vec<Spike>,
    /// Popular product ids, rank 1 first.
    pub popular: Vec<&'static str>,
}

/// A small shop for the dashboard: three categories with six hours of
/// demand (views = 10·category index + hours ago), five products, two
/// spikes, a popular list, and both layers fresh.
pub async fn seed_dashboard(pool: &PgPool) -> anyhow::Result<DashboardData> {
    use chrono::{DurationRound, TimeDelta};
    let now = Utc::now();
    let hour = now.duration_trunc(TimeDelta::hours(1))?;
    let categories = vec!["Books", "Garden & Outdoor", "Toys"];
    for (c, category) in categories.iter().enumerate() {
        for ago in 0..6 {
            let views = 10 * (c as i64 + 1) + ago;
            insert_category_demand(pool, hour - TimeDelta::hours(ago), category, views, views / 2, views / 5).await?;
        }
    }
    let products: Vec<Product> = [
        ("p-1", "Rust in Action", "Books"),
        ("p-2", "Garden hose <20 m>", "Garden & Outdoor"),
        ("p-3", "Wooden train", "Toys"),
        ("p-4", "Kite", "Toys"),
        ("p-5", "Seed mix", "Garden & Outdoor"),
    ]
    .into_iter()
    .map(|(id, name, category)| Product { id: id.into(), name: name.into(), category: category.into() })
    .collect();
    insert_products(pool, &products).await?;
    for ago in 0..3 {
        insert_product_demand(pool, hour - TimeDelta::hours(ago), "p-1", 100 + ago, 7 + ago).await?;
    }
    let spikes = vec![
        Spike {
            product_id: "p-3".into(),
            category: "Toys".into(),
            start: hour - TimeDelta::hours(4),
            latest: hour,
            current: 120.0,
            baseline: 12.5,
            score: 8.5,
        },
        Spike {
            product_id: "p-5".into(),
            category: "Garden & Outdoor".into(),
            start: hour - TimeDelta::hours(2),
            latest: hour,
            current: 40.0,
            baseline: 9.0,
            score: 4.25,
        },
    ];
    for s in &spikes {
        insert_spike(pool, s).await?;
    }
    let popular = vec!["p-3", "p-1", "p-2", "p-5"];
    insert_popular(pool, &popular).await?;
    insert_freshness(pool, "speed", now - TimeDelta::seconds(2), now - TimeDelta::seconds(1)).await?;
    insert_freshness(pool, "batch", hour - TimeDelta::hours(1), now - TimeDelta::minutes(20)).await?;
    Ok(DashboardData { hour, categories, products, spikes, popular })
}
