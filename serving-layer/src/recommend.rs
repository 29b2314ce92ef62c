//! "You might also like": recommendations for one user, in well under a
//! second, whatever state the pipeline is in.
//!
//! In order of preference:
//!
//! 1. **model**: the latest imported model outputs for the user
//!    (`serving.model_recommendations`, see [`crate::models`]) while they
//!    are valid (`import-recommendations --valid-for`; past that the user
//!    is served from live signals as if there were no model). What the user
//!    did since the import, which the model cannot know, complements them:
//!    the model's list and the personal list from those interactions alone
//!    are fused by reciprocal rank (each product scores `Σ 1 / (60 +
//!    rank)` over the lists holding it), marked **blended**;
//! 2. **personalized**: products similar (`serving.item_similarity`) to the
//!    user's most recently viewed, carted or bought products
//!    (`serving.user_product_state`, which the speed layer keeps current
//!    within a second of a click). A candidate scores the sum over those
//!    seeds of `weight × similarity`, weight 2 for a product in the cart or
//!    bought and 1 otherwise. So a user who only bought gets what is bought
//!    or viewed with it. Products launched since the last similarity
//!    refresh have no similarity yet; each is taken as similar to every seed
//!    of its category with the category's prior
//!    ([`crate::popular::NewProducts`]), so a launch reaches the users of
//!    its category within a minute of its first demand;
//! 3. **popular**: the in-memory popular list ([`crate::popular`]).
//!
//! Products the user bought or holds in the cart are never recommended. A
//! model or personalised list shorter than `k` is padded with popular
//! products, scored 0: they carry no personal relevance, and a similarity
//! score is never below 0, so a personalised answer's scores never increase
//! down the list.
//!
//! Everything read from PostgreSQL comes from one statement, bounded by a
//! latency budget: a database error, a timeout, an unknown user or an
//! empty result all answer with the popular list instead, marked as such.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;
use sqlx::PgPool;

use crate::ids::UserId;
use crate::popular::PopularCache;
use crate::telemetry;

/// Largest `k` a caller may ask for.
pub const MAX_K: u32 = 100;
/// `k` when the caller gives none.
pub const DEFAULT_K: u32 = 10;
/// How many of the user's latest interactions seed the similarity lookup.
pub const SEEDS: i64 = 20;

/// How many products to return: 1..=[`MAX_K`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct K(u32);

impl K {
    pub fn new(k: u32) -> Option<Self> {
        (1..=MAX_K).contains(&k).then_some(Self(k))
    }

    /// Parses the `k` query parameter; `None` means the default.
    pub fn parse(raw: Option<&str>) -> Result<Self, String> {
        let Some(raw) = raw else { return Ok(Self(DEFAULT_K)) };
        raw.parse::<u32>().ok().and_then(Self::new).ok_or_else(|| {
            let shown: String = raw.chars().take(20).collect();
            format!("k must be an integer from 1 to {MAX_K}, got {shown:?}")
        })
    }

    pub fn get(self) -> usize {
        self.0 as usize
    }
}

/// A recommended product.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scored {
    pub product_id: String,
    pub score: f64,
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Model,
    /// The model's list fused with the personal list of what the user did
    /// since the model's import.
    Blended,
    Personalized,
    Popular,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Model => "model",
            Source::Blended => "blended",
            Source::Personalized => "personalized",
            Source::Popular => "popular",
        }
    }
}

/// The answer of `GET /api/recommendations/{user_id}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recommendations {
    pub user_id: String,
    pub products: Vec<Scored>,
    pub source: Source,
    /// The imported model's version, when `source` is `model` or `blended`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
}

/// Why the popular list was served (the `reason` label of
/// `serving_fallbacks_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    UnknownUser,
    Empty,
    DatabaseError,
    Timeout,
}

impl Fallback {
    fn as_str(self) -> &'static str {
        match self {
            Fallback::UnknownUser => "unknown_user",
            Fallback::Empty => "empty",
            Fallback::DatabaseError => "database_error",
            Fallback::Timeout => "timeout",
        }
    }
}

/// Nothing to answer with: PostgreSQL failed and no popular list was ever
/// loaded (only right after a start with the database down).
#[derive(Debug, thiserror::Error)]
#[error("recommendations are unavailable: the database does not answer and no popular list is loaded yet")]
pub struct Unavailable;

