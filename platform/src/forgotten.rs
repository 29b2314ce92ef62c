//! Forgotten users (GDPR right to erasure): the keyed hash that stands for
//! a user id, and the set of forgotten hashes every writer filters by.
//!
//! `batch-layer forget-user` deletes a user everywhere and records
//! HMAC-SHA256(`FORGET_KEY`, user_id) in `ops.forgotten_users`, never the
//! id. The lake ingest and the speed layer load that set and drop every
//! later event whose user hashes into it, so a forgotten user never comes
//! back through Kafka. A plain SHA-256 of an id would be reversible by
//! hashing every plausible id; the key makes the hash useless without it.
//!
//! Fail closed: a process that finds forgotten users but has no key, or a
//! different key than the one that hashed them, refuses to run rather than
//! let those users back in.
//!
//! No write resurrects a user. The set has a version
//! (`ops.forgotten_set`), bumped by [`record_forgotten`] in the transaction
//! that adds the hashes, under the exclusive [`FORGET_FENCE`]. Every
//! PostgreSQL writer checks, inside its own commit, that the set has not
//! changed since it filtered ([`still_at`], which takes the
//! fence shared): a write that filtered with the old set either commits
//! before the request (and the request's deletes remove it) or sees the new
//! version and filters again. The lake ingest, whose commits are Delta
//! commits, holds [`LAKE_FENCE`] shared around each flush, and
//! `forget-user` holds it exclusively from recording the request until the
//! lake is rewritten.

use std::collections::HashSet;

use arrow::array::{Array, AsArray, BooleanArray, RecordBatch};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use sqlx::PgPool;

/// Shortest accepted key: a short secret makes the hashes guessable.
pub const MIN_KEY_LEN: usize = 16;

/// Label whose HMAC identifies a key without revealing it.
const KEY_ID_LABEL: &[u8] = b"lambda-platform forget key id";

#[derive(Debug, thiserror::Error)]
pub enum ForgetError {
    #[error(
        "FORGET_KEY is not set: give the secret that hashes forgotten user ids (--forget-key or FORGET_KEY, at least {MIN_KEY_LEN} characters)"
    )]
    NoKey,
    #[error("FORGET_KEY is too short ({0} characters): use at least {MIN_KEY_LEN}, e.g. `openssl rand -hex 32`")]
    ShortKey(usize),
    #[error(
        "ops.forgotten_users lists {0} forgotten users but this process has no FORGET_KEY: set the key `batch-layer forget-user` used, or forgotten users would come back"
    )]
    KeyMissing(usize),
    #[error(
        "FORGET_KEY differs from the key that hashed {0} forgotten users (key id {1}): set the key `batch-layer forget-user` used"
    )]
    KeyMismatch(usize, String),
    #[error("loading forgotten users from ops.forgotten_users: {0}")]
    Sql(#[from] sqlx::Error),
}

/// The secret that hashes user ids. Its `Debug` never shows it.
#[derive(Clone)]
pub struct ForgetKey(Vec<u8>);

impl std::fmt::Debug for ForgetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ForgetKey(id {})", self.id())
    }
}

impl ForgetKey {
    /// A key from its secret text; at least [`MIN_KEY_LEN`] characters.
    pub fn new(secret: &str) -> Result<Self, ForgetError> {
        let secret = secret.trim();
        if secret.is_empty() {
            return Err(ForgetError::NoKey);
        }
        if secret.chars().count() < MIN_KEY_LEN {
            return Err(ForgetError::ShortKey(secret.chars().count()));
        }
        Ok(Self(secret.as_bytes().to_vec()))
    }

    /// A key from an optional flag or variable: `None` or empty is no key.
    pub fn optional(secret: Option<&str>) -> Result<Option<Self>, ForgetError> {
        match secret.map(str::trim).filter(|s| !s.is_empty()) {
            None => Ok(None),
            Some(s) => Self::new(s).map(Some),
        }
    }

    fn mac(&self, data: &[u8]) -> String {
        // HMAC takes keys of any length, so this cannot fail.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!());
        mac.update(data);
        crate::hex::encode(&mac.finalize().into_bytes())
    }

    /// HMAC-SHA256 of the user id, in lowercase hex.
    pub fn hash(&self, user_id: &str) -> String {
        self.mac(user_id.as_bytes())
    }

    /// Identifies the key (the first 8 bytes of the HMAC of a fixed label).
    pub fn id(&self) -> String {
        self.mac(KEY_ID_LABEL)[..16].to_string()
    }
}

/// Advisory lock every PostgreSQL writer takes shared inside its commit and
/// `forget-user` exclusively while it adds users to the set.
pub const FORGET_FENCE: i64 = 0x6c61_6d62_6461_4647;

