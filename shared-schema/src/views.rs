//! View definitions: each view is written down once, as data, and every
//! layer executes that one definition.
//!
//! A [`ViewDef`] names its key columns and its measures. A measure is a
//! per-event SQL expression plus a [`Merge`] rule; the aggregate that
//! computes a view from raw events is the merge rule applied to the
//! expression, and the same rule re-aggregates partial results. From this:
//!
//! * [`ViewDef::batch_sql`]: the batch layer's DataFusion query over a lake
//!   snapshot, below the offset cut;
//! * [`ViewDef::speed_sql`]: the speed layer's DataFusion query over one
//!   micro-batch, grouped additionally by Kafka partition and offset segment
//!   (for views with additive measures);
//! * [`ViewDef::speed_upsert_sql`]: how a delta folds into `speed.<view>`;
//! * [`ViewDef::serving_view_sql`]: the PostgreSQL view `serving.<view>`
//!   that merges `batch.<view>` with the speed rows at or above the cut;
//! * [`ViewDef::batch_table_ddl`] / [`ViewDef::speed_table_ddl`]: the tables.
//!
//! Expressions are written in the SQL subset that DataFusion and PostgreSQL
//! share (`CASE`, `CAST`, `date_bin`, comparison, arithmetic, aggregates
//! with `FILTER`), over the columns of [`crate::schema::events_schema`].

use std::fmt::Write as _;
use std::sync::{LazyLock, PoisonError, RwLock};

use crate::schema::col;

/// How partial results of a measure combine. The same function aggregates
/// events into a view and merges partial views into one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    /// Additive (counts, sums). Needs the offset cut to avoid double counting.
    Sum,
    /// Idempotent greatest value (last-seen times). Merges without segments:
    /// counting a record twice cannot change a maximum.
    Max,
    /// Idempotent least value (first-seen times), the mirror of [`Merge::Max`].
    Min,
}

impl Merge {
    /// The aggregate that computes the measure and merges partial results.
    fn aggregate(self) -> &'static str {
        match self {
            Merge::Sum => "sum",
            Merge::Max => "max",
            Merge::Min => "min",
        }
    }

    /// Whether counting a record twice leaves the result unchanged, so
    /// partial results merge without the offset cut's segments.
    pub fn idempotent(self) -> bool {
        !matches!(self, Merge::Sum)
    }

    /// PostgreSQL's two-argument form folding a new partial result into a
    /// stored one (`None` for sums, which add).
    fn pick(self) -> Option<&'static str> {
        match self {
            Merge::Sum => None,
            Merge::Max => Some("GREATEST"),
            Merge::Min => Some("LEAST"),
        }
    }
}

/// Column types, mapped to both Arrow (through DataFusion) and PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlType {
    BigInt,
    Double,
    Text,
    TimestampTz,
}

impl SqlType {
    pub fn postgres(self) -> &'static str {
        match self {
            SqlType::BigInt => "bigint",
            SqlType::Double => "double precision",
            SqlType::Text => "text",
            SqlType::TimestampTz => "timestamptz",
        }
    }
}

/// A grouping column of a view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub name: &'static str,
    /// Per-event expression over the source.
    pub expr: &'static str,
    pub ty: SqlType,
}

/// A value column of a view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measure {
    pub name: &'static str,
    /// Per-event expression; the view holds `merge(expr)` per key, over the
    /// events `only` selects.
    pub expr: &'static str,
    /// The events the measure takes (`None`: all of the key's): a `FILTER`
    /// clause of the aggregate, which DataFusion evaluates without a
    /// `CASE` per row and PostgreSQL reads alike.
    pub only: Option<&'static str>,
    pub ty: SqlType,
    pub merge: Merge,
}

