//! The micro-batch into PostgreSQL: decode → DataFusion deltas → one
//! transaction that advances the offsets with a fence (see
//! [`crate::offsets`]), records the offset gaps passed, writes the rejects
//! into the DLQ outbox (see [`crate::dlq`]) and folds each view's deltas
//! into `speed.*` in one statement.
//!
//! A crash at any point leaves either the whole flush or none of it. A
//! fenced flush (another instance moved an offset) commits nothing and says
//! so, and so does a micro-batch whose offsets are not contiguous: the
//! caller re-reads from what PostgreSQL holds. Events and rejected records
//! of forgotten users (`batch-layer forget-user`) are dropped at decode; the
//! set is re-read from PostgreSQL every few seconds, and the flush
//! transaction checks that it has not changed since (see
//! [`platform::forgotten`]): when it has, the flush rolls back, reloads it
//! and filters again, so a flush never writes back a user forgotten while
//! it was being prepared.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use shared_schema::cut::{Offset, Partition};
use shared_schema::decode::RejectedRecord;
use shared_schema::views::SqlType;
use shared_schema::{EventDecoder, RawRecord};
use sqlx::{AssertSqlSafe, PgPool};
use tokio_util::sync::CancellationToken;

use super::SpeedConfig;
use super::micro_batch::Record;
use crate::deltas::{self, ViewDelta};
use crate::dlq::{self, DeadLetter};
use crate::history::KeyWrites;
use crate::offsets::{self, Advance};
use platform::gaps::Gap;

/// How often the forgotten users are re-read.
const FORGOTTEN_REFRESH: Duration = Duration::from_secs(5);
/// How often the published catalog is re-read, when a view reads it.
const CATALOG_REFRESH: Duration = Duration::from_secs(60);

/// A micro-batch ready to commit: everything computed, nothing written.
pub(super) struct Prepared {
    /// The records, kept to be read again if the commit does not happen.
    pub(super) records: Vec<Record>,
    advances: Vec<Advance>,
    gaps: Vec<Gap>,
    rejected: Vec<RejectedRecord>,
    /// The duplicates history it judged, to write with it.
    keys: KeyWrites,
    deltas: Vec<ViewDelta>,
    /// The forgotten users it was filtered with.
    forgotten_version: i64,
    /// The registered views it was computed with.
    views_version: i64,
    duplicates: usize,
    prepare_secs: f64,
}

/// How preparing a micro-batch ended.
pub(super) enum Prep {
    Ready(Box<Prepared>),
    /// Nothing to commit: the micro-batch must be re-read from PostgreSQL's
    /// offsets (it was not contiguous, or another instance moved them).
    Fenced(Vec<Record>),
    /// Given up at shutdown while PostgreSQL was away; the next start re-reads it.
    Abandoned,
}

/// How a commit ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Deltas and offsets committed: per partition, the next offset.
    Committed(Vec<(Partition, Offset)>),
    /// Nothing committed: another instance moved these partitions; the
    /// micro-batch must be re-read from PostgreSQL's offsets.
    Fenced(Vec<Partition>),
    /// Nothing committed: users were forgotten since it was prepared.
    StaleForgotten,
    /// Nothing committed: views were registered, redefined or dropped since
    /// it was prepared.
    StaleViews,
    /// Nothing committed, given up at shutdown; the next start re-reads it.
    Abandoned,
}

