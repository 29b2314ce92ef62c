//! `soak_broker` (`make bench-broker`): the Kafka broker under several
//! parallel idempotent producers for a while (issue 14: a broker that holds
//! up). Per window and overall it reports:
//!
//! * **produce latency**: from the send call to the broker's
//!   acknowledgement (librdkafka's delivery report);
//! * **fetch latency**: from the send call to the record's arrival at a
//!   consumer reading the topic from the beginning;
//! * **failures**: delivery errors, records acknowledged but never read,
//!   and records read twice; and whether the broker still accepts a
//!   produce at the end (tansu 0.6's sqlite engine refused every produce
//!   after its "more or less than one row" panic).
//!
//! Each record's payload carries its producer, sequence number and send
//! time, so the consumer measures without shared state.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use clap::Parser;
use integration_tests::fixture::Stack;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer};
use rdkafka::{Message as _, Offset, TopicPartitionList};

/// Soak the broker with parallel idempotent producers.
#[derive(Debug, Parser)]
#[command(name = "soak_broker", about)]
struct Args {
    /// Parallel producers, each its own idempotent client.
    #[arg(long, default_value_t = 4)]
    producers: u32,
    /// How long to produce.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Records per second, over all producers.
    #[arg(long, default_value_t = 2_000.0)]
    rate: f64,
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Payload size of each record.
    #[arg(long, default_value_t = 300)]
    payload_bytes: usize,
    /// A line of figures this often.
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    report_every: Duration,
    /// Kafka bootstrap servers (default: KAFKA_BROKERS, else the local stack).
    #[arg(long)]
    brokers: Option<String>,
}

/// What the producers' delivery reports and the consumer collect.
#[derive(Default)]
struct Window {
    acks: Vec<Duration>,
    fetches: Vec<Duration>,
    errors: u64,
}

struct Shared {
    base: Instant,
    window: Mutex<Window>,
    total: Mutex<Window>,
    sent: AtomicU64,
    acked: AtomicU64,
    read: AtomicU64,
    repeated: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Shared {
    fn record(&self, f: impl Fn(&mut Window)) {
        if let Ok(mut w) = self.window.lock() {
            f(&mut w);
        }
        if let Ok(mut t) = self.total.lock() {
            f(&mut t);
        }
    }
}

struct Acks(Arc<Shared>);

impl rdkafka::ClientContext for Acks {}

impl ProducerContext for Acks {
    /// Nanoseconds from the base to the send.
    type DeliveryOpaque = Box<u64>;

    fn delivery(&self, result: &DeliveryResult<'_>, sent: Box<u64>) {
        let shared = &self.0;
        match result {
            Ok(_) => {
                let took = shared.base.elapsed().saturating_sub(Duration::from_nanos(*sent));
                shared.acked.fetch_add(1, Ordering::Relaxed);
                shared.record(|w| w.acks.push(took));
            }
            Err((e, _)) => {
                shared.record(|w| w.errors += 1);
                if let Ok(mut first) = shared.first_error.lock() {
                    first.get_or_insert_with(|| e.to_string());
                }
            }
        }
    }
}

fn producer(brokers: &str, shared: &Arc<Shared>) -> anyhow::Result<ThreadedProducer<Acks>> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "120000")
        .create_with_context(Acks(Arc::clone(shared)))
        .context("creating a producer")
}

/// Sends `rate` records per second until `stop`.
fn produce(
    id: u32,
    brokers: &str,
    topic: &str,
    rate: f64,
    payload_bytes: usize,
    shared: &Arc<Shared>,
    stop: &AtomicBool,
) {
    let producer = match producer(brokers, shared) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("producer {id}: {e:#}");
            return;
        }
    };
    let every = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let start = Instant::now();
    let mut seq: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let due = start + every.mul_f64(seq as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let sent = shared.base.elapsed().as_nanos() as u64;
        let mut payload = format!("{id}:{seq}:{sent}:");
        payload.extend(std::iter::repeat_n('x', payload_bytes.saturating_sub(payload.len())));
        let key = format!("k-{}", seq % 64);
        let record = BaseRecord::with_opaque_to(topic, Box::new(sent)).key(&key).payload(&payload);
        if let Err((e, _)) = producer.send(record) {
            shared.record(|w| w.errors += 1);
            if let Ok(mut first) = shared.first_error.lock() {
                first.get_or_insert_with(|| format!("enqueue: {e}"));
            }
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        shared.sent.fetch_add(1, Ordering::Relaxed);
        seq += 1;
    }
    let _ = producer.flush(Duration::from_secs(120));
}