impl Measure {
    /// The aggregate computing this measure from events: `count(*)` for a
    /// sum of ones, `COALESCE(sum(…), 0)` for a filtered sum (a key with
    /// no selected event holds 0, not NULL), the merge rule otherwise.
    pub fn aggregate_sql(&self) -> String {
        match (self.merge, self.only, self.expr) {
            (Merge::Sum, None, "1") => "count(*)".to_string(),
            (Merge::Sum, Some(only), "1") => format!("count(*) FILTER (WHERE {only})"),
            (Merge::Sum, Some(only), expr) => format!("COALESCE(sum({expr}) FILTER (WHERE {only}), 0)"),
            (merge, Some(only), expr) => format!("{}({expr}) FILTER (WHERE {only})", merge.aggregate()),
            (merge, None, expr) => format!("{}({expr})", merge.aggregate()),
        }
    }
}

/// What a view is computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The `events` table (lake snapshot or micro-batch).
    Events,
    /// `events` joined with the product catalog (`products`), for keys that
    /// need a product's attributes. Events of unknown products keep their
    /// place under the key expression's fallback.
    EventsWithCatalog,
}

/// One view, defined once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViewDef {
    pub name: &'static str,
    pub source: Source,
    pub keys: &'static [Key],
    pub measures: &'static [Measure],
    /// Events the view considers at all (`None`: every event).
    pub filter: Option<&'static str>,
    /// Roles that may read `serving.<view>`. User-level views are never
    /// readable by [`Reader::Dashboard`].
    pub readers: &'static [Reader],
    /// The key that is the event's hour ([`HOUR_EXPR`]),
    /// if any: an incremental batch run recomputes only the hours that new
    /// events touched.
    pub hour_key: Option<&'static str>,
}

/// The read-only roles of `DESIGN.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    /// Marketing dashboards and BI tools: aggregates only.
    Dashboard,
    /// The recommender: what personalised recommendations need.
    Recommender,
}

impl Reader {
    pub fn role(self) -> &'static str {
        match self {
            Reader::Dashboard => "dashboard_reader",
            Reader::Recommender => "recommender_reader",
        }
    }
}

/// A stable 64-bit FNV-1a hash of `text`, in hex: fingerprints of
/// generated SQL (not a security hash).
pub fn fnv1a(text: &str) -> String {
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{hash:016x}")
}

/// Name of the speed-table column holding the Kafka partition.
pub const PARTITION_COLUMN: &str = "kafka_partition";
/// Name of the speed-table column holding the offset segment.
pub const SEGMENT_COLUMN: &str = "segment";

impl ViewDef {
    /// Whether speed rows carry partition and segment: needed as soon as one
    /// measure is additive, since only those can be double counted.
    pub fn segmented(&self) -> bool {
        self.measures.iter().any(|m| !m.merge.idempotent())
    }

