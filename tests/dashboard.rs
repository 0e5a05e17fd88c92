//! The operations docs against a running gateway's `GET /metrics`, so that neither can drift:
//! - every metric that `deploy/grafana/sse-gateway.json`'s PromQL uses is exported (a histogram's
//!   `_bucket`, `_sum` and `_count` series count as the histogram), and the dashboard imports
//!   anywhere (its data source is a variable, never a fixed uid);
//! - README's metrics table lists exactly the exported metrics, with their types and labels.
//!
//! Both scrape a gateway joined to a real Redis, so the cluster's metrics are among them.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{Gateway, Redis};
use serde_json::Value;

const DASHBOARD: &str = include_str!("../deploy/grafana/sse-gateway.json");
const README: &str = include_str!("../README.md");
const HISTOGRAM_SERIES: [&str; 3] = ["_bucket", "_sum", "_count"];

/// Names in PromQL that are never metric names: aggregation operators (written with a space before
/// their parenthesis, as in `sum by (x) (...)`), binary-operator words and literals.
const NOT_METRICS: [&str; 20] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "atan2",
    "inf",
    "nan",
];
/// Words followed by a parenthesised list of label names.
const LABEL_LISTS: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The index just past the bracket that closes the one at `open`; quoted strings inside are skipped.
fn skip_group(bytes: &[u8], open: usize) -> usize {
    let close = match bytes[open] {
        b'{' => b'}',
        b'[' => b']',
        _ => b')',
    };
    let mut i = open + 1;
    while i < bytes.len() && bytes[i] != close {
        i = match bytes[i] {
            b'"' | b'\'' | b'`' => skip_string(bytes, i),
            _ => i + 1,
        };
    }
    i + 1
}

fn skip_string(bytes: &[u8], open: usize) -> usize {
    let quote = bytes[open];
    let mut i = open + 1;
    while i < bytes.len() && bytes[i] != quote {
        i += if bytes[i] == b'\\' { 2 } else { 1 };
    }
    i + 1
}

/// The metric names a PromQL expression selects: identifiers that are not function calls, operator
/// words, label names (in `{...}` or `by (...)`), durations or Grafana `$variables`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let bytes = expr.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'"' || b == b'\'' || b == b'`' {
            i = skip_string(bytes, i);
        } else if b == b'{' || b == b'[' {
            i = skip_group(bytes, i);
        } else if b == b'$' {
            i += 1;
            if bytes.get(i) == Some(&b'{') {
                i = skip_group(bytes, i);
            } else {
                while i < bytes.len() && ident(bytes[i]) {
                    i += 1;
                }
            }
        } else if b.is_ascii_digit() || b == b'.' {
            while i < bytes.len() && (ident(bytes[i]) || bytes[i] == b'.') {
                i += 1;
            }
        } else if ident(b) {
            let start = i;
            while i < bytes.len() && ident(bytes[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            let mut next = i;
            while next < bytes.len() && bytes[next].is_ascii_whitespace() {
                next += 1;
            }
            let call = bytes.get(next) == Some(&b'(');
            if LABEL_LISTS.contains(&word) {
                if call {
                    i = skip_group(bytes, next);
                }
            } else if !call && !NOT_METRICS.contains(&word.to_ascii_lowercase().as_str()) {
                names.insert(word.to_owned());
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Every PromQL expression in the dashboard: panel targets, and the metric of each
/// `label_values(<metric>, <label>)` variable query.
fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(
                !expr.trim().is_empty(),
                "panel {:?} has a target without expr",
                panel["title"]
            );
            exprs.push(expr.to_owned());
        }
    }
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if var["type"] != "query" {
            continue;
        }
        let query = var["query"]["query"]
            .as_str()
            .or(var["query"].as_str())
            .unwrap();
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable query {query:?} is not label_values(...)"));
        let (series, _label) = inner.rsplit_once(',').unwrap();
        exprs.push(series.to_owned());
    }
    exprs
}

/// `# TYPE` lines of an exposition: family name → type.
fn families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .map(|rest| {
            let (name, kind) = rest.split_once(' ').unwrap();
            (name.to_owned(), kind.trim().to_owned())
        })
        .collect()
}

/// Every `{"type": ..., "uid": ...}` data source reference anywhere in the dashboard.
fn datasource_uids(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::Object(ds)) = map.get("datasource") {
                out.push(ds["uid"].as_str().unwrap_or("(none)").to_owned());
            }
            map.values().for_each(|v| datasource_uids(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| datasource_uids(v, out)),
        _ => {}
    }
}

