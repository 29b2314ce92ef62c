//! The one fixture every integration test shares: it talks to the
//! PostgreSQL server that `make up` started (or `make test` starts) and
//! gives each test its own database, topics and, at first use, a Kafka
//! broker of its own ([`OwnBroker`]; `TEST_KAFKA_BROKERS` names a broker
//! every test shares instead, e.g. an Apache Kafka cluster), so tests run
//! in parallel without seeing each other. Leftovers of an earlier run of
//! the same test are dropped first.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;
use sqlx::{AssertSqlSafe, Executor, PgPool};

use crate::broker::OwnBroker;

/// [`Stack::fresh_stream`]'s topics and database.
pub struct FreshStream {
    pub topic: String,
    pub dlq: String,
    pub url: String,
    pub pool: PgPool,
}

/// Where a test's stack listens: the local PostgreSQL server
/// (`DATABASE_URL`'s server) and the test's Kafka broker.
#[derive(Debug, Clone)]
pub struct Stack {
    /// Server URL without a database name.
    pub postgres: String,
    brokers: Brokers,
}

#[derive(Debug, Clone)]
enum Brokers {
    /// `TEST_KAFKA_BROKERS`: one broker (or cluster) every test shares.
    Shared(String),
    /// A broker of this test's own, started at first use (clones share it).
    Own(Arc<OnceLock<Result<(OwnBroker, String), String>>>),
}

impl Stack {
    pub fn from_env() -> Self {
        let db = std::env::var("DATABASE_URL").unwrap_or_else(|_| shared_schema::defaults::DATABASE_URL.into());
        let server = db.rsplit_once('/').map_or(db.clone(), |(s, _)| s.to_string());
        let brokers = match std::env::var("TEST_KAFKA_BROKERS") {
            Ok(shared) if !shared.is_empty() => Brokers::Shared(shared),
            _ => Brokers::Own(Arc::default()),
        };
        Self { postgres: server, brokers }
    }

