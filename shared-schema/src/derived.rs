//! Relations built on top of the incremental views, each defined once here.
//!
//! Two kinds, next to the [`ViewDef`]s:
//!
//! * [`BatchTable`]: a table the batch layer computes whole at each refresh
//!   and publishes in its one transaction: the catalog copy, the demand
//!   baseline and item similarity. Their queries are written over the
//!   incremental views' own batch SQL (the baseline is a statistic of
//!   [`PRODUCT_DEMAND_HOURLY`], similarity one of [`USER_PRODUCT_STATE`]), so
//!   they can never disagree with the views on what an event means. They have
//!   no speed part: a baseline or a similarity model does not need to be
//!   seconds fresh.
//! * [`DerivedView`]: a PostgreSQL view over the *merged* serving relations:
//!   category demand (product demand through the catalog), popular products,
//!   demand spikes, freshness. Since they read `serving.product_demand_hourly`,
//!   they inherit its exact merge at the offset cut: category and product
//!   totals always agree, and a batch landing changes neither.
//! * [`Rollup`]: what a derived view computes per hour from the batch rows
//!   alone, kept in `batch.<name>` and refreshed by the publish for the
//!   hours it wrote. The derived view reads it and adds the speed rows (a
//!   sum), or reads it only for the hours the speed layer holds nothing of
//!   (a median), so a read costs the hours it asks for, not the history,
//!   and gives what the view over the merged rows would.

use crate::views::{PRODUCT_DEMAND_HOURLY, Reader, SqlType, ViewDef, product_demand_hourly, user_product_state};

/// Per-event demand as spike detection and popularity see it: everything
/// that shows interest, over the measures of [`PRODUCT_DEMAND_HOURLY`].
pub const INTEREST: &str = "views + cart_adds + purchases";

/// How far back the demand baseline looks.
pub const BASELINE_DAYS: i64 = 14;
/// Which quantile of a product's hourly share is its baseline: a little
/// below the median, so a spike over a good part of the window (two days of
/// a short history) leaves it alone.
pub const BASELINE_QUANTILE: f64 = 0.4;
/// How far back item similarity looks at users' activity.
pub const SIMILARITY_DAYS: i64 = 30;
/// Most recent distinct products per user that enter similarity: bounds the
/// pairs a user contributes to `N²`, however active the user is.
pub const SIMILARITY_ITEMS_PER_USER: i64 = 30;
/// Similar products kept per product.
pub const SIMILARITY_TOP_K: i64 = 20;

/// Spike detection works with two thresholds (hysteresis). An hour is a
/// *spike hour* when its demand is at least this many times the expected...
pub const SPIKE_RATIO: f64 = 2.5;
/// ...the excess is this many standard deviations (of the product's own
/// variation, see the baseline's `dispersion`)...
pub const SPIKE_Z: f64 = 5.0;
/// ...and at least this much demand happened (a product going from 2 to 15
/// views an hour is noise, not a marketing event).
pub const SPIKE_MIN_DEMAND: i64 = 20;
/// An hour is *elevated* at this ratio and z-score. A spike is a run of
/// elevated hours (gaps of up to [`SPIKE_GAP_HOURS`]) holding at least
/// [`SPIKE_MIN_HOURS`] spike hours (it must be sustained), or one spike hour
/// of [`SPIKE_STRONG_Z`] (so a sudden, large spike shows within minutes).
/// It is reported from its first elevated hour, so its start is not late.
pub const ELEVATED_RATIO: f64 = 1.5;
pub const ELEVATED_Z: f64 = 3.0;
pub const SPIKE_MIN_HOURS: i64 = 2;
pub const SPIKE_STRONG_Z: f64 = 10.0;
/// The hour's level is read off the products whose share is at least this
/// fraction of an even share (1 / products): those present every hour.
pub const LEVEL_SHARE: f64 = 0.5;
/// Elevated hours at most this far apart belong to one spike.
pub const SPIKE_GAP_HOURS: i64 = 2;
/// A spike of a product whose this-many most similar products include one
/// spiking [`SPIKE_ECHO_RATIO`] times as high (peak demand over expected),
/// that started within the same hour and lasts at least as long, is that
/// spike's echo (shoppers drawn to the one also look
/// at its complements): it is recorded with `driven_by`, and not reported
/// as a spike of its own. Under every echo rule below, the echo's first
/// hour and each of its spike hours must show at least as much excess
/// demand (demand above expected) in the driver as in the echo: the
/// driver's extra shoppers bring the echo's, so an echo never leads or
/// outdraws its driver, whereas a spike of its own under way an hour
/// before a similar product's began, or a burst of its own on top of an
/// echo, is no echo of it.
pub const SPIKE_DRIVER_RANK: i64 = 10;
pub const SPIKE_ECHO_RATIO: f64 = 1.5;
/// A spike is also an echo when it lies within a similar product's spike
/// (from an hour before its start to an hour after its end) that drew at
/// least this many times its excess demand at the peak (demand above
/// expected): a complement gets a fraction of the driver's extra shoppers,
/// however high that lifts it above its own small baseline, and may cross
/// the thresholds hours after the driver did, or in several episodes.
/// Measured by `make bench-quality` (docs/BENCHMARKS.md): the ratio rule
/// alone let such complements through as false alarms.
pub const SPIKE_ECHO_EXCESS: f64 = 5.0;
/// Under every echo rule, a spike that starts in a later hour than its
/// driver is its echo only if it was already riding it: in the
/// [`SPIKE_ECHO_RIDE_HOURS`] before its start (those of the driver's
/// spike), its excess was at least
/// [`SPIKE_ECHO_RIDE`] times the share of the driver's excess it took in
/// its first hour. A complement moves with its driver before and after it
/// crosses the thresholds; a spike of its own jumps from nothing while the
/// driver goes on as before.
pub const SPIKE_ECHO_RIDE_HOURS: i64 = 3;
pub const SPIKE_ECHO_RIDE: f64 = 0.25;
/// A spike that starts and ends within
/// the same hours as a similar product's is its echo already when that one
/// drew this many times its excess: shoppers drawn to the one brought it
/// along from start to end, however strong that made it.
pub const SPIKE_ECHO_EXCESS_ALIGNED: f64 = 2.0;
/// How far back an active spike's start is looked for (spikes last up to
/// 1-2 days).
pub const SPIKE_LOOKBACK_HOURS: i64 = 72;

