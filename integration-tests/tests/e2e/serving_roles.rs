//! Least privilege, proven by logging in as each read-only role:
//! `dashboard_reader` reads every aggregate `serving.*` relation, nothing
//! user-level and writes nothing; `recommender_reader` reads what
//! recommendations need and writes nothing either; `serving_writer` imports
//! model outputs and writes nothing of the other layers.

use integration_tests::fixture::Stack;
use sqlx::{AssertSqlSafe, PgPool};

/// Aggregates: what dashboards and BI tools read.
const AGGREGATES: &[&str] = &[
    "serving.product_demand_hourly",
    "serving.category_demand_hourly",
    "serving.products",
    "serving.popular_products",
    "serving.item_similarity",
    "serving.demand_baseline",
    "serving.demand_spike_hours",
    "serving.demand_spike_history",
    "serving.demand_spikes",
    "serving.freshness",
];
/// Per-user relations.
const USER_LEVEL: &[&str] = &["serving.user_product_state", "serving.model_recommendations"];
/// What the recommendations API reads.
const RECOMMENDER: &[&str] = &[
    "serving.user_product_state",
    "serving.item_similarity",
    "serving.popular_products",
    "serving.model_recommendations",
];

async fn as_role(database_url: &str, role: &str) -> PgPool {
    let url = integration_tests::fixture::role_url(database_url, role);
    assert_ne!(url, database_url, "the test expects a URL of user postgres: {database_url}");
    let pool = PgPool::connect(&url).await.unwrap();
    let user: String = sqlx::query_scalar("SELECT current_user::text").fetch_one(&pool).await.unwrap();
    assert_eq!(user, role);
    pool
}

/// `Ok` when the statement ran; `Err(sqlstate)` otherwise.
async fn try_sql(pool: &PgPool, sql: &str) -> Result<(), String> {
    match sqlx::raw_sql(AssertSqlSafe(sql.to_owned())).execute(pool).await {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(e)) => Err(e.code().map(|c| c.into_owned()).unwrap_or_default()),
        Err(e) => panic!("{sql}: {e}"),
    }
}

const DENIED: &str = "42501";

/// A write must fail: on a table for lack of privilege; on a generated
/// view PostgreSQL may refuse it earlier (a grouped view is not updatable,
/// a view cannot be truncated), which is just as final.
async fn refused(pool: &PgPool, sql: &str) {
    let outcome = try_sql(pool, sql).await;
    let relation = sql.split_whitespace().find(|w| w.starts_with("serving.")).unwrap_or_default();
    let relation = relation.trim_end_matches("_x");
    let kind: String = sqlx::query_scalar("SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)")
        .bind(relation)
        .fetch_one(pool)
        .await
        .unwrap_or_default();
    match outcome {
        Ok(()) => panic!("{sql} ran"),
        Err(code) if kind == "r" || sql.starts_with("CREATE") => assert_eq!(code, DENIED, "{sql}"),
        Err(_) => {}
    }
}

async fn prepared(test: &str) -> String {
    Stack::from_env().migrated_database(test, None).await.unwrap().0
}

/// Every writing statement the role might try on `relation`.
fn writes(relation: &str) -> Vec<String> {
    vec![
        format!("DELETE FROM {relation}"),
        format!("TRUNCATE {relation}"),
        format!("INSERT INTO {relation} SELECT * FROM {relation} LIMIT 0"),
        format!("CREATE TABLE {relation}_x (a int)"),
    ]
}

#[tokio::test]
async fn dashboard_reader_reads_aggregates_only_and_writes_nothing() {
    let url = prepared("serving_roles_dashboard").await;
    let reader = as_role(&url, "dashboard_reader").await;
    for relation in AGGREGATES {
        assert_eq!(try_sql(&reader, &format!("SELECT * FROM {relation} LIMIT 1")).await, Ok(()), "{relation}");
    }
    for relation in USER_LEVEL {
        let read = try_sql(&reader, &format!("SELECT * FROM {relation} LIMIT 1")).await;
        assert_eq!(read, Err(DENIED.to_string()), "dashboard_reader reads {relation}");
    }
    for relation in ["batch.user_product_state", "speed.user_product_state", "ops.cut", "ops.model_imports"] {
        let read = try_sql(&reader, &format!("SELECT * FROM {relation} LIMIT 1")).await;
        assert_eq!(read, Err(DENIED.to_string()), "dashboard_reader reads {relation}");
    }
    for relation in AGGREGATES.iter().chain(USER_LEVEL) {
        for sql in writes(relation) {
            refused(&reader, &sql).await;
        }
    }
}

#[tokio::test]
async fn recommender_reader_reads_what_recommendations_need_and_writes_nothing() {
    let url = prepared("serving_roles_recommender").await;
    let reader = as_role(&url, "recommender_reader").await;
    for relation in RECOMMENDER {
        assert_eq!(try_sql(&reader, &format!("SELECT * FROM {relation} LIMIT 1")).await, Ok(()), "{relation}");
    }
    for relation in ["batch.user_product_state", "speed.user_product_state", "ops.model_imports"] {
        let read = try_sql(&reader, &format!("SELECT * FROM {relation} LIMIT 1")).await;
        assert_eq!(read, Err(DENIED.to_string()), "recommender_reader reads {relation}");
    }
    for relation in RECOMMENDER {
        for sql in writes(relation) {
            refused(&reader, &sql).await;
        }
    }
}

#[tokio::test]
async fn serving_writer_imports_model_outputs_and_writes_nothing_else() {
    let url = prepared("serving_roles_writer").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.parquet");
    integration_tests::serving::write_model_file(&path, &[("u-1", "p-1", 0.9, None), ("u-1", "p-2", 0.8, None)])
        .unwrap();

    let writer = as_role(&url, "serving_writer").await;
    let summary = serving_layer::models::import(&writer, &path, "v1", serving_layer::models::default_validity(), None)
        .await
        .unwrap();
    assert_eq!((summary.rows, summary.users), (2, 1));
    let reader = as_role(&url, "recommender_reader").await;
    let rows: Vec<(String, i32)> =
        sqlx::query_as("SELECT product_id, rank FROM serving.model_recommendations ORDER BY rank")
            .fetch_all(&reader)
            .await
            .unwrap();
    assert_eq!(rows, [("p-1".to_string(), 1), ("p-2".to_string(), 2)]);
    for sql in [
        "DELETE FROM batch.products",
        "DELETE FROM batch.user_product_state",
        "DELETE FROM speed.product_demand_hourly",
        "DELETE FROM ops.cut",
        "UPDATE ops.model_imports SET users = 0",
    ] {
        assert_eq!(try_sql(&writer, sql).await, Err(DENIED.to_string()), "serving_writer may {sql}");
    }
}
