//! PostgreSQL set-up shared by every layer.
//!
//! `shared-schema` says *what* the database holds (migrations, view
//! definitions); this crate does the few things every binary must do with
//! it at start, the same way everywhere:
//!
//! 1. connect, retrying while the server is not up yet ([`connect`]);
//! 2. check, under the service's own role, that the schema is the one the
//!    binary was built for ([`check`]): services never run DDL.
//!
//! The schema owner's step, before any service starts (`serving-layer
//! migrate`, which `make up` runs), is [`migrate`]:
//!
//! 1. apply the workspace's SQL migrations (sqlx takes an advisory lock, so
//!    several runs at once are safe);
//! 2. fix the deployment's segment size on first start ([`Deployment`]);
//! 3. register the views folder and (re)create the `serving.*` views when a
//!    definition changed, with their grants ([`crate::views::register`]).

use std::time::Duration;

use shared_schema::cut::SegmentSize;
use shared_schema::derived::{ROLLUPS, ServingRelation, latest_hour_function_sql, serving_relations};
use shared_schema::views::{self, ViewDef, ViewSource};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool};

/// The migrations of `migrations/`, embedded in every binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Default segment size: offsets per segment when the schema is created.
pub const DEFAULT_SEGMENT_SIZE: i64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot reach PostgreSQL at {url}: {source} (is it running? `make up` starts the local one)")]
    Connect { url: String, source: sqlx::Error },
    #[error("invalid DATABASE_URL {url:?}: {source}")]
    Url { url: String, source: sqlx::Error },
    #[error("applying migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(
        "the deployment's segment size is {stored}, but {requested} was requested; it is fixed when the schema is created"
    )]
    SegmentSizeMismatch { stored: i64, requested: i64 },
    #[error("{0}: run `{MIGRATE_COMMAND}` as the schema owner first (`make up` does it locally)")]
    Pending(String),
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
}

/// The one command that changes the schema.
pub const MIGRATE_COMMAND: &str = "serving-layer migrate";

/// Settings fixed for the deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deployment {
    pub segment_size: SegmentSize,
    /// The duplicates window both layers judge by, in microseconds
    /// (`ops.deployment.dedup_window`; see [`shared_schema::dedup`]).
    pub dedup_window_micros: i64,
}

/// Opens a pool, retrying for up to `wait` while the server refuses.
pub async fn connect(url: &str, max_connections: u32, wait: Duration) -> Result<PgPool, DbError> {
    let options: PgConnectOptions = url.parse().map_err(|source| DbError::Url { url: redact(url), source })?;
    let deadline = tokio::time::Instant::now() + wait;
    let mut backoff = crate::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let attempt = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await;
        match attempt {
            Ok(pool) => return Ok(pool),
            Err(source) if tokio::time::Instant::now() >= deadline => {
                return Err(DbError::Connect { url: redact(url), source });
            }
            Err(e) => {
                tracing::debug!(error = %e, "PostgreSQL not reachable yet, retrying");
                backoff.sleep().await;
            }
        }
    }
}

/// The schema owner's step with the shipped views only (what tests and
/// tools that define no view of their own need): see [`migrate_with`].
pub async fn migrate(pool: &PgPool, segment_size: Option<i64>) -> Result<Deployment, DbError> {
    Ok(migrate_with(pool, segment_size, &views::builtin_sources(), false).await?.0)
}

/// The schema owner's step: migrations, the deployment row, the views of
/// the views folder (`views`, checked by [`shared_schema::view_sql`]) with
/// their tables, and the generated serving views. Idempotent.
///
/// A registered view whose file is gone keeps its relations and stays
/// maintained unless `drop_removed` says to drop it.
pub async fn migrate_with(
    pool: &PgPool,
    segment_size: Option<i64>,
    views: &[ViewSource],
    drop_removed: bool,
) -> Result<(Deployment, crate::views::ViewChanges), DbError> {
    MIGRATOR.run(pool).await?;
    let deployment = ensure_deployment(pool, segment_size).await?;
    let changes = crate::views::register(pool, views, drop_removed).await?;
    Ok((deployment, changes))
}

/// `serving.schema_state()`: what the owner's bookkeeping says.
#[derive(sqlx::FromRow)]
struct SchemaState {
    applied: Vec<i64>,
    views_fingerprint: Option<String>,
    segment_size: Option<i64>,
    dedup_window_micros: Option<i64>,
}

