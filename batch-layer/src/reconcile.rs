//! Reconciling the lake with Kafka: every offset below a partition's
//! position in the lake is a row of `events` or `events_rejected`, or is
//! accounted for by the ledger ([`crate::ledger`]: a gap, a forgotten
//! user's record dropped on the way in, a row erased by `forget-user`).
//!
//! The totals come from the Delta log (row counts per file) and a filtered
//! count of the rejected records, so a run pays almost nothing while the
//! lake is whole; only when it is not are the rows counted per partition,
//! for the message. A lake that misses records (a data file lost, a manual
//! delete, a bug) would publish counts below what the speed layer showed,
//! and the dashboards would drop when the batch lands: the run refuses to
//! publish (see `recompute`), until the lake is repaired or an operator
//! accepts the loss (`run --accept-lake-loss`).

use std::collections::BTreeMap;

use arrow::array::AsArray;
use arrow::datatypes::{DataType, Int32Type, Int64Type};
use datafusion::prelude::{Expr, SessionContext, col, lit};
use deltalake::DeltaTable;
use serde::Serialize;
use shared_schema::cut::{Offset, Partition};
use shared_schema::schema::col as c;

use crate::lake::{self, EVENTS_TABLE, Lake, REJECTED_TABLE};
use crate::lake_files::LakeFiles;
use crate::ledger::{self, Kind};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Lake(Box<lake::LakeError>),
    #[error("reading the lake's ledger: {0}")]
    Delta(Box<deltalake::DeltaTableError>),
    #[error("listing the lake's files: {0}")]
    Files(Box<crate::lake_files::LakeFilesError>),
    #[error("counting the lake's rows: {0}")]
    Count(Box<datafusion::error::DataFusionError>),
}

impl From<lake::LakeError> for ReconcileError {
    fn from(e: lake::LakeError) -> Self {
        Self::Lake(Box::new(e))
    }
}

impl From<deltalake::DeltaTableError> for ReconcileError {
    fn from(e: deltalake::DeltaTableError) -> Self {
        Self::Delta(Box::new(e))
    }
}

impl From<crate::lake_files::LakeFilesError> for ReconcileError {
    fn from(e: crate::lake_files::LakeFilesError) -> Self {
        Self::Files(Box::new(e))
    }
}

impl From<datafusion::error::DataFusionError> for ReconcileError {
    fn from(e: datafusion::error::DataFusionError) -> Self {
        Self::Count(Box::new(e))
    }
}

/// One partition's account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Account {
    pub partition: i32,
    /// The lake's position: offsets below it are in the lake.
    pub next: i64,
    pub events: i64,
    pub rejected: i64,
    pub gaps: i64,
    pub forgotten: i64,
    pub erased: i64,
}

impl Account {
    /// Offsets below the position that are neither held nor accounted for
    /// (negative: rows held twice).
    pub fn unaccounted(&self) -> i64 {
        self.next - self.events - self.rejected - self.gaps - self.forgotten - self.erased
    }
}

/// The lake's account as of one snapshot of `events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reconciliation {
    pub delta_version: i64,
    /// Offsets below the positions, all partitions together.
    pub offsets: i64,
    pub events: i64,
    pub rejected: i64,
    pub gaps: i64,
    pub forgotten: i64,
    pub erased: i64,
    /// Per partition, only when the totals do not add up.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<Account>,
}

impl Reconciliation {
    pub fn unaccounted(&self) -> i64 {
        self.offsets - self.events - self.rejected - self.gaps - self.forgotten - self.erased
    }

    /// What a failure says: the partitions that do not add up.
    pub fn detail(&self) -> String {
        let parts: Vec<String> = self
            .partitions
            .iter()
            .filter(|a| a.unaccounted() != 0)
            .map(|a| {
                let what = if a.unaccounted() > 0 { "missing" } else { "held twice" };
                format!(
                    "partition {}: {} {what} of offsets below {} ({} events, {} rejected, {} gaps, {} forgotten, {} erased)",
                    a.partition,
                    a.unaccounted().abs(),
                    a.next,
                    a.events,
                    a.rejected,
                    a.gaps,
                    a.forgotten,
                    a.erased
                )
            })
            .collect();
        format!(
            "the lake holds or accounts for {} of the {} offsets Kafka gave it: {}",
            self.offsets - self.unaccounted(),
            self.offsets,
            if parts.is_empty() { "(no single partition stands out)".to_string() } else { parts.join("; ") }
        )
    }
}

