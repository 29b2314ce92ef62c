//! The load generator: seeds the shop's catalog and streams its traffic to
//! Kafka, as history (`--backfill-hours`) and/or live (`--rate`,
//! `--duration`), with optional malformed records and a ground-truth file
//! of the injected demand spikes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use serde::Serialize;
use shared_schema::EventType;
use sqlx::Executor;

use crate::malformed;
use crate::shop::{Shop, ShopConfig, ShopEvent, Spike};

/// Generate realistic shop traffic into Kafka.
#[derive(Debug, Clone, Parser)]
#[command(name = "generate", version, about, long_about = None)]
pub struct Args {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = shared_schema::defaults::KAFKA_BROKERS)]
    pub brokers: String,
    /// Topic to produce to.
    #[arg(long, env = "EVENTS_TOPIC", default_value = shared_schema::defaults::EVENTS_TOPIC)]
    pub topic: String,
    /// The shop's database, whose `products` table is seeded with the catalog.
    #[arg(long, env = "SALES_DATABASE_URL", default_value = shared_schema::defaults::SALES_DATABASE_URL)]
    pub sales_database_url: String,
    /// Do not touch the shop database.
    #[arg(long)]
    pub no_catalog: bool,
    /// Random seed: the same seed gives the same shop and traffic.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long, default_value_t = 500)]
    pub products: usize,
    #[arg(long, default_value_t = 12)]
    pub categories: usize,
    #[arg(long, default_value_t = 10_000)]
    pub users: usize,
    /// History to generate, in hours before now, sent as fast as the broker takes it.
    #[arg(long, default_value_t = 0)]
    pub backfill_hours: u32,
    /// Average events per second: the live rate, and the traffic level of the history.
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// How long to send live traffic after the history (e.g. 90s, 10m, 1h); 0 for none.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Demand spikes to inject (default: one per 12 hours of history, at least one).
    #[arg(long)]
    pub spikes: Option<usize>,
    /// Start a spike right at the beginning of live traffic (for the demo).
    #[arg(long)]
    pub live_spike: bool,
    /// Fraction of extra malformed records mixed into the traffic (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    pub bad_fraction: f64,
    /// Fraction of events that arrive late: their event time lies 1 to 6
    /// hours before the traffic around them (a phone back online, a retried upload).
    #[arg(long, default_value_t = 0.0)]
    pub late_fraction: f64,
    /// Where the ground truth (spikes, counts) is written.
    #[arg(long, default_value = ".local/generator/truth.json")]
    pub truth: PathBuf,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// End the history at this time (RFC 3339) instead of now: the same
    /// seed then sends the same events, so measurements can be compared
    /// run to run. Not with --duration (live traffic happens now).
    #[arg(long)]
    pub history_end: Option<DateTime<Utc>>,
}

impl Args {
    /// A small shop for tests: history only, no catalog, no bad or late
    /// records; tests override what they need with struct-update syntax.
    pub fn for_tests(brokers: &str, topic: &str, seed: u64) -> Self {
        Self {
            brokers: brokers.to_string(),
            topic: topic.to_string(),
            sales_database_url: String::new(),
            no_catalog: true,
            seed,
            products: 60,
            categories: 6,
            users: 400,
            backfill_hours: 2,
            rate: 1.0,
            duration: Duration::ZERO,
            spikes: Some(1),
            live_spike: false,
            bad_fraction: 0.0,
            late_fraction: 0.0,
            truth: std::env::temp_dir().join(format!("truth-{topic}-{seed}-{}.json", std::process::id())),
            quiet: true,
            history_end: None,
        }
    }
}

/// What the generator sent: the ground truth for tests and quality metrics.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Truth {
    pub seed: u64,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub spikes: Vec<Spike>,
    pub events_sent: u64,
    pub bad_sent: u64,
    pub events_by_type: BTreeMap<String, u64>,
    pub bad_by_reason: BTreeMap<String, u64>,
    pub revenue_cents: i64,
    pub delivery_failures: u64,
    /// `product_demand_hourly` of everything sent, computed here
    /// independently of the platform's code: the exact answer.
    pub demand: Vec<DemandRow>,
}