    pub fn key_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.keys.iter().map(|k| k.name)
    }

    pub fn measure_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.measures.iter().map(|m| m.name)
    }

    /// Columns of `batch.<view>`: keys then measures.
    pub fn batch_columns(&self) -> Vec<(&'static str, SqlType)> {
        let keys = self.keys.iter().map(|k| (k.name, k.ty));
        keys.chain(self.measures.iter().map(|m| (m.name, m.ty))).collect()
    }

    /// Columns of `speed.<view>`: keys, partition and segment (when
    /// segmented), then measures. The speed query's output has this order.
    pub fn speed_columns(&self) -> Vec<(&'static str, SqlType)> {
        let mut cols: Vec<_> = self.keys.iter().map(|k| (k.name, k.ty)).collect();
        if self.segmented() {
            cols.push((PARTITION_COLUMN, SqlType::BigInt));
            cols.push((SEGMENT_COLUMN, SqlType::BigInt));
        }
        cols.extend(self.measures.iter().map(|m| (m.name, m.ty)));
        cols
    }

    fn source_clause(&self, events: &str) -> String {
        match self.source {
            Source::Events => format!("{events} AS e"),
            Source::EventsWithCatalog => {
                format!("{events} AS e LEFT JOIN products AS p ON p.product_id = e.product_id")
            }
        }
    }

    fn select_list(&self, out: &mut String, extra_keys: &[(&str, &str)]) {
        let mut items: Vec<String> = self.keys.iter().map(|k| format!("{} AS {}", k.expr, k.name)).collect();
        items.extend(extra_keys.iter().map(|(expr, name)| format!("{expr} AS {name}")));
        items.extend(self.measures.iter().map(|m| format!("{} AS {}", m.aggregate_sql(), m.name)));
        out.push_str(&items.join(",\n       "));
    }

    fn where_clause(&self, out: &mut String) {
        if let Some(filter) = self.filter {
            let _ = write!(out, "\nWHERE ({filter})");
        }
    }

    fn group_by(out: &mut String, n: usize) {
        let positions: Vec<String> = (1..=n).map(|i| i.to_string()).collect();
        let _ = write!(out, "\nGROUP BY {}", positions.join(", "));
    }

    /// The batch query (DataFusion SQL) over the table registered as
    /// `events` (and `products` for catalog views). Which events it sees
    /// (below the offset cut, the hours to recompute) is the registered
    /// table's business: the batch layer registers `events` with those
    /// filters as DataFusion expressions, so no predicate is pasted in.
    pub fn batch_sql(&self) -> String {
        let mut sql = String::from("SELECT ");
        self.select_list(&mut sql, &[]);
        let _ = write!(sql, "\nFROM {}", self.source_clause("events"));
        self.where_clause(&mut sql);
        Self::group_by(&mut sql, self.keys.len());
        sql
    }

    /// A stable fingerprint of what the batch computes for this view (its
    /// batch SQL): it changes when a key, a measure or the filter does.
    pub fn fingerprint(&self) -> String {
        fnv1a(&self.batch_sql())
    }

    /// The speed query (DataFusion SQL) over one micro-batch registered as
    /// `events`; output columns are [`Self::speed_columns`].
    pub fn speed_sql(&self, segment_size: i64) -> String {
        let mut sql = String::from("SELECT ");
        let partition = format!("CAST(e.{} AS BIGINT)", col::KAFKA_PARTITION);
        let segment = format!("e.{} / {segment_size}", col::KAFKA_OFFSET);
        let extra: &[(&str, &str)] =
            if self.segmented() { &[(&partition, PARTITION_COLUMN), (&segment, SEGMENT_COLUMN)] } else { &[] };
        self.select_list(&mut sql, extra);
        let _ = write!(sql, "\nFROM {}", self.source_clause("events"));
        self.where_clause(&mut sql);
        Self::group_by(&mut sql, self.keys.len() + extra.len());
        sql
    }

    fn column_ddl(cols: &[(&str, SqlType)], not_null: usize) -> String {
        cols.iter()
            .enumerate()
            .map(|(i, (name, ty))| {
                let null = if i < not_null { " NOT NULL" } else { "" };
                format!("    {name} {}{null}", ty.postgres())
            })
            .collect::<Vec<_>>()
            .join(",\n")
    }

    /// `CREATE TABLE` for `<schema>.<view>` in the batch layout (used for
    /// `batch.*` and its staging copies).
    pub fn batch_table_ddl(&self, schema: &str) -> String {
        self.batch_table_ddl_as(&format!("{schema}.{}", self.name))
    }

    /// `CREATE TABLE` for `table` (qualified) in the batch layout.
    pub fn batch_table_ddl_as(&self, table: &str) -> String {
        let cols = Self::column_ddl(&self.batch_columns(), self.keys.len());
        let pk: Vec<_> = self.key_names().collect();
        format!("CREATE TABLE {table} (\n{cols},\n    PRIMARY KEY ({})\n)", pk.join(", "))
    }

    /// A fingerprint of the view's tables (columns, types, keys): a
    /// redefined view whose shape is unchanged keeps its tables.
    pub fn shape(&self) -> String {
        fnv1a(&format!("{}\n{}", self.batch_table_ddl("batch"), self.speed_table_ddl()))
    }

    /// The primary key of `speed.<view>`: the view's keys, and for a
    /// segmented view the partition and segment; the first columns of
    /// [`ViewDef::speed_columns`].
    pub fn speed_key_names(&self) -> Vec<&'static str> {
        let mut pk: Vec<_> = self.key_names().collect();
        if self.segmented() {
            pk.extend([PARTITION_COLUMN, SEGMENT_COLUMN]);
        }
        pk
    }

    /// `CREATE TABLE` for `speed.<view>`.
    pub fn speed_table_ddl(&self) -> String {
        let pk = self.speed_key_names();
        let cols = Self::column_ddl(&self.speed_columns(), pk.len());
        format!("CREATE TABLE speed.{} (\n{cols},\n    PRIMARY KEY ({})\n)", self.name, pk.join(", "))
    }

    /// Folds the rows of `source` (same columns as `speed.<view>`) into
    /// `speed.<view>`: additive measures add, `max` measures keep the
    /// greatest.
    pub fn speed_upsert_sql(&self, source: &str) -> String {
        let cols: Vec<_> = self.speed_columns().iter().map(|(n, _)| *n).collect();
        self.upsert_sql(&format!("speed.{}", self.name), &cols, &self.speed_key_names(), source)
    }

    /// Folds the rows of `source` (same columns as `batch.<view>`) into
    /// `batch.<view>` with the merge rules: how an incremental batch run
    /// extends a view whose measures all merge by `max` or `min`. The rows
    /// go in key order, so consecutive rows find their neighbours in the
    /// index pages the previous ones read (measured in
    /// `docs/BENCHMARKS.md`).
    pub fn batch_upsert_sql(&self, source: &str) -> String {
        let cols: Vec<_> = self.batch_columns().iter().map(|(n, _)| *n).collect();
        let keys: Vec<_> = self.key_names().collect();
        let ordered = format!("{source} ORDER BY {}", keys.join(", "));
        self.upsert_sql(&format!("batch.{}", self.name), &cols, &keys, &ordered)
    }

    /// [`Self::batch_upsert_sql`], and in the same statement the speed
    /// rows that the batch rows as written now dominate deleted (see
    /// [`Self::speed_prune_sql`]): the prune meets only the keys folded in,
    /// each with its whole new batch row (neither the rows folded in nor
    /// the old batch row alone dominates a speed row that holds the newer
    /// value of each), and never reads the rest of the batch table.
    pub fn batch_fold_sql(&self, source: &str) -> String {
        let upsert = self.batch_upsert_sql(source);
        match self.speed_prune_sql("written") {
            Some(prune) => {
                let cols: Vec<_> = self.key_names().chain(self.measure_names()).map(|c| format!("t.{c}")).collect();
                format!("WITH written AS (\n{upsert}\nRETURNING {}\n)\n{prune}", cols.join(", "))
            }
            None => upsert,
        }
    }

    /// For a view whose measures all merge by `max` or `min` (no segments),
    /// the statement that deletes the speed rows the batch rows dominate:
    /// every measure absent or no further out than the batch's. Such a row
    /// adds nothing to the serving merge (the batch's value wins), so deleting
    /// it never changes what readers see; it is what "below the cut" means
    /// for a view without offsets. `batch` is the relation holding the batch
    /// rows (`batch.<view>`, or the table a publish is about to swap in).
    /// `None` for segmented views (their speed rows are pruned by segment).
    pub fn speed_prune_sql(&self, batch: &str) -> Option<String> {
        if !self.mergeable_by_upsert() {
            return None;
        }
        let keys: Vec<String> = self.key_names().map(|k| format!("b.{k} = s.{k}")).collect();
        let dominated: Vec<String> = self
            .measures
            .iter()
            .map(|m| {
                let within = if m.merge == Merge::Min { ">=" } else { "<=" };
                format!("(s.{0} IS NULL OR s.{0} {within} b.{0})", m.name)
            })
            .collect();
        Some(format!(
            "DELETE FROM speed.{name} s USING {batch} b\nWHERE {keys}\n  AND {dominated}",
            name = self.name,
            keys = keys.join(" AND "),
            dominated = dominated.join("\n  AND ")
        ))
    }

    /// Whether an incremental batch run may fold new rows into the view
    /// (every measure idempotent) instead of recomputing whole hours.
    pub fn mergeable_by_upsert(&self) -> bool {
        self.measures.iter().all(|m| m.merge.idempotent())
    }

    fn upsert_sql(&self, target: &str, cols: &[&str], conflict: &[&str], source: &str) -> String {
        let updates: Vec<String> = self
            .measures
            .iter()
            .map(|m| match m.merge.pick() {
                // COALESCE: a row written before a migration added this
                // measure holds NULL there.
                None => format!("{0} = COALESCE(t.{0}, 0) + EXCLUDED.{0}", m.name),
                // GREATEST and LEAST ignore NULLs.
                Some(pick) => format!("{0} = {pick}(t.{0}, EXCLUDED.{0})", m.name),
            })
            .collect();
        format!(
            "INSERT INTO {target} AS t ({cols})\nSELECT {cols} FROM {source}\nON CONFLICT ({pk}) DO UPDATE SET\n    {updates}",
            cols = cols.join(", "),
            pk = conflict.join(", "),
            updates = updates.join(",\n    "),
        )
    }

    /// The PostgreSQL view `serving.<view>`: batch rows plus the speed rows
    /// at or above the cut of their partition, merged per key.
    /// The speed rows the batch does not hold yet (for a segmented view,
    /// those at or above the cut), with the keys and measures as columns:
    /// the speed side of the merge.
    pub fn speed_rows_sql(&self) -> String {
        let cols: Vec<String> = self.key_names().chain(self.measure_names()).map(|c| format!("s.{c}")).collect();
        if self.segmented() {
            format!(
                "SELECT {cols}\n    FROM speed.{name} AS s\n    CROSS JOIN ops.deployment AS d\n    LEFT JOIN ops.cut AS c ON c.kafka_partition = s.{PARTITION_COLUMN}\n    WHERE s.{SEGMENT_COLUMN} * d.segment_size >= COALESCE(c.cut_offset, 0)",
                cols = cols.join(", "),
                name = self.name,
            )
        } else {
            format!("SELECT {} FROM speed.{} AS s", cols.join(", "), self.name)
        }
    }

    pub fn serving_view_sql(&self) -> String {
        let keys: Vec<_> = self.key_names().collect();
        let measures: Vec<_> = self.measure_names().collect();
        let merged: Vec<String> = self
            .measures
            .iter()
            .map(|m| match (m.merge, m.ty) {
                // PostgreSQL widens sum(bigint) to numeric; totals fit bigint.
                (Merge::Sum, SqlType::BigInt) => format!("sum({0})::bigint AS {0}", m.name),
                (merge, _) => format!("{}({1}) AS {1}", merge.aggregate(), m.name),
            })
            .collect();
        let plain = [keys.clone(), measures.clone()].concat().join(", ");
        let speed_branch = self.speed_rows_sql();
        format!(
            "CREATE OR REPLACE VIEW serving.{name} AS\nSELECT {keys},\n       {merged}\nFROM (\n    SELECT {plain} FROM batch.{name}\n    UNION ALL\n    {speed_branch}\n) AS merged\nGROUP BY {keys}",
            name = self.name,
            keys = keys.join(", "),
            merged = merged.join(",\n       "),
        )
    }
}

