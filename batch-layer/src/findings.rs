//! What the shop's data says about itself, checked on every run after the
//! publish: hours whose volume fell away from their baseline (or that are
//! missing), and hours in which many events name products the catalog
//! does not know.
//!
//! These notify, they do not block: the views are a true account of what
//! the shop sent, the fix is upstream (a tracker that stopped, a catalog
//! that lags), and holding the publish back would hide the newer hours as
//! well. Each complete hour is checked once and recorded in
//! `ops.quality_hours`; each run sends at most one notification per kind.
//!
//! An hour is complete once the lake holds events two hours newer (late
//! events of up to an hour are in). Its baseline is the median of the same
//! hour on up to seven earlier days (at least three, so a daily rhythm is
//! not taken for a drop); an hour with no events between two hours that
//! have some is missing whatever the history.

use std::collections::BTreeMap;

use chrono::{TimeDelta, Utc};
use serde::Serialize;
use shared_schema::schema::Hour;

use crate::lake_files::LakeFiles;

/// Default of [`Thresholds::volume_floor`].
pub const DEFAULT_VOLUME_FLOOR: f64 = 0.5;
/// Default of [`Thresholds::max_unknown_products`].
pub const DEFAULT_UNKNOWN_PRODUCTS: f64 = 0.05;
/// Hours checked at most per run (the first run looks back a day).
pub const MAX_HOURS: i64 = 24;

/// When a finding is made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// A complete hour below this fraction of its baseline is a drop.
    pub volume_floor: f64,
    /// A complete hour with more than this share of events for products
    /// the catalog does not know is notified.
    pub max_unknown_products: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self { volume_floor: DEFAULT_VOLUME_FLOOR, max_unknown_products: DEFAULT_UNKNOWN_PRODUCTS }
    }
}

/// What is wrong with an hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finding {
    /// No events, where the baseline or the hours around it have some.
    MissingHour,
    /// Fewer events than the floor of the baseline.
    VolumeDrop,
    /// Too many events for products the catalog does not know.
    UnknownProducts,
}

impl Finding {
    pub fn kind(self) -> &'static str {
        match self {
            Finding::MissingHour => "missing_hour",
            Finding::VolumeDrop => "volume_drop",
            Finding::UnknownProducts => "unknown_products",
        }
    }
}

/// One checked hour.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HourCheck {
    pub hour: chrono::DateTime<Utc>,
    pub events: u64,
    pub baseline: Option<f64>,
    /// Events naming a product (`None`: no catalog to judge them by).
    pub with_product: Option<u64>,
    pub unknown_products: Option<u64>,
    pub findings: Vec<Finding>,
}

/// Events per hour of the lake, from the log's per-file row counts and the
/// partition values (`event_date`, `event_hour`); `None` when a file has no
/// row count.
pub fn hourly_volume(files: &LakeFiles) -> Option<BTreeMap<Hour, u64>> {
    let mut out = BTreeMap::new();
    for (values, rows) in files.rows_per_partition_value()? {
        if let [Some(date), Some(hour)] = values.as_slice()
            && let Some(h) = Hour::from_partition(date, hour)
        {
            *out.entry(h).or_default() += rows;
        }
    }
    Some(out)
}

/// The complete hours not checked yet: after `last_checked`, at most
/// [`MAX_HOURS`], none before the lake's first hour.
pub fn candidates(volume: &BTreeMap<Hour, u64>, last_checked: Option<Hour>) -> Vec<Hour> {
    let (Some(first), Some(newest)) = (volume.keys().next(), volume.keys().next_back()) else {
        return Vec::new();
    };
    let last = newest.start() - TimeDelta::hours(2);
    let mut from = first.start().max(last - TimeDelta::hours(MAX_HOURS - 1));
    if let Some(checked) = last_checked {
        from = from.max(checked.next().start());
    }
    let mut hours = Vec::new();
    let mut h = Hour::of(from);
    while h.start() <= last {
        hours.push(h);
        h = h.next();
    }
    hours
}

/// The median events of `hour` on up to seven earlier days inside the
/// lake's history; `None` with fewer than three such days.
pub fn baseline(volume: &BTreeMap<Hour, u64>, hour: Hour) -> Option<f64> {
    let first = *volume.keys().next()?;
    let mut samples: Vec<u64> = (1..=7)
        .map(|d| Hour::of(hour.start() - TimeDelta::days(d)))
        .filter(|h| *h >= first)
        .map(|h| volume.get(&h).copied().unwrap_or(0))
        .collect();
    if samples.len() < 3 {
        return None;
    }
    samples.sort_unstable();
    let n = samples.len();
    Some(if n % 2 == 1 { samples[n / 2] as f64 } else { (samples[n / 2 - 1] + samples[n / 2]) as f64 / 2.0 })
}

