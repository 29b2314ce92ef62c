//! Malformed records of every kind the event contract rejects, each with the
//! reason it must be rejected for. The generator mixes them into traffic
//! (`--bad-fraction`); tests send them through the pipeline and check that
//! each one arrives in the DLQ with exactly this reason.

use chrono::{DateTime, TimeDelta, Utc};
use rand::Rng;
use shared_schema::RejectReason;
use shared_schema::event::{MAX_NESTING, MAX_RECORD_BYTES};

/// One kind of bad record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadKind {
    pub name: &'static str,
    pub reason: RejectReason,
}

macro_rules! kinds {
    ($($name:literal => $reason:ident),* $(,)?) => {
        /// Every kind, in a fixed order.
        pub const KINDS: &[BadKind] = &[$(BadKind { name: $name, reason: RejectReason::$reason }),*];
    };
}

kinds! {
    "truncated_json" => NotJson,
    "not_json" => NotJson,
    "empty" => NotJson,
    "raw_control_character" => NotJson,
    "json_array" => NotObject,
    "json_number" => NotObject,
    "invalid_utf8" => NotUtf8,
    "oversized" => Oversized,
    "deep_nesting" => TooDeep,
    "duplicate_field" => DuplicateField,
    "missing_user_id" => MissingField,
    "null_event_time" => MissingField,
    "purchase_without_quantity" => MissingField,
    "user_id_number" => WrongType,
    "quantity_string" => WrongType,
    "price_fraction" => WrongType,
    "unknown_event_type" => UnknownEventType,
    "bad_timestamp" => InvalidTimestamp,
    "far_future_time" => FutureEventTime,
    "negative_quantity" => InvalidValue,
    "huge_quantity" => InvalidValue,
    "negative_price" => InvalidValue,
    "control_character_in_id" => InvalidValue,
    "empty_product_id" => InvalidValue,
}

fn base(now: DateTime<Utc>, n: u64) -> serde_json::Map<String, serde_json::Value> {
    let v = serde_json::json!({
        "event_id": format!("bad-{n}"),
        "event_type": "purchase",
        "event_time": (now - TimeDelta::seconds(30)).to_rfc3339(),
        "user_id": format!("u-bad-{}", n % 50),
        "session_id": "s-bad",
        "product_id": "p-00001",
        "quantity": 1,
        "price_cents": 999,
        "schema_version": 1,
    });
    match v {
        serde_json::Value::Object(m) => m,
        _ => unreachable!("literal object"),
    }
}

fn with(now: DateTime<Utc>, n: u64, key: &str, value: serde_json::Value) -> Vec<u8> {
    let mut m = base(now, n);
    m.insert(key.into(), value);
    serde_json::Value::Object(m).to_string().into_bytes()
}

fn without(now: DateTime<Utc>, n: u64, key: &str) -> Vec<u8> {
    let mut m = base(now, n);
    m.remove(key);
    serde_json::Value::Object(m).to_string().into_bytes()
}

/// The bytes of bad record `n` of `kind`, relative to `now`.
pub fn make(kind: &BadKind, now: DateTime<Utc>, n: u64) -> Vec<u8> {
    use serde_json::json;
    let good = || serde_json::Value::Object(base(now, n)).to_string();
    match kind.name {
        "truncated_json" => {
            let g = good();
            g.as_bytes()[..g.len() / 2].to_vec()
        }
        "not_json" => b"GET /index.html HTTP/1.1".to_vec(),
        "empty" => Vec::new(),
        "raw_control_character" => good().replacen("u-bad", "u-\u{7}bad", 1).into_bytes(),
        "json_array" => format!("[{}]", good()).into_bytes(),
        "json_number" => b"12345".to_vec(),
        "invalid_utf8" => {
            let mut b = good().into_bytes();
            let at = b.iter().position(|c| *c == b'u').unwrap_or(0);
            b[at] = 0xff;
            b
        }
        "oversized" => with(now, n, "padding", json!("x".repeat(MAX_RECORD_BYTES))),
        "deep_nesting" => {
            let depth = MAX_NESTING + 8;
            let nested = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
            good().replacen('{', &format!("{{\"extra\":{nested},"), 1).into_bytes()
        }
        "duplicate_field" => good().replacen('{', "{\"user_id\":\"u-dup\",", 1).into_bytes(),
        "missing_user_id" => without(now, n, "user_id"),
        "null_event_time" => with(now, n, "event_time", serde_json::Value::Null),
        "purchase_without_quantity" => without(now, n, "quantity"),
        "user_id_number" => with(now, n, "user_id", json!(1042)),
        "quantity_string" => with(now, n, "quantity", json!("2")),
        "price_fraction" => with(now, n, "price_cents", json!(19.99)),
        "unknown_event_type" => with(now, n, "event_type", json!("refund")),
        "bad_timestamp" => with(now, n, "event_time", json!("last tuesday")),
        "far_future_time" => with(now, n, "event_time", json!((now + TimeDelta::days(400)).to_rfc3339())),
        "negative_quantity" => with(now, n, "quantity", json!(-2)),
        "huge_quantity" => good().replacen("\"quantity\":1", "\"quantity\":99999999999999999999999", 1).into_bytes(),
        "negative_price" => with(now, n, "price_cents", json!(-500)),
        "control_character_in_id" => with(now, n, "user_id", json!("u-\u{0}-x")),
        "empty_product_id" => with(now, n, "product_id", json!("")),
        other => unreachable!("bad kind {other} has no maker"),
    }
}

/// A random bad record.
pub fn random(now: DateTime<Utc>, n: u64, rng: &mut impl Rng) -> (&'static BadKind, Vec<u8>) {
    let kind = &KINDS[rng.random_range(0..KINDS.len())];
    (kind, make(kind, now, n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_schema::Event;

    #[test]
    fn every_bad_kind_is_rejected_for_its_reason() {
        let now = Utc::now();
        for (i, kind) in KINDS.iter().enumerate() {
            let bytes = make(kind, now, i as u64);
            match Event::parse(&bytes, now) {
                Ok(_) => panic!("{} was accepted", kind.name),
                Err(r) => assert_eq!(r.reason, kind.reason, "{}: {r}", kind.name),
            }
        }
    }

    #[test]
    fn every_reject_reason_has_a_bad_kind() {
        for reason in RejectReason::PARSE {
            assert!(KINDS.iter().any(|k| k.reason == reason), "no bad record exercises {reason}");
        }
    }
}
