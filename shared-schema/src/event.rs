//! The click event of topic `events` and the one place it is validated.
//!
//! A record is parsed exactly once, at the edge, into either an [`Event`] or
//! a [`Rejection`]; nothing past the decoder re-checks a field. The rules are
//! the event contract of `DESIGN.md`:
//!
//! * required: `event_id`, `event_type`, `event_time`, `user_id`,
//!   `session_id`, `product_id`; `quantity` and `price_cents` too, except
//!   for `page_view`, which may omit both;
//! * `schema_version` is optional (default 1) and must be ≥ 1 when present;
//! * unknown extra fields are ignored, so additive schema changes pass;
//! * everything else that is wrong rejects the record with a
//!   machine-readable [`RejectReason`] and, where one is to blame, the field.

use std::borrow::Cow;
use std::fmt;

use chrono::{DateTime, TimeDelta, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Largest record accepted, in bytes. Events are a few hundred bytes; the
/// limit keeps one hostile record from costing real memory or time.
pub const MAX_RECORD_BYTES: usize = 16 * 1024;

/// Longest identifier (`event_id`, `user_id`, `session_id`, `product_id`):
/// the one rule of [`crate::ids`].
pub const MAX_ID_BYTES: usize = crate::ids::MAX_ID_BYTES;

/// How far in the future an `event_time` may lie (clock skew allowance).
pub const MAX_FUTURE_SKEW: TimeDelta = TimeDelta::minutes(5);

/// Deepest nesting of arrays and objects accepted anywhere in a record.
/// Events are flat; the limit keeps hostile nesting from costing stack.
pub const MAX_NESTING: usize = 32;

/// Largest `quantity` of one line. Together with [`MAX_PRICE_CENTS`] it
/// bounds one event's revenue to 10^12 cents, so sums over billions of
/// events stay far from `i64` overflow.
pub const MAX_QUANTITY: i64 = 10_000;

/// Largest unit price (one million currency units).
pub const MAX_PRICE_CENTS: i64 = 100_000_000;

/// The four things a shopper does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    PageView,
    AddToCart,
    RemoveFromCart,
    Purchase,
}

impl EventType {
    pub const ALL: [EventType; 4] =
        [EventType::PageView, EventType::AddToCart, EventType::RemoveFromCart, EventType::Purchase];

    /// The wire name, as in the JSON and in every table.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::PageView => "page_view",
            EventType::AddToCart => "add_to_cart",
            EventType::RemoveFromCart => "remove_from_cart",
            EventType::Purchase => "purchase",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A valid event. Identifiers borrow from the raw record where they can, so
/// decoding a batch copies each byte once, into Arrow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<'a> {
    pub event_id: Cow<'a, str>,
    pub event_type: EventType,
    pub event_time: DateTime<Utc>,
    pub user_id: Cow<'a, str>,
    pub session_id: Cow<'a, str>,
    pub product_id: Cow<'a, str>,
    /// `None` only for a `page_view` that omitted it.
    pub quantity: Option<i32>,
    /// Unit price; `None` only for a `page_view` that omitted it.
    pub price_cents: Option<i64>,
    pub schema_version: i32,
    /// Names of the fields the contract does not know (counted by the
    /// ingest, which notifies new ones).
    pub unknown_fields: Vec<Cow<'a, str>>,
    /// Those fields as one compact JSON object (`{"coupon_code":"X"}`), as
    /// sent, so the lake keeps what a later view may want; `None` when
    /// there are none.
    pub extra: Option<String>,
}

/// Why a record was rejected. The string form ([`RejectReason::as_str`]) is
/// the machine-readable reason carried to the DLQ and `events_rejected`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Larger than [`MAX_RECORD_BYTES`].
    Oversized,
    /// The bytes are not UTF-8.
    NotUtf8,
    /// The bytes are not JSON (syntax error, truncated, control characters).
    NotJson,
    /// Valid JSON, but not an object.
    NotObject,
    /// Nested deeper than the parser allows.
    TooDeep,
    /// The same field twice in one object.
    DuplicateField,
    /// A required field is absent or `null`.
    MissingField,
    /// A field has the wrong JSON type (a number where a string belongs, a
    /// fraction where an integer belongs, ...).
    WrongType,
    /// `event_type` is not one of the four known types.
    UnknownEventType,
    /// `event_time` is not an RFC 3339 timestamp or lies before 1970.
    InvalidTimestamp,
    /// `event_time` lies more than [`MAX_FUTURE_SKEW`] in the future.
    FutureEventTime,
    /// A number out of range, or an identifier empty, too long or holding
    /// control characters.
    InvalidValue,
    /// A valid event whose `event_id` an earlier record of the same
    /// partition already carried, within the deduplication window: the
    /// earlier copy counts (see [`crate::dedup`]). Never given by
    /// [`Event::parse`]: it depends on the records before.
    DuplicateEvent,
}

