//! The lake's ledger: for every Kafka offset below a partition's committed
//! position that is not a row of `events` or `events_rejected`, why not.
//!
//! Offsets below the position are either held (a row in one of the two
//! tables) or accounted for by one of the [`Kind`]s, each a running count
//! per partition recorded as a Delta `txn` action
//! (`lambda-ledger/<kind>/<partition>`, its version the count) in the same
//! commit that moves past the offsets or deletes the rows. The counts are
//! therefore exact for the snapshot that carries them, and
//! [`crate::reconcile`] can prove that the lake holds every record Kafka
//! gave it: `next offset = held + gaps + forgotten + erased`.

use std::collections::BTreeMap;

use deltalake::kernel::Transaction;
use deltalake::{DeltaTable, DeltaTableError};
use shared_schema::cut::Partition;

use crate::lake;

/// Why an offset below the position has no row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// The offset holds no record (retention, compaction, a transaction
    /// marker or an aborted transaction): stepped over by the ingest.
    Gap,
    /// A record of a forgotten user, dropped by the ingest.
    Forgotten,
    /// A row deleted by `forget-user` (recorded by the table it left).
    Erased,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Gap, Kind::Forgotten, Kind::Erased];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Gap => "gaps",
            Kind::Forgotten => "forgotten",
            Kind::Erased => "erased",
        }
    }
}

/// The application id under which `kind` is counted for `partition`.
pub fn app_id(kind: Kind, partition: Partition) -> String {
    format!("lambda-ledger/{}/{}", kind.name(), partition.0)
}

/// Per partition and kind, a count.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts(BTreeMap<(Partition, Kind), i64>);

impl Counts {
    pub fn get(&self, partition: Partition, kind: Kind) -> i64 {
        self.0.get(&(partition, kind)).copied().unwrap_or(0)
    }

    pub fn add(&mut self, partition: Partition, kind: Kind, n: i64) {
        if n != 0 {
            *self.0.entry((partition, kind)).or_default() += n;
        }
    }

    pub fn total(&self, kind: Kind) -> i64 {
        self.0.iter().filter(|((_, k), _)| *k == kind).map(|(_, n)| n).sum()
    }

    /// Moves the counts of `partitions` out of `self`.
    pub fn take(&mut self, partitions: impl IntoIterator<Item = Partition>) -> Counts {
        let mut out = Counts::default();
        for p in partitions {
            for kind in Kind::ALL {
                if let Some(n) = self.0.remove(&(p, kind)) {
                    out.add(p, kind, n);
                }
            }
        }
        out
    }

    /// The `txn` actions that record `committed + pending` for every
    /// partition and kind `pending` names.
    pub fn txns(committed: &Counts, pending: &Counts) -> Vec<Transaction> {
        pending
            .0
            .keys()
            .map(|&(p, kind)| Transaction::new(app_id(kind, p), committed.get(p, kind) + pending.get(p, kind)))
            .collect()
    }

    /// `self` plus `other`.
    pub fn merge(&mut self, other: &Counts) {
        for (&(p, kind), &n) in &other.0 {
            self.add(p, kind, n);
        }
    }
}

/// The counts `table`'s snapshot records for `partitions`.
pub async fn committed(
    table: &DeltaTable,
    partitions: impl IntoIterator<Item = Partition> + Clone,
) -> Result<Counts, DeltaTableError> {
    let kinds =
        Kind::ALL.map(|kind| {
            let partitions = partitions.clone();
            async move {
                Ok::<_, DeltaTableError>((kind, lake::txn_versions(table, partitions, |p| app_id(kind, p)).await?))
            }
        });
    let mut counts = Counts::default();
    for (kind, found) in futures::future::try_join_all(kinds).await? {
        for (p, n) in found {
            counts.add(p, kind, n);
        }
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_counts_are_recorded_on_top_of_the_committed_ones() {
        let mut committed = Counts::default();
        committed.add(Partition(0), Kind::Gap, 5);
        let mut pending = Counts::default();
        pending.add(Partition(0), Kind::Gap, 2);
        pending.add(Partition(1), Kind::Forgotten, 3);
        let txns = Counts::txns(&committed, &pending);
        let recorded: Vec<(String, i64)> = txns.iter().map(|t| (t.app_id.clone(), t.version)).collect();
        assert_eq!(recorded, [("lambda-ledger/gaps/0".to_string(), 7), ("lambda-ledger/forgotten/1".to_string(), 3)]);
    }

    #[test]
    fn take_moves_only_the_named_partitions() {
        let mut pending = Counts::default();
        pending.add(Partition(0), Kind::Gap, 2);
        pending.add(Partition(1), Kind::Forgotten, 3);
        let taken = pending.take([Partition(1)]);
        assert_eq!(taken.get(Partition(1), Kind::Forgotten), 3);
        assert_eq!(pending.get(Partition(1), Kind::Forgotten), 0);
        assert_eq!(pending.get(Partition(0), Kind::Gap), 2);
    }
}
