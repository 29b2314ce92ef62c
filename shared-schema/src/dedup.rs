//! Duplicates: the same `event_id` delivered twice counts once.
//!
//! A producer that retries without idempotence writes a record twice; both
//! copies share the key (`user_id`), so they land in the same partition.
//! Both layers judge every valid record with this one rule, in offset order
//! per partition, so they agree on every verdict whenever they read:
//!
//! * a partition's *newest time* before offset `o` is the greatest
//!   `event_time` of the valid records (parsed, not in the future) at
//!   offsets below `o`;
//! * the record at `o` is a **duplicate** when a valid record at a lower
//!   offset of the same partition has the same `event_id`, and both that
//!   earlier copy's `event_time` and its own are no older than the newest
//!   time minus the window. The lowest offset wins.
//!
//! A record older than the window behind its partition's newest time is
//! never judged a duplicate (like Apache Pinot's dedup with a metadata TTL):
//! that bounds the state to one window of event ids per partition. The
//! window is the deployment's (`ops.deployment.dedup_window`, 24 hours by
//! default), read by both layers.
//!
//! Event ids are kept as the first 16 bytes of their SHA-256 ([`EventKey`]),
//! so the state costs the same for any id length and both layers (and the
//! copies they persist) compare the same keys.
//!
//! [`History`] holds what a layer has committed; a flush judges its records
//! through a [`Judging`] over it and applies the result only after its
//! commit succeeded, so a retried flush reaches the same verdicts.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

/// The default window: one day.
pub const DEFAULT_WINDOW_MICROS: i64 = 24 * 3600 * 1_000_000;

/// An event id's key: the first 16 bytes of its SHA-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventKey(pub [u8; 16]);

impl EventKey {
    pub fn of(event_id: &str) -> Self {
        let digest = Sha256::digest(event_id.as_bytes());
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest[..16]);
        Self(key)
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 16]>::try_from(bytes).ok().map(Self)
    }
}

/// `keys` in the order both layers write them to PostgreSQL: oldest first.
/// The key tables are indexed by time only, so rows in time order extend
/// that index at its end instead of touching a page anywhere in it for
/// each row.
pub fn oldest_first<'k>(keys: impl IntoIterator<Item = (&'k EventKey, &'k i64)>) -> Vec<(&'k EventKey, i64)> {
    let mut rows: Vec<(&EventKey, i64)> = keys.into_iter().map(|(k, t)| (k, *t)).collect();
    rows.sort_unstable_by_key(|(k, t)| (*t, **k));
    rows
}

/// Keys with their partition and time (microseconds since the epoch) as the
/// columns of both key tables, `speed.event_keys` and `ops.dedup_seed`
/// (`kafka_partition`, `event_key`, `event_time`), for a binary `COPY`; in
/// the order given.
pub fn key_batch(
    rows: impl IntoIterator<Item = (i32, EventKey, i64)>,
) -> Result<arrow::array::RecordBatch, arrow::error::ArrowError> {
    use std::sync::Arc;

    use arrow::array::{BinaryArray, Int32Array, TimestampMicrosecondArray};
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    let schema = Arc::new(Schema::new(vec![
        Field::new("kafka_partition", DataType::Int32, false),
        Field::new("event_key", DataType::Binary, false),
        Field::new("event_time", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), false),
    ]));
    let (mut partitions, mut keys, mut times) = (Vec::new(), Vec::new(), Vec::new());
    for (p, k, t) in rows {
        partitions.push(p);
        keys.push(k);
        times.push(t);
    }
    let event_keys = BinaryArray::from_iter_values(keys.iter().map(|k| k.0.as_slice()));
    let times = TimestampMicrosecondArray::from(times).with_timezone("UTC");
    arrow::array::RecordBatch::try_new(
        schema,
        vec![Arc::new(Int32Array::from(partitions)), Arc::new(event_keys), Arc::new(times)],
    )
}

/// `keys` as the two columns PostgreSQL stores them in (`bytea` keys,
/// `timestamptz` event times), [`oldest_first`]; a time out of range is
/// left out.
pub fn key_columns<'k>(
    keys: impl IntoIterator<Item = (&'k EventKey, &'k i64)>,
) -> (Vec<Vec<u8>>, Vec<chrono::DateTime<chrono::Utc>>) {
    oldest_first(keys)
        .into_iter()
        .filter_map(|(k, t)| chrono::DateTime::from_timestamp_micros(t).map(|t| (k.0.to_vec(), t)))
        .unzip()
}

/// What a layer knows of one partition: its newest time and the keys of
/// the valid records within the window below it (microseconds since the
/// epoch, UTC).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionHistory {
    pub newest: Option<i64>,
    pub seen: HashMap<EventKey, i64>,
}