impl RejectReason {
    /// Every reason [`Event::parse`] gives: a property of the record alone.
    pub const PARSE: [RejectReason; 12] = [
        RejectReason::Oversized,
        RejectReason::NotUtf8,
        RejectReason::NotJson,
        RejectReason::NotObject,
        RejectReason::TooDeep,
        RejectReason::DuplicateField,
        RejectReason::MissingField,
        RejectReason::WrongType,
        RejectReason::UnknownEventType,
        RejectReason::InvalidTimestamp,
        RejectReason::FutureEventTime,
        RejectReason::InvalidValue,
    ];

    /// Every reason, [`RejectReason::DuplicateEvent`] included.
    pub const ALL: [RejectReason; 13] = {
        let mut all = [RejectReason::DuplicateEvent; 13];
        let mut i = 0;
        while i < Self::PARSE.len() {
            all[i] = Self::PARSE[i];
            i += 1;
        }
        all
    };

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Oversized => "oversized",
            RejectReason::NotUtf8 => "not_utf8",
            RejectReason::NotJson => "not_json",
            RejectReason::NotObject => "not_object",
            RejectReason::TooDeep => "too_deep",
            RejectReason::DuplicateField => "duplicate_field",
            RejectReason::MissingField => "missing_field",
            RejectReason::WrongType => "wrong_type",
            RejectReason::UnknownEventType => "unknown_event_type",
            RejectReason::InvalidTimestamp => "invalid_timestamp",
            RejectReason::FutureEventTime => "future_event_time",
            RejectReason::InvalidValue => "invalid_value",
            RejectReason::DuplicateEvent => "duplicate_event_id",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected record: the reason, the field to blame (if one is), and a
/// human-readable detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: RejectReason,
    pub field: Option<&'static str>,
    pub detail: String,
}

impl Rejection {
    pub(crate) fn new(reason: RejectReason, field: Option<&'static str>, detail: impl Into<String>) -> Self {
        Self { reason, field, detail: detail.into() }
    }

    fn field(reason: RejectReason, field: &'static str, detail: impl Into<String>) -> Self {
        Self::new(reason, Some(field), detail)
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.field {
            Some(field) => write!(f, "{} ({}): {}", self.reason, field, self.detail),
            None => write!(f, "{}: {}", self.reason, self.detail),
        }
    }
}

impl std::error::Error for Rejection {}

/// The record as it arrives: every known field kept as raw JSON text, so
/// each can be checked on its own and a wrong type names its field; the
/// names of the fields the contract does not know, in order. A known field
/// given twice is a data error (`duplicate field`), as serde's derive
/// makes it; `null` counts as absent.
#[derive(Default)]
struct Wire<'a> {
    event_id: Option<&'a RawValue>,
    event_type: Option<&'a RawValue>,
    event_time: Option<&'a RawValue>,
    user_id: Option<&'a RawValue>,
    session_id: Option<&'a RawValue>,
    product_id: Option<&'a RawValue>,
    quantity: Option<&'a RawValue>,
    price_cents: Option<&'a RawValue>,
    schema_version: Option<&'a RawValue>,
    unknown: Vec<(Cow<'a, str>, &'a RawValue)>,
}

