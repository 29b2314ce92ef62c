//! The lake's side of duplicates ([`shared_schema::dedup`]): what the
//! ingest knows of each partition when it starts, and what the batch
//! publish hands a speed layer that starts at the cut.
//!
//! The lake's `events` holds exactly the first copies (duplicates go to
//! `events_rejected`), so the keys of a partition within the window are a
//! scan of its recent hours. The newest time per partition is recorded by
//! every `events` commit as a Delta `txn` action next to the offsets
//! (`lambda-dedup/<topic>/<partition>`, its version the time in
//! microseconds), so it is exact for the offsets that commit covers.

use std::collections::{BTreeMap, HashMap};

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::{Int32Type, TimestampMicrosecondType};
use datafusion::prelude::{SessionContext, col, lit};
use deltalake::DeltaTable;
use deltalake::DeltaTableError;
use deltalake::kernel::Transaction;
use futures::StreamExt;
use shared_schema::cut::{Offset, OffsetCut, Partition};
use shared_schema::dedup::{EventKey, History, PartitionHistory};
use shared_schema::schema::col as c;

use crate::lake::{self, LakeError};

/// The Delta application id under which the newest time of partition `p`
/// of `topic` is recorded.
pub fn newest_app_id(topic: &str, partition: Partition) -> String {
    format!("lambda-dedup/{topic}/{}", partition.0)
}

/// The `txn` actions recording `newest` (microseconds) per partition.
pub fn newest_txns(topic: &str, newest: &BTreeMap<Partition, i64>) -> Vec<Transaction> {
    newest.iter().map(|(p, t)| Transaction::new(newest_app_id(topic, *p), *t)).collect()
}

/// Per partition, the newest time `table`'s commits recorded; partitions
/// without one (never written, or written before duplicates were judged)
/// are absent.
pub async fn committed_newest(
    table: &DeltaTable,
    topic: &str,
    partitions: impl IntoIterator<Item = Partition>,
) -> Result<BTreeMap<Partition, i64>, DeltaTableError> {
    lake::txn_versions(table, partitions, |p| newest_app_id(topic, p)).await
}

/// One partition to read keys of: those of events at or after `floor`
/// (microseconds) and at offsets from `from` to below `below`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRange {
    pub partition: Partition,
    pub floor: i64,
    pub from: Offset,
    pub below: Offset,
}

/// The keys and event times of the events of `ranges` in `table` (the
/// lake's `events`), per partition; a key held twice (a lake written before
/// duplicates were judged) with its latest time. Reads only the hours from
/// the earliest floor on.
pub async fn lake_keys(
    table: &DeltaTable,
    ranges: &[KeyRange],
) -> Result<HashMap<Partition, HashMap<EventKey, i64>>, LakeError> {
    let mut out: HashMap<Partition, HashMap<EventKey, i64>> = HashMap::new();
    let Some(earliest) = ranges.iter().map(|r| r.floor).min() else { return Ok(out) };
    if table.version().is_none() {
        return Ok(out);
    }
    let scan = |source| LakeError::Scan { table: lake::EVENTS_TABLE.to_string(), source };
    let ctx = SessionContext::new();
    lake::register(&ctx, crate::scope::LAKE_EVENTS, table).await?;
    let start = chrono::DateTime::from_timestamp_micros(earliest).unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
    let terms = ranges
        .iter()
        .map(|r| {
            let floor = datafusion::common::ScalarValue::TimestampMicrosecond(Some(r.floor), Some("UTC".into()));
            col(c::KAFKA_PARTITION)
                .eq(lit(r.partition.0))
                .and(col(c::KAFKA_OFFSET).gt_eq(lit(r.from.0)))
                .and(col(c::KAFKA_OFFSET).lt(lit(r.below.0)))
                .and(col(c::EVENT_TIME).gt_eq(lit(floor)))
        })
        .collect();
    let frame = ctx
        .table(crate::scope::LAKE_EVENTS)
        .await
        .and_then(|t| t.filter(crate::scope::since(start).and(crate::scope::any(terms))))
        .and_then(|t| t.select(vec![col(c::KAFKA_PARTITION), col(c::EVENT_ID), col(c::EVENT_TIME)]))
        .map_err(scan)?;
    let mut stream = frame.execute_stream().await.map_err(scan)?;
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(scan)?;
        let partitions = batch.column(0).as_primitive::<Int32Type>();
        let ids = datafusion::arrow::compute::cast(batch.column(1), &datafusion::arrow::datatypes::DataType::Utf8)
            .map_err(|e| scan(e.into()))?;
        let ids = ids.as_string::<i32>();
        let times = batch.column(2).as_primitive::<TimestampMicrosecondType>();
        for i in 0..batch.num_rows() {
            if partitions.is_null(i) || ids.is_null(i) || times.is_null(i) {
                continue;
            }
            let time = times.value(i);
            let seen = out.entry(Partition(partitions.value(i))).or_default();
            let t = seen.entry(EventKey::of(ids.value(i))).or_insert(time);
            *t = (*t).max(time);
        }
    }
    Ok(out)
}