/// Popularity: half-life of an hour's demand, and how far back it counts.
pub const POPULAR_HALF_LIFE_HOURS: f64 = 24.0;
pub const POPULAR_DAYS: i64 = 7;
/// Weight of each demand measure in popularity.
pub const POPULAR_SCORE: &str = "views + 3 * cart_adds + 10 * purchases";

/// What a batch table is computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// The lake's `products` table (the catalog snapshot), as is.
    Catalog,
    /// The events below the cut of the last `days` days before the newest
    /// event hour: bounded work, whatever the lake's age.
    RecentEvents { days: i64 },
}

/// A table the batch layer computes whole and publishes as `batch.<name>`,
/// served unchanged as `serving.<name>`.
#[derive(Debug, Clone, Copy)]
pub struct BatchTable {
    pub name: &'static str,
    pub columns: &'static [(&'static str, SqlType)],
    /// The first `key` columns are the primary key.
    pub key: usize,
    pub input: Input,
    /// Columns the quality gate requires to be non-negative.
    pub non_negative: &'static [&'static str],
    pub readers: &'static [Reader],
    steps: fn() -> Vec<Step>,
}

/// One step of a batch table's computation: a query over `events`,
/// `products` and the steps before it (by name). The batch layer keeps each
/// step's result and hands it to the next, so a step is computed once
/// however often the later ones read it (DataFusion would inline a CTE at
/// every reference, and scan the lake each time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: &'static str,
    /// A `SELECT`, or a `WITH … SELECT` (for the last step).
    pub sql: String,
    /// The step is this view over the table's window: a run that computed
    /// the view over all hours takes its rows instead of scanning again.
    pub view: Option<&'static ViewDef>,
}

impl PartialEq for BatchTable {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl BatchTable {
    /// The steps of its computation; the last one's output columns are
    /// [`Self::columns`], in order. The batch layer registers `events`
    /// restricted to the cut and to [`Self::window`].
    pub fn steps(&self) -> Vec<Step> {
        (self.steps)()
    }

    /// The same computation as one DataFusion statement, each step but the
    /// last a CTE (for tools and reading; the batch layer runs the steps).
    pub fn batch_sql(&self) -> String {
        let steps = self.steps();
        let Some((last, before)) = steps.split_last() else { return String::new() };
        if before.is_empty() {
            return last.sql.clone();
        }
        let ctes: Vec<String> = before.iter().map(|s| format!("{} AS (\n{}\n)", s.name, s.sql)).collect();
        match last.sql.strip_prefix("WITH ") {
            Some(rest) => format!("WITH {},\n{rest}", ctes.join(",\n")),
            None => format!("WITH {}\n{}", ctes.join(",\n"), last.sql),
        }
    }

    /// How far back before the newest event hour below the cut the table
    /// looks (`None`: it does not read events): bounded work, whatever the
    /// lake's age.
    pub fn window(&self) -> Option<chrono::TimeDelta> {
        match self.input {
            Input::RecentEvents { days } => Some(chrono::TimeDelta::days(days)),
            Input::Catalog => None,
        }
    }

    pub fn key_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.columns[..self.key].iter().map(|(n, _)| *n)
    }

    /// `CREATE TABLE batch.<name>`.
    pub fn table_ddl(&self) -> String {
        let cols: Vec<String> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, (n, t))| format!("    {n} {}{}", t.postgres(), if i < self.key { " NOT NULL" } else { "" }))
            .collect();
        let pk: Vec<_> = self.key_names().collect();
        format!("CREATE TABLE batch.{} (\n{},\n    PRIMARY KEY ({})\n)", self.name, cols.join(",\n"), pk.join(", "))
    }

    /// `serving.<name>`: the published table, read-only.
    pub fn serving_view_sql(&self) -> String {
        let cols: Vec<_> = self.columns.iter().map(|(n, _)| *n).collect();
        format!("CREATE OR REPLACE VIEW serving.{0} AS\nSELECT {1} FROM batch.{0}", self.name, cols.join(", "))
    }
}

fn catalog_steps() -> Vec<Step> {
    vec![Step {
        name: "products",
        sql: "SELECT product_id, name, category, price_cents FROM products WHERE product_id IS NOT NULL".into(),
        view: None,
    }]
}

