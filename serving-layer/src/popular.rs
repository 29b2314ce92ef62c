//! The popular-products list, held in memory, and what the recommender
//! knows of new products.
//!
//! It is what every recommendation falls back to, so it must not depend on
//! PostgreSQL answering at request time: a background task reloads it from
//! `serving.popular_products` every `--popular-refresh`, and a failed reload
//! keeps the last good list (its age is exported as a metric). Until the
//! first load succeeds there is nothing to fall back to and the process
//! reports itself not ready.

use std::collections::HashMap;
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
/// How long the new products' priors are reused before they are computed
/// again: they are a statistic of the whole of `serving.item_similarity`,
/// which changes at a similarity refresh (every six hours by default), so
/// computing them at every reload of the popular list (seconds apart)
/// would read all similarity for nothing.
pub const PRIOR_REFRESH: Duration = Duration::from_secs(600);
/// New products held (see [`NewProducts`]), most popular first.
pub const CACHED_NEW_PRODUCTS: i64 = 1_000;
/// New products of one category a user may be offered at once: the most
/// popular ones. They share one prior score, so without a bound a category
/// with many launches would fill the list.
pub const NEW_PER_CATEGORY: usize = 2;

/// Products the last similarity refresh did not see (launched since, every
/// six hours by default), so [`crate::recommend`] cannot reach them through
/// `serving.item_similarity`. Each is taken as similar to every product of
/// its catalog category with that category's *prior*: how similar a
/// product of the category usually is to its closest product of the same
/// category (the median, over the category's products, of their best
/// same-category score; over all products and categories, for a category
/// without such pairs). A strong prior on purpose: a launch is shown to
/// the users of its category until the next refresh measures it, at most
/// [`NEW_PER_CATEGORY`] launches per category at once. A product counts as
/// new when it has demand (it is in `serving.popular_products`, which the
/// speed layer feeds within a second), a catalog category, and no
/// similarity row of its own.
#[derive(Debug, Default)]
pub struct NewProducts {
    /// Per category, its new products, most popular first, at most
    /// [`NEW_PER_CATEGORY`] after the caller's exclusions.
    pub by_category: HashMap<String, Vec<String>>,
    /// The category's prior (see above).
    pub category_prior: HashMap<String, f64>,
    /// The median best score of any product; `None` while similarity is
    /// empty (before the first refresh, when every product would be new).
    pub shop_prior: Option<f64>,
}

impl NewProducts {
    /// The prior similarity of a new product of `category` to each of the
    /// category's products.
    pub fn prior(&self, category: &str) -> Option<f64> {
        self.category_prior.get(category).copied().or(self.shop_prior)
    }
}

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
    pub new_products: NewProducts,
    pub loaded_at: Instant,
    /// When the priors of `new_products` were computed (they are carried
    /// over between, see [`PRIOR_REFRESH`]).
    pub priors_loaded_at: Instant,
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

    /// Loads the list from `serving.popular_products`, with the new
    /// products and (once per [`PRIOR_REFRESH`]) their priors, in one
    /// statement, and swaps it in.
    pub async fn reload(&self, pool: &PgPool) -> Result<usize, ReloadError> {
        let previous = self.get();
        let reused = previous.as_ref().filter(|l| l.priors_loaded_at.elapsed() < PRIOR_REFRESH);
        let query = sqlx::query_as::<_, ReloadRow>(RELOAD_SQL)
            .bind(CACHED_PRODUCTS)
            .bind(CACHED_NEW_PRODUCTS)
            .bind(reused.is_none())
            .fetch_all(pool);
        let rows =
            tokio::time::timeout(LOAD_TIMEOUT, query).await.map_err(|_| ReloadError::Timeout(LOAD_TIMEOUT))??;
        let mut products: Vec<(i64, Scored)> = Vec::new();
        let mut fresh: Vec<(i64, String, String)> = Vec::new();
        let mut new_products = NewProducts::default();
        for (kind, rank, product_id, score, category) in rows {
            match (kind.as_str(), product_id, category) {
                ("popular", Some(product_id), _) => products.push((rank, Scored { product_id, score })),
                ("new", Some(product_id), Some(category)) => fresh.push((rank, category, product_id)),
                ("prior", None, Some(category)) => {
                    new_products.category_prior.insert(category, score);
                }
                ("prior", None, None) => new_products.shop_prior = Some(score),
                _ => {}
            }
        }
        // UNION ALL does not promise order; restore the ranks.
        products.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.product_id.cmp(&b.1.product_id)));
        fresh.sort();
        for (_, category, product_id) in fresh {
            new_products.by_category.entry(category).or_default().push(product_id);
        }
        let priors_loaded_at = match reused {
            Some(l) => {
                new_products.category_prior = l.new_products.category_prior.clone();
                new_products.shop_prior = l.new_products.shop_prior;
                l.priors_loaded_at
            }
            None => Instant::now(),
        };
        let products: Vec<Scored> = products.into_iter().map(|(_, s)| s).collect();
        let n = products.len();
        self.set(PopularList { products, new_products, loaded_at: Instant::now(), priors_loaded_at });
        Ok(n)
    }
}

/// kind, rank, product, score, category.
type ReloadRow = (String, i64, Option<String>, f64, Option<String>);

/// The popular list (`$1` products), the new products (`$2`, see
/// [`NewProducts`]) and, when `$3`, the priors: per category, and for the
/// shop (the row without a category). `popular_products` is computed once;
/// similarity is read only for the priors (a CTE is computed when first
/// read, and a false `$3` keeps those branches from reading it).
const RELOAD_SQL: &str = "
WITH p AS MATERIALIZED (SELECT rank, product_id, score FROM serving.popular_products),
pairs AS MATERIALIZED (
    SELECT s.product_id, a.category, s.score, a.category = b.category AS same
    FROM serving.item_similarity AS s
    JOIN serving.products AS a ON a.product_id = s.product_id
    JOIN serving.products AS b ON b.product_id = s.similar_product_id
),
best AS (SELECT product_id, category, max(score) AS score FROM pairs WHERE same GROUP BY product_id, category),
best_any AS (SELECT product_id, max(score) AS score FROM pairs GROUP BY product_id)
(SELECT 'popular' AS kind, rank, product_id, score, NULL::text AS category
 FROM p ORDER BY rank, product_id LIMIT $1)
UNION ALL
(SELECT 'new', p.rank, p.product_id, p.score, c.category
 FROM p JOIN serving.products AS c ON c.product_id = p.product_id
 WHERE NOT EXISTS (SELECT 1 FROM serving.item_similarity AS s WHERE s.product_id = p.product_id)
 ORDER BY p.rank, p.product_id LIMIT $2)
UNION ALL
SELECT 'prior', 0, NULL, percentile_cont(0.5) WITHIN GROUP (ORDER BY score), category
FROM best WHERE $3 GROUP BY category
UNION ALL
SELECT 'prior', 0, NULL, percentile_cont(0.5) WITHIN GROUP (ORDER BY score), NULL
FROM best_any WHERE $3 HAVING count(*) > 0";

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
