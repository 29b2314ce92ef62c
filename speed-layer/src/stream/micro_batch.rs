//! The micro-batch being gathered, and the records held while the previous
//! one flushes (from which the next is prepared while it commits).
//!
//! A micro-batch is flushed at the latest `flush_interval` after its first
//! record arrived, as soon as it holds `max_batch` records or `max_bytes`
//! bytes, and at shutdown; its age counts from when its first record was
//! *received*, so a record held during a flush does not wait for that flush
//! twice. The hold is bounded the same way (a flush retrying against a dead
//! database stops the reading: memory peaks at about twice the bounds,
//! whatever the records' size). Records of a partition rebalanced away are
//! dropped from both, to be re-read from the offset PostgreSQL holds.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use shared_schema::cut::{Offset, Partition};

/// How long the loop waits for a record while nothing is gathered.
const IDLE_WAIT: Duration = Duration::from_millis(250);

/// A received Kafka record, copied out of the consumer (an absent payload
/// is empty, and rejected as such).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Record {
    pub(super) partition: Partition,
    pub(super) offset: Offset,
    /// Its Kafka timestamp: what its event time is judged against.
    pub(super) timestamp: Option<chrono::DateTime<chrono::Utc>>,
    pub(super) key: Option<Vec<u8>>,
    pub(super) payload: Vec<u8>,
    /// Set when the offsets from this one up to the record's own hold no
    /// record to read (retention, compaction, transaction markers, aborted
    /// transactions): the record was accepted past that gap.
    pub(super) gap_from: Option<Offset>,
}

/// Per partition, the offsets `records` span: from the first (or the
/// start of the gap before it) to just after the last.
pub(super) fn spans<'r>(records: impl IntoIterator<Item = &'r Record>) -> BTreeMap<Partition, (Offset, Offset)> {
    let mut spans: BTreeMap<Partition, (Offset, Offset)> = BTreeMap::new();
    for r in records {
        let (first, end) = (r.gap_from.unwrap_or(r.offset), Offset(r.offset.0 + 1));
        let span = spans.entry(r.partition).or_insert((first, end));
        *span = (span.0.min(first), span.1.max(end));
    }
    spans
}

impl Record {
    /// The memory it holds: key and payload.
    pub(super) fn size(&self) -> usize {
        self.payload.len() + self.key.as_ref().map_or(0, Vec::len)
    }
}

/// When a micro-batch is flushed.
#[derive(Debug, Clone, Copy)]
pub(super) struct FlushPolicy {
    /// At the latest this long after the first record arrived.
    pub(super) interval: Duration,
    /// As soon as this many records are gathered; also bounds the hold.
    pub(super) max_batch: usize,
    /// As soon as the records hold this many bytes; also bounds the hold.
    pub(super) max_bytes: usize,
}

/// The records accepted since the last flush, in the order received.
#[derive(Debug, Default)]
pub(super) struct MicroBatch {
    records: Vec<Record>,
    /// What the records hold (see [`Record::size`]).
    bytes: usize,
    /// When its first record was received.
    first_at: Option<Instant>,
}

impl MicroBatch {
    /// Adds a record received at `at`.
    pub(super) fn push(&mut self, record: Record, at: Instant) {
        self.bytes += record.size();
        self.records.push(record);
        self.first_at.get_or_insert(at);
    }

