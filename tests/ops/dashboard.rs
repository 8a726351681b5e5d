//! The Grafana dashboard (`docker/grafana/deltastream-gateway.json`) and the alerting rules
//! (`docker/prometheus/gateway-alerts.yml`) stay true to what the gateway exports: the
//! dashboard parses, every panel has a title and queries, and every metric name in every
//! PromQL expression of either is a family of `observability::catalog::FAMILIES` (with the
//! `_bucket`/`_sum`/`_count` series only for histograms), a `process_*` family that the
//! process collector renders, or (rules only) a series the rule file records itself or a name
//! in [`PENDING_FAMILIES`]. A renamed metric breaks this test instead of silently emptying a
//! panel or leaving an alert that can never fire.

use std::collections::BTreeSet;

use deltastream_gateway::observability::catalog::{Kind, FAMILIES};
use serde_json::Value;

const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/docker/grafana/deltastream-gateway.json"
);

/// Words of PromQL that look like metric names but are not (keywords and modifiers; the
/// functions and aggregations are recognised by the `(` that follows them).
const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
];

fn dashboard() -> Value {
    let text = std::fs::read_to_string(DASHBOARD).expect("dashboard file is readable");
    serde_json::from_str(&text).expect("dashboard is valid JSON")
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    let mut todo: Vec<&Value> = dashboard["panels"]
        .as_array()
        .expect("dashboard has a panels array")
        .iter()
        .collect();
    while let Some(p) = todo.pop() {
        if let Some(nested) = p["panels"].as_array() {
            todo.extend(nested);
        }
        out.push(p);
    }
    out
}

/// The metric names an expression selects: string literals, label matchers `{...}`, ranges
/// `[...]`, grouping lists (`by (...)`, `on (...)`, ...), Grafana variables (`$x`), numbers,
/// keywords and function names (an identifier followed by `(`) are not metric names.
fn metric_names(expr: &str) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    // Set after `by`/`without`/`on`/`ignoring`/`group_*`: the next `( ... )` lists labels.
    let mut label_list_follows = false;
    let mut in_label_list = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                while i < chars.len() && chars[i] != close {
                    if chars[i] == '"' {
                        i += 1;
                        while i < chars.len() && chars[i] != '"' {
                            if chars[i] == '\\' {
                                i += 1;
                            }
                            i += 1;
                        }
                    }
                    i += 1;
                }
                i += 1;
            }
            '(' => {
                in_label_list = label_list_follows;
                label_list_follows = false;
                i += 1;
            }
            ')' => {
                in_label_list = false;
                i += 1;
            }
            '$' => {
                i += 1;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let rest: String = chars[i..].iter().collect();
                let rest = rest.trim_start();
                let next = rest.chars().next();
                // `sum by (le) (...)`: an aggregation whose grouping comes first.
                let grouping_follows = ["by", "without"].iter().any(|k| {
                    rest.strip_prefix(k)
                        .is_some_and(|r| r.starts_with(|c: char| c.is_whitespace() || c == '('))
                });
                let lower = word.to_ascii_lowercase();
                if matches!(
                    lower.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                ) {
                    label_list_follows = true;
                } else if in_label_list || KEYWORDS.contains(&lower.as_str()) {
                    // a label name in a grouping list, or a keyword
                } else if next == Some('(') || grouping_follows {
                    // a function or aggregation
                } else {
                    names.push(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// Names a query may select: each family, plus the `_bucket`/`_sum`/`_count` series of a
/// histogram, plus what the process collector renders.
fn exported_names() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (name, kind, _) in FAMILIES {
        names.insert((*name).to_string());
        if *kind == Kind::Histogram {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
    }
    // The process collector is not in the catalog: take its families from a real render.
    // The recorder first: `render` collects the process metrics before it would install it.
    deltastream_gateway::observability::metrics::handle();
    let text = deltastream_gateway::observability::metrics::render();
    let process: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("process_"))
        .collect();
    assert!(
        process.contains(&"process_resident_memory_bytes"),
        "the process collector renders its families:\n{text}"
    );
    names.extend(process.into_iter().map(str::to_string));
    names
}

/// The metric names of every expression that are not exported, as `panel: name` lines.
fn unknown_metrics(dashboard: &Value, exported: &BTreeSet<String>) -> Vec<String> {
    let mut unknown = Vec::new();
    for panel in panels(dashboard) {
        let title = panel["title"].as_str().unwrap_or("?");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default();
            let names = metric_names(expr);
            if names.is_empty() {
                unknown.push(format!("{title}: no metric in `{expr}`"));
            }
            for name in names {
                if !exported.contains(&name) {
                    unknown.push(format!("{title}: {name}"));
                }
            }
        }
    }
    unknown
}

#[test]
fn every_panel_has_a_title_and_queries_on_the_datasource_variable() {
    let d = dashboard();
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(d["uid"].as_str().is_some_and(|t| !t.is_empty()));
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let ds = vars
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(ds["query"], "prometheus");
    let ds_ref = format!("${{{}}}", ds["name"].as_str().expect("variable name"));

    let mut ids = BTreeSet::new();
    let mut queries = 0;
    for panel in panels(&d) {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(!title.is_empty(), "a panel without a title: {panel}");
        let id = panel["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} used twice");
        assert!(panel["gridPos"]["w"].as_u64().is_some(), "{title}: gridPos");
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], ds_ref.as_str(), "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no targets");
        let mut ref_ids = BTreeSet::new();
        for t in targets {
            assert!(
                t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                "{title}: a target without an expression"
            );
            assert!(
                ref_ids.insert(t["refId"].as_str().expect("refId")),
                "{title}: refId twice"
            );
            assert_eq!(t["datasource"]["uid"], ds_ref.as_str(), "{title}");
            queries += 1;
        }
    }
    assert!(queries >= 20, "only {queries} queries");
}