/// Advisory lock the lake ingest holds shared around each flush, and
/// `forget-user` exclusively while it rewrites the lake.
pub const LAKE_FENCE: i64 = 0x6c61_6d62_6461_4c46;

/// The forgotten users as a writer sees them: hashes, the key to test ids
/// against them, and the set's version when they were read.
#[derive(Debug, Clone, Default)]
pub struct Forgotten {
    key: Option<ForgetKey>,
    hashes: HashSet<String>,
    version: i64,
}

impl Forgotten {
    /// Loads every forgotten hash. Errors when there are some but `key` is
    /// missing or is not the key that made them.
    pub async fn load<'c, E>(conn: E, key: Option<&ForgetKey>) -> Result<Self, ForgetError>
    where
        E: sqlx::Acquire<'c, Database = sqlx::Postgres>,
    {
        let mut conn = conn.acquire().await?;
        // The version first: a request landing between the two reads makes
        // the hashes newer than the version, never older (the next check
        // reloads once more).
        let version = current_version(&mut conn).await?;
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT user_hash, key_id FROM ops.forgotten_users").fetch_all(&mut *conn).await?;
        let mut set = Self::from_rows(rows, key)?;
        set.version = version;
        Ok(set)
    }

    fn from_rows(rows: Vec<(String, String)>, key: Option<&ForgetKey>) -> Result<Self, ForgetError> {
        if rows.is_empty() {
            return Ok(Self { key: key.cloned(), hashes: HashSet::new(), version: 0 });
        }
        let Some(key) = key else {
            return Err(ForgetError::KeyMissing(rows.len()));
        };
        let id = key.id();
        if let Some((_, other)) = rows.iter().find(|(_, k)| *k != id) {
            return Err(ForgetError::KeyMismatch(rows.len(), other.clone()));
        }
        Ok(Self { key: Some(key.clone()), hashes: rows.into_iter().map(|(h, _)| h).collect(), version: 0 })
    }

    /// The set's version when it was read.
    pub fn version(&self) -> i64 {
        self.version
    }

    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Whether `user_id` is forgotten.
    pub fn contains(&self, user_id: &str) -> bool {
        match &self.key {
            Some(key) if !self.hashes.is_empty() => self.hashes.contains(&key.hash(user_id)),
            _ => false,
        }
    }

    /// Drops the rows of `batch` whose `user_id` is forgotten; returns the
    /// rows kept and how many were dropped. Without forgotten users the
    /// batch comes back untouched (no hashing).
    pub fn filter_events(&self, batch: RecordBatch) -> Result<(RecordBatch, usize), arrow::error::ArrowError> {
        if self.is_empty() || batch.num_rows() == 0 {
            return Ok((batch, 0));
        }
        let Some(users) = batch.column_by_name("user_id") else {
            return Ok((batch, 0));
        };
        let users = arrow::compute::cast(users, &arrow::datatypes::DataType::Utf8)?;
        let users = users.as_string::<i32>();
        let keep: BooleanArray =
            (0..users.len()).map(|i| Some(users.is_null(i) || !self.contains(users.value(i)))).collect();
        let dropped = keep.false_count();
        if dropped == 0 {
            return Ok((batch, 0));
        }
        Ok((arrow::compute::filter_record_batch(&batch, &keep)?, dropped))
    }

    /// Whether a rejected record belongs to a forgotten user, judged by its
    /// Kafka key (the user id by contract) and any user id in its bytes.
    pub fn rejected_is_forgotten(&self, key: Option<&[u8]>, payload: &[u8]) -> bool {
        !self.is_empty() && rejected_user_ids(key, payload).iter().any(|u| self.contains(u))
    }
}

/// [`LAKE_FENCE`] held shared on a connection of its own: by the lake
/// ingest around a flush, by an export until it is registered. Dropped
/// without [`LakeFence::release`] (a failed flush), the connection closes,
/// and with it the lock.
pub struct LakeFence(sqlx::pool::PoolConnection<sqlx::Postgres>);

impl LakeFence {
    /// Waits while `forget-user` holds the fence exclusively, then holds it.
    pub async fn shared(pool: &PgPool) -> Result<Self, sqlx::Error> {
        let mut conn = pool.acquire().await?;
        conn.close_on_drop();
        sqlx::query("SELECT pg_advisory_lock_shared($1)").bind(LAKE_FENCE).execute(&mut *conn).await?;
        Ok(Self(conn))
    }

    /// The fence's connection, for reads made while it is held.
    pub fn conn(&mut self) -> &mut sqlx::PgConnection {
        &mut self.0
    }

    pub async fn release(mut self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT pg_advisory_unlock_shared($1)").bind(LAKE_FENCE).execute(&mut *self.0).await?;
        Ok(())
    }
}

