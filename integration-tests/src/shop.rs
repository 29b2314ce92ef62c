//! A simulated online shop: realistic traffic with known ground truth.
//!
//! Products sit in categories with Zipf-skewed popularity; users prefer a few
//! categories and differ in how active they are; a session views products,
//! adds some to the cart, removes a few and often buys the rest, and buying
//! one product often brings its complements along ("bought together").
//! Traffic follows the time of day. On top, **demand spikes** multiply one
//! product's traffic for 2 to 48 hours; their exact windows are the ground
//! truth spike detection is measured against.
//!
//! Everything is a pure function of the seed and the requested interval, so
//! tests and benchmarks reproduce exactly.

use chrono::{DateTime, DurationRound, TimeDelta, Timelike, Utc};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Poisson};
use serde::{Deserialize, Serialize};
use shared_schema::EventType;

const CATEGORY_NAMES: &[&str] = &[
    "electronics",
    "books",
    "fashion",
    "home",
    "garden",
    "toys",
    "sports",
    "beauty",
    "grocery",
    "automotive",
    "music",
    "pets",
    "office",
    "health",
    "games",
    "tools",
];

/// Mean events per ordinary session (measured on the model; used to turn an
/// events-per-second rate into sessions).
pub const MEAN_EVENTS_PER_SESSION: f64 = 8.3;

/// Shape of the shop.
#[derive(Debug, Clone)]
pub struct ShopConfig {
    pub seed: u64,
    pub products: usize,
    pub categories: usize,
    pub users: usize,
    /// Average events per second over a day (the diurnal curve moves around it).
    pub rate: f64,
}

