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
    let profile = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new(chromium())
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
            .args(["--dump-dom", url])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium finished within 90 s")
    .unwrap();
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
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
    assert!(dom.contains("<td>Wooden train</td>"), "spike product name missing");

    // Top products, by rank; names are text, never markup.
    let popular: Vec<&str> = tags_with(&dom, "popular-row").iter().filter_map(|t| attr(t, "data-product-id")).collect();
    assert_eq!(popular, data.popular);
    assert!(dom.contains("<td>Garden hose &lt;20 m&gt;</td>"), "names must be escaped text");

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