/// Inside a writer's transaction, just before it commits: takes the forget
/// fence shared for the rest of the transaction (a request being recorded
/// finishes first; the next waits for this commit) and says whether the set
/// is still at `version`, the [`Forgotten::version`] this writer filtered
/// with (the speed layer commits one micro-batch while it filters the
/// next). When it is not, the writer must roll back, reload and filter
/// again.
pub async fn still_at(tx: &mut sqlx::PgConnection, version: i64) -> Result<bool, sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1)").bind(FORGET_FENCE).execute(&mut *tx).await?;
    Ok(current_version(tx).await? == version)
}

/// The set's version now.
pub async fn current_version(conn: &mut sqlx::PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT version FROM ops.forgotten_set").fetch_one(conn).await
}

/// Adds `hashes` (made with `key`) to the set in one transaction under the
/// exclusive forget fence, bumping its version: from the commit on, every
/// writer's check fails until it reloads. Returns the new version and, per
/// hash, how many times it has been requested.
pub async fn record_forgotten(
    pool: &PgPool,
    key: &ForgetKey,
    hashes: &[String],
) -> Result<(i64, Vec<(String, i32)>), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(FORGET_FENCE).execute(&mut *tx).await?;
    let version: i64 = sqlx::query_scalar("UPDATE ops.forgotten_set SET version = version + 1 RETURNING version")
        .fetch_one(&mut *tx)
        .await?;
    let requests: Vec<(String, i32)> = sqlx::query_as(
        "INSERT INTO ops.forgotten_users (user_hash, key_id, set_version)
         SELECT h, $2, $3 FROM unnest($1::text[]) AS h
         ON CONFLICT (user_hash) DO UPDATE SET requests = ops.forgotten_users.requests + 1,
             last_requested_at = now(), completed_at = NULL, verified = NULL
         RETURNING user_hash, requests",
    )
    .bind(hashes)
    .bind(key.id())
    .bind(version)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((version, requests))
}

/// Finds which of a set of user ids a record's bytes mention, in one pass
/// however many ids there are: a mention is the id as a JSON string (a
/// quoted run of bytes equal to it), which also catches bytes that no
/// longer parse.
#[derive(Debug, Clone)]
pub struct Mentions {
    plain: HashSet<Vec<u8>>,
    /// Ids with a quote or a backslash, whose JSON form is escaped: looked
    /// for one by one.
    escaped: Vec<(String, Vec<u8>)>,
}

impl Mentions {
    pub fn new<'a>(ids: impl IntoIterator<Item = &'a str>) -> Self {
        let mut plain = HashSet::new();
        let mut escaped = Vec::new();
        for id in ids {
            if id.contains(['"', '\\']) {
                escaped.push((id.to_string(), serde_json::to_string(id).unwrap_or_default().into_bytes()));
            } else {
                plain.insert(id.as_bytes().to_vec());
            }
        }
        Self { plain, escaped }
    }

    /// The ids `key` is or `payload` quotes (each once).
    pub fn in_record(&self, key: Option<&[u8]>, payload: &[u8]) -> Vec<String> {
        let mut found: Vec<String> = Vec::new();
        let mut add = |id: &[u8]| {
            if let Ok(id) = std::str::from_utf8(id)
                && !found.iter().any(|f| f == id)
            {
                found.push(id.to_string());
            }
        };
        if let Some(k) = key
            && self.plain.contains(k)
        {
            add(k);
        }
        // The bytes between every quote and the next one: each quoted run,
        // however the quotes pair up.
        let quotes: Vec<usize> = payload.iter().enumerate().filter(|(_, b)| **b == b'"').map(|(i, _)| i).collect();
        for pair in quotes.windows(2) {
            let run = &payload[pair[0] + 1..pair[1]];
            if self.plain.contains(run) {
                add(run);
            }
        }
        for (id, quoted) in &self.escaped {
            if key == Some(id.as_bytes()) || payload.windows(quoted.len()).any(|w| w == quoted.as_slice()) {
                add(id.as_bytes());
            }
        }
        found
    }
}

