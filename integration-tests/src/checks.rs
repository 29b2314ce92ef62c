//! Checks the integration tests share: reading a demand view back from
//! PostgreSQL and comparing it with the generator's ground truth.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};

use crate::generator::{Demand, Truth};

/// `product_demand_hourly` keyed by (hour, product).
pub type DemandMap = BTreeMap<(DateTime<Utc>, String), Demand>;

/// Reads a `product_demand_hourly` relation (`serving.…` or `batch.…`).
pub async fn demand(pool: &PgPool, relation: &str) -> DemandMap {
    let sql = format!(
        "SELECT hour, product_id, views, cart_adds, cart_removes, purchases, units, revenue_cents FROM {relation}"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_all(pool)
        .await
        .unwrap_or_else(|e| panic!("reading {relation}: {e}"))
        .into_iter()
        .map(|r| {
            let d = Demand {
                views: r.get(2),
                cart_adds: r.get(3),
                cart_removes: r.get(4),
                purchases: r.get(5),
                units: r.get(6),
                revenue_cents: r.get(7),
            };
            ((r.get(0), r.get(1)), d)
        })
        .collect()
}

/// What dashboards read: `serving.product_demand_hourly`.
pub async fn serving_demand(pool: &PgPool) -> DemandMap {
    demand(pool, "serving.product_demand_hourly").await
}

/// The expected demand of several generator runs together.
pub fn merged(truths: &[&Truth]) -> DemandMap {
    let mut out = DemandMap::new();
    for t in truths {
        for (k, d) in t.demand_map() {
            let e = out.entry(k).or_default();
            e.views += d.views;
            e.cart_adds += d.cart_adds;
            e.cart_removes += d.cart_removes;
            e.purchases += d.purchases;
            e.units += d.units;
            e.revenue_cents += d.revenue_cents;
        }
    }
    out
}

/// Asserts equality, reporting a few differing keys instead of both maps.
pub fn assert_demand_eq(actual: &DemandMap, expected: &DemandMap, what: &str) {
    let keys: BTreeSet<_> = actual.keys().chain(expected.keys()).collect();
    let diffs: Vec<String> = keys
        .into_iter()
        .filter(|k| actual.get(*k) != expected.get(*k))
        .map(|k| format!("{k:?}: actual {:?}, expected {:?}", actual.get(k), expected.get(k)))
        .collect();
    assert!(
        diffs.is_empty(),
        "{what}: {} of {} keys differ, e.g.\n{}",
        diffs.len(),
        expected.len(),
        diffs[..diffs.len().min(5)].join("\n")
    );
}
