//! Raw Kafka records → one Arrow [`RecordBatch`] plus per-record rejections.
//!
//! Each record is parsed once by [`Event::parse`]; valid ones are handed to
//! `arrow-json`'s decoder as typed rows, so the batch is built by Arrow's own
//! JSON machinery against [`events_schema`] and cannot drift from it.
//! Rejections keep the record's position so the caller can forward the
//! original bytes to the DLQ.

use arrow::array::RecordBatch;
use arrow::error::ArrowError;
use arrow::json::reader::{Decoder, ReaderBuilder};
use chrono::{DateTime, Datelike, NaiveDate, Timelike, Utc};
use serde::Serialize;

use crate::dedup::{Judging, Verdict};
use crate::event::{Event, RejectReason, Rejection};
use crate::schema::events_schema;

fn duplicate(e: &Event<'_>, first_time: i64) -> Rejection {
    let first = DateTime::from_timestamp_micros(first_time)
        .map_or_else(|| first_time.to_string(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
    Rejection::new(
        RejectReason::DuplicateEvent,
        Some("event_id"),
        format!(
            "event_id {:?} was already delivered in this partition (event_time {first}); that copy counts",
            e.event_id
        ),
    )
}

/// One record as read from Kafka.
#[derive(Debug, Clone, Copy)]
pub struct RawRecord<'a> {
    pub partition: i32,
    pub offset: i64,
    /// The record's Kafka timestamp (create or log-append time): what its
    /// `event_time` is judged against (see [`kafka_time`]).
    pub timestamp: Option<DateTime<Utc>>,
    pub payload: &'a [u8],
}

/// A Kafka record timestamp (milliseconds since the epoch, as librdkafka
/// reports it) as a time; `None` when the record has none or it is out of
/// range. A record without a timestamp is never judged to lie in the future.
pub fn kafka_time(millis: Option<i64>) -> Option<DateTime<Utc>> {
    millis.filter(|m| *m >= 0).and_then(DateTime::from_timestamp_millis)
}

/// A record that did not decode, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedRecord {
    /// Position in the input slice.
    pub index: usize,
    pub partition: i32,
    pub offset: i64,
    pub rejection: Rejection,
}

/// The result of decoding one batch of records.
#[derive(Debug)]
pub struct Decoded {
    /// Valid events in input order, in [`events_schema`].
    pub batch: RecordBatch,
    pub rejected: Vec<RejectedRecord>,
    /// What the valid events say about the contract: their schema versions
    /// and the fields it does not know, each with its number of events.
    pub shape: Shape,
}

/// Per schema version and per unknown field name, how many valid events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shape {
    pub versions: std::collections::BTreeMap<i32, u64>,
    pub unknown_fields: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Arrow refused rows that validation accepted: a bug, never bad input.
    #[error("building the Arrow batch failed: {0}")]
    Arrow(#[from] ArrowError),
}

/// Reusable decoder; keeps `arrow-json`'s buffers between batches.
pub struct EventDecoder {
    decoder: Decoder,
}

impl std::fmt::Debug for EventDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventDecoder").finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct LakeRow<'r> {
    event_id: &'r str,
    event_type: &'static str,
    event_time: i64,
    user_id: &'r str,
    session_id: &'r str,
    product_id: &'r str,
    quantity: Option<i32>,
    price_cents: Option<i64>,
    schema_version: i32,
    kafka_partition: i32,
    kafka_offset: i64,
    #[serde(serialize_with = "serialize_date")]
    event_date: NaiveDate,
    event_hour: i32,
    extra: Option<&'r str>,
}

fn serialize_date<S: serde::Serializer>(d: &NaiveDate, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(d)
}