    pub(super) fn len(&self) -> usize {
        self.records.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Whether the micro-batch must be flushed now: it holds something and
    /// is old enough, full, or the layer is shutting down.
    pub(super) fn flush_due(&self, policy: FlushPolicy, now: Instant, shutdown: bool) -> bool {
        let old = self.first_at.is_some_and(|t| now.saturating_duration_since(t) >= policy.interval);
        !self.is_empty() && (old || self.len() >= policy.max_batch || self.bytes >= policy.max_bytes || shutdown)
    }

    /// How long to wait for the next record before looking again: until the
    /// micro-batch is due by age, or a while when it is empty.
    pub(super) fn wait(&self, policy: FlushPolicy, now: Instant) -> Duration {
        match self.first_at {
            Some(t) => policy.interval.saturating_sub(now.saturating_duration_since(t)),
            None => IDLE_WAIT,
        }
    }

    /// Drops the records of `partitions`; returns how many.
    pub(super) fn drop_partitions(&mut self, partitions: &BTreeSet<Partition>) -> usize {
        let before = self.records.len();
        self.records.retain(|r| !partitions.contains(&r.partition));
        self.bytes = self.records.iter().map(Record::size).sum();
        if self.records.is_empty() {
            self.first_at = None;
        }
        before - self.records.len()
    }

    /// Takes the records out for a flush; the next micro-batch starts empty.
    pub(super) fn take(&mut self) -> Vec<Record> {
        self.first_at = None;
        self.bytes = 0;
        std::mem::take(&mut self.records)
    }

    #[cfg(test)]
    pub(super) fn first_at(&self) -> Option<Instant> {
        self.first_at
    }

    #[cfg(test)]
    pub(super) fn records(&self) -> &[Record] {
        &self.records
    }
}

/// Records received while a flush runs, with when each arrived; accepted
/// once the flush is over, when the positions it leaves are known.
#[derive(Debug)]
pub(super) struct Hold {
    records: Vec<(Record, Instant)>,
    bytes: usize,
    max: usize,
    max_bytes: usize,
    /// False after a consumer error: nothing more is held in this flush.
    open: bool,
}

impl Hold {
    /// An empty hold taking at most `policy.max_batch` records.
    pub(super) fn new(policy: FlushPolicy) -> Self {
        Self { records: Vec::new(), bytes: 0, max: policy.max_batch, max_bytes: policy.max_bytes, open: true }
    }

    /// Whether to receive another record into the hold: not when full (by
    /// records or bytes), not after a consumer error, not once shutdown began.
    pub(super) fn wants_more(&self, shutdown: bool) -> bool {
        self.open && self.records.len() < self.max && self.bytes < self.max_bytes && !shutdown
    }

    pub(super) fn push(&mut self, record: Record, at: Instant) {
        self.bytes += record.size();
        self.records.push((record, at));
    }

    /// Whether the held records already make the next micro-batch, to be
    /// prepared while the flush before them commits: full (by records or
    /// bytes), or older than a non-zero flush interval. With group commit
    /// (a zero interval) a micro-batch that is not full waits for the
    /// commit to end, gathering what arrives meanwhile: preparing it at its
    /// first record would cut it short and make later records wait for two
    /// commits.
    pub(super) fn due(&self, policy: FlushPolicy, now: Instant) -> bool {
        let Some((_, first)) = self.records.first() else { return false };
        let old = !policy.interval.is_zero() && now.saturating_duration_since(*first) >= policy.interval;
        old || self.records.len() >= self.max || self.bytes >= self.max_bytes
    }

    /// How long until the held records are due by age; `None` when age
    /// cannot make them due (nothing held, or group commit).
    pub(super) fn until_due(&self, policy: FlushPolicy, now: Instant) -> Option<Duration> {
        let (_, first) = self.records.first()?;
        (!policy.interval.is_zero()).then(|| policy.interval.saturating_sub(now.saturating_duration_since(*first)))
    }

    /// Stops holding (the consumer failed; librdkafka retries, the records
    /// come again later).
    pub(super) fn close(&mut self) {
        self.open = false;
    }

    /// Drops the held records of `partitions`.
    pub(super) fn drop_partitions(&mut self, partitions: &BTreeSet<Partition>) {
        self.records.retain(|(r, _)| !partitions.contains(&r.partition));
        self.bytes = self.records.iter().map(|(r, _)| r.size()).sum();
    }

    /// The partitions of the held records.
    pub(super) fn partitions(&self) -> impl Iterator<Item = Partition> + '_ {
        self.records.iter().map(|(r, _)| r.partition)
    }

