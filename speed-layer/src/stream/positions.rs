//! Where this instance is in each partition: the next offset it accepts.
//!
//! Positions come from PostgreSQL, never from the broker's group offsets:
//! a partition without a known position (first seen after start, after a
//! rebalance or after a fenced flush) has its stored offset loaded first.
//! From then on a record is counted only at exactly the next offset, so the
//! micro-batches of a partition are contiguous and nothing is counted twice:
//! a lower offset is a replay of what is already counted, and the partition
//! is sought ahead to its position once, so that a consumer started below it
//! (a group member starting from the group's informational offsets or from
//! the beginning, while PostgreSQL holds the batch's cut) does not read
//! through everything already counted.
//!
//! A higher offset means one of two things. Either the broker started past
//! what PostgreSQL holds (its group offsets are only informational), and the
//! partition must be read again from the position; or the offsets in between
//! hold no record this consumer will ever see (deleted by retention or
//! `DeleteRecords`, compacted away, transaction markers, aborted
//! transactions under `read_committed`). The first time, the partition is
//! sought back to its position; if the first record that comes after the
//! seek is still past it, the offsets in between are a real gap: the record
//! is accepted and the gap reported ([`Verdict::Gap`]), never waited for.
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
    /// Past the position even after a seek back to it: the offsets from the
    /// given one up to this record's hold nothing to read. Counted, the
    /// position moved past it.
    Gap(Offset),
    /// Already counted (a replay after a seek or a rebalance): ignored.
    Behind,
    /// Already counted, and the first such record since the last seek: the
    /// partition is sought ahead to this offset, its position.
    SeekAhead(Offset),
    /// Past the next offset: the partition must be read again from this offset.
    SeekBack(Offset),
    /// No known position: load the partition's stored offset, then ask again.
    Unknown,
}

/// One partition's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Position {
    /// The next offset accepted.
    next: Offset,
    /// Whether the partition was sought back to `next` and nothing was
    /// accepted since: the next record past `next` proves a gap.
    sought: bool,
}

/// Per partition, the next offset this instance accepts.
#[derive(Debug, Default)]
pub(super) struct Positions(BTreeMap<Partition, Position>);

impl Positions {
    /// Decides about the record at `offset` of `partition`; on
    /// [`Verdict::Accept`] and [`Verdict::Gap`] the position moves past it.
    pub(super) fn receive(&mut self, partition: Partition, offset: Offset) -> Verdict {
        let Some(position) = self.0.get_mut(&partition) else {
            return Verdict::Unknown;
        };
        if offset < position.next {
            return if position.sought { Verdict::Behind } else { Verdict::SeekAhead(position.next) };
        }
        let verdict = if offset == position.next {
            Verdict::Accept
        } else if position.sought {
            Verdict::Gap(position.next)
        } else {
            return Verdict::SeekBack(position.next);
        };
        *position = Position { next: Offset(offset.0 + 1), sought: false };
        verdict
    }

    /// Sets the position of each of `partitions` to what PostgreSQL holds
    /// for it in `stored` (0 for a partition never seen).
    pub(super) fn load(&mut self, partitions: &[Partition], stored: &BTreeMap<Partition, Offset>) {
        for p in partitions {
            let next = stored.get(p).copied().unwrap_or(Offset(0));
            self.0.insert(*p, Position { next, sought: false });
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

    /// The next offset accepted of `partition`, if known.
    pub(super) fn next(&self, partition: Partition) -> Option<Offset> {
        self.0.get(&partition).map(|p| p.next)
    }

    /// `partition` was just sought to its position (after a
    /// [`Verdict::SeekBack`] or [`Verdict::SeekAhead`], or on purpose): the
    /// next record past the position proves a gap, and records below it are
    /// replays that ask for no further seek. Until then, a seek is asked
    /// for again (a failed seek proves nothing).
    pub(super) fn sought(&mut self, partition: Partition) {
        if let Some(position) = self.0.get_mut(&partition) {
            position.sought = true;
        }
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
    fn lower_offset_seeks_ahead_once_and_moves_nothing() {
        let mut positions = loaded(P0, 7);
        assert_eq!(positions.receive(P0, Offset(0)), Verdict::SeekAhead(Offset(7)));
        positions.sought(P0);
        assert_eq!(positions.receive(P0, Offset(1)), Verdict::Behind, "sought already");
        assert_eq!(positions.next(P0), Some(Offset(7)));
        assert_eq!(positions.receive(P0, Offset(7)), Verdict::Accept);
        assert_eq!(positions.receive(P0, Offset(6)), Verdict::SeekAhead(Offset(8)));
    }

    #[test]
    fn higher_offset_seeks_back_to_the_expected_one() {
        let mut positions = loaded(P0, 7);
        assert_eq!(positions.receive(P0, Offset(8)), Verdict::SeekBack(Offset(7)));
        positions.sought(P0);
        assert_eq!(positions.next(P0), Some(Offset(7)));
        // After the seek the expected record comes: no gap.
        assert_eq!(positions.receive(P0, Offset(7)), Verdict::Accept);
        // A later jump seeks back again first.
        assert_eq!(positions.receive(P0, Offset(100)), Verdict::SeekBack(Offset(8)));
    }

    #[test]
    fn still_past_the_position_after_the_seek_is_a_gap() {
        let mut positions = loaded(P0, 7);
        assert_eq!(positions.receive(P0, Offset(12)), Verdict::SeekBack(Offset(7)));
        positions.sought(P0);
        // Replays below the position change nothing.
        assert_eq!(positions.receive(P0, Offset(3)), Verdict::Behind);
        // The first record after the seek is offset 10: 7, 8 and 9 are gone.
        assert_eq!(positions.receive(P0, Offset(10)), Verdict::Gap(Offset(7)));
        assert_eq!(positions.next(P0), Some(Offset(11)));
        assert_eq!(positions.receive(P0, Offset(11)), Verdict::Accept);
        // A new jump is not a gap until a seek proves it.
        assert_eq!(positions.receive(P0, Offset(20)), Verdict::SeekBack(Offset(12)));
    }

    #[test]
    fn a_failed_seek_proves_nothing() {
        let mut positions = loaded(P0, 7);
        assert_eq!(positions.receive(P0, Offset(12)), Verdict::SeekBack(Offset(7)));
        // The seek failed: not marked sought.
        assert_eq!(positions.receive(P0, Offset(12)), Verdict::SeekBack(Offset(7)), "seeks again");
        positions.sought(P0);
        assert_eq!(positions.receive(P0, Offset(12)), Verdict::Gap(Offset(7)));
    }

    #[test]
    fn a_load_resets_a_pending_seek() {
        let mut positions = loaded(P0, 7);
        assert_eq!(positions.receive(P0, Offset(12)), Verdict::SeekBack(Offset(7)));
        positions.sought(P0);
        positions.load(&[P0], &BTreeMap::from([(P0, Offset(9))]));
        assert_eq!(positions.receive(P0, Offset(12)), Verdict::SeekBack(Offset(9)));
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
