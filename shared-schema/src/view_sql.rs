//! Views defined in SQL files (issue 20).
//!
//! A view file holds one `SELECT … FROM events AS e … GROUP BY …`. This
//! module parses it with the SQL parser DataFusion uses and derives the
//! [`ViewDef`] every layer executes: the `GROUP BY` expressions are the
//! keys, each aggregate is a measure whose merge rule follows from the
//! aggregate (`count` and `sum` add, `min` and `max` keep the least and
//! greatest), `FILTER (WHERE …)` selects a measure's events and `WHERE` the
//! view's. What cannot be merged exactly from partial results (an average,
//! a distinct count, a window, a function whose answer changes from run to
//! run) is refused with the file, the line and the reason, before anything
//! runs.
//!
//! The derived definition is the one that was written in Rust before: the
//! two shipped files parse to exactly the former constants, so their
//! generated SQL and fingerprints are unchanged.

use std::path::Path;

use sqlparser::ast::{
    BinaryOperator, DataType, DuplicateTreatment, Expr, Function, FunctionArg, FunctionArgExpr, FunctionArguments,
    GroupByExpr, Ident, ObjectName, Query, Select, SelectItem, SetExpr, Spanned, Statement, TimezoneInfo,
    UnaryOperator, Value,
};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::Span;

use crate::schema::{catalog_schema, events_schema};
use crate::views::{
    HOUR_EXPR, Key, Measure, Merge, PARTITION_COLUMN, Reader, SEGMENT_COLUMN, Source, SqlType, ViewDef, ViewSource,
};

/// Why a view file was refused: the file, where in it, and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {reason}")]
pub struct ViewError {
    pub file: String,
    /// 1-based; 1:1 when the reason concerns the whole file.
    pub line: u64,
    pub column: u64,
    pub reason: String,
}

/// The `FROM` clause of a view over events alone.
pub const FROM_EVENTS: &str = "events AS e";
/// The `FROM` clause of a view that also reads the product catalog.
pub const FROM_EVENTS_WITH_CATALOG: &str = "events AS e LEFT JOIN products AS p ON p.product_id = e.product_id";

/// The catalog columns a view may read as `p.<column>`: those published
/// in `batch.products`, which both the batch and the speed layer join.
pub const CATALOG_COLUMNS: &[&str] = &["product_id", "name", "category", "price_cents"];

/// The column `forget-user` erases users by, in every table that has it.
const USER_COLUMN: &str = "user_id";
const USER_KEY: &str = "a view stores a user id only as the key `e.user_id AS user_id`, the column `forget-user` erases users by; count users per key instead of keeping their ids";

/// Event columns that identify a person or a visit: a view keyed by one is
/// not an aggregate, and dashboards may not read it.
const PERSONAL_COLUMNS: &[&str] = &["user_id", "session_id", "event_id"];

/// Functions whose answer depends on when or how often they run: the batch
/// and the speed layer would compute different values for one event. The
/// batch layer's tests check this list against DataFusion's own volatility
/// of every function it knows.
pub const NON_DETERMINISTIC: &[&str] = &[
    "random",
    "rand",
    "today",
    "file_row_index",
    "input_file_name",
    "uuid",
    "now",
    "current_date",
    "current_time",
    "current_timestamp",
    "localtime",
    "localtimestamp",
    "clock_timestamp",
    "statement_timestamp",
    "transaction_timestamp",
    "timeofday",
    "gen_random_uuid",
    "nextval",
    "setseed",
];

/// Aggregates a view may use: the ones whose partial results merge exactly.
pub const MERGEABLE_AGGREGATES: &[&str] = &["count", "sum", "min", "max"];

const AVERAGE: &str = "an average of partial averages is not the average: keep sum(…) and count(…) as two measures and divide when reading";
const DISTINCT: &str = "a distinct count cannot be added up across hours, batches and the speed layer (each part may have seen the same value): count events, or key the view by the value";
const PERCENTILE: &str =
    "a median or percentile needs every value, not partial results: keep count(*) per value band as a measure instead";
const SPREAD: &str = "a variance or correlation is not kept from partial results here: keep sum(x), sum(x * x) and count(*) as measures and compute it when reading";
const WINDOW: &str = "a window function (OVER) looks at other rows than the group's, which partial results do not hold: a measure is count, sum, min or max per group";
const ONE_AGGREGATE: &str = "a measure is one aggregate, `count|sum|min|max(…) [FILTER (WHERE …)] AS name`: combine measures (ratios, differences) when reading";

/// Why an aggregate other than [`MERGEABLE_AGGREGATES`] is refused.
fn refused_aggregate(name: &str) -> Option<&'static str> {
    Some(match name {
        "avg" | "mean" => AVERAGE,
        "approx_distinct" | "count_distinct" => DISTINCT,
        "median"
        | "approx_median"
        | "approx_percentile_cont"
        | "approx_percentile_cont_with_weight"
        | "percentile_cont"
        | "percentile_disc"
        | "quantile_cont"
        | "quantile_disc" => PERCENTILE,
        "stddev" | "stddev_pop" | "stddev_samp" | "var" | "var_pop" | "var_samp" | "var_population" | "var_sample"
        | "variance" | "corr" | "covar" | "covar_pop" | "covar_samp" => SPREAD,
        "row_number" | "rank" | "dense_rank" | "percent_rank" | "cume_dist" | "ntile" | "lag" | "lead"
        | "nth_value" | "first_value" | "last_value" => WINDOW,
        "array_agg" | "string_agg" | "listagg" | "any_value" | "bit_and" | "bit_or" | "bit_xor" | "bool_and"
        | "bool_or" | "every" | "grouping" | "approx_top_k" => {
            "this aggregate cannot be merged exactly from partial results: a measure is count, sum, min or max"
        }
        n if n.starts_with("regr_") => SPREAD,
        _ => return None,
    })
}

/// A value's type as far as a view needs to know it: what PostgreSQL
/// column holds a key or a measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    Int32,
    Int64,
    Float,
    Text,
    Time,
    Bool,
    Interval,
    Null,
    /// Not inferred: fine inside an expression, refused as a stored column.
    Unknown,
}

impl Ty {
    fn of_arrow(ty: &arrow::datatypes::DataType) -> Ty {
        use arrow::datatypes::DataType as A;
        match ty {
            A::Int32 => Ty::Int32,
            A::Int64 => Ty::Int64,
            A::Float64 => Ty::Float,
            A::Utf8 | A::LargeUtf8 | A::Utf8View => Ty::Text,
            A::Timestamp(_, Some(_)) => Ty::Time,
            A::Boolean => Ty::Bool,
            _ => Ty::Unknown,
        }
    }

    fn numeric(self) -> bool {
        matches!(self, Ty::Int32 | Ty::Int64 | Ty::Float)
    }