/// Per product, its typical share of all demand in an hour, and how much
/// its demand varies around that.
///
/// * `share`: a quantile ([`BASELINE_QUANTILE`]) of its share over every
///   hour of the window (hours without the product count as zero), so a
///   spike of a day or two does not move it; a product mostly absent
///   (quantile zero) falls back to its mean.
///   Expected demand in an hour is that share of the hour's total, which
///   carries the time-of-day curve.
/// * `dispersion`: demand comes in sessions (a shopper looks at a product
///   several times), so it varies more than a Poisson count. The variance is
///   `dispersion × expected`, estimated robustly as the median squared
///   Pearson residual over the window, divided by 0.455 (that median for a
///   Poisson count), never below 1.
fn baseline_steps() -> Vec<Step> {
    let hourly = Step { name: "hourly", sql: product_demand_hourly().batch_sql(), view: Some(product_demand_hourly()) };
    let sql = format!(
        "WITH demand AS (SELECT hour, product_id, CAST({INTEREST} AS DOUBLE) AS demand FROM hourly),
totals AS (SELECT hour, sum(demand) AS total FROM demand GROUP BY hour HAVING sum(demand) > 0),
products AS (SELECT DISTINCT product_id FROM demand),
shares AS (
    SELECT p.product_id, t.total, COALESCE(d.demand, 0.0) AS demand, COALESCE(d.demand, 0.0) / t.total AS share
    FROM totals AS t CROSS JOIN products AS p
    LEFT JOIN demand AS d ON d.hour = t.hour AND d.product_id = p.product_id
),
ranked AS (
    SELECT product_id, share, demand,
           row_number() OVER (PARTITION BY product_id ORDER BY share) AS k,
           count(*) OVER (PARTITION BY product_id) AS n
    FROM shares
),
quantiles AS (
    SELECT product_id,
           max(CASE WHEN k = CAST(ceil(n * {BASELINE_QUANTILE}) AS BIGINT) THEN share END) AS quantile,
           avg(share) AS mean,
           count(*) AS hours,
           sum(demand) AS demand
    FROM ranked
    GROUP BY product_id
),
typical AS (
    SELECT product_id, CASE WHEN quantile > 0 THEN quantile ELSE mean END AS share, hours, demand
    FROM quantiles
),
expected AS (
    SELECT s.product_id, s.demand, greatest(t.share * s.total, 1.0) AS expected
    FROM shares AS s JOIN typical AS t ON t.product_id = s.product_id
),
residuals AS (
    SELECT product_id, (demand - expected) * (demand - expected) / expected AS r2 FROM expected
)
SELECT t.product_id, t.share,
       CAST(t.hours AS BIGINT) AS hours,
       CAST(t.demand AS BIGINT) AS demand,
       greatest(median(r.r2) / 0.455, 1.0) AS dispersion
FROM typical AS t JOIN residuals AS r ON r.product_id = t.product_id
GROUP BY t.product_id, t.share, t.hours, t.demand"
    );
    vec![hourly, Step { name: "demand_baseline", sql, view: None }]
}

/// Top-K co-occurrence of products in users' recent activity, cosine
/// normalised so popular products do not pair with everything. Each user
/// contributes only their most recent products, which bounds the pairs per
/// user; the work grows with users, not with the square of any popularity.
fn similarity_steps() -> Vec<Step> {
    let state = Step { name: "state", sql: user_product_state().batch_sql(), view: None };
    let recent = format!(
        "WITH touched AS (
    SELECT user_id, product_id,
           greatest(last_viewed_at, last_carted_at, last_purchased_at) AS last_at
    FROM state
),
ranked AS (
    SELECT user_id, product_id,
           row_number() OVER (PARTITION BY user_id ORDER BY last_at DESC, product_id) AS n
    FROM touched WHERE last_at IS NOT NULL
)
SELECT user_id, product_id FROM ranked WHERE n <= {SIMILARITY_ITEMS_PER_USER}"
    );
    // Each unordered pair once; both directions come from it.
    let pairs = "SELECT a.product_id AS first_id, b.product_id AS second_id, CAST(count(*) AS DOUBLE) AS together
FROM recent AS a JOIN recent AS b ON a.user_id = b.user_id AND a.product_id < b.product_id
GROUP BY a.product_id, b.product_id"
        .to_string();
    let scored = format!(
        "WITH users AS (SELECT product_id, CAST(count(*) AS DOUBLE) AS users FROM recent GROUP BY product_id),
directed AS (
    SELECT first_id AS product_id, second_id AS similar_product_id, together FROM pairs
    UNION ALL
    SELECT second_id AS product_id, first_id AS similar_product_id, together FROM pairs
),
scored AS (
    SELECT p.product_id, p.similar_product_id, p.together / sqrt(ua.users * ub.users) AS score
    FROM directed AS p
    JOIN users AS ua ON ua.product_id = p.product_id
    JOIN users AS ub ON ub.product_id = p.similar_product_id
),
top AS (
    SELECT product_id, similar_product_id, score,
           row_number() OVER (PARTITION BY product_id ORDER BY score DESC, similar_product_id) AS rank
    FROM scored
)
SELECT product_id, similar_product_id, score, CAST(rank AS BIGINT) AS rank
FROM top WHERE rank <= {SIMILARITY_TOP_K}"
    );
    vec![
        state,
        Step { name: "recent", sql: recent, view: None },
        Step { name: "pairs", sql: pairs, view: None },
        Step { name: "item_similarity", sql: scored, view: None },
    ]
}

/// The catalog, copied from the lake's snapshot of the shop's products.
pub const PRODUCTS: BatchTable = BatchTable {
    name: "products",
    columns: &[
        ("product_id", SqlType::Text),
        ("name", SqlType::Text),
        ("category", SqlType::Text),
        ("price_cents", SqlType::BigInt),
    ],
    key: 1,
    input: Input::Catalog,
    non_negative: &["price_cents"],
    readers: &[Reader::Dashboard, Reader::Recommender],
    steps: catalog_steps,
};

/// Each product's normal share of demand, for spike detection.
pub const DEMAND_BASELINE: BatchTable = BatchTable {
    name: "demand_baseline",
    columns: &[
        ("product_id", SqlType::Text),
        ("share", SqlType::Double),
        ("hours", SqlType::BigInt),
        ("demand", SqlType::BigInt),
        ("dispersion", SqlType::Double),
    ],
    key: 1,
    input: Input::RecentEvents { days: BASELINE_DAYS },
    non_negative: &["share", "hours", "demand", "dispersion"],
    readers: &[Reader::Dashboard],
    steps: baseline_steps,
};

/// Products often seen together by the same users, top K per product.
pub const ITEM_SIMILARITY: BatchTable = BatchTable {
    name: "item_similarity",
    columns: &[
        ("product_id", SqlType::Text),
        ("similar_product_id", SqlType::Text),
        ("score", SqlType::Double),
        ("rank", SqlType::BigInt),
    ],
    key: 2,
    input: Input::RecentEvents { days: SIMILARITY_DAYS },
    non_negative: &["score", "rank"],
    readers: &[Reader::Dashboard, Reader::Recommender],
    steps: similarity_steps,
};

/// Every batch table, in publish order.
pub const BATCH_TABLES: &[BatchTable] = &[PRODUCTS, DEMAND_BASELINE, ITEM_SIMILARITY];

