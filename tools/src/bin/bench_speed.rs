//! `bench_speed` (`make bench-speed`): the speed layer's whole-system
//! figures against the real broker and PostgreSQL.
//!
//! 0. **From memory.** The speed layer's own ceiling with the broker out of
//!    the way: the shop model's events handed to `stream::replay`, which
//!    runs them through the positions, decode, deltas and the PostgreSQL
//!    commit exactly as `run` does after its consumer.
//! 1. **Throughput.** A topic pre-loaded with at least 5 million events of
//!    the shop model (by the load generator, cached across runs: its name
//!    and size are kept under `$LAMBDA_CACHE/bench/`, and it is reused while
//!    the broker still holds it whole). A bare rdkafka consumer, with the
//!    speed layer's client settings, reads every record and does nothing
//!    else; then the speed layer (the library's `run`, in this process,
//!    into a fresh database) consumes the same records until every offset is
//!    committed in PostgreSQL. Both are wall-clock times over the whole topic.
//! 2. **Freshness.** Into a fresh topic, the shop's live traffic at a steady
//!    rate (10,000 events/s by default) with, every 100 ms, a *marker*: a
//!    page view of a product no other event names. A separate PostgreSQL
//!    connection polls `serving.product_demand_hourly` for the pending
//!    markers in a tight loop; a marker's freshness is the time from just
//!    before its produce call to the first poll that sees its row.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use chrono::{DurationRound as _, TimeDelta, Utc};
use clap::Parser;
use integration_tests::fixture::Stack;
use integration_tests::generator;
use integration_tests::shop::{Shop, ShopConfig, ShopEvent};
use rand::SeedableRng as _;
use rand::rngs::StdRng;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer};
use rdkafka::{Message as _, Offset, TopicPartitionList};
use shared_schema::EventType;
use speed_layer::stream::{self, SpeedConfig};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tools::bench::{calibrated_rate, group};

/// Speed-layer benchmark: throughput against a bare consumer, freshness.
#[derive(Debug, Parser)]
#[command(name = "bench_speed", about)]
struct Args {
    /// Events pre-loaded for the throughput run (at least).
    #[arg(long, default_value_t = 5_000_000)]
    events: u64,
    /// Hours of shop traffic those events span.
    #[arg(long, default_value_t = 2)]
    hours: u32,
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Bare-consumer / speed-layer pairs in the throughput run.
    #[arg(long, default_value_t = 1)]
    reps: usize,
    /// Speed layer: flush at the latest this long after a micro-batch's
    /// first record (0s, the layer's default: group commit).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    flush_interval: Duration,
    /// Speed layer: flush as soon as this many records are buffered.
    #[arg(long, default_value_t = 50_000)]
    max_batch: usize,
    /// Speed layer and bare consumer: longest wait of a fetch at the broker.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    fetch_wait: Duration,
    /// Steady produce rate of the freshness run, events per second.
    #[arg(long, default_value_t = 10_000.0)]
    rate: f64,
    /// How long freshness is measured (after the warm-up).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Traffic before the measured markers start.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// One marker event every this long.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    marker_every: Duration,
    /// Pause between two polls of the serving view (the poller shares the
    /// machine: at 2 ms it kept a PostgreSQL backend busy and the p99 rose by
    /// about 0.5 s).
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    poll_every: Duration,
    /// Events of the from-memory run: the speed layer's own ceiling, the
    /// records handed over in memory (no broker), decoded, turned into
    /// deltas and committed to PostgreSQL as `run` does.
    #[arg(long, default_value_t = 1_000_000)]
    memory_events: u64,
    #[arg(long)]
    skip_memory: bool,
    #[arg(long)]
    skip_throughput: bool,
    #[arg(long)]
    skip_freshness: bool,
    /// Cache folder (the pre-loaded topic's name is kept under `bench/`).
    #[arg(long, env = "LAMBDA_CACHE")]
    cache: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    platform::logging::init();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => platform::logging::report(&e),
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    ensure!(
        args.reps > 0 && args.rate > 0.0 && !args.marker_every.is_zero(),
        "--reps, --rate and --marker-every must be positive"
    );
    let stack = Stack::local();
    let cache = match &args.cache {
        Some(c) => c.clone(),
        None => PathBuf::from(std::env::var("HOME").context("HOME is not set; give --cache")?)
            .join(".cache/lambda-platform"),
    };
    let dlq = stack.fresh_topic("bench_speed_dlq", 1).await?;
    let memory = if args.skip_memory { None } else { Some(from_memory(&args, &stack, &dlq).await?) };
    let throughput = if args.skip_throughput { None } else { Some(throughput(&args, &stack, &cache, &dlq).await?) };
    let freshness = if args.skip_freshness { None } else { Some(freshness(&args, &stack, &dlq).await?) };

