//! A reload that changes an upstream's settings but not its addresses keeps what the gateway
//! learned about it: an open breaker stays open (fast `circuit_open` with `Retry-After`, not
//! slow 503s against a dead service), an ejected instance stays out. A reload that changes the
//! addresses starts afresh (issue 25: any change reset the breaker, restarting its backoff).

use crate::support;

use std::time::{Duration, Instant};

use deltastream_gateway::config::{Config, Dur};
use deltastream_gateway::server::Running;
use serde_json::Value;
use support::gateway::{client, config_with_instances, spawn, upstream_view};
use support::{refused_addr, FakeUpstream};

/// `storage` at `urls`, a breaker that opens after 2 failed calls and stays open 30 s (far
/// longer than the test), an instance ejected after 2 failed attempts in a row for 30 s.
fn config(urls: &[String]) -> Config {
    let mut cfg = config_with_instances("storage", urls);
    let storage = cfg.upstreams.get_mut("storage").unwrap();
    storage.breaker.consecutive_failures = 2;
    storage.breaker.open_base = Dur::from_secs(30);
    storage.breaker.open_max = Dur::from_secs(30);
    storage.ejection.consecutive_failures = 2;
    storage.ejection.base_time = Dur::from_secs(30);
    // Not passed over after a failure: the dead instance keeps being picked until ejected.
    storage.bias_duration = Dur::from_millis(0);
    cfg
}

/// The same configuration with only storage's timeouts changed.
fn with_new_timeouts(mut cfg: Config) -> Config {
    let storage = cfg.upstreams.get_mut("storage").unwrap();
    storage.timeout = Dur::from_secs(9);
    storage.connect_timeout = Dur::from_secs(1);
    cfg
}

async fn underlying(gw: &Running) -> (u16, Option<String>, Value, Duration) {
    let started = Instant::now();
    let r = client()
        .get(format!("{}/api/data/underlying/NIFTY", gw.url()))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let retry_after = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let body = r.json().await.unwrap_or(Value::Null);
    (status, retry_after, body, started.elapsed())
}

async fn reload(gw: &Running, cfg: Config) {
    let report = gw.gateway.apply(cfg).await.expect("reload applies");
    assert!(
        report.changed.iter().any(|s| s == "upstreams"),
        "{report:?}"
    );
}

/// storage's entry of `/admin/upstreams`.
async fn storage_view(gw: &Running) -> Value {
    upstream_view(gw.admin_addr, "storage").await
}

fn instance(view: &Value, address: &str) -> Value {
    view["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["address"] == address)
        .unwrap_or_else(|| panic!("no {address} in {view}"))
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_stays_open_through_a_reload_unless_the_address_changes() {
    let dead = format!("http://{}", refused_addr().await);
    let cfg = config(std::slice::from_ref(&dead));
    let gw = spawn(cfg.clone()).await;
    // Two failed calls open the breaker; the third is refused fast.
    for _ in 0..2 {
        let (status, _, body, _) = underlying(&gw).await;
        assert_eq!(
            (status, body["reason"].as_str()),
            (503, Some("upstream_unavailable"))
        );
    }
    let (status, retry_after, body, _) = underlying(&gw).await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (503, Some("circuit_open"))
    );
    assert!(retry_after.is_some());

    // Only the timeouts change: still open, still fast, still telling clients when to return.
    reload(&gw, with_new_timeouts(cfg.clone())).await;
    let (status, retry_after, body, took) = underlying(&gw).await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (503, Some("circuit_open")),
        "{body}"
    );
    let retry_after: u64 = retry_after.expect("Retry-After").parse().unwrap();
    // The same opening: what is left of its 30 s (minus up to 20% jitter), not a new one.
    assert!((1..=30).contains(&retry_after), "Retry-After {retry_after}");
    assert!(took < Duration::from_millis(500), "refused in {took:?}");
    assert_eq!(storage_view(&gw).await["breaker"], "open");

    // Another address is another service as far as the gateway knows: a fresh breaker.
    let good = FakeUpstream::ok().await;
    reload(&gw, with_new_timeouts(config(&[good.url()]))).await;
    let (status, _, body, _) = underlying(&gw).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(good.hits(), 1);
    assert_eq!(storage_view(&gw).await["breaker"], "closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejected_instance_stays_out_through_a_reload_unless_the_addresses_change() {
    let dead_addr = refused_addr().await.to_string();
    let dead = format!("http://{dead_addr}");
    let good = FakeUpstream::ok().await;
    let cfg = config(&[dead.clone(), good.url()]);
    let gw = spawn(cfg.clone()).await;
    // Attempts that land on the dead instance are refused and go to the good one at once:
    // every client gets 200 while the dead one collects the failures that eject it.
    let mut ejected = false;
    for _ in 0..40 {
        let (status, _, body, _) = underlying(&gw).await;
        assert_eq!(status, 200, "{body}");
        if instance(&storage_view(&gw).await, &dead_addr)["state"] == "ejected" {
            ejected = true;
            break;
        }
    }
    assert!(
        ejected,
        "the dead instance was never ejected: {}",
        storage_view(&gw).await
    );
    let failures = instance(&storage_view(&gw).await, &dead_addr)["failures"].clone();

    // The listed order and the timeouts change, the addresses do not: still ejected, with
    // its history, and no request goes to it.
    let mut reordered = config(&[good.url(), dead.clone()]);
    reordered.upstreams.get_mut("storage").unwrap().timeout = Dur::from_secs(9);
    reload(&gw, reordered).await;
    let dead_now = instance(&storage_view(&gw).await, &dead_addr);
    assert_eq!(dead_now["state"], "ejected", "{dead_now}");
    assert_eq!(dead_now["failures"], failures, "{dead_now}");
    for _ in 0..10 {
        assert_eq!(underlying(&gw).await.0, 200);
    }
    let dead_now = instance(&storage_view(&gw).await, &dead_addr);
    assert_eq!(
        dead_now["failures"], failures,
        "attempts went to it: {dead_now}"
    );

    // A new address set: every instance starts afresh.
    let other = FakeUpstream::ok().await;
    reload(&gw, config(&[dead, good.url(), other.url()])).await;
    let fresh = instance(&storage_view(&gw).await, &dead_addr);
    assert_eq!(fresh["state"], "healthy", "{fresh}");
    assert_eq!(fresh["failures"], 0, "{fresh}");
}
