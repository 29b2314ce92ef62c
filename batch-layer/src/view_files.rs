//! `batch-layer views check`: the view files checked as the layers will
//! run them, before `serving-layer migrate` registers them.
//!
//! Each file is parsed and checked ([`shared_schema::view_sql`]: what
//! `migrate` and every service's start check too), then its batch and
//! speed queries are planned by DataFusion over empty `events` and
//! `products` tables, and the planned column types are compared with the
//! PostgreSQL columns that will hold them.

use std::path::Path;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, TimeUnit};
use datafusion::prelude::SessionContext;
use shared_schema::schema::{catalog_schema, events_schema};
use shared_schema::views::{Merge, SqlType, ViewDef};

/// Checks every file of `dir`; one line per view on success. Refusals are
/// printed to standard error, one line each (`file:line:column: reason`).
pub async fn check(dir: &Path) -> anyhow::Result<Vec<String>> {
    let views = platform::views::load_folder(dir)?;
    let mut errors = Vec::new();
    let mut lines = Vec::new();
    for v in &views {
        match plan(&v.def).await {
            Ok(()) => lines.push(summary(&v.def)),
            Err(why) => errors.push(format!("{}:1:1: {why}", dir.join(format!("{}.sql", v.def.name)).display())),
        }
    }
    if !errors.is_empty() {
        for e in &errors {
            eprintln!("{e}");
        }
        anyhow::bail!("{} view file(s) in {} refused (each above, with its reason)", errors.len(), dir.display());
    }
    Ok(lines)
}

/// Plans `view`'s batch and speed queries and compares their columns with
/// the tables'.
pub async fn plan(view: &ViewDef) -> Result<(), String> {
    let ctx = SessionContext::new();
    let register = |name: &str, schema| {
        ctx.register_batch(name, RecordBatch::new_empty(schema)).map(|_| ()).map_err(|e| e.to_string())
    };
    register("events", events_schema())?;
    register("products", catalog_schema())?;
    let queries =
        [("batch", view.batch_sql(), view.batch_columns()), ("speed", view.speed_sql(1000), view.speed_columns())];
    for (layer, sql, columns) in queries {
        let frame = ctx.sql(&sql).await.map_err(|e| {
            let message = e.to_string();
            format!("DataFusion cannot plan the {layer} query: {}", message.lines().next().unwrap_or_default())
        })?;
        for (field, (name, ty)) in frame.schema().fields().iter().zip(&columns) {
            if !holds(*ty, field.data_type()) {
                return Err(format!(
                    "`{name}` is {} in DataFusion, which a {} column cannot hold: CAST it",
                    field.data_type(),
                    ty.postgres()
                ));
            }
        }
    }
    Ok(())
}

/// Whether a PostgreSQL column of `ty` takes DataFusion's `data_type` as
/// the speed layer binds it and the batch COPYs it.
fn holds(ty: SqlType, data_type: &DataType) -> bool {
    match ty {
        SqlType::BigInt => *data_type == DataType::Int64,
        SqlType::Double => *data_type == DataType::Float64,
        SqlType::Text => matches!(data_type, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View),
        SqlType::TimestampTz => matches!(data_type, DataType::Timestamp(TimeUnit::Microsecond, Some(_))),
    }
}

/// `name: keys …; measures …; readers …` for the check's output.
fn summary(view: &ViewDef) -> String {
    let keys: Vec<String> = view
        .keys
        .iter()
        .map(|k| if view.hour_key == Some(k.name) { format!("{} (hour)", k.name) } else { k.name.to_string() })
        .collect();
    let measures: Vec<String> = view
        .measures
        .iter()
        .map(|m| {
            let merge = match m.merge {
                Merge::Sum => "adds",
                Merge::Max => "greatest",
                Merge::Min => "least",
            };
            format!("{} ({merge})", m.name)
        })
        .collect();
    let readers: Vec<&str> = view.readers.iter().map(|r| r.role()).collect();
    format!(
        "{}: per {}; measures {}; read by {}",
        view.name,
        keys.join(", "),
        measures.join(", "),
        if readers.is_empty() { "no reader role".to_string() } else { readers.join(", ") }
    )
}

#[cfg(test)]
mod tests {
    use datafusion::logical_expr::Volatility;
    use shared_schema::view_sql::{self, MERGEABLE_AGGREGATES, NON_DETERMINISTIC};

    use super::*;

    #[tokio::test]
    async fn the_shipped_views_plan_with_the_columns_their_tables_hold() {
        for v in shared_schema::views::builtin() {
            plan(v).await.unwrap_or_else(|e| panic!("{}: {e}", v.name));
        }
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../views");
        let lines = check(&dir).await.unwrap();
        assert_eq!(
            lines[0],
            "product_demand_hourly: per hour (hour), product_id; measures views (adds), cart_adds (adds), \
             cart_removes (adds), purchases (adds), units (adds), revenue_cents (adds); read by dashboard_reader"
        );
    }

    /// The examples docs/VIEWS.md shows pass the check and plan.
    #[tokio::test]
    async fn the_example_views_plan() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../views/examples");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let view = view_sql::parse(path.to_str().unwrap(), &text).unwrap_or_else(|e| panic!("{e}"));
            plan(&view).await.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
        assert_eq!(n, 3, "docs/VIEWS.md shows three examples");
    }

    /// What the view checker lets through, DataFusion has, and deterministic.
    #[test]
    fn every_allowed_function_is_a_deterministic_datafusion_function() {
        let ctx = SessionContext::new();
        let state = ctx.state();
        for name in view_sql::allowed_functions() {
            let f = state.scalar_functions().get(name).unwrap_or_else(|| panic!("DataFusion has no {name}"));
            assert_eq!(f.signature().volatility, Volatility::Immutable, "{name}");
        }
        for name in MERGEABLE_AGGREGATES {
            assert!(state.aggregate_functions().contains_key(*name), "{name}");
        }
    }

    /// Every DataFusion function whose answer varies is refused, and so is
    /// every aggregate and window function but the four that merge.
    #[test]
    fn every_varying_function_and_unmergeable_aggregate_is_refused() {
        let ctx = SessionContext::new();
        let state = ctx.state();
        let file = |select: &str| format!("SELECT e.product_id AS product_id, {select} FROM events AS e GROUP BY 1");
        for (name, f) in state.scalar_functions() {
            if f.signature().volatility != Volatility::Immutable {
                let e = view_sql::parse("v.sql", &file(&format!("count(*) FILTER (WHERE {name}() IS NULL) AS n")));
                let e = e.expect_err(name);
                assert!(NON_DETERMINISTIC.contains(&name.as_str()), "{name} varies: name it so ({e})");
                assert!(e.reason.contains("answers differently from run to run"), "{name}: {e}");
            }
        }
        let aggregates = state.aggregate_functions().keys();
        for name in aggregates.chain(state.window_functions().keys()) {
            if MERGEABLE_AGGREGATES.contains(&name.as_str()) {
                continue;
            }
            let e = view_sql::parse("v.sql", &file(&format!("{name}(e.price_cents) AS m"))).unwrap_err();
            assert!(!e.reason.starts_with("unknown function"), "{name}: {e}");
        }
    }
}