/// What PostgreSQL knows about one user.
#[derive(Debug, Default)]
struct Personal {
    /// The user has interactions (rows in `user_product_state`).
    known: bool,
    /// Bought or in the cart: never recommended.
    excluded: HashSet<String>,
    /// Model outputs, by rank, already without excluded products.
    model: Vec<Scored>,
    model_version: Option<String>,
    /// Similar products, best first, without excluded products.
    similar: Vec<Scored>,
    /// The seeds' catalog categories, each with the sum of its seeds' weights.
    categories: Vec<(String, f64)>,
}

/// One statement, one round trip. `state` is the user's rows (the view's
/// `user_id` predicate reaches both the batch and the speed table's primary
/// key); a product is "in the cart" when it was added after its last
/// removal, and "bought" when it was ever purchased. `model` is the user's
/// valid model rows; `seeds` the latest interactions, only those since the
/// model's import when one covers the user.
const PERSONAL_SQL: &str = "
WITH state AS MATERIALIZED (
    SELECT product_id, last_viewed_at, last_carted_at, last_removed_at, last_purchased_at,
           last_carted_at IS NOT NULL
             AND last_carted_at > COALESCE(last_removed_at, '-infinity'::timestamptz)
             AND last_carted_at > COALESCE(last_purchased_at, '-infinity'::timestamptz) AS in_cart
    FROM serving.user_product_state
    WHERE user_id = $1
), excluded AS (
    SELECT product_id FROM state WHERE in_cart OR last_purchased_at IS NOT NULL
), model AS MATERIALIZED (
    SELECT m.product_id, m.score, m.rank, m.model_version, m.imported_at
    FROM serving.model_recommendations AS m
    WHERE m.user_id = $1 AND m.valid_until > now() AND m.product_id NOT IN (SELECT product_id FROM excluded)
    ORDER BY m.rank
    LIMIT $2
), seeds AS MATERIALIZED (
    SELECT product_id,
           CASE WHEN in_cart OR last_purchased_at IS NOT NULL THEN 2.0::float8 ELSE 1.0::float8 END AS weight
    FROM state
    WHERE GREATEST(last_viewed_at, last_carted_at, last_purchased_at)
          > COALESCE((SELECT max(imported_at) FROM model), '-infinity'::timestamptz)
    ORDER BY GREATEST(last_viewed_at, last_carted_at, last_purchased_at) DESC, product_id
    LIMIT $3
)
SELECT 'known' AS kind, NULL::text AS product_id, NULL::float8 AS score, NULL::bigint AS rank, NULL::text AS version
WHERE EXISTS (SELECT 1 FROM state)
UNION ALL
SELECT 'excluded', product_id, NULL, NULL, NULL FROM excluded
UNION ALL
SELECT 'model', product_id, score, rank::bigint, model_version FROM model
UNION ALL
(SELECT 'similar', s.similar_product_id, sum(seeds.weight * s.score), NULL, NULL
 FROM seeds JOIN serving.item_similarity AS s ON s.product_id = seeds.product_id
 WHERE s.similar_product_id NOT IN (SELECT product_id FROM excluded)
 GROUP BY s.similar_product_id
 ORDER BY 3 DESC, 2
 LIMIT $2)
UNION ALL
SELECT 'category', c.category, sum(seeds.weight), NULL, NULL
FROM seeds JOIN serving.products AS c ON c.product_id = seeds.product_id
GROUP BY c.category";

type Row = (String, Option<String>, Option<f64>, Option<i64>, Option<String>);

/// Answers recommendation requests; cheap to share.
#[derive(Debug, Clone)]
pub struct Recommender {
    pool: PgPool,
    popular: PopularCache,
    budget: Duration,
    /// Whether the last personal query failed: failures and the recovery
    /// are logged once each, not per request.
    failing: Arc<AtomicBool>,
}

impl Recommender {
    /// `budget` bounds the database part of a request; past it the popular
    /// list answers.
    pub fn new(pool: PgPool, popular: PopularCache, budget: Duration) -> Self {
        Self { pool, popular, budget, failing: Arc::default() }
    }

    /// Opens `connections` connections of the pool at once and prepares
    /// the personal query on each, so the first requests after a start
    /// find them ready instead of paying a connect and a prepare each
    /// (which exceeded the budget: the first answers were fallbacks or
    /// 503s). Failures are logged; the requests then connect themselves.
    pub async fn warm_up(&self, connections: u32) {
        let started = std::time::Instant::now();
        let warm = (0..connections.max(1)).map(|_| async {
            let mut conn = self.pool.acquire().await?;
            sqlx::query_as::<_, Row>(PERSONAL_SQL).bind("").bind(1_i64).bind(SEEDS).fetch_all(&mut *conn).await?;
            // Held until every connection is open, so each is a new one.
            Ok::<_, sqlx::Error>(conn)
        });
        let results = futures::future::join_all(warm).await;
        let failed = results.iter().filter(|r| r.is_err()).count();
        match results.into_iter().find_map(Result::err) {
            Some(e) => tracing::warn!(error = %e, failed, "warming the recommender's connections failed"),
            None => tracing::info!(connections, ms = started.elapsed().as_millis() as u64, "recommender warmed up"),
        }
    }