impl Default for ShopConfig {
    fn default() -> Self {
        Self { seed: 42, products: 500, categories: 12, users: 10_000, rate: 50.0 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Product {
    pub product_id: String,
    pub name: String,
    pub category: String,
    pub price_cents: i64,
}

#[derive(Debug, Clone)]
struct User {
    id: String,
    /// Cumulative preference over categories (for sampling).
    category_cdf: Vec<f64>,
}

/// An injected demand spike: `product_id`'s traffic multiplied by
/// `multiplier` during `[start, end)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spike {
    pub product_id: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub multiplier: f64,
}

impl Spike {
    pub fn active_at(&self, t: DateTime<Utc>) -> bool {
        self.start <= t && t < self.end
    }
}

/// One generated event, before serialisation.
#[derive(Debug, Clone, PartialEq)]
pub struct ShopEvent {
    pub event_id: String,
    pub event_type: EventType,
    pub event_time: DateTime<Utc>,
    pub user_id: String,
    pub session_id: String,
    pub product_id: String,
    pub quantity: Option<i32>,
    pub price_cents: Option<i64>,
}

impl ShopEvent {
    /// The JSON of the event contract.
    pub fn to_json(&self) -> String {
        let mut v = serde_json::json!({
            "event_id": self.event_id,
            "event_type": self.event_type.as_str(),
            "event_time": self.event_time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "user_id": self.user_id,
            "session_id": self.session_id,
            "product_id": self.product_id,
            "schema_version": 1,
        });
        if let Some(q) = self.quantity {
            v["quantity"] = q.into();
        }
        if let Some(p) = self.price_cents {
            v["price_cents"] = p.into();
        }
        v.to_string()
    }

    pub fn revenue_cents(&self) -> i64 {
        match (self.event_type, self.quantity, self.price_cents) {
            (EventType::Purchase, Some(q), Some(p)) => i64::from(q) * p,
            _ => 0,
        }
    }
}

/// The shop: catalog, users, complements and the traffic model.
#[derive(Debug)]
pub struct Shop {
    config: ShopConfig,
    pub products: Vec<Product>,
    pub categories: Vec<String>,
    /// Per category, its products' indices and the cumulative popularity.
    by_category: Vec<(Vec<usize>, Vec<f64>)>,
    /// Per product, the products often bought with it.
    complements: Vec<Vec<usize>>,
    users: Vec<User>,
    /// Cumulative user activity (heavy users come back more often).
    user_cdf: Vec<f64>,
    /// Each product's share of ordinary page views, for sizing spikes.
    view_share: Vec<f64>,
    session_counter: std::cell::Cell<u64>,
}

fn cdf(weights: impl IntoIterator<Item = f64>) -> Vec<f64> {
    let mut acc = 0.0;
    let mut out: Vec<f64> = weights
        .into_iter()
        .map(|w| {
            acc += w;
            acc
        })
        .collect();
    if acc > 0.0 {
        out.iter_mut().for_each(|x| *x /= acc);
    }
    out
}

fn sample(cdf: &[f64], rng: &mut impl Rng) -> usize {
    let x: f64 = rng.random();
    cdf.partition_point(|c| *c < x).min(cdf.len().saturating_sub(1))
}

/// Relative traffic by hour of day (UTC): low at night, peak in the evening.
pub fn diurnal(t: DateTime<Utc>) -> f64 {
    let h = f64::from(t.hour()) + f64::from(t.minute()) / 60.0;
    1.0 + 0.6 * ((h - 14.0) / 24.0 * std::f64::consts::TAU).cos()
}

impl Shop {
    pub fn new(config: ShopConfig) -> Self {
        let mut rng = StdRng::seed_from_u64(config.seed);
        let n_cat = config.categories.clamp(1, CATEGORY_NAMES.len());
        let categories: Vec<String> = CATEGORY_NAMES[..n_cat].iter().map(|s| s.to_string()).collect();
        let n = config.products.max(2);

        // Popularity: Zipf's law (weight 1/rank) over a random order.
        let mut popularity = vec![0.0; n];
        let mut order: Vec<usize> = (0..n).collect();
        rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut rng);
        for (rank, &p) in order.iter().enumerate() {
            popularity[p] = 1.0 / (rank as f64 + 1.0);
        }

        let mut products = Vec::with_capacity(n);
        let mut members: Vec<Vec<usize>> = vec![Vec::new(); n_cat];
        for i in 0..n {
            let c = i % n_cat;
            members[c].push(i);
            let base = 500.0 * (1.0 + c as f64);
            let price = (base * rng.random_range(0.3..4.0)).round() as i64 + 99;
            products.push(Product {
                product_id: format!("p-{i:05}"),
                name: format!("{} item {}", categories[c], i / n_cat + 1),
                category: categories[c].clone(),
                price_cents: price,
            });
        }
        let by_category: Vec<(Vec<usize>, Vec<f64>)> = members
            .into_iter()
            .map(|m| {
                let c = cdf(m.iter().map(|&p| popularity[p]));
                (m, c)
            })
            .collect();

        // Complements: two products, usually from a neighbouring category.
        let complements = (0..n)
            .map(|i| {
                (0..2)
                    .map(|k| {
                        let c = (i % n_cat + 1 + k) % n_cat;
                        let (m, _) = &by_category[c];
                        m[(i * 7 + k * 13) % m.len()]
                    })
                    .filter(|&j| j != i)
                    .collect()
            })
            .collect();

        let users: Vec<User> = (0..config.users.max(1))
            .map(|u| {
                let favourite = rng.random_range(0..n_cat);
                let second = rng.random_range(0..n_cat);
                let weights = (0..n_cat)
                    .map(|c| 1.0 + if c == favourite { 8.0 } else { 0.0 } + if c == second { 4.0 } else { 0.0 });
                User { id: format!("u-{u:06}"), category_cdf: cdf(weights) }
            })
            .collect();
        let user_cdf = cdf((0..users.len()).map(|u| 1.0 / ((u % 97) as f64 + 1.0).sqrt()));

        // Expected share of page views per product, averaged over users.
        let mut view_share = vec![0.0; n];
        for user in &users {
            let mut prev = 0.0;
            for (c, &cum) in user.category_cdf.iter().enumerate() {
                let pc = cum - prev;
                prev = cum;
                let (m, pcdf) = &by_category[c];
                let mut pprev = 0.0;
                for (&p, &pcum) in m.iter().zip(pcdf) {
                    view_share[p] += pc * (pcum - pprev);
                    pprev = pcum;
                }
            }
        }
        let total: f64 = view_share.iter().sum();
        view_share.iter_mut().for_each(|s| *s /= total);

        Self {
            config,
            products,
            categories,
            by_category,
            complements,
            users,
            user_cdf,
            view_share,
            session_counter: std::cell::Cell::new(0),
        }
    }

    pub fn config(&self) -> &ShopConfig {
        &self.config
    }

    /// Ordinary sessions per hour at the average of the day.
    pub fn sessions_per_hour(&self) -> f64 {
        self.config.rate * 3600.0 / MEAN_EVENTS_PER_SESSION
    }

    /// Picks `count` spikes over `[from, to)`: products from the popular half,
    /// 2–48 hours long (clipped to the window), multiplier 4–10.
    pub fn plan_spikes(&self, count: usize, from: DateTime<Utc>, to: DateTime<Utc>, rng: &mut impl Rng) -> Vec<Spike> {
        let mut ranked: Vec<usize> = (0..self.products.len()).collect();
        ranked.sort_by(|a, b| self.view_share[*b].total_cmp(&self.view_share[*a]));
        let pool = &ranked[..(ranked.len() / 2).max(1)];
        let hours = (to - from).num_hours().max(1);
        let mut spikes: Vec<Spike> = Vec::new();
        for _ in 0..count {
            // Distinct products, so each spike is separately detectable.
            let candidates: Vec<usize> = pool
                .iter()
                .copied()
                .filter(|p| !spikes.iter().any(|s| s.product_id == self.products[*p].product_id))
                .collect();
            let Some(&p) = candidates.choose(rng) else {
                break;
            };
            let start =
                from.duration_trunc(TimeDelta::hours(1)).unwrap_or(from) + TimeDelta::hours(rng.random_range(0..hours));
            let len = TimeDelta::hours(rng.random_range(2..=48));
            spikes.push(Spike {
                product_id: self.products[p].product_id.clone(),
                start,
                end: (start + len).min(to),
                multiplier: f64::from(rng.random_range(4u8..=10)),
            });
        }
        spikes.retain(|s| s.end - s.start >= TimeDelta::hours(1));
        spikes
    }

    fn product_index(&self, product_id: &str) -> Option<usize> {
        product_id.strip_prefix("p-")?.parse().ok().filter(|i| *i < self.products.len())
    }

    /// Every event of sessions starting in `[from, to)`, sorted by time.
    /// Session events may run a few minutes past `to`; none lies after
    /// `not_after`.
    pub fn events_between(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        spikes: &[Spike],
        not_after: DateTime<Utc>,
        rng: &mut impl Rng,
    ) -> Vec<ShopEvent> {
        let secs = (to - from).num_milliseconds() as f64 / 1000.0;
        if secs <= 0.0 {
            return Vec::new();
        }
        let mid = from + (to - from) / 2;
        let mean = self.sessions_per_hour() * diurnal(mid) * secs / 3600.0;
        let n = poisson(mean, rng);
        let mut out = Vec::new();
        for _ in 0..n {
            let start = from + TimeDelta::milliseconds(rng.random_range(0..((secs * 1000.0) as i64).max(1)));
            self.session(start, None, &mut out, rng);
        }
        for spike in spikes.iter().filter(|s| s.active_at(mid)) {
            let Some(p) = self.product_index(&spike.product_id) else {
                continue;
            };
            // Extra sessions so the product's views grow by the multiplier;
            // a spike session views the product about twice.
            let base_views = self.sessions_per_hour() * diurnal(mid) * secs / 3600.0 * 3.2 * self.view_share[p];
            let extra = poisson(base_views * (spike.multiplier - 1.0) / 2.0, rng);
            for _ in 0..extra {
                let start = from + TimeDelta::milliseconds(rng.random_range(0..((secs * 1000.0) as i64).max(1)));
                self.session(start, Some(p), &mut out, rng);
            }
        }
        out.retain(|e| e.event_time <= not_after);
        out.sort_by_key(|e| e.event_time);
        out
    }

    fn new_id<R: Rng + ?Sized>(rng: &mut R) -> String {
        uuid::Builder::from_random_bytes(rng.random()).into_uuid().to_string()
    }

    /// One session from `start`; `focus` is a spiking product the session
    /// came for.
    fn session(&self, start: DateTime<Utc>, focus: Option<usize>, out: &mut Vec<ShopEvent>, rng: &mut impl Rng) {
        let user = &self.users[sample(&self.user_cdf, rng)];
        let k = self.session_counter.get();
        self.session_counter.set(k + 1);
        let session_id = format!("s-{}-{k}", self.config.seed);
        let mut t = start;
        let mut cart: Vec<usize> = Vec::new();
        let emit = |t: DateTime<Utc>,
                    kind: EventType,
                    p: usize,
                    qty: Option<i32>,
                    out: &mut Vec<ShopEvent>,
                    rng: &mut dyn rand::RngCore| {
            let priced = kind != EventType::PageView;
            out.push(ShopEvent {
                event_id: Self::new_id(rng),
                event_type: kind,
                event_time: t,
                user_id: user.id.clone(),
                session_id: session_id.clone(),
                product_id: self.products[p].product_id.clone(),
                quantity: if priced { qty.or(Some(1)) } else { None },
                price_cents: priced.then_some(self.products[p].price_cents),
            });
        };
        let views = match focus {
            Some(_) => 2,
            None => 1 + poisson(2.2, rng) as usize,
        };
        for v in 0..views {
            let p = match focus {
                Some(p) if v == 0 || rng.random_bool(0.6) => p,
                _ => {
                    let c = sample(&user.category_cdf, rng);
                    let (m, pcdf) = &self.by_category[c];
                    m[sample(pcdf, rng)]
                }
            };
            t += TimeDelta::seconds(rng.random_range(3..90));
            emit(t, EventType::PageView, p, None, out, rng);
            let cart_p = if focus == Some(p) { 0.5 } else { 0.3 };
            if !cart.contains(&p) && rng.random_bool(cart_p) {
                t += TimeDelta::seconds(rng.random_range(2..30));
                emit(t, EventType::AddToCart, p, Some(1), out, rng);
                cart.push(p);
                // Bought together: the complement is often viewed and added too.
                if rng.random_bool(0.35)
                    && let Some(&c) = self.complements[p].choose(rng)
                    && !cart.contains(&c)
                {
                    t += TimeDelta::seconds(rng.random_range(3..40));
                    emit(t, EventType::PageView, c, None, out, rng);
                    t += TimeDelta::seconds(rng.random_range(2..20));
                    emit(t, EventType::AddToCart, c, Some(1), out, rng);
                    cart.push(c);
                }
            }
        }
        // Second thoughts.
        let mut i = 0;
        while i < cart.len() {
            if rng.random_bool(0.15) {
                t += TimeDelta::seconds(rng.random_range(5..60));
                let p = cart.remove(i);
                emit(t, EventType::RemoveFromCart, p, Some(1), out, rng);
            } else {
                i += 1;
            }
        }
        let buy = if focus.is_some() { 0.6 } else { 0.45 };
        if !cart.is_empty() && rng.random_bool(buy) {
            t += TimeDelta::seconds(rng.random_range(20..180));
            for &p in &cart {
                let qty = if rng.random_bool(0.8) { 1 } else { rng.random_range(2..=3) };
                emit(t, EventType::Purchase, p, Some(qty), out, rng);
            }
        }
    }
}

fn poisson(mean: f64, rng: &mut impl Rng) -> u64 {
    if mean <= 0.0 {
        return 0;
    }
    Poisson::new(mean).map(|d| d.sample(rng) as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::collections::HashMap;

    fn shop() -> Shop {
        Shop::new(ShopConfig { users: 2000, products: 200, rate: 20.0, ..ShopConfig::default() })
    }

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 20, 0, 0, 0).unwrap()
    }

