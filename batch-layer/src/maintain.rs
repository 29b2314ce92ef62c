//! `batch-layer maintain` (also run by `schedule`): keeps the lake fast as
//! it ages. The ingest writes a file per lake partition every flush (about
//! 60 small files an hour at the default 60 s); a run then opens thousands
//! of files and replays a long log. Maintenance, per table:
//!
//! 1. **Compact closed partitions**: a Delta OPTIMIZE restricted, by
//!    partition filters, to the hours (`events`) or days (`events_rejected`)
//!    that ended more than `closed_after` ago and hold more than one file.
//!    The hour being written is left alone, so the ingest's appends never
//!    meet the compaction. An OPTIMIZE commit only replaces files: the
//!    rows, the per-file row counts the reconciliation adds up and the
//!    `txn` actions (the ingest's offsets, the ledger) are unchanged.
//! 2. **Vacuum** the data files no longer in the snapshot and older than
//!    `retention` (the replaced small files), so a run that pinned an
//!    older snapshot still finds its files.
//! 3. **Checkpoint** the log (before the compaction: opening the table then
//!    reads one Parquet file and this maintenance's few commits instead of
//!    every commit), and **clean up** log entries older than `retention`.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use deltalake::operations::vacuum::VacuumMode;
use deltalake::{DeltaTable, DeltaTableError};
use deltalake::{FilterOp, FilterValue};
use shared_schema::schema::Hour;

use crate::lake::{EVENTS_TABLE, Lake, LakeError, REJECTED_TABLE};
use crate::lake_files::{LakeFiles, LakeFilesError};

/// What maintenance does and keeps.
#[derive(Debug, Clone)]
pub struct MaintainConfig {
    pub lake: Lake,
    /// A partition is compacted once its hour (or day) ended this long ago.
    pub closed_after: Duration,
    /// Replaced files and log entries are kept this long.
    pub retention: Duration,
}

/// Defaults of [`MaintainConfig`].
pub const DEFAULT_CLOSED_AFTER: Duration = Duration::from_secs(2 * 3600);
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

impl MaintainConfig {
    pub fn new(lake: Lake) -> Self {
        Self { lake, closed_after: DEFAULT_CLOSED_AFTER, retention: DEFAULT_RETENTION }
    }
}