/// The user ids a rejected record may carry: its Kafka key, and the
/// `user_id` string in its bytes, even when they are not valid JSON.
pub fn rejected_user_ids(key: Option<&[u8]>, payload: &[u8]) -> Vec<String> {
    let mut ids = Vec::new();
    if let Some(k) = key.and_then(|k| std::str::from_utf8(k).ok()) {
        ids.push(k.to_string());
    }
    if let Ok(serde_json::Value::Object(o)) = serde_json::from_slice::<serde_json::Value>(payload) {
        if let Some(serde_json::Value::String(u)) = o.get("user_id") {
            ids.push(u.clone());
        }
        return ids;
    }
    // Not JSON (truncated, wrong encoding): take the string after each
    // `"user_id"` the bytes still hold.
    let text = String::from_utf8_lossy(payload);
    let mut rest = text.as_ref();
    while let Some(at) = rest.find("\"user_id\"") {
        rest = &rest[at + "\"user_id\"".len()..];
        let value = rest.trim_start().strip_prefix(':').map(str::trim_start).and_then(|v| v.strip_prefix('"'));
        if let Some(v) = value
            && let Some(end) = v.find('"')
        {
            ids.push(v[..end].to_string());
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::StringArray;
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn key() -> ForgetKey {
        ForgetKey::new("0123456789abcdef-test").unwrap()
    }

    #[test]
    fn hashes_are_keyed_hex_and_stable() {
        let k = key();
        assert_eq!(k.hash("u-1").len(), 64);
        assert_eq!(k.hash("u-1"), key().hash("u-1"));
        assert_ne!(k.hash("u-1"), k.hash("u-2"));
        let other = ForgetKey::new("another-secret-of-16").unwrap();
        assert_ne!(k.hash("u-1"), other.hash("u-1"));
        assert_ne!(k.id(), other.id());
        assert!(!format!("{k:?}").contains("0123456789"), "Debug must not show the secret");
    }

    #[test]
    fn keys_must_be_long_enough() {
        assert!(matches!(ForgetKey::new(""), Err(ForgetError::NoKey)));
        assert!(matches!(ForgetKey::new("short"), Err(ForgetError::ShortKey(5))));
        assert!(ForgetKey::optional(Some("  ")).unwrap().is_none());
    }

    #[test]
    fn loading_fails_closed_without_the_right_key() {
        let k = key();
        let rows = vec![(k.hash("u-1"), k.id())];
        assert!(matches!(Forgotten::from_rows(rows.clone(), None), Err(ForgetError::KeyMissing(1))));
        let other = ForgetKey::new("another-secret-of-16").unwrap();
        assert!(matches!(Forgotten::from_rows(rows.clone(), Some(&other)), Err(ForgetError::KeyMismatch(1, _))));
        assert!(Forgotten::from_rows(Vec::new(), None).unwrap().is_empty());
        let f = Forgotten::from_rows(rows, Some(&k)).unwrap();
        assert!(f.contains("u-1") && !f.contains("u-2"));
    }

    #[test]
    fn events_of_forgotten_users_are_dropped() {
        let k = key();
        let f = Forgotten::from_rows(vec![(k.hash("u-2"), k.id())], Some(&k)).unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("user_id", DataType::Utf8, false)]));
        let batch =
            RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(vec!["u-1", "u-2", "u-3", "u-2"]))]).unwrap();
        let (kept, dropped) = f.filter_events(batch).unwrap();
        assert_eq!(dropped, 2);
        let users = kept.column(0).as_string::<i32>();
        assert_eq!(users.iter().flatten().collect::<Vec<_>>(), ["u-1", "u-3"]);
    }

    #[test]
    fn rejected_records_reveal_their_user_by_key_or_bytes() {
        assert_eq!(rejected_user_ids(Some(b"u-1"), b"not json"), ["u-1"]);
        assert_eq!(rejected_user_ids(None, br#"{"user_id":"u-7","quantity":-1}"#), ["u-7"]);
        assert_eq!(rejected_user_ids(None, br#"{"event_id":"x", "user_id" : "u-8", "quan"#), ["u-8"]);
        assert!(rejected_user_ids(None, b"\xff\xfe").is_empty());
        let k = key();
        let f = Forgotten::from_rows(vec![(k.hash("u-8"), k.id())], Some(&k)).unwrap();
        assert!(f.rejected_is_forgotten(None, br#"{"user_id": "u-8""#));
        assert!(!f.rejected_is_forgotten(Some(b"u-9"), b"{}"));
    }

    #[test]
    fn mentions_find_every_quoted_id_in_one_pass() {
        let m = Mentions::new(["u-1", "u-2", "u\"odd", "u-10"]);
        assert_eq!(m.in_record(Some(b"u-2"), br#"{"user_id":"u-1","session_id":"s-u-1"}"#), ["u-2", "u-1"]);
        // Truncated bytes, a stray quote before the id, and a prefix that is not the id.
        assert_eq!(m.in_record(None, br#"x"a","u-10","u-1"#), ["u-10"]);
        assert_eq!(m.in_record(None, br#"{"note":"u-1x", "u-1"}"#), ["u-1"]);
        assert_eq!(m.in_record(None, br#"{"user_id":"u\"odd"}"#), ["u\"odd"]);
        assert!(m.in_record(Some(b"u-3"), b"u-1 u-2").is_empty(), "unquoted text is no mention");
    }
}
