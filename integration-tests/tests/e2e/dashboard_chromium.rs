//! The dashboard page in a real browser: headless Chromium (Debian's
//! `chromium`, which `scripts/stack.sh tools` installs) loads `/` from a
//! running `serving-layer serve` and the rendered DOM must hold the demand
//! chart with one line per category, the spikes and top-products tables
//! with their rows, and a freshness badge per layer. Without a key the
//! page shows only its sign-in form; a dashboard key (in the link's
//! fragment here) signs it in, and from then on its requests carry nothing
//! but the session cookie the server set.
//!
//! Without Chromium the test fails and says how to install it: a dashboard
//! test that silently passes would prove nothing.

use std::process::Stdio;
use std::time::Duration;

use integration_tests::fixture::Stack;
use integration_tests::serving::{seed_dashboard, serve_binary};
use tokio_util::sync::CancellationToken;

fn chromium() -> std::path::PathBuf {
    for candidate in ["chromium", "chromium-browser"] {
        if let Ok(out) = std::process::Command::new("sh").args(["-c", &format!("command -v {candidate}")]).output()
            && out.status.success()
        {
            return String::from_utf8_lossy(&out.stdout).trim().into();
        }
    }
    panic!("chromium is not installed: run `scripts/stack.sh tools` (or `apt-get install -y chromium`)");
}

/// The page's DOM after its scripts ran for `virtual_ms` of virtual time
/// (fetches complete; the 15 s refresh timer fires only in a longer budget).
async fn dump_dom(url: &str, virtual_ms: u32) -> String {
    let out = headless(url, virtual_ms, &["--dump-dom"], "UTC").await;
    String::from_utf8(out).unwrap()
}

/// Chromium, headless, on `url` for `virtual_ms` of virtual time with
/// `args` (`--dump-dom`, `--screenshot=…`) in time zone `tz`; its output.
async fn headless(url: &str, virtual_ms: u32, args: &[&str], tz: &str) -> Vec<u8> {
    let profile = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new(chromium())
            .env("TZ", tz)
            .current_dir(profile.path())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(format!("--virtual-time-budget={virtual_ms}"))
            .args(args)
            .arg(url)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium finished within 90 s")
    .unwrap();
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// The opening tags in `dom` that carry `data-testid="id"`.
fn tags_with<'a>(dom: &'a str, id: &str) -> Vec<&'a str> {
    let needle = format!("data-testid=\"{id}\"");
    dom.match_indices(&needle)
        .map(|(at, _)| {
            let start = dom[..at].rfind('<').unwrap();
            let end = at + dom[at..].find('>').unwrap();
            &dom[start..=end]
        })
        .collect()
}

/// The text of the element whose opening tag is `tag` (up to its next `<`).
fn text_after<'a>(dom: &'a str, tag: &str) -> &'a str {
    let at = dom.find(tag).unwrap() + tag.len();
    &dom[at..at + dom[at..].find('<').unwrap()]
}

fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let at = tag.find(&key)? + key.len();
    Some(&tag[at..at + tag[at..].find('"')?])
}