/// A key, borrowed from the input when it holds no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for Wire<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Wire<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an event object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<Wire<'de>, M::Error> {
                let mut w = Wire::default();
                let mut seen = [false; 9];
                while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
                    let (slot, i, name) = match key.as_ref() {
                        "event_id" => (&mut w.event_id, 0, "event_id"),
                        "event_type" => (&mut w.event_type, 1, "event_type"),
                        "event_time" => (&mut w.event_time, 2, "event_time"),
                        "user_id" => (&mut w.user_id, 3, "user_id"),
                        "session_id" => (&mut w.session_id, 4, "session_id"),
                        "product_id" => (&mut w.product_id, 5, "product_id"),
                        "quantity" => (&mut w.quantity, 6, "quantity"),
                        "price_cents" => (&mut w.price_cents, 7, "price_cents"),
                        "schema_version" => (&mut w.schema_version, 8, "schema_version"),
                        _ => {
                            let value = map.next_value::<&'de RawValue>()?;
                            w.unknown.push((key, value));
                            continue;
                        }
                    };
                    if std::mem::replace(&mut seen[i], true) {
                        return Err(serde::de::Error::duplicate_field(name));
                    }
                    *slot = map.next_value::<Option<&'de RawValue>>()?;
                }
                Ok(w)
            }
        }
        d.deserialize_map(V)
    }
}

impl<'a> Event<'a> {
    /// Parses one raw record, judging `event_time` against `now`: the
    /// record's Kafka timestamp when decoding a topic (see
    /// [`crate::decode::EventDecoder::decode`]), so every reader reaches the
    /// same verdict whenever it reads. `DateTime::<Utc>::MAX_UTC` judges no
    /// time as future.
    pub fn parse(bytes: &'a [u8], now: DateTime<Utc>) -> Result<Event<'a>, Rejection> {
        use RejectReason::*;
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(Rejection::new(Oversized, None, format!("{} bytes, limit {MAX_RECORD_BYTES}", bytes.len())));
        }
        let text = std::str::from_utf8(bytes)
            .map_err(|e| Rejection::new(NotUtf8, None, format!("invalid UTF-8 at byte {}", e.valid_up_to())))?;
        if nesting_exceeds(text.as_bytes(), MAX_NESTING) {
            return Err(Rejection::new(TooDeep, None, format!("nested deeper than {MAX_NESTING} levels")));
        }
        match text.trim_start().as_bytes().first() {
            Some(b'{') => {}
            None => return Err(Rejection::new(NotJson, None, "empty record")),
            Some(_) => {
                // Tell "valid JSON but not an object" from "not JSON at all".
                return Err(match serde_json::from_str::<serde::de::IgnoredAny>(text) {
                    Ok(_) => Rejection::new(NotObject, None, "top-level value is not an object"),
                    Err(e) => classify_json_error(&e, JsonAt::TopLevel),
                });
            }
        }
        let wire: Wire<'a> = serde_json::from_str(text).map_err(|e| classify_json_error(&e, JsonAt::Object))?;

        let event_type_raw = string_field(wire.event_type, "event_type")?;
        let event_type = EventType::parse(&event_type_raw).ok_or_else(|| {
            Rejection::field(
                UnknownEventType,
                "event_type",
                format!(
                    "{:?} is not one of page_view, add_to_cart, remove_from_cart, purchase",
                    truncate(&event_type_raw)
                ),
            )
        })?;
        let event_id = id_field(wire.event_id, "event_id")?;
        let event_time = time_field(wire.event_time, now)?;
        let user_id = id_field(wire.user_id, "user_id")?;
        let session_id = id_field(wire.session_id, "session_id")?;
        let product_id = id_field(wire.product_id, "product_id")?;

        let optional = event_type == EventType::PageView;
        let quantity = int_field(wire.quantity, "quantity", 1, MAX_QUANTITY, optional)?
            .map(|q| i32::try_from(q).expect("bounded by MAX_QUANTITY"));
        let price_cents = int_field(wire.price_cents, "price_cents", 0, MAX_PRICE_CENTS, optional)?;
        let schema_version = int_field(wire.schema_version, "schema_version", 1, i32::MAX.into(), true)?
            .map_or(1, |v| i32::try_from(v).expect("bounded by i32::MAX"));

        Ok(Event {
            event_id,
            event_type,
            event_time,
            user_id,
            session_id,
            product_id,
            quantity,
            price_cents,
            schema_version,
            extra: extra_json(&wire.unknown),
            unknown_fields: wire.unknown.into_iter().map(|(k, _)| k).collect(),
        })
    }