/// Reconciles `events` (a pinned snapshot, whose files are `files` and
/// whose positions are `next`) and the lake's current `events_rejected`
/// with the offsets below `next`.
pub async fn reconcile(
    lake: &Lake,
    events: &DeltaTable,
    files: &LakeFiles,
    next: &BTreeMap<Partition, Offset>,
) -> Result<Reconciliation, ReconcileError> {
    let partitions: Vec<Partition> = next.keys().copied().collect();
    let mut counts = ledger::committed(events, partitions.clone()).await?;
    let rejected_table = lake.open(REJECTED_TABLE).await?;
    if let Some(t) = &rejected_table {
        counts.merge(&ledger::committed(t, partitions.clone()).await?);
    }
    let rejected_rows = match &rejected_table {
        Some(t) => rejected_below(t, next).await?,
        None => 0,
    };
    let event_rows = match files.rows_per_partition_value() {
        Some(rows) => rows.values().sum::<u64>() as i64,
        None => rows_by_partition(events, EVENTS_TABLE, None).await?.values().sum(),
    };
    let mut out = Reconciliation {
        delta_version: events.version().map_or(-1, |v| v as i64),
        offsets: next.values().map(|o| o.0).sum(),
        events: event_rows,
        rejected: rejected_rows,
        gaps: counts.total(Kind::Gap),
        forgotten: counts.total(Kind::Forgotten),
        erased: counts.total(Kind::Erased),
        partitions: Vec::new(),
    };
    if out.unaccounted() != 0 {
        let per_partition = rows_by_partition(events, EVENTS_TABLE, None).await?;
        let rejected = match &rejected_table {
            Some(t) => rows_by_partition(t, REJECTED_TABLE, Some(below(next))).await?,
            None => BTreeMap::new(),
        };
        out.partitions = next
            .iter()
            .map(|(p, o)| Account {
                partition: p.0,
                next: o.0,
                events: per_partition.get(p).copied().unwrap_or(0),
                rejected: rejected.get(p).copied().unwrap_or(0),
                gaps: counts.get(*p, Kind::Gap),
                forgotten: counts.get(*p, Kind::Forgotten),
                erased: counts.get(*p, Kind::Erased),
            })
            .collect();
    }
    Ok(out)
}

/// The rejected records below `next`: the log's row count less those at
/// or above it, which only the newest files can hold (the others are
/// skipped by their offset bounds), so a run reads no more than those.
async fn rejected_below(table: &DeltaTable, next: &BTreeMap<Partition, Offset>) -> Result<i64, ReconcileError> {
    let files = LakeFiles::from_snapshot(REJECTED_TABLE, table).await?;
    let Some(rows) = files.rows_per_partition_value() else {
        return Ok(rows_by_partition(table, REJECTED_TABLE, Some(below(next))).await?.values().sum());
    };
    let total = rows.values().sum::<u64>() as i64;
    if next.is_empty() {
        return Ok(0);
    }
    // Partitions without a position, as ranges (so file bounds prune them).
    let part = || col(c::KAFKA_PARTITION);
    let keys: Vec<i32> = next.keys().map(|p| p.0).collect();
    let mut elsewhere = vec![part().lt(lit(keys[0])), part().gt(lit(keys[keys.len() - 1]))];
    for w in keys.windows(2) {
        if w[1] - w[0] > 1 {
            elsewhere.push(part().gt(lit(w[0])).and(part().lt(lit(w[1]))));
        }
    }
    let above = crate::scope::any(
        next.iter()
            .map(|(p, o)| part().eq(lit(p.0)).and(col(c::KAFKA_OFFSET).gt_eq(lit(o.0))))
            .chain(elsewhere)
            .collect(),
    );
    let not_below: i64 = rows_by_partition(table, REJECTED_TABLE, Some(above)).await?.values().sum();
    Ok(total - not_below)
}

