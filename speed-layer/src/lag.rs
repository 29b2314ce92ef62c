//! Per-partition lag, as operators read it: how many records of the topic
//! the speed layer has not folded into `speed.*` yet (the broker's high
//! watermark minus the next offset stored in PostgreSQL), and how old the
//! newest event folded in is. The watermarks also go to
//! `ops.speed_offsets.end_offset`, where `serving.freshness` reads the lag.

use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub(crate) use platform::kafka::{metadata_client, topic_ends};

/// Publishes `speed_partition_lag_records{partition}` and
/// `speed_event_age_seconds` every `every` until `shutdown`.
pub async fn watch(brokers: String, topic: String, pool: PgPool, every: Duration, shutdown: CancellationToken) {
    let Some(consumer) = metadata_client(&brokers, "lag metrics") else { return };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let Ok(stored) = crate::offsets::standings(&pool).await else {
            continue; // PostgreSQL away: the flush loop reports it
        };
        if let Some(newest) = stored.iter().filter_map(|s| s.last_event_time).max() {
            metrics::gauge!("speed_event_age_seconds").set((Utc::now() - newest).num_milliseconds() as f64 / 1000.0);
        }
        let ends = topic_ends(&consumer, &topic).await;
        for (p, high) in ends {
            let next = stored.iter().find(|s| s.partition == p).map_or(0, |s| s.next_offset);
            metrics::gauge!("speed_partition_lag_records", "partition" => p.to_string())
                .set((high - next).max(0) as f64);
            // Best effort: a failed write is retried at the next tick.
            let _ = sqlx::query("UPDATE ops.speed_offsets SET end_offset = $2 WHERE kafka_partition = $1")
                .bind(p)
                .bind(high)
                .execute(&pool)
                .await;
        }
    }
}
