//! Offset gaps: offsets of a partition that hold no record a consumer will
//! ever read (removed by retention or `DeleteRecords`, compacted away,
//! transaction markers, records of aborted transactions). Both layers step
//! over them instead of waiting forever, and record each one here, in
//! `ops.offset_gaps`, so none passes unnoticed.

use std::time::{Duration, Instant};

use shared_schema::cut::{Offset, Partition};
use sqlx::PgConnection;

use crate::notify::{Notification, Severity};

/// Offsets `from` (included) to `to` (excluded) of `partition`, where `to`
/// is the offset of the record read next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Gap {
    pub partition: Partition,
    pub from: Offset,
    pub to: Offset,
}

impl Gap {
    /// How many offsets it spans.
    pub fn len(&self) -> u64 {
        u64::try_from(self.to.0 - self.from.0).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which layer stepped over a gap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    Speed,
    Batch,
}

impl Layer {
    pub fn as_str(self) -> &'static str {
        match self {
            Layer::Speed => "speed",
            Layer::Batch => "batch",
        }
    }
}

/// Records `gaps` of `topic` in `ops.offset_gaps`; a gap recorded before (a
/// replay after a crash) is left as it is.
pub async fn record(conn: &mut PgConnection, layer: Layer, topic: &str, gaps: &[Gap]) -> Result<(), sqlx::Error> {
    if gaps.is_empty() {
        return Ok(());
    }
    let partitions: Vec<i32> = gaps.iter().map(|g| g.partition.0).collect();
    let from: Vec<i64> = gaps.iter().map(|g| g.from.0).collect();
    let to: Vec<i64> = gaps.iter().map(|g| g.to.0).collect();
    sqlx::query(
        "INSERT INTO ops.offset_gaps (layer, topic, kafka_partition, from_offset, to_offset)
         SELECT $1, $2, p, f, t FROM unnest($3::int[], $4::bigint[], $5::bigint[]) AS g(p, f, t)
         ON CONFLICT DO NOTHING",
    )
    .bind(layer.as_str())
    .bind(topic)
    .bind(partitions)
    .bind(from)
    .bind(to)
    .execute(conn)
    .await?;
    Ok(())
}

/// How often an `offset_gap` notification may go out per process.
pub const NOTICE_EVERY: Duration = Duration::from_secs(600);

/// Turns gaps into `offset_gap` notifications, at most one per
/// [`NOTICE_EVERY`]. A gap of one offset is not notified: every committed
/// or aborted transaction leaves one (its marker), which is normal; a wider
/// gap means records this layer never read. Every gap is recorded and
/// counted either way.
#[derive(Debug, Default)]
pub struct GapNotices {
    last: Option<Instant>,
    /// Offsets in gaps since the last notification, not yet notified.
    pending: u64,
}

impl GapNotices {
    /// The notification to send for `gaps` just stepped over, if one is due.
    pub fn notice(&mut self, layer: Layer, topic: &str, gaps: &[Gap], now: Instant) -> Option<Notification> {
        let wide: Vec<&Gap> = gaps.iter().filter(|g| g.len() > 1).collect();
        self.pending += wide.iter().map(|g| g.len()).sum::<u64>();
        if self.pending == 0 || self.last.is_some_and(|t| now.duration_since(t) < NOTICE_EVERY) {
            return None;
        }
        let first = wide.first().copied().or(gaps.first())?;
        let offsets = std::mem::take(&mut self.pending);
        self.last = Some(now);
        Some(Notification::new(
            "offset_gap",
            Severity::Warning,
            format!(
                "The {} layer stepped over {offsets} offsets of topic {topic} that hold no record to read \
                 (e.g. partition {} offsets {}..{}): retention or DeleteRecords removed them before it read \
                 them, or they were compacted or aborted. See ops.offset_gaps.",
                layer.as_str(),
                first.partition.0,
                first.from.0,
                first.to.0
            ),
            serde_json::json!({
                "layer": layer.as_str(),
                "topic": topic,
                "offsets": offsets,
                "gaps": gaps.iter().map(|g| serde_json::json!([g.partition.0, g.from.0, g.to.0])).collect::<Vec<_>>(),
            }),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gap(p: i32, from: i64, to: i64) -> Gap {
        Gap { partition: Partition(p), from: Offset(from), to: Offset(to) }
    }

    #[test]
    fn wide_gaps_are_notified_at_most_every_ten_minutes() {
        let mut notices = GapNotices::default();
        let t0 = Instant::now();
        let n = notices.notice(Layer::Speed, "events", &[gap(0, 0, 42)], t0).expect("the first wide gap");
        assert_eq!(n.kind, "offset_gap");
        assert_eq!(n.details["offsets"], 42);
        assert!(notices.notice(Layer::Speed, "events", &[gap(1, 0, 10)], t0 + Duration::from_secs(60)).is_none());
        let later = notices.notice(Layer::Speed, "events", &[gap(1, 20, 25)], t0 + NOTICE_EVERY).expect("due again");
        assert_eq!(later.details["offsets"], 15, "the gaps held back are counted in");
    }

    #[test]
    fn transaction_markers_alone_are_not_notified() {
        let mut notices = GapNotices::default();
        let t0 = Instant::now();
        assert!(notices.notice(Layer::Batch, "events", &[gap(0, 7, 8), gap(1, 3, 4)], t0).is_none());
        assert_eq!(gap(0, 7, 8).len(), 1);
        assert!(notices.notice(Layer::Batch, "events", &[], t0).is_none());
    }
}
