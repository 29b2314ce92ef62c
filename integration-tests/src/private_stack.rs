//! A stack of one's own for fault-injection tests: a PostgreSQL server and a
//! tansu broker on free loopback ports, with their data in a fresh directory.
//! Restarting either cannot disturb the tests that share the local stack
//! (5433/9092). Dropping the stack stops both and removes the directory
//! (kept, and its path printed, when the test panicked).
//!
//! Needs Debian's PostgreSQL server under `/usr/lib/postgresql/*/bin` and
//! tansu in `$LAMBDA_CACHE/tools/bin` (`scripts/stack.sh tools` installs
//! both). As root, PostgreSQL runs as the `postgres` user.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use sqlx::{AssertSqlSafe, Executor, PgPool};

use crate::broker::OwnBroker;
use crate::fixture::free_port;

/// A private PostgreSQL and tansu broker; see the module docs.
#[derive(Debug)]
pub struct PrivateStack {
    dir: PathBuf,
    pg_bin: PathBuf,
    pg_port: u16,
    broker: OwnBroker,
    /// The hot standby's port, once [`PrivateStack::start_replica`] ran.
    replica_port: Option<u16>,
}

impl PrivateStack {
    /// Initialises and starts both servers; returns once both answer.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with_maintenance(None).await
    }

    /// A private stack whose broker applies topic retention every
    /// `maintenance` (tansu's storage URL parameter), so a test can have
    /// records removed before a layer reads them.
    pub async fn start_with_maintenance(maintenance: Option<Duration>) -> anyhow::Result<Self> {
        let pg_bin = pg_bin()?;

        static SEQ: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let dir = PathBuf::from("/var/tmp").join(format!(
            "lambda-private-{}-{}-{nanos}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(dir.join("pg/run")).with_context(|| format!("creating {}", dir.display()))?;
        let broker = OwnBroker::in_dir(&dir.join("tansu"), maintenance)?;
        let mut stack = Self { dir, pg_bin, pg_port: free_port()?, broker, replica_port: None };
        if is_root() {
            run(Command::new("chown").arg("-R").arg("postgres:").arg(stack.dir.join("pg")))?;
            // PostgreSQL must traverse the directory (it is 0755 by umask, normally).
            run(Command::new("chmod").arg("755").arg(&stack.dir))?;
        }
        run(stack.as_postgres(stack.pg_bin.join("initdb")).arg("-D").arg(stack.dir.join("pg/data")).args([
            "-U",
            "postgres",
            "--auth=trust",
            "--no-locale",
            "-E",
            "UTF8",
            "--no-sync",
        ]))
        .context("initdb")?;
        stack.start_postgres().await?;
        stack.broker.start().await?;
        Ok(stack)
    }

    /// Kafka bootstrap servers of the private broker.
    pub fn brokers(&self) -> String {
        self.broker.brokers()
    }

    /// URL of database `db` on the private server.
    pub fn database_url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.pg_port)
    }

    /// Creates database `db` and returns its URL and a small pool.
    pub async fn create_database(&self, db: &str) -> anyhow::Result<(String, PgPool)> {
        let admin =
            PgPool::connect(&self.database_url("postgres")).await.context("connecting to the private server")?;
        admin.execute(AssertSqlSafe(format!("CREATE DATABASE {db}"))).await?;
        admin.close().await;
        let url = self.database_url(db);
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&url).await?;
        Ok((url, pool))
    }

    /// Creates `topic` and waits until the broker reports all its partitions.
    pub async fn create_topic(&self, topic: &str, partitions: i32) -> anyhow::Result<()> {
        self.create_topic_with(topic, partitions, &[]).await
    }

    /// A topic with topic configs, e.g. `("retention.ms", "60000")`.
    pub async fn create_topic_with(
        &self,
        topic: &str,
        partitions: i32,
        configs: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let admin: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", self.brokers()).create()?;
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        for (k, v) in configs {
            new = new.set(k, v);
        }
        for r in admin.create_topics(&[new], &opts).await? {
            r.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
        }
        for _ in 0..100 {
            if self.partitions(topic).await? == partitions as usize {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("topic {topic} did not appear with {partitions} partitions")
    }

    async fn partitions(&self, topic: &str) -> anyhow::Result<usize> {
        let brokers = self.brokers();
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &brokers).create()?;
            let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(5))?;
            Ok(md.topics().first().map_or(0, |t| t.partitions().len()))
        })
        .await?
    }

    /// Stops PostgreSQL (immediate: connections drop mid-transaction), keeps
    /// it down until `down_until` completes (a sleep, or a poll for the
    /// clients to notice), starts it again on the same port and data.
    pub async fn restart_postgres(&mut self, down_until: impl Future<Output = ()>) -> anyhow::Result<()> {
        self.stop_postgres()?;
        down_until.await;
        self.start_postgres().await
    }

    /// Kills the broker (SIGKILL), keeps it down until `down_until`
    /// completes, starts it again on the same port and storage: topics,
    /// records and group offsets survive.
    /// See [`OwnBroker::log_mark`].
    pub fn broker_log_mark(&self) -> u64 {
        self.broker.log_mark()
    }

    /// See [`OwnBroker::storage_panicked_since`].
    pub fn broker_storage_panicked_since(&self, mark: u64) -> bool {
        self.broker.storage_panicked_since(mark)
    }

    pub async fn restart_broker(&mut self, down_until: impl Future<Output = ()>) -> anyhow::Result<()> {
        self.broker.kill();
        down_until.await;
        self.broker.start().await
    }

    /// `program` as the `postgres` user when root (the server refuses root).
    fn as_postgres(&self, program: PathBuf) -> Command {
        let mut c = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        c.current_dir(self.dir.join("pg"));
        c
    }

    async fn start_postgres(&self) -> anyhow::Result<()> {
        self.pg_ctl_start(&self.dir.join("pg/data"), self.pg_port, &self.dir.join("pg/postgres.log")).await
    }

    /// Starts the server whose data is in `data` on `port`; returns once it
    /// accepts connections.
    async fn pg_ctl_start(&self, data: &Path, port: u16, log: &Path) -> anyhow::Result<()> {
        let options = format!("-p {port} -k {} -c listen_addresses=127.0.0.1", self.dir.join("pg/run").display());
        let mut cmd = self.as_postgres(self.pg_bin.join("pg_ctl"));
        cmd.arg("-D").arg(data).arg("-l").arg(log).args(["-w", "-t", "60", "-o", &options, "start"]);
        tokio::task::spawn_blocking(move || run(&mut cmd))
            .await?
            .with_context(|| format!("starting PostgreSQL; see {}", log.display()))?;
        let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        for _ in 0..200 {
            if let Ok(pool) = PgPool::connect(&url).await {
                pool.close().await;
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("PostgreSQL does not answer on port {port}")
    }

    /// A hot standby of the private server on a port of its own, streaming
    /// its WAL: copied with `pg_basebackup -R` (which writes the
    /// standby's `primary_conninfo`), as a deployment would make one.
    pub async fn start_replica(&mut self) -> anyhow::Result<()> {
        let data = self.dir.join("pg/replica");
        let mut copy = self.as_postgres(self.pg_bin.join("pg_basebackup"));
        copy.args(["-h", "127.0.0.1", "-p", &self.pg_port.to_string(), "-U", "postgres", "-D"])
            .arg(&data)
            .args(["-R", "-X", "stream", "-c", "fast"]);
        tokio::task::spawn_blocking(move || run(&mut copy)).await?.context("pg_basebackup")?;
        let port = free_port()?;
        self.pg_ctl_start(&data, port, &self.dir.join("pg/replica.log")).await?;
        self.replica_port = Some(port);
        Ok(())
    }

    /// URL of database `db` on the hot standby, as `role`.
    pub fn replica_url(&self, role: &str, db: &str) -> Option<String> {
        self.replica_port.map(|port| format!("postgres://{role}@127.0.0.1:{port}/{db}"))
    }

    fn stop_postgres(&self) -> anyhow::Result<()> {
        self.pg_ctl_stop(&self.dir.join("pg/data"))
    }

    /// Stops the server of `data` at once (connections drop mid-transaction).
    fn pg_ctl_stop(&self, data: &Path) -> anyhow::Result<()> {
        run(self.as_postgres(self.pg_bin.join("pg_ctl")).arg("-D").arg(data).args(["-m", "immediate", "-w", "stop"]))
            .context("stopping PostgreSQL")
    }
}

impl Drop for PrivateStack {
    fn drop(&mut self) {
        self.broker.kill();
        if self.replica_port.is_some() {
            let _ = self.pg_ctl_stop(&self.dir.join("pg/replica"));
        }
        let _ = self.stop_postgres();
        if std::thread::panicking() {
            eprintln!("private stack kept for inspection: {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The newest Debian PostgreSQL server binaries.
fn pg_bin() -> anyhow::Result<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("no /usr/lib/postgresql: run `scripts/stack.sh tools`")?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).context("no PostgreSQL server under /usr/lib/postgresql/*/bin")
}

fn is_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n")))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