    /// The PostgreSQL column type storing this value.
    fn stored(self) -> Result<SqlType, String> {
        match self {
            Ty::Int64 => Ok(SqlType::BigInt),
            Ty::Float => Ok(SqlType::Double),
            Ty::Text => Ok(SqlType::Text),
            Ty::Time => Ok(SqlType::TimestampTz),
            Ty::Int32 => Err("is a 32-bit integer: write CAST(… AS BIGINT) to store it".into()),
            Ty::Bool => Err("is a boolean: a view stores bigint, double, text or timestamptz; write CASE WHEN … THEN 'yes' ELSE 'no' END or CAST(… AS TEXT)".into()),
            _ => Err("has a type the view cannot tell: write CAST(… AS BIGINT | DOUBLE | TEXT)".into()),
        }
    }
}

/// A refusal before it knows its file.
struct Refusal {
    span: Span,
    reason: String,
}

fn refuse<T>(at: &impl Spanned, reason: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal { span: at.span(), reason: reason.into() })
}

/// Whether `name` is a lowercase SQL identifier PostgreSQL keeps whole
/// (letters, digits and `_`, not starting with a digit, at most 63
/// bytes): what the platform writes into SQL as a name, unquoted.
pub fn is_identifier(name: &str) -> bool {
    name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
}

/// The view's name: the file's stem, a lowercase SQL identifier that the
/// platform's own relations and shadow tables do not use.
pub fn view_name(file: &str) -> Result<String, String> {
    let stem = Path::new(file).file_stem().and_then(|s| s.to_str()).unwrap_or_default();
    if stem.len() > 60 || stem.contains("__") {
        return Err(format!(
            "the view name `{stem}` must be at most 60 characters, without `__` (kept for shadow tables)"
        ));
    }
    if !is_identifier(stem) {
        return Err(format!(
            "the file name `{stem}` is the view's name and must be a lowercase SQL identifier: letters, digits and _"
        ));
    }
    Ok(stem.to_string())
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// Parses and checks one view file: `file` names it in errors and gives
/// the view its name (the file stem), `text` is its content.
///
/// The definition's strings are leaked: views are loaded once at start
/// and again only when a file changes, so this stays a few kilobytes.
pub fn parse(file: &str, text: &str) -> Result<ViewDef, ViewError> {
    let whole = |reason: String| ViewError { file: file.to_string(), line: 1, column: 1, reason };
    let name = view_name(file).map_err(whole)?;
    let query = parse_query(text).map_err(|(line, column, reason)| ViewError {
        file: file.to_string(),
        line,
        column,
        reason,
    })?;
    let readers = readers_directive(text);
    let parsed = check_query(&query).map_err(|r| {
        let (line, column) = if r.span.start.line == 0 { (1, 1) } else { (r.span.start.line, r.span.start.column) };
        ViewError { file: file.to_string(), line, column, reason: r.reason }
    })?;
    let (directive_line, requested) =
        readers.map_err(|(line, reason)| ViewError { file: file.to_string(), line, column: 1, reason })?;
    let readers: Vec<Reader> = match requested {
        Some(readers) => {
            if parsed.personal && readers.contains(&Reader::Dashboard) {
                return Err(ViewError {
                    file: file.to_string(),
                    line: directive_line,
                    column: 1,
                    reason: "dashboards read aggregates only: a view keyed by a user, a session or an event is for `-- readers: recommender` (or none)".into(),
                });
            }
            readers
        }
        None if parsed.personal => Vec::new(),
        None => vec![Reader::Dashboard],
    };
    Ok(ViewDef {
        name: leak(name),
        source: parsed.source,
        keys: Box::leak(parsed.keys.into_boxed_slice()),
        measures: Box::leak(parsed.measures.into_boxed_slice()),
        filter: parsed.filter.map(leak),
        readers: Box::leak(readers.into_boxed_slice()),
        hour_key: parsed.hour_key.map(leak),
    })
}

/// Names the platform's own relations use in `batch`, `speed` and
/// `serving`: a view file may not take them.
pub fn reserved_names() -> Vec<&'static str> {
    use crate::derived::{BATCH_TABLES, DERIVED_VIEWS, ROLLUPS};
    let own = BATCH_TABLES.iter().map(|t| t.name).chain(ROLLUPS.iter().map(|r| r.name));
    let own = own.chain(DERIVED_VIEWS.iter().map(|d| d.name));
    let fixed = ["event_keys", "model_recommendations", "user_product_interactions", "latest_demand_hour", "views"];
    own.chain(fixed).chain(["view_sources", "schema_state", "api_key"]).collect()
}

/// Every view of the folder `dir`: each `*.sql` file in it, checked. The
/// shipped views come first, in their order, then the others by name. All
/// refusals are returned, one per file at most.
///
/// The shipped views ([`crate::views::builtin`]) must be there, with their
/// keys and measures (names, types and merge rules): DESIGN.md names them
/// and the derived views and the recommender read them. Their expressions
/// may change.
pub fn load_dir(dir: &Path) -> Result<Vec<ViewSource>, Vec<ViewError>> {
    let at_file =
        |file: &Path, reason: String| ViewError { file: file.display().to_string(), line: 1, column: 1, reason };
    let entries = std::fs::read_dir(dir).map_err(|e| {
        vec![at_file(
            dir,
            format!("cannot read the views folder ({e}): set VIEWS_DIR or --views-dir to the folder of view files"),
        )]
    })?;
    let mut files: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql") && p.is_file())
        .collect();
    files.sort();
    let mut views = Vec::new();
    let mut errors = Vec::new();
    for path in &files {
        let shown = path.display().to_string();
        let parsed = std::fs::read_to_string(path)
            .map_err(|e| at_file(path, format!("cannot read: {e}")))
            .and_then(|text| Ok(ViewSource { def: parse(&shown, &text)?, sql: text }));
        match parsed {
            Ok(v) if reserved_names().contains(&v.def.name) => {
                errors.push(at_file(
                    path,
                    format!("`{}` is one of the platform's own relations: name the file otherwise", v.def.name),
                ));
            }
            Ok(v) => views.push((path, v)),
            Err(e) => errors.push(e),
        }
    }
    let mut ordered = Vec::new();
    for shipped in crate::views::builtin() {
        match views.iter().position(|(_, v)| v.def.name == shipped.name) {
            Some(i) => {
                let (path, v) = views.remove(i);
                match contract_breach(shipped, &v.def) {
                    Some(why) => errors.push(at_file(path, why)),
                    None => ordered.push(v),
                }
            }
            None if errors.iter().any(|e| Path::new(&e.file).file_stem().is_some_and(|s| s == shipped.name)) => {}
            None => errors.push(at_file(
                &dir.join(format!("{}.sql", shipped.name)),
                format!("missing: {} is one of the platform's own views, which DESIGN.md names and the derived views read; restore the file", shipped.name),
            )),
        }
    }
    ordered.extend(views.into_iter().map(|(_, v)| v));
    if errors.is_empty() { Ok(ordered) } else { Err(errors) }
}

