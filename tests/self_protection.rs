//! The gateway protects itself (issue 24 item 5, issue 25 item 4): past its cap of requests in
//! flight, or while its runtime stays late, new routed requests are refused at once with a
//! 503 `overloaded` (before their body is read or an upstream called), while `/health`, the
//! admin listener's `/ready` and `/metrics` keep answering; the opt-in readiness rule says
//! when the runtime is late.
//!
//! A binary of its own, not a module of an area binary: its tests saturate a runtime on
//! purpose and read `/health`'s request-duration series, which every gateway of a test
//! process writes; beside other tests they would slow those and read their numbers.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deltastream_gateway::config::{Config, Dur};
use serde_json::Value;
use support::gateway::{client, config_with_upstreams, scrape, spawn};
use support::{FakeUpstream, Step};

/// Every upstream pointed at `fake`, rate limits out of the way.
fn cfg_for(fake: &FakeUpstream) -> Config {
    let url = fake.url();
    let mut cfg = config_with_upstreams(move |_| url.clone());
    // The shared test setup turns it off; here it is the subject.
    cfg.server.saturation.enabled = true;
    for p in &mut cfg.rate_limit.policies {
        p.limit = 1_000_000;
    }
    cfg
}

/// Status, `reason` and `Retry-After` of a response.
async fn answer(resp: reqwest::Response) -> (u16, String, Option<String>) {
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap_or("").to_string());
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    (
        status,
        body["reason"].as_str().unwrap_or("").to_string(),
        retry,
    )
}