/// The event's hour in UTC. `date_bin` from the epoch is integer
/// arithmetic, where DataFusion's `date_trunc` on a time-zoned timestamp
/// converts every row through the zone (apache/datafusion#25325); it
/// answers in nanoseconds, cast back to the lake's microseconds. The
/// result is `date_trunc('hour', …)`'s, of the same type (the speed
/// layer's `deltas` tests test both).
pub const HOUR_EXPR: &str =
    "arrow_cast(date_bin(INTERVAL '1 hour', e.event_time), 'Timestamp(Microsecond, Some(\"UTC\"))')";

/// The view files shipped in the workspace's `views/` folder, embedded in
/// every binary: the platform's own views, which the derived relations
/// (categories, spikes, popularity, similarity) and the recommender read.
pub const BUILTIN_FILES: &[(&str, &str)] = &[
    ("views/product_demand_hourly.sql", include_str!("../../views/product_demand_hourly.sql")),
    ("views/user_product_state.sql", include_str!("../../views/user_product_state.sql")),
];

/// Name of the hourly demand view.
pub const PRODUCT_DEMAND_HOURLY: &str = "product_demand_hourly";
/// Name of the per-user last interaction times.
pub const USER_PRODUCT_STATE: &str = "user_product_state";

static BUILTIN: LazyLock<&'static [ViewDef]> =
    LazyLock::new(|| builtin_sources().into_iter().map(|v| v.def).collect::<Vec<_>>().leak());