/// Every partition's history, with the window.
#[derive(Debug, Clone)]
pub struct History {
    window: i64,
    partitions: HashMap<i32, PartitionHistory>,
    /// Keys added since the last pruning, to prune in proportion.
    added_since_prune: usize,
}

/// The verdict on one valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Counted: the first copy within the window.
    First,
    /// An earlier copy at a lower offset within the window counts instead;
    /// `first_time` is that copy's `event_time`.
    Duplicate { first_time: i64 },
    /// Older than the window behind the partition's newest time: counted,
    /// never compared.
    BeyondWindow,
}

impl History {
    /// An empty history with a window of `window_micros` (at least 1).
    pub fn new(window_micros: i64) -> Self {
        Self { window: window_micros.max(1), partitions: HashMap::new(), added_since_prune: 0 }
    }

    pub fn window_micros(&self) -> i64 {
        self.window
    }

    /// Replaces what is known of `partition` (loaded from where a layer
    /// keeps it). Keys outside the window are dropped.
    pub fn load(&mut self, partition: i32, mut history: PartitionHistory) {
        if let Some(floor) = history.newest.map(|n| n - self.window) {
            history.seen.retain(|_, t| *t >= floor);
        }
        self.partitions.insert(partition, history);
    }

    /// Forgets `partition` (it was handed to another instance).
    pub fn remove(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    pub fn partition(&self, partition: i32) -> Option<&PartitionHistory> {
        self.partitions.get(&partition)
    }

    /// Keys held, over every partition.
    pub fn len(&self) -> usize {
        self.partitions.values().map(|p| p.seen.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts judging a flush's records over what is committed.
    pub fn judging(&self) -> Judging<'_> {
        Judging { history: self, pending: HashMap::new() }
    }

    /// Applies what a committed flush judged; drops keys that fell out of
    /// the window (a full pass only once as many keys were added as are
    /// held, so pruning costs O(1) per key).
    pub fn apply(&mut self, changes: Changes) {
        for (partition, change) in changes.partitions {
            let entry = self.partitions.entry(partition).or_default();
            entry.newest = entry.newest.max(change.newest);
            self.added_since_prune += change.added.len();
            entry.seen.extend(change.added);
        }
        if self.added_since_prune >= self.len() / 2 {
            self.prune();
        }
    }

    fn prune(&mut self) {
        let window = self.window;
        for p in self.partitions.values_mut() {
            if let Some(floor) = p.newest.map(|n| n - window) {
                p.seen.retain(|_, t| *t >= floor);
            }
        }
        self.added_since_prune = 0;
    }
}

/// One partition's changes in a flush.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionChanges {
    /// The newest time after the flush's records.
    pub newest: Option<i64>,
    /// Keys first seen, with their `event_time`, in offset order.
    pub added: Vec<(EventKey, i64)>,
}

/// What a flush judged, to persist with its commit and then
/// [`History::apply`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub partitions: HashMap<i32, PartitionChanges>,
}

impl Changes {
    /// Keys added, over every partition.
    pub fn added(&self) -> usize {
        self.partitions.values().map(|p| p.added.len()).sum()
    }
}

/// A flush's judging: the committed history plus this flush's records so far.
#[derive(Debug)]
pub struct Judging<'h> {
    history: &'h History,
    pending: HashMap<i32, (PartitionChanges, HashMap<EventKey, i64>)>,
}