    /// Revenue of this event in cents: `quantity × price_cents` for a
    /// purchase, zero otherwise.
    pub fn revenue_cents(&self) -> i64 {
        match (self.event_type, self.quantity, self.price_cents) {
            (EventType::Purchase, Some(q), Some(p)) => i64::from(q) * p,
            _ => 0,
        }
    }
}

/// `{"name":value,...}` of the unknown fields, values as sent (compacted by
/// the parser only where they were written with whitespace inside).
fn extra_json(unknown: &[(Cow<'_, str>, &RawValue)]) -> Option<String> {
    if unknown.is_empty() {
        return None;
    }
    let mut out = String::from("{");
    for (i, (key, value)) in unknown.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::to_string(key.as_ref()).unwrap_or_else(|_| "\"\"".into()));
        out.push(':');
        out.push_str(value.get());
    }
    out.push('}');
    Some(out)
}

/// Which parse a JSON error came from: that, and the error's category,
/// decide the reason (serde_json's message text is not a contract).
#[derive(Clone, Copy)]
enum JsonAt {
    /// Any JSON value, to tell "not an object" from "not JSON".
    TopLevel,
    /// The event object (the record starts with `{`).
    Object,
}

fn classify_json_error(e: &serde_json::Error, at: JsonAt) -> Rejection {
    use RejectReason::*;
    use serde_json::error::Category;
    let reason = match (e.classify(), at) {
        // Every known field takes any JSON value and unknown ones are
        // ignored, so inside an object the one data error left is a field
        // given twice.
        (Category::Data, JsonAt::Object) => DuplicateField,
        (Category::Data, JsonAt::TopLevel) => NotObject,
        // Nesting is bounded before parsing ([`MAX_NESTING`] is below
        // serde_json's own limit), so what is left is malformed text.
        (Category::Syntax | Category::Eof | Category::Io, _) => NotJson,
    };
    Rejection::new(reason, None, e.to_string())
}

fn required<'a>(raw: Option<&'a RawValue>, field: &'static str) -> Result<&'a RawValue, Rejection> {
    match raw {
        Some(v) if v.get() != "null" => Ok(v),
        _ => Err(Rejection::field(RejectReason::MissingField, field, "required field is missing or null")),
    }
}

fn string_field<'a>(raw: Option<&'a RawValue>, field: &'static str) -> Result<Cow<'a, str>, Rejection> {
    let raw = required(raw, field)?;
    let s: Cow<'a, str> = serde_json::from_str(raw.get()).map_err(|_| {
        Rejection::field(RejectReason::WrongType, field, format!("expected a string, got {}", truncate(raw.get())))
    })?;
    Ok(s)
}

fn id_field<'a>(raw: Option<&'a RawValue>, field: &'static str) -> Result<Cow<'a, str>, Rejection> {
    let s = string_field(raw, field)?;
    let detail = match crate::ids::check(&s) {
        Ok(()) => return Ok(s),
        Err(crate::ids::InvalidId::Empty) => "empty identifier".to_string(),
        Err(crate::ids::InvalidId::TooLong(n)) => format!("identifier of {n} bytes, limit {MAX_ID_BYTES}"),
        Err(crate::ids::InvalidId::Control) => "identifier holds control characters".to_string(),
    };
    Err(Rejection::field(RejectReason::InvalidValue, field, detail))
}

fn time_field(raw: Option<&RawValue>, now: DateTime<Utc>) -> Result<DateTime<Utc>, Rejection> {
    let s = string_field(raw, "event_time")?;
    let invalid = |detail: String| Rejection::field(RejectReason::InvalidTimestamp, "event_time", detail);
    let t = DateTime::parse_from_rfc3339(&s)
        .map_err(|e| invalid(format!("{:?} is not RFC 3339: {e}", truncate(&s))))?
        .with_timezone(&Utc);
    if t < DateTime::UNIX_EPOCH {
        return Err(invalid(format!("{t} lies before 1970")));
    }
    // Past the largest representable time nothing is in the future.
    if now.checked_add_signed(MAX_FUTURE_SKEW).is_some_and(|limit| t > limit) {
        return Err(Rejection::field(
            RejectReason::FutureEventTime,
            "event_time",
            format!("{t} is more than 5 minutes after the record's timestamp {now}"),
        ));
    }
    Ok(t)
}

