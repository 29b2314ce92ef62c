//! Where this instance is in each partition: the next offset it accepts.
//!
//! Positions come from PostgreSQL, never from the broker's group offsets:
//! a partition without a known position (first seen after start, after a
//! rebalance or after a fenced flush) has its stored offset loaded first.
//! From then on a record is counted only at exactly the next offset, so the
//! micro-batches of a partition are contiguous and nothing is counted twice:
//! a lower offset is a replay of what is already counted, a higher one means
//! the broker started past what PostgreSQL holds and the partition must be
//! read again from there.
//!
//! Pure bookkeeping: the loading and the seeking are the caller's (see
//! [`super::intake`]).

use std::collections::{BTreeMap, BTreeSet};

use shared_schema::cut::{Offset, Partition};

/// What to do with a received record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// The next record of its partition: counted, the position moved past it.
    Accept,
    /// Already counted (a replay after a seek or a rebalance): ignored.
    Behind,
    /// Past the next offset: the partition must be read again from this offset.
    SeekBack(Offset),
    /// No known position: load the partition's stored offset, then ask again.
    Unknown,
}

/// Per partition, the next offset this instance accepts.
#[derive(Debug, Default)]
pub(super) struct Positions(BTreeMap<Partition, Offset>);

impl Positions {
    /// Decides about the record at `offset` of `partition`; on
    /// [`Verdict::Accept`] the position moves past it.
    pub(super) fn receive(&mut self, partition: Partition, offset: Offset) -> Verdict {
        let Some(expected) = self.0.get(&partition).copied() else {
            return Verdict::Unknown;
        };
        if offset < expected {
            return Verdict::Behind;
        }
        if offset > expected {
            return Verdict::SeekBack(expected);
        }
        self.0.insert(partition, Offset(offset.0 + 1));
        Verdict::Accept
    }

    /// Sets the position of each of `partitions` to what PostgreSQL holds
    /// for it in `stored` (0 for a partition never seen).
    pub(super) fn load(&mut self, partitions: &[Partition], stored: &BTreeMap<Partition, Offset>) {
        for p in partitions {
            self.0.insert(*p, stored.get(p).copied().unwrap_or(Offset(0)));
        }
    }

    /// Of `partitions`, those without a known position, each once and in
    /// order: what one load must fetch.
    pub(super) fn unknown(&self, partitions: impl IntoIterator<Item = Partition>) -> Vec<Partition> {
        partitions
            .into_iter()
            .filter(|p| !self.0.contains_key(p))
            .collect::<BTreeSet<Partition>>()
            .into_iter()
            .collect()
    }

    /// Forgets the positions of rebalanced partitions: whatever this
    /// instance knew may have moved on under another one.
    pub(super) fn forget(&mut self, partitions: &BTreeSet<Partition>) {
        self.0.retain(|p, _| !partitions.contains(p));
    }

    /// Forgets every position (after a fenced flush: another instance moved
    /// offsets, so nothing known here can be trusted).
    pub(super) fn forget_all(&mut self) {
        self.0.clear();
    }

    #[cfg(test)]
    pub(super) fn next(&self, partition: Partition) -> Option<Offset> {
        self.0.get(&partition).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P0: Partition = Partition(0);
    const P1: Partition = Partition(1);

    fn loaded(p: Partition, next: i64) -> Positions {
        let mut positions = Positions::default();
        positions.load(&[p], &BTreeMap::from([(p, Offset(next))]));
        positions
    }

    #[test]
    fn exact_next_offset_is_accepted_and_moves_the_position() {
        let mut positions = loaded(P0, 7);
        assert_eq!(positions.receive(P0, Offset(7)), Verdict::Accept);
        assert_eq!(positions.next(P0), Some(Offset(8)));
        assert_eq!(positions.receive(P0, Offset(8)), Verdict::Accept);
        assert_eq!(positions.next(P0), Some(Offset(9)));
    }

    #[test]
    fn lower_offset_is_behind_and_moves_nothing() {
        let mut positions = loaded(P0, 7);
        assert_eq!(positions.receive(P0, Offset(6)), Verdict::Behind);
        assert_eq!(positions.receive(P0, Offset(0)), Verdict::Behind);
        assert_eq!(positions.next(P0), Some(Offset(7)));
    }

    #[test]
    fn higher_offset_seeks_back_to_the_expected_one() {
        let mut positions = loaded(P0, 7);
        assert_eq!(positions.receive(P0, Offset(8)), Verdict::SeekBack(Offset(7)));
        assert_eq!(positions.receive(P0, Offset(100)), Verdict::SeekBack(Offset(7)));
        assert_eq!(positions.next(P0), Some(Offset(7)));
    }

    #[test]
    fn partition_without_position_needs_a_load() {
        let mut positions = loaded(P0, 7);
        assert_eq!(positions.receive(P1, Offset(0)), Verdict::Unknown);
        assert_eq!(positions.unknown([P1, P0, P1]), vec![P1]);
        // Nothing stored: from the beginning.
        positions.load(&[P1], &BTreeMap::new());
        assert_eq!(positions.receive(P1, Offset(0)), Verdict::Accept);
    }

    #[test]
    fn forgetting_makes_positions_unknown() {
        let mut positions = Positions::default();
        positions.load(&[P0, P1], &BTreeMap::from([(P0, Offset(3)), (P1, Offset(5))]));
        positions.forget(&BTreeSet::from([P1]));
        assert_eq!(positions.unknown([P0, P1]), vec![P1]);
        positions.forget_all();
        assert_eq!(positions.unknown([P1, P0]), vec![P0, P1]);
        assert_eq!(positions.receive(P0, Offset(3)), Verdict::Unknown);
    }
}