    /// The offset of the first held record of `partition`.
    pub(super) fn first_offset(&self, partition: Partition) -> Option<Offset> {
        self.records.iter().find(|(r, _)| r.partition == partition).map(|(r, _)| r.offset)
    }

    /// The held records in the order received, with their arrival times.
    pub(super) fn into_records(self) -> Vec<(Record, Instant)> {
        self.records
    }
}

#[cfg(test)]
pub(super) fn record(partition: i32, offset: i64) -> Record {
    Record {
        partition: Partition(partition),
        offset: Offset(offset),
        timestamp: None,
        key: None,
        payload: Vec::new(),
        gap_from: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: FlushPolicy = FlushPolicy { interval: Duration::from_millis(100), max_batch: 3, max_bytes: 1000 };

    fn sized(partition: i32, offset: i64, bytes: usize) -> Record {
        Record { payload: vec![b'x'; bytes], ..record(partition, offset) }
    }

    #[test]
    fn flush_is_due_on_bytes() {
        let t0 = Instant::now();
        let mut batch = MicroBatch::default();
        batch.push(sized(0, 0, 600), t0);
        assert!(!batch.flush_due(POLICY, t0, false));
        batch.push(sized(0, 1, 400), t0);
        assert!(batch.flush_due(POLICY, t0, false), "1000 bytes in two records");
        batch.drop_partitions(&BTreeSet::from([Partition(0)]));
        batch.push(sized(1, 0, 10), t0);
        assert!(!batch.flush_due(POLICY, t0, false), "bytes of dropped records no longer count");
        batch.take();
        batch.push(sized(1, 1, 999), t0);
        assert!(!batch.flush_due(POLICY, t0, false), "a taken micro-batch's bytes no longer count");
    }

    #[test]
    fn hold_is_bounded_by_bytes() {
        let t0 = Instant::now();
        let mut hold = Hold::new(POLICY);
        hold.push(sized(0, 0, 999), t0);
        assert!(hold.wants_more(false));
        hold.push(sized(0, 1, 1), t0);
        assert!(!hold.wants_more(false), "full at max_bytes with room for records");
        hold.drop_partitions(&BTreeSet::from([Partition(0)]));
        assert!(hold.wants_more(false));
    }

    #[test]
    fn held_records_are_prepared_ahead_when_full_or_old_but_not_by_group_commit() {
        let t0 = Instant::now();
        let mut hold = Hold::new(POLICY);
        assert!(!hold.due(POLICY, t0 + Duration::from_secs(60)), "nothing held");
        assert_eq!(hold.until_due(POLICY, t0), None);
        hold.push(record(0, 0), t0);
        assert!(!hold.due(POLICY, t0 + Duration::from_millis(99)));
        assert_eq!(hold.until_due(POLICY, t0 + Duration::from_millis(60)), Some(Duration::from_millis(40)));
        assert!(hold.due(POLICY, t0 + Duration::from_millis(100)), "as old as the interval");

        let group_commit = FlushPolicy { interval: Duration::ZERO, ..POLICY };
        let mut hold = Hold::new(group_commit);
        hold.push(record(0, 0), t0);
        hold.push(record(0, 1), t0);
        assert!(!hold.due(group_commit, t0 + Duration::from_secs(60)), "waits for the commit to end");
        assert_eq!(hold.until_due(group_commit, t0), None);
        hold.push(record(0, 2), t0);
        assert!(hold.due(group_commit, t0), "full at max_batch");
        let mut hold = Hold::new(group_commit);
        hold.push(sized(0, 0, 1000), t0);
        assert!(hold.due(group_commit, t0), "full at max_bytes");
    }

    #[test]
    fn empty_micro_batch_is_never_due() {
        let batch = MicroBatch::default();
        let now = Instant::now();
        assert!(!batch.flush_due(POLICY, now + Duration::from_secs(60), true));
        assert_eq!(batch.wait(POLICY, now), IDLE_WAIT);
    }

    #[test]
    fn flush_is_due_on_interval_counted_from_the_first_record() {
        let t0 = Instant::now();
        let mut batch = MicroBatch::default();
        batch.push(record(0, 0), t0);
        batch.push(record(0, 1), t0 + Duration::from_millis(90));
        assert!(!batch.flush_due(POLICY, t0 + Duration::from_millis(99), false));
        assert_eq!(batch.wait(POLICY, t0 + Duration::from_millis(60)), Duration::from_millis(40));
        assert!(batch.flush_due(POLICY, t0 + Duration::from_millis(100), false));
        assert_eq!(batch.wait(POLICY, t0 + Duration::from_millis(150)), Duration::ZERO);
    }

    #[test]
    fn flush_is_due_on_size() {
        let t0 = Instant::now();
        let mut batch = MicroBatch::default();
        batch.push(record(0, 0), t0);
        batch.push(record(1, 0), t0);
        assert!(!batch.flush_due(POLICY, t0, false));
        batch.push(record(0, 1), t0);
        assert!(batch.flush_due(POLICY, t0, false));
    }

    #[test]
    fn flush_is_due_on_shutdown() {
        let t0 = Instant::now();
        let mut batch = MicroBatch::default();
        batch.push(record(0, 0), t0);
        assert!(!batch.flush_due(POLICY, t0, false));
        assert!(batch.flush_due(POLICY, t0, true));
    }

    #[test]
    fn take_starts_a_new_micro_batch() {
        let t0 = Instant::now();
        let mut batch = MicroBatch::default();
        batch.push(record(0, 0), t0);
        assert_eq!(batch.take(), vec![record(0, 0)]);
        assert!(batch.is_empty());
        assert_eq!(batch.first_at(), None);
        let t1 = t0 + Duration::from_millis(500);
        batch.push(record(0, 1), t1);
        assert_eq!(batch.first_at(), Some(t1));
    }

    #[test]
    fn rebalanced_partitions_leave_the_micro_batch() {
        let t0 = Instant::now();
        let mut batch = MicroBatch::default();
        batch.push(record(0, 0), t0);
        batch.push(record(1, 0), t0);
        batch.push(record(0, 1), t0);
        assert_eq!(batch.drop_partitions(&BTreeSet::from([Partition(0)])), 2);
        assert_eq!(batch.records(), &[record(1, 0)]);
        assert_eq!(batch.first_at(), Some(t0), "still holds a record");
        assert_eq!(batch.drop_partitions(&BTreeSet::from([Partition(1)])), 1);
        assert_eq!(batch.first_at(), None, "an empty micro-batch has no age");
    }

    #[test]
    fn hold_is_bounded_by_max_batch() {
        let t0 = Instant::now();
        let mut hold = Hold::new(POLICY);
        for offset in 0..3 {
            assert!(hold.wants_more(false));
            hold.push(record(0, offset), t0);
        }
        assert!(!hold.wants_more(false), "full at max_batch");
        assert_eq!(hold.into_records().len(), 3);
    }

    #[test]
    fn hold_stops_at_shutdown_and_after_a_consumer_error() {
        let mut hold = Hold::new(POLICY);
        assert!(!hold.wants_more(true));
        hold.close();
        assert!(!hold.wants_more(false));
    }

    #[test]
    fn hold_drops_rebalanced_partitions_and_keeps_order() {
        let t0 = Instant::now();
        let mut hold = Hold::new(FlushPolicy { max_batch: 10, ..POLICY });
        for (p, o) in [(0, 5), (1, 2), (0, 6), (1, 3)] {
            hold.push(record(p, o), t0 + Duration::from_millis(o as u64));
        }
        assert_eq!(hold.first_offset(Partition(0)), Some(Offset(5)));
        hold.drop_partitions(&BTreeSet::from([Partition(0)]));
        assert_eq!(hold.first_offset(Partition(0)), None);
        let left: Vec<_> = hold.into_records().into_iter().map(|(r, _)| (r.partition.0, r.offset.0)).collect();
        assert_eq!(left, vec![(1, 2), (1, 3)]);
    }
}