/// A view with the SQL text it was parsed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewSource {
    pub def: ViewDef,
    pub sql: String,
}

/// The shipped views with their text, parsed from [`BUILTIN_FILES`].
pub fn builtin_sources() -> Vec<ViewSource> {
    BUILTIN_FILES
        .iter()
        .map(|(file, text)| ViewSource {
            // The shipped files are checked by this crate's tests; a
            // refusal here is a build that was never tested.
            def: crate::view_sql::parse(file, text).unwrap_or_else(|e| panic!("shipped view refused: {e}")),
            sql: (*text).to_string(),
        })
        .collect()
}

/// The shipped views, parsed from [`BUILTIN_FILES`] once.
pub fn builtin() -> &'static [ViewDef] {
    &BUILTIN
}

/// The set [`install`] made current; the shipped views until then.
static INSTALLED: RwLock<Option<&'static [ViewDef]>> = RwLock::new(None);

/// Makes `views` the set [`all`] returns: what a service does once it has
/// loaded the registered views (`ops.views`), at start and when they
/// change. An unchanged set keeps the current slice, so reloading leaks
/// memory only when a view changed.
pub fn install(views: Vec<ViewDef>) -> &'static [ViewDef] {
    let mut installed = INSTALLED.write().unwrap_or_else(PoisonError::into_inner);
    match *installed {
        Some(current) if current == views.as_slice() => current,
        _ => {
            let leaked: &'static [ViewDef] = views.leak();
            *installed = Some(leaked);
            leaked
        }
    }
}

