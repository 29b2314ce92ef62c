//! The registered views (issue 20): what `migrate` writes into `ops.views`
//! from the views folder, and what every service loads from there.
//!
//! The owner's side ([`register`]) runs in one transaction: it bumps
//! `ops.views_version` first, holding [`VIEWS_FENCE`] (so it waits for the
//! speed-layer flushes in flight, which hold the fence shared), then creates the tables of added views,
//! re-creates those of views whose columns changed, drops removed ones when
//! asked, records where the speed layer starts each added or redefined view
//! (its next offsets, now that no flush of the older set can commit), and
//! re-creates the serving views. A service's side ([`registered`]) parses
//! each registered text with this binary's checker: the check every start
//! runs.

use std::collections::BTreeMap;

use shared_schema::view_sql;
use shared_schema::views::{self, ViewDef, ViewSource};
use sqlx::{AssertSqlSafe, Executor, PgPool};

use crate::db::DbError;

/// What a registration did, by view name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ViewChanges {
    /// New views: their tables created, to be backfilled by the next batch run.
    pub added: Vec<String>,
    /// Redefined views: recomputed by the next batch run.
    pub changed: Vec<String>,
    /// Registered views whose file is gone, kept (and maintained) because
    /// dropping was not asked for.
    pub kept: Vec<String>,
    /// Removed views whose relations were dropped.
    pub dropped: Vec<String>,
}

impl ViewChanges {
    /// One line per kind of change, for the migrate command's output.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        let mut say = |names: &[String], what: &str| {
            if !names.is_empty() {
                lines.push(format!("{what}: {}", names.join(", ")));
            }
        };
        say(&self.added, "views added (the next batch run backfills them)");
        say(&self.changed, "views redefined (the next batch run recomputes them)");
        say(&self.kept, "view files removed, views kept and maintained (--drop-removed-views drops them)");
        say(&self.dropped, "views dropped");
        lines
    }
}

/// The view files of `dir`, checked; every refusal is printed to standard
/// error, one line each, and the error counts them.
pub fn load_folder(dir: &std::path::Path) -> anyhow::Result<Vec<ViewSource>> {
    if !dir.is_dir() {
        anyhow::bail!(
            "no views folder at {}: point --views-dir (or VIEWS_DIR) at the folder of view files, `views/` in the repository",
            dir.display()
        );
    }
    match view_sql::load_dir(dir) {
        Ok(views) => Ok(views),
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            anyhow::bail!(
                "{} view file(s) in {} refused (each above, with its line and reason); nothing was changed",
                errors.len(),
                dir.display()
            )
        }
    }
}

/// The views registered in the database, parsed.
#[derive(Debug, Clone)]
pub struct RegisteredViews {
    /// `ops.views_version` when they were read.
    pub version: i64,
    pub views: Vec<ViewDef>,
}

/// Loads and checks the registered views (through
/// `serving.view_sources()`, which every platform role may call).
pub async fn registered(pool: &PgPool) -> Result<RegisteredViews, DbError> {
    let rows: Vec<(i64, String, String)> =
        match sqlx::query_as("SELECT version, name, sql FROM serving.view_sources()").fetch_all(pool).await {
            Ok(rows) => rows,
            Err(sqlx::Error::Database(e)) if matches!(e.code().as_deref(), Some("42883" | "3F000" | "42P01")) => {
                return Err(DbError::Pending("the database has no registered views".into()));
            }
            Err(e) => return Err(e.into()),
        };
    let version = rows.first().map_or(0, |r| r.0);
    let views = rows.iter().map(|(_, name, sql)| parse_registered(name, sql)).collect::<Result<_, _>>()?;
    Ok(RegisteredViews { version, views })
}

/// The advisory lock a registration holds exclusively and a speed-layer
/// flush shared, from its check of the version to its commit ("lambdaVF").
pub const VIEWS_FENCE: i64 = 0x6c61_6d62_6461_5646;

/// The registered views' version, read inside a speed-layer flush with
/// [`VIEWS_FENCE`] taken shared until the commit: a registration waits for
/// the flush, and a flush that starts after a registration sees its
/// version.
pub async fn version(conn: &mut sqlx::PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1)").bind(VIEWS_FENCE).execute(&mut *conn).await?;
    sqlx::query_scalar("SELECT version FROM ops.views_version").fetch_one(conn).await
}

