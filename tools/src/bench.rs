//! What the `bench_*` tools share: sizing the shop model's traffic and
//! printing figures.

use chrono::{DateTime, TimeDelta, Utc};
use rand::SeedableRng as _;
use rand::rngs::StdRng;

use integration_tests::shop::{Shop, ShopConfig};

/// The `rate` at which `config`'s shop makes `events` events in the hours
/// `[from, to)`: measured on the model itself, at a tenth of that rate,
/// since its traffic follows the time of day and its sessions' length
/// depends on the shop's shape.
pub fn calibrated_rate(config: &ShopConfig, from: DateTime<Utc>, to: DateTime<Utc>, events: u64) -> f64 {
    let secs = (to - from).num_seconds().max(1) as f64;
    let probe_rate = events as f64 / secs / 10.0;
    let shop = Shop::new(ShopConfig { rate: probe_rate, ..config.clone() });
    let mut rng = StdRng::seed_from_u64(config.seed ^ 0x5eed);
    let mut made = 0usize;
    let mut t = from;
    while t < to {
        let next = (t + TimeDelta::hours(1)).min(to);
        made += shop.events_between(t, next, &[], DateTime::<Utc>::MAX_UTC, &mut rng).len();
        t = next;
    }
    probe_rate * events as f64 / made.max(1) as f64
}

/// 20123456 → "20,123,456".
pub fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone as _;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(20_123_456), "20,123,456");
    }

    #[test]
    fn calibrated_traffic_has_about_the_asked_size() {
        let config = ShopConfig { users: 500, products: 100, ..ShopConfig::default() };
        let from = Utc.with_ymd_and_hms(2026, 11, 20, 0, 0, 0).unwrap();
        let rate = calibrated_rate(&config, from, from + TimeDelta::hours(6), 60_000);
        let shop = Shop::new(ShopConfig { rate, ..config });
        let mut rng = StdRng::seed_from_u64(9);
        // Hour by hour, as the benchmarks make it (the model takes the time
        // of day at the middle of each interval).
        let made: usize = (0..6)
            .map(|h| {
                let t = from + TimeDelta::hours(h);
                shop.events_between(t, t + TimeDelta::hours(1), &[], DateTime::<Utc>::MAX_UTC, &mut rng).len()
            })
            .sum();
        assert!((made as f64 / 60_000.0 - 1.0).abs() < 0.05, "{made} events for 60,000 asked");
    }
}
