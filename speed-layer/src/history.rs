//! The speed layer's side of duplicates ([`shared_schema::dedup`]).
//!
//! Per partition, the newest time lives in `ops.speed_offsets` next to the
//! offset it is exact for, and the keys within the window in
//! `speed.event_keys`; both are written by the flush that passes the
//! records, in its transaction, so they always match the stored offset.
//!
//! A partition the layer holds no position in starts at the batch's cut
//! (see [`crate::offsets::load`]); its history is then what the last batch
//! publish left for it in `ops.dedup_seed` (the keys within the window
//! below the cut) with the cut's newest time, so a first copy below the cut
//! is known above it. The first flush of the partition writes those keys
//! into `speed.event_keys`: from then on the layer needs no seed.
//!
//! A flush's verdicts become the history as soon as it is prepared, so the
//! micro-batch after it is judged against them while it commits; when it
//! does not commit, every partition's history is loaded again
//! ([`Histories::forget_all`]).
//!
//! The history is loaded lazily, by the flush, for each partition whose
//! micro-batch does not start where the loaded history ends (a start, a
//! rebalance, a fenced flush), in one snapshot with the offsets it must
//! match.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use shared_schema::cut::{Offset, Partition};
use shared_schema::dedup::{Changes, EventKey, History, PartitionHistory};
use sqlx::PgConnection;

/// What the flush knows of each partition's duplicates.
#[derive(Debug)]
pub struct Histories {
    history: History,
    /// Per partition, the offset the history is exact below.
    valid_at: HashMap<Partition, Offset>,
    /// Keys loaded from the batch's seed, to write into `speed.event_keys`
    /// with the partition's first flush.
    unsaved: HashMap<Partition, Vec<(EventKey, i64)>>,
}

/// Loading a partition's history found PostgreSQL elsewhere than the
/// micro-batch: it must be re-read from the stored offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moved(pub Partition);

impl Histories {
    pub fn new(window_micros: i64) -> Self {
        Self { history: History::new(window_micros), valid_at: HashMap::new(), unsaved: HashMap::new() }
    }

    pub fn history(&self) -> &History {
        &self.history
    }

    /// Forgets every partition (after a fenced flush: PostgreSQL decides).
    pub fn forget_all(&mut self) {
        self.valid_at.clear();
    }

