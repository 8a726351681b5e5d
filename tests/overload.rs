//! Overload through the whole gateway, in real time: a capacity-limited upstream (the
//! storage simulator with its `workers` fault: N requests served at once, the rest in a FIFO
//! backlog, as under gunicorn) offered several times what it can serve, open model (a fixed
//! arrival rate, as clients at market open do not wait for each other).
//!
//! Without the adaptive limit, every request joined the upstream's backlog or the bulkhead's
//! wait: successes took seconds, refusals came at the 10 s deadline as `upstream_timeout`,
//! and the breaker opened on a healthy service. Margins are for a busy 2-core machine: the
//! assertions separate "milliseconds" from "seconds", not 20 ms from 30 ms (the benchmark
//! `loadtest/overload` and the chaos experiments measure those).
//!
//! A binary of its own, not a module of an area binary (as `tests/self_protection.rs`): it
//! offers load in real time and asserts exact counts of process-wide metric series
//! (`storage`'s breaker transitions, a route's refusals) that other tests' gateways write.

mod support;

use std::time::{Duration, Instant};

use deltastream_gateway::config::Priority;
use deltastream_gateway::server::Running;
use reqwest::StatusCode;
use serde_json::Value;
use support::gateway::{client, scrape, spawn};
use support::load::{fetch, offer, Answer};
use support::sim::{capacity_limited_storage, SimServer};