/// One row of the expected `product_demand_hourly`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Demand {
    pub views: i64,
    pub cart_adds: i64,
    pub cart_removes: i64,
    pub purchases: i64,
    pub units: i64,
    pub revenue_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DemandRow {
    pub hour: DateTime<Utc>,
    pub product_id: String,
    #[serde(flatten)]
    pub demand: Demand,
}

impl Demand {
    pub fn add(&mut self, e: &ShopEvent) {
        match e.event_type {
            EventType::PageView => self.views += 1,
            EventType::AddToCart => self.cart_adds += 1,
            EventType::RemoveFromCart => self.cart_removes += 1,
            EventType::Purchase => {
                self.purchases += 1;
                self.units += i64::from(e.quantity.unwrap_or(0));
                self.revenue_cents += e.revenue_cents();
            }
        }
    }
}

impl std::ops::AddAssign for Demand {
    fn add_assign(&mut self, d: Demand) {
        self.views += d.views;
        self.cart_adds += d.cart_adds;
        self.cart_removes += d.cart_removes;
        self.purchases += d.purchases;
        self.units += d.units;
        self.revenue_cents += d.revenue_cents;
    }
}

impl Truth {
    /// The expected demand keyed by (hour, product).
    pub fn demand_map(&self) -> BTreeMap<(DateTime<Utc>, String), Demand> {
        self.demand.iter().map(|r| ((r.hour, r.product_id.clone()), r.demand)).collect()
    }
}

#[derive(Default)]
struct Delivery {
    ok: AtomicU64,
    failed: AtomicU64,
}

struct Context(Arc<Delivery>);

impl ClientContext for Context {}

impl ProducerContext for Context {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.0.ok.fetch_add(1, Ordering::Relaxed),
            Err((e, _)) => {
                tracing::warn!(error = %e, "delivery failed");
                self.0.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

struct Sender {
    producer: ThreadedProducer<Context>,
    delivery: Arc<Delivery>,
    topic: String,
    truth: Truth,
    demand: BTreeMap<(DateTime<Utc>, String), Demand>,
    rng: StdRng,
    bad_fraction: f64,
    late_fraction: f64,
}

impl Sender {
    fn send_raw(&mut self, key: &str, payload: &[u8]) -> anyhow::Result<()> {
        let mut record = BaseRecord::to(&self.topic).key(key).payload(payload);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    // Backpressure: wait for the broker to take what is queued.
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => {
                    return Err(e).with_context(|| format!("producing to topic {}", self.topic));
                }
            }
        }
    }

    fn send_event(&mut self, e: &ShopEvent) -> anyhow::Result<()> {
        let late;
        let e = if self.late_fraction > 0.0 && self.rng.random_bool(self.late_fraction.min(1.0)) {
            let mut shifted = e.clone();
            shifted.event_time -= TimeDelta::minutes(self.rng.random_range(60..=360));
            late = shifted;
            &late
        } else {
            e
        };
        self.send_raw(&e.user_id, e.to_json().as_bytes())?;
        self.truth.events_sent += 1;
        *self.truth.events_by_type.entry(e.event_type.as_str().into()).or_default() += 1;
        self.truth.revenue_cents += e.revenue_cents();
        let hour = e.event_time.duration_trunc(TimeDelta::hours(1)).unwrap_or(e.event_time);
        self.demand.entry((hour, e.product_id.clone())).or_default().add(e);
        if self.bad_fraction > 0.0 && self.rng.random_bool(self.bad_fraction.min(1.0)) {
            let n = self.truth.bad_sent;
            let (kind, bytes) = malformed::random(Utc::now(), n, &mut self.rng);
            self.send_raw(&format!("u-bad-{}", n % 50), &bytes)?;
            self.truth.bad_sent += 1;
            *self.truth.bad_by_reason.entry(kind.reason.as_str().into()).or_default() += 1;
        }
        Ok(())
    }
}