/// The volume findings of `hour`.
pub fn judge_volume(volume: &BTreeMap<Hour, u64>, hour: Hour, floor: f64) -> (Option<f64>, Option<Finding>) {
    let events = volume.get(&hour).copied().unwrap_or(0);
    let base = baseline(volume, hour);
    let around = |h: Hour| volume.get(&h).copied().unwrap_or(0) > 0;
    let before = Hour::of(hour.start() - TimeDelta::hours(1));
    let finding = if floor <= 0.0 {
        None
    } else if events == 0 && (base.is_some_and(|b| b > 0.0) || (around(before) && around(hour.next()))) {
        Some(Finding::MissingHour)
    } else if base.is_some_and(|b| (events as f64) < floor * b) {
        Some(Finding::VolumeDrop)
    } else {
        None
    };
    (base, finding)
}

/// Whether `unknown` of `with_product` events is too many.
pub fn judge_unknown(with_product: u64, unknown: u64, max_share: f64) -> Option<Finding> {
    (with_product > 0 && max_share < 1.0 && unknown as f64 > max_share * with_product as f64)
        .then_some(Finding::UnknownProducts)
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn h(n: i64) -> Hour {
        Hour::of(Utc.timestamp_opt(1_800_000_000, 0).unwrap() + TimeDelta::hours(n))
    }

    fn steady(hours: std::ops::Range<i64>, per_hour: u64) -> BTreeMap<Hour, u64> {
        hours.map(|n| (h(n), per_hour)).collect()
    }

    #[test]
    fn complete_hours_end_two_hours_before_the_newest_and_are_checked_once() {
        let volume = steady(0..10, 5);
        assert_eq!(candidates(&volume, None), (0..=7).map(h).collect::<Vec<_>>());
        assert_eq!(candidates(&volume, Some(h(5))), vec![h(6), h(7)]);
        assert_eq!(candidates(&volume, Some(h(7))), Vec::<Hour>::new());
        let long = steady(0..100, 5);
        assert_eq!(candidates(&long, None).len(), MAX_HOURS as usize);
        assert_eq!(candidates(&long, None).last(), Some(&h(97)));
    }

    #[test]
    fn the_baseline_is_the_median_of_the_same_hour_on_at_least_three_earlier_days() {
        let mut volume = steady(0..24 * 4, 10);
        assert_eq!(baseline(&volume, h(24 * 2)), None, "two earlier days");
        volume.insert(h(24), 40);
        assert_eq!(baseline(&volume, h(24 * 3)), Some(10.0));
        volume.insert(h(0), 30);
        assert_eq!(baseline(&volume, h(24 * 3)), Some(30.0));
    }

    #[test]
    fn a_drop_below_the_floor_and_a_hole_in_the_traffic_are_found() {
        let mut volume = steady(0..24 * 4, 10);
        volume.insert(h(24 * 3 + 5), 4);
        volume.remove(&h(24 * 3 + 6));
        assert_eq!(judge_volume(&volume, h(24 * 3 + 5), 0.5), (Some(10.0), Some(Finding::VolumeDrop)));
        assert_eq!(judge_volume(&volume, h(24 * 3 + 6), 0.5), (Some(10.0), Some(Finding::MissingHour)));
        assert_eq!(judge_volume(&volume, h(24 * 3 + 7), 0.5), (Some(10.0), None));
        assert_eq!(judge_volume(&volume, h(24 * 3 + 5), 0.0), (Some(10.0), None), "0 turns it off");
        // Without history, a hole between two busy hours is still missing.
        let mut young = steady(0..6, 10);
        young.remove(&h(3));
        assert_eq!(judge_volume(&young, h(3), 0.5), (None, Some(Finding::MissingHour)));
        assert_eq!(judge_volume(&young, h(2), 0.5), (None, None));
    }

    #[test]
    fn unknown_products_above_the_share_are_found() {
        assert_eq!(judge_unknown(100, 5, 0.05), None);
        assert_eq!(judge_unknown(100, 6, 0.05), Some(Finding::UnknownProducts));
        assert_eq!(judge_unknown(0, 0, 0.05), None);
        assert_eq!(judge_unknown(100, 100, 1.0), None, "1 turns it off");
    }
}
