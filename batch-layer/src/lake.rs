//! The Delta Lake: where it is, its tables, and the Kafka offsets each table
//! has committed.
//!
//! `LAKE_URI` is a local folder (default `.local/lake`) or an object-store
//! URL (`s3://bucket/path`). Each table lives in a sub-folder of it. The
//! ingest stores, per Kafka partition, the next offset to read as a Delta
//! application transaction (`txn` action, app id [`ingest_app_id`]) in the
//! same commit as the data, as kafka-delta-ingest does: the table itself
//! says exactly which offsets it holds.

use std::collections::BTreeMap;
use std::path::Path;

use deltalake::arrow::datatypes::Schema as ArrowSchema;
use deltalake::kernel::StructType;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel as _;
use deltalake::{DeltaTable, DeltaTableError};
use shared_schema::cut::{Offset, Partition};
use url::Url;

/// Table names inside the lake (the contract of `DESIGN.md`).
pub const EVENTS_TABLE: &str = "events";
pub const REJECTED_TABLE: &str = "events_rejected";
pub const PRODUCTS_TABLE: &str = "products";

#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    #[error("invalid LAKE_URI {uri:?}: {reason}")]
    Uri { uri: String, reason: String },
    #[error("cannot create the lake folder {path}: {source}")]
    Folder { path: String, source: std::io::Error },
    #[error("Delta table {table}: {source}")]
    Delta { table: String, source: DeltaTableError },
    #[error("reading Delta table {table} with DataFusion: {source}")]
    Scan { table: String, source: datafusion::error::DataFusionError },
}

/// Where the lake is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lake {
    root: Url,
}

impl Lake {
    /// Parses `LAKE_URI`: a URL with a scheme (`s3://`, `file://`, ...) or a
    /// local path, relative paths taken from the current directory. A local
    /// folder is created when missing.
    pub fn parse(uri: &str) -> Result<Self, LakeError> {
        let err = |reason: String| LakeError::Uri { uri: uri.to_string(), reason };
        if uri.trim().is_empty() {
            return Err(err("empty; give a folder or an s3:// URL".into()));
        }
        let root = match Url::parse(uri) {
            Ok(url) if url.scheme().len() > 1 => url,
            _ => {
                let path = Path::new(uri);
                let abs = if path.is_absolute() {
                    path.to_path_buf()
                } else {
                    std::env::current_dir().map_err(|e| err(e.to_string()))?.join(path)
                };
                std::fs::create_dir_all(&abs)
                    .map_err(|source| LakeError::Folder { path: abs.display().to_string(), source })?;
                let abs = abs.canonicalize().map_err(|e| err(e.to_string()))?;
                Url::from_directory_path(&abs).map_err(|()| err("not an absolute path".into()))?
            }
        };
        let mut root = root;
        if !root.path().ends_with('/') {
            root.set_path(&format!("{}/", root.path()));
        }
        Ok(Self { root })
    }

    pub fn root(&self) -> &Url {
        &self.root
    }

    /// URL of table `name`.
    pub fn table_url(&self, name: &str) -> Url {
        self.root.join(&format!("{name}/")).expect("a table name is a valid path segment")
    }

    /// Opens table `name`, creating it with `schema` and `partitions` when
    /// it does not exist yet.
    pub async fn open_or_create(
        &self,
        name: &str,
        schema: &ArrowSchema,
        partitions: &[&str],
    ) -> Result<DeltaTable, LakeError> {
        let delta = |source| LakeError::Delta { table: name.to_string(), source };
        let url = self.table_url(name);
        if url.scheme() == "file"
            && let Ok(path) = url.to_file_path()
        {
            std::fs::create_dir_all(&path)
                .map_err(|source| LakeError::Folder { path: path.display().to_string(), source })?;
        }
        let table = DeltaTable::try_from_url(url).await.map_err(delta)?;
        if table.version().is_some() {
            return Ok(table);
        }
        let columns: StructType = schema.try_into_kernel().map_err(|e| delta(e.into()))?;
        let created = table
            .create()
            .with_table_name(name)
            .with_columns(columns.fields().cloned())
            .with_partition_columns(partitions.iter().copied())
            .with_save_mode(deltalake::protocol::SaveMode::Ignore)
            .await;
        match created {
            Ok(t) => Ok(t),
            // Another process created it first: open theirs.
            Err(_) => deltalake::open_table(self.table_url(name)).await.map_err(delta),
        }
    }

    /// Opens an existing table, or `None` when there is none yet.
    pub async fn open(&self, name: &str) -> Result<Option<DeltaTable>, LakeError> {
        let url = self.table_url(name);
        if url.scheme() == "file" && url.to_file_path().is_ok_and(|p| !p.exists()) {
            return Ok(None);
        }
        let table = DeltaTable::try_from_url(self.table_url(name))
            .await
            .map_err(|source| LakeError::Delta { table: name.to_string(), source })?;
        Ok(table.version().is_some().then_some(table))
    }
}