#[tokio::test]
async fn the_dashboard_renders_chart_tables_and_badges_in_chromium() {
    let browser = chromium();
    let (url, pool) = Stack::from_env().migrated_database("dashboard_chromium", None).await.unwrap();
    let data = seed_dashboard(&pool).await.unwrap();

    let served = serve_binary(&url).await;
    // `localhost`: a secure context for the browser, so it keeps the
    // session cookie (Secure) over plain HTTP here.
    let page = format!("http://localhost:{}/", served.addr.port());
    let key = integration_tests::serving::key_for(served.addr, "/api/spikes").expect("a dashboard key");

    let signed_out = dump_dom(&page, 3000).await;
    println!("rendered with {}", browser.display());
    let form = tags_with(&signed_out, "signin");
    assert_eq!(form.len(), 1, "no sign-in form:\n{signed_out}");
    assert_eq!(attr(form[0], "hidden"), None, "the sign-in form is hidden without a key:\n{signed_out}");
    assert!(signed_out.contains("data-signed-in=\"false\""), "{signed_out}");
    assert!(tags_with(&signed_out, "popular-row").is_empty(), "data shown without a key");

    let dom = dump_dom(&format!("{page}#key={key}"), 5000).await;
    assert!(dom.contains("data-signed-in=\"true\""), "the page did not sign in:\n{dom}");
    assert_eq!(attr(tags_with(&dom, "signin")[0], "hidden"), Some(""), "{dom}");
    assert!(dom.contains("data-loaded=\"true\""), "the script did not finish a refresh:\n{dom}");
    assert_eq!(tags_with(&dom, "error").first().and_then(|t| attr(t, "hidden")), Some(""), "an error shows:\n{dom}");

    // The chart: an SVG with one line per category, each through every hour.
    assert_eq!(tags_with(&dom, "demand-chart").len(), 1, "no chart:\n{dom}");
    let series = tags_with(&dom, "demand-series");
    let mut categories: Vec<&str> = series.iter().filter_map(|t| attr(t, "data-category")).collect();
    categories.sort();
    let expected: Vec<String> = data.categories.iter().map(|c| c.replace('&', "&amp;")).collect();
    assert_eq!(categories, expected, "chart lines");
    for line in &series {
        assert_eq!(attr(line, "data-points"), Some("6"), "{line}");
        let d = attr(line, "d").unwrap();
        assert!(d.starts_with('M') && d.matches('L').count() >= 23, "a line over 24 hours: {d}");
    }

    // Spikes, strongest first, with catalog names.
    let spike_rows = tags_with(&dom, "spike-row");
    let spiking: Vec<&str> = spike_rows.iter().filter_map(|t| attr(t, "data-product-id")).collect();
    assert_eq!(spiking, data.spikes);
    assert!(dom.contains(">Wooden train</a></td>"), "spike product name missing");

    // Top products, by rank; names are text, never markup.
    let popular: Vec<&str> = tags_with(&dom, "popular-row").iter().filter_map(|t| attr(t, "data-product-id")).collect();
    assert_eq!(popular, data.popular);
    assert!(dom.contains(">Garden hose &lt;20 m&gt;</a></td>"), "names must be escaped text");

    // A badge per layer, fresh.
    for layer in ["speed", "batch"] {
        let badge = tags_with(&dom, &format!("freshness-{layer}"));
        assert_eq!(badge.len(), 1, "{layer} badge");
        assert_eq!(attr(badge[0], "data-status"), Some("fresh"), "{}", badge[0]);
        assert!(text_after(&dom, badge[0]).starts_with(&format!("{layer}: fresh")));
    }

    // It refreshes itself: three loads in 35 s (at 0, 15 and 30 s).
    let later = dump_dom(&format!("{page}#key={key}"), 35_000).await;
    let body = later.find("<body").map(|at| &later[at..at + later[at..].find('>').unwrap()]).unwrap();
    assert_eq!(attr(body, "data-refreshes"), Some("3"), "{body}");
}

/// `%XX` escapes of a data URL decoded.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// The fields of one CSV line (RFC 4180 quoting).
fn csv_fields(line: &str) -> Vec<String> {
    let (mut fields, mut field, mut quoted, mut chars) = (Vec::new(), String::new(), false, line.chars().peekable());
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(std::mem::take(&mut field)),
            _ => field.push(c),
        }
    }
    fields.push(field);
    fields
}

/// The body's opening tag.
fn body_tag(dom: &str) -> &str {
    let at = dom.find("<body").unwrap();
    &dom[at..at + dom[at..].find('>').unwrap()]
}

/// The page at `url` in time zone `tz`, loaded whole. A request that
/// failed shows in the page's error line until its next refresh; on a test
/// machine running other suites a dashboard query can time out, so a page
/// showing an error is loaded once more (and the error printed) before
/// [`assert_loaded`] judges it.
async fn loaded_page(url: &str, tz: &str) -> String {
    let dom = String::from_utf8(headless(url, 8000, &["--dump-dom"], tz).await).unwrap();
    let error = tags_with(&dom, "error");
    match error.first() {
        Some(tag) if attr(tag, "hidden").is_none() => {
            println!("{url}: the page showed {:?}; loading it again", text_after(&dom, tag));
            String::from_utf8(headless(url, 8000, &["--dump-dom"], tz).await).unwrap()
        }
        _ => dom,
    }
}

fn assert_loaded(dom: &str, what: &str) {
    assert!(dom.contains("data-signed-in=\"true\""), "{what}: the page did not sign in:\n{dom}");
    assert!(dom.contains("data-loaded=\"true\""), "{what}: no refresh finished:\n{dom}");
    let error = tags_with(dom, "error")[0];
    assert_eq!(attr(error, "hidden"), Some(""), "{what}: an error shows: {}", text_after(dom, error));
}