    pub async fn recommend(&self, user: &UserId, k: K) -> Result<Recommendations, Unavailable> {
        let personal = match tokio::time::timeout(self.budget, self.personal(user, k)).await {
            Ok(Ok(p)) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("personal recommendations answer again");
                }
                Ok(p)
            }
            Ok(Err(e)) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "personal recommendations fail; serving the popular list");
                }
                Err(Fallback::DatabaseError)
            }
            Err(_) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(budget = ?self.budget, "personal recommendations exceed the budget; serving the popular list");
                }
                Err(Fallback::Timeout)
            }
        };
        let answer = match personal {
            Ok(p) => self.assemble(user, k, p)?,
            Err(reason) => self.popular_answer(user, k, &HashSet::new(), reason)?,
        };
        telemetry::recommendation(answer.source.as_str());
        Ok(answer)
    }

    /// The answer [`Self::recommend`] gives, except that a database error
    /// is an error (no latency budget, no popular list in its place): what
    /// a bulk export needs.
    pub async fn recommend_exact(&self, user: &UserId, k: K) -> Result<Recommendations, crate::export::ExportError> {
        let personal = self.personal(user, k).await?;
        self.assemble(user, k, personal).map_err(|e| crate::export::ExportError::Popular(e.to_string()))
    }

    async fn personal(&self, user: &UserId, k: K) -> Result<Personal, sqlx::Error> {
        let rows: Vec<Row> = sqlx::query_as(PERSONAL_SQL)
            .bind(user.as_str())
            .bind(k.get() as i64)
            .bind(SEEDS)
            .fetch_all(&self.pool)
            .await?;
        let mut p = Personal::default();
        let mut model: Vec<(i64, Scored)> = Vec::new();
        for (kind, product_id, score, rank, version) in rows {
            match (kind.as_str(), product_id) {
                ("known", _) => p.known = true,
                ("excluded", Some(id)) => {
                    p.excluded.insert(id);
                }
                ("model", Some(product_id)) => {
                    p.model_version = version.or(p.model_version);
                    model.push((rank.unwrap_or(i64::MAX), Scored { product_id, score: score.unwrap_or(0.0) }));
                }
                ("similar", Some(product_id)) => p.similar.push(Scored { product_id, score: score.unwrap_or(0.0) }),
                ("category", Some(category)) => p.categories.push((category, score.unwrap_or(0.0))),
                _ => {}
            }
        }
        // UNION ALL does not promise branch order; restore each list's own.
        model.sort_by_key(|(rank, _)| *rank);
        p.model = model.into_iter().map(|(_, s)| s).collect();
        p.similar.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.product_id.cmp(&b.product_id)));
        Ok(p)
    }

    /// The similar products, and the new products of the seeds' categories
    /// scored with their priors, best first.
    fn personalized(&self, p: &mut Personal) -> Vec<Scored> {
        let mut similar = std::mem::take(&mut p.similar);
        let Some(popular) = self.popular.get() else { return similar };
        let fresh = &popular.new_products;
        let mut added = false;
        for (category, weight) in &p.categories {
            let (Some(prior), Some(products)) = (fresh.prior(category), fresh.by_category.get(category)) else {
                continue;
            };
            let offered = products
                .iter()
                .filter(|id| !p.excluded.contains(*id) && !similar.iter().any(|s| &s.product_id == *id))
                .take(crate::popular::NEW_PER_CATEGORY);
            let scored: Vec<Scored> =
                offered.map(|id| Scored { product_id: id.clone(), score: weight * prior }).collect();
            added |= !scored.is_empty();
            similar.extend(scored);
        }
        if added {
            similar.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.product_id.cmp(&b.product_id)));
        }
        similar
    }

    fn assemble(&self, user: &UserId, k: K, mut p: Personal) -> Result<Recommendations, Unavailable> {
        let personalized = self.personalized(&mut p);
        let (source, mut products) = if !p.model.is_empty() && !personalized.is_empty() {
            (Source::Blended, fuse(&[&p.model, &personalized], k.get()))
        } else if !p.model.is_empty() {
            (Source::Model, std::mem::take(&mut p.model))
        } else if !personalized.is_empty() {
            (Source::Personalized, personalized)
        } else {
            let reason = if p.known { Fallback::Empty } else { Fallback::UnknownUser };
            return self.popular_answer(user, k, &p.excluded, reason);
        };
        products.truncate(k.get());
        if products.len() < k.get() {
            // Padding must not fail the answer: without a popular list the
            // personal part still stands on its own.
            if let Some(popular) = self.popular.get() {
                let missing = k.get() - products.len();
                let taken: HashSet<&str> = products.iter().map(|s| s.product_id.as_str()).collect();
                let pad: Vec<Scored> = popular
                    .products
                    .iter()
                    .filter(|s| !taken.contains(s.product_id.as_str()) && !p.excluded.contains(&s.product_id))
                    .take(missing)
                    .map(|s| Scored { product_id: s.product_id.clone(), score: 0.0 })
                    .collect();
                products.extend(pad);
            }
        }
        let model_version = if matches!(source, Source::Model | Source::Blended) { p.model_version } else { None };
        Ok(Recommendations { user_id: user.as_str().to_owned(), products, source, model_version })
    }

    fn popular_answer(
        &self,
        user: &UserId,
        k: K,
        excluded: &HashSet<String>,
        reason: Fallback,
    ) -> Result<Recommendations, Unavailable> {
        telemetry::fallback(reason.as_str());
        let popular = self.popular.get().ok_or(Unavailable)?;
        let products =
            popular.products.iter().filter(|s| !excluded.contains(&s.product_id)).take(k.get()).cloned().collect();
        Ok(Recommendations {
            user_id: user.as_str().to_owned(),
            products,
            source: Source::Popular,
            model_version: None,
        })
    }
}