/// Asserts that the `q` quantile of `samples` is under `bound`.
fn under(samples: &[Duration], q: f64, bound: Duration, what: &str) {
    let mut d = samples.to_vec();
    d.sort();
    let at = d
        .get(((d.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or_default();
    assert!(at < bound, "{what} {at:?} (bound {bound:?})");
}

/// A storage simulator of `workers` x 100 ms and a gateway with its default settings in front
/// of it, except the client limits (rate limits, cache, the per-client share of the slots:
/// every request here comes from one address); `route` adjusts each route.
async fn saturable(
    workers: u32,
    route: impl Fn(&mut deltastream_gateway::config::RouteConfig),
) -> (SimServer, Running) {
    let storage = capacity_limited_storage(workers, 100).await;
    let base = storage.url("");
    let mut cfg = support::gateway::config_with_upstreams(|_| base.clone());
    for r in &mut cfg.routes {
        r.rate_limit.clear();
        r.cache = None;
        route(r);
    }
    for u in cfg.upstreams.values_mut() {
        u.max_client_share = 1.0;
    }
    (storage, spawn(cfg).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_times_capacity_is_served_at_capacity_and_the_rest_refused_fast_and_honestly() {
    // 4 workers x 100 ms: 40 requests per second.
    let (_storage, gw) = saturable(4, |_| {}).await;
    let url = format!("{}/api/data/underlying/NIFTY", gw.url());

    // Half the capacity: nothing is shed (and the limit sees the no-load latency).
    let calm = offer(&url, 20, Duration::from_secs(2)).await;
    let refused: Vec<_> = calm.iter().filter(|a| a.status != 200).collect();
    assert!(refused.is_empty(), "shed below capacity: {refused:?}");

    // Four times the capacity, with /health, /ready and /metrics probed throughout.
    let probes = [
        format!("{}/health", gw.url()),
        format!("http://{}/ready", gw.admin_addr),
        format!("http://{}/metrics", gw.admin_addr),
    ];
    let health = tokio::spawn(async move {
        let c = client();
        let mut took = Vec::new();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(3) {
            for url in &probes {
                let started = Instant::now();
                let status = c.get(url).send().await.expect("probe").status();
                assert_eq!(status, 200, "{url}");
                // /metrics renders every series (slow in a debug build on a busy machine):
                // answered is what counts; /health and /ready are timed.
                if !url.ends_with("/metrics") {
                    took.push(started.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        took
    });
    let spike = offer(&url, 160, Duration::from_secs(3)).await;
    let health = health.await.expect("health probe");

    let (ok, shed): (Vec<_>, Vec<_>) = spike.iter().partition(|a| a.status == 200);
    // Every refusal is the honest one: 503 overloaded with Retry-After, never a timeout or
    // an open breaker.
    for a in &shed {
        assert_eq!(
            (a.status, a.reason.as_deref()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("overloaded")),
            "{a:?}"
        );
        assert_eq!(a.retry_after.as_deref(), Some("1"), "{a:?}");
    }
    assert!(
        shed.len() > spike.len() / 3,
        "4x capacity, yet only {} of {} shed",
        shed.len(),
        spike.len()
    );
    // Refused at once (once overloaded a call waits queue_target, 5 ms; the first of a burst
    // queue_interval, 100 ms), not at the 10 s deadline.
    let shed_took: Vec<_> = shed.iter().map(|a| a.took).collect();
    under(&shed_took, 0.5, Duration::from_millis(150), "refusals p50");
    under(&shed_took, 1.0, Duration::from_secs(1), "slowest refusal");
    // Successes were not queued for seconds (unbounded, the backlog grew by 120 a second:
    // the last ones waited 9 s).
    let ok_took: Vec<_> = ok.iter().map(|a| a.took).collect();
    under(&ok_took, 0.9, Duration::from_millis(800), "successes p90");
    // Goodput: the upstream was kept busy (120 requests in 3 s at most; half is the margin).
    assert!(ok.len() >= 60, "only {} served in 3 s", ok.len());
    // Health, readiness and metrics answered by the gateway itself, never behind proxied
    // traffic (a probe queued behind it would have waited with the data requests).
    under(&health, 0.5, Duration::from_millis(100), "probes p50");
    under(&health, 1.0, Duration::from_secs(1), "slowest probe");

    // Overload is no failure: the breaker closed, no instance ejected, the refusals counted
    // as shed and never retried (attempts are the successes, nothing else).
    let admin = client()
        .get(format!("http://{}/admin/upstreams", gw.admin_addr))
        .send()
        .await
        .expect("admin")
        .json::<Value>()
        .await
        .expect("json");
    let storage_state = admin["upstreams"]
        .as_array()
        .and_then(|l| l.iter().find(|u| u["upstream"] == "storage"))
        .expect("storage in /admin/upstreams")
        .clone();
    assert_eq!(storage_state["breaker"], "closed", "{storage_state}");
    let limit = storage_state["concurrency"]["limit"]
        .as_u64()
        .expect("the learnt limit is shown");
    assert!(
        (4..=32).contains(&limit),
        "4 workers, learnt limit {limit}: {storage_state}"
    );
    let metrics = scrape(gw.admin_addr).await;
    let series = |prefix: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(
        series("gateway_circuit_breaker_transitions_total{upstream=\"storage\",to=\"open\"}"),
        0.0
    );
    assert_eq!(
        series("gateway_upstream_ejections_total{upstream=\"storage\"}"),
        0.0
    );
    assert_eq!(
        series("gateway_shed_total{route=\"/api/data/underlying/{product}\""),
        shed.len() as f64,
        "{metrics}"
    );
    assert!(series("gateway_upstream_queue_wait_seconds_count{upstream=\"storage\"}") > 0.0);

    // Demand back under capacity: within a second, every request served again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = offer(&url, 20, Duration::from_secs(1)).await;
    let refused: Vec<_> = after.iter().filter(|a| a.status != 200).collect();
    assert!(
        refused.is_empty(),
        "still shedding after the spike: {refused:?}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_overload_sheddable_routes_go_first_and_critical_ones_last() {
    // 2 workers x 100 ms: 20 requests per second, offered 40 on each of two routes.
    let (_storage, gw) = saturable(2, |r| {
        // Not the route of the test above (the metrics are the process's, and the tests run
        // side by side).
        r.priority = match r.path.as_str() {
            "/api/data/products" => Priority::Critical,
            "/api/data/chain/{product}" => Priority::Sheddable,
            _ => r.priority,
        };
    })
    .await;
    let critical = format!("{}/api/data/products", gw.url());
    let sheddable = format!("{}/api/data/chain/NIFTY", gw.url());
    // The no-load latency first.
    for url in [&critical, &sheddable] {
        assert_eq!(fetch(&client(), url).await.status, 200);
    }
    let (critical, sheddable) = tokio::join!(
        offer(&critical, 40, Duration::from_secs(3)),
        offer(&sheddable, 40, Duration::from_secs(3)),
    );
    let served = |answers: &[Answer]| answers.iter().filter(|a| a.status == 200).count();
    let (c, s) = (served(&critical), served(&sheddable));
    assert!(
        c >= 2 * s.max(1),
        "critical served {c} of {}, sheddable {s} of {}",
        critical.len(),
        sheddable.len()
    );
    for a in critical
        .iter()
        .chain(&sheddable)
        .filter(|a| a.status != 200)
    {
        assert_eq!(a.reason.as_deref(), Some("overloaded"), "{a:?}");
    }
    // Sheddable calls were mostly refused without waiting at all.
    let metrics = scrape(gw.admin_addr).await;
    let shed = |labels: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("gateway_shed_total{") && l.contains(labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(
        shed("priority=\"sheddable\",cause=\"queue_full\"") > 0.0,
        "{metrics}"
    );
    assert_eq!(
        shed("priority=\"sheddable\"") + shed("priority=\"critical\""),
        (critical.len() - c + sheddable.len() - s) as f64
    );
    gw.shutdown().await;
}