/// What one table's maintenance did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableMaintained {
    pub table: &'static str,
    /// Lake partitions (hours or days) compacted.
    pub partitions: u64,
    pub files_removed: u64,
    pub files_added: u64,
    /// Live data files afterwards.
    pub files: u64,
    pub logs_removed: u64,
    pub files_vacuumed: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MaintainError {
    #[error("PostgreSQL (the lake fence): {0}")]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Lake(#[from] LakeError),
    #[error(transparent)]
    Files(#[from] LakeFilesError),
    #[error("{step} of lake table `{table}`: {source}")]
    Delta {
        table: &'static str,
        step: &'static str,
        #[source]
        source: Box<DeltaTableError>,
    },
}

/// Maintains `events` and `events_rejected` (tables not created yet are
/// skipped); `now` decides which partitions are closed. Holds the lake
/// fence shared throughout, as the ingest does around a flush: a
/// `forget-user` rewriting the lake waits for it, and it for the rewrite.
pub async fn maintain(
    config: &MaintainConfig,
    pool: &sqlx::PgPool,
    now: DateTime<Utc>,
) -> Result<Vec<TableMaintained>, MaintainError> {
    let fence = platform::forgotten::LakeFence::shared(pool).await?;
    let done = maintain_tables(config, now).await;
    fence.release().await?;
    done
}

async fn maintain_tables(config: &MaintainConfig, now: DateTime<Utc>) -> Result<Vec<TableMaintained>, MaintainError> {
    let mut done = Vec::new();
    for (name, partition_end) in [(EVENTS_TABLE, hour_end as PartitionEnd), (REJECTED_TABLE, day_end)] {
        let Some(table) = config.lake.open(name).await? else { continue };
        let report = maintain_table(name, table, partition_end, config, now).await?;
        metrics::counter!("batch_maintain_files_removed_total", "table" => name).increment(report.files_removed);
        metrics::gauge!("batch_lake_files", "table" => name).set(report.files as f64);
        tracing::info!(?report, "lake table maintained");
        done.push(report);
    }
    Ok(done)
}

/// When a lake partition (its values, in the table's partition column
/// order) ends; `None` when they do not read as one.
type PartitionEnd = fn(&[Option<String>]) -> Option<DateTime<Utc>>;

fn hour_end(values: &[Option<String>]) -> Option<DateTime<Utc>> {
    let [Some(date), Some(hour)] = values else { return None };
    Some(Hour::from_partition(date, hour)?.next().start())
}

fn day_end(values: &[Option<String>]) -> Option<DateTime<Utc>> {
    let [Some(date)] = values else { return None };
    let date = NaiveDate::parse_from_str(date, "%Y-%m-%d").ok()?;
    Some(date.and_hms_opt(0, 0, 0)?.and_utc() + chrono::TimeDelta::days(1))
}

/// The closed partitions of `files` that hold more than one file, grouped
/// as OPTIMIZE filters take them: by the first partition column's value,
/// the second column's values (none for a table with one column).
fn due(
    files: &BTreeMap<Vec<Option<String>>, usize>,
    partition_end: PartitionEnd,
    closed_before: DateTime<Utc>,
) -> BTreeMap<String, Vec<String>> {
    let mut due: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (values, n) in files {
        if *n < 2 || partition_end(values).is_none_or(|end| end > closed_before) {
            continue;
        }
        match values.as_slice() {
            [Some(first)] => {
                due.entry(first.clone()).or_default();
            }
            [Some(first), Some(second)] => due.entry(first.clone()).or_default().push(second.clone()),
            _ => {}
        }
    }
    due
}

async fn maintain_table(
    name: &'static str,
    mut table: DeltaTable,
    partition_end: PartitionEnd,
    config: &MaintainConfig,
    now: DateTime<Utc>,
) -> Result<TableMaintained, MaintainError> {
    let delta = |step| move |source| MaintainError::Delta { table: name, step, source: Box::new(source) };
    let mut report = TableMaintained { table: name, ..TableMaintained::default() };
    // The checkpoint first: the clean-up below keeps every entry newer than
    // the cut-off (this maintenance's own commits among them) and what comes
    // after the newest checkpoint before them.
    deltalake::checkpoints::create_checkpoint(&table, None).await.map_err(delta("checkpoint"))?;
    let files = LakeFiles::from_snapshot(name, &table).await?;
    let columns = files.partition_columns().to_vec();
    let closed_before = now - chrono::Duration::from_std(config.closed_after).unwrap_or(chrono::Duration::MAX);
    for (first, seconds) in due(&files.files_per_partition_value(), partition_end, closed_before) {
        let mut filters = vec![(columns[0].as_str(), FilterOp::Eq, FilterValue::Scalar(first.as_str()))];
        if let Some(second) = columns.get(1) {
            filters.push((
                second.as_str(),
                FilterOp::In,
                FilterValue::Set(seconds.iter().map(String::as_str).collect()),
            ));
        }
        let (optimized, metrics) = table.optimize().with_filters(&filters).await.map_err(delta("compaction"))?;
        table = optimized;
        report.partitions += metrics.partitions_optimized;
        report.files_removed += metrics.num_files_removed;
        report.files_added += metrics.num_files_added;
    }
    let retention = chrono::Duration::from_std(config.retention).unwrap_or(chrono::Duration::MAX);
    // The full mode lists the table's folder: a file whose remove action a
    // checkpoint already dropped (Delta keeps them 7 days) is still found.
    // The retention is ours to choose (at least an hour from the command
    // line), not delta-rs's 7-day minimum.
    let (table, vacuumed) = table
        .vacuum()
        .with_retention_period(retention)
        .with_enforce_retention_duration(false)
        .with_mode(VacuumMode::Full)
        .await
        .map_err(delta("vacuum"))?;
    report.files_vacuumed = vacuumed.files_deleted.len() as u64;
    let version = table.version().unwrap_or_default();
    let cutoff = (now - retention).timestamp_millis();
    report.logs_removed =
        deltalake::checkpoints::cleanup_expired_logs_for(version, table.log_store().as_ref(), cutoff, None)
            .await
            .map_err(delta("log clean-up"))? as u64;
    report.files = LakeFiles::from_snapshot(name, &table).await?.len() as u64;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(v: &[&str]) -> Vec<Option<String>> {
        v.iter().map(|s| Some(s.to_string())).collect()
    }

    #[test]
    fn partitions_end_with_their_hour_or_day() {
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        assert_eq!(hour_end(&values(&["2026-12-01", "7"])), Some(at("2026-12-01T08:00:00Z")));
        assert_eq!(hour_end(&values(&["2026-12-01", "23"])), Some(at("2026-12-02T00:00:00Z")));
        assert_eq!(day_end(&values(&["2026-12-01"])), Some(at("2026-12-02T00:00:00Z")));
        assert_eq!(hour_end(&values(&["2026-12-01"])), None);
        assert_eq!(hour_end(&[Some("2026-12-01".into()), None]), None);
        assert_eq!(day_end(&values(&["yesterday"])), None);
    }

    #[test]
    fn only_closed_partitions_with_several_files_are_due() {
        let files: BTreeMap<Vec<Option<String>>, usize> = [
            (values(&["2026-12-01", "7"]), 60),
            (values(&["2026-12-01", "8"]), 1),
            (values(&["2026-12-01", "9"]), 60),
            (values(&["2026-12-01", "10"]), 5),
            (values(&["2026-11-30", "23"]), 2),
        ]
        .into_iter()
        .collect();
        // Hour 10 ends at 11:00, after the closing time.
        let closed_before = DateTime::parse_from_rfc3339("2026-12-01T10:30:00Z").unwrap().with_timezone(&Utc);
        let due = due(&files, hour_end, closed_before);
        let want: BTreeMap<String, Vec<String>> = [
            ("2026-11-30".to_string(), vec!["23".to_string()]),
            ("2026-12-01".to_string(), vec!["7".into(), "9".into()]),
        ]
        .into_iter()
        .collect();
        assert_eq!(due, want);

        let days: BTreeMap<Vec<Option<String>>, usize> =
            [(values(&["2026-11-30"]), 3), (values(&["2026-12-01"]), 3), (values(&["2026-11-29"]), 1)]
                .into_iter()
                .collect();
        let due = super::due(&days, day_end, closed_before);
        assert_eq!(due.keys().collect::<Vec<_>>(), ["2026-11-30"]);
    }
}