    /// The stack `make up` started, broker included (`KAFKA_BROKERS`), for
    /// the benchmarks and soak tools that measure that broker.
    pub fn local() -> Self {
        let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| shared_schema::defaults::KAFKA_BROKERS.into());
        Self::from_env().with_brokers(&brokers)
    }

    /// This stack on the broker (or cluster) at `brokers`.
    pub fn with_brokers(self, brokers: &str) -> Self {
        Self { brokers: Brokers::Shared(brokers.to_string()), ..self }
    }

    /// Kafka bootstrap servers for this test; the first call starts the
    /// test's own broker (unless `TEST_KAFKA_BROKERS` names a shared one).
    ///
    /// # Panics
    /// When the broker cannot be started (tansu missing, or it does not answer).
    pub fn brokers(&self) -> &str {
        match &self.brokers {
            Brokers::Shared(brokers) => brokers,
            Brokers::Own(cell) => {
                let started = cell.get_or_init(|| {
                    OwnBroker::launch()
                        .map(|b| {
                            let brokers = b.brokers();
                            (b, brokers)
                        })
                        .map_err(|e| format!("{e:#}"))
                });
                match started {
                    Ok((_, brokers)) => brokers,
                    Err(e) => panic!("starting the test's broker: {e}"),
                }
            }
        }
    }

    fn admin_url(&self) -> String {
        format!("{}/postgres", self.postgres)
    }

    /// A new, empty database for `test`; an earlier run's copy is dropped.
    pub async fn fresh_database(&self, test: &str) -> anyhow::Result<(String, PgPool)> {
        let name = format!("test_{}", sanitize(test));
        let admin = PgPool::connect(&self.admin_url())
            .await
            .with_context(|| format!("connecting to {} (run `make up` first)", self.admin_url()))?;
        admin.execute(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))).await?;
        admin.execute(AssertSqlSafe(format!("CREATE DATABASE {name}"))).await?;
        admin.close().await;
        let url = format!("{}/{name}", self.postgres);
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(8).connect(&url).await?;
        Ok((url, pool))
    }

    /// [`Stack::fresh_database`], migrated as the schema owner
    /// (`serving-layer migrate`) with `segment_size` (default when `None`).
    pub async fn migrated_database(&self, test: &str, segment_size: Option<i64>) -> anyhow::Result<(String, PgPool)> {
        let (url, pool) = self.fresh_database(test).await?;
        platform::db::migrate(&pool, segment_size).await?;
        Ok((url, pool))
    }

    fn admin(&self) -> anyhow::Result<AdminClient<DefaultClientContext>> {
        ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .create()
            .with_context(|| format!("Kafka admin client for {}", self.brokers()))
    }

    /// A new topic for `test` with `partitions` partitions, under a name
    /// no earlier run used.
    ///
    /// Topics are never deleted: tansu 0.6.0's topic deletion (sqlite
    /// storage) removes the metadata of *every* topic of the cluster, which
    /// would pull the topics out from under tests running in parallel.
    pub async fn fresh_topic(&self, test: &str, partitions: i32) -> anyhow::Result<String> {
        self.fresh_topic_with(test, partitions, &[]).await
    }

    /// [`Stack::fresh_topic`] with topic configs, e.g. `("retention.ms", "60000")`.
    pub async fn fresh_topic_with(
        &self,
        test: &str,
        partitions: i32,
        configs: &[(&str, &str)],
    ) -> anyhow::Result<String> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let name = format!("test.{}.{}.{}", sanitize(test), std::process::id(), nanos % 1_000_000_000);
        self.create_topic_with(&name, partitions, configs).await?;
        Ok(name)
    }

    /// Creates topic `name` with `partitions` partitions and waits until the
    /// broker reports it (a topic an earlier attempt created is fine).
    pub async fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        self.create_topic_with(name, partitions, &[]).await
    }

    /// [`Stack::create_topic`] with topic configs.
    pub async fn create_topic_with(&self, name: &str, partitions: i32, configs: &[(&str, &str)]) -> anyhow::Result<()> {
        let name = name.to_string();
        let admin = self.admin()?;
        let opts = AdminOptions::new()
            .operation_timeout(Some(Duration::from_secs(20)))
            .request_timeout(Some(Duration::from_secs(30)));
        // A busy broker can time an admin request out: retry, and accept a
        // topic that an earlier attempt did create.
        let mut last_error = None;
        for _ in 0..3 {
            let mut new = NewTopic::new(&name, partitions, TopicReplication::Fixed(1));
            for (k, v) in configs {
                new = new.set(k, v);
            }
            match admin.create_topics(&[new], &opts).await {
                Ok(results) => match results.into_iter().next() {
                    Some(Ok(_)) | None => break,
                    Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => break,
                    Some(Err((t, e))) => last_error = Some(anyhow::anyhow!("creating topic {t}: {e}")),
                },
                Err(e) => last_error = Some(anyhow::anyhow!("creating topic {name}: {e}")),
            }
            if self.partitions(&name).unwrap_or(0) == partitions as usize {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // Wait until the broker reports the topic with all its partitions.
        for _ in 0..100 {
            if self.partitions(&name)? == partitions as usize {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("topic {name} did not appear with {partitions} partitions")))
    }

    /// What a test of the stream starts from: a fresh topic of `partitions`
    /// for `test`, its DLQ topic, and a fresh database prepared with
    /// segments of `segment_size` offsets.
    pub async fn fresh_stream(&self, test: &str, partitions: i32, segment_size: i64) -> anyhow::Result<FreshStream> {
        let topic = self.fresh_topic(test, partitions).await?;
        let dlq = self.fresh_topic(&format!("{test}_dlq"), 1).await?;
        let (url, pool) = self.migrated_database(test, Some(segment_size)).await?;
        Ok(FreshStream { topic, dlq, url, pool })
    }

    fn metadata_consumer(&self) -> anyhow::Result<BaseConsumer> {
        Ok(ClientConfig::new().set("bootstrap.servers", self.brokers()).create()?)
    }

    pub fn topics(&self) -> anyhow::Result<Vec<String>> {
        let consumer = self.metadata_consumer()?;
        let md = ask_again_while_busy(|| consumer.fetch_metadata(None, Duration::from_secs(10)))?;
        Ok(md.topics().iter().map(|t| t.name().to_string()).collect())
    }

    /// Records in `topic` (sum of high watermarks minus low watermarks).
    pub fn topic_size(&self, topic: &str) -> anyhow::Result<i64> {
        let consumer = self.metadata_consumer()?;
        let mut total = 0;
        for p in 0..self.partitions(topic)? {
            let (low, high) =
                ask_again_while_busy(|| consumer.fetch_watermarks(topic, p as i32, Duration::from_secs(10)))?;
            total += high - low;
        }
        Ok(total)
    }

    pub fn partitions(&self, topic: &str) -> anyhow::Result<usize> {
        let consumer = self.metadata_consumer()?;
        let md = ask_again_while_busy(|| consumer.fetch_metadata(Some(topic), Duration::from_secs(10)))?;
        Ok(md.topics().first().map_or(0, |t| t.partitions().len()))
    }
}

/// A busy local broker may time a metadata request out while the whole
/// suite runs against it: ask again, for up to a minute.
fn ask_again_while_busy<T>(mut ask: impl FnMut() -> rdkafka::error::KafkaResult<T>) -> anyhow::Result<T> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match ask() {
            Ok(v) => return Ok(v),
            Err(e) if std::time::Instant::now() < deadline => eprintln!("broker metadata: {e}; asking again"),
            Err(e) => return Err(e.into()),
        }
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

/// `owner_url` (the schema owner's, `postgres@`) as platform role `role`,
/// which logs in without a password on the local stack.
pub fn role_url(owner_url: &str, role: &str) -> String {
    owner_url.replacen("postgres://postgres@", &format!("postgres://{role}@"), 1)
}

/// The workspace's views folder (`views/`), as `make up` registers it.
pub fn views_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../views")
}