/// What every service does at start instead of DDL: checks that each
/// migration this binary embeds is applied, that the generated serving views
/// are this binary's, and that the deployment row exists; returns the
/// deployment's settings. Reads through `serving.schema_state()`, which
/// every platform role may call.
pub async fn check(pool: &PgPool) -> Result<Deployment, DbError> {
    let state = sqlx::query_as::<_, SchemaState>(
        "SELECT applied, views_fingerprint, segment_size, dedup_window_micros FROM serving.schema_state()",
    )
    .fetch_one(pool)
    .await;
    let SchemaState { applied, views_fingerprint: views, segment_size, dedup_window_micros } = match state {
        Ok(state) => state,
        // No such function or schema: a database that predates it.
        Err(sqlx::Error::Database(e)) if matches!(e.code().as_deref(), Some("42883" | "3F000" | "42P01")) => {
            return Err(DbError::Pending("the database has not been migrated".into()));
        }
        Err(e) => return Err(e.into()),
    };
    let pending: Vec<i64> = MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .map(|m| m.version)
        .filter(|v| !applied.contains(v))
        .collect();
    if let Some(first) = pending.first() {
        return Err(DbError::Pending(format!("{} migration(s) pending, from version {first}", pending.len())));
    }
    let registered = crate::views::registered(pool).await?;
    if registered.views.is_empty() {
        return Err(DbError::Pending("no views are registered".into()));
    }
    views::install(registered.views);
    if views.as_deref() != Some(fingerprint(&serving_relations(views::all())).as_str()) {
        return Err(DbError::Pending("the serving views are not this release's".into()));
    }
    let (Some(stored), Some(dedup_window_micros)) = (segment_size, dedup_window_micros) else {
        return Err(DbError::Pending("the deployment's settings are not recorded".into()));
    };
    let segment_size = SegmentSize::new(stored).ok_or(DbError::SegmentSizeMismatch { stored, requested: stored })?;
    Ok(Deployment { segment_size, dedup_window_micros })
}

/// Stores the segment size on first start and returns what is stored. A
/// different explicit request later is an error, never a silent change:
/// changing it would break the offset cut.
pub async fn ensure_deployment(pool: &PgPool, requested: Option<i64>) -> Result<Deployment, DbError> {
    let size = requested.unwrap_or(DEFAULT_SEGMENT_SIZE);
    sqlx::query("INSERT INTO ops.deployment (segment_size) VALUES ($1) ON CONFLICT (singleton) DO NOTHING")
        .bind(size)
        .execute(pool)
        .await?;
    let stored: i64 = sqlx::query_scalar("SELECT segment_size FROM ops.deployment").fetch_one(pool).await?;
    let dedup_window_micros = dedup_window_micros(pool).await?.unwrap_or(shared_schema::dedup::DEFAULT_WINDOW_MICROS);
    if let Some(requested) = requested.filter(|r| *r != stored) {
        return Err(DbError::SegmentSizeMismatch { stored, requested });
    }
    let segment_size = SegmentSize::new(stored).ok_or(DbError::SegmentSizeMismatch { stored, requested: size })?;
    Ok(Deployment { segment_size, dedup_window_micros })
}

/// The deployment's duplicates window in microseconds; `None` before any
/// binary created the deployment row.
pub async fn dedup_window_micros(pool: &PgPool) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT (extract(epoch FROM dedup_window) * 1000000)::bigint FROM ops.deployment")
        .fetch_optional(pool)
        .await
}

/// A stable fingerprint of every generated relation and grant (FNV-1a).
fn fingerprint(relations: &[ServingRelation]) -> String {
    let mut text = latest_hour_function_sql();
    for r in ROLLUPS {
        text.push_str(&r.table_ddl());
        text.push_str(&r.fill_sql(&batch_relation, false));
    }
    for r in relations {
        text.push_str(&r.sql);
        for reader in r.readers {
            text.push_str(reader.role());
        }
    }
    shared_schema::views::fnv1a(&text)
}