/// How `v` departs from the shipped view's keys and measures, if it does.
fn contract_breach(shipped: &ViewDef, v: &ViewDef) -> Option<String> {
    let keys = |d: &ViewDef| d.keys.iter().map(|k| (k.name, k.ty)).collect::<Vec<_>>();
    let measures = |d: &ViewDef| d.measures.iter().map(|m| (m.name, m.ty, m.merge)).collect::<Vec<_>>();
    let hour = |d: &ViewDef| d.hour_key.is_some();
    if keys(shipped) == keys(v) && measures(shipped) == measures(v) && hour(shipped) == hour(v) {
        return None;
    }
    let names = |d: &ViewDef| d.key_names().chain(d.measure_names()).collect::<Vec<_>>().join(", ");
    Some(format!(
        "{} is one of the platform's own views: keep its columns {} with their types and aggregates (other measures go in a view file of their own)",
        shipped.name,
        names(shipped)
    ))
}

/// The one `SELECT` of the file, or the parser's error with its place.
fn parse_query(text: &str) -> Result<Query, (u64, u64, String)> {
    let statements = Parser::parse_sql(&GenericDialect {}, text).map_err(|e| parser_error(&e.to_string()))?;
    let mut statements = statements.into_iter();
    match (statements.next(), statements.next()) {
        (Some(Statement::Query(query)), None) => Ok(*query),
        (None, _) => Err((1, 1, "the file holds no SELECT".into())),
        (Some(first), None) => {
            let at = first.span().start;
            Err((at.line.max(1), at.column.max(1), "a view file holds one SELECT, not another statement".into()))
        }
        (Some(_), Some(second)) => {
            let at = second.span().start;
            Err((at.line.max(1), at.column.max(1), "a view file holds one SELECT; this is a second statement".into()))
        }
    }
}

/// sqlparser's messages end in "at Line: L, Column: C".
fn parser_error(message: &str) -> (u64, u64, String) {
    let number_after = |label: &str| {
        message.rfind(label).and_then(|i| {
            let rest = &message[i + label.len()..];
            rest.chars().take_while(char::is_ascii_digit).collect::<String>().parse::<u64>().ok()
        })
    };
    let reason = message.split(" at Line: ").next().unwrap_or(message);
    let reason = reason.strip_prefix("sql parser error: ").unwrap_or(reason);
    (number_after("Line: ").unwrap_or(1), number_after("Column: ").unwrap_or(1), format!("not valid SQL: {reason}"))
}

/// `-- readers: dashboard, recommender` (or `none`): who may read
/// `serving.<view>`. `None` without such a line.
#[allow(clippy::type_complexity)]
fn readers_directive(text: &str) -> Result<(u64, Option<Vec<Reader>>), (u64, String)> {
    let mut found = None;
    for (i, line) in text.lines().enumerate() {
        let line_no = i as u64 + 1;
        let Some(list) = line.trim().strip_prefix("--").map(str::trim).and_then(|l| l.strip_prefix("readers:")) else {
            continue;
        };
        if found.is_some() {
            return Err((line_no, "a second `-- readers:` line: name every reader on one".into()));
        }
        let mut readers = Vec::new();
        for word in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word {
                "dashboard" => readers.push(Reader::Dashboard),
                "recommender" => readers.push(Reader::Recommender),
                "none" => {}
                other => {
                    return Err((
                        line_no,
                        format!("unknown reader `{other}`: readers are dashboard, recommender or none"),
                    ));
                }
            }
        }
        readers.dedup();
        found = Some((line_no, readers));
    }
    Ok(match found {
        Some((line, readers)) => (line, Some(readers)),
        None => (1, None),
    })
}

/// What [`check_query`] derives.
struct Parsed {
    source: Source,
    keys: Vec<Key>,
    measures: Vec<Measure>,
    filter: Option<String>,
    hour_key: Option<String>,
    /// A key reads a personal column ([`PERSONAL_COLUMNS`]).
    personal: bool,
}

fn check_query(query: &Query) -> Result<Parsed, Refusal> {
    let unsupported = [
        (query.with.is_some(), "WITH"),
        (query.order_by.is_some(), "ORDER BY"),
        (query.limit_clause.is_some(), "LIMIT or OFFSET"),
        (query.fetch.is_some(), "FETCH"),
        (!query.locks.is_empty(), "FOR UPDATE"),
        (query.for_clause.is_some(), "FOR"),
        (query.settings.is_some(), "SETTINGS"),
        (query.format_clause.is_some(), "FORMAT"),
        (!query.pipe_operators.is_empty(), "a pipe operator"),
    ];
    if let Some((_, what)) = unsupported.iter().find(|(present, _)| *present) {
        return refuse(
            query,
            format!(
                "{what} is not part of a view: a view is one SELECT … FROM events AS e … GROUP BY …, whose rows every layer keeps whole"
            ),
        );
    }
    let SetExpr::Select(select) = query.body.as_ref() else {
        return refuse(
            query,
            "a view is one SELECT … GROUP BY …: UNION, VALUES and the like are not merged by the layers",
        );
    };
    check_select(select)
}