#[test]
fn every_query_names_only_metrics_the_gateway_exports() {
    let d = dashboard();
    let exported = exported_names();
    let unknown = unknown_metrics(&d, &exported);
    assert!(
        unknown.is_empty(),
        "metrics the gateway does not export:\n{}",
        unknown.join("\n")
    );
}

#[test]
fn the_dashboard_covers_the_issue_s_panels() {
    // Request rate, error ratio, latency by route, breakers, cache, limiter, instances,
    // WebSocket, process: each needs its family in at least one query.
    let d = dashboard();
    let used: BTreeSet<String> = panels(&d)
        .into_iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .flat_map(|t| metric_names(t["expr"].as_str().unwrap_or_default()))
        .collect();
    for needed in [
        "gateway_requests_total",
        "gateway_request_duration_seconds_bucket",
        "gateway_upstream_attempts_total",
        "gateway_circuit_breaker_state",
        "gateway_cache_hits_total",
        "gateway_cache_misses_total",
        "gateway_ratelimit_decisions_total",
        "gateway_ratelimit_backend",
        "gateway_upstream_endpoints",
        "gateway_websocket_connections",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "gateway_runtime_scheduling_delay_seconds_bucket",
        "gateway_shed_total",
        "gateway_upstream_instance_concurrency_limit",
    ] {
        assert!(used.contains(needed), "no panel queries {needed}");
    }
}

#[test]
fn the_check_catches_a_misspelt_metric() {
    // The same check on a copy with one name misspelt must fail: the test above can.
    let text = std::fs::read_to_string(DASHBOARD).expect("dashboard file");
    let typo = text.replacen("gateway_requests_total", "gateway_request_total", 1);
    let d: Value = serde_json::from_str(&typo).expect("still JSON");
    let unknown = unknown_metrics(&d, &exported_names());
    assert_eq!(unknown.len(), 1, "{unknown:?}");
    assert!(
        unknown[0].ends_with(": gateway_request_total"),
        "{unknown:?}"
    );
}

#[test]
fn the_parser_finds_metric_names_and_nothing_else() {
    let expr = r#"histogram_quantile(0.99, sum by (le, route) (rate(gateway_request_duration_seconds_bucket{instance=~"$instance",route!="a{b}"}[$__rate_interval]))) / on (route) group_left (x) foo:bar offset 5m > bool 1e3"#;
    assert_eq!(
        metric_names(expr),
        ["gateway_request_duration_seconds_bucket", "foo:bar"]
    );
    assert!(metric_names("sum(rate(x[5m])) by (upstream)") == ["x"]);
}

// ------------------------------------------------------------------ the alerting rules

const RULES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/docker/prometheus/gateway-alerts.yml"
);

/// The Kubernetes ConfigMap's copy (deploy/kubernetes/kustomization.yaml) of [`RULES`].
const RULES_K8S: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/kubernetes/gateway-alert-rules.yml"
);

