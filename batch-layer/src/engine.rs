//! Where a run's SQL executes: in this process (the default) or on a
//! Ballista cluster (`run --engine ballista://HOST:PORT`).
//!
//! A run's SQL is the same whichever engine executes it; only the session
//! and the form its lake tables take differ. In process, the lake's tables
//! are delta-rs providers ([`crate::lake::register`]). On a cluster the plan
//! travels to the scheduler and its stages to the executors, so the table
//! must travel too: it is registered as [`LakeFiles`], the pinned snapshot's
//! file list, which [`LakeCodec`] carries in the plan. The scheduler and the
//! executors are the `batch-cluster` binary.
//!
//! Guarantee: [`Engine::context`] fails before a run starts, with a message
//! that names the fix, when the scheduler cannot be reached.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use ballista::prelude::{SessionConfigExt, SessionContextExt};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::prelude::{SessionConfig, SessionContext};
use deltalake::DeltaTable;
use url::Url;

use crate::lake::{self, LakeError};
use crate::lake_files::{LakeCodec, LakeFiles, LakeFilesError};

/// How long `run` waits for the scheduler to accept a connection.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `HOST:PORT` (an IPv6 host in brackets, kept so) and nothing else: the
/// form of a scheduler's address, here and for `batch-cluster executor`.
pub fn host_port(s: &str) -> Option<(String, u16)> {
    let url = Url::parse(&format!("df://{s}")).ok()?;
    match (url.host_str(), url.port(), url.path()) {
        (Some(host), Some(port), "") if !host.is_empty() => Some((host.to_string(), port)),
        _ => None,
    }
}

/// Where a run's SQL executes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Engine {
    /// DataFusion in this process (the default).
    #[default]
    InProcess,
    /// A Ballista scheduler at `host:port`.
    Ballista { scheduler: String },
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "invalid engine {0:?}: give `local` (in this process) or `ballista://HOST:PORT` (a Ballista scheduler, e.g. ballista://127.0.0.1:50050 after `make cluster-up`)"
    )]
    Invalid(String),
    #[error(
        "cannot reach the Ballista scheduler at {scheduler}: {source}; is it running (`make cluster-up`, or `batch-cluster scheduler`)?"
    )]
    Unreachable { scheduler: String, source: std::io::Error },
    #[error(
        "the Ballista scheduler at {scheduler} did not answer in {} s; is it running (`make cluster-up`, or `batch-cluster scheduler`)?",
        CONNECT_TIMEOUT.as_secs()
    )]
    NoAnswer { scheduler: String },
    #[error("cannot open a session on the Ballista scheduler at {scheduler}: {source}")]
    Session { scheduler: String, source: Box<DataFusionError> },
    /// Registering a table in process.
    #[error(transparent)]
    Lake(Box<LakeError>),
    /// Registering a table for the cluster.
    #[error(transparent)]
    LakeFiles(Box<LakeFilesError>),
}

impl From<LakeError> for EngineError {
    fn from(e: LakeError) -> Self {
        Self::Lake(Box::new(e))
    }
}

impl From<LakeFilesError> for EngineError {
    fn from(e: LakeFilesError) -> Self {
        Self::LakeFiles(Box::new(e))
    }
}

impl Engine {
    /// Parses `--engine` / `BATCH_ENGINE`: `local` (or empty) or
    /// `ballista://HOST:PORT`.
    pub fn parse(s: &str) -> Result<Self, EngineError> {
        let s = s.trim();
        if s.is_empty() || s == "local" || s == "in-process" {
            return Ok(Self::InProcess);
        }
        let invalid = || EngineError::Invalid(s.to_string());
        let rest = s.strip_prefix("ballista://").ok_or_else(invalid)?.trim_end_matches('/');
        let (host, port) = host_port(rest).ok_or_else(invalid)?;
        Ok(Self::Ballista { scheduler: format!("{host}:{port}") })
    }

    /// A session that runs its queries on this engine.
    pub async fn context(&self) -> Result<SessionContext, EngineError> {
        match self {
            Self::InProcess => Ok(SessionContext::new()),
            Self::Ballista { scheduler } => {
                // The client connects lazily, at the first query; fail here,
                // before a run starts, with a message that names the fix.
                match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(scheduler.as_str())).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(source)) => return Err(EngineError::Unreachable { scheduler: scheduler.clone(), source }),
                    Err(_) => return Err(EngineError::NoAnswer { scheduler: scheduler.clone() }),
                }
                let session = |source| EngineError::Session { scheduler: scheduler.clone(), source: Box::new(source) };
                let config = SessionConfig::new_with_ballista()
                    .with_ballista_logical_extension_codec(Arc::new(LakeCodec::default()));
                let state = crate::stores::session_state(config).map_err(session)?;
                SessionContext::remote_with_state(&format!("df://{scheduler}"), state).await.map_err(session)
            }
        }
    }

    /// Registers `table`'s pinned snapshot in `ctx` as `name`, in the form
    /// this engine reads.
    pub async fn register(&self, ctx: &SessionContext, name: &str, table: &DeltaTable) -> Result<(), EngineError> {
        match self {
            Self::InProcess => Ok(lake::register(ctx, name, table).await?),
            Self::Ballista { .. } => {
                let files = LakeFiles::from_snapshot(name, table).await?;
                ctx.register_table(name, Arc::new(files))
                    .map_err(|source| LakeFilesError::DataFusion { table: name.into(), source })?;
                Ok(())
            }
        }
    }

    /// Registers an empty table of `schema` as `name` (a table the lake
    /// does not have yet).
    pub fn register_empty(&self, ctx: &SessionContext, name: &str, schema: SchemaRef) -> DfResult<()> {
        match self {
            Self::InProcess => {
                ctx.register_table(name, Arc::new(datafusion::datasource::MemTable::try_new(schema, vec![vec![]])?))?;
            }
            Self::Ballista { .. } => {
                ctx.register_table(name, Arc::new(LakeFiles::empty(name, schema)))?;
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::InProcess => f.write_str("local"),
            Self::Ballista { scheduler } => write!(f, "ballista://{scheduler}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engines_parse_and_mistakes_name_the_fix() {
        assert_eq!(Engine::parse("").unwrap(), Engine::InProcess);
        assert_eq!(Engine::parse("local").unwrap(), Engine::InProcess);
        assert_eq!(
            Engine::parse("ballista://127.0.0.1:50050").unwrap(),
            Engine::Ballista { scheduler: "127.0.0.1:50050".into() }
        );
        assert_eq!(Engine::parse("ballista://127.0.0.1:50050").unwrap().to_string(), "ballista://127.0.0.1:50050");
        for bad in ["ballista://host", "spark://h:1", "ballista://h:1/x", "ballista://:1"] {
            let e = Engine::parse(bad).unwrap_err().to_string();
            assert!(e.contains("ballista://HOST:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn scheduler_addresses_are_host_and_port_only() {
        assert_eq!(host_port("127.0.0.1:50050"), Some(("127.0.0.1".into(), 50050)));
        assert_eq!(host_port("[::1]:50050"), Some(("[::1]".into(), 50050)));
        for bad in ["127.0.0.1", "h:1/x", ":1", "h:99999"] {
            assert_eq!(host_port(bad), None, "{bad}");
        }
    }
}
