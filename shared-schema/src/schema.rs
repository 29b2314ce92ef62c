//! Arrow schemas of the lake.
//!
//! The `events` Delta table holds the event columns, where each record came
//! from in Kafka (`kafka_partition`, `kafka_offset`) and the two partition
//! columns (`event_date`, `event_hour`), derived from `event_time` in UTC.

use std::sync::{Arc, LazyLock};

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

/// Column names, so no layer spells one differently.
pub mod col {
    pub const EVENT_ID: &str = "event_id";
    pub const EVENT_TYPE: &str = "event_type";
    pub const EVENT_TIME: &str = "event_time";
    pub const USER_ID: &str = "user_id";
    pub const SESSION_ID: &str = "session_id";
    pub const PRODUCT_ID: &str = "product_id";
    pub const QUANTITY: &str = "quantity";
    pub const PRICE_CENTS: &str = "price_cents";
    pub const SCHEMA_VERSION: &str = "schema_version";
    pub const KAFKA_PARTITION: &str = "kafka_partition";
    pub const KAFKA_OFFSET: &str = "kafka_offset";
    pub const EVENT_DATE: &str = "event_date";
    pub const EVENT_HOUR: &str = "event_hour";
    /// The fields the contract does not know, as one JSON object (or NULL).
    pub const EXTRA: &str = "extra";
}

/// The lake's partition columns, in order.
pub const PARTITION_COLUMNS: [&str; 2] = [col::EVENT_DATE, col::EVENT_HOUR];

/// An hour of event time (UTC, truncated to the hour): the grain of the
/// hourly views and of the lake's partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hour(chrono::DateTime<chrono::Utc>);

impl Hour {
    /// The hour `t` falls in.
    pub fn of(t: chrono::DateTime<chrono::Utc>) -> Self {
        use chrono::{DurationRound, TimeDelta};
        Self(t.duration_trunc(TimeDelta::hours(1)).unwrap_or(t))
    }

    pub fn start(self) -> chrono::DateTime<chrono::Utc> {
        self.0
    }

    /// The hour after this one.
    pub fn next(self) -> Self {
        Self(self.0 + chrono::TimeDelta::hours(1))
    }

    /// Sorted, distinct `hours` as runs of consecutive hours, each as its
    /// first and last hour.
    pub fn runs(hours: &[Hour]) -> Vec<(Hour, Hour)> {
        let mut sorted = hours.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut runs: Vec<(Hour, Hour)> = Vec::new();
        for h in sorted {
            match runs.last_mut() {
                Some((_, last)) if last.next() == h => *last = h,
                _ => runs.push((h, h)),
            }
        }
        runs
    }

    /// The lake partition values of its events: `event_date`
    /// (`YYYY-MM-DD`) and `event_hour` (0-23).
    pub fn partition(self) -> (String, i32) {
        use chrono::Timelike;
        (self.0.format("%Y-%m-%d").to_string(), i32::try_from(self.0.hour()).unwrap_or_default())
    }

    /// The hour of a lake partition, from its values as Delta records them
    /// (`event_date` `YYYY-MM-DD`, `event_hour` `0`-`23`): the inverse of
    /// [`Hour::partition`]; `None` when they do not read as one.
    pub fn from_partition(date: &str, hour: &str) -> Option<Self> {
        let day = chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d").ok()?;
        Some(Self(day.and_hms_opt(hour.parse().ok()?, 0, 0)?.and_utc()))
    }
}

/// `event_time` and every hour key: microseconds, UTC.
pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

static EVENTS: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new(col::EVENT_ID, DataType::Utf8, false),
        Field::new(col::EVENT_TYPE, DataType::Utf8, false),
        Field::new(col::EVENT_TIME, timestamp_type(), false),
        Field::new(col::USER_ID, DataType::Utf8, false),
        Field::new(col::SESSION_ID, DataType::Utf8, false),
        Field::new(col::PRODUCT_ID, DataType::Utf8, false),
        Field::new(col::QUANTITY, DataType::Int32, true),
        Field::new(col::PRICE_CENTS, DataType::Int64, true),
        Field::new(col::SCHEMA_VERSION, DataType::Int32, false),
        Field::new(col::KAFKA_PARTITION, DataType::Int32, false),
        Field::new(col::KAFKA_OFFSET, DataType::Int64, false),
        Field::new(col::EVENT_DATE, DataType::Utf8, false),
        Field::new(col::EVENT_HOUR, DataType::Int32, false),
        Field::new(col::EXTRA, DataType::Utf8, true),
    ]))
});

/// Schema of the `events` table and of every decoded batch.
pub fn events_schema() -> SchemaRef {
    Arc::clone(&EVENTS)
}

static CATALOG: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("product_id", DataType::Utf8, false),
        Field::new("name", DataType::Utf8, true),
        Field::new("category", DataType::Utf8, true),
        Field::new("price_cents", DataType::Int64, true),
        Field::new("updated_at", timestamp_type(), true),
    ]))
});

/// Columns of the product catalog: the lake's `products` table and
/// `batch.products`, which views over the catalog read as `p`.
pub fn catalog_schema() -> SchemaRef {
    Arc::clone(&CATALOG)
}

/// Column names of the `events_rejected` table.
pub mod rejected_col {
    pub const KAFKA_PARTITION: &str = "kafka_partition";
    pub const KAFKA_OFFSET: &str = "kafka_offset";
    pub const KAFKA_KEY: &str = "kafka_key";
    pub const PAYLOAD: &str = "payload";
    pub const REASON: &str = "reason";
    pub const FIELD: &str = "field";
    pub const DETAIL: &str = "detail";
    pub const REJECTED_AT: &str = "rejected_at";
    pub const REJECTED_DATE: &str = "rejected_date";
}

static REJECTED: LazyLock<SchemaRef> = LazyLock::new(|| {
    use rejected_col::*;
    Arc::new(Schema::new(vec![
        Field::new(KAFKA_PARTITION, DataType::Int32, false),
        Field::new(KAFKA_OFFSET, DataType::Int64, false),
        Field::new(KAFKA_KEY, DataType::Binary, true),
        Field::new(PAYLOAD, DataType::Binary, false),
        Field::new(REASON, DataType::Utf8, false),
        Field::new(FIELD, DataType::Utf8, true),
        Field::new(DETAIL, DataType::Utf8, false),
        Field::new(REJECTED_AT, timestamp_type(), false),
        Field::new(REJECTED_DATE, DataType::Utf8, false),
    ]))
});

/// Schema of the lake's `events_rejected` table: the original bytes of every
/// rejected record, where it came from, and why (`reason` is a
/// [`crate::RejectReason`] name). Partitioned by `rejected_date`.
pub fn rejected_schema() -> SchemaRef {
    Arc::clone(&REJECTED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_hour_truncates_and_names_its_lake_partition() {
        let t = chrono::DateTime::parse_from_rfc3339("2026-11-24T23:59:59.999Z").unwrap().to_utc();
        let h = Hour::of(t);
        assert_eq!(h.start().to_rfc3339(), "2026-11-24T23:00:00+00:00");
        assert_eq!(h.partition(), ("2026-11-24".to_string(), 23));
        assert_eq!(Hour::from_partition("2026-11-24", "23"), Some(h));
        assert_eq!(
            Hour::from_partition("2027-01-15", "7").map(Hour::start).map(|t| t.to_rfc3339()).as_deref(),
            Some("2027-01-15T07:00:00+00:00")
        );
        assert_eq!(Hour::from_partition("bad", "7"), None);
        assert_eq!(Hour::from_partition("2026-11-24", "24"), None);
        assert_eq!(Hour::of(h.start()), h);
    }
}