/// Reciprocal-rank fusion: the constant of [`fuse`]. 60 is the usual
/// choice: a product high in one list and absent from the other ranks
/// about as well as one in the middle of both.
pub const FUSION_K: f64 = 60.0;

/// `lists` (each best first) fused into one of at most `k`: each product
/// scores `Σ 1 / (FUSION_K + rank)` over the lists holding it (rank from
/// 1), best first, ties by product id.
fn fuse(lists: &[&[Scored]], k: usize) -> Vec<Scored> {
    let mut scores: std::collections::HashMap<&str, f64> = std::collections::HashMap::new();
    for list in lists {
        for (i, s) in list.iter().enumerate() {
            *scores.entry(s.product_id.as_str()).or_default() += 1.0 / (FUSION_K + (i + 1) as f64);
        }
    }
    let mut fused: Vec<Scored> =
        scores.into_iter().map(|(product_id, score)| Scored { product_id: product_id.to_owned(), score }).collect();
    fused.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.product_id.cmp(&b.product_id)));
    fused.truncate(k);
    fused
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scored(ids: &[&str]) -> Vec<Scored> {
        ids.iter().enumerate().map(|(i, id)| Scored { product_id: (*id).into(), score: 10.0 - i as f64 }).collect()
    }

    #[test]
    fn fusion_ranks_by_reciprocal_rank_over_both_lists() {
        let model = scored(&["a", "b", "c"]);
        let live = scored(&["c", "d"]);
        let fused = fuse(&[&model, &live], 10);
        let ids: Vec<&str> = fused.iter().map(|s| s.product_id.as_str()).collect();
        // c: 1/63 + 1/61; a: 1/61; b and d: 1/62 each, by id.
        assert_eq!(ids, ["c", "a", "b", "d"]);
        assert!((fused[0].score - (1.0 / 63.0 + 1.0 / 61.0)).abs() < 1e-12);
        assert_eq!(fuse(&[&model, &live], 2).len(), 2);
        assert!(fused.windows(2).all(|w| w[0].score >= w[1].score));
    }

    #[test]
    fn k_is_bounded_and_defaults_to_ten() {
        assert_eq!(K::parse(None), Ok(K(DEFAULT_K)));
        assert_eq!(K::parse(Some("1")), Ok(K(1)));
        assert_eq!(K::parse(Some("100")), Ok(K(100)));
        for bad in ["0", "101", "-1", "", "ten", "1.5", "99999999999999999999"] {
            let e = K::parse(Some(bad)).unwrap_err();
            assert!(e.starts_with("k must be an integer from 1 to 100"), "{bad}: {e}");
        }
    }

    #[test]
    fn answers_serialise_as_the_contract_says() {
        let a = Recommendations {
            user_id: "u-1".into(),
            products: vec![Scored { product_id: "p-2".into(), score: 0.5 }],
            source: Source::Personalized,
            model_version: None,
        };
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            r#"{"user_id":"u-1","products":[{"product_id":"p-2","score":0.5}],"source":"personalized"}"#
        );
    }
}
