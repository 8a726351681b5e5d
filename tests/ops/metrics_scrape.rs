//! What a scrape of the admin listener shows: every documented family with its help text
//! right after start, process and build metrics, one convention for states, and cache gauges
//! that are exact at each scrape, and the served certificate's expiry. Alone in their test binary: the recorder is process-wide
//! and the gauges without labels are the last writer's.

use crate::support;

use std::path::Path;

use deltastream_gateway::observability::alive::GLIBC_HEAP;
use deltastream_gateway::observability::catalog::ONLY_WITH_FEATURE;
use deltastream_gateway::server::{start_with_source, ConfigSource, Running};
use support::gateway::{client, config_with_upstreams, scrape, spawn};
use support::FakeUpstream;
use tokio::net::TcpListener;

/// One fake behind every upstream.
async fn gateway() -> (FakeUpstream, Running) {
    let up = FakeUpstream::ok().await;
    let url = up.url();
    let gw = spawn(config_with_upstreams(move |_| url.clone())).await;
    (up, gw)
}

#[tokio::test]
async fn every_documented_metric_family_shows_in_the_first_scrape_with_help() {
    let (_up, gw) = gateway().await;
    let text = scrape(gw.admin_addr).await;
    for (name, _, _) in deltastream_gateway::observability::catalog::FAMILIES {
        if ONLY_WITH_FEATURE.contains(name) {
            // No TLS here, so no series (a zero would read "expired in 1970"); the TLS test
            // below may set it meanwhile: the recorder is the process's.
            continue;
        }
        if *name == "gateway_heap_bytes" && !GLIBC_HEAP {
            // glibc's count, absent in a build where mimalloc serves the program.
            continue;
        }
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
    let (_up, gw) = gateway().await;
    let c = client();
    for q in ["a=1", "a=2", "a=3", "a=4"] {
        let r = c
            .get(format!("{}/api/data/products?{q}", gw.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let text = scrape(gw.admin_addr).await;
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(-1.0)
    };
    assert!(value("gateway_cache_entries") >= 4.0, "{text}");
    assert!(value("gateway_cache_bytes") > 0.0, "{text}");
}

/// A self-signed certificate for 127.0.0.1 whose notAfter is midnight UTC of `y-m-d`, written
/// (with its key) to `dir`'s cert.pem / key.pem.
fn write_cert(dir: &Path, (y, m, d): (i32, u8, u8)) {
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params.not_after = rcgen::date_time_ymd(y, m, d);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    for (name, pem) in [("cert.pem", cert.pem()), ("key.pem", key.serialize_pem())] {
        // Written then renamed, as a deploy tool would: a reload never reads half a file.
        let tmp = dir.join(format!("{name}.tmp"));
        std::fs::write(&tmp, pem).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
}

fn expiry(text: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with("gateway_tls_certificate_expiry_timestamp_seconds "))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn the_served_certificate_s_expiry_is_exported_at_start_and_follows_a_rotation() {
    let up = FakeUpstream::ok().await;
    let dir = tempfile::tempdir().unwrap();
    write_cert(dir.path(), (2031, 1, 1));
    let file = dir.path().join("gateway.toml");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let url = up.url();
    std::fs::write(
        &file,
        format!(
            "[server]\nhost = \"127.0.0.1\"\nshutdown_grace = \"2s\"\n\
             [server.tls]\ncert_file = {cert:?}\nkey_file = {key:?}\n\
             [upstreams.auth]\nurl = \"{url}\"\n[upstreams.storage]\nurl = \"{url}\"\n\
             [upstreams.analytics]\nurl = \"{url}\"\n[upstreams.socket]\nurl = \"{url}\"\n"
        ),
    )
    .unwrap();
    let source = ConfigSource {
        file: Some(file),
        env: false,
    };
    let cfg = source.load().expect("config loads");
    let public = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw = start_with_source(cfg, source, public, admin)
        .await
        .expect("gateway starts");

    // 2031-01-01T00:00:00Z
    assert_eq!(expiry(&scrape(gw.admin_addr).await), Some(1_924_992_000.0));

    // Rotation: new files, then a reload; the gauge follows the certificate now served.
    write_cert(dir.path(), (2032, 2, 3));
    let r = client()
        .post(format!("http://{}/admin/reload", gw.admin_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    // 2032-02-03T00:00:00Z
    assert_eq!(expiry(&scrape(gw.admin_addr).await), Some(1_959_379_200.0));
}