/// Rows at offsets below `next`, per partition.
fn below(next: &BTreeMap<Partition, Offset>) -> Expr {
    crate::scope::below(&next.iter().map(|(p, o)| (*p, *o)).collect())
}

/// Rows of `table` (restricted by `filter`) per Kafka partition.
pub(crate) async fn rows_by_partition(
    table: &DeltaTable,
    name: &str,
    filter: Option<Expr>,
) -> Result<BTreeMap<Partition, i64>, ReconcileError> {
    let ctx = SessionContext::new();
    lake::register(&ctx, name, table).await?;
    let mut frame = ctx.table(name).await?;
    if let Some(f) = filter {
        frame = frame.filter(f)?;
    }
    let frame = frame.aggregate(
        vec![col(c::KAFKA_PARTITION)],
        vec![datafusion::functions_aggregate::count::count_all().alias("n")],
    )?;
    let mut rows = BTreeMap::new();
    for b in frame.collect().await? {
        let cast = |i: usize, to: &DataType| {
            arrow::compute::cast(b.column(i), to)
                .map_err(|e| ReconcileError::from(datafusion::error::DataFusionError::from(e)))
        };
        let (p, n) = (cast(0, &DataType::Int32)?, cast(1, &DataType::Int64)?);
        for (p, n) in p.as_primitive::<Int32Type>().iter().zip(n.as_primitive::<Int64Type>().iter()) {
            if let (Some(p), Some(n)) = (p, n) {
                rows.insert(Partition(p), n);
            }
        }
    }
    Ok(rows)
}

/// What the run makes of a reconciliation, against what the deployment
/// already accepts as lost (`accepted`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Everything adds up (or no worse than accepted).
    Whole,
    /// The lake misses more than accepted, or holds rows twice.
    Broken,
}

/// Judges `unaccounted` against `accepted`: more missing than accepted,
/// or any row held twice, is broken.
pub fn judge(unaccounted: i64, accepted: i64) -> Verdict {
    if unaccounted < 0 || unaccounted > accepted { Verdict::Broken } else { Verdict::Whole }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(next: i64, events: i64, rejected: i64, gaps: i64) -> Account {
        Account { partition: 0, next, events, rejected, gaps, forgotten: 1, erased: 2 }
    }

    #[test]
    fn an_account_adds_up_when_every_offset_is_held_or_counted() {
        assert_eq!(account(100, 80, 7, 10).unaccounted(), 0);
        assert_eq!(account(100, 70, 7, 10).unaccounted(), 10);
        assert_eq!(account(100, 90, 7, 10).unaccounted(), -10);
    }

    #[test]
    fn more_missing_than_accepted_or_rows_held_twice_is_broken() {
        assert_eq!(judge(0, 0), Verdict::Whole);
        assert_eq!(judge(5, 5), Verdict::Whole);
        assert_eq!(judge(3, 5), Verdict::Whole);
        assert_eq!(judge(6, 5), Verdict::Broken);
        assert_eq!(judge(-1, 5), Verdict::Broken);
    }

    #[test]
    fn the_detail_names_each_partition_that_does_not_add_up() {
        let r = Reconciliation {
            delta_version: 3,
            offsets: 200,
            events: 150,
            rejected: 14,
            gaps: 20,
            forgotten: 2,
            erased: 4,
            partitions: vec![account(100, 80, 7, 10), Account { partition: 1, ..account(100, 70, 7, 10) }],
        };
        assert_eq!(r.unaccounted(), 10);
        assert_eq!(
            r.detail(),
            "the lake holds or accounts for 190 of the 200 offsets Kafka gave it: partition 1: 10 missing of offsets \
             below 100 (70 events, 7 rejected, 10 gaps, 1 forgotten, 2 erased)"
        );
    }
}