/// A PostgreSQL view over merged serving relations.
#[derive(Debug, Clone, Copy)]
pub struct DerivedView {
    pub name: &'static str,
    pub readers: &'static [Reader],
    body: fn() -> String,
}

impl PartialEq for DerivedView {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl DerivedView {
    pub fn serving_view_sql(&self) -> String {
        format!("CREATE OR REPLACE VIEW serving.{} AS\n{}", self.name, (self.body)())
    }
}

/// The newest hour with demand, from batch and speed: the "now" of spike
/// detection and popularity, so both also work on historical data. A
/// function, not a subquery, so PostgreSQL can push the hour bound down to
/// the index scans beneath the merged view; `SECURITY DEFINER` because a
/// reader role may not read `batch.*` or `speed.*` itself.
pub fn latest_hour_function_sql() -> String {
    let v = PRODUCT_DEMAND_HOURLY;
    format!(
        "CREATE OR REPLACE FUNCTION serving.latest_demand_hour() RETURNS timestamptz
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $$
    SELECT GREATEST((SELECT max(hour) FROM batch.{v}), (SELECT max(hour) FROM speed.{v}))
$$"
    )
}

/// Where the expected demand of a product without a baseline comes from:
/// a product launched (or back) after the last baseline refresh. Its prior
/// is the typical product of its catalog category: the median share and
/// the median dispersion of the category's baselines (per category, with
/// `by_category`); for a product the catalog does not know yet, or a
/// category without baselines, those of the whole shop. So a launch that
/// takes off is measured against what a product of its kind usually draws,
/// and shows as a spike within the hour instead of waiting for the next
/// refresh. Read once per query, not per row: the baseline holds a row per
/// product.
fn prior_sql(by_category: bool) -> String {
    let (b, p) = (DEMAND_BASELINE.name, PRODUCTS.name);
    let medians = "percentile_cont(0.5) WITHIN GROUP (ORDER BY x.share) AS share,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY x.dispersion) AS dispersion";
    if by_category {
        format!(
            "SELECT y.category, {medians}\n    FROM batch.{b} AS x JOIN batch.{p} AS y ON y.product_id = x.product_id\n    GROUP BY y.category"
        )
    } else {
        format!("SELECT {medians}\n    FROM batch.{b} AS x")
    }
}

/// Product demand summed per category of the catalog; products the catalog
/// does not know count under `unknown`. The batch rows come summed per
/// category from [`CATEGORY_DEMAND_ROLLUP`]; the speed rows above the cut
/// are added per category here: sums of sums, so the same totals as
/// summing the merged product rows.
fn category_demand_body() -> String {
    let v = product_demand_hourly();
    let measures: Vec<_> = v.measure_names().collect();
    let summed: Vec<String> = measures.iter().map(|m| format!("sum({m})::bigint AS {m}")).collect();
    let speed: Vec<String> = measures.iter().map(|m| format!("s.{m}")).collect();
    format!(
        "SELECT hour, category,\n       {summed}\nFROM (\n    SELECT hour, category, {plain} FROM batch.{rollup}\n    UNION ALL\n    SELECT s.hour, COALESCE(p.category, 'unknown'), {speed}\n    FROM ({rows}) AS s\n    LEFT JOIN batch.{products} AS p ON p.product_id = s.product_id\n) AS merged\nGROUP BY hour, category",
        summed = summed.join(",\n       "),
        plain = measures.join(", "),
        rollup = CATEGORY_DEMAND_ROLLUP.name,
        speed = speed.join(", "),
        rows = v.speed_rows_sql(),
        products = PRODUCTS.name,
    )
}

/// The hour key of every rollup.
pub const ROLLUP_HOUR: &str = "hour";

/// A derived view's per-hour result over the batch rows alone, as the table
/// `batch.<name>` (see the module's introduction). The publish refreshes
/// the hours it wrote of [`PRODUCT_DEMAND_HOURLY`], and every hour when it
/// replaced a relation the rollup reads; `migrate` fills it whole when its
/// definition changes.
#[derive(Debug, Clone, Copy)]
pub struct Rollup {
    pub name: &'static str,
    /// The batch relations it reads: replacing one recomputes every hour.
    pub reads: &'static [&'static str],
    /// The first `key` columns are the primary key, [`ROLLUP_HOUR`] first.
    pub key: usize,
    /// Recomputed whole whenever a publish writes what it reads, whichever
    /// hours: its rows are not per hour of demand but as of the newest
    /// batch hour ([`POPULAR_ROLLUP`]); its statements take no hours.
    pub whole: bool,
    columns: fn() -> Vec<(&'static str, SqlType)>,
    select: RollupSelect,
}

/// A rollup's rows over the relations named by the first argument (the
/// batch relation, or the shadow a publish is about to swap in); with the
/// second, only for the hours bound as `$1`.
type RollupSelect = fn(&dyn Fn(&str) -> String, bool) -> String;

impl PartialEq for Rollup {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Rollup {
    pub fn columns(&self) -> Vec<(&'static str, SqlType)> {
        (self.columns)()
    }

    pub fn table_ddl(&self) -> String {
        let columns = self.columns();
        let cols: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(i, (n, t))| format!("    {n} {}{}", t.postgres(), if i < self.key { " NOT NULL" } else { "" }))
            .collect();
        let pk: Vec<_> = columns.iter().take(self.key).map(|(n, _)| *n).collect();
        format!("CREATE TABLE batch.{} (\n{},\n    PRIMARY KEY ({})\n)", self.name, cols.join(",\n"), pk.join(", "))
    }

    /// Deletes its rows: all of them, or (`hours`) those of the hours bound
    /// as `$1` (`timestamptz[]`).
    pub fn clear_sql(&self, hours: bool) -> String {
        let filter = if hours && !self.whole { format!(" WHERE {ROLLUP_HOUR} = ANY($1)") } else { String::new() };
        format!("DELETE FROM batch.{}{filter}", self.name)
    }