/// A commit's micro-batch and how it ended.
pub(super) struct Commit {
    pub(super) prepared: Box<Prepared>,
    pub(super) outcome: Outcome,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum FlushError {
    #[error("decoding: {0}")]
    Decode(#[from] shared_schema::decode::DecodeError),
    #[error("computing deltas: {0}")]
    Deltas(#[from] datafusion::error::DataFusionError),
    #[error("PostgreSQL: {0}")]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Forgotten(#[from] platform::forgotten::ForgetError),
    #[error("Arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("loading the registered views: {0}")]
    Views(#[from] platform::db::DbError),
    #[error(transparent)]
    Catalog(#[from] deltas::CatalogError),
    #[error("the duplicates history: {0}")]
    Keys(#[from] crate::history::KeyWritesError),
}

/// Writes micro-batches; owns what a flush needs besides the records.
pub(super) struct Sink<'a> {
    config: &'a SpeedConfig,
    pool: &'a PgPool,
    /// Told when a flush enqueued rejects for the DLQ shipper.
    dlq_wake: &'a tokio::sync::Notify,
    decoder: EventDecoder,
    ready: platform::ops_http::Readiness,
    forgotten: platform::forgotten::Forgotten,
    forgotten_at: Instant,
    dlq_rate: crate::alerts::DlqRate,
    notifier: platform::notify::Notifier,
    gap_notices: platform::gaps::GapNotices,
    /// What duplicates are judged against (see [`crate::history`]).
    histories: crate::history::Histories,
    /// The views' plans, made once per set of registered views.
    deltas: deltas::Deltas,
    /// `ops.views_version` of the views `deltas` computes.
    views_version: i64,
    segment_size: shared_schema::cut::SegmentSize,
    /// When the catalog was last read (views over it only).
    catalog_at: Instant,
    /// A commit found the forgotten users or the registered views changed:
    /// reloaded before the next micro-batch is prepared.
    forgotten_stale: bool,
    views_stale: bool,
}

impl<'a> Sink<'a> {
    pub(super) async fn new(
        config: &'a SpeedConfig,
        pool: &'a PgPool,
        dlq_wake: &'a tokio::sync::Notify,
        deployment: platform::db::Deployment,
        forgotten: platform::forgotten::Forgotten,
        ready: platform::ops_http::Readiness,
        notifier: platform::notify::Notifier,
    ) -> Result<Self, FlushError> {
        let (views_version, deltas) = Self::load_views(pool, deployment.segment_size).await?;
        Ok(Self {
            config,
            pool,
            dlq_wake,
            decoder: EventDecoder::new(),
            ready,
            forgotten,
            forgotten_at: Instant::now(),
            dlq_rate: crate::alerts::DlqRate::new(&config.alerts),
            notifier,
            gap_notices: platform::gaps::GapNotices::default(),
            histories: crate::history::Histories::new(deployment.dedup_window_micros),
            deltas,
            views_version,
            segment_size: deployment.segment_size,
            catalog_at: Instant::now(),
            forgotten_stale: false,
            views_stale: false,
        })
    }

    /// The registered views (each checked by this binary's view checker),
    /// planned, with the catalog when one reads it.
    async fn load_views(
        pool: &PgPool,
        segment_size: shared_schema::cut::SegmentSize,
    ) -> Result<(i64, deltas::Deltas), FlushError> {
        let registered = platform::views::registered(pool).await?;
        let names: Vec<&str> = registered.views.iter().map(|v| v.name).collect();
        tracing::info!(version = registered.version, views = ?names, "maintaining the registered views");
        let views = shared_schema::views::install(registered.views);
        let deltas = deltas::Deltas::new(segment_size, views).await?;
        if deltas.reads_catalog() {
            deltas.set_catalog(deltas::load_catalog(pool).await?).await;
        }
        Ok((registered.version, deltas))
    }

    async fn reload_views(&mut self) -> Result<(), FlushError> {
        let (version, deltas) = Self::load_views(self.pool, self.segment_size).await?;
        self.views_version = version;
        self.deltas = deltas;
        self.catalog_at = Instant::now();
        Ok(())
    }

    /// Prepares `records` for their commit (decode, duplicates, forgotten
    /// users, deltas), retrying with capped backoff while PostgreSQL is
    /// away. What it judged becomes the duplicates history at once, so the
    /// next micro-batch can be prepared while this one commits; whatever
    /// does not commit makes the history load again ([`Sink::after_commit`]).
    pub(super) async fn prepare(&mut self, records: Vec<Record>, shutdown: &CancellationToken) -> Prep {
        let mut backoff = platform::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut failing = false;
        loop {
            match self.try_prepare(&records).await {
                Ok(Ok(mut prepared)) => {
                    if failing {
                        tracing::info!("preparing micro-batches works again");
                    }
                    prepared.records = records;
                    return Prep::Ready(Box::new(prepared));
                }
                Ok(Err(partitions)) => {
                    tracing::warn!(?partitions, "stored offsets moved or records missing; re-reading this micro-batch");
                    metrics::counter!("speed_fenced_flushes_total").increment(1);
                    self.histories.forget_all();
                    return Prep::Fenced(records);
                }
                Err(e) => {
                    if !failing {
                        tracing::error!(error = %e, "preparing a micro-batch failed; retrying with backoff");
                        failing = true;
                    }
                    // Nothing is committed with an older set of views:
                    // progress waits (readiness and the stall alert tell).
                    self.ready.set(false);
                    metrics::counter!("speed_flush_failures_total").increment(1);
                    if shutdown.is_cancelled() && backoff.at_cap() {
                        tracing::warn!("shutting down with an unprepared micro-batch; it will be re-read");
                        return Prep::Abandoned;
                    }
                    backoff.sleep().await;
                }
            }
        }
    }

    async fn reload_forgotten(&mut self) -> Result<(), platform::forgotten::ForgetError> {
        self.forgotten = platform::forgotten::Forgotten::load(self.pool, self.config.forget_key.as_ref()).await?;
        self.forgotten_at = Instant::now();
        self.forgotten_stale = false;
        Ok(())
    }

    /// One attempt: the prepared micro-batch without its records, or the
    /// partitions to re-read from PostgreSQL's offsets.
    async fn try_prepare(&mut self, buffer: &[Record]) -> Result<Result<Prepared, Vec<Partition>>, FlushError> {
        let started = Instant::now();
        if self.views_stale {
            tracing::info!("the registered views changed; preparing micro-batches with them");
            self.reload_views().await?;
            self.views_stale = false;
        }
        if self.forgotten_stale || self.forgotten_at.elapsed() >= FORGOTTEN_REFRESH {
            self.reload_forgotten().await?;
        }
        let records: Vec<RawRecord<'_>> = buffer
            .iter()
            .map(|b| RawRecord {
                partition: b.partition.0,
                offset: b.offset.0,
                timestamp: b.timestamp,
                payload: &b.payload,
            })
            .collect();
        let (mut advances, gaps) = match advances(buffer) {
            Ok(spans) => spans,
            Err(partitions) => {
                // Never commit a micro-batch with a gap or a repeat: start over
                // from what PostgreSQL holds.
                tracing::error!("micro-batch offsets are not contiguous; discarding it and re-reading");
                return Ok(Err(partitions));
            }
        };
        // Duplicates are judged against the history exact where each
        // partition's micro-batch starts (loaded after a start, a rebalance
        // or a fence), before forgotten users are dropped, as the ingest does.
        let starts: Vec<(Partition, Offset)> = advances.values().map(|a| (a.partition, a.from)).collect();
        if let Err(crate::history::Moved(p)) = self.histories.ensure(self.pool, &starts).await? {
            tracing::warn!(partition = p.0, "the stored offset moved before the history was loaded; re-reading");
            return Ok(Err(vec![p]));
        }
        let mut judging = self.histories.history().judging();
        let mut decoded = self.decoder.decode_judged(&records, &mut judging)?;
        let changes = judging.finish();
        let duplicates = decoded
            .rejected
            .iter()
            .filter(|r| r.rejection.reason == shared_schema::RejectReason::DuplicateEvent)
            .count();
        if !self.forgotten.is_empty() {
            let (kept, events) = self.forgotten.filter_events(decoded.batch)?;
            decoded.batch = kept;
            let before = decoded.rejected.len();
            let forgotten = &self.forgotten;
            decoded
                .rejected
                .retain(|r| !forgotten.rejected_is_forgotten(buffer[r.index].key.as_deref(), &buffer[r.index].payload));
            let dropped = events + before - decoded.rejected.len();
            if dropped > 0 {
                metrics::counter!("speed_forgotten_total").increment(dropped as u64);
                tracing::debug!(dropped, "dropped records of forgotten users");
            }
        }

        for (p, t) in last_event_times(&decoded.batch) {
            if let Some(a) = advances.get_mut(&p) {
                a.last_event_time = a.last_event_time.max(Some(t));
            }
        }
        for a in advances.values_mut() {
            a.newest_event_time =
                self.histories.newest(a.partition, &changes).and_then(DateTime::<Utc>::from_timestamp_micros);
        }
        if self.deltas.reads_catalog() && self.catalog_at.elapsed() >= CATALOG_REFRESH {
            self.deltas.set_catalog(deltas::load_catalog(self.pool).await?).await;
            self.catalog_at = Instant::now();
        }
        let deltas = self.deltas.compute(decoded.batch).await?;

        // Nothing after this fails: the history takes what was judged.
        let partitions: Vec<Partition> = advances.keys().copied().collect();
        let next: Vec<(Partition, Offset)> = advances.values().map(|a| (a.partition, a.to)).collect();
        let keys = self.histories.stage(&partitions, changes, &next)?;
        let prepare_secs = started.elapsed().as_secs_f64();
        metrics::histogram!("speed_flush_prepare_seconds").record(prepare_secs);
        Ok(Ok(Prepared {
            records: Vec::new(),
            advances: advances.into_values().collect(),
            gaps,
            rejected: decoded.rejected,
            keys,
            deltas,
            forgotten_version: self.forgotten.version(),
            views_version: self.views_version,
            duplicates,
            prepare_secs,
        }))
    }

    /// What commits prepared micro-batches, apart from the preparing.
    pub(super) fn committer(&self) -> Committer {
        Committer { pool: self.pool.clone(), topic: self.config.topic.clone(), ready: self.ready.clone() }
    }

    /// Takes note of how a commit ended: what a committed micro-batch
    /// tells (metrics, DLQ shipping, gap notices), and otherwise a history
    /// to load again (and the forgotten users or the views to reload
    /// before the next micro-batch is prepared).
    pub(super) fn after_commit(&mut self, commit: &Commit) {
        let prepared = &commit.prepared;
        if !matches!(commit.outcome, Outcome::Committed(_)) {
            // What it staged is not PostgreSQL's: every partition loads again.
            self.histories.forget_all();
        }
        match &commit.outcome {
            Outcome::Committed(_) => {}
            Outcome::Fenced(partitions) => {
                // Another instance moved these partitions: the caller drops
                // the micro-batch and re-reads every partition from PostgreSQL.
                tracing::warn!(?partitions, "offsets moved by another instance; discarding this micro-batch");
                metrics::counter!("speed_fenced_flushes_total").increment(1);
                return;
            }
            Outcome::StaleForgotten => {
                tracing::debug!("users were forgotten while this micro-batch was prepared; filtering it again");
                metrics::counter!("speed_forgotten_refilters_total").increment(1);
                self.forgotten_stale = true;
                return;
            }
            Outcome::StaleViews => {
                tracing::info!("the registered views changed; computing this micro-batch again with them");
                metrics::counter!("speed_view_reloads_total").increment(1);
                self.views_stale = true;
                return;
            }
            Outcome::Abandoned => return,
        }
        if prepared.duplicates > 0 {
            metrics::counter!("speed_duplicate_records_total").increment(prepared.duplicates as u64);
        }
        if !prepared.rejected.is_empty() {
            self.dlq_wake.notify_one();
        }
        let gaps = &prepared.gaps;
        if !gaps.is_empty() {
            metrics::counter!("speed_gap_records_total").increment(gaps.iter().map(platform::gaps::Gap::len).sum());
            let notice =
                self.gap_notices.notice(platform::gaps::Layer::Speed, &self.config.topic, gaps, Instant::now());
            if let Some(n) = notice {
                self.notifier.send(n);
            }
        }
        metrics::counter!("speed_rejected_total").increment(prepared.rejected.len() as u64);
        if let Some(n) = self.dlq_rate.observe(prepared.records.len() as u64, prepared.rejected.len() as u64) {
            self.notifier.send(n);
        }
        for a in &prepared.advances {
            if let Some(t) = a.last_event_time {
                metrics::gauge!("speed_last_event_time_seconds", "partition" => a.partition.to_string())
                    .set(t.timestamp_millis() as f64 / 1000.0);
            }
        }
    }
}

/// Commits prepared micro-batches: owns what a commit needs, so it runs as
/// a task of its own while the next micro-batch is prepared.
pub(super) struct Committer {
    pool: PgPool,
    topic: String,
    ready: platform::ops_http::Readiness,
}

impl Committer {
    /// Commits `prepared` in one transaction, retrying with capped backoff
    /// while PostgreSQL is away (progress stops, the process does not).
    pub(super) async fn commit(self, prepared: Box<Prepared>, shutdown: CancellationToken) -> Commit {
        let mut backoff = platform::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut failing = false;
        loop {
            match self.try_commit(&prepared).await {
                Ok(outcome) => {
                    if failing {
                        tracing::info!("flushing works again");
                    }
                    if matches!(outcome, Outcome::Committed(_)) {
                        self.ready.set(true);
                    }
                    return Commit { prepared, outcome };
                }
                Err(e) => {
                    if !failing {
                        tracing::error!(error = %e, "flush failed; retrying with backoff until it succeeds");
                        failing = true;
                    }
                    self.ready.set(false);
                    metrics::counter!("speed_flush_failures_total").increment(1);
                    if shutdown.is_cancelled() && backoff.at_cap() {
                        // Nothing was committed; the next start resumes from PostgreSQL.
                        tracing::warn!("shutting down with an uncommitted micro-batch; it will be re-read");
                        return Commit { prepared, outcome: Outcome::Abandoned };
                    }
                    backoff.sleep().await;
                }
            }
        }
    }

    /// One attempt.
    async fn try_commit(&self, prepared: &Prepared) -> Result<Outcome, FlushError> {
        let started = Instant::now();
        // A synchronous commit: with `synchronous_commit = off` a PostgreSQL
        // crash loses the last commits whole and they are read again, so
        // totals stay exact, but readers may already have seen them, and
        // the dashboards' totals would go back (the chaos test caught it).
        let mut tx = self.pool.begin().await?;
        // First, so the fence is held until the commit.
        if !platform::forgotten::still_at(&mut tx, prepared.forgotten_version).await? {
            tx.rollback().await?;
            return Ok(Outcome::StaleForgotten);
        }
        // Held shared until the commit: a registration waits for this flush,
        // and this flush commits only deltas of the registered views.
        if platform::views::version(&mut tx).await? != prepared.views_version {
            tx.rollback().await?;
            return Ok(Outcome::StaleViews);
        }
        let fenced = offsets::advance(&mut tx, &prepared.advances).await?;
        if !fenced.is_empty() {
            tx.rollback().await?;
            return Ok(Outcome::Fenced(fenced));
        }
        prepared.keys.write(&mut tx).await?;
        // The gaps passed are recorded with the offsets that pass them.
        platform::gaps::record(&mut tx, platform::gaps::Layer::Speed, &self.topic, &prepared.gaps).await?;
        let rejected: Vec<DeadLetter<'_>> = prepared
            .rejected
            .iter()
            .map(|r| {
                let b = &prepared.records[r.index];
                DeadLetter { record: r, key: b.key.as_deref(), payload: b.payload.as_slice() }
            })
            .collect();
        dlq::enqueue(&mut tx, &self.topic, &rejected).await?;
        let mut rows = 0;
        for delta in &prepared.deltas {
            rows += write_delta(&mut tx, delta).await?;
        }
        tx.commit().await?;

        let secs = started.elapsed().as_secs_f64();
        metrics::histogram!("speed_flush_commit_seconds").record(secs);
        // Decode and deltas (this process's CPU), then the transaction.
        metrics::histogram!("speed_flush_seconds").record(prepared.prepare_secs + secs);
        metrics::counter!("speed_rows_written_total").increment(rows);
        tracing::debug!(
            records = prepared.records.len(),
            rejected = rejected.len(),
            rows,
            ms = (prepared.prepare_secs + secs) * 1000.0,
            "flushed"
        );
        Ok(Outcome::Committed(prepared.advances.iter().map(|a| (a.partition, a.to)).collect()))
    }
}

/// Per partition, the offsets `records` move it across, and the gaps they
/// step over (offsets without records, proven by the positions: see
/// [`Record::gap_from`]); the partitions (all of them) when some
/// partition's records are not contiguous: an unexplained jump or a repeat.
#[allow(clippy::type_complexity)]
fn advances(records: &[Record]) -> Result<(BTreeMap<Partition, Advance>, Vec<Gap>), Vec<Partition>> {
    let mut advances: BTreeMap<Partition, Advance> = BTreeMap::new();
    let mut gaps = Vec::new();
    let mut contiguous = true;
    for r in records {
        let start = r.gap_from.unwrap_or(r.offset);
        if start > r.offset {
            contiguous = false;
        }
        if let Some(from) = r.gap_from.filter(|f| *f < r.offset) {
            gaps.push(Gap { partition: r.partition, from, to: r.offset });
        }
        let next = Offset(r.offset.0 + 1);
        match advances.get_mut(&r.partition) {
            Some(a) => {
                contiguous &= start == a.to;
                a.to = next;
            }
            None => {
                advances.insert(
                    r.partition,
                    Advance {
                        partition: r.partition,
                        from: start,
                        to: next,
                        last_event_time: None,
                        newest_event_time: None,
                    },
                );
            }
        }
    }
    if !contiguous {
        return Err(advances.keys().copied().collect());
    }
    Ok((advances, gaps))
}

/// Folds a view's deltas into `speed.<view>` with the view's merge rules,
/// in one statement: the rows travel as one array per column.
async fn write_delta(conn: &mut sqlx::PgConnection, delta: &ViewDelta) -> Result<u64, FlushError> {
    if delta.rows() == 0 {
        return Ok(0);
    }
    let columns = delta.view.speed_columns();
    let rows = match delta.batches.as_slice() {
        [one] => one.clone(),
        many => arrow::compute::concat_batches(&many[0].schema(), many)?,
    };
    let arrays: Vec<String> =
        columns.iter().enumerate().map(|(i, (_, ty))| format!("${}::{}[]", i + 1, ty.postgres())).collect();
    let names: Vec<&str> = columns.iter().map(|(n, _)| *n).collect();
    let source = format!("unnest({}) AS d({})", arrays.join(", "), names.join(", "));
    let mut query = sqlx::query(AssertSqlSafe(delta.view.speed_upsert_sql(&source)));
    for (i, (_, ty)) in columns.iter().enumerate() {
        query = bind_column(query, rows.column(i), *ty)?;
    }
    Ok(query.execute(&mut *conn).await?.rows_affected())
}

/// Binds `column` as a PostgreSQL array of `ty`.
fn bind_column<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    column: &arrow::array::ArrayRef,
    ty: SqlType,
) -> Result<sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>, arrow::error::ArrowError> {
    use arrow::array::AsArray;
    use arrow::compute::cast;
    use arrow::datatypes::{DataType, Float64Type, Int64Type, TimeUnit, TimestampMicrosecondType};
    Ok(match ty {
        SqlType::BigInt => {
            let values = cast(column, &DataType::Int64)?;
            query.bind(values.as_primitive::<Int64Type>().iter().collect::<Vec<_>>())
        }
        SqlType::Double => {
            let values = cast(column, &DataType::Float64)?;
            query.bind(values.as_primitive::<Float64Type>().iter().collect::<Vec<_>>())
        }
        SqlType::Text => {
            let values = cast(column, &DataType::Utf8)?;
            query.bind(values.as_string::<i32>().iter().map(|v| v.map(str::to_owned)).collect::<Vec<_>>())
        }
        SqlType::TimestampTz => {
            let values = match column.data_type() {
                DataType::Timestamp(TimeUnit::Microsecond, _) => column.clone(),
                _ => cast(column, &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())))?,
            };
            let times: Vec<Option<DateTime<Utc>>> = values
                .as_primitive::<TimestampMicrosecondType>()
                .iter()
                .map(|t| t.and_then(DateTime::from_timestamp_micros))
                .collect();
            query.bind(times)
        }
    })
}

fn last_event_times(batch: &arrow::array::RecordBatch) -> Vec<(Partition, DateTime<Utc>)> {
    use arrow::array::AsArray;
    use arrow::datatypes::{Int32Type, TimestampMicrosecondType};
    use shared_schema::schema::col;
    let (Some(t), Some(p)) = (batch.column_by_name(col::EVENT_TIME), batch.column_by_name(col::KAFKA_PARTITION)) else {
        return Vec::new();
    };
    let t = t.as_primitive::<TimestampMicrosecondType>();
    let p = p.as_primitive::<Int32Type>();
    p.values()
        .iter()
        .zip(t.values())
        .filter_map(|(p, t)| DateTime::from_timestamp_micros(*t).map(|t| (Partition(*p), t)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::micro_batch::record;
    use super::*;

    fn spans(records: &[Record]) -> Result<Vec<(i32, i64, i64)>, Vec<Partition>> {
        advances(records).map(|(a, _)| a.values().map(|a| (a.partition.0, a.from.0, a.to.0)).collect())
    }

    fn past_gap(partition: i32, from: i64, offset: i64) -> Record {
        Record { gap_from: Some(Offset(from)), ..record(partition, offset) }
    }

    #[test]
    fn a_proven_gap_is_advanced_over_and_reported() {
        let records = [record(0, 4), past_gap(0, 5, 9), record(0, 10), past_gap(1, 0, 42)];
        let (advances, gaps) = advances(&records).unwrap();
        let spans: Vec<_> = advances.values().map(|a| (a.partition.0, a.from.0, a.to.0)).collect();
        assert_eq!(spans, vec![(0, 4, 11), (1, 0, 43)], "a gap at the start moves `from` to the loaded position");
        let gaps: Vec<_> = gaps.iter().map(|g| (g.partition.0, g.from.0, g.to.0)).collect();
        assert_eq!(gaps, vec![(0, 5, 9), (1, 0, 42)]);
    }

    #[test]
    fn a_gap_that_does_not_join_the_previous_record_discards_the_micro_batch() {
        // The gap claims to start at 6, but the previous record was 4.
        assert_eq!(spans(&[record(0, 4), past_gap(0, 6, 9)]), Err(vec![Partition(0)]));
    }

    #[test]
    fn contiguous_records_advance_each_partition_across_them() {
        let records = [record(0, 4), record(1, 0), record(0, 5), record(0, 6), record(1, 1)];
        assert_eq!(spans(&records), Ok(vec![(0, 4, 7), (1, 0, 2)]));
    }

    #[test]
    fn gap_or_repeat_discards_the_micro_batch() {
        let gap = [record(0, 4), record(1, 0), record(0, 6)];
        assert_eq!(spans(&gap), Err(vec![Partition(0), Partition(1)]));
        let repeat = [record(0, 4), record(0, 5), record(0, 5)];
        assert_eq!(spans(&repeat), Err(vec![Partition(0)]));
        let back = [record(0, 4), record(0, 5), record(0, 3)];
        assert_eq!(spans(&back), Err(vec![Partition(0)]));
    }
}
