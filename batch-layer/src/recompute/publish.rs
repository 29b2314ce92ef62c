//! The publish of a run: the computed views and batch tables, the view
//! fingerprints, the new cut, and the deletion of the speed rows below it,
//! in one transaction. Readers see the old state or the new one; the totals
//! of `serving.*` do not move, because what leaves `speed.*` arrives in
//! `batch.*` in the same commit.
//!
//! Readers never wait for it: each relation replaced whole is loaded
//! beforehand into its shadow table (`batch.<name>__a` or `__b`, whichever
//! `batch.<name>` does not show; migration 0020), by COPY with its indexes
//! built after, and the transaction swaps the view onto it as its last
//! statements. No table readers use is truncated or counted here, and
//! no row is written twice.
//!
//! The same transaction recomputes the rollups the derived views read
//! (`shared_schema::derived::Rollup`) for the hours it wrote, or whole when
//! it replaced a relation they read, so they always match `batch.*`.
//!
//! Each transaction first locks `ops.run_fence` and goes on only if the token
//! is still the one this run took with its lock, and only if no partition's
//! cut would move back: a run that lost its lock to a newer run (a
//! PostgreSQL restart mid-run) publishes nothing.

use std::collections::BTreeMap;

use shared_schema::cut::{OffsetCut, SegmentSize};
use shared_schema::derived::{Input, ROLLUPS, Rollup};
use shared_schema::views;
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
    /// The Delta version of the lake's catalog the run read.
    pub(crate) catalog_version: Option<i64>,
    /// Tests only: where the load waits before its commit.
    pub(crate) pause_while_loading: Option<&'a super::PublishPause>,
    /// The views left to the speed layer (`Refresh::Defer`), each with the
    /// cut its batch rows reach.
    pub(crate) deferred: &'a [(&'static str, OffsetCut)],
}

fn staging_table(name: &str) -> String {
    format!("batch_staging_{name}")
}

/// How long the swap waits for readers' locks before it lets them go on
/// and tries again: below PostgreSQL's `deadlock_timeout` (1 s), so a
/// reader that takes the views in another order never meets a deadlock,
/// and short enough that a reader queued behind the swap stays within the
/// recommender's budget.
const SWAP_LOCK_TIMEOUT: &str = "100ms";
/// How often the swap tries, with [`SWAP_PAUSE`] between tries: a reader
/// that holds a view for longer than that (a long analyst query) fails
/// the run, which the next run repeats.
const SWAP_TRIES: u32 = 60;
const SWAP_PAUSE: std::time::Duration = std::time::Duration::from_millis(250);