    #[test]
    fn same_seed_same_traffic() {
        let a = shop().events_between(
            t0(),
            t0() + TimeDelta::hours(1),
            &[],
            t0() + TimeDelta::days(1),
            &mut StdRng::seed_from_u64(1),
        );
        let b = shop().events_between(
            t0(),
            t0() + TimeDelta::hours(1),
            &[],
            t0() + TimeDelta::days(1),
            &mut StdRng::seed_from_u64(1),
        );
        assert_eq!(a, b);
        assert!(!a.is_empty());
    }

    #[test]
    fn every_generated_event_satisfies_the_contract() {
        let shop = shop();
        let events = shop.events_between(
            t0(),
            t0() + TimeDelta::hours(2),
            &[],
            t0() + TimeDelta::days(1),
            &mut StdRng::seed_from_u64(2),
        );
        for e in &events {
            let json = e.to_json();
            let parsed = shared_schema::Event::parse(json.as_bytes(), t0() + TimeDelta::days(1))
                .unwrap_or_else(|r| panic!("{json}: {r}"));
            assert_eq!(parsed.event_type, e.event_type);
            assert_eq!(parsed.revenue_cents(), e.revenue_cents());
        }
    }

    #[test]
    fn rate_is_roughly_the_requested_one() {
        let shop = shop();
        let day = shop.events_between(
            t0(),
            t0() + TimeDelta::days(1),
            &[],
            t0() + TimeDelta::days(2),
            &mut StdRng::seed_from_u64(3),
        );
        let per_sec = day.len() as f64 / 86_400.0;
        assert!((per_sec / 20.0 - 1.0).abs() < 0.25, "{per_sec} events/s for a requested 20");
    }