impl<'r> LakeRow<'r> {
    fn new(e: &'r Event<'r>, partition: i32, offset: i64) -> Self {
        Self {
            event_id: &e.event_id,
            event_type: e.event_type.as_str(),
            event_time: e.event_time.timestamp_micros(),
            user_id: &e.user_id,
            session_id: &e.session_id,
            product_id: &e.product_id,
            quantity: e.quantity,
            price_cents: e.price_cents,
            schema_version: e.schema_version,
            kafka_partition: partition,
            kafka_offset: offset,
            event_date: e.event_time.date_naive(),
            event_hour: i32::try_from(e.event_time.hour()).unwrap_or_default(),
            extra: e.extra.as_deref(),
        }
    }
}

impl Default for EventDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl EventDecoder {
    pub fn new() -> Self {
        let decoder = ReaderBuilder::new(events_schema())
            .build_decoder()
            .expect("the events schema is a valid arrow-json schema");
        Self { decoder }
    }

    /// Decodes `records`, judging each event time against its record's
    /// Kafka timestamp, not the reader's clock: the lake and the speed layer
    /// reject the same records, and a retried flush reaches the same verdict.
    /// No record is judged a duplicate: see [`EventDecoder::decode_judged`].
    pub fn decode(&mut self, records: &[RawRecord<'_>]) -> Result<Decoded, DecodeError> {
        self.decode_inner(records, None)
    }

    /// Decodes `records` like [`EventDecoder::decode`], and rejects each
    /// valid event that `judging` finds a duplicate of an earlier one
    /// ([`RejectReason::DuplicateEvent`]). Records of a partition must come
    /// in offset order, following what `judging`'s history holds.
    pub fn decode_judged(
        &mut self,
        records: &[RawRecord<'_>],
        judging: &mut Judging<'_>,
    ) -> Result<Decoded, DecodeError> {
        self.decode_inner(records, Some(judging))
    }

    fn decode_inner(
        &mut self,
        records: &[RawRecord<'_>],
        mut judging: Option<&mut Judging<'_>>,
    ) -> Result<Decoded, DecodeError> {
        let mut events = Vec::with_capacity(records.len());
        let mut rejected = Vec::new();
        for (index, r) in records.iter().enumerate() {
            let verdict = Event::parse(r.payload, r.timestamp.unwrap_or(DateTime::<Utc>::MAX_UTC)).and_then(|e| {
                let Some(judging) = judging.as_deref_mut() else { return Ok(e) };
                match judging.judge(r.partition, &e.event_id, e.event_time.timestamp_micros()) {
                    Verdict::Duplicate { first_time } => Err(duplicate(&e, first_time)),
                    Verdict::First | Verdict::BeyondWindow => Ok(e),
                }
            });
            match verdict {
                Ok(e) => events.push((e, r.partition, r.offset)),
                Err(rejection) => {
                    rejected.push(RejectedRecord { index, partition: r.partition, offset: r.offset, rejection })
                }
            }
        }
        let mut shape = Shape::default();
        for (e, _, _) in &events {
            *shape.versions.entry(e.schema_version).or_default() += 1;
            for f in &e.unknown_fields {
                *shape.unknown_fields.entry(f.to_string()).or_default() += 1;
            }
        }
        let rows: Vec<LakeRow<'_>> = events.iter().map(|(e, p, o)| LakeRow::new(e, *p, *o)).collect();
        self.decoder.serialize(&rows)?;
        let batch = match self.decoder.flush()? {
            Some(batch) => batch,
            None => RecordBatch::new_empty(events_schema()),
        };
        Ok(Decoded { batch, rejected, shape })
    }
}

/// The `event_date` partition value of a time (`YYYY-MM-DD`, UTC).
pub fn event_date(t: DateTime<Utc>) -> String {
    let d = t.date_naive();
    format!("{:04}-{:02}-{:02}", d.year(), d.month(), d.day())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Int32Type, Int64Type, TimestampMicrosecondType};
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 24, 14, 0, 0).unwrap()
    }