/// Families the rules use BEFORE the gateway exports them: the overload work (a later
/// issue) adds them, and the rules are written for them now. Pending, not exported: each
/// entry goes when its family reaches the catalog (the test then says so).
const PENDING_FAMILIES: &[(&str, &str)] = &[];

/// One rule of the file: `alert` or `record` name and its expression.
#[derive(Debug)]
struct Rule {
    kind: &'static str,
    name: String,
    expr: String,
}

/// The rules of a Prometheus rule file, read with just enough YAML for the shape the file
/// keeps (`- record:` / `- alert:` items, `expr:` inline or as a `>-` / `|` block). What it
/// does not understand it does not guess: `promtool check rules` (scripts/check-alerts) is
/// the file's full parser, and the counts below must agree with what it reports.
fn rules(text: &str) -> Vec<Rule> {
    let mut out: Vec<Rule> = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        i += 1;
        if trimmed.starts_with('#') {
            continue;
        }
        let item = trimmed.strip_prefix("- ").unwrap_or(trimmed);
        for kind in ["alert", "record"] {
            if let Some(name) = item.strip_prefix(kind).and_then(|r| r.strip_prefix(':')) {
                out.push(Rule {
                    kind,
                    name: name.trim().to_string(),
                    expr: String::new(),
                });
            }
        }
        if let Some(value) = trimmed.strip_prefix("expr:") {
            let value = value.trim();
            let expr = if value.starts_with('>') || value.starts_with('|') {
                // A block scalar: the lines indented deeper than `expr:`.
                let mut block = Vec::new();
                while i < lines.len() {
                    let l = lines[i];
                    let deeper = l.len() - l.trim_start().len() > indent;
                    if !(deeper || l.trim().is_empty()) {
                        break;
                    }
                    block.push(l.trim());
                    i += 1;
                }
                block.join("\n")
            } else {
                value.to_string()
            };
            let rule = out.last_mut().expect("an expr belongs to a rule");
            assert!(rule.expr.is_empty(), "{}: two exprs", rule.name);
            rule.expr = expr;
        }
    }
    out
}

/// `name: metric` for every metric name in an expression that is neither exported, nor
/// recorded by the file itself, nor pending.
fn unknown_rule_metrics(
    rules: &[Rule],
    exported: &BTreeSet<String>,
    pending: &[(&str, &str)],
) -> Vec<String> {
    let recorded: BTreeSet<&str> = rules
        .iter()
        .filter(|r| r.kind == "record")
        .map(|r| r.name.as_str())
        .collect();
    let mut unknown = Vec::new();
    for rule in rules {
        let names = metric_names(&rule.expr);
        if names.is_empty() {
            unknown.push(format!("{}: no metric in `{}`", rule.name, rule.expr));
        }
        for name in names {
            let pending = pending.iter().any(|(p, _)| *p == name);
            if !exported.contains(&name) && !recorded.contains(name.as_str()) && !pending {
                unknown.push(format!("{}: {name}", rule.name));
            }
        }
    }
    unknown
}

fn shipped_rules() -> Vec<Rule> {
    let text = std::fs::read_to_string(RULES).expect("rule file is readable");
    rules(&text)
}

#[test]
fn every_rule_names_only_metrics_the_gateway_exports_or_records() {
    let rules = shipped_rules();
    // What `promtool check rules` counts ("16 rules found"): the parser missed none.
    let items = std::fs::read_to_string(RULES)
        .unwrap()
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            t.starts_with("- alert:") || t.starts_with("- record:")
        })
        .count();
    assert_eq!(rules.len(), items, "{rules:#?}");
    for r in &rules {
        assert!(!r.expr.trim().is_empty(), "{} has no expr", r.name);
    }
    let unknown = unknown_rule_metrics(&rules, &exported_names(), PENDING_FAMILIES);
    assert!(
        unknown.is_empty(),
        "rules name metrics the gateway does not export:\n{}",
        unknown.join("\n")
    );
}

#[test]
fn pending_families_are_not_exported_yet() {
    // Once the overload work exports one, it must leave PENDING_FAMILIES (and the rule is then
    // checked like any other).
    let exported = exported_names();
    for (name, why) in PENDING_FAMILIES {
        assert!(
            !exported.contains(*name),
            "{name} is exported now: drop it from PENDING_FAMILIES ({why})"
        );
    }
}

