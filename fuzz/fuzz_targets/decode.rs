//! Arbitrary bytes through the event parser and the batch decoder.
//!
//! The input is one Kafka record payload, so the committed corpus files
//! (`integration-tests/corpus/`) seed it as they are. It checks that nothing
//! panics and that every record is either accepted, as an event that meets
//! the contract, or rejected with a reason; and that `EventDecoder` puts each
//! record exactly where `Event::parse` says, with the parsed values in the
//! Arrow batch. The decoder takes no Kafka key (only the DLQ forwards it),
//! so the target has none.

#![no_main]

use std::cell::RefCell;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{Int32Type, Int64Type, TimestampMicrosecondType};
use chrono::{DateTime, TimeZone, Utc};
use libfuzzer_sys::fuzz_target;
use shared_schema::event::{MAX_FUTURE_SKEW, MAX_ID_BYTES, MAX_PRICE_CENTS, MAX_QUANTITY, MAX_RECORD_BYTES};
use shared_schema::schema::col;
use shared_schema::{Event, EventDecoder, EventType, RawRecord, RejectReason};

/// A fixed clock, so a finding replays the same way.
fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 26, 12, 0, 0).unwrap()
}

thread_local! {
    static DECODER: RefCell<EventDecoder> = RefCell::new(EventDecoder::new());
}

const GOOD: &[u8] = br#"{"event_id":"e-1","event_type":"purchase","event_time":"2026-11-26T11:00:00Z","user_id":"u-1","session_id":"s-1","product_id":"p-1","quantity":2,"price_cents":1999}"#;

fuzz_target!(|data: &[u8]| {
    let parsed = Event::parse(data, now());
    assert_eq!(parsed, Event::parse(data, now()), "parsing is deterministic");
    match &parsed {
        Ok(e) => check_event(data, e),
        Err(r) => {
            assert_eq!(RejectReason::parse(r.reason.as_str()), Some(r.reason));
            assert!(!r.to_string().is_empty());
        }
    }

    // The same bytes inside a batch, around a valid record and its halves.
    let (a, b) = data.split_at(data.len() / 2);
    let payloads = [data, GOOD, a, b];
    let records: Vec<_> = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| RawRecord { partition: i as i32, offset: 1_000 + i as i64, timestamp: Some(now()), payload: p })
        .collect();
    // One decoder for the whole run, as a layer keeps one across batches.
    let decoded = DECODER.with_borrow_mut(|d| d.decode(&records)).expect("valid events always build a batch");
    let expected: Vec<_> = payloads.iter().map(|p| Event::parse(p, now())).collect();
    let accepted: Vec<_> = expected.iter().filter_map(|r| r.as_ref().ok()).collect();
    let rejected: Vec<_> = expected.iter().enumerate().filter_map(|(i, r)| r.as_ref().err().map(|r| (i, r))).collect();
    assert_eq!(decoded.batch.num_rows(), accepted.len());
    assert_eq!(decoded.rejected.len(), rejected.len());
    for (got, (index, rejection)) in decoded.rejected.iter().zip(&rejected) {
        assert_eq!((got.index, &got.rejection), (*index, *rejection));
        assert_eq!((got.partition, got.offset), (*index as i32, 1_000 + *index as i64));
    }
    let batch = &decoded.batch;
    let column = |name: &str| batch.column_by_name(name).unwrap_or_else(|| panic!("column {name}"));
    let string = |name: &str, row: usize| column(name).as_string::<i32>().value(row).to_string();
    for (row, e) in accepted.iter().enumerate() {
        assert_eq!(string(col::EVENT_ID, row), e.event_id);
        assert_eq!(string(col::EVENT_TYPE, row), e.event_type.as_str());
        assert_eq!(string(col::USER_ID, row), e.user_id);
        assert_eq!(string(col::SESSION_ID, row), e.session_id);
        assert_eq!(string(col::PRODUCT_ID, row), e.product_id);
        let time = column(col::EVENT_TIME).as_primitive::<TimestampMicrosecondType>().value(row);
        assert_eq!(time, e.event_time.timestamp_micros());
        let quantity = column(col::QUANTITY).as_primitive::<Int32Type>();
        assert_eq!((!quantity.is_null(row)).then(|| quantity.value(row)), e.quantity);
        let price = column(col::PRICE_CENTS).as_primitive::<Int64Type>();
        assert_eq!((!price.is_null(row)).then(|| price.value(row)), e.price_cents);
    }
});

/// What every accepted event guarantees to the code past the decoder.
fn check_event(data: &[u8], e: &Event<'_>) {
    assert!(data.len() <= MAX_RECORD_BYTES);
    assert!(std::str::from_utf8(data).is_ok());
    for id in [&e.event_id, &e.user_id, &e.session_id, &e.product_id] {
        assert!(!id.is_empty() && id.len() <= MAX_ID_BYTES, "identifier {id:?}");
        assert!(!id.chars().any(char::is_control), "identifier {id:?}");
    }
    assert!(e.event_time >= DateTime::UNIX_EPOCH && e.event_time <= now() + MAX_FUTURE_SKEW);
    assert!(e.schema_version >= 1);
    let page_view = e.event_type == EventType::PageView;
    match e.quantity {
        Some(q) => assert!((1..=MAX_QUANTITY).contains(&i64::from(q))),
        None => assert!(page_view, "only a page_view may lack a quantity"),
    }
    match e.price_cents {
        Some(p) => assert!((0..=MAX_PRICE_CENTS).contains(&p)),
        None => assert!(page_view, "only a page_view may lack a price"),
    }
    assert!(e.revenue_cents() >= 0);

    // The event written back as contract JSON parses to the same event.
    let mut v = serde_json::json!({
        "event_id": e.event_id, "event_type": e.event_type.as_str(),
        "event_time": e.event_time.to_rfc3339(), "user_id": e.user_id,
        "session_id": e.session_id, "product_id": e.product_id,
        "schema_version": e.schema_version,
    });
    if let Some(q) = e.quantity {
        v["quantity"] = q.into();
    }
    if let Some(p) = e.price_cents {
        v["price_cents"] = p.into();
    }
    let json = v.to_string();
    let again = Event::parse(json.as_bytes(), now()).unwrap_or_else(|r| panic!("{json} rejected: {r}"));
    assert_eq!(&again, e, "round trip through {json}");
}