    /// Makes sure each partition's history is exact at the offset its
    /// micro-batch starts from (`starts`), loading it where it is not.
    pub async fn ensure(
        &mut self,
        pool: &sqlx::PgPool,
        starts: &[(Partition, Offset)],
    ) -> Result<Result<(), Moved>, sqlx::Error> {
        let stale: Vec<(Partition, Offset)> =
            starts.iter().filter(|(p, from)| self.valid_at.get(p) != Some(from)).copied().collect();
        if stale.is_empty() {
            return Ok(Ok(()));
        }
        let mut tx = pool.begin().await?;
        // One snapshot: the seed and the cut it belongs to, the offsets and
        // the keys written with them.
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *tx).await?;
        for (p, from) in stale {
            match load(&mut tx, p, from, self.history.window_micros()).await? {
                Ok((history, unsaved)) => {
                    self.history.load(p.0, history);
                    self.valid_at.insert(p, from);
                    if unsaved.is_empty() {
                        self.unsaved.remove(&p);
                    } else {
                        self.unsaved.insert(p, unsaved);
                    }
                }
                Err(moved) => {
                    tx.rollback().await?;
                    return Ok(Err(moved));
                }
            }
        }
        tx.commit().await?;
        Ok(Ok(()))
    }

    /// The newest time of partition `p` once `changes` are committed.
    pub fn newest(&self, p: Partition, changes: &Changes) -> Option<i64> {
        let committed = self.history.partition(p.0).and_then(|h| h.newest);
        committed.max(changes.partitions.get(&p.0).and_then(|c| c.newest))
    }

    /// Takes what a flush over `partitions` judged as the history, exact
    /// below each partition's offset in `next`, before that flush commits:
    /// the micro-batch after it is judged against it while it commits.
    /// Returns the rows the flush must write in its transaction (its keys, a
    /// seed not written yet, and the keys that fell out of the window to
    /// prune). If the flush does not commit, [`Histories::forget_all`] makes
    /// every partition load again from what PostgreSQL holds.
    pub fn stage(
        &mut self,
        partitions: &[Partition],
        changes: Changes,
        next: &[(Partition, Offset)],
    ) -> Result<KeyWrites, KeyWritesError> {
        let window = self.history.window_micros();
        let (mut keys, mut pruned, mut floors) = (Vec::new(), Vec::new(), Vec::new());
        for &p in partitions {
            let seed = self.unsaved.get(&p).map(Vec::as_slice).unwrap_or_default();
            let added = changes.partitions.get(&p.0).map(|c| c.added.as_slice()).unwrap_or_default();
            // One row per key (a key of the seed may come again as a new
            // first copy once the seed's fell out of the window).
            let rows: HashMap<EventKey, i64> = seed.iter().chain(added).copied().collect();
            // A time PostgreSQL cannot hold is left out.
            let valid = shared_schema::dedup::oldest_first(&rows)
                .into_iter()
                .filter(|(_, t)| DateTime::from_timestamp_micros(*t).is_some());
            keys.extend(valid.map(|(k, t)| (p.0, *k, t)));
            let floor = self.newest(p, &changes).and_then(|n| DateTime::from_timestamp_micros(n - window));
            if let (Some(floor), true) = (floor, !added.is_empty()) {
                pruned.push(p.0);
                floors.push(floor);
            }
        }
        let copy = if keys.is_empty() {
            None
        } else {
            Some(platform::pgcopy::encode(&[shared_schema::dedup::key_batch(keys)?])?)
        };
        for (p, _) in next {
            self.unsaved.remove(p);
        }
        self.history.apply(changes);
        self.valid_at.extend(next.iter().copied());
        Ok(KeyWrites { copy, pruned, floors })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyWritesError {
    #[error("the keys as Arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("the keys as COPY: {0}")]
    Copy(#[from] platform::pgcopy::CopyError),
}

/// What a flush writes of the duplicates history: the keys it judged first
/// copies (and a seed not written yet), appended with one binary `COPY`,
/// never merged into an index of keys (see migration 0022), and per
/// partition the time below which keys fell out of the window. Encoded
/// when staged, so the commit only sends it.
#[derive(Debug, Default)]
pub struct KeyWrites {
    copy: Option<Vec<u8>>,
    pruned: Vec<i32>,
    floors: Vec<DateTime<Utc>>,
}

impl KeyWrites {
    /// Writes them inside the flush's transaction: one `COPY` for the keys
    /// and one statement for the pruning, whatever the number of partitions.
    pub async fn write(&self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        if let Some(payload) = &self.copy {
            let mut copy = conn
                .copy_in_raw(
                    "COPY speed.event_keys (kafka_partition, event_key, event_time) FROM STDIN (FORMAT binary)",
                )
                .await?;
            copy.send(payload.as_slice()).await?;
            copy.finish().await?;
        }
        if !self.pruned.is_empty() {
            sqlx::query(
                "DELETE FROM speed.event_keys AS k USING unnest($1::int[], $2::timestamptz[]) AS f(p, floor)
                 WHERE k.kafka_partition = f.p AND k.event_time < f.floor",
            )
            .bind(&self.pruned)
            .bind(&self.floors)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }
}

/// What PostgreSQL holds of a partition: the speed layer's next offset and
/// newest time, and the batch's cut and newest time below it.
type Stored = (Option<i64>, Option<DateTime<Utc>>, Option<i64>, Option<DateTime<Utc>>);

/// One partition's history, exact at `from`, or where PostgreSQL is instead.
async fn load(
    conn: &mut PgConnection,
    p: Partition,
    from: Offset,
    window: i64,
) -> Result<Result<(PartitionHistory, Vec<(EventKey, i64)>), Moved>, sqlx::Error> {
    let row: Stored = sqlx::query_as(
        "SELECT o.next_offset, o.newest_event_time, c.cut_offset, c.newest_event_time
         FROM (SELECT $1::int AS kafka_partition) AS p
         LEFT JOIN ops.speed_offsets o USING (kafka_partition)
         LEFT JOIN ops.cut c USING (kafka_partition)",
    )
    .bind(p.0)
    .fetch_one(&mut *conn)
    .await?;
    let micros = |t: Option<DateTime<Utc>>| t.map(|t| t.timestamp_micros());
    let (newest, table, seeded) = match row {
        (Some(next), newest, _, _) => {
            if next != from.0 {
                return Ok(Err(Moved(p)));
            }
            (micros(newest), "speed.event_keys", false)
        }
        // No position: the layer starts at the cut (or at the log start
        // above it); the seed holds the keys below that cut.
        (None, _, Some(cut), newest) => {
            if cut > from.0 {
                return Ok(Err(Moved(p)));
            }
            (micros(newest), "ops.dedup_seed", true)
        }
        (None, _, None, _) => return Ok(Ok((PartitionHistory::default(), Vec::new()))),
    };
    let Some(newest) = newest else { return Ok(Ok((PartitionHistory::default(), Vec::new()))) };
    let floor = DateTime::from_timestamp_micros(newest - window).unwrap_or(DateTime::<Utc>::MIN_UTC);
    let rows: Vec<(Vec<u8>, DateTime<Utc>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT event_key, event_time FROM {table} WHERE kafka_partition = $1 AND event_time >= $2"
    )))
    .bind(p.0)
    .bind(floor)
    .fetch_all(&mut *conn)
    .await?;
    let keys: Vec<(EventKey, i64)> =
        rows.into_iter().filter_map(|(k, t)| EventKey::from_slice(&k).map(|k| (k, t.timestamp_micros()))).collect();
    // Both tables append (migrations 0022, 0023): a key written again has
    // a row for each write until the older is pruned; the newest counts.
    let mut seen: HashMap<EventKey, i64> = HashMap::with_capacity(keys.len());
    for &(k, t) in &keys {
        seen.entry(k).and_modify(|s| *s = (*s).max(t)).or_insert(t);
    }
    let history = PartitionHistory { newest: Some(newest), seen };
    Ok(Ok((history, if seeded { keys } else { Vec::new() })))
}
