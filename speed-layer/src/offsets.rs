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

/// Moves each partition's offset from `from` to `to` inside `tx`; returns
/// the partitions whose stored offset was not `from` (fenced off).
pub async fn advance(conn: &mut PgConnection, advances: &[Advance]) -> Result<Vec<Partition>, sqlx::Error> {
    let mut fenced = Vec::new();
    for a in advances {
        // Insert when absent (then `from` was derived from the cut), update
        // only from the expected offset otherwise.
        let done = sqlx::query(
            "INSERT INTO ops.speed_offsets AS o
                (kafka_partition, next_offset, last_event_time, newest_event_time, updated_at)
             VALUES ($1, $2, $3, $5, now())
             ON CONFLICT (kafka_partition) DO UPDATE SET
                next_offset = EXCLUDED.next_offset,
                last_event_time = GREATEST(o.last_event_time, EXCLUDED.last_event_time),
                newest_event_time = GREATEST(o.newest_event_time, EXCLUDED.newest_event_time),
                updated_at = now()
             WHERE o.next_offset = $4",
        )
        .bind(a.partition.0)
        .bind(a.to.0)
        .bind(a.last_event_time)
        .bind(a.from.0)
        .bind(a.newest_event_time)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if done == 0 {
            fenced.push(a.partition);
        }
    }
    Ok(fenced)
}