fn check_select(select: &Select) -> Result<Parsed, Refusal> {
    let unsupported = [
        (select.distinct.is_some(), "SELECT DISTINCT"),
        (select.top.is_some(), "TOP"),
        (select.into.is_some(), "SELECT INTO"),
        (!select.lateral_views.is_empty(), "LATERAL VIEW"),
        (select.prewhere.is_some(), "PREWHERE"),
        (!select.connect_by.is_empty(), "CONNECT BY"),
        (!select.cluster_by.is_empty(), "CLUSTER BY"),
        (!select.distribute_by.is_empty(), "DISTRIBUTE BY"),
        (!select.sort_by.is_empty(), "SORT BY"),
        (select.exclude.is_some(), "EXCLUDE"),
        (select.value_table_mode.is_some(), "SELECT AS VALUE"),
    ];
    if let Some((_, what)) = unsupported.iter().find(|(present, _)| *present) {
        return refuse(
            select,
            format!("{what} is not part of a view: a view is one SELECT … FROM events AS e … GROUP BY …"),
        );
    }
    if let Some(having) = &select.having {
        return refuse(
            having,
            "HAVING drops groups by their total, which no partial result knows: keep the groups and filter when reading",
        );
    }
    if !select.named_window.is_empty() || select.qualify.is_some() {
        return refuse(select, WINDOW);
    }
    let source = match select.from.as_slice() {
        [from] if from.to_string() == FROM_EVENTS => Source::Events,
        [from] if from.to_string() == FROM_EVENTS_WITH_CATALOG => Source::EventsWithCatalog,
        [] => return refuse(select, format!("a view reads `FROM {FROM_EVENTS}`")),
        [from, ..] => {
            return refuse(
                from,
                format!("a view reads `FROM {FROM_EVENTS}`, or with the catalog `FROM {FROM_EVENTS_WITH_CATALOG}`"),
            );
        }
    };
    let mut check = Checker { catalog: source == Source::EventsWithCatalog, columns: Vec::new() };
    let filter = match &select.selection {
        Some(filter) => {
            check.condition(filter)?;
            Some(filter.to_string())
        }
        None => None,
    };

    // Each item of the select list: a key (grouped) or a measure.
    let mut keys: Vec<(Key, String, Span)> = Vec::new();
    let mut measures = Vec::new();
    let mut hour_key = None;
    let mut personal = false;
    let mut items = Vec::new();
    for item in &select.projection {
        let (expr, name) = match item {
            SelectItem::ExprWithAlias { expr, alias } => (expr, column_name(alias)?),
            SelectItem::UnnamedExpr(expr @ Expr::CompoundIdentifier(parts)) if parts.len() == 2 => {
                (expr, column_name(&parts[1])?)
            }
            SelectItem::UnnamedExpr(expr) => {
                return refuse(expr, "name this column: `… AS name`");
            }
            other => return refuse(other, "a view lists its columns: `*` is not allowed"),
        };
        if items.iter().any(|(n, _)| *n == name) || [PARTITION_COLUMN, SEGMENT_COLUMN].contains(&name.as_str()) {
            return refuse(
                item,
                format!(
                    "the column name `{name}` is taken: names are unique, and `{PARTITION_COLUMN}`, `{SEGMENT_COLUMN}` are the speed layer's"
                ),
            );
        }
        items.push((name.clone(), expr.span()));
        if let Some(f) = as_aggregate(expr) {
            measures.push(check.measure(f, leak(name))?);
            continue;
        }
        check.columns.clear();
        let key = if is_hour(expr) {
            if hour_key.is_some() {
                return refuse(expr, "a view has at most one hour key");
            }
            hour_key = Some(name.clone());
            Key { name: leak(name), expr: HOUR_EXPR, ty: SqlType::TimestampTz }
        } else {
            let ty = check.scalar(expr)?;
            let ty = ty.stored().or_else(|why| refuse(expr, format!("the key `{name}` {why}")))?;
            Key { name: leak(name), expr: leak(expr.to_string()), ty }
        };
        let reads_user = check.columns.iter().any(|c| c == USER_COLUMN);
        if reads_user && !(key.name == USER_COLUMN && key.expr == format!("e.{USER_COLUMN}")) {
            return refuse(expr, USER_KEY);
        }
        personal |= check.columns.iter().any(|c| PERSONAL_COLUMNS.contains(&c.as_str()));
        keys.push((key, expr.to_string(), expr.span()));
    }

    let grouped = group_by(select, &items, &keys)?;
    if keys.is_empty() {
        return refuse(
            select,
            "a view needs at least one key: GROUP BY the columns it is per (the hour, the product, …)",
        );
    }
    if let Some((_, text, span)) = keys.iter().zip(&grouped).find(|(_, g)| !**g).map(|(k, _)| k) {
        return Err(Refusal { span: *span, reason: format!("`{text}` is neither aggregated nor in GROUP BY") });
    }
    if measures.is_empty() {
        return refuse(select, "a view needs at least one measure: count(*), sum(…), min(…) or max(…)");
    }
    Ok(Parsed { source, keys: keys.into_iter().map(|(k, _, _)| k).collect(), measures, filter, hour_key, personal })
}

/// Marks which keys the `GROUP BY` names (by position, by alias or by the
/// same expression); refuses anything else in it.
fn group_by(select: &Select, items: &[(String, Span)], keys: &[(Key, String, Span)]) -> Result<Vec<bool>, Refusal> {
    let exprs = match &select.group_by {
        GroupByExpr::Expressions(exprs, modifiers) if modifiers.is_empty() => exprs,
        GroupByExpr::Expressions(..) => {
            return refuse(select, "GROUP BY ROLLUP, CUBE and the like add rows of totals: GROUP BY the keys only");
        }
        GroupByExpr::All(_) => return refuse(select, "write the keys out: GROUP BY 1, 2 or the key expressions"),
    };
    let mut grouped = vec![false; keys.len()];
    for g in exprs {
        let named = match g {
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => {
                    let position = n.parse::<usize>().ok().filter(|p| (1..=items.len()).contains(p));
                    let Some(position) = position else {
                        return refuse(g, format!("GROUP BY {n}: the select list has {} columns", items.len()));
                    };
                    Some(items[position - 1].0.clone())
                }
                _ => None,
            },
            Expr::Identifier(alias) => Some(alias.value.clone()),
            _ => None,
        };
        let found = match named {
            Some(name) => keys.iter().position(|(k, _, _)| k.name == name).ok_or_else(|| Refusal {
                span: g.span(),
                reason: format!("GROUP BY `{name}`: only keys are grouped, and `{name}` is a measure or not a column"),
            })?,
            None => {
                let text = g.to_string();
                match keys.iter().position(|(_, written, _)| *written == text) {
                    Some(i) => i,
                    None if matches!(g, Expr::GroupingSets(_) | Expr::Cube(_) | Expr::Rollup(_)) => {
                        return refuse(
                            g,
                            "GROUP BY ROLLUP, CUBE and GROUPING SETS add rows of totals: GROUP BY the keys only",
                        );
                    }
                    None => {
                        return refuse(g, "every GROUP BY expression is a key: list it in the SELECT with `AS name`");
                    }
                }
            }
        };
        grouped[found] = true;
    }
    Ok(grouped)
}

fn column_name(ident: &Ident) -> Result<String, Refusal> {
    let name = &ident.value;
    if is_identifier(name) {
        Ok(name.clone())
    } else {
        Err(Refusal {
            span: ident.span,
            reason: format!("the column name `{name}` must be a lowercase SQL identifier: letters, digits and _"),
        })
    }
}

fn function_name(name: &ObjectName) -> String {
    name.0.last().and_then(|part| part.as_ident()).map(|i| i.value.to_lowercase()).unwrap_or_default()
}

/// The select item's aggregate, when the item is one (parentheses aside).
fn as_aggregate(expr: &Expr) -> Option<&Function> {
    match expr {
        Expr::Nested(inner) => as_aggregate(inner),
        Expr::Function(f) => {
            let name = function_name(&f.name);
            (MERGEABLE_AGGREGATES.contains(&name.as_str()) || refused_aggregate(&name).is_some() || f.over.is_some())
                .then_some(f)
        }
        _ => None,
    }
}

/// `date_trunc('hour', e.event_time)`: the hour key.
fn is_hour(expr: &Expr) -> bool {
    let Expr::Function(f) = expr else { return false };
    if function_name(&f.name) != "date_trunc" || f.filter.is_some() || f.over.is_some() {
        return false;
    }
    let FunctionArguments::List(list) = &f.args else { return false };
    let args: Vec<String> = list.args.iter().map(ToString::to_string).collect();
    list.duplicate_treatment.is_none() && list.clauses.is_empty() && args == ["'hour'", "e.event_time"]
}

/// Walks expressions, inferring types and refusing what a view cannot hold.
struct Checker {
    catalog: bool,
    /// Event columns read since last cleared.
    columns: Vec<String>,
}

