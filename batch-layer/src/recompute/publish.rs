//! The one PostgreSQL transaction of a run: the computed views and batch
//! tables, the view fingerprints, the new cut, and the deletion of the
//! speed rows below it. Readers see the old state or the new one; the
//! totals of `serving.*` do not move, because what leaves `speed.*`
//! arrives in `batch.*` in the same commit.
//!
//! The transaction first locks `ops.run_fence` and goes on only if the token
//! is still the one this run took with its lock, and only if no partition's
//! cut would move back: a run that lost its lock to a newer run (a
//! PostgreSQL restart mid-run) publishes nothing.

use std::collections::BTreeMap;

use shared_schema::ALL_VIEWS;
use shared_schema::cut::{OffsetCut, SegmentSize};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

use super::RunError;
use super::compute::{Computed, Relation};
use super::plan::Refresh;

/// What the publish records besides the tables.
pub(crate) struct Record<'a> {
    pub(crate) run_id: i64,
    /// The fencing token taken with the lock.
    pub(crate) token: i64,
    pub(crate) cut: &'a OffsetCut,
    pub(crate) segment_size: SegmentSize,
    pub(crate) newest_hour: Option<chrono::DateTime<chrono::Utc>>,
    /// Where the windowed batch tables looked back from.
    pub(crate) anchor: chrono::DateTime<chrono::Utc>,
    /// The fingerprint of every view, recorded with it.
    pub(crate) definitions: &'a [(&'static str, String)],
    /// The newest times below the cut and the speed layer's seed.
    pub(crate) history: &'a crate::dedup::CutHistory,
}

fn staging_table(name: &str) -> String {
    format!("batch_staging_{name}")
}

