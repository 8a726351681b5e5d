//! A hedged request is visible: `X-Upstream-Attempts` counts every attempt sent, and the
//! attempt that lost the race is counted in `gateway_upstream_attempts_total` with its own
//! outcome, `abandoned` (issue 25: a hedged request said 1 attempt and the loser was missing
//! from the metrics). A test binary of its own: the metrics recorder is process-global and
//! the counts below are exact.

use crate::support;

use std::time::{Duration, Instant};

use deltastream_gateway::config::{Config, Dur};
use support::gateway::{client, config_with_instances, rename_upstream, scrape, spawn};
use support::{FakeUpstream, Step};

/// `storage` spread over `urls`, ejection off (the slow instance keeps losing races and
/// must stay in rotation for every request to hedge), the underlying route hedged after
/// 50 ms.
fn config(urls: &[String]) -> Config {
    let mut cfg = config_with_instances("storage", urls);
    let storage = cfg.upstreams.get_mut("storage").unwrap();
    storage.ejection.enabled = false;
    // Nor passed over after a lost race: a hedge goes to an instance not tried yet, and the
    // balancer would otherwise offer only the quick one, twice.
    storage.bias_duration = Dur::from_millis(0);
    for r in cfg.routes.iter_mut() {
        if r.path == "/api/data/underlying/{product}" {
            r.hedge_after = Some(Dur::from_millis(50));
        }
    }
    // The metrics registry is the test binary's: exact counts need a name no other test uses.
    rename_upstream(&mut cfg, "storage", "storage_hedged");
    cfg
}

/// The value of the one sample of `metrics` that starts with `series`.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedged_request_counts_both_attempts_and_the_loser_as_abandoned() {
    // Whichever instance the first attempt goes to is still busy after 50 ms, so every
    // request hedges; the 300 ms instance always wins (first attempt or hedge), the 3 s one
    // always loses and is dropped mid-request.
    let quick = FakeUpstream::builder()
        .then(Step::status(200).delayed(Duration::from_millis(300)))
        .start()
        .await;
    let slow = FakeUpstream::builder()
        .then(Step::status(200).delayed(Duration::from_secs(3)))
        .start()
        .await;
    let gw = spawn(config(&[quick.url(), slow.url()])).await;
    let c = client();
    const REQUESTS: usize = 6;
    for i in 0..REQUESTS {
        let hits_before = quick.hits() + slow.hits();
        let started = Instant::now();
        let r = c
            .get(format!("{}/api/data/underlying/NIFTY", gw.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i}");
        // Answered by the quick instance, never after waiting for the slow one.
        assert!(
            started.elapsed() < Duration::from_millis(2_500),
            "request {i} took {:?}",
            started.elapsed()
        );
        let attempts = r.headers()["x-upstream-attempts"]
            .to_str()
            .unwrap()
            .to_string();
        let sent = quick.hits() + slow.hits() - hits_before;
        assert_eq!(sent, 2, "request {i}: the instances saw {sent} requests");
        assert_eq!(attempts, "2", "request {i}: X-Upstream-Attempts");
    }
    assert_eq!(quick.hits(), REQUESTS);
    assert_eq!(slow.hits(), REQUESTS);

    let metrics = scrape(gw.admin_addr).await;
    let n = REQUESTS as f64;
    let attempts = |outcome: &str| {
        sample(
            &metrics,
            &format!(
                "gateway_upstream_attempts_total{{upstream=\"storage_hedged\",outcome=\"{outcome}\"}}"
            ),
        )
    };
    assert_eq!(attempts("ok"), n, "{metrics}");
    assert_eq!(attempts("abandoned"), n, "{metrics}");
    assert_eq!(attempts("timeout"), 0.0, "{metrics}");
    assert_eq!(
        sample(
            &metrics,
            "gateway_upstream_hedges_total{upstream=\"storage_hedged\"}"
        ),
        n
    );
}