    println!();
    println!(
        "speed layer (flush interval {}, max batch {}, fetch wait {}; serving view polled every {})",
        humantime::format_duration(args.flush_interval),
        args.max_batch,
        humantime::format_duration(args.fetch_wait),
        humantime::format_duration(args.poll_every)
    );
    if let Some((events, elapsed)) = memory {
        println!(
            "  from memory, no broker: {} events in {:.2} s, {:.0} events/s   (aim >= 100,000/s)",
            group(events),
            elapsed.as_secs_f64(),
            events as f64 / elapsed.as_secs_f64()
        );
    }
    if let Some(t) = &throughput {
        let bare = t.bare.iter().map(|d| t.records as f64 / d.as_secs_f64()).fold(0.0, f64::max);
        let speed = t.speed.iter().map(|d| t.records as f64 / d.as_secs_f64()).fold(0.0, f64::max);
        println!(
            "  throughput over {} records ({:.0} MB), best of {}:",
            group(t.records),
            t.bytes as f64 / 1e6,
            t.bare.len()
        );
        println!("    {:<52} {:>10.0} events/s", "bare rdkafka consumer (reads only)", bare);
        println!("    {:<52} {:>10.0} events/s", "speed layer (decode, deltas, PostgreSQL commit)", speed);
        println!("    {:<52} {:>10.2}x   (goal >= 0.7x)", "speed layer / bare consumer", speed / bare);
    }
    if let Some(f) = &freshness {
        println!(
            "  freshness at {:.0} events/s produced ({:.0} achieved), {} markers over {}:",
            args.rate,
            f.achieved_rate,
            f.latencies.len(),
            humantime::format_duration(args.duration)
        );
        println!(
            "    produce -> visible in serving.product_demand_hourly: {}   (goal p99 < 1000 ms)",
            quantiles(&f.latencies)
        );
        println!(
            "    the speed layer's own share (visible minus received by the bare consumer, per marker): {}   (goal p99 <= 150 ms)",
            quantiles(&f.own_share)
        );
        println!(
            "    for comparison, produce -> acknowledged by the broker: {} ({} markers)",
            quantiles(&f.acks),
            f.acks.len()
        );
        println!(
            "    for comparison, produce -> received by a bare consumer: {} ({} markers)",
            quantiles(&f.delivered),
            f.delivered.len()
        );
        println!(
            "    one poll of the serving view took {:.1} ms on average ({} polls): the resolution of these figures",
            f.mean_poll_ms, f.polls
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- throughput

struct Throughput {
    records: u64,
    bytes: u64,
    bare: Vec<Duration>,
    speed: Vec<Duration>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CachedTopic {
    topic: String,
    records: i64,
}

/// The pre-loaded topic: the cached one when the broker still holds all of
/// it, else a new one filled by the load generator.
async fn preloaded_topic(args: &Args, stack: &Stack, cache: &std::path::Path) -> anyhow::Result<(String, i64)> {
    let key = format!("speed-topic-v2-e{}-h{}-k{}-s{}", args.events, args.hours, args.partitions, args.seed);
    let record = cache.join("bench").join(format!("{key}.json"));
    if let Ok(bytes) = std::fs::read(&record)
        && let Ok(cached) = serde_json::from_slice::<CachedTopic>(&bytes)
        && stack.topics()?.contains(&cached.topic)
        && cached.records as u64 >= args.events
        && stack.topic_size(&cached.topic)? == cached.records
    {
        println!("reusing the pre-loaded topic {} ({} records)", cached.topic, group(cached.records as u64));
        return Ok((cached.topic, cached.records));
    }
    let topic = stack.fresh_topic("bench_speed_throughput", args.partitions).await?;
    println!(
        "pre-loading topic {topic} with {} events by the load generator (once; later runs reuse it)",
        group(args.events)
    );
    // The generator's history: the hours before the current one. 2% more
    // events than asked: the model's traffic is random.
    let end = Utc::now().duration_trunc(TimeDelta::hours(1))?;
    let shape = ShopConfig { seed: args.seed, products: 500, categories: 12, users: 10_000, rate: 1.0 };
    let rate = calibrated_rate(&shape, end - TimeDelta::hours(i64::from(args.hours)), end, args.events) * 1.02;
    generator::run(generator::Args {
        backfill_hours: args.hours,
        rate,
        seed: args.seed,
        products: shape.products,
        categories: shape.categories,
        users: shape.users,
        spikes: None,
        quiet: false,
        truth: cache.join("bench").join(format!("{key}-truth.json")),
        ..generator::Args::for_tests(stack.brokers(), &topic, args.seed)
    })
    .await?;
    let records = stack.topic_size(&topic)?;
    ensure!(
        records as u64 >= args.events,
        "the generator sent {records} events, fewer than the {} asked for; run again (a new topic is made)",
        args.events
    );
    std::fs::create_dir_all(cache.join("bench"))?;
    std::fs::write(&record, serde_json::to_vec(&CachedTopic { topic: topic.clone(), records })?)
        .with_context(|| format!("writing {}", record.display()))?;
    Ok((topic, records))
}

async fn throughput(args: &Args, stack: &Stack, cache: &std::path::Path, dlq: &str) -> anyhow::Result<Throughput> {
    let (topic, records) = preloaded_topic(args, stack, cache).await?;
    let mut out = Throughput { records: records as u64, bytes: 0, bare: Vec::new(), speed: Vec::new() };
    for rep in 1..=args.reps {
        let (bare, bytes) = bare_consumer(stack, &topic, records, args.fetch_wait).await?;
        out.bytes = bytes;
        println!(
            "  rep {rep}: bare consumer {:.1} s ({:.0} events/s)",
            bare.as_secs_f64(),
            records as f64 / bare.as_secs_f64()
        );
        let speed = speed_layer_catch_up(args, stack, &topic, dlq, records, rep).await?;
        println!(
            "  rep {rep}: speed layer   {:.1} s ({:.0} events/s)",
            speed.as_secs_f64(),
            records as f64 / speed.as_secs_f64()
        );
        out.bare.push(bare);
        out.speed.push(speed);
    }
    Ok(out)
}

/// The speed layer's consumer settings, without its work: how fast the
/// records can be read at all.
fn consumer(brokers: &str, group: &str, fetch_wait: Duration) -> anyhow::Result<StreamConsumer> {
    stream::consumer_config(brokers, group, fetch_wait, None)
        .create()
        .with_context(|| format!("creating a Kafka consumer for {brokers}"))
}

/// Assigns `consumer` every partition of `topic` from its first record (no
/// group coordination).
fn read_from_beginning(consumer: &StreamConsumer, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    Ok(consumer.assign(&tpl)?)
}

async fn bare_consumer(
    stack: &Stack,
    topic: &str,
    records: i64,
    fetch_wait: Duration,
) -> anyhow::Result<(Duration, u64)> {
    let started = Instant::now();
    let consumer = consumer(stack.brokers(), &format!("{topic}.bare"), fetch_wait)?;
    read_from_beginning(&consumer, topic, stack.partitions(topic)? as i32)?;
    let (mut n, mut bytes) = (0i64, 0u64);
    while n < records {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .with_context(|| format!("bare consumer: no record for 30 s after {n} of {records}"))??;
        bytes += m.payload().map_or(0, <[u8]>::len) as u64 + m.key().map_or(0, <[u8]>::len) as u64;
        n += 1;
    }
    Ok((started.elapsed(), bytes))
}

fn speed_config(args: &Args, stack: &Stack, topic: &str, dlq: &str, database_url: &str) -> SpeedConfig {
    SpeedConfig {
        flush_interval: args.flush_interval,
        max_batch: args.max_batch,
        fetch_wait: args.fetch_wait,
        ..SpeedConfig::single_instance(stack.brokers(), topic, dlq, database_url)
    }
}

/// Next offsets the speed layer has committed, summed over partitions.
async fn committed(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT COALESCE(sum(next_offset), 0)::bigint FROM ops.speed_offsets")
        .fetch_one(pool)
        .await?)
}

/// Runs the speed layer from an empty database until it has committed
/// every one of `records`, and checks the serving totals count each once.
async fn speed_layer_catch_up(
    args: &Args,
    stack: &Stack,
    topic: &str,
    dlq: &str,
    records: i64,
    rep: usize,
) -> anyhow::Result<Duration> {
    let (url, pool) = stack.fresh_database(&format!("bench_speed_throughput_{rep}")).await?;
    // The schema the layer would create at start, made first so the progress
    // poll below has its table; the layer's own start finds it in place.
    platform::db::migrate(&pool, None).await?;
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let _stop = shutdown.clone().drop_guard();
    let task = tokio::spawn(stream::run(speed_config(args, stack, topic, dlq, &url), shutdown.clone()));
    let mut last_report = Instant::now();
    loop {
        let n = committed(&pool).await?;
        if n >= records {
            break;
        }
        if task.is_finished() {
            shutdown.cancel();
            task.await??;
            bail!("the speed layer stopped after {n} of {records} records");
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            println!("    speed layer: {} of {} records committed", group(n as u64), group(records as u64));
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    shutdown.cancel();
    task.await??;
    let counted: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(views + cart_adds + cart_removes + purchases), 0)::bigint FROM serving.product_demand_hourly",
    )
    .fetch_one(&pool)
    .await?;
    ensure!(counted == records, "serving.product_demand_hourly counts {counted} events, the topic holds {records}");
    pool.close().await;
    Ok(elapsed)
}

// --------------------------------------------------------------- from memory

/// The speed layer's own ceiling: `--memory-events` events of the shop
/// model over the two hours before now, keyed by user and spread over the
/// partitions as a producer would, handed to `stream::replay` in memory
/// (decode, deltas of every view, PostgreSQL commit with offsets, the code
/// `run` executes) into a fresh database. The serving totals must count
/// each event once. Returns the events and the replay's wall-clock time.
async fn from_memory(args: &Args, stack: &Stack, dlq: &str) -> anyhow::Result<(u64, Duration)> {
    let end = Utc::now().duration_trunc(TimeDelta::hours(1))?;
    let start = end - TimeDelta::hours(i64::from(args.hours));
    let shape = ShopConfig { seed: args.seed, products: 500, categories: 12, users: 10_000, rate: 1.0 };
    // 2% more than asked (the model's traffic is random), cut to the number.
    let rate = calibrated_rate(&shape, start, end, args.memory_events) * 1.02;
    let shop = Shop::new(ShopConfig { rate, ..shape });
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut next_offset = vec![0i64; args.partitions as usize];
    let mut records = Vec::with_capacity(args.memory_events as usize);
    let mut at = start;
    while (records.len() as u64) < args.memory_events {
        ensure!(at < end + TimeDelta::hours(1), "the shop model made too few events; lower --memory-events");
        let to = at + TimeDelta::minutes(1);
        let mut minute = shop.events_between(at, to, &[], chrono::DateTime::<Utc>::MAX_UTC, &mut rng);
        minute.truncate((args.memory_events - records.len() as u64) as usize);
        for e in minute {
            let p = {
                use std::hash::{Hash as _, Hasher as _};
                let mut h = std::hash::DefaultHasher::new();
                e.user_id.hash(&mut h);
                (h.finish() % args.partitions as u64) as usize
            };
            records.push(stream::ReplayRecord {
                partition: shared_schema::cut::Partition(p as i32),
                offset: shared_schema::cut::Offset(next_offset[p]),
                timestamp_ms: Some(e.event_time.timestamp_millis()),
                key: Some(e.user_id.clone().into_bytes()),
                payload: e.to_json().into_bytes(),
            });
            next_offset[p] += 1;
        }
        at = to;
    }
    let (url, pool) = stack.fresh_database("bench_speed_memory").await?;
    platform::db::migrate(&pool, None).await?;
    let events = records.len() as u64;
    let bytes: usize = records.iter().map(|r| r.payload.len()).sum();
    println!("from memory: {} events ({:.0} MB) through the speed layer, no broker", group(events), bytes as f64 / 1e6);
    let config =
        SpeedConfig { max_batch: args.max_batch, ..SpeedConfig::single_instance(stack.brokers(), "events", dlq, &url) };
    let metrics = platform::ops_http::install_metrics();
    let sums = || {
        let text = metrics.render();
        [
            "speed_flush_seconds_count",
            "speed_flush_prepare_seconds_sum",
            "speed_flush_commit_seconds_sum",
            "speed_prepared_ahead_total",
        ]
        .map(|name| integration_tests::checks::metric_sum(&text, name))
    };
    let before = sums();
    let started = Instant::now();
    stream::replay(&config, records).await?;
    let elapsed = started.elapsed();
    let after = sums();
    let flushes = after[0] - before[0];
    println!(
        "    {flushes:.0} flushes of {:.0} events on average; per flush {:.1} ms preparing (decode, duplicates, deltas), {:.1} ms committing; {:.0} prepared while the previous committed",
        events as f64 / flushes.max(1.0),
        (after[1] - before[1]) * 1000.0 / flushes.max(1.0),
        (after[2] - before[2]) * 1000.0 / flushes.max(1.0),
        after[3] - before[3]
    );
    let counted: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(views + cart_adds + cart_removes + purchases), 0)::bigint FROM serving.product_demand_hourly",
    )
    .fetch_one(&pool)
    .await?;
    ensure!(counted as u64 == events, "serving.product_demand_hourly counts {counted} events, {events} were replayed");
    pool.close().await;
    Ok((events, elapsed))
}

// ----------------------------------------------------------------- freshness

struct Freshness {
    /// Produce → visible, per measured marker, sorted.
    latencies: Vec<Duration>,
    /// Produce → acknowledged by the broker, per measured marker, sorted:
    /// the part of the freshness the platform cannot change.
    acks: Vec<Duration>,
    /// Produce → received by a bare consumer (the speed layer's client
    /// settings, no work), per measured marker, sorted.
    delivered: Vec<Duration>,
    /// Visible minus received by the bare consumer, per marker both saw,
    /// sorted: what the speed layer adds.
    own_share: Vec<Duration>,
    achieved_rate: f64,
    mean_poll_ms: f64,
    polls: u64,
}

/// "p50 …, p90 …, p99 …, max …" of sorted `times`, in milliseconds.
fn quantiles(times: &[Duration]) -> String {
    format!(
        "p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        percentile_ms(times, 0.50),
        percentile_ms(times, 0.90),
        percentile_ms(times, 0.99),
        percentile_ms(times, 1.0)
    )
}

/// The `q` quantile of sorted `times`, in milliseconds.
fn percentile_ms(times: &[Duration], q: f64) -> f64 {
    if times.is_empty() {
        return f64::NAN;
    }
    let i = ((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1;
    times[i].as_secs_f64() * 1000.0
}

/// Records how long the broker took to acknowledge each measured marker.
/// A record's opaque is 0, or 1 + the nanoseconds from `base` to its send.
struct MarkerAcks {
    base: Instant,
    acks: std::sync::Mutex<Vec<Duration>>,
}

impl rdkafka::ClientContext for MarkerAcks {}

impl ProducerContext for MarkerAcks {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, sent: usize) {
        if sent == 0 || result.is_err() {
            return;
        }
        let sent = self.base + Duration::from_nanos(sent as u64 - 1);
        if let Ok(mut acks) = self.acks.lock() {
            acks.push(sent.elapsed());
        }
    }
}

/// A marker on its way: sent at `sent`, counted when `measured`.
struct Marker {
    product_id: String,
    sent: Instant,
    measured: bool,
}

async fn freshness(args: &Args, stack: &Stack, dlq: &str) -> anyhow::Result<Freshness> {
    let topic = stack.fresh_topic("bench_speed_freshness", args.partitions).await?;
    let (url, pool) = stack.fresh_database("bench_speed_freshness").await?;
    platform::db::migrate(&pool, None).await?;
    println!(
        "freshness: {:.0} events/s into {topic} for {} (+{} warm-up), a marker every {}",
        args.rate,
        humantime::format_duration(args.duration),
        humantime::format_duration(args.warmup),
        humantime::format_duration(args.marker_every)
    );
    let shutdown = CancellationToken::new();
    // On every way out, the speed layer and the load stop.
    let _stop_speed = shutdown.clone().drop_guard();
    let speed = tokio::spawn(stream::run(speed_config(args, stack, &topic, dlq, &url), shutdown.clone()));

    let producer: Arc<ThreadedProducer<MarkerAcks>> = Arc::new(
        ClientConfig::new()
            .set("bootstrap.servers", stack.brokers())
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "200000")
            .create_with_context(MarkerAcks { base: Instant::now(), acks: std::sync::Mutex::new(Vec::new()) })
            .context("creating the freshness producer")?,
    );
    let (marker_tx, mut marker_rx) = tokio::sync::mpsc::unbounded_channel::<Marker>();
    // A bare consumer beside the speed layer: when each marker reaches a
    // client at all.
    let sent_at: Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>> = Arc::default();
    let delivery = {
        let bare = consumer(stack.brokers(), &format!("{topic}.bare"), args.fetch_wait)?;
        read_from_beginning(&bare, &topic, args.partitions)?;
        let (sent_at, stop) = (Arc::clone(&sent_at), shutdown.clone());
        tokio::spawn(async move {
            let mut delivered = Vec::new();
            loop {
                let m = tokio::select! {
                    _ = stop.cancelled() => break,
                    m = bare.recv() => m,
                };
                let (Ok(m), now) = (m, Instant::now()) else { continue };
                let Some(payload) = m.payload().and_then(|p| std::str::from_utf8(p).ok()) else { continue };
                let Some(start) = payload.find("\"product_id\":\"marker-") else { continue };
                let id = &payload[start + 14..];
                let id = &id[..id.find('"').unwrap_or(id.len())];
                let sent = sent_at.lock().ok().and_then(|mut s| s.remove(id));
                if let Some(sent) = sent {
                    delivered.push((id.to_string(), now - sent));
                }
            }
            delivered
        })
    };
    let produced = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let _stop_load = stop.clone().drop_guard();
    let load = tokio::task::spawn_blocking({
        let (topic, produced, stop, producer, sent_at) =
            (topic.clone(), Arc::clone(&produced), stop.clone(), Arc::clone(&producer), Arc::clone(&sent_at));
        let load = Load { rate: args.rate, warmup: args.warmup, marker_every: args.marker_every, seed: args.seed };
        move || steady_load(&producer, &topic, load, &produced, &stop, &marker_tx, &sent_at)
    });

    // The poller: its own connection, a tight loop over the pending markers.
    let mut poll_conn = pool.acquire().await?;
    let mut pending: Vec<Marker> = Vec::new();
    let mut latencies = Vec::new();
    let (mut polls, mut poll_time) = (0u64, Duration::ZERO);
    let started = Instant::now();
    let end = started + args.warmup + args.duration;
    let mut last_report = Instant::now();
    loop {
        while let Ok(m) = marker_rx.try_recv() {
            pending.push(m);
        }
        if Instant::now() >= end {
            stop.cancel();
            if pending.iter().all(|m| !m.measured) {
                break;
            }
        }
        if Instant::now() >= end + Duration::from_secs(30) {
            bail!("{} markers were not visible 30 s after the run", pending.len());
        }
        if speed.is_finished() {
            bail!("the speed layer stopped during the freshness run");
        }
        if !pending.is_empty() {
            let ids: Vec<&str> = pending.iter().map(|m| m.product_id.as_str()).collect();
            let t = Instant::now();
            let seen: Vec<String> = sqlx::query_scalar(
                "SELECT DISTINCT product_id FROM serving.product_demand_hourly WHERE product_id = ANY($1)",
            )
            .bind(&ids)
            .fetch_all(&mut *poll_conn)
            .await?;
            let now = Instant::now();
            polls += 1;
            poll_time += now - t;
            pending.retain(|m| {
                if !seen.contains(&m.product_id) {
                    return true;
                }
                if m.measured {
                    latencies.push((m.product_id.clone(), now - m.sent));
                }
                false
            });
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            println!("    {} markers measured, {} pending", latencies.len(), pending.len());
            last_report = Instant::now();
        }
        tokio::time::sleep(args.poll_every).await;
    }
    let load_secs = load.await??;
    drop(poll_conn);
    shutdown.cancel();
    speed.await??;
    let delivered: std::collections::HashMap<String, Duration> = delivery.await?.into_iter().collect();
    pool.close().await;
    let mut own_share: Vec<Duration> =
        latencies.iter().filter_map(|(id, l)| delivered.get(id).map(|d| l.saturating_sub(*d))).collect();
    own_share.sort();
    let mut delivered: Vec<Duration> = delivered.into_values().collect();
    delivered.sort();
    let mut latencies: Vec<Duration> = latencies.into_iter().map(|(_, l)| l).collect();
    latencies.sort();
    let mut acks = producer.context().acks.lock().map(|a| a.clone()).unwrap_or_default();
    acks.sort();
    Ok(Freshness {
        acks,
        delivered,
        own_share,
        achieved_rate: produced.load(Ordering::Relaxed) as f64 / load_secs,
        latencies,
        mean_poll_ms: poll_time.as_secs_f64() * 1000.0 / polls.max(1) as f64,
        polls,
    })
}

/// The freshness run's traffic.
#[derive(Debug, Clone, Copy)]
struct Load {
    /// Events per second.
    rate: f64,
    /// Markers sent this soon after the start are not measured.
    warmup: Duration,
    marker_every: Duration,
    seed: u64,
}

/// Produces the shop's live traffic at `load.rate` events/s plus a marker
/// every `load.marker_every` until `stop`. Returns how long it produced.
fn steady_load(
    producer: &ThreadedProducer<MarkerAcks>,
    topic: &str,
    load: Load,
    produced: &AtomicU64,
    stop: &CancellationToken,
    markers: &tokio::sync::mpsc::UnboundedSender<Marker>,
    sent_at: &std::sync::Mutex<std::collections::HashMap<String, Instant>>,
) -> anyhow::Result<f64> {
    let shop = Shop::new(ShopConfig { seed: load.seed, rate: load.rate, ..ShopConfig::default() });
    let mut rng = StdRng::seed_from_u64(load.seed);
    // `marker`: when a measured marker was sent, to time its acknowledgement.
    let send = |key: &str, payload: &[u8], marker: Option<Instant>| -> anyhow::Result<()> {
        let opaque = marker.map_or(0, |t| 1 + (t - producer.context().base).as_nanos() as usize);
        let mut record = BaseRecord::with_opaque_to(topic, opaque).key(key).payload(payload);
        loop {
            match producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(e).with_context(|| format!("producing to {topic}")),
            }
        }
    };
    let run = format!("{:x}", Utc::now().timestamp_millis());
    let started = Instant::now();
    // The shop's sessions, a minute of model time at a time, sent at exactly
    // `rate` events per second whatever the model's own pace; each event is
    // stamped with the moment it is sent, as a live shop's would be.
    let mut queue: std::collections::VecDeque<ShopEvent> = std::collections::VecDeque::new();
    let mut model_time = Utc::now();
    let mut sent_events = 0u64;
    let mut next_marker = started;
    let mut k = 0u64;
    while !stop.is_cancelled() {
        let due = (started.elapsed().as_secs_f64() * load.rate) as u64;
        while sent_events < due {
            if queue.is_empty() {
                let to = model_time + TimeDelta::minutes(1);
                queue.extend(shop.events_between(model_time, to, &[], chrono::DateTime::<Utc>::MAX_UTC, &mut rng));
                model_time = to;
                continue;
            }
            let Some(mut e) = queue.pop_front() else { continue };
            e.event_time = Utc::now();
            send(&e.user_id, e.to_json().as_bytes(), None)?;
            sent_events += 1;
        }
        produced.store(sent_events, Ordering::Relaxed);
        let now = Instant::now();
        if now >= next_marker {
            let marker = ShopEvent {
                event_id: uuid::Uuid::new_v4().to_string(),
                event_type: EventType::PageView,
                event_time: Utc::now(),
                user_id: format!("u-marker-{}", k % 997),
                session_id: format!("s-marker-{run}-{k}"),
                product_id: format!("marker-{run}-{k}"),
                quantity: None,
                price_cents: None,
            };
            let sent = Instant::now();
            let measured = sent - started >= load.warmup;
            if measured && let Ok(mut s) = sent_at.lock() {
                s.insert(marker.product_id.clone(), sent);
            }
            send(&marker.user_id, marker.to_json().as_bytes(), measured.then_some(sent))?;
            let _ = markers.send(Marker { product_id: marker.product_id, sent, measured });
            k += 1;
            next_marker += load.marker_every;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    producer.flush(Duration::from_secs(30)).context("flushing the freshness producer")?;
    Ok(started.elapsed().as_secs_f64())
}
