//! The resilience pipeline seen from a client of the gateway: retries and
//! `X-Upstream-Attempts`, non-idempotent requests, the breaker's fast 503s and admin view,
//! single-flight caching, stale-if-error, `no-store`, and the deadline.

use crate::support;

use std::time::{Duration, Instant};

use deltastream_gateway::config::{Config, Dur, RouteCachePolicy};
use serde_json::Value;
use support::gateway::{client, config_with_upstreams, scrape, spawn};
use support::{FakeUpstream, Step};

/// Every upstream pointed at `storage`; rate limits raised out of the way (these tests
/// drive more than the default 100 requests per minute from one address).
fn cfg_with_storage(storage: &FakeUpstream) -> Config {
    let url = storage.url();
    let mut cfg = config_with_upstreams(move |_| url.clone());
    for p in &mut cfg.rate_limit.policies {
        p.limit = 1_000_000;
    }
    cfg
}

/// One upstream's entry of `GET /admin/breakers`.
async fn breaker_view(c: &reqwest::Client, admin: &str, upstream: &str) -> Value {
    let view: Value = c
        .get(format!("{admin}/admin/breakers"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    view["breakers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["upstream"] == upstream)
        .unwrap_or_else(|| panic!("no breaker for {upstream}: {view}"))
        .clone()
}

fn route_mut<'a>(
    cfg: &'a mut Config,
    path: &str,
) -> &'a mut deltastream_gateway::config::RouteConfig {
    cfg.routes
        .iter_mut()
        .find(|r| r.path == path)
        .expect("route exists")
}

#[tokio::test]
async fn a_503_storm_is_retried_and_the_attempts_are_reported() {
    let storage = FakeUpstream::builder()
        .statuses([503, 503, 200])
        .start()
        .await;
    let gw = spawn(cfg_with_storage(&storage)).await;
    let r = client()
        .get(format!("{}/api/data/underlying/NIFTY", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-upstream-attempts"], "3");
    assert_eq!(storage.hits(), 3);

    // Past the retry limit the upstream's own 503 is passed through.
    storage.set_steps([Step::status(503), Step::status(503), Step::status(503)]);
    let r = client()
        .get(format!("{}/api/data/underlying/NIFTY", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-upstream-attempts"], "3");
    assert_eq!(r.text().await.unwrap(), r#"{"status":503}"#);
}

#[tokio::test]
async fn a_post_answered_503_reaches_the_upstream_exactly_once() {
    let auth = FakeUpstream::builder().statuses([503, 200]).start().await;
    let gw = spawn(cfg_with_storage(&auth)).await;
    let r = client()
        .post(format!("{}/api/auth/login", gw.url()))
        .body(r#"{"email":"a@b.c","password":"x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        auth.hits(),
        1,
        "a POST that reached the upstream must not be retried"
    );
}

#[tokio::test]
async fn a_failing_upstream_opens_the_breaker_and_then_costs_nothing() {
    let storage = FakeUpstream::builder()
        .then(Step::status(500))
        .start()
        .await;
    let gw = spawn(cfg_with_storage(&storage)).await;
    let c = client();
    let url = format!("{}/api/data/underlying/NIFTY", gw.url());
    let mut first_open = None;
    for i in 0..10 {
        let r = c.get(&url).send().await.unwrap();
        if r.status() == 503 {
            first_open = Some(i);
            break;
        }
        assert_eq!(
            r.status(),
            500,
            "the upstream's 500 passes through while closed"
        );
    }
    let opened_after = first_open.expect("breaker never opened");
    assert!(opened_after <= 5, "opened after {opened_after} failures");
    let hits = storage.hits();
    assert!(hits <= 5, "{hits} upstream attempts before opening");

    for _ in 0..100 {
        let r = c.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 503);
        let retry_after: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&retry_after));
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["reason"], "circuit_open");
        assert_eq!(body["error"], "Storage service unavailable");
        assert_eq!(body["upstream"], "storage");
    }
    assert_eq!(
        storage.hits(),
        hits,
        "an open breaker must not call the upstream"
    );

    // The admin view shows it, and an operator reset closes it.
    let admin = format!("http://{}", gw.admin_addr);
    let storage_view = breaker_view(&c, &admin, "storage").await;
    assert_eq!(storage_view["state"], "open");
    assert!(storage_view["seconds_until_probe"].as_f64().unwrap() > 0.0);
    let metrics = scrape(gw.admin_addr).await;
    assert!(
        metrics.contains("gateway_circuit_breaker_state"),
        "{metrics}"
    );

    storage.set_steps([Step::status(200)]);
    let r = c
        .post(format!("{admin}/admin/breakers/storage/reset"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .post(format!("{admin}/admin/breakers/nope/reset"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn a_503_brownout_saved_by_retries_leaves_the_breaker_closed() {
    // Two of three attempts fail: per attempt that is a 67% failure rate over 63 attempts,
    // but every client call succeeds, and the breaker counts calls.
    let script = std::iter::repeat_n([503, 503, 200], 21).flatten();
    let storage = FakeUpstream::builder().statuses(script).start().await;
    let mut cfg = cfg_with_storage(&storage);
    // Two retries per call is over the default budget (20% + 3/s); this test is about the breaker.
    for upstream in cfg.upstreams.values_mut() {
        upstream.retry.budget_ratio = 1.0;
    }
    let gw = spawn(cfg).await;
    let c = client();
    for _ in 0..21 {
        let r = c
            .get(format!("{}/api/data/underlying/NIFTY", gw.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-upstream-attempts"], "3");
    }
    let admin = format!("http://{}", gw.admin_addr);
    let storage_view = breaker_view(&c, &admin, "storage").await;
    assert_eq!(storage_view["state"], "closed");
    assert_eq!(storage_view["opened_count"], 0);
    assert_eq!(storage_view["window_calls"], 21);
    assert_eq!(storage_view["window_failures"], 0);
    assert_eq!(storage_view["consecutive_failures"], 0);
}

#[tokio::test]
async fn with_a_health_probe_the_route_reopens_as_soon_as_the_upstream_is_back() {
    let storage = FakeUpstream::builder().statuses([500; 5]).start().await;
    let mut cfg = cfg_with_storage(&storage);
    let breaker = &mut cfg.upstreams.get_mut("storage").expect("storage").breaker;
    breaker.open_base = Dur::from_secs(30);
    breaker.open_max = Dur::from_secs(30);
    breaker.probe_path = Some("/health".into());
    breaker.probe_interval = Dur::from_millis(50);
    let gw = spawn(cfg).await;
    let c = client();
    let url = format!("{}/api/data/underlying/NIFTY", gw.url());
    for _ in 0..5 {
        assert_eq!(c.get(&url).send().await.unwrap().status(), 500);
    }
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 503, "open");
    // Back within an interval or two of the upstream's return, not after 24-30 s.
    let started = Instant::now();
    loop {
        let r = c.get(&url).send().await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(2), "still refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(storage
        .requests()
        .iter()
        .any(|r| r.path_and_query == "/health"));
}

#[tokio::test]
async fn concurrent_misses_for_one_key_make_one_upstream_call() {
    let storage = FakeUpstream::builder()
        .then(
            Step::body(200, "application/json", r#"{"products":[]}"#)
                .delayed(Duration::from_millis(200)),
        )
        .start()
        .await;
    let gw = spawn(cfg_with_storage(&storage)).await;
    let c = client();
    let url = format!("{}/api/data/products", gw.url());
    let calls = (0..100).map(|_| {
        let c = c.clone();
        let url = url.clone();
        async move {
            let r = c.get(url).send().await.unwrap();
            let cache = r.headers()["x-cache"].to_str().unwrap().to_string();
            (r.status().as_u16(), cache, r.text().await.unwrap())
        }
    });
    let results = futures_util::future::join_all(calls).await;
    assert_eq!(
        storage.hits(),
        1,
        "single flight: one upstream call for 100 concurrent misses"
    );
    assert!(results
        .iter()
        .all(|(s, _, b)| *s == 200 && b == r#"{"products":[]}"#));
    assert_eq!(results.iter().filter(|(_, c, _)| c == "MISS").count(), 1);
    // A later request is a HIT with an Age.
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.headers()["x-cache"], "HIT");
    assert!(r.headers().contains_key("age"));
    assert_eq!(storage.hits(), 1);
    // Requests with credentials bypass the shared cache.
    let r = c
        .get(&url)
        .header("authorization", "Bearer x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-cache"], "BYPASS");
    assert_eq!(storage.hits(), 2);
    // An operator purge empties it.
    let admin = format!("http://{}", gw.admin_addr);
    let r = c
        .delete(format!("{admin}/admin/cache?route=/api/data/products"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.headers()["x-cache"], "MISS");
    assert_eq!(storage.hits(), 3);
}

#[tokio::test]
async fn an_upstream_outage_is_served_stale_from_the_cache() {
    let storage = FakeUpstream::builder()
        .steps([Step::body(200, "application/json", r#"{"v":1}"#)])
        .then(Step::Reset)
        .start()
        .await;
    let mut cfg = cfg_with_storage(&storage);
    route_mut(&mut cfg, "/api/data/products").cache =
        Some(RouteCachePolicy::new(Duration::from_millis(300)));
    let gw = spawn(cfg).await;
    let c = client();
    let url = format!("{}/api/data/products", gw.url());
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.headers()["x-cache"], "MISS");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "an expired entry must be served while the upstream is down"
    );
    assert_eq!(r.headers()["x-cache"], "STALE");
    assert_eq!(r.text().await.unwrap(), r#"{"v":1}"#);
    // A route without a cache entry still gets the honest 503.
    let r = c
        .get(format!("{}/api/data/underlying/NIFTY", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
}

#[tokio::test]
async fn no_store_is_honoured() {
    let storage = FakeUpstream::builder()
        .then(Step::status(200).with_header("cache-control", "no-store"))
        .start()
        .await;
    let gw = spawn(cfg_with_storage(&storage)).await;
    let c = client();
    for _ in 0..3 {
        let r = c
            .get(format!("{}/api/data/products", gw.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["x-cache"], "MISS");
    }
    assert_eq!(storage.hits(), 3);
}

#[tokio::test]
async fn the_deadline_holds_when_every_attempt_hangs() {
    let storage = FakeUpstream::builder().then(Step::Hang).start().await;
    let mut cfg = cfg_with_storage(&storage);
    let deadline = Duration::from_millis(300);
    route_mut(&mut cfg, "/api/data/underlying/{product}").timeout = Some(Dur(deadline));
    let gw = spawn(cfg).await;
    let started = Instant::now();
    let r = client()
        .get(format!("{}/api/data/underlying/NIFTY", gw.url()))
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["reason"], "upstream_timeout");
    assert!(took >= deadline, "answered before the deadline: {took:?}");
    // The design figure is deadline + 100 ms; the bound here leaves room for a busy 2-core
    // CI machine (measured on an idle one: about deadline + 5 ms).
    assert!(
        took < deadline + Duration::from_millis(300),
        "took {took:?}"
    );
}
