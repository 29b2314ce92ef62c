//! Quality of results against the generator's ground truth: how well the
//! platform finds the demand spikes the generator injected.

use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::shop::Spike;

/// A detected spike: product, first and latest hour.
pub type Episode = (String, DateTime<Utc>, DateTime<Utc>);

/// Spike detection scored per spike (not per hour): an injected spike is
/// found when a detected spike of the same product overlaps it; a detected
/// spike is right when it overlaps an injected one of its product.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SpikeScore {
    /// Injected spikes with at least two whole hours in the data.
    pub detectable: usize,
    /// Of those, found.
    pub found: usize,
    /// Detected spikes, and how many of them match an injected one.
    pub detected: usize,
    pub correct: usize,
    /// Hours between each found spike's reported and true start.
    pub start_errors_hours: Vec<i64>,
    /// The detected spikes matching no injected spike.
    pub false_alarms: Vec<Episode>,
    /// The detectable injected spikes not found.
    pub missed: Vec<Spike>,
}

impl SpikeScore {
    pub fn recall(&self) -> f64 {
        if self.detectable == 0 { 1.0 } else { self.found as f64 / self.detectable as f64 }
    }

    pub fn precision(&self) -> f64 {
        if self.detected == 0 { 1.0 } else { self.correct as f64 / self.detected as f64 }
    }
}

fn overlaps(e: &Episode, s: &Spike) -> bool {
    e.0 == s.product_id && e.1 < s.end && e.2 + TimeDelta::hours(1) > s.start
}

/// Scores `serving.demand_spike_history` against the injected spikes (the
/// spikes reported as such: echoes of another spike are not).
pub async fn score_spikes(pool: &PgPool, spikes: &[Spike]) -> sqlx::Result<SpikeScore> {
    let episodes: Vec<Episode> = sqlx::query_as(
        "SELECT product_id, spike_start, latest_hour FROM serving.demand_spike_history
         WHERE driven_by IS NULL ORDER BY spike_start",
    )
    .fetch_all(pool)
    .await?;
    let latest: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT serving.latest_demand_hour()").fetch_one(pool).await?;
    let Some(latest) = latest else { return Ok(SpikeScore::default()) };
    let mut score = SpikeScore { detected: episodes.len(), ..SpikeScore::default() };
    for s in spikes.iter().filter(|s| s.start + TimeDelta::hours(2) <= latest) {
        score.detectable += 1;
        match episodes.iter().find(|e| overlaps(e, s)) {
            Some(e) => {
                score.found += 1;
                score.start_errors_hours.push((e.1 - s.start).num_hours());
            }
            None => score.missed.push(s.clone()),
        }
    }
    for e in &episodes {
        if spikes.iter().any(|s| overlaps(e, s)) {
            score.correct += 1;
        } else {
            score.false_alarms.push(e.clone());
        }
    }
    Ok(score)
}