    /// Inserts its rows computed over `source(relation)`: all hours, or
    /// (`hours`) those bound as `$1`. Run after [`Self::clear_sql`].
    pub fn fill_sql(&self, source: &dyn Fn(&str) -> String, hours: bool) -> String {
        let cols: Vec<_> = self.columns().iter().map(|(n, _)| *n).collect();
        format!(
            "INSERT INTO batch.{} ({})\n{}",
            self.name,
            cols.join(", "),
            (self.select)(source, hours && !self.whole)
        )
    }
}

fn category_rollup_columns() -> Vec<(&'static str, SqlType)> {
    let measures = product_demand_hourly().measures.iter().map(|m| (m.name, m.ty));
    [(ROLLUP_HOUR, SqlType::TimestampTz), ("category", SqlType::Text)].into_iter().chain(measures).collect()
}

fn category_rollup_select(source: &dyn Fn(&str) -> String, hours: bool) -> String {
    let summed: Vec<String> =
        product_demand_hourly().measure_names().map(|m| format!("sum(d.{m})::bigint AS {m}")).collect();
    let filter = if hours { "\nWHERE d.hour = ANY($1)" } else { "" };
    format!(
        "SELECT d.hour, COALESCE(p.category, 'unknown') AS category,\n       {}\nFROM {} AS d\nLEFT JOIN {} AS p ON p.product_id = d.product_id{filter}\nGROUP BY 1, 2",
        summed.join(",\n       "),
        source(PRODUCT_DEMAND_HOURLY),
        source(PRODUCTS.name),
    )
}

/// The demand level of each hour (see [`spike_hours_body`]) over `rows`, a
/// query of `hour`, `product_id` and `demand`: the one definition of the
/// level, for the rollup and for the hours the speed layer holds.
fn hour_level_sql(rows: &str, baseline: &str) -> String {
    format!(
        "SELECT l.hour, percentile_cont(0.5) WITHIN GROUP (ORDER BY l.demand / lb.share) AS level
    FROM ({rows}) AS l
    JOIN {baseline} AS lb ON lb.product_id = l.product_id
    WHERE lb.share >= (SELECT {LEVEL_SHARE} / count(*) FROM {baseline})
    GROUP BY l.hour"
    )
}

fn demand_rows(relation: &str, filter: &str) -> String {
    format!("SELECT hour, product_id, ({INTEREST})::double precision AS demand FROM {relation}{filter}")
}

fn level_rollup_columns() -> Vec<(&'static str, SqlType)> {
    vec![(ROLLUP_HOUR, SqlType::TimestampTz), ("level", SqlType::Double)]
}

fn level_rollup_select(source: &dyn Fn(&str) -> String, hours: bool) -> String {
    let filter = if hours { " WHERE hour = ANY($1)" } else { "" };
    hour_level_sql(&demand_rows(&source(PRODUCT_DEMAND_HOURLY), filter), &source(DEMAND_BASELINE.name))
}

/// The factor by which an hour's popularity has decayed at `at`.
fn popular_decay(at: &str, hour: &str) -> String {
    format!("power(0.5, extract(epoch FROM {at} - {hour})::double precision / ({POPULAR_HALF_LIFE_HOURS} * 3600.0))")
}

fn popular_rollup_columns() -> Vec<(&'static str, SqlType)> {
    vec![(ROLLUP_HOUR, SqlType::TimestampTz), ("product_id", SqlType::Text), ("score", SqlType::Double)]
}

/// Each product's popularity over the batch rows as of the newest batch
/// hour (the anchor, in [`ROLLUP_HOUR`]): its demand of the
/// [`POPULAR_DAYS`] up to the anchor, decayed to the anchor.
fn popular_rollup_select(source: &dyn Fn(&str) -> String, _hours: bool) -> String {
    format!(
        "SELECT a.anchor, d.product_id, sum(({POPULAR_SCORE}) * {decay})::double precision
FROM {v} AS d
CROSS JOIN (SELECT max(hour) AS anchor FROM {v}) AS a
WHERE d.hour > a.anchor - interval '{POPULAR_DAYS} days'
GROUP BY a.anchor, d.product_id",
        decay = popular_decay("a.anchor", "d.hour"),
        v = source(PRODUCT_DEMAND_HOURLY),
    )
}

/// Category demand of the batch rows, per hour and category.
pub const CATEGORY_DEMAND_ROLLUP: Rollup = Rollup {
    name: "category_demand_hourly",
    reads: &[PRODUCT_DEMAND_HOURLY, PRODUCTS.name],
    key: 2,
    whole: false,
    columns: category_rollup_columns,
    select: category_rollup_select,
};

/// The demand level of each hour of the batch rows.
pub const DEMAND_LEVEL_ROLLUP: Rollup = Rollup {
    name: "demand_levels",
    reads: &[PRODUCT_DEMAND_HOURLY, DEMAND_BASELINE.name],
    key: 1,
    whole: false,
    columns: level_rollup_columns,
    select: level_rollup_select,
};

/// Popularity of the batch rows as of the newest batch hour.
pub const POPULAR_ROLLUP: Rollup = Rollup {
    name: "popular_scores",
    reads: &[PRODUCT_DEMAND_HOURLY],
    key: 2,
    whole: true,
    columns: popular_rollup_columns,
    select: popular_rollup_select,
};

pub const ROLLUPS: &[Rollup] = &[CATEGORY_DEMAND_ROLLUP, DEMAND_LEVEL_ROLLUP, POPULAR_ROLLUP];

/// Demand of the last [`POPULAR_DAYS`], decayed by age to the newest hour.
///
/// The score is linear in the measures and the decay factors, so the
/// batch rows' part comes from [`POPULAR_ROLLUP`], decayed once more from
/// its anchor (the newest batch hour) to the newest hour, less the batch
/// hours that left the window since the anchor (none while the batch is
/// within an hour or two of the speed layer); the speed rows above the cut
/// are weighed here. A read weighs a row per product plus the hours the
/// speed layer holds, not seven days of product-hours; the scores equal
/// those of the merged rows up to floating-point rounding. The newest
/// hour is taken once (`OFFSET 0` keeps PostgreSQL from calling the
/// function for every row it weighs). The decay is in double precision:
/// `extract` gives `numeric`, whose `power` is many times slower.
fn popular_body() -> String {
    let v = product_demand_hourly();
    format!(
        "SELECT (row_number() OVER (ORDER BY score DESC, product_id))::bigint AS rank, product_id, score
FROM (
    SELECT x.product_id, sum(x.score)::double precision AS score
    FROM (SELECT serving.latest_demand_hour() AS latest OFFSET 0) AS n
    CROSS JOIN LATERAL (
        SELECT r.product_id, r.score * {rollup_decay} AS score
        FROM batch.{rollup} AS r
        UNION ALL
        SELECT d.product_id, -({POPULAR_SCORE}) * {batch_decay}
        FROM batch.{name} AS d
        WHERE d.hour > (SELECT max(hour) FROM batch.{rollup}) - interval '{POPULAR_DAYS} days'
          AND d.hour <= n.latest - interval '{POPULAR_DAYS} days'
        UNION ALL
        SELECT s.product_id, ({POPULAR_SCORE}) * {speed_decay}
        FROM ({rows}) AS s
        WHERE s.hour > n.latest - interval '{POPULAR_DAYS} days'
    ) AS x
    GROUP BY x.product_id
) AS s
WHERE score > 0",
        rollup_decay = popular_decay("n.latest", "r.hour"),
        batch_decay = popular_decay("n.latest", "d.hour"),
        speed_decay = popular_decay("n.latest", "s.hour"),
        rollup = POPULAR_ROLLUP.name,
        name = v.name,
        rows = v.speed_rows_sql(),
    )
}

/// Every product-hour with demand, against what the baseline expects.
///
/// Expected demand is the product's baseline share of the hour's *level*:
/// the median, over the products common enough to show up every hour, of
/// their demand divided by their share. Unlike the hour's total, the level
/// is not lifted by the spikes it is meant to reveal (a big spike on a
/// popular product would otherwise raise its own expectation).
///
/// The level of an hour the speed layer holds nothing of is the batch's,
/// kept in [`DEMAND_LEVEL_ROLLUP`]; only the hours with speed rows above
/// the cut (the current ones, and old ones with late events) are computed
/// on read, each over its own hour's rows. Those hours are found once
/// (`live`, read twice, so PostgreSQL computes it once).
///
/// A product without a baseline (launched after its last refresh) is
/// measured against its category's prior ([`prior_sql`]); `basis` says
/// what the expectation rests on: `product`, `category` or `shop`.
fn spike_hours_body() -> String {
    let v = PRODUCT_DEMAND_HOURLY;
    let b = DEMAND_BASELINE.name;
    let above = |ratio: f64, z: f64| {
        format!("d.demand >= {SPIKE_MIN_DEMAND} AND d.demand >= {ratio} * x.expected AND x.z >= {z}")
    };
    format!(
        "SELECT d.hour, d.product_id, d.demand, x.expected, x.z AS score,
       ({spike}) AS is_spike,
       ({elevated}) AS is_elevated,
       base.basis
FROM (SELECT hour, product_id, ({INTEREST})::double precision AS demand FROM serving.{v}) AS d
JOIN (
    WITH live AS (SELECT DISTINCT s.hour FROM ({rows}) AS s)
    SELECT r.hour, r.level FROM batch.{levels} AS r
    WHERE NOT EXISTS (SELECT 1 FROM live WHERE live.hour = r.hour)
    UNION ALL
    SELECT x.hour, x.level
    FROM live AS h
    CROSS JOIN LATERAL ({live}) AS x
) AS t ON t.hour = d.hour
LEFT JOIN batch.{b} AS b ON b.product_id = d.product_id
LEFT JOIN batch.{products} AS c ON b.product_id IS NULL AND c.product_id = d.product_id
LEFT JOIN ({category_prior}) AS pc ON pc.category = c.category
CROSS JOIN ({shop_prior}) AS ps
CROSS JOIN LATERAL (
    SELECT CASE WHEN b.product_id IS NOT NULL THEN b.share WHEN pc.category IS NOT NULL THEN pc.share ELSE ps.share END AS share,
           CASE WHEN b.product_id IS NOT NULL THEN b.dispersion
                WHEN pc.category IS NOT NULL THEN pc.dispersion ELSE ps.dispersion END AS dispersion,
           CASE WHEN b.product_id IS NOT NULL THEN 'product' WHEN pc.category IS NOT NULL THEN 'category' ELSE 'shop' END AS basis
) AS base
CROSS JOIN LATERAL (SELECT GREATEST(base.share * t.level, 1.0) AS expected) AS e
CROSS JOIN LATERAL (SELECT e.expected, (d.demand - e.expected) / sqrt(base.dispersion * e.expected) AS z) AS x
WHERE base.share IS NOT NULL",
        spike = above(SPIKE_RATIO, SPIKE_Z),
        elevated = above(ELEVATED_RATIO, ELEVATED_Z),
        levels = DEMAND_LEVEL_ROLLUP.name,
        rows = product_demand_hourly().speed_rows_sql(),
        live = hour_level_sql(&demand_rows(&format!("serving.{v}"), " WHERE hour = h.hour"), &format!("batch.{b}")),
        products = PRODUCTS.name,
        category_prior = prior_sql(true),
        shop_prior = prior_sql(false),
    )
}

/// Elevated hours grouped into spikes (see [`SPIKE_RATIO`]), each from its
/// first elevated hour to its latest, with the latest hour's figures.
fn spike_episodes_body(bounded: bool) -> String {
    let bound = if bounded {
        format!("\n    WHERE hour > serving.latest_demand_hour() - interval '{SPIKE_LOOKBACK_HOURS} hours'")
    } else {
        String::new()
    };
    format!(
        "WITH hours AS (
    SELECT * FROM serving.demand_spike_hours{bound}
),
elevated AS (
    SELECT *, CASE WHEN hour - lag(hour) OVER (PARTITION BY product_id ORDER BY hour) <= interval '{SPIKE_GAP_HOURS} hours'
                   THEN 0 ELSE 1 END AS starts
    FROM hours WHERE is_elevated
),
numbered AS (
    SELECT *, sum(starts) OVER (PARTITION BY product_id ORDER BY hour) AS spike FROM elevated
),
episodes AS (
    SELECT product_id, spike, min(hour) AS spike_start, max(hour) AS latest_hour, max(score) AS peak_score,
           max(demand / expected) FILTER (WHERE is_spike) AS peak_ratio,
           max(demand - expected) FILTER (WHERE is_spike) AS peak_excess,
           (array_agg(demand - expected ORDER BY hour))[1] AS start_excess
    FROM numbered GROUP BY product_id, spike
    HAVING count(*) FILTER (WHERE is_spike) >= {SPIKE_MIN_HOURS}
        OR max(score) FILTER (WHERE is_spike) >= {SPIKE_STRONG_Z}
),
candidates AS (
    SELECT e.product_id, e.spike, f.product_id AS driver, f.spike_start AS driver_start, e.spike_start, e.start_excess,
           COALESCE(fh.demand - fh.expected, 0) AS driver_start_excess,
           e.spike_start <= f.spike_start AS together
    FROM episodes AS e
    JOIN episodes AS f ON f.product_id <> e.product_id AND e.latest_hour <= f.latest_hour + interval '1 hour'
    JOIN batch.{sim} AS s ON s.product_id = e.product_id AND s.similar_product_id = f.product_id
                         AND s.rank <= {SPIKE_DRIVER_RANK}
    LEFT JOIN hours AS fh ON fh.product_id = f.product_id AND fh.hour = e.spike_start
    WHERE ((abs(extract(epoch FROM e.spike_start - f.spike_start)) <= 3600
            AND (f.peak_ratio >= {SPIKE_ECHO_RATIO} * e.peak_ratio
                 OR (f.peak_excess >= {SPIKE_ECHO_EXCESS_ALIGNED} * e.peak_excess
                     AND e.latest_hour >= f.latest_hour - interval '1 hour')))
           OR (f.peak_excess >= {SPIKE_ECHO_EXCESS} * e.peak_excess
               AND e.spike_start >= f.spike_start - interval '1 hour'))
      AND NOT EXISTS (
          SELECT 1 FROM numbered AS ne
          LEFT JOIN hours AS hf ON hf.product_id = f.product_id AND hf.hour = ne.hour
          WHERE ne.product_id = e.product_id AND ne.spike = e.spike
            AND (ne.is_spike OR ne.hour = e.spike_start)
            AND COALESCE(hf.demand - hf.expected, 0) < ne.demand - ne.expected)
),
ridden AS (
    SELECT c.product_id, c.spike, c.driver,
           sum(he.demand - he.expected) AS echo_before, sum(hf.demand - hf.expected) AS driver_before
    FROM candidates AS c
    JOIN hours AS he ON he.product_id = c.product_id
                    AND he.hour >= c.spike_start - interval '{SPIKE_ECHO_RIDE_HOURS} hours' AND he.hour < c.spike_start
                    AND he.hour >= c.driver_start
    JOIN hours AS hf ON hf.product_id = c.driver AND hf.hour = he.hour
    WHERE NOT c.together
    GROUP BY c.product_id, c.spike, c.driver
),
driven AS (
    SELECT c.product_id, c.spike, min(c.driver) AS driven_by
    FROM candidates AS c
    LEFT JOIN ridden AS r USING (product_id, spike, driver)
    WHERE c.together
       OR (r.driver_before > 0
           AND r.echo_before * c.driver_start_excess >= {SPIKE_ECHO_RIDE} * c.start_excess * r.driver_before)
    GROUP BY c.product_id, c.spike
)
SELECT e.product_id, p.category, e.spike_start, e.latest_hour,
       n.demand AS current_demand, n.expected AS baseline_demand, n.score, e.peak_score, d.driven_by
FROM episodes AS e
JOIN numbered AS n ON n.product_id = e.product_id AND n.hour = e.latest_hour
LEFT JOIN driven AS d ON d.product_id = e.product_id AND d.spike = e.spike
LEFT JOIN batch.{products} AS p ON p.product_id = e.product_id",
        products = PRODUCTS.name,
        sim = ITEM_SIMILARITY.name,
    )
}

