//! What a run recomputes, decided without touching data.
//!
//! Given the snapshot's offsets, what was published last (its lake
//! version, its cut, the view fingerprints on record), the hours new events
//! touched and the batch tables' ages, the plan says: nothing to do, or the
//! new cut and, per view and table, how it is brought up to date. It is a
//! pure function of those inputs, so every branch is tested in a table
//! below; [`super::compute`] and [`super::publish`] carry it out.

use std::collections::BTreeMap;
use std::time::Duration;

use shared_schema::cut::{Offset, OffsetCut, Partition, SegmentSize};
use shared_schema::derived::{BatchTable, Input};
use shared_schema::schema::Hour;
use shared_schema::views::{Source, ViewDef};

/// What was published last.
#[derive(Debug, Clone, Default)]
pub struct Published {
    /// The lake version of the last published run (`None`: never).
    pub version: Option<i64>,
    pub cut: OffsetCut,
    /// Each view's fingerprint as published (empty: published before
    /// fingerprints were recorded).
    pub fingerprints: BTreeMap<String, String>,
}

/// What a run is asked to do and what it finds.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// `--full`: recompute everything.
    pub full: bool,
    pub lake_version: i64,
    pub segment_size: SegmentSize,
    /// Every view's current definition: name and fingerprint.
    pub definitions: &'a [(&'static str, String)],
    pub published: &'a Published,
}

/// Why the run stops before computing anything.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "partition {partition}: the lake ends at offset {lake}, below the published cut {published}; the lake is behind what was published"
    )]
    CutBackwards { partition: Partition, lake: Offset, published: Offset },
}

/// The plan of a run that publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Every view and table recomputed over all history.
    pub full: bool,
    /// The cut this run publishes: never below the published one.
    pub cut: OffsetCut,
    /// The cut published before: an incremental run adds what lies between.
    pub previous: OffsetCut,
    /// Views whose definition changed since they were published: recomputed
    /// over all history even by an incremental run (a new measure is
    /// backfilled by the next run).
    pub redefined: Vec<&'static str>,
}

/// What the plan says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The lake holds nothing the batch may publish yet.
    Unchanged,
    Run(Plan),
}

/// How one view is brought up to date, and hence which events it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refresh {
    /// Recompute everything below the cut and replace the table.
    Replace,
    /// Recompute the listed hours below the cut and replace those hours.
    Hours { key: &'static str, hours: Vec<Hour> },
    /// Fold the rows of the offsets from `from` (the cut the view's batch
    /// rows reach: the published one, or older when folds were deferred)
    /// to the new cut in with the merge rules.
    Upsert { from: OffsetCut },
    /// Leave the batch rows as they are: the speed layer holds every record
    /// between the cut they reach and the new one, and the view's measures
    /// all merge by `max` or `min`, so the serving merge is the same
    /// whichever side holds them (see [`Folds`]). `from`: the cut they reach.
    Defer { from: OffsetCut },
}

/// Where one partition's records in the speed layer begin and end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpeedSpan {
    /// Where its position began (`None`: not known, a row written by hand).
    pub started: Option<Offset>,
    /// The next offset it has not counted.
    pub next: Offset,
}

/// What decides whether an incremental run folds a view whose measures all
/// merge by `max` or `min`, or leaves the new records to the speed layer
/// for a later fold: folding them every run rewrites rows the speed layer
/// already holds (most of an incremental publish, docs/BENCHMARKS.md), and
/// one fold of several hours touches each row once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Folds {
    /// The views whose batch rows lag the published cut: the cut they
    /// reach, and how long the records above it have waited for a fold.
    pub pending: BTreeMap<String, (OffsetCut, Duration)>,
    /// Per partition, the records the speed layer holds; a partition it
    /// holds no position in holds nothing the batch may leave to it.
    pub speed: BTreeMap<Partition, SpeedSpan>,
    /// Per view added or redefined since the speed layer began, where it
    /// began computing that view (`ops.view_speed_start`).
    pub view_starts: BTreeMap<String, OffsetCut>,
    /// A fold waits at most this long (zero: every run folds).
    pub every: Duration,
}