/// Reads the topic from the beginning until `stop`.
fn consume(brokers: &str, topic: &str, partitions: i32, shared: &Arc<Shared>, stop: &AtomicBool) -> anyhow::Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}.soak"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "50")
        .create()
        .context("creating the consumer")?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut seen: HashSet<(u32, u64)> = HashSet::new();
    while !stop.load(Ordering::Relaxed) {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else { continue };
        let Ok(m) = message else { continue };
        let now = shared.base.elapsed();
        let Some(payload) = m.payload().and_then(|p| std::str::from_utf8(p).ok()) else { continue };
        let mut parts = payload.splitn(4, ':');
        let (Some(id), Some(seq), Some(sent)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let (Ok(id), Ok(seq), Ok(sent)) = (id.parse::<u32>(), seq.parse::<u64>(), sent.parse::<u64>()) else {
            continue;
        };
        if seen.insert((id, seq)) {
            shared.read.fetch_add(1, Ordering::Relaxed);
            shared.record(|w| w.fetches.push(now.saturating_sub(Duration::from_nanos(sent))));
        } else {
            shared.repeated.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// The `q` quantile of `times` (sorted here), in milliseconds.
fn quantile_ms(times: &mut [Duration], q: f64) -> f64 {
    if times.is_empty() {
        return f64::NAN;
    }
    times.sort_unstable();
    let i = ((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1;
    times[i].as_secs_f64() * 1000.0
}

fn line(label: &str, w: &mut Window) -> String {
    format!(
        "{label:>8} | acked {:>8} | produce p50 {:>7.1} ms p99 {:>8.1} ms max {:>8.1} ms | read {:>8} | fetch p50 {:>7.1} ms p99 {:>8.1} ms max {:>8.1} ms | errors {}",
        w.acks.len(),
        quantile_ms(&mut w.acks, 0.5),
        quantile_ms(&mut w.acks, 0.99),
        quantile_ms(&mut w.acks, 1.0),
        w.fetches.len(),
        quantile_ms(&mut w.fetches, 0.5),
        quantile_ms(&mut w.fetches, 0.99),
        quantile_ms(&mut w.fetches, 1.0),
        w.errors,
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let stack = match &args.brokers {
        Some(b) => Stack::from_env().with_brokers(b),
        None => Stack::local(),
    };
    let topic = stack.fresh_topic("soak_broker", args.partitions).await.context("creating the soak topic")?;
    println!(
        "soak: {} idempotent producers, {:.0} records/s of {} bytes in all, into {topic} ({} partitions) on {}, for {}",
        args.producers,
        args.rate,
        args.payload_bytes,
        args.partitions,
        stack.brokers(),
        humantime::format_duration(args.duration)
    );
    let shared = Arc::new(Shared {
        base: Instant::now(),
        window: Mutex::default(),
        total: Mutex::default(),
        sent: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        read: AtomicU64::new(0),
        repeated: AtomicU64::new(0),
        first_error: Mutex::new(None),
    });
    let stop_producing = Arc::new(AtomicBool::new(false));
    let stop_reading = Arc::new(AtomicBool::new(false));
    let reader = {
        let (brokers, topic, shared, stop) =
            (stack.brokers().to_string(), topic.clone(), Arc::clone(&shared), Arc::clone(&stop_reading));
        let partitions = args.partitions;
        std::thread::spawn(move || consume(&brokers, &topic, partitions, &shared, &stop))
    };
    let producers: Vec<_> = (0..args.producers)
        .map(|id| {
            let (brokers, topic, shared, stop) =
                (stack.brokers().to_string(), topic.clone(), Arc::clone(&shared), Arc::clone(&stop_producing));
            let (rate, bytes) = (args.rate / f64::from(args.producers), args.payload_bytes);
            std::thread::spawn(move || produce(id, &brokers, &topic, rate, bytes, &shared, &stop))
        })
        .collect();

    let started = Instant::now();
    while started.elapsed() < args.duration {
        tokio::time::sleep(args.report_every.min(args.duration.saturating_sub(started.elapsed()))).await;
        let mut window = shared.window.lock().map(|mut w| std::mem::take(&mut *w)).unwrap_or_default();
        println!("{}", line(&format!("{}s", started.elapsed().as_secs()), &mut window));
    }
    stop_producing.store(true, Ordering::Relaxed);
    for p in producers {
        let _ = p.join();
    }
    // The reader catches up with what was acknowledged (two minutes at most).
    let acked = shared.acked.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(120);
    while shared.read.load(Ordering::Relaxed) < acked && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop_reading.store(true, Ordering::Relaxed);
    reader.join().map_err(|_| anyhow::anyhow!("the reader panicked"))??;

    let mut total = shared.total.lock().map(|mut t| std::mem::take(&mut *t)).unwrap_or_default();
    // Does the broker still take a produce?
    let probe = producer(stack.brokers(), &shared)?;
    let before = shared.acked.load(Ordering::Relaxed);
    let sent = shared.base.elapsed().as_nanos() as u64;
    let _ = probe.send(BaseRecord::with_opaque_to(&topic, Box::new(sent)).key("probe").payload("probe"));
    let _ = probe.flush(Duration::from_secs(30));
    let alive = shared.acked.load(Ordering::Relaxed) > before;

    let sent = shared.sent.load(Ordering::Relaxed);
    let read = shared.read.load(Ordering::Relaxed);
    println!("{}", line("total", &mut total));
    println!(
        "sent {sent}, acknowledged {acked}, read {read} (missing {}), read twice {}, delivery errors {}, broker takes a produce at the end: {}",
        acked.saturating_sub(read),
        shared.repeated.load(Ordering::Relaxed),
        total.errors,
        if alive { "yes" } else { "NO" }
    );
    if let Some(e) = shared.first_error.lock().ok().and_then(|e| e.clone()) {
        println!("first error: {e}");
    }
    ensure!(alive, "the broker no longer accepts produces");
    Ok(())
}