fn spike_history_body() -> String {
    spike_episodes_body(false)
}

/// The spikes going on now: those whose latest spike hour is the newest
/// hour or the one before (a new hour has little demand yet), and which are
/// not the echo of a stronger spike of a product bought with them.
fn spikes_body() -> String {
    format!(
        "SELECT product_id, category, spike_start, latest_hour, current_demand, baseline_demand, score
FROM ({}) AS s
WHERE latest_hour >= serving.latest_demand_hour() - interval '1 hour' AND driven_by IS NULL
ORDER BY score DESC",
        spike_episodes_body(true)
    )
}

/// Per layer: how far it has got. The speed layer's position is what it has
/// consumed; the batch's is its cut, and its lag what the speed layer holds
/// above the cut.
fn freshness_body() -> String {
    "SELECT 'speed'::text AS layer, max(o.last_event_time) AS last_event_time,
       sum(o.next_offset)::bigint AS last_offset,
       CASE WHEN count(o.end_offset) = count(*)
            THEN sum(GREATEST(o.end_offset - o.next_offset, 0))::bigint END AS lag_records,
       max(o.updated_at) AS last_update
FROM ops.speed_offsets AS o
UNION ALL
SELECT 'batch'::text, r.last_event_time, c.cut, s.held, r.finished_at
FROM (SELECT sum(cut_offset)::bigint AS cut FROM ops.cut) AS c
CROSS JOIN (
    SELECT sum(GREATEST(o.next_offset - COALESCE(k.cut_offset, 0), 0))::bigint AS held
    FROM ops.speed_offsets AS o LEFT JOIN ops.cut AS k USING (kafka_partition)
) AS s
LEFT JOIN LATERAL (
    SELECT finished_at, newest_hour AS last_event_time
    FROM ops.batch_runs WHERE status = 'published' ORDER BY run_id DESC LIMIT 1
) AS r ON true"
        .into()
}