#[test]
fn the_rules_cover_the_alerts_operators_asked_for() {
    let rules = shipped_rules();
    let alerts: BTreeSet<&str> = rules
        .iter()
        .filter(|r| r.kind == "alert")
        .map(|r| r.name.as_str())
        .collect();
    for needed in [
        "GatewayCircuitBreakerOpen",
        "GatewayErrorRatioHigh",
        "GatewayShedding",
        "GatewayRateLimitedRatioHigh",
        "GatewayUpstreamInstancesEjected",
        "GatewayRateLimiterOnFallback",
        "GatewayLatencyP99OverObjective",
        "GatewayConfigReloadFailed",
        "GatewayReplicaLatencyDiverging",
        "GatewayRuntimeLagging",
        "GatewayTLSCertificateExpiringSoon",
    ] {
        assert!(alerts.contains(needed), "no alert {needed}");
    }
    // Each alert's runbook is a section of docs/observability.md.
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/observability.md"
    ))
    .expect("docs/observability.md");
    let text = std::fs::read_to_string(RULES).unwrap();
    for anchor in text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook: \"docs/observability.md#"))
        .map(|a| a.trim_end_matches('"'))
    {
        // GitHub's anchor of a heading: lowercase, spaces as dashes.
        let has_heading = doc.lines().any(|l| {
            l.starts_with('#')
                && l.trim_start_matches('#')
                    .trim()
                    .to_ascii_lowercase()
                    .replace(' ', "-")
                    == anchor
        });
        assert!(
            has_heading,
            "no section for runbook #{anchor} in docs/observability.md"
        );
    }
}

#[test]
fn the_kubernetes_copy_of_the_rules_is_the_same_file() {
    let a = std::fs::read_to_string(RULES).unwrap();
    let b = std::fs::read_to_string(RULES_K8S).expect("deploy/kubernetes copy");
    assert!(
        a == b,
        "deploy/kubernetes/gateway-alert-rules.yml differs from docker/prometheus/gateway-alerts.yml: \
         cp docker/prometheus/gateway-alerts.yml deploy/kubernetes/gateway-alert-rules.yml"
    );
}

#[test]
fn the_rule_check_catches_a_misspelt_metric_and_a_pending_name_is_only_allowed_by_its_list() {
    let text = std::fs::read_to_string(RULES).unwrap();
    let exported = exported_names();
    let typo = text.replacen(
        "gateway_circuit_breaker_state{",
        "gateway_circuit_breaker_status{",
        1,
    );
    let unknown = unknown_rule_metrics(&rules(&typo), &exported, PENDING_FAMILIES);
    assert_eq!(
        unknown,
        ["GatewayCircuitBreakerOpen: gateway_circuit_breaker_status"]
    );
    // A name not exported (yet) passes only through the pending list.
    let unexported = text.replacen("gateway_shed_total", "gateway_shedding_total", 1);
    let unknown = unknown_rule_metrics(&rules(&unexported), &exported, &[]);
    assert_eq!(unknown, ["GatewayShedding: gateway_shedding_total"]);
    let pending = [("gateway_shedding_total", "pending")];
    assert!(unknown_rule_metrics(&rules(&unexported), &exported, &pending).is_empty());
    // A recorded series whose record is renamed is unknown wherever it is used.
    let typo = text.replacen(
        "job_route:gateway_requests:rate5m\n",
        "job_route:gateway_requestz:rate5m\n",
        1,
    );
    let unknown = unknown_rule_metrics(&rules(&typo), &exported, PENDING_FAMILIES);
    assert!(
        !unknown.is_empty()
            && unknown
                .iter()
                .all(|u| u.ends_with(": job_route:gateway_requests:rate5m")),
        "{unknown:?}"
    );
}

#[test]
fn the_rule_reader_takes_inline_and_block_expressions() {
    let text = "groups:\n  - name: g\n    rules:\n      - record: a:b\n        expr: sum(x)\n\
                \x20     - alert: A\n        # a comment\n        expr: >-\n          rate(y[5m])\n\
                \x20           > on (job) a:b\n        for: 1m\n";
    let r = rules(text);
    assert_eq!(r.len(), 2);
    assert_eq!(
        (r[0].kind, r[0].name.as_str(), r[0].expr.as_str()),
        ("record", "a:b", "sum(x)")
    );
    assert_eq!(r[1].expr, "rate(y[5m])\n> on (job) a:b");
    assert_eq!(metric_names(&r[1].expr), ["y", "a:b"]);
}