/// Publishes in one transaction; returns the rows of each published table
/// after the publish.
pub(crate) async fn publish(
    conn: &mut PgConnection,
    computed: &[Computed],
    record: &Record<'_>,
) -> Result<BTreeMap<String, u64>, RunError> {
    let mut tx = conn.begin().await?;
    fence(&mut tx, record).await?;
    let mut rows = BTreeMap::new();
    for Computed { name, relation, refresh, batches } in computed {
        let staging = staging_table(name);
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE TEMP TABLE {staging} (LIKE batch.{name}) ON COMMIT DROP")))
            .execute(&mut *tx)
            .await?;
        // Columns by name, not position: a column a migration appended may
        // sit anywhere in the definition.
        let columns = batches.first().map_or_else(
            || "*".to_string(),
            |b| b.schema().fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", "),
        );
        let list = if columns == "*" { String::new() } else { format!(" ({columns})") };
        let statement = format!("COPY {staging}{list} FROM STDIN (FORMAT binary)");
        let mut copy = tx.copy_in_raw(&statement).await?;
        copy.send(platform::pgcopy::encode(batches)?).await?;
        copy.finish().await?;
        let insert = format!("INSERT INTO batch.{name}{list} SELECT {columns} FROM {staging}");
        match (refresh, relation) {
            (Refresh::Replace, _) | (Refresh::Upsert, Relation::Table(_)) => {
                sqlx::raw_sql(AssertSqlSafe(format!("TRUNCATE batch.{name}; {insert};"))).execute(&mut *tx).await?;
            }
            (Refresh::Hours { key, hours }, _) => {
                let starts: Vec<chrono::DateTime<chrono::Utc>> = hours.iter().map(|h| h.start()).collect();
                sqlx::query(AssertSqlSafe(format!("DELETE FROM batch.{name} WHERE {key} = ANY($1)")))
                    .bind(starts)
                    .execute(&mut *tx)
                    .await?;
                sqlx::raw_sql(AssertSqlSafe(insert)).execute(&mut *tx).await?;
            }
            (Refresh::Upsert, Relation::View(view)) => {
                sqlx::raw_sql(AssertSqlSafe(view.batch_upsert_sql(&staging))).execute(&mut *tx).await?;
            }
        }
        let n: i64 =
            sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM batch.{name}"))).fetch_one(&mut *tx).await?;
        rows.insert(name.to_string(), n as u64);
    }
    for c in computed.iter().filter(|c| matches!(c.relation, Relation::Table(_))) {
        sqlx::query(
            "INSERT INTO ops.batch_tables (name, run_id, anchor, computed_at) VALUES ($1, $2, $3, now())
             ON CONFLICT (name) DO UPDATE SET run_id = EXCLUDED.run_id, anchor = EXCLUDED.anchor, computed_at = now()",
        )
        .bind(c.name)
        .bind(record.run_id)
        .bind(record.anchor)
        .execute(&mut *tx)
        .await?;
    }
    for (name, fingerprint) in record.definitions {
        sqlx::query(
            "INSERT INTO ops.view_definitions (name, fingerprint, run_id, published_at) VALUES ($1, $2, $3, now())
             ON CONFLICT (name) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, run_id = EXCLUDED.run_id,
                 published_at = now()",
        )
        .bind(name)
        .bind(fingerprint)
        .bind(record.run_id)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("UPDATE ops.batch_runs SET newest_hour = $2 WHERE run_id = $1")
        .bind(record.run_id)
        .bind(record.newest_hour)
        .execute(&mut *tx)
        .await?;
    for (p, o) in record.cut.iter() {
        let newest = record.history.newest.get(&p).and_then(|t| chrono::DateTime::from_timestamp_micros(*t));
        sqlx::query(
            "INSERT INTO ops.cut (kafka_partition, cut_offset, newest_event_time, updated_at) VALUES ($1, $2, $3, now())
             ON CONFLICT (kafka_partition) DO UPDATE SET cut_offset = EXCLUDED.cut_offset,
                 newest_event_time = GREATEST(ops.cut.newest_event_time, EXCLUDED.newest_event_time),
                 updated_at = now()",
        )
        .bind(p.0)
        .bind(o.0)
        .bind(newest)
        .execute(&mut *tx)
        .await?;
    }
    // The seed reaches this cut: partitions the speed layer now holds lose
    // theirs; the others' is continued with the new offsets' keys (or
    // replaced, when it did not reach the previous cut), and keys older
    // than the window leave it.
    let seeded: Vec<i32> = record.history.seed.keys().map(|p| p.0).collect();
    sqlx::query("DELETE FROM ops.dedup_seed WHERE kafka_partition <> ALL($1)").bind(&seeded).execute(&mut *tx).await?;
    sqlx::query("DELETE FROM ops.dedup_seed_cut WHERE kafka_partition <> ALL($1)")
        .bind(&seeded)
        .execute(&mut *tx)
        .await?;
    for (p, seed) in &record.history.seed {
        let stale = if seed.continues {
            let floor =
                chrono::DateTime::from_timestamp_micros(seed.floor).unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
            sqlx::query("DELETE FROM ops.dedup_seed WHERE kafka_partition = $1 AND event_time < $2")
                .bind(p.0)
                .bind(floor)
        } else {
            sqlx::query("DELETE FROM ops.dedup_seed WHERE kafka_partition = $1").bind(p.0)
        };
        stale.execute(&mut *tx).await?;
        let (keys, times) = shared_schema::dedup::key_columns(seed.keys.iter().map(|(k, t)| (k, t)));
        // A replaced seed is empty now and the keys are distinct: a plain
        // insert; a continued one may meet a key it holds (a lake written
        // before duplicates were judged).
        let insert = "INSERT INTO ops.dedup_seed (kafka_partition, event_key, event_time)
             SELECT $1, k, t FROM unnest($2::bytea[], $3::timestamptz[]) AS x(k, t)";
        let merge = if seed.continues {
            " ON CONFLICT (kafka_partition, event_key)
             DO UPDATE SET event_time = GREATEST(ops.dedup_seed.event_time, EXCLUDED.event_time)"
        } else {
            ""
        };
        sqlx::query(AssertSqlSafe(format!("{insert}{merge}")))
            .bind(p.0)
            .bind(keys)
            .bind(times)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO ops.dedup_seed_cut (kafka_partition, cut_offset) VALUES ($1, $2)
             ON CONFLICT (kafka_partition) DO UPDATE SET cut_offset = EXCLUDED.cut_offset",
        )
        .bind(p.0)
        .bind(record.cut.get(*p).0)
        .execute(&mut *tx)
        .await?;
    }
    // The batch now holds everything below the cut: the speed rows of those
    // segments are garbage (the serving views already ignore them).
    for view in ALL_VIEWS.iter().filter(|v| v.segmented()) {
        sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM speed.{name} s USING ops.cut c
             WHERE c.kafka_partition = s.kafka_partition AND (s.segment + 1) * $1 <= c.cut_offset",
            name = view.name
        )))
        .bind(record.segment_size.get())
        .execute(&mut *tx)
        .await?;
    }
    // The speed rows of the other views that the new batch rows dominate
    // add nothing to the merge: the speed tables keep only what the batch
    // does not hold yet (a forgotten user's and everyone's stale state go).
    for sql in ALL_VIEWS.iter().filter_map(|v| v.speed_prune_sql()) {
        sqlx::query(AssertSqlSafe(sql)).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(rows)
}

/// Locks the fence row for the rest of the transaction (publishes run one
/// at a time) and refuses to publish when another run took the token since
/// this one did, or when the cut would move back.
async fn fence(tx: &mut PgConnection, record: &Record<'_>) -> Result<(), RunError> {
    let current: i64 = sqlx::query_scalar("SELECT token FROM ops.run_fence FOR UPDATE").fetch_one(&mut *tx).await?;
    if current != record.token {
        return Err(RunError::Fenced { ours: record.token, current });
    }
    let published: Vec<(i32, i64)> =
        sqlx::query_as("SELECT kafka_partition, cut_offset FROM ops.cut").fetch_all(&mut *tx).await?;
    for (partition, published) in published {
        // A partition the cut leaves out keeps its published cut.
        let Some(planned) = record.cut.iter().find(|(p, _)| p.0 == partition).map(|(_, o)| o.0) else { continue };
        if planned < published {
            return Err(RunError::CutMovesBack { partition, published, planned });
        }
    }
    Ok(())
}