/// Registers `table`'s current snapshot in `ctx` under `name`, with the
/// object store it needs, so DataFusion SQL can read it.
///
/// The scan takes its Parquet settings from the session, as DataFusion's
/// own tables do. (Without a session, delta-rs pushes every filter into the
/// Parquet decoder, which DataFusion does not by default; the offset cut
/// keeps almost every row, so row-level pushdown has little to skip.)
pub async fn register(
    ctx: &datafusion::prelude::SessionContext,
    name: &str,
    table: &DeltaTable,
) -> Result<(), LakeError> {
    let delta = |source: DeltaTableError| LakeError::Delta { table: name.to_string(), source };
    let state = ctx.state();
    table.update_datafusion_session(&state).map_err(delta)?;
    let provider = table
        .table_provider()
        .with_session(std::sync::Arc::new(state))
        .await
        .map_err(|source| LakeError::Scan { table: name.to_string(), source })?;
    ctx.register_table(name, provider).map_err(|source| LakeError::Scan { table: name.to_string(), source })?;
    Ok(())
}

/// The Delta application id under which the ingest records partition `p`
/// of `topic`.
pub fn ingest_app_id(topic: &str, partition: Partition) -> String {
    format!("lambda-ingest/{topic}/{}", partition.0)
}

/// The Delta application id under which the ingest records how many
/// partitions `topic` has (its version the count): a partition whose
/// records all went to `events_rejected` or were dropped has no row in
/// `events`, yet its offsets are the lake's all the same.
pub fn partitions_app_id(topic: &str) -> String {
    format!("lambda-ingest/{topic}/partitions")
}

/// How many partitions of `topic` the ingest last saw, if it recorded it.
pub async fn recorded_partitions(table: &DeltaTable, topic: &str) -> Result<Option<i32>, DeltaTableError> {
    if table.version().is_none() {
        return Ok(None);
    }
    let state = table.snapshot()?;
    let n = state.transaction_version(table.log_store().as_ref(), partitions_app_id(topic)).await?;
    Ok(n.and_then(|n| i32::try_from(n).ok()))
}

/// Per partition, the next offset `table` expects from `topic` (offsets
/// below it are in the table exactly once). Partitions never written are
/// absent.
pub async fn committed_offsets(
    table: &DeltaTable,
    topic: &str,
    partitions: impl IntoIterator<Item = Partition>,
) -> Result<BTreeMap<Partition, Offset>, DeltaTableError> {
    let versions = txn_versions(table, partitions, |p| ingest_app_id(topic, p)).await?;
    Ok(versions.into_iter().map(|(p, v)| (p, Offset(v))).collect())
}

/// Per partition, the version of the `txn` action `app_id(partition)` in
/// `table`'s snapshot; partitions without one are absent. The lookups run
/// at once: each one replays the log back to the newest commit holding its
/// action (the whole log for an action never written, as the ledger's
/// usually are).
pub async fn txn_versions(
    table: &DeltaTable,
    partitions: impl IntoIterator<Item = Partition>,
    app_id: impl Fn(Partition) -> String,
) -> Result<BTreeMap<Partition, i64>, DeltaTableError> {
    if table.version().is_none() {
        return Ok(BTreeMap::new());
    }
    let state = table.snapshot()?;
    let log_store = table.log_store();
    let lookups = partitions.into_iter().map(|p| {
        let (state, log_store, id) = (&state, &log_store, app_id(p));
        async move { Ok::<_, DeltaTableError>((p, state.transaction_version(log_store.as_ref(), id).await?)) }
    });
    let found = futures::future::try_join_all(lookups).await?;
    Ok(found.into_iter().filter_map(|(p, v)| v.map(|v| (p, v))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_paths_become_file_urls_and_are_created() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::parse(dir.path().join("lake").to_str().unwrap()).unwrap();
        assert_eq!(lake.root().scheme(), "file");
        assert!(dir.path().join("lake").is_dir());
        assert!(lake.table_url("events").path().ends_with("/lake/events/"));
    }

    #[test]
    fn object_store_urls_are_kept() {
        let lake = Lake::parse("s3://bucket/prefix").unwrap();
        assert_eq!(lake.table_url("events").as_str(), "s3://bucket/prefix/events/");
    }

    #[test]
    fn empty_uri_is_a_clear_error() {
        let e = Lake::parse("  ").unwrap_err().to_string();
        assert!(e.contains("LAKE_URI"), "{e}");
    }
}