fn parse_registered(name: &str, sql: &str) -> Result<ViewDef, DbError> {
    view_sql::parse(&format!("{name}.sql"), sql).map_err(|e| {
        DbError::Pending(format!(
            "the registered view {name} is refused by this binary ({}); a newer release registered it",
            e.reason
        ))
    })
}

/// One row of `ops.views`.
#[derive(sqlx::FromRow)]
struct Row {
    name: String,
    sql: String,
    fingerprint: String,
    shape: String,
}

/// What to do with one view.
enum Step<'a> {
    /// Register it; create its tables unless `existing` (a shipped view
    /// whose tables the migrations made).
    Add {
        view: &'a ViewSource,
        existing: bool,
    },
    /// Store the new text; `recompute`: a new definition (start the speed
    /// layer afresh); `retable`: new columns (new tables).
    Update {
        view: &'a ViewSource,
        recompute: bool,
        retable: bool,
    },
    Keep,
    Drop {
        name: String,
    },
}

/// Registers `files` (the views folder, shipped views first): see the
/// module's description.
pub async fn register(pool: &PgPool, files: &[ViewSource], drop_removed: bool) -> Result<ViewChanges, DbError> {
    let mut tx = pool.begin().await?;
    // Serialises registrations and the serving views' re-creation.
    tx.execute("LOCK TABLE ops.generated_views IN EXCLUSIVE MODE").await?;
    let rows: Vec<Row> =
        sqlx::query_as("SELECT name, sql, fingerprint, shape FROM ops.views").fetch_all(&mut *tx).await?;
    let stored: BTreeMap<&str, &Row> = rows.iter().map(|r| (r.name.as_str(), r)).collect();

    let mut changes = ViewChanges::default();
    let mut steps = Vec::new();
    let mut set: Vec<ViewDef> = Vec::new();
    for view in files {
        let name = view.def.name;
        let step = match stored.get(name) {
            None => {
                let existing = views::builtin().iter().any(|b| b.name == name) && has_tables(&mut tx, name).await?;
                if !existing {
                    changes.added.push(name.to_string());
                }
                Step::Add { view, existing }
            }
            Some(row) if row.sql == view.sql => Step::Keep,
            Some(row) => {
                let recompute = row.fingerprint != view.def.fingerprint();
                if recompute {
                    changes.changed.push(name.to_string());
                }
                Step::Update { view, recompute, retable: row.shape != view.def.shape() }
            }
        };
        steps.push(step);
        set.push(view.def);
    }
    for row in &rows {
        if files.iter().any(|f| f.def.name == row.name) {
            continue;
        }
        if drop_removed {
            changes.dropped.push(row.name.clone());
            steps.push(Step::Drop { name: row.name.clone() });
        } else {
            changes.kept.push(row.name.clone());
            set.push(parse_registered(&row.name, &row.sql)?);
        }
    }

    let redefines = !(changes.added.is_empty() && changes.changed.is_empty() && changes.dropped.is_empty());
    if redefines {
        // First: waits for the flushes in flight, and makes every later
        // flush of the older set roll back and compute again.
        sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(VIEWS_FENCE).execute(&mut *tx).await?;
        sqlx::query("UPDATE ops.views_version SET version = version + 1").execute(&mut *tx).await?;
    }
    for step in steps {
        match step {
            Step::Keep => {}
            Step::Add { view, existing } => {
                sqlx::query(
                    "INSERT INTO ops.views (name, position, sql, fingerprint, shape) VALUES ($1, 0, $2, $3, $4)",
                )
                .bind(view.def.name)
                .bind(&view.sql)
                .bind(view.def.fingerprint())
                .bind(view.def.shape())
                .execute(&mut *tx)
                .await?;
                if !existing {
                    create_tables(&mut tx, &view.def).await?;
                    record_speed_start(&mut tx, view.def.name).await?;
                }
            }
            Step::Update { view, recompute, retable } => {
                if retable {
                    drop_tables(&mut tx, view.def.name).await?;
                    create_tables(&mut tx, &view.def).await?;
                }
                if recompute {
                    record_speed_start(&mut tx, view.def.name).await?;
                }
                sqlx::query(
                    "UPDATE ops.views SET sql = $2, fingerprint = $3, shape = $4,
                         changed_at = CASE WHEN $5 THEN now() ELSE changed_at END
                     WHERE name = $1",
                )
                .bind(view.def.name)
                .bind(&view.sql)
                .bind(view.def.fingerprint())
                .bind(view.def.shape())
                .bind(recompute)
                .execute(&mut *tx)
                .await?;
            }
            Step::Drop { name } => {
                drop_tables(&mut tx, &name).await?;
                sqlx::query("DELETE FROM ops.views WHERE name = $1").bind(&name).execute(&mut *tx).await?;
            }
        }
    }
    for (position, view) in set.iter().enumerate() {
        sqlx::query("UPDATE ops.views SET position = $2 WHERE name = $1 AND position <> $2")
            .bind(view.name)
            .bind(position as i32)
            .execute(&mut *tx)
            .await?;
    }
    crate::db::sync_serving_views(&mut tx, &set).await?;
    tx.commit().await?;
    Ok(changes)
}

