//! The speed layer's Kafka positions, kept in PostgreSQL next to its deltas.
//!
//! `ops.speed_offsets` holds, per partition, the next offset whose effect
//! is not yet in `speed.*`. A flush moves it forward in the same
//! transaction as the deltas, *conditionally*: only from the offset the
//! flushing instance started at. If another instance moved it meanwhile (a
//! rebalance handed the partition over), the condition fails, the whole
//! transaction rolls back and nothing is counted twice.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use shared_schema::cut::{Offset, Partition};
use sqlx::{PgConnection, PgPool};

/// Where consumption of partition `p` starts when nothing is stored: the
/// batch's cut (offsets below it are the batch's), else the beginning.
pub async fn load(pool: &PgPool, partitions: &[Partition]) -> Result<BTreeMap<Partition, Offset>, sqlx::Error> {
    let partitions: Vec<i32> = partitions.iter().map(|p| p.0).collect();
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT p.kafka_partition, COALESCE(o.next_offset, c.cut_offset, 0)
         FROM unnest($1::int[]) AS p(kafka_partition)
         LEFT JOIN ops.speed_offsets o USING (kafka_partition)
         LEFT JOIN ops.cut c USING (kafka_partition)",
    )
    .bind(partitions)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(p, o)| (Partition(p), Offset(o))).collect())
}

/// Where the speed layer stands in one partition, as operators judge it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct Standing {
    pub partition: i32,
    /// The next offset not yet counted by either layer: the stored offset,
    /// else the batch's cut (where [`load`] starts the partition).
    pub next_offset: i64,
    pub last_event_time: Option<DateTime<Utc>>,
}

/// Every partition's [`Standing`]. A partition without a stored offset
/// stands at the batch's cut, not at 0: when the cut reaches the end of the
/// partition, nothing is left for the speed layer to read or store, and it
/// is neither lagging nor stalled.
pub async fn standings(pool: &PgPool) -> Result<Vec<Standing>, sqlx::Error> {
    sqlx::query_as(
        "SELECT kafka_partition AS partition, COALESCE(o.next_offset, c.cut_offset, 0) AS next_offset,
                o.last_event_time
         FROM ops.speed_offsets AS o FULL JOIN ops.cut AS c USING (kafka_partition)",
    )
    .fetch_all(pool)
    .await
}

/// One partition's advance in a flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advance {
    pub partition: Partition,
    /// The offset this instance started the flush from (what it loaded).
    pub from: Offset,
    /// The next offset after the flush.
    pub to: Offset,
    pub last_event_time: Option<DateTime<Utc>>,
    /// The greatest event time of the valid records below `to`: the newest
    /// time duplicates are judged by (see [`crate::history`]).
    pub newest_event_time: Option<DateTime<Utc>>,
}

/// Moves each partition's offset from `from` to `to` inside `tx`, in one
/// statement; returns the partitions whose stored offset was not `from`
/// (fenced off).
///
/// A partition without a stored offset is inserted only when `from` is
/// where [`load`] starts such a partition (the cut, else 0). Otherwise a
/// row that disappeared while this process ran (committed flushes lost by
/// PostgreSQL, a database restored from an older backup) would be inserted
/// again at the offset this process believes committed, skipping records;
/// with the check the flush is fenced and the partition read again. The
/// row records where it started (`started_offset`): the batch defers a
/// fold to the speed layer only over records it holds (migration 0026).
pub async fn advance(conn: &mut PgConnection, advances: &[Advance]) -> Result<Vec<Partition>, sqlx::Error> {
    if advances.is_empty() {
        return Ok(Vec::new());
    }
    let partitions: Vec<i32> = advances.iter().map(|a| a.partition.0).collect();
    let from: Vec<i64> = advances.iter().map(|a| a.from.0).collect();
    let to: Vec<i64> = advances.iter().map(|a| a.to.0).collect();
    let last: Vec<Option<DateTime<Utc>>> = advances.iter().map(|a| a.last_event_time).collect();
    let newest: Vec<Option<DateTime<Utc>>> = advances.iter().map(|a| a.newest_event_time).collect();
    let moved: Vec<i32> = sqlx::query_scalar(
        "WITH a AS (
            SELECT * FROM unnest($1::int[], $2::bigint[], $3::bigint[], $4::timestamptz[], $5::timestamptz[])
                AS a(kafka_partition, from_offset, to_offset, last_event_time, newest_event_time)
         ), updated AS (
            UPDATE ops.speed_offsets AS o SET
                next_offset = a.to_offset,
                last_event_time = GREATEST(o.last_event_time, a.last_event_time),
                newest_event_time = GREATEST(o.newest_event_time, a.newest_event_time),
                updated_at = now()
            FROM a
            WHERE o.kafka_partition = a.kafka_partition AND o.next_offset = a.from_offset
            RETURNING o.kafka_partition
         ), inserted AS (
            INSERT INTO ops.speed_offsets
                (kafka_partition, next_offset, last_event_time, newest_event_time, updated_at, started_offset)
            SELECT a.kafka_partition, a.to_offset, a.last_event_time, a.newest_event_time, now(), a.from_offset
            FROM a LEFT JOIN ops.cut AS c USING (kafka_partition)
            WHERE a.from_offset = COALESCE(c.cut_offset, 0)
              AND NOT EXISTS (SELECT 1 FROM ops.speed_offsets AS o WHERE o.kafka_partition = a.kafka_partition)
            ON CONFLICT (kafka_partition) DO NOTHING
            RETURNING kafka_partition
         )
         SELECT kafka_partition FROM updated UNION ALL SELECT kafka_partition FROM inserted",
    )
    .bind(&partitions)
    .bind(&from)
    .bind(&to)
    .bind(&last)
    .bind(&newest)
    .fetch_all(&mut *conn)
    .await?;
    Ok(advances.iter().map(|a| a.partition).filter(|p| !moved.contains(&p.0)).collect())
}
