//! What a scrape of the admin listener shows: every documented family with its help text
//! right after start, process and build metrics, one convention for states, and cache gauges
//! that are exact at each scrape. Alone in their test binary: the recorder is process-wide
//! and the gauges without labels are the last writer's.

mod support;

use support::gateway::{client, config_with_upstreams, spawn};
use support::FakeUpstream;

struct Trio {
    _auth: FakeUpstream,
    _storage: FakeUpstream,
    url: String,
}

async fn trio() -> Trio {
    let storage = FakeUpstream::ok().await;
    Trio {
        url: storage.url(),
        _auth: FakeUpstream::ok().await,
        _storage: storage,
    }
}

fn cfg_for(t: &Trio) -> deltastream_gateway::config::Config {
    let url = t.url.clone();
    config_with_upstreams(move |_| url.clone())
}

#[tokio::test]
async fn every_documented_metric_family_shows_in_the_first_scrape_with_help() {
    let t = trio().await;
    let gw = spawn(cfg_for(&t)).await;
    let text = client()
        .get(format!("http://{}/metrics", gw.admin_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (name, _, _) in deltastream_gateway::observability::catalog::FAMILIES {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("# HELP {name} "))),
            "no HELP for {name}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with(name) && !l.starts_with('#')),
            "{name} has no series right after start"
        );
    }
    // Process metrics and the build.
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert!(text.contains(name), "{name} missing");
    }
    assert!(text.lines().any(|l| l.starts_with("gateway_build_info{")
        && l.contains("version=")
        && l.contains("git_sha=")));
    // One convention for states: a series per state, 1 for the current one.
    assert!(
        text.contains(r#"gateway_circuit_breaker_state{upstream="storage",state="closed"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"gateway_circuit_breaker_state{upstream="storage",state="open"} 0"#));
    // The README's metric table and the catalog name the same gateway families.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let table = readme
        .split("| metric | labels |")
        .nth(1)
        .expect("metric table");
    let mut documented = Vec::new();
    for line in table.lines().skip(2).take_while(|l| l.starts_with('|')) {
        let first = line.split('|').nth(1).unwrap_or("");
        documented.extend(
            first
                .split('`')
                .skip(1)
                .step_by(2)
                .filter(|n| n.starts_with("gateway_"))
                .map(str::to_string),
        );
    }
    let catalog: Vec<&str> = deltastream_gateway::observability::catalog::FAMILIES
        .iter()
        .map(|(n, _, _)| *n)
        .collect();
    for name in &documented {
        assert!(
            catalog.contains(&name.as_str()),
            "README documents {name}, which is not exported"
        );
    }
    for name in &catalog {
        assert!(
            documented.iter().any(|d| d == name),
            "{name} is exported but missing from the README's metric table"
        );
    }
}

#[tokio::test]
async fn the_cache_gauges_are_exact_at_each_scrape() {
    let t = trio().await;
    let gw = spawn(cfg_for(&t)).await;
    let c = client();
    for q in ["a=1", "a=2", "a=3", "a=4"] {
        let r = c
            .get(format!("{}/api/data/products?{q}", gw.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let text = c
        .get(format!("http://{}/metrics", gw.admin_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(-1.0)
    };
    assert!(value("gateway_cache_entries") >= 4.0, "{text}");
    assert!(value("gateway_cache_bytes") > 0.0, "{text}");
}
