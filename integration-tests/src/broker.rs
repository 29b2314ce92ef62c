//! A tansu broker of a test's own: a process on a free loopback port with
//! its sqlite storage in a fresh directory, killed (and the directory
//! removed, unless the test panicked) when dropped.
//!
//! Why tests do not share one broker: tansu 0.6's sqlite engine serialises
//! every write of every topic on one database file, which grows with every
//! test; under the whole suite's load its acknowledgements fell far enough
//! behind that idempotent producers retried, and a retry can panic the
//! storage (`lite.rs:503`, after a `DuplicateSequenceNumber`), failing every
//! test after it. A broker per test keeps each file small and each test's
//! load its own. Needs tansu in `$LAMBDA_CACHE/tools/bin` (`TANSU`
//! overrides; `scripts/stack.sh tools` installs it).

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::fixture::free_port;

/// A tansu broker process of one's own; see the module docs.
#[derive(Debug)]
pub struct OwnBroker {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
    /// How often the broker applies retention (tansu's default: 10 minutes).
    maintenance: Option<Duration>,
    child: Option<Child>,
    /// Whether `dir` is ours to remove on drop.
    owns_dir: bool,
}

impl OwnBroker {
    /// A broker with its storage in a new directory under `/var/tmp`,
    /// started and answering.
    pub fn launch() -> anyhow::Result<Self> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let dir = PathBuf::from("/var/tmp").join(format!(
            "lambda-broker-{}-{}-{nanos}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let mut broker = Self::in_dir(&dir, None)?;
        broker.owns_dir = true;
        broker.start_blocking()?;
        Ok(broker)
    }

    /// A broker (not yet started) keeping its storage in `dir`, which the
    /// caller owns; `maintenance` as for tansu's storage URL.
    pub fn in_dir(dir: &Path, maintenance: Option<Duration>) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            port: free_port()?,
            bin: tansu_bin()?,
            maintenance,
            child: None,
            owns_dir: false,
        })
    }

    /// Kafka bootstrap servers of this broker.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the process and waits (blocking the thread) until it answers.
    pub fn start_blocking(&mut self) -> anyhow::Result<()> {
        self.spawn()?;
        for _ in 0..300 {
            self.ensure_running()?;
            if metadata_answers(self.port) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("tansu does not answer on 127.0.0.1:{}; see {}", self.port, self.log().display())
    }

    /// [`OwnBroker::start_blocking`] without blocking the async runtime.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        self.spawn()?;
        for _ in 0..300 {
            self.ensure_running()?;
            let port = self.port;
            if tokio::task::spawn_blocking(move || metadata_answers(port)).await.unwrap_or(false) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("tansu does not answer on 127.0.0.1:{}; see {}", self.port, self.log().display())
    }

    /// SIGKILL: a crash. (tansu 0.6.0 on SIGTERM stops its storage before
    /// its listeners and can leave the idempotent-producer state such that the
    /// restarted broker's storage panics on the next produce.)
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log(&self) -> PathBuf {
        self.dir.join("tansu.log")
    }

    /// How long the broker's log is: a mark for [`Self::storage_panicked_since`].
    pub fn log_mark(&self) -> u64 {
        std::fs::metadata(self.log()).map(|m| m.len()).unwrap_or(0)
    }

    /// Whether tansu's storage task panicked after `mark`. tansu 0.6's
    /// sqlite engine can panic on the first idempotent produce after a
    /// restart (`lite.rs:503 "more or less than one row"`); the broker then
    /// answers every request with `UnableToSend` while its process stays up.
    /// A broker bug, not its clients': only another restart cures it.
    pub fn storage_panicked_since(&self, mark: u64) -> bool {
        let text = std::fs::read(self.log()).unwrap_or_default();
        let after = &text[(mark as usize).min(text.len())..];
        String::from_utf8_lossy(after).contains("more or less than one row")
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log())?;
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let storage = match self.maintenance {
            Some(every) => format!("sqlite://tansu.db?maintenance_interval={}ms", every.as_millis()),
            None => "sqlite://tansu.db".to_string(),
        };
        let child = Command::new(&self.bin)
            .current_dir(&self.dir)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", &storage])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// An error when the process has exited (it never should on its own).
    fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            bail!("tansu exited with {status}; see {}", self.log().display());
        }
        Ok(())
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        self.kill();
        if !self.owns_dir {
            return;
        }
        if std::thread::panicking() {
            eprintln!("broker storage kept for inspection: {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Where tansu is installed: `TANSU`, else `$LAMBDA_CACHE/tools/bin/tansu`
/// (the cache defaults to `~/.cache/lambda-platform`, as in the Makefile).
fn tansu_bin() -> anyhow::Result<PathBuf> {
    let bin = std::env::var_os("TANSU").map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("LAMBDA_CACHE").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/lambda-platform")
        });
        cache.join("tools/bin/tansu")
    });
    anyhow::ensure!(bin.exists(), "{} is missing: run `scripts/stack.sh tools`", bin.display());
    Ok(bin)
}

/// Whether a broker on `port` accepts a connection and answers a metadata
/// request within two seconds.
fn metadata_answers(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err() {
        return false;
    }
    let consumer: Result<BaseConsumer, _> = ClientConfig::new().set("bootstrap.servers", addr.to_string()).create();
    consumer.is_ok_and(|c| c.fetch_metadata(None, Duration::from_secs(2)).is_ok())
}