impl Judging<'_> {
    /// Judges the valid record with `event_id` and `event_time`
    /// (microseconds) at the next offset of `partition`; records of a
    /// partition must come in offset order.
    pub fn judge(&mut self, partition: i32, event_id: &str, event_time: i64) -> Verdict {
        let window = self.history.window;
        let committed = self.history.partitions.get(&partition);
        let (changes, added) = self.pending.entry(partition).or_insert_with(|| {
            (PartitionChanges { newest: committed.and_then(|c| c.newest), added: Vec::new() }, HashMap::new())
        });
        let newest = changes.newest;
        changes.newest = newest.max(Some(event_time));
        let floor = match newest {
            Some(n) => n - window,
            None => i64::MIN,
        };
        if event_time < floor {
            return Verdict::BeyondWindow;
        }
        let key = EventKey::of(event_id);
        let earlier = added.get(&key).or_else(|| committed.and_then(|c| c.seen.get(&key))).copied();
        if let Some(first_time) = earlier.filter(|t| *t >= floor) {
            return Verdict::Duplicate { first_time };
        }
        added.insert(key, event_time);
        changes.added.push((key, event_time));
        Verdict::First
    }

    /// What this flush judged, to persist and apply after its commit.
    pub fn finish(self) -> Changes {
        Changes { partitions: self.pending.into_iter().map(|(p, (changes, _))| (p, changes)).collect() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000_000;

    fn judge_all(history: &History, records: &[(i32, &str, i64)]) -> (Vec<Verdict>, Changes) {
        let mut j = history.judging();
        let verdicts = records.iter().map(|(p, id, t)| j.judge(*p, id, *t)).collect();
        (verdicts, j.finish())
    }

    #[test]
    fn the_lowest_offset_wins_within_a_partition() {
        let h = History::new(24 * H);
        let (v, _) = judge_all(&h, &[(0, "a", 10 * H), (0, "b", 10 * H), (0, "a", 10 * H), (1, "a", 10 * H)]);
        assert_eq!(
            v,
            [Verdict::First, Verdict::First, Verdict::Duplicate { first_time: 10 * H }, Verdict::First],
            "a copy in another partition is another event"
        );
    }

    /// Every 17th record arrives two days late.
    fn late(i: i32) -> i64 {
        if i % 17 == 0 { 48 * H } else { 0 }
    }

    #[test]
    fn verdicts_do_not_depend_on_how_records_are_split_into_flushes() {
        let records: Vec<(i32, String, i64)> =
            (0..200).map(|i| (i % 3, format!("e-{}", (i * 7) % 60), (i as i64) * H / 4 - late(i))).collect();
        let refs: Vec<(i32, &str, i64)> = records.iter().map(|(p, id, t)| (*p, id.as_str(), *t)).collect();
        let whole = judge_all(&History::new(24 * H), &refs).0;
        for chunk in [1, 7, 50] {
            let mut h = History::new(24 * H);
            let mut split = Vec::new();
            for part in refs.chunks(chunk) {
                let (v, changes) = judge_all(&h, part);
                split.extend(v);
                h.apply(changes);
            }
            assert_eq!(split, whole, "chunks of {chunk}");
        }
        assert!(whole.iter().any(|v| matches!(v, Verdict::Duplicate { .. })));
        assert!(whole.contains(&Verdict::BeyondWindow));
    }

    #[test]
    fn an_unapplied_flush_leaves_the_history_as_it_was() {
        let mut h = History::new(24 * H);
        let (first, changes) = judge_all(&h, &[(0, "a", H)]);
        assert_eq!(first, [Verdict::First]);
        // The commit failed: the retry judges the same.
        let (retry, again) = judge_all(&h, &[(0, "a", H)]);
        assert_eq!(retry, first);
        assert_eq!(again, changes);
        h.apply(changes);
        assert_eq!(judge_all(&h, &[(0, "a", H)]).0, [Verdict::Duplicate { first_time: H }]);
    }

    #[test]
    fn copies_older_than_the_window_behind_the_newest_time_are_never_compared() {
        let mut h = History::new(2 * H);
        let (_, c) = judge_all(&h, &[(0, "old", 0), (0, "new", 5 * H)]);
        h.apply(c);
        // "old" fell out of the window: a late copy of it counts again, and
        // so does a copy of an event first seen far behind the newest time.
        let (v, _) = judge_all(&h, &[(0, "old", 0), (0, "old", 4 * H), (0, "new", 4 * H)]);
        assert_eq!(v, [Verdict::BeyondWindow, Verdict::First, Verdict::Duplicate { first_time: 5 * H }]);
    }

    #[test]
    fn loading_keeps_only_the_window_and_pruning_bounds_the_state() {
        let mut h = History::new(H);
        let seen = (0..10).map(|i| (EventKey::of(&format!("e-{i}")), i * H / 2)).collect();
        h.load(0, PartitionHistory { newest: Some(5 * H), seen });
        assert_eq!(h.len(), 2, "4 and 4.5 hours are within an hour of 5");
        for i in 0..1000 {
            let (_, c) = judge_all(&h, &[(0, &format!("n-{i}"), 5 * H + i * H / 10)]);
            h.apply(c);
        }
        assert!(h.len() <= 3 * 11, "about one window (11 keys) is held, not {}", h.len());
    }

    #[test]
    fn keys_are_the_sha256_prefix() {
        // `printf e-1 | sha256sum` starts b94f523196aaacd8bdb9ef0d8cf2e1d8.
        let k = EventKey::of("e-1");
        let hex: String = k.0.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "b94f523196aaacd8bdb9ef0d8cf2e1d8");
        assert_eq!(EventKey::from_slice(&k.0), Some(k));
        assert_ne!(EventKey::of("e-1"), EventKey::of("e-2"));
    }

    #[test]
    fn key_columns_are_oldest_first_and_complete() {
        let keys: HashMap<EventKey, i64> =
            (0..200).map(|i| (EventKey::of(&format!("e-{i}")), (i * 7919) % 200 * H)).collect();
        let (k, t) = key_columns(&keys);
        assert_eq!(k.len(), 200);
        assert!(t.windows(2).all(|w| w[0] <= w[1]), "not in time order");
        for (k, t) in k.iter().zip(&t) {
            let key = EventKey::from_slice(k).unwrap();
            assert_eq!(keys[&key], t.timestamp_micros());
        }
    }
}
