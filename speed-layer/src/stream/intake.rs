//! How a received record enters the micro-batch: its partition's position
//! decides ([`super::positions`]), rebalances and fenced flushes make
//! positions be reloaded, and the records held during a flush are accepted
//! after it in the order they arrived.
//!
//! The outside world — the rebalance callback, PostgreSQL's stored offsets,
//! the consumer's seek — is reached through [`Edge`], so this logic runs the
//! same against Kafka and PostgreSQL as against a script in the tests.
//! Guarantees: a partition's records enter the micro-batch only at exactly
//! the next offset, or past it when a seek back proved the offsets between
//! empty (the record then carries the gap, see [`Record::gap_from`]); a
//! partition is sought back at most once per record run (its later held
//! records come again anyway); positions unknown after a fenced flush are
//! loaded in one query, not once per held record.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

use shared_schema::cut::{Offset, Partition};

use super::micro_batch::{Hold, MicroBatch, Record};
use super::positions::{Positions, Verdict};

/// How long to wait before a record whose position could not be loaded
/// is tried again.
const LOAD_RETRY: Duration = Duration::from_millis(500);

/// What intake needs from outside: Kafka and PostgreSQL in production.
pub(super) trait Edge {
    type Error: fmt::Display;
    /// Partitions assigned or revoked since the last call.
    fn rebalanced(&mut self) -> BTreeSet<Partition>;
    /// The next offset PostgreSQL holds for each of `partitions`.
    async fn load(&mut self, partitions: &[Partition]) -> Result<BTreeMap<Partition, Offset>, Self::Error>;
    /// Reads `partition` again from `offset`; false when the seek failed.
    fn seek(&mut self, partition: Partition, offset: Offset) -> bool;
    /// A flush committed: per partition, the next offset.
    fn committed(&mut self, _next: &[(Partition, Offset)]) {}
}

/// What [`Intake::accept`] did with a record.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Accepted {
    Buffered,
    /// Buffered past a gap (offsets that hold nothing to read).
    PastGap,
    /// Already counted.
    Behind,
    /// Already counted; the partition is read on from its position.
    SoughtAhead,
    /// Not the next record: the partition is read again from its position.
    SoughtBack,
}

/// How a flush ended, as far as positions care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum FlushEnd {
    /// Committed, or given up at shutdown: the positions stand.
    Kept,
    /// Another instance moved offsets: every position is reloaded, and what
    /// the discarded micro-batch held (per partition, from its first offset
    /// to just after its last) is read again from there unless committed.
    Fenced(BTreeMap<Partition, (Offset, Offset)>),
}

/// The positions and the micro-batch they fill.
#[derive(Debug, Default)]
pub(super) struct Intake {
    positions: Positions,
    pub(super) batch: MicroBatch,
}

impl Intake {
    /// Forgets the position and the buffered records of every partition
    /// assigned or revoked since the last look: records of an earlier
    /// assignment are re-read from the offset PostgreSQL holds.
    /// Returns the partitions that changed.
    pub(super) fn apply_rebalances(&mut self, edge: &mut impl Edge) -> BTreeSet<Partition> {
        let changed = edge.rebalanced();
        if changed.is_empty() {
            return changed;
        }
        self.positions.forget(&changed);
        let dropped = self.batch.drop_partitions(&changed);
        if dropped > 0 {
            tracing::info!(dropped, ?changed, "rebalance: buffered records will be re-read");
        }
        changed
    }

