//! Which lake events a batch query sees, built as DataFusion expressions.
//!
//! The view definitions are SQL over a table named `events` and say nothing
//! of cuts or hours. A run registers `events` as the lake snapshot with one
//! of these filters applied ([`register_events`]): below the offset cut, in
//! the new offset range, in the hours to recompute, inside a table's window.
//! DataFusion pushes them into the scan, so partitions and files outside
//! are never read, and nothing is pasted into SQL text.

use datafusion::common::ScalarValue;
use datafusion::error::Result as DfResult;
use datafusion::prelude::{Expr, SessionContext, col, lit};
use shared_schema::cut::OffsetCut;
use shared_schema::schema::{Hour, col as c};

/// The lake snapshot as registered, before any filter.
pub const LAKE_EVENTS: &str = "lake_events";
/// What the view definitions read.
pub const EVENTS: &str = "events";

/// True exactly for the records the cut covers (offset below `cut[p]`).
pub fn below(cut: &OffsetCut) -> Expr {
    any(cut.iter().map(|(p, o)| col(c::KAFKA_PARTITION).eq(lit(p.0)).and(col(c::KAFKA_OFFSET).lt(lit(o.0)))).collect())
}

/// True exactly for the records at or above `from[p]` and below `to[p]`:
/// what a run adds to the batch when the cut moves from `from` to `to`.
pub fn between(from: &OffsetCut, to: &OffsetCut) -> Expr {
    any(to
        .iter()
        .filter(|(p, o)| from.get(*p) < *o)
        .map(|(p, o)| {
            col(c::KAFKA_PARTITION)
                .eq(lit(p.0))
                .and(col(c::KAFKA_OFFSET).gt_eq(lit(from.get(p).0)))
                .and(col(c::KAFKA_OFFSET).lt(lit(o.0)))
        })
        .collect())
}

/// True for the events of `hours`, by the lake's partition columns (so the
/// scan opens only those partitions): one range term per run of
/// consecutive hours, not one term per hour, so months of late data make a
/// few terms (see `recompute::plan::cover` for scattered hours).
pub fn in_hours(hours: &[Hour]) -> Expr {
    any(Hour::runs(hours).into_iter().map(|(first, last)| hour_range(first, last)).collect())
}

/// True for the events from hour `first` to hour `last`, both included.
fn hour_range(first: Hour, last: Hour) -> Expr {
    let ((d1, h1), (d2, h2)) = (first.partition(), last.partition());
    let date = || col(c::EVENT_DATE);
    let hour = || col(c::EVENT_HOUR);
    if d1 == d2 {
        let hours = if h1 == h2 { hour().eq(lit(h1)) } else { hour().gt_eq(lit(h1)).and(hour().lt_eq(lit(h2))) };
        return date().eq(lit(d1)).and(hours);
    }
    // `YYYY-MM-DD` sorts as the dates do.
    let head = date().eq(lit(d1.clone())).and(hour().gt_eq(lit(h1)));
    let middle = date().gt(lit(d1)).and(date().lt(lit(d2.clone())));
    let tail = date().eq(lit(d2)).and(hour().lt_eq(lit(h2)));
    head.or(middle).or(tail)
}

/// True for the events at or after `start`; the `event_date` term lets the
/// scan skip whole partitions.
pub fn since(start: chrono::DateTime<chrono::Utc>) -> Expr {
    let micros = ScalarValue::TimestampMicrosecond(Some(start.timestamp_micros()), Some("UTC".into()));
    col(c::EVENT_DATE).gt_eq(lit(start.format("%Y-%m-%d").to_string())).and(col(c::EVENT_TIME).gt_eq(lit(micros)))
}

/// True for the events strictly before `end`; the `event_date` term lets
/// the scan skip the partitions after it.
pub fn before(end: chrono::DateTime<chrono::Utc>) -> Expr {
    let micros = ScalarValue::TimestampMicrosecond(Some(end.timestamp_micros()), Some("UTC".into()));
    col(c::EVENT_TIME).lt(lit(micros)).and(col(c::EVENT_DATE).lt_eq(lit(end.format("%Y-%m-%d").to_string())))
}