/// Every view the platform maintains, in publish order: the installed set
/// (see [`install`]), else the shipped views.
pub fn all() -> &'static [ViewDef] {
    let installed = *INSTALLED.read().unwrap_or_else(PoisonError::into_inner);
    installed.unwrap_or_else(builtin)
}

/// Looks a view up by name.
pub fn view(name: &str) -> Option<&'static ViewDef> {
    all().iter().find(|v| v.name == name)
}

/// A shipped view as currently installed (its expressions may differ from
/// the embedded file's; its columns may not: see
/// [`crate::view_sql::load_dir`]).
fn shipped(name: &str) -> &'static ViewDef {
    view(name)
        .or_else(|| builtin().iter().find(|v| v.name == name))
        .unwrap_or_else(|| panic!("{name} is a shipped view"))
}

/// Hourly demand per product.
pub fn product_demand_hourly() -> &'static ViewDef {
    shipped(PRODUCT_DEMAND_HOURLY)
}

/// Last interaction times per user and product, for recommendations.
pub fn user_product_state() -> &'static ViewDef {
    shipped(USER_PRODUCT_STATE)
}

static INTERACTIONS: LazyLock<ViewDef> = LazyLock::new(|| {
    let state = user_product_state();
    let measures: Vec<Measure> = product_demand_hourly().measures.iter().chain(state.measures).copied().collect();
    ViewDef {
        name: "user_product_interactions",
        source: Source::Events,
        keys: state.keys,
        measures: measures.leak(),
        filter: None,
        readers: &[],
        hour_key: None,
    }
});

