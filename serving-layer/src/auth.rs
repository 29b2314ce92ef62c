//! Who may read what on the serving edge: API keys with a scope
//! (`recommendations` for recommender clients, `dashboard` for dashboard
//! viewers), a session cookie for the dashboard page, and a rate limit per
//! key.
//!
//! - A key is `lk_<key id>_<64 hex digits>` (256 random bits), printed once
//!   by `serving-layer keys create`; `ops.api_keys` keeps its SHA-256 only.
//!   `serve` fetches a key's hash by id through `serving.api_key()` (its
//!   reader roles cannot list keys), caches it for [`CACHE_TTL`] (so a
//!   revocation takes effect within that) and compares in constant time.
//! - Requests carry `Authorization: Bearer <key>`; none gives 401, a key of
//!   the other scope 403, more than the key's rate 429.
//! - The dashboard page signs in with a dashboard key (`POST /session`)
//!   and then holds a session cookie: HttpOnly, Secure, SameSite=Strict,
//!   signed with HMAC-SHA256 (`SERVING_SESSION_SECRET`, else a random secret
//!   per process), naming the key, so revoking the key ends the session.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

/// How long a checked key is trusted before it is read again.
pub const CACHE_TTL: Duration = Duration::from_secs(10);
/// How long a dashboard session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// The session cookie's name.
pub const SESSION_COOKIE: &str = "lambda_session";

/// What a key may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Recommendations,
    Dashboard,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Recommendations => "recommendations",
            Self::Dashboard => "dashboard",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "recommendations" => Some(Self::Recommendations),
            "dashboard" => Some(Self::Dashboard),
            _ => None,
        }
    }
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No credentials: 401.
    Missing,
    /// A key or session that is not (or no longer) valid: 401.
    Invalid,
    /// A valid key of another scope: 403.
    Scope { has: Scope, needs: Scope },
    /// Over the key's rate: 429.
    RateLimited,
    /// Keys cannot be checked (the database is down and the key is not
    /// cached): 503.
    Unavailable,
}

/// A key as `keys create` returns it (the only time it is shown).
#[derive(Debug)]
pub struct NewKey {
    pub key_id: i64,
    pub key: String,
}

/// A key as `keys list` shows it (never the secret).
#[derive(Debug, sqlx::FromRow)]
pub struct KeyInfo {
    pub key_id: i64,
    pub name: String,
    pub scope: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub revoked_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Creates a key (run as the schema owner, which owns `ops.api_keys`).
pub async fn create_key(pool: &PgPool, name: &str, scope: Scope) -> Result<NewKey, sqlx::Error> {
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let secret = platform::hex::encode(&secret);
    let mut tx = pool.begin().await?;
    let key_id: i64 = sqlx::query_scalar("SELECT nextval(pg_get_serial_sequence('ops.api_keys', 'key_id'))")
        .fetch_one(&mut *tx)
        .await?;
    let key = format!("lk_{key_id}_{secret}");
    sqlx::query("INSERT INTO ops.api_keys (key_id, name, scope, secret_hash) VALUES ($1, $2, $3, $4)")
        .bind(key_id)
        .bind(name)
        .bind(scope.as_str())
        .bind(digest(&key).as_slice())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(NewKey { key_id, key })
}

/// Revokes key `key_id`; false when there is no such active key.
pub async fn revoke_key(pool: &PgPool, key_id: i64) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("UPDATE ops.api_keys SET revoked_at = now() WHERE key_id = $1 AND revoked_at IS NULL")
        .bind(key_id)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn list_keys(pool: &PgPool) -> Result<Vec<KeyInfo>, sqlx::Error> {
    sqlx::query_as("SELECT key_id, name, scope, created_at, revoked_at FROM ops.api_keys ORDER BY key_id")
        .fetch_all(pool)
        .await
}

/// `lk_<id>_<secret>` → the id.
fn key_id(key: &str) -> Option<i64> {
    let rest = key.strip_prefix("lk_")?;
    let (id, secret) = rest.split_once('_')?;
    (secret.len() == 64).then_some(())?;
    id.parse().ok()
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Equal in time independent of where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Clone)]
struct Cached {
    /// `None`: no such active key.
    key: Option<(Scope, [u8; 32])>,
    at: Instant,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The key checks, the rate limiter and the session signer `serve` shares
/// across requests.
#[derive(Clone)]
pub struct Keys {
    pool: PgPool,
    cache: Arc<Mutex<HashMap<i64, Cached>>>,
    buckets: Arc<Mutex<HashMap<i64, Bucket>>>,
    /// Requests per second per key (and the burst).
    rate: f64,
    session_secret: Arc<Vec<u8>>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").field("rate", &self.rate).finish_non_exhaustive()
    }
}

impl Keys {
    /// Keys read through `pool`; `session_secret` signs session cookies
    /// (random when `None`: sessions then end with the process).
    pub fn new(pool: PgPool, rate: f64, session_secret: Option<&str>) -> Self {
        let secret = match session_secret {
            Some(s) => s.as_bytes().to_vec(),
            None => {
                let mut s = vec![0u8; 32];
                rand::rng().fill_bytes(&mut s);
                s
            }
        };
        Self {
            pool,
            cache: Arc::default(),
            buckets: Arc::default(),
            rate: rate.max(0.001),
            session_secret: Arc::new(secret),
        }
    }