    #[test]
    fn sessions_look_like_shopping() {
        let shop = shop();
        let events = shop.events_between(
            t0(),
            t0() + TimeDelta::hours(6),
            &[],
            t0() + TimeDelta::days(1),
            &mut StdRng::seed_from_u64(4),
        );
        let mut by_type: HashMap<EventType, usize> = HashMap::new();
        for e in &events {
            *by_type.entry(e.event_type).or_default() += 1;
        }
        let views = by_type[&EventType::PageView];
        let adds = by_type[&EventType::AddToCart];
        let removes = by_type[&EventType::RemoveFromCart];
        let buys = by_type[&EventType::Purchase];
        assert!(views > adds && adds > buys && buys > removes, "{by_type:?}");
        // Popularity is skewed: the top 10% of products get a large share of views.
        let mut per_product: HashMap<&str, usize> = HashMap::new();
        for e in events.iter().filter(|e| e.event_type == EventType::PageView) {
            *per_product.entry(&e.product_id).or_default() += 1;
        }
        let mut counts: Vec<usize> = per_product.into_values().collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let top: usize = counts.iter().take(20).sum();
        assert!(top as f64 > 0.3 * views as f64, "top 20 of 200 products got {top} of {views} views");
        // Within a session, events are in time order.
        let mut last: HashMap<&str, DateTime<Utc>> = HashMap::new();
        let mut sorted = events.clone();
        sorted.sort_by_key(|e| (e.session_id.clone(), e.event_time));
        for e in &sorted {
            if let Some(prev) = last.insert(&e.session_id, e.event_time) {
                assert!(prev <= e.event_time);
            }
        }
    }