/// The recommender's training data: per user and product, the demand
/// measures and the last time of each interaction. Exported from the lake
/// (`batch-layer export-training`), not maintained in PostgreSQL.
pub fn user_product_interactions() -> &'static ViewDef {
    &INTERACTIONS
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The views as Rust code wrote them before they became files (issue
    /// 20): the files must parse to exactly these, so nothing a deployment
    /// computed changes (same SQL, same fingerprints).
    mod former {
        use super::super::*;

        const fn sum_of(name: &'static str, event_type: &'static str, expr: &'static str) -> Measure {
            Measure { name, expr, only: Some(event_type), ty: SqlType::BigInt, merge: Merge::Sum }
        }

        const fn last_time(name: &'static str, only: &'static str) -> Measure {
            Measure { name, expr: "e.event_time", only: Some(only), ty: SqlType::TimestampTz, merge: Merge::Max }
        }

        const HOUR: Key = Key { name: "hour", expr: HOUR_EXPR, ty: SqlType::TimestampTz };

        pub(super) const PRODUCT_DEMAND_HOURLY: ViewDef = ViewDef {
            name: "product_demand_hourly",
            source: Source::Events,
            keys: &[HOUR, Key { name: "product_id", expr: "e.product_id", ty: SqlType::Text }],
            measures: &[
                sum_of("views", "e.event_type = 'page_view'", "1"),
                sum_of("cart_adds", "e.event_type = 'add_to_cart'", "1"),
                sum_of("cart_removes", "e.event_type = 'remove_from_cart'", "1"),
                sum_of("purchases", "e.event_type = 'purchase'", "1"),
                sum_of("units", "e.event_type = 'purchase'", "CAST(e.quantity AS BIGINT)"),
                sum_of("revenue_cents", "e.event_type = 'purchase'", "CAST(e.quantity AS BIGINT) * e.price_cents"),
            ],
            filter: None,
            readers: &[Reader::Dashboard],
            hour_key: Some("hour"),
        };

        pub(super) const USER_PRODUCT_STATE: ViewDef = ViewDef {
            name: "user_product_state",
            source: Source::Events,
            keys: &[
                Key { name: "user_id", expr: "e.user_id", ty: SqlType::Text },
                Key { name: "product_id", expr: "e.product_id", ty: SqlType::Text },
            ],
            measures: &[
                last_time("last_viewed_at", "e.event_type = 'page_view'"),
                last_time("last_carted_at", "e.event_type = 'add_to_cart'"),
                last_time("last_removed_at", "e.event_type = 'remove_from_cart'"),
                last_time("last_purchased_at", "e.event_type = 'purchase'"),
            ],
            filter: None,
            readers: &[Reader::Recommender],
            hour_key: None,
        };
    }

    #[test]
    fn shipped_files_are_the_former_definitions() {
        assert_eq!(builtin(), [former::PRODUCT_DEMAND_HOURLY, former::USER_PRODUCT_STATE]);
        for (file, v) in BUILTIN_FILES.iter().zip(builtin()) {
            assert!(file.0.ends_with(&format!("/{}.sql", v.name)), "{} holds {}", file.0, v.name);
        }
        assert_eq!(product_demand_hourly().fingerprint(), former::PRODUCT_DEMAND_HOURLY.fingerprint());
    }

    #[test]
    fn product_demand_sql_snapshots() {
        let v = product_demand_hourly();
        insta::assert_snapshot!("product_demand_batch", v.batch_sql());
        insta::assert_snapshot!("product_demand_speed", v.speed_sql(1000));
        insta::assert_snapshot!("product_demand_upsert", v.speed_upsert_sql("delta"));
        insta::assert_snapshot!("product_demand_serving", v.serving_view_sql());
        insta::assert_snapshot!("product_demand_batch_ddl", v.batch_table_ddl("batch"));
        insta::assert_snapshot!("product_demand_speed_ddl", v.speed_table_ddl());
    }

    #[test]
    fn hour_keys_are_the_event_hour() {
        for v in all() {
            if let Some(name) = v.hour_key {
                let key = v.keys.iter().find(|k| k.name == name).expect("hour key is a key");
                assert_eq!(key.expr, HOUR_EXPR, "{}", v.name);
            } else {
                assert!(v.mergeable_by_upsert(), "{} needs an hour key or max-only measures", v.name);
            }
        }
        insta::assert_snapshot!("user_product_state_batch_upsert", user_product_state().batch_upsert_sql("staging"));
        insta::assert_snapshot!("user_product_state_batch_fold", user_product_state().batch_fold_sql("staging"));
    }

    #[test]
    fn max_only_views_are_not_segmented() {
        let v = user_product_state();
        assert!(!v.segmented());
        assert!(product_demand_hourly().segmented());
        assert!(!v.speed_sql(1000).contains("segment"));
        insta::assert_snapshot!("user_product_state_upsert", v.speed_upsert_sql("delta"));
        insta::assert_snapshot!("user_product_state_serving", v.serving_view_sql());
        insta::assert_snapshot!(
            "user_product_state_speed_prune",
            v.speed_prune_sql("batch.user_product_state").unwrap()
        );
        assert_eq!(
            product_demand_hourly().speed_prune_sql("batch.product_demand_hourly"),
            None,
            "segmented views are pruned by segment"
        );
    }

    #[test]
    fn min_measures_merge_by_least() {
        let first_seen = Measure {
            name: "first_seen_at",
            expr: "e.event_time",
            only: None,
            ty: SqlType::TimestampTz,
            merge: Merge::Min,
        };
        let v = ViewDef { measures: std::slice::from_ref(Box::leak(Box::new(first_seen))), ..*user_product_state() };
        assert!(!v.segmented() && v.mergeable_by_upsert(), "a minimum is idempotent");
        assert!(v.batch_sql().contains("min(e.event_time) AS first_seen_at"), "{}", v.batch_sql());
        assert!(v.speed_upsert_sql("d").contains("first_seen_at = LEAST(t.first_seen_at, EXCLUDED.first_seen_at)"));
        assert!(v.serving_view_sql().contains("min(first_seen_at) AS first_seen_at"));
        let prune = v.speed_prune_sql("b").unwrap();
        assert!(prune.contains("(s.first_seen_at IS NULL OR s.first_seen_at >= b.first_seen_at)"), "{prune}");
    }

    #[test]
    fn speed_columns_order_matches_speed_query_and_table() {
        let v = product_demand_hourly();
        let names: Vec<_> = v.speed_columns().iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "hour",
                "product_id",
                "kafka_partition",
                "segment",
                "views",
                "cart_adds",
                "cart_removes",
                "purchases",
                "units",
                "revenue_cents"
            ]
        );
        let sql = v.speed_sql(1000);
        let mut last = 0;
        for n in names {
            let at = sql.find(&format!("AS {n}")).unwrap_or_else(|| panic!("{n} missing from {sql}"));
            assert!(at > last, "{n} out of order");
            last = at;
        }
    }

    #[test]
    fn training_interactions_reuse_the_demand_and_state_measures() {
        let names: Vec<_> = user_product_interactions().measure_names().collect();
        let expected: Vec<_> =
            product_demand_hourly().measures.iter().chain(user_product_state().measures).map(|m| m.name).collect();
        assert_eq!(names, expected);
        assert_eq!(user_product_interactions().keys, user_product_state().keys);
    }

    #[test]
    fn view_names_are_unique_and_found() {
        for v in all() {
            assert_eq!(view(v.name), Some(v));
            assert_eq!(all().iter().filter(|w| w.name == v.name).count(), 1);
        }
        assert_eq!(view("nope"), None);
    }
}