fn int_field(
    raw: Option<&RawValue>,
    field: &'static str,
    min: i64,
    max: i64,
    optional: bool,
) -> Result<Option<i64>, Rejection> {
    let raw = match raw {
        Some(v) if v.get() != "null" => v,
        _ if optional => return Ok(None),
        other => return required(other, field).map(|_| None),
    };
    let text = raw.get();
    let wrong_type =
        || Rejection::field(RejectReason::WrongType, field, format!("expected an integer, got {}", truncate(text)));
    let value: i64 = match serde_json::from_str::<serde_json::Number>(text) {
        Ok(n) => match n.as_i64() {
            Some(v) => v,
            // An integer literal too large for i64 is a range problem; a
            // fraction or an exponent is a type problem.
            None if is_integer_literal(text) => {
                if text.starts_with('-') {
                    i64::MIN
                } else {
                    i64::MAX
                }
            }
            None => return Err(wrong_type()),
        },
        Err(_) => return Err(wrong_type()),
    };
    if !(min..=max).contains(&value) {
        return Err(Rejection::field(
            RejectReason::InvalidValue,
            field,
            format!("{} is outside {min}..={max}", truncate(text)),
        ));
    }
    Ok(Some(value))
}

/// Whether arrays/objects nest deeper than `limit`, ignoring brackets inside
/// strings. Malformed input is left for the JSON parser to name.
fn nesting_exceeds(bytes: &[u8], limit: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

fn is_integer_literal(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// Keeps details short: a rejected record may be huge.
fn truncate(s: &str) -> &str {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s;
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 24, 14, 0, 0).unwrap()
    }

    const GOOD: &str = r#"{"event_id":"2b1c6f0e-7d0a-4c55-9a55-5c1f0c7d9e01","event_type":"add_to_cart",
        "event_time":"2026-11-24T13:05:12.345Z","user_id":"u-1042","session_id":"s-88",
        "product_id":"p-317","quantity":1,"price_cents":1999,"schema_version":1}"#;

    fn reject(json: &str) -> Rejection {
        Event::parse(json.as_bytes(), now()).expect_err("should be rejected")
    }

    fn with(field: &str, value: &str) -> String {
        let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(GOOD).unwrap();
        if value == "<absent>" {
            v.remove(field);
        } else {
            v.insert(field.into(), serde_json::from_str(value).unwrap());
        }
        serde_json::to_string(&v).unwrap()
    }

    #[test]
    fn contract_example_parses_to_exact_values() {
        let e = Event::parse(GOOD.as_bytes(), now()).unwrap();
        assert_eq!(e.event_id, "2b1c6f0e-7d0a-4c55-9a55-5c1f0c7d9e01");
        assert_eq!(e.event_type, EventType::AddToCart);
        assert_eq!(e.event_time, Utc.with_ymd_and_hms(2026, 11, 24, 13, 5, 12).unwrap() + TimeDelta::milliseconds(345));
        assert_eq!((e.user_id.as_ref(), e.session_id.as_ref(), e.product_id.as_ref()), ("u-1042", "s-88", "p-317"));
        assert_eq!((e.quantity, e.price_cents, e.schema_version), (Some(1), Some(1999), 1));
        assert_eq!(e.revenue_cents(), 0, "only purchases earn revenue");
    }

    #[test]
    fn purchase_revenue_is_quantity_times_unit_price() {
        let json = with("event_type", r#""purchase""#).replace(r#""quantity":1"#, r#""quantity":3"#);
        let e = Event::parse(json.as_bytes(), now()).unwrap();
        assert_eq!(e.revenue_cents(), 3 * 1999);
    }

    #[test]
    fn page_view_may_omit_quantity_and_price() {
        let json = with("event_type", r#""page_view""#);
        let json = json.replace(r#","quantity":1"#, "").replace(r#","price_cents":1999"#, "");
        let e = Event::parse(json.as_bytes(), now()).unwrap();
        assert_eq!((e.quantity, e.price_cents), (None, None));
    }

    #[test]
    fn unknown_fields_are_ignored_and_version_two_passes() {
        let json = with("coupon", r#"{"code":"X","tiers":[1,2,{"a":null}]}"#);
        let json = json.replace(r#""schema_version":1"#, r#""schema_version":2"#);
        let e = Event::parse(json.as_bytes(), now()).unwrap();
        assert_eq!(e.schema_version, 2);
        assert_eq!(e.unknown_fields, ["coupon"]);
        assert_eq!(e.extra.as_deref(), Some(r#"{"coupon":{"code":"X","tiers":[1,2,{"a":null}]}}"#), "kept as sent");
        let extra: serde_json::Value = serde_json::from_str(e.extra.as_deref().unwrap()).unwrap();
        assert_eq!(extra["coupon"]["tiers"][2], serde_json::json!({"a": null}));
        let plain = Event::parse(GOOD.as_bytes(), now()).unwrap();
        assert!(plain.unknown_fields.is_empty() && plain.extra.is_none());
        // An escaped name is still one name.
        let escaped = GOOD.replacen('{', r#"{"dev\u0069ce":1,"#, 1);
        assert_eq!(Event::parse(escaped.as_bytes(), now()).unwrap().unknown_fields, ["device"]);
    }

    #[test]
    fn a_known_field_twice_is_a_duplicate_even_when_the_first_is_null() {
        let json = GOOD.replacen('{', r#"{"quantity":null,"#, 1);
        assert_eq!(Event::parse(json.as_bytes(), now()).unwrap_err().reason, RejectReason::DuplicateField);
    }

    #[test]
    fn schema_version_defaults_to_one() {
        assert_eq!(Event::parse(with("schema_version", "<absent>").as_bytes(), now()).unwrap().schema_version, 1);
    }

    #[test]
    fn escaped_identifiers_are_decoded() {
        let json = with("user_id", r#""u-\u00e9\"x""#);
        let e = Event::parse(json.as_bytes(), now()).unwrap();
        assert_eq!(e.user_id, "u-é\"x");
    }

    #[test]
    fn every_kind_of_bad_record_is_rejected_with_its_reason() {
        use RejectReason::*;
        let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(MAX_RECORD_BYTES));
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let deep_field = GOOD.replacen('{', &format!(r#"{{"x":{}1{},"#, "[".repeat(200), "]".repeat(200)), 1);
        let cases: Vec<(String, RejectReason, Option<&str>)> = vec![
            (big, Oversized, None),
            ("{\"a\":\"\u{0}\"}".replace('\u{0}', "\u{1}"), NotJson, None),
            (String::new(), NotJson, None),
            ("{\"event_id\":".into(), NotJson, None),
            ("not json at all".into(), NotJson, None),
            ("[1,2,3]".into(), NotObject, None),
            ("42".into(), NotObject, None),
            (deep, TooDeep, None),
            (deep_field, TooDeep, None),
            (GOOD.replacen('{', r#"{"user_id":"a","#, 1), DuplicateField, None),
            (with("user_id", "<absent>"), MissingField, Some("user_id")),
            (with("event_id", "null"), MissingField, Some("event_id")),
            (with("event_type", "<absent>"), MissingField, Some("event_type")),
            (with("event_time", "<absent>"), MissingField, Some("event_time")),
            (with("session_id", "<absent>"), MissingField, Some("session_id")),
            (with("product_id", "<absent>"), MissingField, Some("product_id")),
            (with("quantity", "<absent>"), MissingField, Some("quantity")),
            (with("price_cents", "<absent>"), MissingField, Some("price_cents")),
            (with("user_id", "1042"), WrongType, Some("user_id")),
            (with("product_id", r#"["p-1"]"#), WrongType, Some("product_id")),
            (with("quantity", r#""1""#), WrongType, Some("quantity")),
            (with("price_cents", "19.99"), WrongType, Some("price_cents")),
            (GOOD.replace(r#""price_cents":1999"#, r#""price_cents":1e3"#), WrongType, Some("price_cents")),
            (with("schema_version", "true"), WrongType, Some("schema_version")),
            (with("event_type", r#""refund""#), UnknownEventType, Some("event_type")),
            (with("event_type", r#""PURCHASE""#), UnknownEventType, Some("event_type")),
            (with("event_time", r#""yesterday""#), InvalidTimestamp, Some("event_time")),
            (with("event_time", r#""2026-11-24 13:05:12""#), InvalidTimestamp, Some("event_time")),
            (with("event_time", r#""1969-12-31T23:59:59Z""#), InvalidTimestamp, Some("event_time")),
            (with("event_time", "1732453512"), WrongType, Some("event_time")),
            (with("event_time", r#""2026-11-24T14:05:01Z""#), FutureEventTime, Some("event_time")),
            (with("event_time", r#""9999-12-31T23:59:59Z""#), FutureEventTime, Some("event_time")),
            (with("quantity", "0"), InvalidValue, Some("quantity")),
            (with("quantity", "-3"), InvalidValue, Some("quantity")),
            (GOOD.replace(r#""quantity":1"#, r#""quantity":100000000000000000000"#), InvalidValue, Some("quantity")),
            (with("price_cents", "-1"), InvalidValue, Some("price_cents")),
            (
                GOOD.replace(r#""price_cents":1999"#, r#""price_cents":18446744073709551615"#),
                InvalidValue,
                Some("price_cents"),
            ),
            (with("schema_version", "0"), InvalidValue, Some("schema_version")),
            (with("user_id", r#""""#), InvalidValue, Some("user_id")),
            (with("user_id", &format!("{:?}", "u".repeat(MAX_ID_BYTES + 1))), InvalidValue, Some("user_id")),
            (with("session_id", r#""s\u0000""#), InvalidValue, Some("session_id")),
            (with("product_id", r#""p\n1""#), InvalidValue, Some("product_id")),
        ];
        for (json, reason, field) in cases {
            let r = reject(&json);
            assert_eq!((r.reason, r.field), (reason, field), "for {:.80}: {r}", json);
        }
        let r = Event::parse(b"{\"user_id\":\"\xff\xfe\"}", now()).unwrap_err();
        assert_eq!(r.reason, NotUtf8);
    }

    #[test]
    fn page_view_with_invalid_optional_numbers_is_still_rejected() {
        let json = with("event_type", r#""page_view""#).replace(r#""quantity":1"#, r#""quantity":0"#);
        assert_eq!(reject(&json).reason, RejectReason::InvalidValue);
    }

    #[test]
    fn time_exactly_five_minutes_ahead_is_accepted() {
        let json = with("event_time", r#""2026-11-24T14:05:00Z""#);
        assert!(Event::parse(json.as_bytes(), now()).is_ok());
    }

    #[test]
    fn reasons_round_trip_through_their_names() {
        for r in RejectReason::ALL {
            assert_eq!(RejectReason::parse(r.as_str()), Some(r));
        }
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
        }
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Event::parse(&bytes, now());
        }

        #[test]
        fn mutated_valid_records_never_panic(pos in 0usize..300, byte in any::<u8>()) {
            let mut bytes = GOOD.as_bytes().to_vec();
            let pos = pos % bytes.len();
            bytes[pos] = byte;
            let _ = Event::parse(&bytes, now());
        }

        #[test]
        fn valid_events_round_trip(
            user in "[a-z0-9-]{1,40}",
            product in "p-[0-9]{1,6}",
            qty in 1i64..=MAX_QUANTITY,
            price in 0i64..=MAX_PRICE_CENTS,
            secs in 0i64..86_400 * 365,
            kind in 0usize..4,
        ) {
            let t = now() - TimeDelta::seconds(secs);
            let json = serde_json::json!({
                "event_id": format!("e-{secs}"), "event_type": EventType::ALL[kind].as_str(),
                "event_time": t.to_rfc3339(), "user_id": user, "session_id": "s",
                "product_id": product, "quantity": qty, "price_cents": price,
            }).to_string();
            let e = Event::parse(json.as_bytes(), now()).unwrap();
            prop_assert_eq!(e.user_id.as_ref(), user.as_str());
            prop_assert_eq!(e.product_id.as_ref(), product.as_str());
            prop_assert_eq!(e.quantity, Some(qty as i32));
            prop_assert_eq!(e.price_cents, Some(price));
            prop_assert_eq!(e.event_time, t);
            prop_assert_eq!(e.event_type, EventType::ALL[kind]);
        }
    }
}