fn progress(quiet: bool, len: Option<u64>, what: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = match len {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new_spinner(),
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix:>9} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// The traffic's random seed: `seed` and the start time mixed so that two
/// runs never share a stream. (With `seed ^ seconds`, seed 1 and seed 2
/// started 3 s apart drew the same numbers, hence the same event ids:
/// duplicates, by the contract.)
fn traffic_seed(seed: u64, start: DateTime<Utc>) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ start.timestamp_nanos_opt().unwrap_or_default() as u64
}

async fn seed_catalog(url: &str, shop: &Shop) -> anyhow::Result<()> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .with_context(|| {
            format!("connecting to the shop database {url} (`make up` creates it; --no-catalog skips it)")
        })?;
    pool.execute(
        "CREATE TABLE IF NOT EXISTS products (
            product_id  text PRIMARY KEY,
            name        text NOT NULL,
            category    text NOT NULL,
            price_cents bigint NOT NULL,
            updated_at  timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .context("creating sales.products")?;
    let mut tx = pool.begin().await?;
    for chunk in shop.products.chunks(1000) {
        let ids: Vec<&str> = chunk.iter().map(|p| p.product_id.as_str()).collect();
        let names: Vec<&str> = chunk.iter().map(|p| p.name.as_str()).collect();
        let cats: Vec<&str> = chunk.iter().map(|p| p.category.as_str()).collect();
        let prices: Vec<i64> = chunk.iter().map(|p| p.price_cents).collect();
        sqlx::query(
            "INSERT INTO products (product_id, name, category, price_cents)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])
             ON CONFLICT (product_id) DO UPDATE SET
                name = EXCLUDED.name, category = EXCLUDED.category, price_cents = EXCLUDED.price_cents,
                updated_at = CASE WHEN (products.name, products.category, products.price_cents)
                                  IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.category, EXCLUDED.price_cents)
                             THEN now() ELSE products.updated_at END",
        )
        .bind(ids)
        .bind(names)
        .bind(cats)
        .bind(prices)
        .execute(&mut *tx)
        .await
        .context("seeding sales.products")?;
    }
    tx.commit().await?;
    Ok(())
}

fn producer(brokers: &str, delivery: Arc<Delivery>) -> anyhow::Result<ThreadedProducer<Context>> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000")
        .set("message.timeout.ms", "120000")
        .create_with_context(Context(delivery))
        .with_context(|| format!("creating a Kafka producer for {brokers}"))
}

/// One event as a keyed record: `kind` of `product` by `user` at `at`, in
/// the user's session; with quantity 1 at 100 cents unless a page view.
pub fn event_record(user: &str, product: &str, kind: &str, at: DateTime<Utc>) -> (String, String) {
    let mut v = serde_json::json!({
        "event_id": uuid::Uuid::new_v4().to_string(),
        "event_type": kind,
        "event_time": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "user_id": user,
        "session_id": format!("s-{user}"),
        "product_id": product,
        "schema_version": 1,
    });
    if kind != "page_view" {
        v["quantity"] = 1.into();
        v["price_cents"] = 100.into();
    }
    (user.to_string(), v.to_string())
}

/// Sends hand-made records (key, payload) to `topic` and waits until the
/// broker acknowledged each one: for tests that need exact inputs.
pub fn send_records(brokers: &str, topic: &str, records: &[(String, String)]) -> anyhow::Result<()> {
    let timed: Vec<_> = records.iter().map(|(k, p)| (k.clone(), p.clone(), None)).collect();
    send_timed_records(brokers, topic, &timed)
}

