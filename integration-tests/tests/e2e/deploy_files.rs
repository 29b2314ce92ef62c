//! The alerting and dashboard files users deploy (`deploy/prometheus`,
//! `deploy/grafana`): the rules pass `promtool check rules`, their unit
//! tests (`promtool test rules`) fire each tested alert on its condition and
//! no other, and every metric the rules and the dashboard name is one the
//! binaries export, so a renamed metric cannot leave an alert silently dead.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn promtool(args: &[&str]) -> String {
    let out = std::process::Command::new("promtool")
        .args(args)
        .current_dir(root().join("deploy/prometheus"))
        .output()
        .unwrap_or_else(|e| panic!("promtool is not installed ({e}): run `scripts/stack.sh tools`"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// Metric names the workspace's sources export: the names given to the
/// `metrics` macros, and the serving layer's named constants.
fn exported() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut histograms = BTreeSet::new();
    for dir in ["batch-layer/src", "speed-layer/src", "serving-layer/src", "platform/src"] {
        for file in walk(&root().join(dir)) {
            let text = std::fs::read_to_string(&file).unwrap();
            for kind in ["counter!(\"", "gauge!(\"", "histogram!(\""] {
                for (at, _) in text.match_indices(kind) {
                    let rest = &text[at + kind.len()..];
                    let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                    if kind.starts_with("histogram") {
                        histograms.insert(name.clone());
                    }
                    names.insert(name);
                }
            }
            for line in text.lines().filter(|l| l.trim_start().starts_with("pub const") && l.contains("\"serving_")) {
                let name = line.split('"').nth(1).unwrap().to_string();
                if name.ends_with("_seconds") && !name.contains("age") {
                    histograms.insert(name.clone());
                }
                names.insert(name);
            }
        }
    }
    for h in histograms {
        for suffix in ["_bucket", "_sum", "_count"] {
            names.insert(format!("{h}{suffix}"));
        }
    }
    names
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// The platform's metric names in a PromQL text (`speed_…`, `batch_…`,
/// `serving_…`, `notify_…`).
fn referenced(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    for prefix in ["speed_", "batch_", "serving_", "notify_"] {
        for (at, _) in text.match_indices(prefix) {
            let before = at.checked_sub(1).map(|i| bytes[i]);
            if before.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-') {
                continue;
            }
            let name: String = text[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            names.insert(name);
        }
    }
    names
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let checked = promtool(&["check", "rules", "lambda-alerts.yml"]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "lambda-alerts.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn rules_and_dashboard_name_only_metrics_the_binaries_export() {
    let exported = exported();
    assert!(exported.contains("speed_records_total") && exported.contains("serving_request_seconds_bucket"));
    let rules = std::fs::read_to_string(root().join("deploy/prometheus/lambda-alerts.yml")).unwrap();
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("deploy/grafana/lambda-platform.json")).unwrap())
            .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8, "{} panels", panels.len());
    let mut exprs: Vec<String> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    exprs.extend(rules.lines().filter_map(|l| l.trim().strip_prefix("expr:")).map(|e| e.trim().to_owned()));
    let mut named = BTreeSet::new();
    for expr in &exprs {
        named.extend(referenced(expr));
    }
    assert!(named.len() >= 10, "{named:?}");
    let unknown: Vec<&String> = named.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(unknown.is_empty(), "named in deploy/ but exported by no binary: {unknown:?}");
}
