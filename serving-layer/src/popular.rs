//! The popular-products list, held in memory.
//!
//! It is what every recommendation falls back to, so it must not depend on
//! PostgreSQL answering at request time: a background task reloads it from
//! `serving.popular_products` every `--popular-refresh`, and a failed reload
//! keeps the last good list (its age is exported as a metric). Until the
//! first load succeeds there is nothing to fall back to and the process
//! reports itself not ready.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use platform::ops_http::Readiness;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::recommend::Scored;
use crate::telemetry;

/// Products held: enough to pad the largest `k` after removing what a user
/// bought or holds in the cart.
pub const CACHED_PRODUCTS: i64 = 1_000;

/// Longest a reload may take before it counts as failed.
const LOAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a reload failed.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("reading serving.popular_products: {0}")]
    Db(#[from] sqlx::Error),
    #[error("reading serving.popular_products took longer than {0:?}")]
    Timeout(Duration),
}

/// One loaded list, most popular first.
#[derive(Debug)]
pub struct PopularList {
    pub products: Vec<Scored>,
    pub loaded_at: Instant,
}

/// The shared cache; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct PopularCache(Arc<RwLock<Option<Arc<PopularList>>>>);

impl PopularCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// The current list; `None` until the first load succeeded.
    pub fn get(&self) -> Option<Arc<PopularList>> {
        // A poisoned lock only means a writer panicked between two plain
        // stores; the value is still a whole `Option<Arc<_>>`.
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, list: PopularList) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(list));
    }

    /// Time since the list was loaded, if it ever was.
    pub fn age(&self) -> Option<Duration> {
        self.get().map(|l| l.loaded_at.elapsed())
    }

    /// Loads the list from `serving.popular_products` and swaps it in.
    pub async fn reload(&self, pool: &PgPool) -> Result<usize, ReloadError> {
        let query = sqlx::query_as::<_, (String, f64)>(
            "SELECT product_id, score FROM serving.popular_products ORDER BY rank, product_id LIMIT $1",
        )
        .bind(CACHED_PRODUCTS)
        .fetch_all(pool);
        let rows =
            tokio::time::timeout(LOAD_TIMEOUT, query).await.map_err(|_| ReloadError::Timeout(LOAD_TIMEOUT))??;
        let products: Vec<Scored> = rows.into_iter().map(|(product_id, score)| Scored { product_id, score }).collect();
        let n = products.len();
        self.set(PopularList { products, loaded_at: Instant::now() });
        Ok(n)
    }
}

/// Keeps `cache` fresh until `shutdown`: reloads every `every` (sooner,
/// with capped backoff, after a failure), sets `ready` once a list is held,
/// and exports the list's age every second. Logs a failure once, not every
/// retry, and the recovery once.
pub async fn keep_fresh(
    cache: PopularCache,
    pool: PgPool,
    every: Duration,
    ready: Readiness,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_load = Instant::now();
    let mut retry = platform::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if Instant::now() >= next_load {
            match cache.reload(&pool).await {
                Ok(n) => {
                    if failing {
                        tracing::info!(products = n, "popular list reloaded again");
                    }
                    failing = false;
                    retry.reset();
                    next_load = Instant::now() + every;
                    telemetry::popular_products(n);
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "cannot reload the popular list; serving the last one");
                    }
                    failing = true;
                    telemetry::popular_reload_failed();
                    next_load = Instant::now() + retry.next_delay().min(every);
                }
            }
        }
        ready.set(cache.get().is_some());
        if let Some(age) = cache.age() {
            telemetry::popular_age(age);
        }
    }
}