#[test]
fn promql_metric_names_are_found_and_nothing_else() {
    let expr = r#"histogram_quantile(0.99, sum by (le, action) (rate(a_bucket{x="}b", instance=~"$instance"}[$__rate_interval]))) / on (instance) group_left max(b_total offset 5m) > bool 1e3 or c"#;
    assert_eq!(
        metric_names(expr),
        ["a_bucket", "b_total", "c"]
            .into_iter()
            .map(String::from)
            .collect()
    );
    assert_eq!(metric_names("sum(up)").len(), 1);
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_is_exported() {
    let dashboard: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    // Importable as it is: a title and uid, a data source variable, and every query through it.
    assert_eq!(dashboard["title"], "sse-gateway");
    assert_eq!(dashboard["uid"], "sse-gateway");
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    let vars = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "no prometheus data source variable"
    );
    let mut uids = Vec::new();
    datasource_uids(&dashboard, &mut uids);
    assert!(uids.len() > 10, "{uids:?}");
    for uid in &uids {
        assert!(
            uid == "${datasource}" || uid == "-- Grafana --",
            "a data source fixed to {uid:?}: use the ${{datasource}} variable"
        );
    }
    let ids: Vec<u64> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ids.iter().collect::<BTreeSet<_>>().len(),
        ids.len(),
        "panel ids repeat"
    );

    let used: BTreeSet<String> = dashboard_exprs(&dashboard)
        .iter()
        .flat_map(|e| metric_names(e))
        .collect();

    let redis = Redis::start().await;
    let gw = Gateway::builder()
        .env("INTERNAL_PORT", "0")
        .env("REDIS_URL", redis.url())
        .spawn()
        .await;
    let scrape = gw.metrics().await;
    let types = families(&scrape.text);
    let mut missing = Vec::new();
    for name in &used {
        let exported = types.contains_key(name) && scrape.has(name);
        let histogram_series = HISTOGRAM_SERIES.iter().any(|suffix| {
            name.strip_suffix(suffix).is_some_and(|family| {
                types.get(family).map(String::as_str) == Some("histogram") && scrape.has(name)
            })
        });
        if !exported && !histogram_series {
            missing.push(name.as_str());
        }
    }
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics that /metrics does not export: {missing:?}\n{}",
        scrape.text
    );
    // The panels the operations brief asks for are all there.
    for family in [
        "sse_gateway_connections",
        "sse_gateway_connections_total",
        "sse_gateway_events_sent_total",
        "sse_gateway_bytes_sent_total",
        "sse_gateway_publish_deliveries_total",
        "sse_gateway_callback_duration_seconds_bucket",
        "sse_gateway_callback_errors_total",
        "sse_gateway_callback_queue",
        "sse_gateway_disconnects_total",
        "sse_gateway_heartbeats_total",
    ] {
        assert!(used.contains(family), "no panel uses {family}");
    }
    assert!(DASHBOARD.contains("histogram_quantile(0.99"));
    assert!(DASHBOARD.contains(r#"reason=\"error\""#));
}

/// Rows of README's metrics table: `| `name` | type | `label`, ... | meaning |`.
fn readme_metrics() -> BTreeMap<String, (String, BTreeSet<String>)> {
    README
        .lines()
        .map(str::trim_start)
        .filter(|line| line.starts_with("| `sse_gateway_"))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let name = cells[1].trim_matches('`').to_owned();
            let labels = cells[3]
                .split(',')
                .map(|l| l.trim().trim_matches('`').to_owned())
                .filter(|l| !l.is_empty() && l != "none")
                .collect();
            (name, (cells[2].to_owned(), labels))
        })
        .collect()
}

#[tokio::test]
async fn readme_documents_every_exported_metric_with_its_type_and_labels() {
    // Joined to a Redis, so the cluster's metrics (PROTOCOL §10) are exported too.
    let redis = Redis::start().await;
    let gw = Gateway::builder()
        .env("REDIS_URL", redis.url())
        .spawn()
        .await;
    let scrape = gw.metrics().await;
    let exported: BTreeMap<String, (String, BTreeSet<String>)> = families(&scrape.text)
        .into_iter()
        .map(|(family, kind)| {
            let labels = scrape
                .samples
                .iter()
                .filter(|s| {
                    s.name == family
                        || (kind == "histogram"
                            && HISTOGRAM_SERIES
                                .iter()
                                .any(|suffix| s.name == format!("{family}{suffix}")))
                })
                .flat_map(|s| s.labels.keys().filter(|k| *k != "le").cloned())
                .collect();
            (family, (kind, labels))
        })
        .collect();
    assert!(exported.len() >= 10, "{}", scrape.text);
    assert_eq!(
        readme_metrics(),
        exported,
        "README's metrics table (Operations) differs from GET /metrics:\n{}",
        scrape.text
    );
}