/// The disjunction of `terms` (false for none), as a balanced tree: a run
/// may touch thousands of hours, and a left-deep chain that long would be
/// as deep to walk.
pub fn any(mut terms: Vec<Expr>) -> Expr {
    if terms.is_empty() {
        return lit(false);
    }
    while terms.len() > 1 {
        let mut next = Vec::with_capacity(terms.len().div_ceil(2));
        let mut it = terms.into_iter();
        while let Some(a) = it.next() {
            next.push(match it.next() {
                Some(b) => a.or(b),
                None => a,
            });
        }
        terms = next;
    }
    terms.pop().unwrap_or_else(|| lit(false))
}

/// Registers `events` as [`LAKE_EVENTS`] restricted by `filter`, replacing
/// the previous registration: the next query over `events` sees exactly
/// those records.
pub async fn register_events(ctx: &SessionContext, filter: Expr) -> DfResult<()> {
    let view = ctx.table(LAKE_EVENTS).await?.filter(filter)?.into_view();
    ctx.deregister_table(EVENTS)?;
    ctx.register_table(EVENTS, view)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{AsArray, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};
    use shared_schema::cut::{Offset, Partition};

    use super::*;

    /// Ten records per partition 0 and 1, offsets 0-9, one per hour from
    /// 2026-11-24 00:00 on.
    async fn lake() -> SessionContext {
        lake_of("2026-11-24T00:00:00Z", 10).await
    }

    /// `n` records per partition 0 and 1, offsets 0 to n-1, one per hour
    /// from `start` on.
    async fn lake_of(start: &str, n: i64) -> SessionContext {
        let schema = Arc::new(Schema::new(vec![
            Field::new(c::KAFKA_PARTITION, DataType::Int32, false),
            Field::new(c::KAFKA_OFFSET, DataType::Int64, false),
            Field::new(c::EVENT_TIME, shared_schema::schema::timestamp_type(), false),
            Field::new(c::EVENT_DATE, DataType::Utf8, false),
            Field::new(c::EVENT_HOUR, DataType::Int32, false),
        ]));
        let start = chrono::DateTime::parse_from_rfc3339(start).unwrap().to_utc();
        let (mut p, mut o, mut t, mut d, mut h) = (vec![], vec![], vec![], vec![], vec![]);
        for part in 0..2 {
            for off in 0..n {
                let at = start + chrono::TimeDelta::hours(off);
                let (date, hour) = Hour::of(at).partition();
                p.push(part);
                o.push(off);
                t.push(at.timestamp_micros());
                d.push(date);
                h.push(hour);
            }
        }
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int32Array::from(p)),
                Arc::new(Int64Array::from(o)),
                Arc::new(TimestampMicrosecondArray::from(t).with_timezone("UTC")),
                Arc::new(StringArray::from(d)),
                Arc::new(Int32Array::from(h)),
            ],
        )
        .unwrap();
        let ctx = SessionContext::new();
        ctx.register_batch(LAKE_EVENTS, batch).unwrap();
        ctx
    }

    /// The (partition, offset) pairs `events` holds under `filter`.
    async fn seen(ctx: &SessionContext, filter: Expr) -> Vec<(i64, i64)> {
        register_events(ctx, filter).await.unwrap();
        let sql = "SELECT CAST(kafka_partition AS BIGINT), kafka_offset FROM events ORDER BY 1, 2";
        let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        batches
            .iter()
            .flat_map(|b| {
                let p = b.column(0).as_primitive::<Int64Type>().values().to_vec();
                let o = b.column(1).as_primitive::<Int64Type>().values().to_vec();
                p.into_iter().zip(o)
            })
            .collect()
    }

    fn cut(pairs: &[(i32, i64)]) -> OffsetCut {
        pairs.iter().map(|(p, o)| (Partition(*p), Offset(*o))).collect()
    }

    #[tokio::test]
    async fn below_the_cut_is_exactly_the_covered_offsets() {
        let ctx = lake().await;
        assert_eq!(seen(&ctx, below(&cut(&[(0, 3), (1, 1)]))).await, [(0, 0), (0, 1), (0, 2), (1, 0)]);
        assert_eq!(seen(&ctx, below(&OffsetCut::new())).await, [], "an empty cut covers nothing");
    }

    #[tokio::test]
    async fn between_two_cuts_is_the_new_range_only() {
        let ctx = lake().await;
        let old = cut(&[(0, 3), (1, 8)]);
        let new = cut(&[(0, 5), (1, 8)]);
        assert_eq!(seen(&ctx, between(&old, &new)).await, [(0, 3), (0, 4)]);
        assert_eq!(seen(&ctx, between(&new, &new)).await, []);
        // A partition new to the cut starts at 0.
        assert_eq!(seen(&ctx, between(&cut(&[(0, 10)]), &cut(&[(0, 10), (1, 2)]))).await, [(1, 0), (1, 1)]);
    }

    #[tokio::test]
    async fn hours_and_windows_select_by_event_time() {
        let ctx = lake().await;
        let start = chrono::DateTime::parse_from_rfc3339("2026-11-24T00:00:00Z").unwrap().to_utc();
        let hours = [Hour::of(start + chrono::TimeDelta::hours(2)), Hour::of(start + chrono::TimeDelta::hours(7))];
        assert_eq!(seen(&ctx, in_hours(&hours)).await, [(0, 2), (0, 7), (1, 2), (1, 7)]);
        assert_eq!(seen(&ctx, in_hours(&[])).await, []);
        let window = since(start + chrono::TimeDelta::minutes(8 * 60 + 30));
        assert_eq!(seen(&ctx, window).await, [(0, 9), (1, 9)]);
        let until = before(start + chrono::TimeDelta::hours(1));
        assert_eq!(seen(&ctx, until).await, [(0, 0), (1, 0)], "strictly before: the record at the end is out");
    }

    #[tokio::test]
    async fn hour_ranges_span_days_and_make_one_term_per_run() {
        // Offset k of each partition is hour k after 2026-11-23 20:00: three dates.
        let ctx = lake_of("2026-11-23T20:00:00Z", 60).await;
        let start = chrono::DateTime::parse_from_rfc3339("2026-11-23T20:00:00Z").unwrap().to_utc();
        let at = |k: i64| Hour::of(start + chrono::TimeDelta::hours(k));
        let offsets = |e: Vec<(i64, i64)>| e.into_iter().filter(|(p, _)| *p == 0).map(|(_, o)| o).collect::<Vec<_>>();
        // 22:00 on the 23rd to 01:00 on the 26th (offsets 2-53), plus 05:00 on
        // the 24th again (inside) and 10:00 on the 26th (apart).
        let mut hours: Vec<Hour> = (2..=53).map(at).collect();
        hours.extend([at(9), at(58)]);
        let expected: Vec<i64> = (2..=53).chain([58]).collect();
        assert_eq!(offsets(seen(&ctx, in_hours(&hours)).await), expected);
        // Within one day, and a single hour at midnight.
        assert_eq!(offsets(seen(&ctx, in_hours(&[at(5), at(6), at(7)])).await), [5, 6, 7]);
        assert_eq!(offsets(seen(&ctx, in_hours(&[at(4)])).await), [4]);
        // A run ending at the last hour of a day, one starting at the first.
        assert_eq!(offsets(seen(&ctx, in_hours(&[at(1), at(2), at(3)])).await), [1, 2, 3]);
        assert_eq!(offsets(seen(&ctx, in_hours(&[at(28), at(29)])).await), [28, 29]);

        fn terms(e: &Expr) -> usize {
            match e {
                Expr::BinaryExpr(b) if b.op == datafusion::logical_expr::Operator::Or => {
                    terms(&b.left) + terms(&b.right)
                }
                _ => 1,
            }
        }
        // Within a day one conjunction; across days head, middle and tail.
        assert_eq!(terms(&in_hours(&[at(5), at(6), at(7)])), 1);
        assert_eq!(terms(&in_hours(&(2..=53).map(at).collect::<Vec<_>>())), 3);
        let twenty_thousand: Vec<Hour> = (0..20_000).map(at).collect();
        assert_eq!(terms(&in_hours(&twenty_thousand)), 3, "20,000 consecutive hours are one range");
    }

    #[test]
    fn a_long_disjunction_is_balanced() {
        fn depth(e: &Expr) -> usize {
            match e {
                Expr::BinaryExpr(b) => 1 + depth(&b.left).max(depth(&b.right)),
                _ => 0,
            }
        }
        let terms: Vec<Expr> = (0..20_000).map(|i| col("x").eq(lit(i))).collect();
        let d = depth(&any(terms));
        assert!(d <= 16, "depth {d}"); // ⌈log2 20000⌉ = 15, plus the `=`
    }
}