impl Checker {
    fn condition(&mut self, expr: &Expr) -> Result<(), Refusal> {
        match self.scalar(expr)? {
            Ty::Bool | Ty::Unknown | Ty::Null => Ok(()),
            _ => refuse(expr, "a condition must be true or false"),
        }
    }

    fn measure(&mut self, f: &Function, name: &'static str) -> Result<Measure, Refusal> {
        let aggregate = function_name(&f.name);
        if f.over.is_some() {
            return refuse(f, WINDOW);
        }
        if let Some(why) = refused_aggregate(&aggregate) {
            return refuse(f, format!("{aggregate}: {why}"));
        }
        let FunctionArguments::List(list) = &f.args else {
            return refuse(f, format!("{aggregate} takes one argument"));
        };
        if list.duplicate_treatment == Some(DuplicateTreatment::Distinct) {
            return refuse(f, format!("{aggregate}(DISTINCT …): {DISTINCT}"));
        }
        if !list.clauses.is_empty() || !f.within_group.is_empty() || f.null_treatment.is_some() {
            return refuse(
                f,
                format!("{aggregate}(…) takes one argument and no ORDER BY, WITHIN GROUP or NULLS clause"),
            );
        }
        let arg = match list.args.as_slice() {
            [FunctionArg::Unnamed(arg)] => arg,
            _ => return refuse(f, format!("{aggregate} takes one argument")),
        };
        let mut only = match &f.filter {
            Some(filter) => {
                self.condition(filter)?;
                Some(filter.to_string())
            }
            None => None,
        };
        let merge = match aggregate.as_str() {
            "count" | "sum" => Merge::Sum,
            "min" => Merge::Min,
            _ => Merge::Max,
        };
        let (expr, ty) = match (aggregate.as_str(), arg) {
            ("count", FunctionArgExpr::Wildcard) => ("1".to_string(), SqlType::BigInt),
            ("count", FunctionArgExpr::Expr(e)) => {
                self.scalar(e)?;
                // count(x) counts the events where x is set.
                let set = format!("{e} IS NOT NULL");
                only = Some(match only {
                    Some(filter) => format!("({filter}) AND {set}"),
                    None => set,
                });
                ("1".to_string(), SqlType::BigInt)
            }
            ("sum", FunctionArgExpr::Expr(e)) => match self.scalar(e)? {
                Ty::Int32 | Ty::Int64 => (e.to_string(), SqlType::BigInt),
                Ty::Float => (e.to_string(), SqlType::Double),
                Ty::Unknown | Ty::Null => {
                    return refuse(e, format!("cannot tell what `{e}` sums to: write sum(CAST(… AS BIGINT | DOUBLE))"));
                }
                _ => return refuse(e, format!("sum needs a number, and `{e}` is not one")),
            },
            (_, FunctionArgExpr::Expr(e)) if aggregate != "count" && aggregate != "sum" => {
                self.columns.clear();
                let ty = self.scalar(e)?.stored().or_else(|why| refuse(e, format!("`{e}` {why}")))?;
                if self.columns.iter().any(|c| c == USER_COLUMN) {
                    return refuse(e, USER_KEY);
                }
                (e.to_string(), ty)
            }
            _ => return refuse(f, format!("{aggregate}(*) is not a measure: write {aggregate}(e.<column>)")),
        };
        Ok(Measure { name, expr: leak(expr), only: only.map(leak), ty, merge })
    }