    fn event(kind: &str, user: &str, t: &str, extra: &str) -> String {
        format!(
            r#"{{"event_id":"e-{user}-{t}","event_type":"{kind}","event_time":"{t}","user_id":"{user}","session_id":"s1","product_id":"p-1"{extra}}}"#
        )
    }

    #[test]
    fn valid_events_decode_into_the_events_schema_with_exact_values() {
        let a = event("purchase", "u-1", "2026-11-24T13:05:12.345Z", r#","quantity":2,"price_cents":1999"#);
        let b = event("page_view", "u-2", "2026-11-23T23:59:59Z", "");
        let bad = "{oops".to_string();
        let records = [
            RawRecord { partition: 3, offset: 10, timestamp: Some(now()), payload: a.as_bytes() },
            RawRecord { partition: 3, offset: 11, timestamp: Some(now()), payload: bad.as_bytes() },
            RawRecord { partition: 1, offset: 7, timestamp: Some(now()), payload: b.as_bytes() },
        ];
        let out = EventDecoder::new().decode(&records).unwrap();
        let batch = &out.batch;
        assert_eq!(batch.schema(), events_schema());
        assert_eq!(batch.num_rows(), 2);
        let s = |name: &str| batch.column_by_name(name).unwrap().as_string::<i32>().clone();
        assert_eq!(s("user_id").value(0), "u-1");
        assert_eq!(s("event_type").value(1), "page_view");
        assert_eq!(s("event_date").value(0), "2026-11-24");
        assert_eq!(s("event_date").value(1), "2026-11-23");
        let hour = batch.column_by_name("event_hour").unwrap().as_primitive::<Int32Type>();
        assert_eq!((hour.value(0), hour.value(1)), (13, 23));
        let t = batch.column_by_name("event_time").unwrap().as_primitive::<TimestampMicrosecondType>();
        let expected = Utc.with_ymd_and_hms(2026, 11, 24, 13, 5, 12).unwrap().timestamp_micros() + 345_000;
        assert_eq!(t.value(0), expected);
        let q = batch.column_by_name("quantity").unwrap().as_primitive::<Int32Type>();
        assert_eq!(q.value(0), 2);
        assert!(q.is_null(1), "page_view without quantity stores null");
        let price = batch.column_by_name("price_cents").unwrap().as_primitive::<Int64Type>();
        assert_eq!(price.value(0), 1999);
        let p = batch.column_by_name("kafka_partition").unwrap().as_primitive::<Int32Type>();
        let o = batch.column_by_name("kafka_offset").unwrap().as_primitive::<Int64Type>();
        assert_eq!((p.value(0), o.value(0), p.value(1), o.value(1)), (3, 10, 1, 7));
        assert_eq!(out.rejected.len(), 1);
        let r = &out.rejected[0];
        assert_eq!((r.index, r.partition, r.offset, r.rejection.reason), (1, 3, 11, RejectReason::NotJson));
    }

    #[test]
    fn an_all_rejected_batch_is_empty_not_an_error() {
        let records = [RawRecord { partition: 0, offset: 0, timestamp: None, payload: b"\xff" }];
        let out = EventDecoder::new().decode(&records).unwrap();
        assert_eq!(out.batch.num_rows(), 0);
        assert_eq!(out.batch.schema(), events_schema());
        assert_eq!(out.rejected[0].rejection.reason, RejectReason::NotUtf8);
    }

    #[test]
    fn decoder_is_reusable_across_batches() {
        let mut d = EventDecoder::new();
        for i in 0..3 {
            let a = event("page_view", &format!("u-{i}"), "2026-11-24T10:00:00Z", "");
            let out = d
                .decode(&[RawRecord { partition: 0, offset: i, timestamp: Some(now()), payload: a.as_bytes() }])
                .unwrap();
            assert_eq!(out.batch.num_rows(), 1);
            assert_eq!(out.batch.column_by_name("user_id").unwrap().as_string::<i32>().value(0), format!("u-{i}"));
        }
    }

    #[test]
    fn the_future_is_judged_by_each_record_timestamp() {
        let ahead = event("page_view", "u-1", "2026-11-24T15:00:00Z", "");
        let at = |timestamp| RawRecord { partition: 0, offset: 0, timestamp, payload: ahead.as_bytes() };
        let mut d = EventDecoder::new();
        // An hour after the record's timestamp: rejected, whoever reads it when.
        let out = d.decode(&[at(Some(now()))]).unwrap();
        assert_eq!(out.rejected.len(), 1);
        assert_eq!(out.rejected[0].rejection.reason, RejectReason::FutureEventTime);
        // Produced an hour later: the same bytes are fine.
        let later = now() + chrono::TimeDelta::hours(1);
        assert_eq!(d.decode(&[at(Some(later))]).unwrap().batch.num_rows(), 1);
        // No timestamp: never judged future.
        assert_eq!(d.decode(&[at(None)]).unwrap().batch.num_rows(), 1);
        assert_eq!(kafka_time(None), None);
        assert_eq!(kafka_time(Some(-1)), None);
        assert_eq!(kafka_time(Some(now().timestamp_millis())), Some(now()));
    }

    #[test]
    fn event_date_is_zero_padded_utc() {
        assert_eq!(event_date(Utc.with_ymd_and_hms(2026, 1, 2, 23, 0, 0).unwrap()), "2026-01-02");
    }

    proptest! {
        /// Every record either lands in the batch or in `rejected`, never both,
        /// never neither, and nothing panics, whatever the bytes.
        #[test]
        fn every_record_is_accounted_for(
            payloads in proptest::collection::vec(
                prop_oneof![
                    proptest::collection::vec(any::<u8>(), 0..200),
                    (0u32..1000).prop_map(|i| event("add_to_cart", &format!("u{i}"), "2026-11-24T12:00:00Z", r#","quantity":1,"price_cents":5"#).into_bytes()),
                ],
                0..40,
            )
        ) {
            let records: Vec<_> = payloads.iter().enumerate()
                .map(|(i, p)| RawRecord { partition: 0, offset: i as i64, timestamp: Some(now()), payload: p })
                .collect();
            let out = EventDecoder::new().decode(&records).unwrap();
            prop_assert_eq!(out.batch.num_rows() + out.rejected.len(), records.len());
            let offsets = out.batch.column_by_name("kafka_offset").unwrap().as_primitive::<Int64Type>();
            for r in &out.rejected {
                prop_assert!(!offsets.values().contains(&r.offset));
            }
        }
    }

    #[test]
    fn a_second_copy_is_rejected_as_a_duplicate_and_the_first_counts() {
        let e = event("page_view", "u1", "2026-11-24T13:00:00Z", "");
        let other = event("page_view", "u2", "2026-11-24T13:00:00Z", "");
        let records: Vec<RawRecord<'_>> = [(0, &e), (0, &other), (0, &e), (1, &e)]
            .iter()
            .enumerate()
            .map(|(i, (p, payload))| RawRecord {
                partition: *p,
                offset: i as i64,
                timestamp: Some(now()),
                payload: payload.as_bytes(),
            })
            .collect();
        let history = crate::dedup::History::new(crate::dedup::DEFAULT_WINDOW_MICROS);
        let mut judging = history.judging();
        let out = EventDecoder::new().decode_judged(&records, &mut judging).unwrap();
        assert_eq!(out.batch.num_rows(), 3, "the copy in partition 1 is another partition's event");
        assert_eq!(out.rejected.len(), 1);
        let r = &out.rejected[0];
        assert_eq!((r.index, r.offset, r.rejection.reason), (2, 2, RejectReason::DuplicateEvent));
        assert_eq!(judging.finish().added(), 3);
        // Without judging, nothing is a duplicate.
        assert_eq!(EventDecoder::new().decode(&records).unwrap().batch.num_rows(), 4);
    }
}