pub const CATEGORY_DEMAND_HOURLY: DerivedView =
    DerivedView { name: "category_demand_hourly", readers: &[Reader::Dashboard], body: category_demand_body };
pub const POPULAR_PRODUCTS: DerivedView =
    DerivedView { name: "popular_products", readers: &[Reader::Dashboard, Reader::Recommender], body: popular_body };
pub const DEMAND_SPIKE_HOURS: DerivedView =
    DerivedView { name: "demand_spike_hours", readers: &[Reader::Dashboard], body: spike_hours_body };
pub const DEMAND_SPIKE_HISTORY: DerivedView =
    DerivedView { name: "demand_spike_history", readers: &[Reader::Dashboard], body: spike_history_body };
pub const DEMAND_SPIKES: DerivedView =
    DerivedView { name: "demand_spikes", readers: &[Reader::Dashboard], body: spikes_body };
pub const FRESHNESS: DerivedView =
    DerivedView { name: "freshness", readers: &[Reader::Dashboard, Reader::Recommender], body: freshness_body };

/// Every derived view, each after those it reads.
pub const DERIVED_VIEWS: &[DerivedView] =
    &[CATEGORY_DEMAND_HOURLY, POPULAR_PRODUCTS, DEMAND_SPIKE_HOURS, DEMAND_SPIKE_HISTORY, DEMAND_SPIKES, FRESHNESS];