/// The analyst's pages against a running pipeline (issue 19, item 2): three
/// days of generated history published by a batch run, a live burst of
/// demand for one product flowing through the speed layer (group mode,
/// under its role), and `serve` under the reader roles with prices in
/// euros. Headless Chromium renders each page from its link and the DOM
/// must show: one line per category in colours that never repeat, the
/// previous period beside the current one and the totals of both equal to
/// the database's, the current hour as a dashed projection (not a fall to
/// zero), a CSV export of exactly what is shown, times in the viewer's time
/// zone, a category filter, product search, and a product page with its
/// curve against the baseline, its spike periods and its spike history.
/// Screenshots go to `DASHBOARD_SCREENSHOTS` (`make screenshots` writes
/// them into `docs/screenshots/`), else to a temporary folder.
#[tokio::test]
async fn the_analyst_pages_work_against_a_running_pipeline() {
    use batch_layer::ingest::{self, IngestConfig};
    use batch_layer::lake::Lake;
    use batch_layer::recompute::{self, RunConfig, RunOutcome};
    use integration_tests::fixture::role_url;
    use integration_tests::generator::{self, Args, event_record};

    chromium();
    let stack = Stack::from_env();
    let topic = stack.fresh_topic("dash_live", 2).await.unwrap();
    let dlq = stack.fresh_topic("dash_live_dlq", 1).await.unwrap();
    let (url, pool) = stack.migrated_database("dashboard_live", Some(1)).await.unwrap();
    let (sales_url, _sales) = stack.fresh_database("dashboard_live_sales").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::parse(dir.path().join("lake").to_str().unwrap()).unwrap();
    let args = Args {
        backfill_hours: 72,
        products: 30,
        users: 300,
        rate: 1.0,
        spikes: Some(2),
        no_catalog: false,
        sales_database_url: sales_url.clone(),
        ..Args::for_tests(stack.brokers(), &topic, 71)
    };
    generator::run(args).await.unwrap();
    ingest::run(IngestConfig::catch_up(stack.brokers(), &topic, &lake), CancellationToken::new()).await.unwrap();
    let run = RunConfig {
        full: true,
        sales_database_url: Some(sales_url),
        ..RunConfig::new(url.clone(), lake, topic.clone())
    };
    assert!(matches!(recompute::run(&run).await.unwrap(), RunOutcome::Published { .. }));

    // The speed layer brings a burst on the product with the smallest
    // baseline share: a spike of this hour.
    let logs = tempfile::tempdir().unwrap();
    let _speed =
        integration_tests::fixture::speed_layer(stack.brokers(), &url, &topic, &dlq, &logs.path().join("speed.log"));
    let (burst, name, category): (String, String, String) = sqlx::query_as(
        "SELECT b.product_id, p.name, p.category FROM batch.demand_baseline AS b JOIN batch.products AS p USING (product_id)
         ORDER BY b.share, b.product_id LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let now = chrono::Utc::now();
    let records: Vec<_> = (0..300).map(|i| event_record(&format!("u-burst-{i}"), &burst, "page_view", now)).collect();
    generator::send_records(stack.brokers(), &topic, &records).unwrap();
    integration_tests::checks::wait_for_speed(&pool, stack.topic_size(&topic).unwrap()).await;

    let served = integration_tests::serving::serve_binary_with(
        &url,
        &[
            "--currency",
            "EUR",
            "--recommender-database-url",
            &role_url(&url, "recommender_reader"),
            "--dashboard-database-url",
            &role_url(&url, "dashboard_reader"),
        ],
    )
    .await;
    let key = integration_tests::serving::key_for(served.addr, "/api/spikes").expect("a dashboard key");
    let page = format!("http://localhost:{}/#key={key}", served.addr.port());
    let sum = |from: &str, to: &str| {
        let pool = pool.clone();
        let (from, to) = (from.to_string(), to.to_string());
        async move {
            sqlx::query_as::<_, (String, i64)>(
                "SELECT category, sum(views)::bigint FROM serving.category_demand_hourly
                 WHERE hour >= $1::timestamptz AND hour < $2::timestamptz GROUP BY 1 ORDER BY 1",
            )
            .bind(from)
            .bind(to)
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };

    // The overview, compared with the previous 24 hours.
    let dom = loaded_page(&format!("{page}&compare=1"), "UTC").await;
    assert_loaded(&dom, "overview");
    let body = body_tag(&dom);
    let (from, to, previous) = (
        attr(body, "data-range-from").unwrap(),
        attr(body, "data-range-to").unwrap(),
        attr(body, "data-previous-from").unwrap(),
    );
    let now_totals = sum(from, to).await;
    let then_totals = sum(previous, from).await;
    let series: Vec<&str> = tags_with(&dom, "demand-series").iter().filter_map(|t| attr(t, "data-category")).collect();
    let categories: Vec<&str> = now_totals.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(series, categories, "one line per category");
    assert!(categories.len() >= 3, "{categories:?}");
    let colours: std::collections::HashSet<&str> =
        tags_with(&dom, "legend-item").iter().filter_map(|t| attr(t, "data-colour")).collect();
    assert_eq!(colours.len(), categories.len(), "a colour per category, none repeated");
    assert!(!tags_with(&dom, "previous-series").is_empty(), "the previous period is drawn");
    let totals = tags_with(&dom, "totals-row");
    let total = |tag: &&str, key: &str| attr(tag, key).map(|v| v.parse::<i64>().unwrap());
    for (category, views) in &now_totals {
        let row =
            totals.iter().find(|t| attr(t, "data-category") == Some(category)).expect("a totals row per category");
        let then = then_totals.iter().find(|(c, _)| c == category).map_or(0, |(_, v)| *v);
        assert_eq!((total(row, "data-now"), total(row, "data-then")), (Some(*views), Some(then)), "{category}");
    }
    let all = totals.iter().find(|t| attr(t, "data-category") == Some("all")).unwrap();
    assert_eq!(total(all, "data-now"), Some(now_totals.iter().map(|(_, v)| v).sum::<i64>()));
    // The current hour: a dashed projection of the burst's category, above what came so far.
    let partial: Vec<&str> = tags_with(&dom, "partial-hour");
    let burst_hour = partial
        .iter()
        .find(|t| attr(t, "data-category") == Some(category.as_str()))
        .expect("the current hour drawn as partial");
    let (actual, projected): (f64, f64) = (
        attr(burst_hour, "data-actual").unwrap().parse().unwrap(),
        attr(burst_hour, "data-projected").unwrap().parse().unwrap(),
    );
    assert!(actual >= 300.0 && projected >= actual, "{burst_hour}");
    // The export holds what the chart shows, and the previous period's.
    let export = tags_with(&dom, "export")[0];
    let href = attr(export, "href").unwrap();
    let csv = percent_decode(href.strip_prefix("data:text/csv;charset=utf-8,").expect("a CSV data link"));
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("hour_utc,hour_local,category,views,previous_period_views"));
    let rows: Vec<Vec<String>> = lines.map(csv_fields).collect();
    assert_eq!(Some(rows.len().to_string().as_str()), attr(export, "data-rows"));
    for (category, views) in &now_totals {
        let exported: i64 = rows.iter().filter(|r| r[2] == *category).map(|r| r[3].parse::<i64>().unwrap()).sum();
        assert_eq!(exported, *views, "exported views of {category}");
    }

    // Times in the viewer's time zone.
    let kolkata = loaded_page(&page, "Asia/Kolkata").await;
    assert_loaded(&kolkata, "overview in Kolkata");
    let zone = text_after(&kolkata, tags_with(&kolkata, "timezone")[0]);
    // ICU may name it by its older alias, Asia/Calcutta.
    assert!(zone.starts_with("Asia/") && zone.ends_with(" (UTC+05:30)"), "{zone}");
    let labels: Vec<&str> = tags_with(&kolkata, "x-label").iter().map(|t| text_after(&kolkata, t)).collect();
    assert!(!labels.is_empty() && labels.iter().all(|l| l.contains(":30")), "hours in Kolkata: {labels:?}");

    // Revenue in the shop's currency.
    let revenue = loaded_page(&format!("{page}&measure=revenue_cents"), "UTC").await;
    assert_loaded(&revenue, "revenue");
    assert!(revenue.contains("€"), "money in euros");

    // One category: its line, its spikes and top products only.
    let only =
        loaded_page(&format!("{page}&category={}", category.replace('&', "%26").replace(' ', "%20")), "UTC").await;
    assert_loaded(&only, "one category");
    let lines: Vec<&str> = tags_with(&only, "demand-series").iter().filter_map(|t| attr(t, "data-category")).collect();
    assert_eq!(lines, [category.replace('&', "&amp;").as_str()]);
    let top: Vec<String> =
        tags_with(&only, "popular-row").iter().filter_map(|t| attr(t, "data-product-id")).map(String::from).collect();
    let in_category: Vec<String> = sqlx::query_scalar("SELECT product_id FROM serving.products WHERE category = $1")
        .bind(&category)
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(!top.is_empty() && top.iter().all(|p| in_category.contains(p)), "{top:?}");
    let spiking: Vec<&str> = tags_with(&only, "spike-row").iter().filter_map(|t| attr(t, "data-product-id")).collect();
    assert!(spiking.contains(&burst.as_str()), "the burst is a spike now: {spiking:?}");

    // Search by part of a name.
    let part: String = name.split_whitespace().next().unwrap().to_string();
    let found = loaded_page(&format!("{page}&q={}", part.replace(' ', "%20")), "UTC").await;
    let results: Vec<&str> =
        tags_with(&found, "search-result").iter().filter_map(|t| attr(t, "data-product-id")).collect();
    let expected: Vec<String> = sqlx::query_scalar(
        "SELECT product_id FROM serving.products WHERE name ILIKE '%' || $1 || '%' OR product_id ILIKE '%' || $1 || '%'
         ORDER BY product_id = $1 DESC, name, product_id LIMIT 12",
    )
    .bind(&part)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(results.contains(&burst.as_str()) && results == expected, "search {part:?}: {results:?} vs {expected:?}");

    // The product's page: its curve against the baseline, its spike periods, its history.
    let product_link = format!("{page}&view=product&product={burst}&range=72");
    let dom = loaded_page(&product_link, "UTC").await;
    assert_loaded(&dom, "product page");
    assert_eq!(text_after(&dom, tags_with(&dom, "product-title")[0]), name.replace('&', "&amp;"));
    let facts = text_after(&dom, tags_with(&dom, "product-facts")[0]);
    assert!(facts.contains(&format!("category {}", category.replace('&', "&amp;"))) && facts.contains('€'), "{facts}");
    assert_eq!(tags_with(&dom, "product-demand").len(), 1);
    assert_eq!(tags_with(&dom, "product-expected").len(), 1, "the baseline's expectation is drawn");
    let api = integration_tests::serving::get(
        served.addr,
        &format!(
            "/api/products/{burst}?from={}&to={}",
            attr(body_tag(&dom), "data-range-from").unwrap(),
            attr(body_tag(&dom), "data-range-to").unwrap()
        ),
    )
    .await
    .unwrap()
    .json();
    let spikes = api["spikes"].as_array().unwrap();
    assert!(!spikes.is_empty(), "the burst is in its spike history: {api}");
    assert_eq!(tags_with(&dom, "product-spike-row").len(), spikes.len());
    assert_eq!(tags_with(&dom, "spike-period").len(), spikes.len(), "each spike period is shaded");
    assert!(!tags_with(&dom, "partial-hour").is_empty(), "the current hour is partial on the product page too");
    let export = percent_decode(
        attr(tags_with(&dom, "export")[0], "href").unwrap().strip_prefix("data:text/csv;charset=utf-8,").unwrap(),
    );
    assert!(
        export.starts_with("hour_utc,hour_local,views,cart_adds,purchases,units,revenue_EUR,demand,expected,is_spike"),
        "{export}"
    );

    // Screenshots of the two pages.
    let shots = std::env::var_os("DASHBOARD_SCREENSHOTS").map(std::path::PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    let shots = shots.unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&shots).unwrap();
    for (file, link) in
        [("dashboard-overview.png", format!("{page}&compare=1")), ("dashboard-product.png", product_link)]
    {
        let path = shots.join(file);
        headless(
            &link,
            8000,
            &[&format!("--screenshot={}", path.display()), "--window-size=1280,1500", "--hide-scrollbars"],
            "Europe/Berlin",
        )
        .await;
        let png = std::fs::read(&path).unwrap();
        assert!(png.starts_with(b"\x89PNG") && png.len() > 20_000, "{} is no screenshot", path.display());
    }
}