/// The shipped views and the three example view files of
/// `views/examples/` (a catalog view keyed by day, an hourly one with a
/// filtered maximum, one with minimums): what the tests that prove the
/// merge, incremental = full and the Ballista engine register, so they
/// hold for file-defined views too.
pub fn example_views() -> Vec<shared_schema::views::ViewSource> {
    let dir = views_dir().join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir).expect("views/examples").map(|e| e.unwrap().path()).collect();
    files.sort();
    let mut views = shared_schema::views::builtin_sources();
    for path in files {
        let sql = std::fs::read_to_string(&path).unwrap();
        let def = shared_schema::view_sql::parse(path.to_str().unwrap(), &sql).unwrap_or_else(|e| panic!("{e}"));
        views.push(shared_schema::views::ViewSource { def, sql });
    }
    views
}

/// The names of [`example_views`] beyond the shipped ones.
pub fn example_view_names() -> Vec<&'static str> {
    example_views().iter().skip(shared_schema::views::builtin().len()).map(|v| v.def.name).collect()
}

/// Registers [`example_views`] in the database of `pool` (the owner's).
pub async fn register_examples(pool: &PgPool) {
    let changes = platform::views::register(pool, &example_views(), false).await.expect("registering the examples");
    assert_eq!(changes.added, example_view_names(), "the examples are new to this database");
}

/// Path of a workspace binary (`batch-layer`, `speed-layer`, ...), built
/// next to the test executables. `make test` builds every binary first.
pub fn binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps");
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --workspace --bins` first", path.display());
    path
}

/// Runs workspace binary `name` with `args` and `envs`, pointed at a broker
/// and a database where nothing listens (a command-line mistake must be
/// reported before any connection), and asserts that it fails with exactly
/// one line: `error: {expected}`, no backtrace.
pub fn assert_one_line_error(name: &str, args: &[&str], envs: &[(&str, &str)], expected: &str) {
    let out = std::process::Command::new(binary(name))
        .args(args)
        .env("KAFKA_BROKERS", "127.0.0.1:9")
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:9/none")
        .env("RUST_BACKTRACE", "1")
        .envs(envs.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("running {name}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{name} {args:?} was accepted");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines, [format!("error: {expected}")], "{name} {args:?}");
}

/// A command running workspace binary `name` against `brokers` and
/// `database_url`, its standard error into `log` and its output discarded,
/// killed when dropped: add the arguments and spawn.
pub fn command(name: &str, brokers: &str, database_url: &str, log: std::process::Stdio) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(binary(name));
    command
        .env("KAFKA_BROKERS", brokers)
        .env("DATABASE_URL", database_url)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    command
}

/// `speed-layer run` as deployed: its default consumer-group mode (group
/// `<topic>.speed`), as role `speed_writer` of the database `owner_url`
/// reaches, its log at `log`; killed when dropped.
pub fn speed_layer(
    brokers: &str,
    owner_url: &str,
    topic: &str,
    dlq: &str,
    log: &std::path::Path,
) -> tokio::process::Child {
    let log = std::fs::File::create(log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
    command("speed-layer", brokers, &role_url(owner_url, "speed_writer"), log.into())
        .args(["run", "--topic", topic, "--dlq-topic", dlq, "--group-id", &format!("{topic}.speed")])
        .args(["--ops-addr", "127.0.0.1:0"])
        .spawn()
        .expect("starting speed-layer run")
}

/// The last `lines` lines of the log at `path`, for a failure message.
pub fn log_tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect()
}