impl Folds {
    /// Whether the speed layer holds every record of `view` from `from` up
    /// to `to`.
    pub fn speed_holds(&self, view: &str, from: &OffsetCut, to: &OffsetCut) -> bool {
        let view_start = |p| self.view_starts.get(view).map_or(Offset(0), |starts| starts.get(p));
        to.iter().filter(|(p, o)| from.get(*p) < *o).all(|(p, o)| match self.speed.get(&p) {
            Some(SpeedSpan { started: Some(started), next }) => {
                (*started).max(view_start(p)) <= from.get(p) && *next >= o
            }
            _ => false,
        })
    }

    /// How a max-only view is brought to `plan`'s cut: left to the speed
    /// layer while its pending records are younger than [`Folds::every`]
    /// and the speed layer holds them all, folded otherwise.
    fn refresh(&self, view: &str, plan: &Plan) -> Refresh {
        let (from, waited) = self.pending.get(view).cloned().unwrap_or((plan.previous.clone(), Duration::ZERO));
        if from != plan.cut && waited < self.every && self.speed_holds(view, &from, &plan.cut) {
            Refresh::Defer { from }
        } else {
            Refresh::Upsert { from }
        }
    }
}

/// The views whose fingerprint differs from the one on record. A full run
/// recomputes everything anyway, and with nothing on record (tables
/// published before fingerprints were) the run records them without a
/// backfill.
pub fn redefined(request: &Request<'_>) -> Vec<&'static str> {
    let recorded = &request.published.fingerprints;
    if request.full || recorded.is_empty() {
        return Vec::new();
    }
    request.definitions.iter().filter(|(name, f)| recorded.get(*name) != Some(f)).map(|(name, _)| *name).collect()
}

/// Whether the run is full: asked to be, or nothing was ever published.
pub fn is_full(request: &Request<'_>) -> bool {
    request.full || request.published.version.is_none()
}

/// True when the lake version is the published one and no definition
/// changed: the run need not even read the lake's offsets.
pub fn nothing_new(request: &Request<'_>) -> bool {
    !is_full(request) && request.published.version == Some(request.lake_version) && redefined(request).is_empty()
}

/// Decides the run, given the next offset the snapshot expects per
/// partition (what it holds lies below).
pub fn decide(request: &Request<'_>, lake_next: &BTreeMap<Partition, Offset>) -> Result<Decision, PlanError> {
    if nothing_new(request) {
        return Ok(Decision::Unchanged);
    }
    let full = is_full(request);
    let redefined = redefined(request);
    let cut = OffsetCut::from_lake(lake_next.iter().map(|(p, o)| (*p, *o)), request.segment_size);
    let previous = &request.published.cut;
    for (partition, published) in previous.iter() {
        let lake = cut.get(partition);
        if lake < published {
            return Err(PlanError::CutBackwards { partition, lake, published });
        }
    }
    if !full && cut == *previous && redefined.is_empty() {
        // New data, but none of it below a segment boundary yet: the speed
        // layer holds it, and the batch has nothing new to publish.
        return Ok(Decision::Unchanged);
    }
    Ok(Decision::Run(Plan { full, cut, previous: previous.clone(), redefined }))
}

/// At most this many runs of consecutive hours are recomputed: the scan's
/// filter has one range term per run (see `scope::in_hours`).
pub const MAX_HOUR_RUNS: usize = 256;

/// The hours to recompute for the `touched` ones: all of them, plus, when
/// they form more than `max_runs` runs of consecutive hours (late events
/// scattered over months), the shortest gaps between runs, until at most
/// `max_runs` runs remain. Recomputing an untouched hour is exact (it is
/// computed from the lake like any other), only more work; a filter with
/// tens of thousands of terms is not. Sorted and distinct.
pub fn cover(touched: &[Hour], max_runs: usize) -> Vec<Hour> {
    let runs = Hour::runs(touched);
    let max_runs = max_runs.max(1);
    // Gap i lies between run i and run i + 1; fill the shortest ones.
    let mut gaps: Vec<(i64, usize)> =
        runs.windows(2).enumerate().map(|(i, w)| ((w[1].0.start() - w[0].1.start()).num_hours(), i)).collect();
    gaps.sort_unstable();
    let mut filled = vec![false; gaps.len()];
    for (_, i) in gaps.iter().take(runs.len().saturating_sub(max_runs)) {
        filled[*i] = true;
    }
    let mut hours = Vec::with_capacity(touched.len());
    for (i, (first, last)) in runs.iter().enumerate() {
        let end = if filled.get(i).copied().unwrap_or(false) { runs[i + 1].0 } else { last.next() };
        let mut h = *first;
        while h < end {
            hours.push(h);
            h = h.next();
        }
    }
    hours
}

impl Plan {
    /// Whether the run must find the hours that the new offsets touch.
    pub fn needs_touched_hours(&self) -> bool {
        !self.full
    }

    /// How each view is refreshed, in the order given; views with nothing
    /// to do are left out. `touched`: the hours of the events between the
    /// previous cut and the new one (ignored by a full run). A view over
    /// the catalog is recomputed whole when the catalog changed, as a full
    /// run would compute it. A max-only view is folded or deferred as
    /// `folds` says.
    pub fn views(
        &self,
        views: &'static [ViewDef],
        touched: &[Hour],
        catalog_changed: bool,
        folds: &Folds,
    ) -> Vec<(&'static ViewDef, Refresh)> {
        views
            .iter()
            .filter_map(|view| {
                let catalog = catalog_changed && view.source == Source::EventsWithCatalog;
                let refresh = if self.full || catalog || self.redefined.contains(&view.name) {
                    Refresh::Replace
                } else if let Some(key) = view.hour_key {
                    if touched.is_empty() {
                        return None;
                    }
                    Refresh::Hours { key, hours: touched.to_vec() }
                } else if view.mergeable_by_upsert() {
                    folds.refresh(view.name, self)
                } else {
                    Refresh::Replace
                };
                Some((view, refresh))
            })
            .collect()
    }

    /// The batch tables due: the catalog copy on a full run or when the
    /// lake's catalog changed since it was published; the windowed tables
    /// on a full run or when older than `refresh_every` (or never
    /// computed: absent from `ages`), and only when there are events below
    /// the cut to look back from (`has_events`).
    pub fn tables(
        &self,
        tables: &'static [BatchTable],
        ages: &BTreeMap<String, Duration>,
        refresh_every: Duration,
        has_events: bool,
        catalog_changed: bool,
    ) -> Vec<&'static BatchTable> {
        tables
            .iter()
            .filter(|t| match t.input {
                Input::Catalog => self.full || catalog_changed,
                Input::RecentEvents { .. } => {
                    let stale = ages.get(t.name).is_none_or(|age| *age >= refresh_every);
                    has_events && (self.full || stale)
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use shared_schema::derived::{BATCH_TABLES, DEMAND_BASELINE, ITEM_SIMILARITY, PRODUCTS};
    use shared_schema::views::{self, product_demand_hourly, user_product_state};

    use super::*;

    fn offsets(pairs: &[(i32, i64)]) -> BTreeMap<Partition, Offset> {
        pairs.iter().map(|(p, o)| (Partition(*p), Offset(*o))).collect()
    }

    fn cut(pairs: &[(i32, i64)]) -> OffsetCut {
        pairs.iter().map(|(p, o)| (Partition(*p), Offset(*o))).collect()
    }

    fn defs() -> Vec<(&'static str, String)> {
        vec![("product_demand_hourly", "a".into()), ("user_product_state", "b".into())]
    }

    fn fingerprints(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(n, f)| (n.to_string(), f.to_string())).collect()
    }

    /// A run's expected plan: full, cut, redefined views (`None`: unchanged).
    type Expected = Option<(bool, &'static [(i32, i64)], &'static [&'static str])>;

    /// One row of the decision table.
    struct Case {
        name: &'static str,
        full: bool,
        lake_version: i64,
        lake_next: &'static [(i32, i64)],
        last_version: Option<i64>,
        published_cut: &'static [(i32, i64)],
        recorded: &'static [(&'static str, &'static str)],
        expect: Result<Expected, PlanError>,
    }

    #[test]
    fn decisions() {
        let same = &[("product_demand_hourly", "a"), ("user_product_state", "b")];
        let cases = [
            Case {
                name: "first run is full and cuts at segment boundaries",
                full: false,
                lake_version: 3,
                lake_next: &[(0, 250), (1, 99)],
                last_version: None,
                published_cut: &[],
                recorded: &[],
                expect: Ok(Some((true, &[(0, 200), (1, 0)], &[]))),
            },
            Case {
                name: "same lake version, same definitions: unchanged",
                full: false,
                lake_version: 3,
                lake_next: &[(0, 950)],
                last_version: Some(3),
                published_cut: &[(0, 900)],
                recorded: same,
                expect: Ok(None),
            },
            Case {
                name: "new data inside the current segment only: unchanged",
                full: false,
                lake_version: 4,
                lake_next: &[(0, 990)],
                last_version: Some(3),
                published_cut: &[(0, 900)],
                recorded: same,
                expect: Ok(None),
            },
            Case {
                name: "a new segment boundary: incremental run to it",
                full: false,
                lake_version: 4,
                lake_next: &[(0, 1_010), (1, 5)],
                last_version: Some(3),
                published_cut: &[(0, 900)],
                recorded: same,
                expect: Ok(Some((false, &[(0, 1_000), (1, 0)], &[]))),
            },
            Case {
                name: "--full runs even when nothing changed",
                full: true,
                lake_version: 3,
                lake_next: &[(0, 950)],
                last_version: Some(3),
                published_cut: &[(0, 900)],
                recorded: same,
                expect: Ok(Some((true, &[(0, 900)], &[]))),
            },
            Case {
                name: "a changed definition runs on an unchanged lake, backfilling that view",
                full: false,
                lake_version: 3,
                lake_next: &[(0, 950)],
                last_version: Some(3),
                published_cut: &[(0, 900)],
                recorded: &[("product_demand_hourly", "old"), ("user_product_state", "b")],
                expect: Ok(Some((false, &[(0, 900)], &["product_demand_hourly"]))),
            },
            Case {
                name: "a view never recorded counts as changed",
                full: false,
                lake_version: 3,
                lake_next: &[(0, 950)],
                last_version: Some(3),
                published_cut: &[(0, 900)],
                recorded: &[("product_demand_hourly", "a")],
                expect: Ok(Some((false, &[(0, 900)], &["user_product_state"]))),
            },
            Case {
                name: "no fingerprints on record (an upgrade): recorded without a backfill",
                full: false,
                lake_version: 3,
                lake_next: &[(0, 950)],
                last_version: Some(3),
                published_cut: &[(0, 900)],
                recorded: &[],
                expect: Ok(None),
            },
            Case {
                name: "a lake behind the published cut is an error, never a cut moving back",
                full: false,
                lake_version: 5,
                lake_next: &[(0, 850), (1, 400)],
                last_version: Some(3),
                published_cut: &[(0, 900)],
                recorded: same,
                expect: Err(PlanError::CutBackwards {
                    partition: Partition(0),
                    lake: Offset(800),
                    published: Offset(900),
                }),
            },
            Case {
                name: "a partition the lake never saw is behind a published cut above 0",
                full: true,
                lake_version: 5,
                lake_next: &[(0, 1_000)],
                last_version: Some(3),
                published_cut: &[(0, 900), (1, 100)],
                recorded: same,
                expect: Err(PlanError::CutBackwards {
                    partition: Partition(1),
                    lake: Offset(0),
                    published: Offset(100),
                }),
            },
        ];
        let definitions = defs();
        for case in cases {
            let published = Published {
                version: case.last_version,
                cut: cut(case.published_cut),
                fingerprints: fingerprints(case.recorded),
            };
            let request = Request {
                full: case.full,
                lake_version: case.lake_version,
                segment_size: SegmentSize::new(100).unwrap(),
                definitions: &definitions,
                published: &published,
            };
            let got = decide(&request, &offsets(case.lake_next));
            let want = case.expect.map(|o| match o {
                None => Decision::Unchanged,
                Some((full, c, redefined)) => Decision::Run(Plan {
                    full,
                    cut: cut(c),
                    previous: published.cut.clone(),
                    redefined: redefined.to_vec(),
                }),
            });
            assert_eq!(got, want, "{}", case.name);
        }
    }

    fn plan(full: bool, redefined: &[&'static str]) -> Plan {
        Plan { full, cut: cut(&[(0, 200)]), previous: cut(&[(0, 100)]), redefined: redefined.to_vec() }
    }

    fn hours(n: i64) -> Vec<Hour> {
        let t = chrono::DateTime::parse_from_rfc3339("2026-11-24T10:00:00Z").unwrap().to_utc();
        (0..n).map(|i| Hour::of(t + chrono::TimeDelta::hours(i))).collect()
    }

    #[test]
    fn view_refreshes() {
        type Want = &'static [(&'static str, &'static str)];
        let cases: [(&str, Plan, i64, Want); 4] = [
            (
                "full: every view replaced",
                plan(true, &[]),
                2,
                &[("product_demand_hourly", "replace"), ("user_product_state", "replace")],
            ),
            (
                "incremental: hourly views by the touched hours, max-only views by upsert",
                plan(false, &[]),
                2,
                &[("product_demand_hourly", "hours:2"), ("user_product_state", "upsert")],
            ),
            (
                "incremental with no touched hour: the hourly view is left alone",
                plan(false, &[]),
                0,
                &[("user_product_state", "upsert")],
            ),
            (
                "a redefined view is replaced whole by an incremental run",
                plan(false, &["user_product_state"]),
                1,
                &[("product_demand_hourly", "hours:1"), ("user_product_state", "replace")],
            ),
        ];
        assert_eq!(views::all(), [*product_demand_hourly(), *user_product_state()], "the cases name every view");
        for (name, plan, n, want) in cases {
            let got: Vec<(&str, String)> = plan
                .views(views::all(), &hours(n), false, &Folds::default())
                .into_iter()
                .map(|(v, r)| {
                    let r = match r {
                        Refresh::Replace => "replace".to_string(),
                        Refresh::Upsert { from } => {
                            assert_eq!(from, plan.previous, "nothing pending: from the published cut");
                            "upsert".to_string()
                        }
                        Refresh::Defer { .. } => "defer".to_string(),
                        Refresh::Hours { key, hours } => {
                            assert_eq!(key, "hour");
                            format!("hours:{}", hours.len())
                        }
                    };
                    (v.name, r)
                })
                .collect();
            let want: Vec<(&str, String)> = want.iter().map(|(v, r)| (*v, r.to_string())).collect();
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn max_only_views_are_left_to_the_speed_layer_while_it_holds_their_records() {
        let hour = Duration::from_secs(3600);
        let span = |started: Option<i64>, next: i64| SpeedSpan { started: started.map(Offset), next: Offset(next) };
        let holding = BTreeMap::from([(Partition(0), span(Some(100), 250))]);
        let pending_at =
            |o: i64, waited: u32| BTreeMap::from([("user_product_state".to_string(), (cut(&[(0, o)]), hour * waited))]);
        type Case = (
            &'static str,
            BTreeMap<Partition, SpeedSpan>,
            BTreeMap<String, (OffsetCut, Duration)>,
            Duration,
            (bool, i64),
        );
        // (name, speed spans, pending folds, every, (deferred, from the cut at)): the
        // plan moves partition 0's cut from 100 to 200.
        let cases: [Case; 9] = [
            ("the speed layer holds the new range: deferred", holding.clone(), BTreeMap::new(), 6 * hour, (true, 100)),
            ("folds every run when told to", holding.clone(), BTreeMap::new(), Duration::ZERO, (false, 100)),
            ("no position in the partition: folded", BTreeMap::new(), BTreeMap::new(), 6 * hour, (false, 100)),
            (
                "a position of unknown start: folded",
                BTreeMap::from([(Partition(0), span(None, 250))]),
                BTreeMap::new(),
                6 * hour,
                (false, 100),
            ),
            (
                "the speed layer is behind the new cut: folded",
                BTreeMap::from([(Partition(0), span(Some(100), 199))]),
                BTreeMap::new(),
                6 * hour,
                (false, 100),
            ),
            (
                "its records begin above the batch rows: folded",
                BTreeMap::from([(Partition(0), span(Some(150), 250))]),
                BTreeMap::new(),
                6 * hour,
                (false, 100),
            ),
            (
                "a pending fold younger than the limit stays pending",
                BTreeMap::from([(Partition(0), span(Some(0), 250))]),
                pending_at(40, 5),
                6 * hour,
                (true, 40),
            ),
            (
                "a pending fold at the limit folds everything since",
                BTreeMap::from([(Partition(0), span(Some(0), 250))]),
                pending_at(40, 6),
                6 * hour,
                (false, 40),
            ),
            (
                "a pending range the speed layer does not hold from its start folds",
                holding.clone(),
                pending_at(40, 1),
                6 * hour,
                (false, 40),
            ),
        ];
        for (name, speed, pending, every, want) in cases {
            let folds = Folds { pending, speed, every, ..Default::default() };
            let got = plan(false, &[]).views(views::all(), &hours(1), false, &folds);
            let state = got.iter().find(|(v, _)| v.name == "user_product_state").map(|(_, r)| r.clone());
            let want = match want {
                (true, from) => Refresh::Defer { from: cut(&[(0, from)]) },
                (false, from) => Refresh::Upsert { from: cut(&[(0, from)]) },
            };
            assert_eq!(state, Some(want), "{name}");
            assert!(
                got.iter().any(|(v, r)| v.name == "product_demand_hourly" && matches!(r, Refresh::Hours { .. })),
                "{name}: the hourly view is recomputed as ever"
            );
        }
        // A view registered after the range began: the speed layer holds
        // its records only from where it began computing it.
        let registered_at = |o: i64| BTreeMap::from([("user_product_state".to_string(), cut(&[(0, o)]))]);
        let state = |folds: &Folds| {
            let got = plan(false, &[]).views(views::all(), &hours(1), false, folds);
            got.into_iter().find(|(v, _)| v.name == "user_product_state").map(|(_, r)| r)
        };
        let late =
            Folds { speed: holding.clone(), view_starts: registered_at(120), every: 6 * hour, ..Default::default() };
        assert_eq!(state(&late), Some(Refresh::Upsert { from: cut(&[(0, 100)]) }), "registered at 120");
        let early = Folds { view_starts: registered_at(100), ..late };
        assert_eq!(state(&early), Some(Refresh::Defer { from: cut(&[(0, 100)]) }), "registered at 100");
        // A full or redefining run replaces the view whatever is pending.
        let folds = Folds { pending: pending_at(40, 1), speed: holding, every: 6 * hour, ..Default::default() };
        for plan in [plan(true, &[]), plan(false, &["user_product_state"])] {
            let got = plan.views(views::all(), &hours(1), false, &folds);
            assert!(got.iter().any(|(v, r)| v.name == "user_product_state" && *r == Refresh::Replace));
        }
    }

    #[test]
    fn a_view_over_the_catalog_is_replaced_when_the_catalog_changed() {
        let text = "SELECT date_trunc('hour', e.event_time) AS hour, p.category AS category, count(*) AS n
                    FROM events AS e LEFT JOIN products AS p ON p.product_id = e.product_id GROUP BY 1, 2";
        let by_category = shared_schema::view_sql::parse("views/by_category.sql", text).unwrap();
        let set: &'static [ViewDef] = vec![*product_demand_hourly(), by_category].leak();
        let refreshes = |catalog_changed| -> Vec<(&str, bool)> {
            let views = plan(false, &[]).views(set, &hours(1), catalog_changed, &Folds::default());
            views.into_iter().map(|(v, r)| (v.name, matches!(r, Refresh::Replace))).collect()
        };
        assert_eq!(refreshes(false), [("product_demand_hourly", false), ("by_category", false)]);
        assert_eq!(refreshes(true), [("product_demand_hourly", false), ("by_category", true)]);
    }

    #[test]
    fn batch_tables_due() {
        let hour = Duration::from_secs(3600);
        let ages = |pairs: &[(&str, u64)]| -> BTreeMap<String, Duration> {
            pairs.iter().map(|(n, h)| (n.to_string(), hour * *h as u32)).collect()
        };
        let names = |t: Vec<&BatchTable>| t.into_iter().map(|t| t.name).collect::<Vec<_>>();
        let every = 6 * hour;
        let fresh = ages(&[("demand_baseline", 1), ("item_similarity", 5)]);
        type Case = (&'static str, Plan, BTreeMap<String, Duration>, bool, Vec<&'static str>);
        let cases: [Case; 6] = [
            (
                "full: all",
                plan(true, &[]),
                fresh.clone(),
                true,
                vec![PRODUCTS.name, DEMAND_BASELINE.name, ITEM_SIMILARITY.name],
            ),
            ("incremental, fresh: the catalog only", plan(false, &[]), fresh.clone(), true, vec![PRODUCTS.name]),
            (
                "incremental, one at its age limit: that one",
                plan(false, &[]),
                ages(&[("demand_baseline", 6), ("item_similarity", 5)]),
                true,
                vec![PRODUCTS.name, DEMAND_BASELINE.name],
            ),
            (
                "incremental, never computed: both",
                plan(false, &[]),
                ages(&[]),
                true,
                vec![PRODUCTS.name, DEMAND_BASELINE.name, ITEM_SIMILARITY.name],
            ),
            (
                "full but no events below the cut: the catalog only",
                plan(true, &[]),
                ages(&[]),
                false,
                vec![PRODUCTS.name],
            ),
            ("stale but no events: the catalog only", plan(false, &[]), ages(&[]), false, vec![PRODUCTS.name]),
        ];
        for (name, plan, ages, has_events, want) in cases {
            assert_eq!(names(plan.tables(BATCH_TABLES, &ages, every, has_events, true)), want, "{name}");
        }
        // An unchanged catalog is republished by a full run only.
        let unchanged = |plan: Plan, ages| names(plan.tables(BATCH_TABLES, &ages, every, true, false));
        assert_eq!(unchanged(plan(false, &[]), fresh.clone()), Vec::<&str>::new(), "incremental, all fresh");
        assert_eq!(
            unchanged(plan(false, &[]), ages(&[("demand_baseline", 6), ("item_similarity", 1)])),
            vec![DEMAND_BASELINE.name],
            "incremental, one due"
        );
        assert_eq!(
            unchanged(plan(true, &[]), fresh),
            vec![PRODUCTS.name, DEMAND_BASELINE.name, ITEM_SIMILARITY.name],
            "full"
        );
    }

    #[test]
    fn only_incremental_runs_look_for_touched_hours() {
        assert!(plan(false, &[]).needs_touched_hours());
        assert!(!plan(true, &[]).needs_touched_hours());
    }

    fn hour(h: i64) -> Hour {
        Hour::of(chrono::DateTime::UNIX_EPOCH + chrono::TimeDelta::hours(h))
    }

    fn at_hours(hs: &[i64]) -> Vec<Hour> {
        hs.iter().map(|h| hour(*h)).collect()
    }

    #[test]
    fn cover_keeps_few_runs_as_they_are() {
        let touched = at_hours(&[9, 1, 2, 3, 7, 2]);
        assert_eq!(cover(&touched, 3), at_hours(&[1, 2, 3, 7, 9]));
        assert_eq!(cover(&[], 3), vec![]);
    }

    #[test]
    fn cover_fills_the_shortest_gaps_first() {
        // Runs [1-3], [7], [9], [20-21]: gaps of 3, 1 and 10 hours.
        let touched = at_hours(&[1, 2, 3, 7, 9, 20, 21]);
        assert_eq!(cover(&touched, 3), at_hours(&[1, 2, 3, 7, 8, 9, 20, 21]));
        assert_eq!(cover(&touched, 2), at_hours(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 20, 21]));
        assert_eq!(cover(&touched, 1), (1..=21).map(hour).collect::<Vec<_>>());
        assert_eq!(cover(&touched, 0), cover(&touched, 1), "at least one run");
    }

    #[test]
    fn cover_bounds_twenty_thousand_scattered_hours() {
        // Every other hour over more than four years: 20,000 runs.
        let touched: Vec<Hour> = (0..20_000).map(|i| hour(2 * i)).collect();
        let covered = cover(&touched, MAX_HOUR_RUNS);
        assert!(Hour::runs(&covered).len() <= MAX_HOUR_RUNS);
        assert!(touched.iter().all(|h| covered.binary_search(h).is_ok()), "every touched hour is covered");
        assert!(covered.windows(2).all(|w| w[0] < w[1]), "sorted and distinct");
        assert!(covered.len() < 2 * touched.len());
    }
}