    /// Buffers the record if it is the next of its partition; `at` is when
    /// it was received (a micro-batch's age counts from its first record's).
    pub(super) async fn accept(&mut self, record: Record, at: Instant, edge: &mut impl Edge) -> Accepted {
        let (partition, offset) = (record.partition, record.offset);
        // A rebalance callback may have run while this record was fetched.
        self.apply_rebalances(edge);
        loop {
            match self.positions.receive(partition, offset) {
                verdict @ (Verdict::Accept | Verdict::Gap(_)) => {
                    let gap_from = match verdict {
                        Verdict::Gap(from) => {
                            tracing::warn!(%partition, from = from.0, to = offset.0, "offsets without records: skipping the gap");
                            Some(from)
                        }
                        _ => None,
                    };
                    metrics::counter!("speed_records_total").increment(1);
                    metrics::counter!("speed_bytes_total").increment(record.payload.len() as u64);
                    self.batch.push(Record { gap_from, ..record }, at);
                    return if gap_from.is_some() { Accepted::PastGap } else { Accepted::Buffered };
                }
                // Already counted (replay after a seek or rebalance).
                Verdict::Behind => return Accepted::Behind,
                Verdict::SeekAhead(next) => {
                    // Everything up to the position is counted: skip it.
                    self.seek_to_position(partition, next, edge);
                    return Accepted::SoughtAhead;
                }
                Verdict::SeekBack(expected) => {
                    // The broker started past what PostgreSQL holds, or the
                    // offsets between hold nothing: go back and see.
                    self.seek_to_position(partition, expected, edge);
                    return Accepted::SoughtBack;
                }
                Verdict::Unknown => {
                    if let Err(e) = self.load(&[partition], edge).await {
                        // Seek back so the record comes again once PostgreSQL answers.
                        tracing::warn!(error = %e, %partition, "cannot load the stored offset; retrying");
                        edge.seek(partition, offset);
                        tokio::time::sleep(LOAD_RETRY).await;
                        return Accepted::SoughtBack;
                    }
                }
            }
        }
    }

    /// After a flush: forgets every position if it was fenced, then accepts
    /// what was held during it. Records of partitions reassigned meanwhile
    /// are dropped and re-read from the offset PostgreSQL holds.
    pub(super) async fn after_flush(&mut self, end: FlushEnd, mut held: Hold, edge: &mut impl Edge) {
        let mut discarded = match end {
            FlushEnd::Kept => BTreeMap::new(),
            FlushEnd::Fenced(discarded) => {
                // Another instance moved offsets: re-read every partition
                // from PostgreSQL.
                self.positions.forget_all();
                discarded
            }
        };
        let changed = self.apply_rebalances(edge);
        held.drop_partitions(&changed);
        // A partition reassigned meanwhile is re-read from PostgreSQL anyway.
        discarded.retain(|p, _| !changed.contains(p));
        // Positions unknown after a fenced flush or for a partition first
        // seen now: loaded at once, not once per held record.
        let unknown = self.positions.unknown(held.partitions().chain(discarded.keys().copied()));
        if !unknown.is_empty()
            && let Err(e) = self.load(&unknown, edge).await
        {
            // Read those partitions again from the first record this
            // instance dropped; their positions load when it comes.
            tracing::warn!(error = %e, partitions = ?unknown, "cannot load the stored offsets; re-reading");
            for p in &unknown {
                if let Some(first) = discarded.get(p).map(|(first, _)| *first).or_else(|| held.first_offset(*p)) {
                    edge.seek(*p, first);
                }
            }
            held.drop_partitions(&unknown.iter().copied().collect());
            discarded.retain(|p, _| !unknown.contains(p));
        }
        // What the discarded micro-batch held and nobody committed is read
        // again: no later record may come to prompt it (the partition may be
        // idle), so seek back now. Its held records come again after it.
        let mut sought = BTreeSet::new();
        for (p, (_, end)) in &discarded {
            if let Some(next) = self.positions.next(*p).filter(|next| next < end) {
                self.seek_to_position(*p, next, edge);
                sought.insert(*p);
            }
        }
        held.drop_partitions(&sought);
        // Once a partition is sought back, its later held records come again.
        for (record, at) in held.into_records() {
            let partition = record.partition;
            if !sought.contains(&partition)
                && matches!(self.accept(record, at, edge).await, Accepted::SoughtBack | Accepted::SoughtAhead)
            {
                sought.insert(partition);
            }
        }
    }

    /// Seeks `partition` to `position`, its position; once the seek is made
    /// the positions know it (see [`Positions::sought`]).
    fn seek_to_position(&mut self, partition: Partition, position: Offset, edge: &mut impl Edge) {
        if edge.seek(partition, position) {
            self.positions.sought(partition);
        }
    }