/// What the ingest knows when it starts: per partition, the newest time
/// its last `events` commit recorded and the keys within the window below
/// it, read from the lake. A partition without a recorded newest time has
/// none yet (its history starts with the next record).
pub async fn ingest_history(
    table: &DeltaTable,
    topic: &str,
    next: &BTreeMap<Partition, Offset>,
    window_micros: i64,
) -> Result<History, LakeError> {
    let delta = |source| LakeError::Delta { table: lake::EVENTS_TABLE.to_string(), source };
    let newest = committed_newest(table, topic, next.keys().copied()).await.map_err(delta)?;
    let ranges: Vec<KeyRange> = newest
        .iter()
        .filter_map(|(p, n)| {
            next.get(p).map(|below| KeyRange {
                partition: *p,
                floor: n - window_micros,
                from: Offset(0),
                below: *below,
            })
        })
        .collect();
    let mut keys = lake_keys(table, &ranges).await?;
    let mut history = History::new(window_micros);
    for (p, n) in newest {
        let seen = keys.remove(&p).unwrap_or_default();
        history.load(p.0, PartitionHistory { newest: Some(n), seen });
    }
    Ok(history)
}

/// Per partition, the greatest event time of the events of `ctx`'s lake
/// snapshot at or above `from` and below `to` (see [`crate::scope::between`]).
pub async fn newest_between(
    ctx: &SessionContext,
    from: &OffsetCut,
    to: &OffsetCut,
) -> datafusion::error::Result<BTreeMap<Partition, i64>> {
    crate::scope::register_events(ctx, crate::scope::between(from, to)).await?;
    let batches = ctx
        .sql("SELECT e.kafka_partition, max(e.event_time) FROM events e GROUP BY e.kafka_partition")
        .await?
        .collect()
        .await?;
    let mut out = BTreeMap::new();
    for b in batches {
        let partitions = b.column(0).as_primitive::<Int32Type>();
        let times = b.column(1).as_primitive::<TimestampMicrosecondType>();
        for i in 0..b.num_rows() {
            if !partitions.is_null(i) && !times.is_null(i) {
                out.insert(Partition(partitions.value(i)), times.value(i));
            }
        }
    }
    Ok(out)
}

/// What a publish records for duplicates: each partition's newest time
/// below the new cut, and the seed for the partitions the speed layer holds
/// no position in (see `speed_layer::history`).
#[derive(Debug, Clone, Default)]
pub struct CutHistory {
    pub newest: BTreeMap<Partition, i64>,
    pub seed: BTreeMap<Partition, Seed>,
}

/// The seed of one partition as a publish writes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seed {
    /// The keys to add, with their times.
    pub keys: Vec<(EventKey, i64)>,
    /// Keys older than this (microseconds) leave the seed.
    pub floor: i64,
    /// The keys continue the seed stored up to the previous cut (else
    /// they replace it).
    pub continues: bool,
}

/// What the platform database holds for [`cut_history`].
#[derive(Debug, Clone, Copy)]
pub struct Known<'a> {
    /// The newest time per partition recorded with the published cut.
    pub stored: &'a BTreeMap<Partition, i64>,
    /// The partitions the speed layer holds no position in.
    pub unpositioned: &'a [Partition],
    /// The cut each partition's stored seed reaches.
    pub seeded: &'a BTreeMap<Partition, Offset>,
    /// The newest time per partition between the previous cut and the new
    /// one, when the caller read it already (else it is read here).
    pub scanned: Option<&'a BTreeMap<Partition, i64>>,
}

/// Computes the [`CutHistory`] of a run moving the cut from `previous` to
/// `cut`: the newest times from what `ops.cut` holds and the new offsets
/// (all offsets below the cut when a partition has none stored), and the
/// seed read from `table` (the pinned snapshot) for `unpositioned`.
pub async fn cut_history(
    ctx: &SessionContext,
    table: &DeltaTable,
    previous: &OffsetCut,
    cut: &OffsetCut,
    known: &Known<'_>,
    window_micros: i64,
) -> Result<CutHistory, LakeError> {
    let Known { stored, unpositioned, seeded, scanned } = *known;
    let scan = |source| LakeError::Scan { table: lake::EVENTS_TABLE.to_string(), source };
    // Offsets below the previous cut are summed up by the stored newest
    // time; where none is stored (published before duplicates were judged)
    // the whole partition is read.
    let from: OffsetCut = previous.iter().filter(|(p, _)| stored.contains_key(p)).collect();
    let mut newest = match scanned {
        // The same range, read already.
        Some(scanned) if from == *previous => scanned.clone(),
        _ => newest_between(ctx, &from, cut).await.map_err(scan)?,
    };
    for (p, t) in stored {
        let n = newest.entry(*p).or_insert(*t);
        *n = (*n).max(*t);
    }
    // A partition whose stored seed reaches the previous cut only needs the
    // keys of the new offsets; the others are read whole (within the window).
    let ranges: Vec<KeyRange> = unpositioned
        .iter()
        .filter_map(|p| {
            let below = cut.get(*p);
            let from = seeded.get(p).copied().filter(|s| *s == previous.get(*p) && *s <= below).unwrap_or(Offset(0));
            newest.get(p).map(|n| KeyRange { partition: *p, floor: n - window_micros, from, below })
        })
        .collect();
    let mut keys = lake_keys(table, &ranges).await?;
    let seed = ranges
        .iter()
        .map(|r| {
            let keys = keys.remove(&r.partition).unwrap_or_default().into_iter().collect();
            (r.partition, Seed { keys, floor: r.floor, continues: r.from.0 > 0 })
        })
        .collect();
    Ok(CutHistory { newest, seed })
}