/// One relation of schema `serving`, as PostgreSQL is told to create it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServingRelation {
    pub name: &'static str,
    pub sql: String,
    pub readers: &'static [Reader],
}

/// Every `serving.*` relation, each after those it reads: the merged
/// incremental views, the batch tables, then the derived views.
pub fn serving_relations(views: &[ViewDef]) -> Vec<ServingRelation> {
    let merged = views.iter().map(|v| ServingRelation { name: v.name, sql: v.serving_view_sql(), readers: v.readers });
    let tables =
        BATCH_TABLES.iter().map(|t| ServingRelation { name: t.name, sql: t.serving_view_sql(), readers: t.readers });
    let derived =
        DERIVED_VIEWS.iter().map(|d| ServingRelation { name: d.name, sql: d.serving_view_sql(), readers: d.readers });
    merged.chain(tables).chain(derived).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views;

    #[test]
    fn batch_table_sql_snapshots() {
        for t in BATCH_TABLES {
            insta::assert_snapshot!(format!("{}_batch", t.name), t.batch_sql());
            insta::assert_snapshot!(format!("{}_ddl", t.name), t.table_ddl());
        }
    }

    #[test]
    fn rollup_sql_snapshots() {
        let batch = |n: &str| format!("batch.{n}");
        for r in ROLLUPS {
            insta::assert_snapshot!(format!("{}_rollup_ddl", r.name), r.table_ddl());
            insta::assert_snapshot!(format!("{}_rollup_fill", r.name), r.fill_sql(&batch, false));
            insta::assert_snapshot!(format!("{}_rollup_fill_hours", r.name), r.fill_sql(&batch, true));
        }
    }

    #[test]
    fn rollups_are_keyed_by_hour_first_and_read_product_demand() {
        for r in ROLLUPS {
            assert_eq!(r.columns()[0], (ROLLUP_HOUR, SqlType::TimestampTz), "{}", r.name);
            assert!(r.reads.contains(&PRODUCT_DEMAND_HOURLY), "{}", r.name);
            // The hour filter binds one parameter, in both statements; a
            // rollup recomputed whole has none.
            let filtered = [r.clear_sql(true), r.fill_sql(&|n| n.to_string(), true)];
            if r.whole {
                assert!(filtered.iter().all(|sql| !sql.contains('$')), "{}", r.name);
            } else {
                assert!(filtered.iter().all(|sql| sql.contains("= ANY($1)")), "{}", r.name);
            }
            assert!(!r.clear_sql(false).contains('$') && !r.fill_sql(&|n| n.to_string(), false).contains('$'));
        }
    }

    #[test]
    fn derived_view_sql_snapshots() {
        for d in DERIVED_VIEWS {
            insta::assert_snapshot!(format!("{}_serving", d.name), d.serving_view_sql());
        }
        insta::assert_snapshot!("latest_demand_hour", latest_hour_function_sql());
    }

    #[test]
    fn only_tables_of_events_have_a_window() {
        assert_eq!(PRODUCTS.window(), None);
        assert_eq!(DEMAND_BASELINE.window(), Some(chrono::TimeDelta::days(BASELINE_DAYS)));
        assert_eq!(ITEM_SIMILARITY.window(), Some(chrono::TimeDelta::days(SIMILARITY_DAYS)));
    }

    #[test]
    fn category_demand_carries_every_product_demand_measure() {
        let sql = CATEGORY_DEMAND_HOURLY.serving_view_sql();
        let rollup = CATEGORY_DEMAND_ROLLUP.fill_sql(&|n| format!("batch.{n}"), false);
        for m in product_demand_hourly().measure_names() {
            assert!(
                sql.contains(&format!("sum({m})::bigint AS {m}")) && sql.contains(&format!("s.{m}")),
                "{m} missing"
            );
            assert!(rollup.contains(&format!("sum(d.{m})::bigint AS {m}")), "{m} missing from the rollup");
        }
    }

    #[test]
    fn serving_relations_are_unique_and_user_level_ones_hidden_from_dashboards() {
        let all = serving_relations(views::all());
        for r in &all {
            assert_eq!(all.iter().filter(|s| s.name == r.name).count(), 1, "{}", r.name);
        }
        let user_level: Vec<_> = all.iter().filter(|r| r.sql.contains("user_id")).map(|r| r.name).collect();
        assert_eq!(user_level, ["user_product_state"]);
        for r in all.iter().filter(|r| user_level.contains(&r.name)) {
            assert!(!r.readers.contains(&Reader::Dashboard), "{} is user-level", r.name);
        }
    }
}