/// Like [`send_records`], each record with the Kafka timestamp given
/// (milliseconds since the epoch; `None`: the producer's clock).
pub fn send_timed_records(brokers: &str, topic: &str, records: &[(String, String, Option<i64>)]) -> anyhow::Result<()> {
    let delivery = Arc::new(Delivery::default());
    let producer = producer(brokers, Arc::clone(&delivery))?;
    for (key, payload, timestamp) in records {
        let mut record = BaseRecord::to(topic).key(key).payload(payload);
        if let Some(t) = timestamp {
            record = record.timestamp(*t);
        }
        producer.send(record).map_err(|(e, _)| e).with_context(|| format!("producing to topic {topic}"))?;
    }
    producer.flush(Duration::from_secs(60)).context("waiting for the broker to acknowledge every record")?;
    let failed = delivery.failed.load(Ordering::Relaxed);
    anyhow::ensure!(failed == 0, "{failed} of {} records were not delivered", records.len());
    Ok(())
}

/// Runs the generator; returns the truth it also wrote to `args.truth`.
pub async fn run(args: Args) -> anyhow::Result<Truth> {
    if !(0.0..=1.0).contains(&args.late_fraction) {
        anyhow::bail!("--late-fraction must be between 0 and 1, got {}", args.late_fraction);
    }
    if !(0.0..=1.0).contains(&args.bad_fraction) {
        anyhow::bail!("--bad-fraction must be between 0 and 1, got {}", args.bad_fraction);
    }
    if !(args.rate > 0.0 && args.rate.is_finite()) {
        anyhow::bail!("--rate must be a positive number of events per second, got {}", args.rate);
    }
    if args.backfill_hours == 0 && args.duration.is_zero() {
        anyhow::bail!("nothing to do: give --backfill-hours N and/or --duration D (e.g. --duration 60s)");
    }
    let shop = Shop::new(ShopConfig {
        seed: args.seed,
        products: args.products,
        categories: args.categories,
        users: args.users,
        rate: args.rate,
    });
    if !args.no_catalog {
        seed_catalog(&args.sales_database_url, &shop).await?;
        tracing::info!(products = shop.products.len(), "seeded sales.products");
    }

    if args.history_end.is_some() && !args.duration.is_zero() {
        anyhow::bail!("--history-end and --duration exclude each other: live traffic is sent now");
    }
    let now = args.history_end.unwrap_or_else(Utc::now);
    let mut rng = StdRng::seed_from_u64(traffic_seed(args.seed, now));
    let history_start =
        now.duration_trunc(TimeDelta::hours(1)).unwrap_or(now) - TimeDelta::hours(i64::from(args.backfill_hours));
    let live_end = now + TimeDelta::from_std(args.duration).unwrap_or_default();
    let n_spikes = args.spikes.unwrap_or((args.backfill_hours as usize / 12).max(1));
    let mut spikes = if args.backfill_hours > 0 {
        shop.plan_spikes(n_spikes, history_start, live_end.max(now + TimeDelta::hours(1)), &mut rng)
    } else {
        Vec::new()
    };
    if args.live_spike && !args.duration.is_zero() {
        let mut s = shop.plan_spikes(1, now, now + TimeDelta::hours(3), &mut rng);
        if let Some(first) = s.first_mut() {
            first.start = now;
            first.end = now + TimeDelta::hours(3);
            first.multiplier = 8.0;
        }
        spikes.extend(s);
    }

    let delivery = Arc::new(Delivery::default());
    let mut sender = Sender {
        producer: producer(&args.brokers, Arc::clone(&delivery))?,
        delivery,
        topic: args.topic.clone(),
        truth: Truth { seed: args.seed, started_at: Some(now), spikes: spikes.clone(), ..Truth::default() },
        demand: BTreeMap::new(),
        rng: StdRng::seed_from_u64(args.seed.wrapping_add(1)),
        bad_fraction: args.bad_fraction,
        late_fraction: args.late_fraction,
    };

    let started = Instant::now();
    if args.backfill_hours > 0 {
        let expected = (args.rate * 3600.0 * f64::from(args.backfill_hours)) as u64;
        let bar = progress(args.quiet, Some(expected), "history");
        for h in 0..i64::from(args.backfill_hours) {
            let from = history_start + TimeDelta::hours(h);
            let events = shop.events_between(from, from + TimeDelta::hours(1), &spikes, now, &mut rng);
            for e in &events {
                sender.send_event(e)?;
            }
            bar.inc(events.len() as u64);
        }
        bar.finish_with_message("history sent");
    }

    if !args.duration.is_zero() {
        let bar = progress(args.quiet, Some(args.duration.as_secs()), "live");
        let live_start = Instant::now();
        let tick = Duration::from_millis(100);
        let mut next = live_start;
        let mut last = Utc::now();
        while live_start.elapsed() < args.duration {
            next += tick;
            let wall = Utc::now();
            // Sessions arriving in the last tick, sent now with their times
            // compressed to now (a live user clicks in real time).
            let events = shop.events_between(last, wall, &spikes, DateTime::<Utc>::MAX_UTC, &mut rng);
            last = wall;
            for (i, e) in events.iter().enumerate() {
                let mut e = e.clone();
                e.event_time = wall + TimeDelta::microseconds(i as i64);
                sender.send_event(&e)?;
            }
            bar.set_position(live_start.elapsed().as_secs());
            bar.set_message(format!("{} events", sender.truth.events_sent));
            tokio::time::sleep_until(next.into()).await;
        }
        bar.finish_with_message("live traffic done");
    }

    let flush_bar = progress(args.quiet, None, "flushing");
    flush_bar.enable_steady_tick(Duration::from_millis(200));
    sender.producer.flush(Duration::from_secs(120)).context("waiting for the broker to acknowledge every record")?;
    flush_bar.finish_and_clear();
    let mut truth = sender.truth;
    truth.demand =
        sender.demand.into_iter().map(|((hour, product_id), demand)| DemandRow { hour, product_id, demand }).collect();
    truth.finished_at = Some(Utc::now());
    truth.delivery_failures = sender.delivery.failed.load(Ordering::Relaxed);
    let delivered = sender.delivery.ok.load(Ordering::Relaxed);

    if let Some(dir) = args.truth.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&args.truth, serde_json::to_vec_pretty(&truth)?)
        .with_context(|| format!("writing {}", args.truth.display()))?;

    let secs = started.elapsed().as_secs_f64();
    println!(
        "sent {} events ({}) and {} malformed records to `{}` in {:.1}s ({:.0} records/s); {} acknowledged, {} failed",
        truth.events_sent,
        truth.events_by_type.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "),
        truth.bad_sent,
        args.topic,
        secs,
        (truth.events_sent + truth.bad_sent) as f64 / secs.max(1e-9),
        delivered,
        truth.delivery_failures,
    );
    for s in &truth.spikes {
        println!(
            "spike: {} x{} from {} to {}",
            s.product_id,
            s.multiplier,
            s.start.format("%Y-%m-%d %H:%M"),
            s.end.format("%Y-%m-%d %H:%M")
        );
    }
    println!("ground truth written to {}", args.truth.display());
    if truth.delivery_failures > 0 {
        anyhow::bail!("{} records were not acknowledged by the broker", truth.delivery_failures);
    }
    Ok(truth)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_with_other_seeds_or_starts_draw_other_streams() {
        let t = DateTime::from_timestamp(1_764_547_200, 0).unwrap();
        let mut seeds: Vec<u64> = Vec::new();
        for seed in 0..8 {
            for s in 0..16 {
                seeds.push(traffic_seed(seed, t + TimeDelta::seconds(s)));
            }
        }
        let n = seeds.len();
        seeds.sort_unstable();
        seeds.dedup();
        assert_eq!(seeds.len(), n, "two runs would draw the same event ids");
    }
}