    /// A per-event expression: checks it and returns its type.
    fn scalar(&mut self, expr: &Expr) -> Result<Ty, Refusal> {
        Ok(match expr {
            Expr::Identifier(id) => {
                return Err(Refusal {
                    span: id.span,
                    reason: format!(
                        "qualify the column: e.{0} (the event){1}",
                        id.value,
                        if self.catalog { format!(" or p.{} (the catalog)", id.value) } else { String::new() }
                    ),
                });
            }
            Expr::CompoundIdentifier(parts) => self.column(expr, parts)?,
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) if n.contains(['.', 'e', 'E']) => Ty::Float,
                Value::Number(..) => Ty::Int64,
                Value::SingleQuotedString(_) => Ty::Text,
                Value::Boolean(_) => Ty::Bool,
                Value::Null => Ty::Null,
                _ => return refuse(expr, "write literals as numbers, 'text', TRUE, FALSE or NULL"),
            },
            Expr::TypedString(_) => Ty::Unknown,
            Expr::Interval(_) => Ty::Interval,
            Expr::Nested(inner) => self.scalar(inner)?,
            Expr::UnaryOp { op, expr: inner } => {
                let ty = self.scalar(inner)?;
                if *op == UnaryOperator::Not { Ty::Bool } else { ty }
            }
            Expr::BinaryOp { left, op, right } => {
                let (l, r) = (self.scalar(left)?, self.scalar(right)?);
                binary(op, l, r).or_else(|why| refuse(expr, why))?
            }
            Expr::Cast { expr: inner, data_type, .. } => {
                self.scalar(inner)?;
                cast_type(data_type)
            }
            Expr::Case { operand, conditions, else_result, .. } => {
                if let Some(operand) = operand {
                    self.scalar(operand)?;
                }
                let mut ty = Ty::Null;
                for when in conditions {
                    self.scalar(&when.condition)?;
                    let result = self.scalar(&when.result)?;
                    if ty == Ty::Null {
                        ty = result;
                    }
                }
                if let Some(other) = else_result {
                    let result = self.scalar(other)?;
                    if ty == Ty::Null {
                        ty = result;
                    }
                }
                ty
            }
            Expr::IsNull(e)
            | Expr::IsNotNull(e)
            | Expr::IsTrue(e)
            | Expr::IsFalse(e)
            | Expr::IsNotTrue(e)
            | Expr::IsNotFalse(e)
            | Expr::IsUnknown(e)
            | Expr::IsNotUnknown(e) => {
                self.scalar(e)?;
                Ty::Bool
            }
            Expr::IsDistinctFrom(a, b) | Expr::IsNotDistinctFrom(a, b) => {
                self.scalar(a)?;
                self.scalar(b)?;
                Ty::Bool
            }
            Expr::InList { expr: e, list, .. } => {
                self.scalar(e)?;
                for item in list {
                    self.scalar(item)?;
                }
                Ty::Bool
            }
            Expr::Between { expr: e, low, high, .. } => {
                for part in [e, low, high] {
                    self.scalar(part)?;
                }
                Ty::Bool
            }
            Expr::Like { expr: e, pattern, any: false, .. } | Expr::ILike { expr: e, pattern, any: false, .. } => {
                self.scalar(e)?;
                self.scalar(pattern)?;
                Ty::Bool
            }
            Expr::Extract { expr: e, .. } => {
                self.scalar(e)?;
                Ty::Unknown
            }
            Expr::Substring { expr: e, substring_from, substring_for, .. } => {
                self.scalar(e)?;
                for part in [substring_from, substring_for].into_iter().flatten() {
                    self.scalar(part)?;
                }
                Ty::Text
            }
            Expr::Function(f) => self.function(f)?,
            Expr::Subquery(_) | Expr::Exists { .. } | Expr::InSubquery { .. } => {
                return refuse(expr, "a subquery reads other rows: a view sees one event (and its product) at a time");
            }
            _ => {
                return refuse(
                    expr,
                    "this expression is not supported in a view: use columns, literals, arithmetic, comparisons, CASE, CAST and deterministic functions",
                );
            }
        })
    }

    fn column(&mut self, expr: &Expr, parts: &[Ident]) -> Result<Ty, Refusal> {
        let [table, column] = parts else {
            return refuse(expr, "write columns as e.<column> (the event) or p.<column> (the catalog)");
        };
        let column = column.value.as_str();
        match table.value.as_str() {
            "e" => {
                let schema = events_schema();
                let Ok(field) = schema.field_with_name(column) else {
                    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                    return refuse(expr, format!("events have no column `{column}`; they have {}", names.join(", ")));
                };
                self.columns.push(column.to_string());
                Ok(Ty::of_arrow(field.data_type()))
            }
            "p" if self.catalog => {
                let schema = catalog_schema();
                match schema.field_with_name(column) {
                    Ok(field) if CATALOG_COLUMNS.contains(&column) => Ok(Ty::of_arrow(field.data_type())),
                    _ => {
                        refuse(expr, format!("views read the catalog's {}; not `{column}`", CATALOG_COLUMNS.join(", ")))
                    }
                }
            }
            "p" => refuse(expr, format!("p.{column} reads the catalog: write `FROM {FROM_EVENTS_WITH_CATALOG}`")),
            other => refuse(expr, format!("`{other}` is not a table of the view: e is the event, p the catalog")),
        }
    }

    fn function(&mut self, f: &Function) -> Result<Ty, Refusal> {
        let name = function_name(&f.name);
        if f.over.is_some() {
            return refuse(f, WINDOW);
        }
        if NON_DETERMINISTIC.contains(&name.as_str()) {
            return refuse(
                f,
                format!(
                    "{name}() answers differently from run to run, so the batch and the speed layer would disagree on one event"
                ),
            );
        }
        if MERGEABLE_AGGREGATES.contains(&name.as_str()) || refused_aggregate(&name).is_some() {
            return refuse(f, ONE_AGGREGATE);
        }
        if f.filter.is_some() || !f.within_group.is_empty() {
            return refuse(f, format!("FILTER and WITHIN GROUP belong to aggregates, and {name} is not one"));
        }
        let mut args = Vec::new();
        match &f.args {
            FunctionArguments::None => {}
            FunctionArguments::Subquery(q) => {
                return refuse(
                    q.as_ref(),
                    "a subquery reads other rows: a view sees one event (and its product) at a time",
                );
            }
            FunctionArguments::List(list) => {
                if list.duplicate_treatment.is_some() || !list.clauses.is_empty() {
                    return refuse(f, format!("{name}(…) takes plain arguments"));
                }
                for arg in &list.args {
                    let (FunctionArg::Unnamed(FunctionArgExpr::Expr(e))
                    | FunctionArg::Named { arg: FunctionArgExpr::Expr(e), .. }
                    | FunctionArg::ExprNamed { arg: FunctionArgExpr::Expr(e), .. }) = arg
                    else {
                        return refuse(f, format!("{name}(*) is not a value of one event"));
                    };
                    args.push(self.scalar(e)?);
                }
            }
        }
        let first = args.first().copied().unwrap_or(Ty::Unknown);
        Ok(match name.as_str() {
            "date_trunc" | "date_bin" => Ty::Time,
            "coalesce" | "nullif" | "greatest" | "least" => {
                args.iter().copied().find(|t| *t != Ty::Null).unwrap_or(Ty::Null)
            }
            "abs" if first.numeric() => first,
            "starts_with" | "ends_with" | "regexp_like" => Ty::Bool,
            n if TEXT_FUNCTIONS.contains(&n) => Ty::Text,
            n if FLOAT_FUNCTIONS.contains(&n) => Ty::Float,
            n if OTHER_FUNCTIONS.contains(&n) => Ty::Unknown,
            _ => {
                return refuse(
                    f,
                    format!(
                        "unknown function {name}: a view calls deterministic functions only, see docs/VIEWS.md for the list"
                    ),
                );
            }
        })
    }
}

/// Scalar functions returning text.
const TEXT_FUNCTIONS: &[&str] = &[
    "lower",
    "upper",
    "substr",
    "substring",
    "concat",
    "concat_ws",
    "trim",
    "btrim",
    "ltrim",
    "rtrim",
    "replace",
    "split_part",
    "left",
    "right",
    "lpad",
    "rpad",
    "initcap",
    "to_char",
    "regexp_replace",
    "md5",
    "repeat",
    "reverse",
    "translate",
];
/// Scalar functions returning a double.
const FLOAT_FUNCTIONS: &[&str] =
    &["round", "floor", "ceil", "trunc", "sqrt", "ln", "log", "log10", "log2", "exp", "power", "pow"];
/// Other scalar functions a view may call; their result is stored only
/// through a CAST.
const OTHER_FUNCTIONS: &[&str] = &[
    "abs",
    "signum",
    "date_part",
    "length",
    "char_length",
    "character_length",
    "strpos",
    "arrow_cast",
    "to_timestamp",
];

/// Every scalar function a view may call (besides the aggregates): the
/// batch layer's tests check that DataFusion has each, and that each is
/// deterministic.
pub fn allowed_functions() -> Vec<&'static str> {
    let special = ["date_trunc", "date_bin", "coalesce", "nullif", "greatest", "least", "starts_with", "ends_with"];
    let all = special.into_iter().chain(["regexp_like"]).chain(TEXT_FUNCTIONS.iter().copied());
    all.chain(FLOAT_FUNCTIONS.iter().copied()).chain(OTHER_FUNCTIONS.iter().copied()).collect()
}

fn binary(op: &BinaryOperator, l: Ty, r: Ty) -> Result<Ty, String> {
    use BinaryOperator as B;
    Ok(match op {
        B::Plus | B::Minus if l == Ty::Time || r == Ty::Time => Ty::Time,
        B::Plus | B::Minus | B::Multiply | B::Divide | B::Modulo => match (l, r) {
            (Ty::Text | Ty::Bool, _) | (_, Ty::Text | Ty::Bool) => {
                return Err(format!("arithmetic needs numbers: `{op}` between {l:?} and {r:?}"));
            }
            (Ty::Float, _) | (_, Ty::Float) => Ty::Float,
            (Ty::Int32, Ty::Int32) => Ty::Int32,
            (Ty::Int64 | Ty::Int32, Ty::Int64 | Ty::Int32) => Ty::Int64,
            _ => Ty::Unknown,
        },
        B::StringConcat => Ty::Text,
        B::Eq | B::NotEq | B::Lt | B::LtEq | B::Gt | B::GtEq | B::And | B::Or => Ty::Bool,
        _ => Ty::Unknown,
    })
}