/// Whether `batch.<name>` exists with its pair (made by the migrations).
async fn has_tables(conn: &mut sqlx::PgConnection, name: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM ops.batch_shadows WHERE name = $1)")
        .bind(name)
        .fetch_one(conn)
        .await
}

/// The speed layer computes the view from its next offsets on; the batch
/// holds what lies below its cut; between the two, `serving.views` says
/// the view is backfilling.
async fn record_speed_start(conn: &mut sqlx::PgConnection, name: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM ops.view_speed_start WHERE name = $1").bind(name).execute(&mut *conn).await?;
    sqlx::query(
        "INSERT INTO ops.view_speed_start (name, kafka_partition, start_offset)
         SELECT $1, kafka_partition, next_offset FROM ops.speed_offsets",
    )
    .bind(name)
    .execute(conn)
    .await?;
    Ok(())
}

/// The view's tables, as the migrations made the shipped views' ones: the
/// batch pair behind `batch.<view>` (see migration 0020) and the speed
/// table, with each writer's grants.
async fn create_tables(conn: &mut sqlx::PgConnection, view: &ViewDef) -> Result<(), sqlx::Error> {
    let n = view.name;
    let ddl = format!(
        "{a};
CREATE TABLE batch.{n}__b (LIKE batch.{n}__a INCLUDING ALL);
CREATE VIEW batch.{n} AS SELECT * FROM batch.{n}__a;
GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON batch.{n}__a, batch.{n}__b TO batch_writer;
GRANT SELECT, INSERT, UPDATE, DELETE ON batch.{n} TO batch_writer;
{speed};
GRANT SELECT, INSERT, UPDATE, DELETE ON speed.{n} TO speed_writer;
GRANT SELECT, DELETE ON speed.{n} TO batch_writer;",
        a = view.batch_table_ddl_as(&format!("batch.{n}__a")),
        speed = view.speed_table_ddl(),
    );
    sqlx::raw_sql(AssertSqlSafe(ddl)).execute(&mut *conn).await?;
    sqlx::query("INSERT INTO ops.batch_shadows (name, active) VALUES ($1, 'a')").bind(n).execute(conn).await?;
    Ok(())
}

/// Drops the view's tables and what the batch recorded of them (the
/// serving views over them go with them and are re-created after).
async fn drop_tables(conn: &mut sqlx::PgConnection, name: &str) -> Result<(), sqlx::Error> {
    let ddl = format!(
        "DROP VIEW IF EXISTS batch.{name} CASCADE;
DROP TABLE IF EXISTS batch.{name}__a, batch.{name}__b, speed.{name} CASCADE;"
    );
    sqlx::raw_sql(AssertSqlSafe(ddl)).execute(&mut *conn).await?;
    for table in ["ops.batch_shadows", "ops.batch_shadow_indexes", "ops.view_definitions"] {
        sqlx::query(AssertSqlSafe(format!("DELETE FROM {table} WHERE name = $1")))
            .bind(name)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}