    /// Sets the position of each of `partitions` to the next offset
    /// PostgreSQL holds for it (0 for a partition never seen).
    async fn load<E: Edge>(&mut self, partitions: &[Partition], edge: &mut E) -> Result<(), E::Error> {
        let stored = edge.load(partitions).await?;
        self.positions.load(partitions, &stored);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::super::micro_batch::{FlushPolicy, record, spans};
    use super::*;

    const POLICY: FlushPolicy =
        FlushPolicy { interval: Duration::from_millis(100), max_batch: 100, max_bytes: 1 << 20 };

    /// A fenced flush; the harness fills in what the micro-batch held.
    const FENCED: FlushEnd = FlushEnd::Fenced(BTreeMap::new());

    /// One step of a script: what the consumer delivers and how flushes end.
    #[derive(Debug, Clone)]
    enum Step {
        /// A record (partition, offset) received `ms` after the script began.
        Record(i32, i64, u64),
        /// The rebalance callback reports these partitions assigned or revoked.
        Rebalance(&'static [i32]),
        /// A flush of the micro-batch starts (it is taken out).
        FlushStart,
        /// During the flush, a record (partition, offset) arrives at `ms`.
        Held(i32, i64, u64),
        /// During the flush, a rebalance of these partitions.
        RebalanceDuringFlush(&'static [i32]),
        /// Another instance commits this partition up to this offset.
        Commit(i32, i64),
        /// The flush ends.
        FlushEnd(FlushEnd),
    }

    /// The outside world, scripted: PostgreSQL's stored offsets, what the
    /// rebalance callback reported, and a log of every load and seek.
    #[derive(Default)]
    struct Script {
        stored: BTreeMap<Partition, Offset>,
        rebalanced: BTreeSet<Partition>,
        /// Which loads (0 = the first) fail.
        failing_loads: BTreeSet<usize>,
        /// Which seeks (0 = the first) fail.
        failing_seeks: BTreeSet<usize>,
        loads: Vec<Vec<i32>>,
        seeks: Vec<(i32, i64)>,
    }

    impl Script {
        fn stored(offsets: &[(i32, i64)]) -> Self {
            Self { stored: offsets.iter().map(|(p, o)| (Partition(*p), Offset(*o))).collect(), ..Self::default() }
        }
    }

    impl Edge for Script {
        type Error = &'static str;

        fn rebalanced(&mut self) -> BTreeSet<Partition> {
            std::mem::take(&mut self.rebalanced)
        }

        async fn load(&mut self, partitions: &[Partition]) -> Result<BTreeMap<Partition, Offset>, Self::Error> {
            self.loads.push(partitions.iter().map(|p| p.0).collect());
            if self.failing_loads.contains(&(self.loads.len() - 1)) {
                return Err("PostgreSQL away");
            }
            Ok(partitions.iter().filter_map(|p| self.stored.get(p).map(|o| (*p, *o))).collect())
        }

        fn seek(&mut self, partition: Partition, offset: Offset) -> bool {
            self.seeks.push((partition.0, offset.0));
            !self.failing_seeks.contains(&(self.seeks.len() - 1))
        }
    }

    /// What running a script left behind.
    struct Run {
        intake: Intake,
        script: Script,
        /// The micro-batches taken out by `FlushStart`, as (partition, offset).
        flushed: Vec<Vec<(i32, i64)>>,
        /// What `accept` answered, in order, for records outside a flush.
        answers: Vec<Accepted>,
        t0: Instant,
    }

    impl Run {
        fn batch(&self) -> Vec<(i32, i64)> {
            self.intake.batch.records().iter().map(|r| (r.partition.0, r.offset.0)).collect()
        }
    }

    /// Plays `steps` the way the stream loop does: records go to `accept`,
    /// records during a flush into a hold bounded by `max_batch`, and the
    /// flush's end to `after_flush`.
    async fn play(mut script: Script, steps: &[Step]) -> Run {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut intake = Intake::default();
        let mut flushed = Vec::new();
        let mut answers = Vec::new();
        let mut hold: Option<Hold> = None;
        let mut steps: VecDeque<Step> = steps.iter().cloned().collect();
        let mut taken: Vec<Record> = Vec::new();
        while let Some(step) = steps.pop_front() {
            match step {
                Step::Record(p, o, ms) => answers.push(intake.accept(record(p, o), at(ms), &mut script).await),
                Step::Rebalance(ps) | Step::RebalanceDuringFlush(ps) => {
                    script.rebalanced.extend(ps.iter().map(|p| Partition(*p)));
                }
                Step::FlushStart => {
                    intake.apply_rebalances(&mut script);
                    taken = intake.batch.take();
                    flushed.push(taken.iter().map(|r| (r.partition.0, r.offset.0)).collect());
                    hold = Some(Hold::new(POLICY));
                }
                Step::Held(p, o, ms) => {
                    let h = hold.as_mut().expect("Held outside a flush");
                    if h.wants_more(false) {
                        h.push(record(p, o), at(ms));
                    }
                }
                Step::Commit(p, o) => {
                    script.stored.insert(Partition(p), Offset(o));
                }
                Step::FlushEnd(end) => {
                    let end = match end {
                        FlushEnd::Fenced(_) => FlushEnd::Fenced(spans(&taken)),
                        kept => kept,
                    };
                    let h = hold.take().expect("FlushEnd outside a flush");
                    intake.after_flush(end, h, &mut script).await;
                }
            }
        }
        Run { intake, script, flushed, answers, t0 }
    }

    #[tokio::test]
    async fn exact_next_offsets_are_buffered_after_one_load() {
        let run = play(Script::stored(&[(0, 10)]), &[Step::Record(0, 10, 0), Step::Record(0, 11, 1)]).await;
        assert_eq!(run.answers, vec![Accepted::Buffered, Accepted::Buffered]);
        assert_eq!(run.batch(), vec![(0, 10), (0, 11)]);
        assert_eq!(run.script.loads, vec![vec![0]], "a partition with no known position needs one load");
        assert!(run.script.seeks.is_empty());
    }

    #[tokio::test]
    async fn nothing_stored_starts_at_zero() {
        let run = play(Script::default(), &[Step::Record(3, 0, 0)]).await;
        assert_eq!(run.answers, vec![Accepted::Buffered]);
        assert_eq!(run.script.loads, vec![vec![3]]);
    }

    #[tokio::test]
    async fn replayed_lower_offset_seeks_ahead_once() {
        let run = play(
            Script::stored(&[(0, 10)]),
            &[Step::Record(0, 10, 0), Step::Record(0, 9, 1), Step::Record(0, 10, 2), Step::Record(0, 11, 3)],
        )
        .await;
        assert_eq!(run.answers, vec![Accepted::Buffered, Accepted::SoughtAhead, Accepted::Behind, Accepted::Buffered]);
        assert_eq!(run.batch(), vec![(0, 10), (0, 11)]);
        assert_eq!(run.script.seeks, vec![(0, 11)], "once, to the position");
    }

    #[tokio::test]
    async fn a_consumer_starting_below_the_stored_position_skips_ahead() {
        // A group member starts at the beginning while PostgreSQL holds the
        // batch's cut, 140,000: one seek, not 140,000 records read and skipped.
        let run = play(
            Script::stored(&[(0, 140_000)]),
            &[Step::Record(0, 0, 0), Step::Record(0, 1, 1), Step::Record(0, 140_000, 2)],
        )
        .await;
        assert_eq!(run.answers, vec![Accepted::SoughtAhead, Accepted::Behind, Accepted::Buffered]);
        assert_eq!(run.script.seeks, vec![(0, 140_000)]);
        assert_eq!(run.batch(), vec![(0, 140_000)]);
    }

    #[tokio::test]
    async fn record_past_the_position_seeks_back_to_it() {
        let run = play(Script::stored(&[(0, 10)]), &[Step::Record(0, 15, 0), Step::Record(0, 10, 1)]).await;
        assert_eq!(run.answers, vec![Accepted::SoughtBack, Accepted::Buffered]);
        assert_eq!(run.script.seeks, vec![(0, 10)]);
        assert_eq!(run.batch(), vec![(0, 10)]);
    }

    #[tokio::test]
    async fn held_records_past_the_position_seek_back_once() {
        // The broker skipped ahead of PostgreSQL while a flush ran: the first
        // held record of partition 0 seeks back, its later ones are skipped
        // (they come again after the seek); partition 1 is unaffected.
        let run = play(
            Script::stored(&[(0, 0), (1, 0)]),
            &[
                Step::Record(0, 0, 0),
                Step::FlushStart,
                Step::Held(0, 5, 10),
                Step::Held(1, 0, 11),
                Step::Held(0, 6, 12),
                Step::Held(0, 7, 13),
                Step::FlushEnd(FlushEnd::Kept),
            ],
        )
        .await;
        assert_eq!(run.script.seeks, vec![(0, 1)], "exactly one seek, to the expected offset");
        assert_eq!(run.batch(), vec![(1, 0)]);
        assert_eq!(run.intake.positions.next(Partition(0)), Some(Offset(1)));
    }

    #[tokio::test]
    async fn fenced_flush_reloads_every_position_once() {
        let run = play(
            Script::stored(&[(0, 0), (1, 0)]),
            &[
                Step::Record(0, 0, 0),
                Step::Record(1, 0, 1),
                Step::FlushStart,
                Step::Held(0, 1, 10),
                Step::Held(1, 1, 11),
                // Meanwhile a successor took over both partitions and committed.
                Step::Commit(0, 2),
                Step::Commit(1, 1),
                Step::Held(0, 2, 12),
                Step::FlushEnd(FENCED),
            ],
        )
        .await;
        assert_eq!(run.flushed, vec![vec![(0, 0), (1, 0)]]);
        assert_eq!(run.script.loads, vec![vec![0], vec![1], vec![0, 1]], "reloaded once, in one query");
        // Partition 1's held record is the next; partition 0's first is behind
        // the reloaded position: partition 0 is sought ahead to 2, and its
        // later held records come again from there.
        assert_eq!(run.batch(), vec![(1, 1)], "held records judged by the reloaded positions");
        assert_eq!(run.script.seeks, vec![(0, 2)]);
    }

    #[tokio::test]
    async fn committed_flush_keeps_positions() {
        let run = play(
            Script::stored(&[(0, 0)]),
            &[Step::Record(0, 0, 0), Step::FlushStart, Step::Held(0, 1, 10), Step::FlushEnd(FlushEnd::Kept)],
        )
        .await;
        assert_eq!(run.script.loads, vec![vec![0]], "no reload after a committed flush");
        assert_eq!(run.batch(), vec![(0, 1)]);
    }

    #[tokio::test]
    async fn held_records_are_accepted_in_order_aged_from_their_arrival() {
        let run = play(
            Script::stored(&[(0, 0), (1, 0)]),
            &[
                Step::Record(0, 0, 0),
                Step::FlushStart,
                Step::Held(1, 0, 40),
                Step::Held(0, 1, 45),
                Step::Held(1, 1, 50),
                Step::FlushEnd(FlushEnd::Kept),
            ],
        )
        .await;
        assert_eq!(run.batch(), vec![(1, 0), (0, 1), (1, 1)]);
        let first = run.t0 + Duration::from_millis(40);
        assert_eq!(run.intake.batch.first_at(), Some(first), "age counts from the first held record's arrival");
        assert!(run.intake.batch.flush_due(POLICY, first + POLICY.interval, false));
        assert!(!run.intake.batch.flush_due(POLICY, first + POLICY.interval - Duration::from_millis(1), false));
    }

    #[tokio::test]
    async fn held_records_of_a_partition_rebalanced_during_the_flush_are_dropped() {
        let run = play(
            Script::stored(&[(0, 0), (1, 0)]),
            &[
                Step::Record(0, 0, 0),
                Step::Record(1, 0, 1),
                Step::FlushStart,
                Step::Held(0, 1, 10),
                Step::Held(1, 1, 11),
                Step::RebalanceDuringFlush(&[1]),
                Step::Held(0, 2, 12),
                Step::FlushEnd(FlushEnd::Kept),
            ],
        )
        .await;
        assert_eq!(run.batch(), vec![(0, 1), (0, 2)]);
        assert_eq!(run.intake.positions.next(Partition(1)), None, "partition 1 is reloaded when it comes again");
        assert_eq!(run.script.loads, vec![vec![0], vec![1]], "no load for the dropped records");
    }

    #[tokio::test]
    async fn rebalance_drops_buffered_records_and_reloads() {
        let run = play(
            Script::stored(&[(0, 0), (1, 0)]),
            &[
                Step::Record(0, 0, 0),
                Step::Record(1, 0, 1),
                Step::Rebalance(&[0]),
                Step::Record(0, 0, 2),
                Step::Record(1, 1, 3),
            ],
        )
        .await;
        assert_eq!(run.batch(), vec![(1, 0), (0, 0), (1, 1)]);
        assert_eq!(run.script.loads, vec![vec![0], vec![1], vec![0]]);
        // The micro-batch never emptied: its age still counts from its first record.
        assert_eq!(run.intake.batch.first_at(), Some(run.t0));
    }

    #[tokio::test]
    async fn hold_is_bounded_by_max_batch() {
        let mut steps = vec![Step::FlushStart];
        steps.extend((0..POLICY.max_batch as i64 + 5).map(|o| Step::Held(0, o, 1)));
        steps.push(Step::FlushEnd(FlushEnd::Kept));
        let run = play(Script::default(), &steps).await;
        assert_eq!(run.batch().len(), POLICY.max_batch);
        assert_eq!(run.batch().last(), Some(&(0, POLICY.max_batch as i64 - 1)));
    }

    #[tokio::test]
    async fn failed_load_seeks_back_to_the_record_itself() {
        let mut script = Script::stored(&[(0, 4)]);
        script.failing_loads.insert(0);
        let run = play(script, &[Step::Record(0, 7, 0), Step::Record(0, 4, 600)]).await;
        assert_eq!(run.answers, vec![Accepted::SoughtBack, Accepted::Buffered]);
        assert_eq!(run.script.seeks, vec![(0, 7)], "the record comes again once PostgreSQL answers");
        assert_eq!(run.script.loads, vec![vec![0], vec![0]]);
    }

    #[tokio::test]
    async fn failed_load_after_a_flush_rereads_from_the_first_held_record() {
        let mut script = Script::stored(&[(0, 0), (1, 0)]);
        script.failing_loads.insert(1);
        let run = play(
            script,
            &[
                Step::Record(0, 0, 0),
                Step::FlushStart,
                Step::Held(1, 3, 10),
                Step::Held(0, 1, 11),
                Step::Held(1, 4, 12),
                Step::FlushEnd(FlushEnd::Kept),
            ],
        )
        .await;
        assert_eq!(run.script.loads, vec![vec![0], vec![1]]);
        assert_eq!(run.script.seeks, vec![(1, 3)], "once, to the first held record");
        assert_eq!(run.batch(), vec![(0, 1)], "partition 0's position was known");
    }

    fn gaps(run: &Run) -> Vec<(i32, i64, Option<i64>)> {
        run.intake.batch.records().iter().map(|r| (r.partition.0, r.offset.0, r.gap_from.map(|o| o.0))).collect()
    }

    #[tokio::test]
    async fn a_log_that_starts_past_the_position_is_a_gap_after_one_seek() {
        // Retention removed offsets 0-41 of partition 0: the broker starts
        // at 42, the seek back to 0 lands on 42 again.
        let run = play(
            Script::default(),
            &[Step::Record(0, 42, 0), Step::Record(0, 42, 1), Step::Record(0, 43, 2), Step::Record(0, 45, 3)],
        )
        .await;
        assert_eq!(
            run.answers,
            vec![Accepted::SoughtBack, Accepted::PastGap, Accepted::Buffered, Accepted::SoughtBack]
        );
        assert_eq!(run.script.seeks, vec![(0, 0), (0, 44)]);
        assert_eq!(gaps(&run), vec![(0, 42, Some(0)), (0, 43, None)]);
    }

    #[tokio::test]
    async fn a_broker_ahead_of_postgresql_is_no_gap() {
        // The broker's group offset is past PostgreSQL's: after the seek the
        // expected record comes, so nothing is skipped.
        let run =
            play(Script::stored(&[(0, 10)]), &[Step::Record(0, 15, 0), Step::Record(0, 10, 1), Step::Record(0, 11, 2)])
                .await;
        assert_eq!(run.answers, vec![Accepted::SoughtBack, Accepted::Buffered, Accepted::Buffered]);
        assert_eq!(gaps(&run), vec![(0, 10, None), (0, 11, None)]);
    }

    #[tokio::test]
    async fn a_failed_seek_is_tried_again_before_a_gap_is_believed() {
        let mut script = Script::stored(&[(0, 10)]);
        script.failing_seeks.insert(0);
        let run = play(script, &[Step::Record(0, 15, 0), Step::Record(0, 16, 1), Step::Record(0, 15, 2)]).await;
        assert_eq!(run.answers, vec![Accepted::SoughtBack, Accepted::SoughtBack, Accepted::PastGap]);
        assert_eq!(run.script.seeks, vec![(0, 10), (0, 10)]);
        assert_eq!(gaps(&run), vec![(0, 15, Some(10))]);
    }

    #[tokio::test]
    async fn a_gap_found_among_held_records_waits_for_the_seek() {
        // During a flush partition 0 jumps from 1 to 5 (a transaction's
        // aborted records and markers): the held records past the jump are
        // skipped, the seek brings 5 again, and only then is it a gap.
        let run = play(
            Script::stored(&[(0, 0)]),
            &[
                Step::Record(0, 0, 0),
                Step::FlushStart,
                Step::Held(0, 5, 10),
                Step::Held(0, 6, 11),
                Step::FlushEnd(FlushEnd::Kept),
                Step::Record(0, 5, 20),
                Step::Record(0, 6, 21),
            ],
        )
        .await;
        assert_eq!(run.script.seeks, vec![(0, 1)]);
        assert_eq!(gaps(&run), vec![(0, 5, Some(1)), (0, 6, None)]);
    }

    #[tokio::test]
    async fn a_fenced_flush_reads_again_what_nobody_committed() {
        // The other instance committed partition 0 up to 1 only, and no
        // record comes after the fenced flush: 1 and 2 are sought back now.
        let run = play(
            Script::stored(&[(0, 0), (1, 0)]),
            &[
                Step::Record(0, 0, 0),
                Step::Record(0, 1, 1),
                Step::Record(0, 2, 2),
                Step::Record(1, 0, 3),
                Step::FlushStart,
                Step::Commit(0, 1),
                Step::Commit(1, 1),
                Step::FlushEnd(FENCED),
                Step::Record(0, 1, 20),
                Step::Record(0, 2, 21),
            ],
        )
        .await;
        assert_eq!(run.script.seeks, vec![(0, 1)], "partition 1 was committed whole: no seek");
        assert_eq!(run.batch(), vec![(0, 1), (0, 2)]);
        assert_eq!(run.script.loads, vec![vec![0], vec![1], vec![0, 1]]);
    }

    #[tokio::test]
    async fn held_records_of_a_partition_read_again_come_again() {
        let run = play(
            Script::stored(&[(0, 0)]),
            &[
                Step::Record(0, 0, 0),
                Step::FlushStart,
                Step::Held(0, 1, 10),
                Step::FlushEnd(FENCED),
                Step::Record(0, 0, 20),
                Step::Record(0, 1, 21),
            ],
        )
        .await;
        assert_eq!(run.script.seeks, vec![(0, 0)], "nothing committed: from the micro-batch's first offset");
        assert_eq!(run.batch(), vec![(0, 0), (0, 1)], "the held record was dropped and came again");
    }
}