fn cast_type(ty: &DataType) -> Ty {
    match ty {
        DataType::BigInt(_) | DataType::Int8(_) | DataType::Int64 => Ty::Int64,
        DataType::Int(_) | DataType::Integer(_) | DataType::Int4(_) | DataType::Int32 => Ty::Int32,
        DataType::Double(_) | DataType::DoublePrecision | DataType::Float8 | DataType::Float64 => Ty::Float,
        DataType::Text | DataType::Varchar(_) | DataType::String(_) => Ty::Text,
        DataType::Timestamp(_, TimezoneInfo::WithTimeZone | TimezoneInfo::Tz) => Ty::Time,
        DataType::Boolean | DataType::Bool => Ty::Bool,
        _ => Ty::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A view file with `select` as its select list and `rest` after `FROM`.
    fn file(select: &str, rest: &str) -> String {
        format!(
            "-- a test view\nSELECT date_trunc('hour', e.event_time) AS hour,\n       {select}\nFROM events AS e{rest}\nGROUP BY 1"
        )
    }

    fn refusal(text: &str) -> ViewError {
        match parse("views/t.sql", text) {
            Ok(v) => panic!("accepted {text}: {v:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn a_file_becomes_keys_measures_and_merge_rules() {
        let text = "-- readers: dashboard\n\
            SELECT date_trunc('hour', e.event_time) AS hour,\n  p.category AS category,\n  \
            count(*) AS events,\n  count(e.quantity) AS with_quantity,\n  \
            sum(e.price_cents) FILTER (WHERE e.event_type = 'purchase') AS paid_cents,\n  \
            min(e.event_time) AS first_at,\n  max(CAST(e.quantity AS BIGINT)) AS most\n\
            FROM events AS e LEFT JOIN products AS p ON p.product_id = e.product_id\n\
            WHERE e.event_type <> 'page_view'\nGROUP BY hour, p.category";
        let v = parse("views/category_activity.sql", text).unwrap();
        assert_eq!(v.name, "category_activity");
        assert_eq!(v.source, Source::EventsWithCatalog);
        assert_eq!(v.hour_key, Some("hour"));
        assert_eq!(v.keys[0].expr, HOUR_EXPR);
        assert_eq!((v.keys[1].name, v.keys[1].expr, v.keys[1].ty), ("category", "p.category", SqlType::Text));
        assert_eq!(v.filter, Some("e.event_type <> 'page_view'"));
        assert_eq!(v.readers, [Reader::Dashboard]);
        let m: Vec<_> = v.measures.iter().map(|m| (m.name, m.expr, m.only, m.ty, m.merge)).collect();
        assert_eq!(
            m,
            [
                ("events", "1", None, SqlType::BigInt, Merge::Sum),
                ("with_quantity", "1", Some("e.quantity IS NOT NULL"), SqlType::BigInt, Merge::Sum),
                ("paid_cents", "e.price_cents", Some("e.event_type = 'purchase'"), SqlType::BigInt, Merge::Sum),
                ("first_at", "e.event_time", None, SqlType::TimestampTz, Merge::Min),
                ("most", "CAST(e.quantity AS BIGINT)", None, SqlType::BigInt, Merge::Max),
            ]
        );
        assert!(v.segmented(), "sums need the offset cut's segments");
    }

    #[test]
    fn reformatting_a_file_keeps_its_definition() {
        let tidy = parse("views/t.sql", &file("count(*) AS n", "")).unwrap();
        let messy = parse(
            "views/t.sql",
            "select DATE_TRUNC('hour',e.event_time)   as hour ,\n\n COUNT( * )\n as n from events as e group by hour",
        )
        .unwrap();
        assert_eq!(tidy, messy);
        assert_eq!(tidy.fingerprint(), messy.fingerprint());
    }

    #[test]
    fn user_level_views_are_not_for_dashboards() {
        let by_user = "SELECT e.user_id AS user_id, count(*) AS n FROM events AS e GROUP BY 1";
        assert_eq!(parse("views/t.sql", by_user).unwrap().readers, []);
        let shared = format!("-- readers: recommender\n{by_user}");
        assert_eq!(parse("views/t.sql", &shared).unwrap().readers, [Reader::Recommender]);
        let e = refusal(&format!("\n-- readers: dashboard, recommender\n{by_user}"));
        assert_eq!((e.line, e.column), (2, 1));
        assert!(e.reason.starts_with("dashboards read aggregates only"), "{e}");
        let e = refusal(&format!("-- readers: marketing\n{by_user}"));
        assert!(e.reason.contains("unknown reader `marketing`"), "{e}");
    }

    /// Each kind of SQL a view cannot merge exactly, refused with where and why.
    #[test]
    fn unmergeable_sql_is_refused_with_file_line_and_reason() {
        let cases: &[(&str, &str, &str, u64, u64)] = &[
            ("avg(e.price_cents) AS a", "", "avg: an average of partial averages", 3, 8),
            ("count(DISTINCT e.user_id) AS u", "", "count(DISTINCT …): a distinct count", 3, 8),
            ("approx_distinct(e.user_id) AS u", "", "a distinct count", 3, 8),
            ("median(e.price_cents) AS m", "", "a median or percentile", 3, 8),
            ("stddev(e.price_cents) AS s", "", "a variance", 3, 8),
            ("array_agg(e.product_id) AS ids", "", "cannot be merged exactly", 3, 8),
            ("count(*) OVER () AS c", "", "a window function", 3, 8),
            ("row_number() OVER (ORDER BY e.event_time) AS r", "", "a window function", 3, 8),
            ("sum(e.price_cents) / count(*) AS mean", "", "a measure is one aggregate", 3, 8),
            ("CAST(random() * 10 AS BIGINT) AS bucket, count(*) AS n", "", "random() answers differently", 3, 13),
            ("count(*) FILTER (WHERE e.event_time < now()) AS n", "", "now() answers differently", 3, 46),
            (
                "count(*) AS n",
                "\nWHERE e.event_time > current_timestamp",
                "current_timestamp() answers differently",
                5,
                22,
            ),
            ("count(*) AS n", "\nWHERE e.user_id IN (SELECT user_id FROM events)", "a subquery", 5, 7),
            ("e.quantity AS q, count(*) AS n", "", "32-bit integer", 3, 8),
            ("e.product_id AS p, count(*) AS n", "", "neither aggregated nor in GROUP BY", 3, 8),
            ("product_id AS p, count(*) AS n", "", "qualify the column: e.product_id", 3, 8),
            ("e.colour AS c, count(*) AS n", "", "events have no column `colour`", 3, 8),
            ("p.category AS c, count(*) AS n", "", "reads the catalog", 3, 8),
            ("sum(e.product_id) AS s", "", "sum needs a number", 3, 12),
            ("count(*)", "", "name this column", 3, 8),
            ("count(*) AS hour", "", "`hour` is taken", 3, 8),
            ("count(*) AS segment", "", "`segment` is taken", 3, 8),
            ("e.user_id AS customer, count(*) AS n", "", "only as the key `e.user_id AS user_id`", 3, 8),
            ("lower(e.user_id) AS user_id, count(*) AS n", "", "only as the key `e.user_id AS user_id`", 3, 8),
            ("max(e.user_id) AS last_user", "", "only as the key `e.user_id AS user_id`", 3, 12),
            ("count(*) AS n", "\nWHERE my_udf(e.user_id)", "unknown function my_udf", 5, 7),
            ("sum(e.price_cents + e.product_id) AS s", "", "arithmetic needs numbers", 3, 12),
        ];
        for (select, rest, reason, line, column) in cases {
            let e = refusal(&file(select, rest));
            assert_eq!(e.file, "views/t.sql");
            assert!(e.reason.contains(reason), "{select}{rest}: {e}");
            assert_eq!((e.line, e.column), (*line, *column), "{select}{rest}: {e}");
        }
    }

    #[test]
    fn queries_that_are_not_one_grouped_select_are_refused() {
        let g = "GROUP BY 1";
        let base = "SELECT e.product_id AS product_id, count(*) AS n FROM events AS e";
        let cases: &[(String, &str)] = &[
            (format!("{base} {g} HAVING count(*) > 5"), "HAVING drops groups"),
            (format!("{base} {g} ORDER BY 2"), "ORDER BY is not part of a view"),
            (format!("{base} {g} LIMIT 10"), "LIMIT or OFFSET"),
            (format!("WITH x AS (SELECT 1) {base} {g}"), "WITH is not part"),
            (format!("{base} {g} UNION ALL {base} {g}"), "UNION, VALUES"),
            (format!("SELECT DISTINCT e.product_id AS product_id, count(*) AS n FROM events AS e {g}"), "SELECT DISTINCT"),
            ("SELECT e.product_id AS product_id, count(*) AS n FROM events e2 GROUP BY 1".into(), "a view reads `FROM events AS e`"),
            ("SELECT e.product_id AS product_id, count(*) AS n FROM events AS e JOIN products AS p ON true GROUP BY 1".into(), "with the catalog"),
            ("SELECT count(*) AS n FROM events AS e".into(), "at least one key"),
            (
                "SELECT p.updated_at AS u, count(*) AS n FROM events AS e LEFT JOIN products AS p ON p.product_id = e.product_id GROUP BY 1".into(),
                "views read the catalog's product_id, name, category, price_cents; not `updated_at`",
            ),
            ("SELECT e.product_id AS product_id FROM events AS e GROUP BY 1".into(), "at least one measure"),
            (format!("{base} GROUP BY ROLLUP (1)"), "ROLLUP"),
            (format!("{base} GROUP BY 2"), "`n` is a measure"),
            (format!("{base} GROUP BY 3"), "GROUP BY 3: the select list has 2 columns"),
            (format!("{base} GROUP BY 1, e.user_id"), "every GROUP BY expression is a key"),
            (format!("{base} {g}; DELETE FROM events"), "a second statement"),
            ("DROP TABLE events".into(), "not another statement"),
            ("".into(), "no SELECT"),
            ("SELECT e.product_id AS product_id, count(* AS n FROM events AS e GROUP BY 1".into(), "not valid SQL"),
        ];
        for (text, reason) in cases {
            let e = refusal(text);
            assert!(e.reason.contains(reason), "{text}: {e}");
            assert!(e.line >= 1 && e.column >= 1, "{text}: {e}");
        }
        let e = refusal("SELECT e.product_id AS product_id,\n  count(* AS n FROM events AS e GROUP BY 1");
        assert_eq!((e.line, e.column), (2, 11), "{e}");
    }

    #[test]
    fn file_names_are_view_names() {
        assert_eq!(view_name("views/purchases_per_day.sql"), Ok("purchases_per_day".into()));
        for bad in ["views/Sales.sql", "views/2nd.sql", "views/a-b.sql", "views/a__b.sql"] {
            let e = parse(bad, &file("count(*) AS n", "")).unwrap_err();
            assert_eq!((e.line, e.column), (1, 1));
            assert!(e.reason.contains("the view"), "{bad}: {e}");
        }
    }

    /// A folder holding the shipped files plus `extra` (name, text).
    fn folder(extra: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (file, text) in crate::views::BUILTIN_FILES {
            std::fs::write(dir.path().join(Path::new(file).file_name().unwrap()), text).unwrap();
        }
        for (name, text) in extra {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    #[test]
    fn the_workspace_folder_holds_the_shipped_views() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../views");
        assert_eq!(load_dir(&dir).unwrap(), crate::views::builtin_sources());
    }

    #[test]
    fn a_folder_loads_shipped_views_first_then_the_others_by_name() {
        let dir = folder(&[
            ("zz_last.sql", &file("count(*) AS n", "")),
            ("aa_first.sql", &file("max(e.event_time) AS latest", "")),
            ("notes.txt", "not a view"),
        ]);
        let names: Vec<_> = load_dir(dir.path()).unwrap().iter().map(|v| v.def.name).collect();
        assert_eq!(names, ["product_demand_hourly", "user_product_state", "aa_first", "zz_last"]);
    }

    #[test]
    fn a_folder_reports_every_refused_file() {
        let pdh = crate::views::BUILTIN_FILES[0].1;
        let dir = folder(&[
            ("bad.sql", &file("avg(e.price_cents) AS a", "")),
            ("demand_spikes.sql", &file("count(*) AS n", "")),
            ("product_demand_hourly.sql", &pdh.replace("AS revenue_cents", "AS revenue")),
        ]);
        std::fs::remove_file(dir.path().join("user_product_state.sql")).unwrap();
        let errors = load_dir(dir.path()).unwrap_err();
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 4, "{lines:#?}");
        let has = |file: &str, reason: &str| {
            assert!(
                errors.iter().any(|e| e.file.ends_with(file) && e.reason.contains(reason)),
                "{file}: {reason} in {lines:#?}"
            );
        };
        has("bad.sql", "avg: an average");
        has("demand_spikes.sql", "the platform's own relations");
        has("product_demand_hourly.sql", "keep its columns hour, product_id, views");
        has("user_product_state.sql", "missing: user_product_state");
        let missing = load_dir(&dir.path().join("nope")).unwrap_err();
        assert!(missing[0].reason.contains("set VIEWS_DIR"), "{}", missing[0]);
    }

    #[test]
    fn a_shipped_view_may_change_its_expressions() {
        let pdh = crate::views::BUILTIN_FILES[0].1;
        let changed = pdh.replace("FROM events AS e", "FROM events AS e\nWHERE e.product_id <> 'test-product'");
        let dir = folder(&[("product_demand_hourly.sql", &changed)]);
        let views = load_dir(dir.path()).unwrap();
        assert_eq!(views[0].def.filter, Some("e.product_id <> 'test-product'"));
        assert_ne!(views[0].def.fingerprint(), crate::views::product_demand_hourly().fingerprint(), "it is recomputed");
    }
}