/// The sum of the samples of `name` whose label block contains every one of `labels`.
fn metric_sum(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The value of the `gateway_shed_total` series of `route` with cause `gateway_saturated`.
fn shed_count(metrics: &str, route: &str) -> f64 {
    let route = format!("route=\"{route}\"");
    metric_sum(
        metrics,
        "gateway_shed_total",
        &[
            &route,
            "cause=\"gateway_saturated\"",
            "priority=\"default\"",
        ],
    )
}

#[tokio::test]
async fn past_the_in_flight_cap_a_new_request_gets_a_fast_503_overloaded_and_probes_answer() {
    let upstream = FakeUpstream::builder()
        .then(Step::status(200).delayed(Duration::from_secs(3)))
        .start()
        .await;
    let mut cfg = cfg_for(&upstream);
    cfg.server.saturation.max_in_flight = 2;
    let gw = spawn(cfg).await;
    let c = client();
    let products = format!("{}/api/data/products", gw.url());
    let admin = format!("http://{}", gw.admin_addr);

    // Two slow requests take the two places (two products: a cached route's concurrent
    // misses for one key would share one upstream call).
    let held: Vec<_> = ["NIFTY", "BANKNIFTY"]
        .into_iter()
        .map(|p| {
            tokio::spawn(
                c.get(format!("{}/api/data/underlying/{p}", gw.url()))
                    .send(),
            )
        })
        .collect();
    let waited = Instant::now();
    while upstream.hits() < 2 {
        assert!(
            waited.elapsed() < Duration::from_secs(5),
            "the two never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The third is refused at once, honestly, and never reaches the upstream.
    let started = Instant::now();
    let (status, reason, retry) = answer(c.get(&products).send().await.unwrap()).await;
    let took = started.elapsed();
    assert_eq!((status, reason.as_str()), (503, "overloaded"));
    assert_eq!(retry.as_deref(), Some("1"));
    assert!(
        took < Duration::from_secs(1),
        "refused after {took:?}, not at once"
    );
    // A request with a body is refused before the body is read or forwarded.
    let login = c
        .post(format!("{}/api/auth/login", gw.url()))
        .json(&serde_json::json!({"email": "a@b.c", "password": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer(login).await.1, "overloaded");
    assert_eq!(upstream.hits(), 2, "a refused request reached the upstream");

    // What is not routed traffic answers: /health, and the admin listener.
    let health = c.get(format!("{}/health", gw.url())).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = c.get(format!("{admin}/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "the cap is not a readiness rule");
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["saturation"]["in_flight"], 2, "{ready}");
    assert_eq!(ready["saturation"]["max_in_flight"], 2, "{ready}");
    let metrics = scrape(gw.admin_addr).await;
    assert_eq!(shed_count(&metrics, "/api/data/products"), 1.0);
    assert_eq!(shed_count(&metrics, "/api/auth/login"), 1.0);
    assert!(
        metrics.contains("gateway_runtime_scheduling_delay_seconds_bucket"),
        "the scheduling delay is exported"
    );

    // Once the two are answered, requests are admitted again.
    for h in held {
        assert_eq!(h.await.unwrap().unwrap().status(), 200);
    }
    let (status, _, _) = answer(c.get(&products).send().await.unwrap()).await;
    assert_eq!(status, 200);
    gw.shutdown().await;
}

/// A gateway on a runtime of its own (one thread), whose handle lets a test keep it busy.
struct Isolated {
    url: String,
    admin: String,
    admin_addr: std::net::SocketAddr,
    runtime: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Isolated {
    fn start(cfg: Config) -> Isolated {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let gw = spawn(cfg).await;
                tx.send((gw.url(), gw.admin_addr, tokio::runtime::Handle::current()))
                    .expect("test waits");
                let _ = stopped.await;
                gw.shutdown().await;
            });
        });
        let (url, admin, runtime) = rx.recv().expect("gateway started");
        Isolated {
            url,
            admin: format!("http://{admin}"),
            admin_addr: admin,
            runtime,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Keeps the gateway's only thread busy in stretches of `stretch` (a task that blocks,
    /// then yields once) until `busy` is cleared.
    fn keep_busy(&self, busy: Arc<AtomicBool>, stretch: Duration) {
        self.runtime.spawn(async move {
            while busy.load(Ordering::Relaxed) {
                std::thread::sleep(stretch);
                tokio::task::yield_now().await;
            }
        });
    }
}

impl Drop for Isolated {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `gateway_request_duration_seconds` of `/health`: (sum, count).
async fn health_seconds(admin: std::net::SocketAddr) -> (f64, f64) {
    let text = scrape(admin).await;
    let of = |series: &str| metric_sum(&text, series, &["route=\"/health\""]);
    (
        of("gateway_request_duration_seconds_sum"),
        of("gateway_request_duration_seconds_count"),
    )
}

/// Polls `GET url` until it answers `want` (true) or `within` has passed (false).
async fn status_becomes(c: &reqwest::Client, url: &str, want: u16, within: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < within {
        if let Ok(r) = c.get(url).timeout(Duration::from_secs(2)).send().await {
            if r.status().as_u16() == want {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_kept_late_refuses_routed_requests_and_readiness_says_so_while_health_answers() {
    // Answers take 300 ms: admitted requests stay in flight while the burst arrives.
    let upstream = FakeUpstream::builder()
        .then(Step::status(200).delayed(Duration::from_millis(300)))
        .start()
        .await;
    let mut cfg = cfg_for(&upstream);
    // Tighter than the defaults (50 ms for 1 s), so that a runtime held 40 ms at a time is
    // saturated within a test's patience.
    cfg.server.saturation.lag_threshold = Dur::from_millis(10);
    cfg.server.saturation.lag_for = Dur::from_millis(100);
    cfg.server.saturation.ready_lag_threshold = Dur::from_millis(20);
    cfg.server.saturation.ready_lag_for = Dur::from_millis(300);
    let gw = Isolated::start(cfg);
    let c = client();
    let products = format!("{}/api/data/products", gw.url);
    let ready = format!("{}/ready", gw.admin);

    // Idle: served, ready.
    assert_eq!(answer(c.get(&products).send().await.unwrap()).await.0, 200);
    assert_eq!(c.get(&ready).send().await.unwrap().status(), 200);

    // The runtime's one thread held 40 ms at a time: every tick is late by tens of ms.
    let busy = Arc::new(AtomicBool::new(true));
    gw.keep_busy(busy.clone(), Duration::from_millis(40));
    assert!(
        status_becomes(&c, &ready, 503, Duration::from_secs(10)).await,
        "/ready never said the runtime was late"
    );
    let body: Value = c.get(&ready).send().await.unwrap().json().await.unwrap();
    assert_eq!(body["status"], "saturated", "{body}");
    assert_eq!(body["reason"], "saturated", "{body}");
    assert!(
        body["saturation"]["scheduling_delay_ms"]
            .as_f64()
            .unwrap_or(0.0)
            >= 10.0,
        "{body}"
    );

    // A burst of routed requests: a few are admitted (the limit falls to what is in flight,
    // down to a floor of 4), the rest refused with 503 overloaded and Retry-After.
    let burst: Vec<_> = (0..24)
        .map(|i| {
            let c = c.clone();
            // Distinct keys: a cache hit would be answered without staying in flight.
            let url = format!("{}/api/data/underlying/P{i}", gw.url);
            tokio::spawn(async move { answer(c.get(&url).send().await.unwrap()).await })
        })
        .collect();
    let mut refused = 0;
    for b in burst {
        let (status, reason, retry) = b.await.unwrap();
        match status {
            200 => {}
            503 => {
                assert_eq!(reason, "overloaded");
                assert!(retry.is_some(), "a refusal without Retry-After");
                refused += 1;
            }
            other => panic!("answered {other} {reason}"),
        }
    }
    assert!(
        refused >= 12,
        "only {refused} of 24 refused while saturated"
    );
    // /health is not routed traffic: answered, if slowly. Each on a new connection, whose
    // task waits behind the busy one after the accept: the gateway's own duration counts
    // that wait (accept to first byte), though its handler takes microseconds.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let before = health_seconds(gw.admin_addr).await;
    for _ in 0..5 {
        let health = fresh
            .get(format!("{}/health", gw.url))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), 200);
    }
    let after = health_seconds(gw.admin_addr).await;
    let mean = (after.0 - before.0) / (after.1 - before.1);
    eprintln!("/health mean duration while busy: {:.1} ms", mean * 1000.0);
    assert!(
        mean >= 0.005,
        "/health's recorded duration ({mean} s) leaves out the wait for the runtime"
    );

    // Let go: ready again, and routed requests are served.
    busy.store(false, Ordering::Relaxed);
    assert!(
        status_becomes(&c, &ready, 200, Duration::from_secs(10)).await,
        "/ready stayed 503 after the runtime caught up"
    );
    assert!(
        status_becomes(&c, &products, 200, Duration::from_secs(5)).await,
        "routed requests still refused after the runtime caught up"
    );
}