    /// The scope of key `id`, from the cache or the database. While the
    /// database is away, a key checked before stays valid (recommendations
    /// keep falling back to the popular list for the clients that had them).
    async fn lookup(&self, id: i64) -> Result<Option<(Scope, [u8; 32])>, Refusal> {
        let cached = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&id).cloned();
        if let Some(c) = &cached
            && c.at.elapsed() < CACHE_TTL
        {
            return Ok(c.key);
        }
        let row: Option<(Option<String>, Option<Vec<u8>>)> =
            match sqlx::query_as("SELECT scope, secret_hash FROM serving.api_key($1)")
                .bind(id)
                .fetch_optional(&self.pool)
                .await
            {
                Ok(row) => row,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot check an API key");
                    return cached.map(|c| c.key).ok_or(Refusal::Unavailable);
                }
            };
        let key = match row {
            Some((Some(scope), Some(hash))) => Scope::parse(&scope).zip(<[u8; 32]>::try_from(hash).ok()),
            _ => None,
        };
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(id, Cached { key, at: Instant::now() });
        Ok(key)
    }

    /// The key's id and scope when `key` is a valid, unrevoked key.
    pub async fn check_key(&self, key: &str) -> Result<(i64, Scope), Refusal> {
        let id = key_id(key).ok_or(Refusal::Invalid)?;
        match self.lookup(id).await? {
            Some((scope, hash)) if constant_time_eq(&hash, &digest(key)) => Ok((id, scope)),
            _ => Err(Refusal::Invalid),
        }
    }

    /// Checks credentials against the scope `needs`, then the key's rate.
    pub async fn authorize(&self, bearer: Option<&str>, session: Option<&str>, needs: Scope) -> Result<i64, Refusal> {
        let (id, has) = match (bearer, session) {
            (Some(key), _) => self.check_key(key).await?,
            (None, Some(cookie)) => {
                let id = self.session_key(cookie, chrono::Utc::now().timestamp()).ok_or(Refusal::Invalid)?;
                let (scope, _) = self.lookup(id).await?.ok_or(Refusal::Invalid)?;
                (id, scope)
            }
            (None, None) => return Err(Refusal::Missing),
        };
        if has != needs {
            return Err(Refusal::Scope { has, needs });
        }
        if !self.take_token(id) {
            return Err(Refusal::RateLimited);
        }
        Ok(id)
    }

    /// Token bucket per key: `rate` tokens per second, at most `rate` held.
    fn take_token(&self, id: i64) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let b = buckets.entry(id).or_insert(Bucket { tokens: self.rate, at: now });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * self.rate).min(self.rate.max(1.0));
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// A session cookie value for key `id`: `<id>.<expiry>.<hex HMAC>`.
    pub fn session_for(&self, id: i64, now: i64) -> String {
        let expires = now + SESSION_TTL.as_secs() as i64;
        format!("{id}.{expires}.{}", platform::hex::encode(&self.session_mac(id, expires).finalize().into_bytes()))
    }

    /// The key id of a valid, unexpired session cookie.
    pub fn session_key(&self, cookie: &str, now: i64) -> Option<i64> {
        let mut parts = cookie.splitn(3, '.');
        let id: i64 = parts.next()?.parse().ok()?;
        let expires: i64 = parts.next()?.parse().ok()?;
        let sig = parts.next()?;
        let sig = platform::hex::decode(sig)?;
        (expires > now && self.session_mac(id, expires).verify_slice(&sig).is_ok()).then_some(id)
    }

    fn session_mac(&self, id: i64, expires: i64) -> Hmac<Sha256> {
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(&self.session_secret).unwrap_or_else(|_| unreachable!());
        mac.update(format!("session.{id}.{expires}").as_bytes());
        mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        let pool = sqlx::postgres::PgPoolOptions::new().connect_lazy("postgres://nobody@127.0.0.1:9/none").unwrap();
        Keys::new(pool, 2.0, Some("a-session-secret-for-tests"))
    }

    #[test]
    fn key_ids_parse_only_from_well_formed_keys() {
        let secret = "ab".repeat(32);
        assert_eq!(key_id(&format!("lk_17_{secret}")), Some(17));
        for bad in ["", "lk_17", "lk_x_ab", &format!("lk_17_{}", "ab".repeat(31)), &format!("xx_17_{secret}")] {
            assert_eq!(key_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn constant_time_comparison_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[tokio::test]
    async fn sessions_verify_until_they_expire_and_only_with_the_secret() {
        let k = keys();
        let cookie = k.session_for(5, 1_000);
        assert_eq!(k.session_key(&cookie, 1_001), Some(5));
        assert_eq!(k.session_key(&cookie, 1_000 + SESSION_TTL.as_secs() as i64), None, "expired");
        let forged = cookie.replacen("5.", "6.", 1);
        assert_eq!(k.session_key(&forged, 1_001), None, "another key id");
        let other = Keys::new(k.pool.clone(), 2.0, Some("another-session-secret"));
        assert_eq!(other.session_key(&cookie, 1_001), None, "another secret");
        assert_eq!(k.session_key("garbage", 1_001), None);
    }

    #[tokio::test]
    async fn the_bucket_allows_the_rate_then_refuses() {
        let k = keys();
        assert!(k.take_token(1) && k.take_token(1));
        assert!(!k.take_token(1), "a burst of the rate (2) only");
        assert!(k.take_token(2), "per key");
    }
}