/// Publishes: first loads the shadow of every relation replaced whole
/// (COPY, then its indexes; readers read the active tables meanwhile), then
/// one transaction writes the incremental relations, the bookkeeping and
/// the cut, deletes the speed rows below it, and swaps the loaded shadows
/// in as its last statements. Returns the rows written per relation: the
/// whole relation for those replaced, the recomputed hours or the folded
/// rows for the others.
pub(crate) async fn publish(
    conn: &mut PgConnection,
    computed: &[Computed],
    record: &Record<'_>,
) -> Result<BTreeMap<String, u64>, RunError> {
    let mut written = BTreeMap::new();
    let whole: Vec<&Computed> = computed.iter().filter(|c| c.replaces_all()).collect();
    let mut shadows = BTreeMap::new();
    if !whole.is_empty() {
        let mut tx = conn.begin().await?;
        fence(&mut tx, record).await?;
        for c in &whole {
            let shadow: String =
                sqlx::query_scalar("SELECT batch.shadow_begin($1)").bind(c.name).fetch_one(&mut *tx).await?;
            let n = copy(&mut tx, &shadow, &c.batches).await?;
            sqlx::query("SELECT batch.shadow_end($1)").bind(c.name).execute(&mut *tx).await?;
            written.insert(c.name.to_string(), n);
            shadows.insert(c.name, shadow);
        }
        if let Some(pause) = record.pause_while_loading {
            pause.reached.notify_one();
            pause.resume.notified().await;
        }
        tx.commit().await?;
    }

    let mut tx = conn.begin().await?;
    fence(&mut tx, record).await?;
    record_folds(&mut tx, computed, record).await?;
    for Computed { name, relation, refresh, batches } in computed.iter().filter(|c| !c.replaces_all()) {
        let staging = staging_table(name);
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE TEMP TABLE {staging} (LIKE batch.{name}) ON COMMIT DROP")))
            .execute(&mut *tx)
            .await?;
        let n = copy(&mut tx, &staging, batches).await?;
        let columns = column_list(batches);
        let list = columns.as_deref().map(|c| format!(" ({c})")).unwrap_or_default();
        let insert =
            format!("INSERT INTO batch.{name}{list} SELECT {} FROM {staging}", columns.as_deref().unwrap_or("*"));
        match (refresh, relation) {
            (Refresh::Hours { key, hours }, _) => {
                let starts: Vec<chrono::DateTime<chrono::Utc>> = hours.iter().map(|h| h.start()).collect();
                sqlx::query(AssertSqlSafe(format!("DELETE FROM batch.{name} WHERE {key} = ANY($1)")))
                    .bind(starts)
                    .execute(&mut *tx)
                    .await?;
                sqlx::raw_sql(AssertSqlSafe(insert)).execute(&mut *tx).await?;
            }
            (Refresh::Upsert { .. }, Relation::View(view)) => {
                // Prunes the speed rows it makes dominated (`prune_against`).
                sqlx::raw_sql(AssertSqlSafe(view.batch_fold_sql(&staging))).execute(&mut *tx).await?;
            }
            (Refresh::Replace, _) | (Refresh::Upsert { .. }, Relation::Table(_)) | (Refresh::Defer { .. }, _) => {
                unreachable!(
                    "relations replaced whole are loaded into their shadow; batch tables are replaced; deferred views are not computed"
                )
            }
        }
        written.insert(name.to_string(), n);
    }
    for (c, table) in computed.iter().filter_map(|c| match c.relation {
        Relation::Table(t) => Some((c, t)),
        Relation::View(_) => None,
    }) {
        let source = if table.input == Input::Catalog { record.catalog_version } else { None };
        sqlx::query(
            "INSERT INTO ops.batch_tables (name, run_id, anchor, computed_at, source_version)
             VALUES ($1, $2, $3, now(), $4)
             ON CONFLICT (name) DO UPDATE SET run_id = EXCLUDED.run_id, anchor = EXCLUDED.anchor, computed_at = now(),
                 source_version = EXCLUDED.source_version",
        )
        .bind(c.name)
        .bind(record.run_id)
        .bind(record.anchor)
        .bind(source)
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
    // than the window leave it. Each by partition, so the indexes find the
    // rows (an incremental publish reads no whole seed).
    let unseeded: Vec<i32> =
        record.cut.iter().map(|(p, _)| p.0).filter(|p| !record.history.seed.keys().any(|s| s.0 == *p)).collect();
    sqlx::query("DELETE FROM ops.dedup_seed WHERE kafka_partition = ANY($1)").bind(&unseeded).execute(&mut *tx).await?;
    sqlx::query("DELETE FROM ops.dedup_seed_cut WHERE kafka_partition = ANY($1)")
        .bind(&unseeded)
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
        if seed.continues {
            // Appended (migration 0023): a key it holds already (a lake
            // written before duplicates were judged) gets a second row, and
            // the speed layer keeps the newer when it loads the seed.
            let (keys, times) = shared_schema::dedup::key_columns(seed.keys.iter().map(|(k, t)| (k, t)));
            sqlx::query(
                "INSERT INTO ops.dedup_seed (kafka_partition, event_key, event_time)
                 SELECT $1, k, t FROM unnest($2::bytea[], $3::timestamptz[]) AS x(k, t)",
            )
            .bind(p.0)
            .bind(keys)
            .bind(times)
            .execute(&mut *tx)
            .await?;
        } else {
            // A replaced seed is empty now and its keys are distinct: the
            // whole window's keys, so by COPY.
            let batch = seed_batch(*p, &seed.keys)
                .map_err(|e| RunError::Compute { view: "duplicates seed", source: e.into() })?;
            copy(&mut tx, "ops.dedup_seed", std::slice::from_ref(&batch)).await?;
        }
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
    for view in views::all().iter().filter(|v| v.segmented()) {
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
    // does not hold yet.
    for (view, rows) in prune_against(computed, &shadows) {
        if let Some(sql) = view.speed_prune_sql(&rows) {
            sqlx::query(AssertSqlSafe(sql)).execute(&mut *tx).await?;
        }
    }
    // The rollups of what this transaction wrote, read from the shadows
    // about to be swapped in.
    for rollup in ROLLUPS {
        let Some(scope) = rollup_scope(rollup, computed) else { continue };
        let source = |name: &str| shadows.get(name).cloned().unwrap_or_else(|| format!("batch.{name}"));
        let (hours, starts) = match scope {
            RollupScope::Hours(starts) => (true, starts),
            RollupScope::All => (false, Vec::new()),
        };
        sqlx::query(AssertSqlSafe(rollup.clear_sql(hours))).bind(&starts).execute(&mut *tx).await?;
        let n = sqlx::query(AssertSqlSafe(rollup.fill_sql(&source, hours))).bind(&starts).execute(&mut *tx).await?;
        written.insert(format!("rollup {}", rollup.name), n.rows_affected());
    }
    swap(&mut tx, &shadows.keys().copied().collect::<Vec<_>>()).await?;
    tx.commit().await?;
    Ok(written)
}

/// Records which views' batch rows reach the new cut (those written) and
/// which lag it (`ops.view_folds`), after checking in this transaction that
/// the speed layer still holds what a deferred view leaves to it (its
/// position could have been reset while the run computed).
async fn record_folds(tx: &mut PgConnection, computed: &[Computed], record: &Record<'_>) -> Result<(), RunError> {
    let written: Vec<&str> =
        computed.iter().filter(|c| matches!(c.relation, Relation::View(_))).map(|c| c.name).collect();
    sqlx::query("DELETE FROM ops.view_folds WHERE view_name = ANY($1)").bind(&written).execute(&mut *tx).await?;
    if record.deferred.is_empty() {
        return Ok(());
    }
    let folds = super::speed_side(&mut *tx).await?;
    for (view, from) in record.deferred {
        if !folds.speed_holds(view, from, record.cut) {
            return Err(RunError::SpeedMoved { view });
        }
        // A view already pending keeps its cut and the time it began.
        sqlx::query(
            "INSERT INTO ops.view_folds (view_name, folded_cut, pending_since) VALUES ($1, $2, now())
             ON CONFLICT (view_name) DO NOTHING",
        )
        .bind(view)
        .bind(super::cut_json(from))
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// For each view this publish wrote, the relation whose rows its speed
/// rows are pruned against (see `ViewDef::speed_prune_sql`): the whole new
/// relation when it was replaced; the rows written (the staging table)
/// when it rewrote hours, which are then the hours' whole batch rows. A
/// folded view is pruned by its fold itself (`ViewDef::batch_fold_sql`),
/// against the batch rows it wrote. A batch row the publish did not write
/// dominates no speed row it did not dominate before, so an incremental
/// publish reads what it wrote, not the batch table (a hash join over all
/// of `batch.user_product_state` took 0.7 s at one week,
/// docs/BENCHMARKS.md). A speed row that was dominated already (folded by
/// a speed layer catching up below the cut) stays until a full run; it
/// changes nothing readers see.
fn prune_against(
    computed: &[Computed],
    shadows: &BTreeMap<&str, String>,
) -> Vec<(&'static shared_schema::ViewDef, String)> {
    computed
        .iter()
        .filter_map(|c| match (c.relation, &c.refresh) {
            (Relation::View(view), Refresh::Replace) => {
                Some((view, shadows.get(c.name).cloned().unwrap_or_else(|| format!("batch.{}", c.name))))
            }
            (Relation::View(view), Refresh::Hours { .. }) => Some((view, staging_table(c.name))),
            (Relation::View(_), Refresh::Upsert { .. } | Refresh::Defer { .. }) | (Relation::Table(_), _) => None,
        })
        .collect()
}

/// Which hours of a rollup a publish recomputes.
#[derive(Debug, PartialEq, Eq)]
enum RollupScope {
    /// Every hour: a relation it reads was replaced (or folded in, which
    /// does not say which hours changed).
    All,
    /// The hours (their starts) written of the relations it reads.
    Hours(Vec<chrono::DateTime<chrono::Utc>>),
}

/// `None` when the publish wrote nothing the rollup reads.
fn rollup_scope(rollup: &Rollup, computed: &[Computed]) -> Option<RollupScope> {
    let read: Vec<&Computed> = computed.iter().filter(|c| rollup.reads.contains(&c.name)).collect();
    if rollup.whole {
        return (!read.is_empty()).then_some(RollupScope::All);
    }
    let mut starts = Vec::new();
    for c in &read {
        match &c.refresh {
            Refresh::Hours { hours, .. } => starts.extend(hours.iter().map(|h| h.start())),
            Refresh::Replace | Refresh::Upsert { .. } => return Some(RollupScope::All),
            Refresh::Defer { .. } => {}
        }
    }
    starts.sort_unstable();
    starts.dedup();
    (!read.is_empty()).then_some(RollupScope::Hours(starts))
}

/// The seed keys of partition `p` as the columns of `ops.dedup_seed`.
fn seed_batch(
    p: shared_schema::cut::Partition,
    keys: &[(shared_schema::dedup::EventKey, i64)],
) -> Result<arrow::array::RecordBatch, arrow::error::ArrowError> {
    let keys = shared_schema::dedup::oldest_first(keys.iter().map(|(k, t)| (k, t)));
    shared_schema::dedup::key_batch(keys.into_iter().map(|(k, t)| (p.0, *k, t)))
}

/// The columns of `batches` by name (a column a migration appended may sit
/// anywhere in the table's definition); `None` for no batches.
fn column_list(batches: &[arrow::array::RecordBatch]) -> Option<String> {
    batches.first().map(|b| b.schema().fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", "))
}

/// COPYs `batches` into `table` by column name; returns the rows written.
async fn copy(tx: &mut PgConnection, table: &str, batches: &[arrow::array::RecordBatch]) -> Result<u64, RunError> {
    let list = column_list(batches).map(|c| format!(" ({c})")).unwrap_or_default();
    let mut copy = tx.copy_in_raw(&format!("COPY {table}{list} FROM STDIN (FORMAT binary)")).await?;
    copy.send(platform::pgcopy::encode(batches)?).await?;
    Ok(copy.finish().await?)
}

/// Points each of `relations` at its loaded shadow, the transaction's last
/// statements. A swap that waits on readers longer than
/// [`SWAP_LOCK_TIMEOUT`] steps back to its savepoint, lets them through and
/// tries again.
async fn swap(tx: &mut PgConnection, relations: &[&str]) -> Result<(), RunError> {
    if relations.is_empty() {
        return Ok(());
    }
    let mut tries = 0;
    loop {
        tries += 1;
        sqlx::raw_sql(AssertSqlSafe(format!("SAVEPOINT swap; SET LOCAL lock_timeout = '{SWAP_LOCK_TIMEOUT}'")))
            .execute(&mut *tx)
            .await?;
        let mut outcome = Ok(());
        for r in relations {
            outcome = sqlx::query("SELECT batch.shadow_swap($1)").bind(r).execute(&mut *tx).await.map(|_| ());
            if outcome.is_err() {
                break;
            }
        }
        match outcome {
            Ok(()) => {
                sqlx::raw_sql("RELEASE SAVEPOINT swap").execute(&mut *tx).await?;
                return Ok(());
            }
            // A lock timeout, or a deadlock with a reader (possible only if
            // `deadlock_timeout` is set below the swap's lock timeout).
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("55P03" | "40P01")) && tries < SWAP_TRIES =>
            {
                sqlx::raw_sql("ROLLBACK TO SAVEPOINT swap").execute(&mut *tx).await?;
                metrics::counter!("batch_publish_swap_retries_total").increment(1);
                tracing::debug!(tries, "readers hold the batch views; swapping again shortly");
                tokio::time::sleep(SWAP_PAUSE).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
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

#[cfg(test)]
mod tests {
    use shared_schema::derived::{
        CATEGORY_DEMAND_ROLLUP, DEMAND_BASELINE, DEMAND_LEVEL_ROLLUP, POPULAR_ROLLUP, PRODUCTS,
    };
    use shared_schema::schema::Hour;
    use shared_schema::views::{product_demand_hourly, user_product_state};

    use super::*;

    fn hour(h: i64) -> Hour {
        Hour::of(chrono::DateTime::from_timestamp(h * 3600, 0).unwrap())
    }

    fn view(view: &'static shared_schema::ViewDef, refresh: Refresh) -> Computed {
        Computed { name: view.name, relation: Relation::View(view), refresh, batches: Vec::new() }
    }

    fn table(table: &'static shared_schema::derived::BatchTable) -> Computed {
        Computed { name: table.name, relation: Relation::Table(table), refresh: Refresh::Replace, batches: Vec::new() }
    }

    #[test]
    fn speed_rows_are_pruned_against_what_the_publish_wrote() {
        let hours = Refresh::Hours { key: "hour", hours: vec![hour(5)] };
        let shadows = BTreeMap::from([(user_product_state().name, "batch.user_product_state__b".to_string())]);
        let names = |computed: &[Computed]| -> Vec<(&str, String)> {
            prune_against(computed, &shadows).into_iter().map(|(v, rows)| (v.name, rows)).collect()
        };
        // Rewritten hours: against the rows written, never the batch table;
        // folded: by the fold itself.
        let incremental = [
            view(product_demand_hourly(), hours),
            view(user_product_state(), Refresh::Upsert { from: Default::default() }),
        ];
        assert_eq!(names(&incremental), [("product_demand_hourly", "batch_staging_product_demand_hourly".to_string())]);
        // Replaced: against the whole new relation, the shadow about to be swapped in.
        let full = [view(user_product_state(), Refresh::Replace), table(&DEMAND_BASELINE)];
        assert_eq!(names(&full), [("user_product_state", "batch.user_product_state__b".to_string())]);
        // Not written: not pruned.
        assert_eq!(names(&[table(&PRODUCTS)]), []);
    }

    #[test]
    fn rollups_follow_what_the_publish_wrote() {
        let hours = |h: &[i64]| Refresh::Hours { key: "hour", hours: h.iter().map(|h| hour(*h)).collect() };
        let demand_hours = view(product_demand_hourly(), hours(&[7, 5, 7]));
        let state = view(user_product_state(), Refresh::Upsert { from: Default::default() });
        // Only the written hours, once each, in order.
        let written = [demand_hours, state];
        let starts = vec![hour(5).start(), hour(7).start()];
        assert_eq!(rollup_scope(&CATEGORY_DEMAND_ROLLUP, &written), Some(RollupScope::Hours(starts.clone())));
        assert_eq!(rollup_scope(&DEMAND_LEVEL_ROLLUP, &written), Some(RollupScope::Hours(starts)));
        // A replaced catalog changes every hour's categories, not the levels;
        // a replaced baseline every level, not the categories.
        let catalog = [view(product_demand_hourly(), hours(&[5])), table(&PRODUCTS)];
        assert_eq!(rollup_scope(&CATEGORY_DEMAND_ROLLUP, &catalog), Some(RollupScope::All));
        assert_eq!(rollup_scope(&DEMAND_LEVEL_ROLLUP, &catalog), Some(RollupScope::Hours(vec![hour(5).start()])));
        let baseline = [table(&DEMAND_BASELINE)];
        assert_eq!(rollup_scope(&CATEGORY_DEMAND_ROLLUP, &baseline), None);
        assert_eq!(rollup_scope(&DEMAND_LEVEL_ROLLUP, &baseline), Some(RollupScope::All));
        // A full run replaces the view; a run that wrote nothing they read
        // leaves both alone.
        let full = [view(product_demand_hourly(), Refresh::Replace)];
        assert_eq!(rollup_scope(&CATEGORY_DEMAND_ROLLUP, &full), Some(RollupScope::All));
        assert_eq!(
            rollup_scope(
                &DEMAND_LEVEL_ROLLUP,
                &[view(user_product_state(), Refresh::Upsert { from: Default::default() })]
            ),
            None
        );
        // Popularity is as of the newest hour: whole whenever demand was written.
        assert_eq!(rollup_scope(&POPULAR_ROLLUP, &written), Some(RollupScope::All));
        assert_eq!(rollup_scope(&POPULAR_ROLLUP, &baseline), None);
    }
}