/// Recomputes every rollup whole from the batch relations, in one
/// transaction: what `migrate` does when their definition changed, for
/// rows written into `batch.*` other than by a publish (test fixtures that
/// stand in for the batch).
pub async fn refill_rollups(pool: &PgPool) -> Result<(), DbError> {
    let mut tx = pool.begin().await?;
    for r in ROLLUPS {
        sqlx::query(AssertSqlSafe(r.clear_sql(false))).execute(&mut *tx).await?;
        sqlx::query(AssertSqlSafe(r.fill_sql(&batch_relation, false))).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// A batch relation by its name, as the rollups read it outside a publish.
fn batch_relation(name: &str) -> String {
    format!("batch.{name}")
}

/// Name under which `ops.generated_views` records the generated set.
const GENERATED_SET: &str = "serving.*";

/// Re-creates the generated `serving.*` relations when any definition
/// changed, in the caller's transaction (a registration's, which holds
/// `ops.generated_views` locked), so readers see either the old or the new
/// set. The derived views read the merged ones, so the set is dropped and
/// re-created whole, dependents last; the batch rollups they read
/// (`shared_schema::derived::Rollup`) are re-created with them and filled
/// from the batch relations, which reads the history once per change.
pub(crate) async fn sync_serving_views(tx: &mut sqlx::PgConnection, views: &[ViewDef]) -> Result<(), DbError> {
    let relations = serving_relations(views);
    let fingerprint = fingerprint(&relations);
    let stored: Option<String> = sqlx::query_scalar("SELECT fingerprint FROM ops.generated_views WHERE name = $1")
        .bind(GENERATED_SET)
        .fetch_optional(&mut *tx)
        .await?;
    if stored.as_deref() == Some(fingerprint.as_str()) {
        return Ok(());
    }
    tracing::info!(relations = relations.len(), "creating the generated serving views");
    let previous: Vec<String> = sqlx::query_scalar("SELECT name FROM ops.generated_views WHERE name <> $1")
        .bind(GENERATED_SET)
        .fetch_all(&mut *tx)
        .await?;
    // Drop first: CREATE OR REPLACE cannot remove or reorder columns.
    let mut ddl = String::new();
    for name in previous.iter().map(String::as_str).chain(relations.iter().rev().map(|r| r.name)) {
        ddl.push_str(&format!("DROP VIEW IF EXISTS serving.{name} CASCADE;\n"));
    }
    // The rollups the derived views read, re-created and filled from the
    // batch relations before the views that read them.
    for r in ROLLUPS {
        ddl.push_str(&format!("DROP TABLE IF EXISTS batch.{} CASCADE;\n", r.name));
        ddl.push_str(&r.table_ddl());
        ddl.push_str(";\n");
        ddl.push_str(&format!("GRANT SELECT, INSERT, DELETE ON batch.{} TO batch_writer;\n", r.name));
        ddl.push_str(&r.fill_sql(&batch_relation, false));
        ddl.push_str(";\n");
    }
    ddl.push_str(&latest_hour_function_sql());
    ddl.push_str(";\n");
    for r in &relations {
        ddl.push_str(&r.sql);
        ddl.push_str(";\n");
        for reader in r.readers {
            ddl.push_str(&format!("GRANT SELECT ON serving.{} TO {};\n", r.name, reader.role()));
        }
    }
    sqlx::raw_sql(AssertSqlSafe(ddl)).execute(&mut *tx).await?;
    sqlx::query("DELETE FROM ops.generated_views").execute(&mut *tx).await?;
    for name in relations.iter().map(|r| r.name).chain([GENERATED_SET]) {
        let f = if name == GENERATED_SET { fingerprint.as_str() } else { "" };
        sqlx::query("INSERT INTO ops.generated_views (name, fingerprint) VALUES ($1, $2)")
            .bind(name)
            .bind(f)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// The URL without its secrets, for messages and logs: the password of
/// the user part and the value of every query parameter whose name holds
/// `password`, `secret` or `token` (`?password=…`, `sslpassword=…`).
pub fn redact(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out = match (base.find("://"), base.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &base[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &base[..scheme + 3], &base[at..]),
                None => base.to_string(),
            }
        }
        _ => base.to_string(),
    };
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((name, _))
                    if ["password", "secret", "token"].iter().any(|s| name.to_ascii_lowercase().contains(s)) =>
                {
                    format!("{name}=***")
                }
                _ => param.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("postgres://u:secret@h:5433/db"), "postgres://u:***@h:5433/db");
        assert_eq!(redact("postgres://postgres@127.0.0.1:5433/lambda"), "postgres://postgres@127.0.0.1:5433/lambda");
        assert_eq!(redact("not a url"), "not a url");
        assert_eq!(
            redact("postgres://u@h/db?sslmode=require&password=s3cr3t&sslpassword=x&application_name=a"),
            "postgres://u@h/db?sslmode=require&password=***&sslpassword=***&application_name=a"
        );
        assert_eq!(redact("postgres://u:p@h/db?Token=t"), "postgres://u:***@h/db?Token=***");
    }

    #[test]
    fn fingerprints_follow_the_definitions_and_are_stable() {
        let all = serving_relations(views::all());
        let fewer = serving_relations(&views::all()[..1]);
        assert_ne!(fingerprint(&all), fingerprint(&fewer));
        assert_eq!(fingerprint(&all), fingerprint(&serving_relations(views::all())));
    }
}
