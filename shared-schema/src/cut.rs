//! Kafka positions and the offset cut between batch and speed.
//!
//! The batch covers, per partition, exactly the offsets below `cut[p]`, a
//! multiple of the deployment's segment size; the speed layer's rows of
//! segments at or above `cut[p] / segment_size` hold the rest. Keeping these
//! as distinct types stops an offset being used where a segment is meant.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A Kafka partition of topic `events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Partition(pub i32);

/// An offset within a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Offset(pub i64);

/// `offset / segment_size`: the unit the speed layer tags its rows with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Segment(pub i64);

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The deployment's segment size (offsets per segment), fixed at schema
/// creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentSize(i64);

impl SegmentSize {
    pub fn new(size: i64) -> Option<Self> {
        (size > 0).then_some(Self(size))
    }

    pub fn get(self) -> i64 {
        self.0
    }

    pub fn segment_of(self, offset: Offset) -> Segment {
        Segment(offset.0.div_euclid(self.0))
    }

    /// The greatest segment boundary at or below `offset`.
    pub fn floor(self, offset: Offset) -> Offset {
        Offset(offset.0 - offset.0.rem_euclid(self.0))
    }
}

/// Per partition, the first offset the batch does *not* cover. A partition
/// absent from the cut is covered by nothing (cut 0).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffsetCut(BTreeMap<Partition, Offset>);

impl OffsetCut {
    pub fn new() -> Self {
        Self::default()
    }

    /// The cut that a batch may take over a lake holding offsets below
    /// `lake_next[p]` per partition: each rounded down to a segment boundary,
    /// so the speed rows split exactly at the cut.
    pub fn from_lake(lake_next: impl IntoIterator<Item = (Partition, Offset)>, size: SegmentSize) -> Self {
        Self(lake_next.into_iter().map(|(p, o)| (p, size.floor(o))).collect())
    }

    pub fn insert(&mut self, p: Partition, o: Offset) {
        self.0.insert(p, o);
    }

    pub fn get(&self, p: Partition) -> Offset {
        self.0.get(&p).copied().unwrap_or(Offset(0))
    }

    /// Whether the record at `(p, o)` lies below the cut, i.e. is the
    /// batch's to count.
    pub fn covers(&self, p: Partition, o: Offset) -> bool {
        o < self.get(p)
    }

    pub fn iter(&self) -> impl Iterator<Item = (Partition, Offset)> + '_ {
        self.0.iter().map(|(p, o)| (*p, *o))
    }

    /// Whether the speed rows of segment `s` of partition `p` are served
    /// (the batch does not cover them): the segment starts at or above the
    /// cut. The serving views' SQL states the same condition.
    pub fn leaves_to_speed(&self, p: Partition, s: Segment, size: SegmentSize) -> bool {
        s.0 * size.get() >= self.get(p).0
    }

    /// Whether the cut is nowhere below `other` (a cut never moves back).
    pub fn dominates(&self, other: &OffsetCut) -> bool {
        other.iter().all(|(p, o)| self.get(p) >= o)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(Partition, Offset)> for OffsetCut {
    fn from_iter<I: IntoIterator<Item = (Partition, Offset)>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cut_rounds_down_to_segment_boundaries() {
        let size = SegmentSize::new(100).unwrap();
        let cut = OffsetCut::from_lake(
            [(Partition(0), Offset(250)), (Partition(1), Offset(99)), (Partition(2), Offset(300))],
            size,
        );
        assert_eq!(cut.get(Partition(0)), Offset(200));
        assert_eq!(cut.get(Partition(1)), Offset(0));
        assert_eq!(cut.get(Partition(2)), Offset(300));
        assert_eq!(cut.get(Partition(9)), Offset(0), "unknown partitions are uncovered");
        assert!(cut.covers(Partition(0), Offset(199)));
        assert!(!cut.covers(Partition(0), Offset(200)));
        assert!(cut.leaves_to_speed(Partition(0), Segment(2), size));
        assert!(!cut.leaves_to_speed(Partition(0), Segment(1), size));
        assert!(cut.leaves_to_speed(Partition(9), Segment(0), size));
    }

    #[test]
    fn segment_size_must_be_positive() {
        assert!(SegmentSize::new(0).is_none());
        assert!(SegmentSize::new(-5).is_none());
    }

    proptest! {
        /// A record is below the cut exactly when its whole segment is.
        #[test]
        fn cut_splits_on_segments(size in 1i64..10_000, lake in 0i64..1_000_000, o in 0i64..1_000_000) {
            let size = SegmentSize::new(size).unwrap();
            let cut = OffsetCut::from_lake([(Partition(0), Offset(lake))], size);
            let boundary = cut.get(Partition(0));
            prop_assert!(boundary.0 <= lake && lake - boundary.0 < size.get());
            let seg = size.segment_of(Offset(o));
            prop_assert_eq!(cut.covers(Partition(0), Offset(o)), seg.0 * size.get() < boundary.0);
            prop_assert_eq!(cut.leaves_to_speed(Partition(0), seg, size), !cut.covers(Partition(0), Offset(o)));
        }

        /// batch(all) = batch(below cut) + speed(at or above the cut): for
        /// any records, any lake position and any segment size, summing the
        /// records the cut covers and the speed segments it leaves counts
        /// every record exactly once, and a later cut moves records from
        /// speed to batch without changing the total.
        #[test]
        fn batch_below_plus_speed_above_is_everything(
            size in 1i64..50,
            records in proptest::collection::vec((0i32..3, 0i64..500, 1i64..100), 0..200),
            lake in proptest::collection::vec(0i64..600, 3),
            later in proptest::collection::vec(0i64..100, 3),
        ) {
            let size = SegmentSize::new(size).unwrap();
            let total: i64 = records.iter().map(|(_, _, v)| v).sum();
            // The speed layer's deltas: summed per (partition, segment).
            let mut speed: BTreeMap<(Partition, Segment), i64> = BTreeMap::new();
            for (p, o, v) in &records {
                *speed.entry((Partition(*p), size.segment_of(Offset(*o)))).or_default() += v;
            }
            let merged = |cut: &OffsetCut| {
                let batch: i64 =
                    records.iter().filter(|(p, o, _)| cut.covers(Partition(*p), Offset(*o))).map(|(_, _, v)| v).sum();
                let speed: i64 =
                    speed.iter().filter(|((p, s), _)| cut.leaves_to_speed(*p, *s, size)).map(|(_, v)| v).sum();
                batch + speed
            };
            let first = OffsetCut::from_lake((0..3).map(|p| (Partition(p), Offset(lake[p as usize]))), size);
            prop_assert_eq!(merged(&first), total);
            let second = OffsetCut::from_lake(
                (0..3).map(|p| (Partition(p), Offset(lake[p as usize] + later[p as usize]))),
                size,
            );
            prop_assert!(second.dominates(&first));
            prop_assert_eq!(merged(&second), total);
        }
    }
}
