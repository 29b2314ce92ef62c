//! `batch-layer maintain` on a lake the real ingest wrote in small flushes:
//! the closed hours end up in one file each, the open ones are left alone,
//! the ingest's offsets survive the log's clean-up, the replaced files leave
//! the disk, and a full run publishes exactly what it published before.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use batch_layer::ingest::{self, IngestConfig};
use batch_layer::lake::{self, EVENTS_TABLE, Lake};
use batch_layer::lake_files::LakeFiles;
use batch_layer::maintain::{self, MaintainConfig};
use batch_layer::recompute::{self, RunConfig, RunOutcome};
use integration_tests::checks::{assert_tables_match, schema_rows};
use integration_tests::fixture::{FreshStream, Stack};
use integration_tests::generator::{self, Args};
use shared_schema::cut::Partition;
use tokio_util::sync::CancellationToken;

async fn files(lake: &Lake) -> BTreeMap<Vec<Option<String>>, usize> {
    let table = lake.open(EVENTS_TABLE).await.unwrap().unwrap();
    LakeFiles::from_snapshot(EVENTS_TABLE, &table).await.unwrap().files_per_partition_value()
}

fn parquet_files_on_disk(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n == "_delta_log") { 0 } else { parquet_files_on_disk(&p) }
            } else {
                usize::from(p.extension().is_some_and(|x| x == "parquet"))
            }
        })
        .sum()
}

/// When the hour of a partition (`[event_date, event_hour]`) ends.
fn hour_end(values: &[Option<String>]) -> chrono::DateTime<chrono::Utc> {
    let (date, hour) = (values[0].as_deref().unwrap(), values[1].as_deref().unwrap());
    shared_schema::schema::Hour::from_partition(date, hour).unwrap().next().start()
}

#[tokio::test]
async fn maintenance_compacts_closed_hours_and_changes_no_result() {
    let stack = Stack::from_env();
    // Segment size 1: the cut is the lake's end, the batch holds every event.
    let FreshStream { topic, url, pool, .. } = stack.fresh_stream("maintain", 2, 1).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::parse(dir.path().to_str().unwrap()).unwrap();
    generator::run(Args { backfill_hours: 6, bad_fraction: 0.02, ..Args::for_tests(stack.brokers(), &topic, 81) })
        .await
        .unwrap();
    // Small flushes, as the real ingest's 60 s cadence makes them.
    let ingest = IngestConfig { flush_records: 1_000, ..IngestConfig::catch_up(stack.brokers(), &topic, &lake) };
    ingest::run(ingest.clone(), CancellationToken::new()).await.unwrap();
    let full = RunConfig { full: true, ..RunConfig::new(url.clone(), lake.clone(), topic.clone()) };
    assert!(matches!(recompute::run(&full).await.unwrap(), RunOutcome::Published { .. }));
    let published = schema_rows(&pool, "batch").await;
    let before = files(&lake).await;
    let table = lake.open(EVENTS_TABLE).await.unwrap().unwrap();
    let offsets = lake::committed_offsets(&table, &topic, [Partition(0), Partition(1)]).await.unwrap();
    let now = chrono::Utc::now();
    let closed_before = now - chrono::TimeDelta::hours(2);
    let closed = |values: &Vec<Option<String>>| hour_end(values) <= closed_before;
    assert!(before.iter().any(|(v, n)| closed(v) && *n > 1), "closed hours of several files to compact: {before:?}");
    assert!(before.keys().any(|v| !closed(v)), "an open hour to leave alone: {before:?}");

    // Retention 0: the replaced files and old log entries go at once.
    let config = MaintainConfig {
        closed_after: Duration::from_secs(2 * 3600),
        retention: Duration::ZERO,
        ..MaintainConfig::new(lake.clone())
    };
    let report = maintain::maintain(&config, &pool, now).await.unwrap();
    let events = report.iter().find(|t| t.table == EVENTS_TABLE).unwrap();
    let due: Vec<_> = before.iter().filter(|(v, n)| closed(v) && **n > 1).collect();
    assert_eq!(events.partitions, due.len() as u64, "{report:?}");
    assert_eq!(events.files_removed, due.iter().map(|(_, n)| **n as u64).sum::<u64>(), "{report:?}");
    assert!(events.logs_removed > 0, "{report:?}");

    let after = files(&lake).await;
    assert_eq!(after.keys().collect::<Vec<_>>(), before.keys().collect::<Vec<_>>(), "the same hours");
    for (values, n) in &after {
        let want = if closed(values) { 1 } else { before[values] };
        assert_eq!(*n, want, "files of {values:?}");
    }
    assert_eq!(events.files, after.values().sum::<usize>() as u64);
    assert_eq!(
        parquet_files_on_disk(&dir.path().join(EVENTS_TABLE)),
        events.files as usize,
        "the replaced files are gone from the disk"
    );
    let table = lake.open(EVENTS_TABLE).await.unwrap().unwrap();
    let kept = lake::committed_offsets(&table, &topic, [Partition(0), Partition(1)]).await.unwrap();
    assert_eq!(kept, offsets, "the ingest's offsets survive compaction and the log's clean-up");

    // A full run over the compacted lake reconciles it with Kafka and
    // publishes exactly what it published before.
    assert!(matches!(recompute::run(&full).await.unwrap(), RunOutcome::Published { .. }));
    assert_tables_match(&schema_rows(&pool, "batch").await, &published, "after compaction");

    // Nothing left to do; new data goes on as before.
    let again = maintain::maintain(&config, &pool, now).await.unwrap();
    assert!(again.iter().all(|t| t.partitions == 0 && t.files_removed == 0), "{again:?}");
    generator::run(Args { backfill_hours: 1, ..Args::for_tests(stack.brokers(), &topic, 82) }).await.unwrap();
    ingest::run(ingest, CancellationToken::new()).await.unwrap();
    let incremental = RunConfig::new(url.clone(), lake.clone(), topic.clone());
    assert!(matches!(recompute::run(&incremental).await.unwrap(), RunOutcome::Published { .. }));
}