    #[test]
    fn a_spike_multiplies_its_products_demand_only_inside_its_window() {
        let shop = shop();
        let mut rng = StdRng::seed_from_u64(5);
        let spikes = shop.plan_spikes(1, t0(), t0() + TimeDelta::hours(24), &mut rng);
        let mut spike = spikes[0].clone();
        spike.start = t0() + TimeDelta::hours(10);
        spike.end = t0() + TimeDelta::hours(14);
        spike.multiplier = 6.0;
        let views_in = |from: i64, to: i64, rng: &mut StdRng| {
            let mut n = 0;
            for h in from..to {
                let a = t0() + TimeDelta::hours(h);
                let ev = shop.events_between(
                    a,
                    a + TimeDelta::hours(1),
                    std::slice::from_ref(&spike),
                    t0() + TimeDelta::days(3),
                    rng,
                );
                n += ev
                    .iter()
                    .filter(|e| {
                        e.product_id == spike.product_id
                            && e.event_type == EventType::PageView
                            && e.event_time < a + TimeDelta::hours(1)
                    })
                    .count();
            }
            n as f64 / (to - from) as f64
        };
        // Same hours of a normal day as baseline, to cancel the time of day.
        let before = views_in(34, 38, &mut rng);
        let during = views_in(10, 14, &mut rng);
        assert!(during > 3.5 * before.max(1.0), "during {during}/h vs baseline {before}/h");
    }

    #[test]
    fn events_never_lie_after_not_after() {
        let shop = shop();
        let cut = t0() + TimeDelta::minutes(30);
        let ev = shop.events_between(t0(), t0() + TimeDelta::hours(1), &[], cut, &mut StdRng::seed_from_u64(6));
        assert!(ev.iter().all(|e| e.event_time <= cut));
    }
}
