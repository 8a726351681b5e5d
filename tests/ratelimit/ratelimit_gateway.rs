//! Rate limiting seen from clients of real gateways: the 429 contract and headers, spoofed
//! forwarding headers, two replicas sharing one Redis, and a Redis outage mid-run.
//! The Redis tests start their own `redis-server` on a free port (they fail, not skip,
//! when it is not installed: `scripts/test` installs it).

use crate::support;

use std::time::Duration;

use deltastream_gateway::config::{Config, Dur};
use deltastream_gateway::config::{KeySource, PolicyConfig};
use serde_json::Value;
use support::gateway::{client, config_with_upstreams, scrape, spawn};
use support::redis::RedisServer;
use support::FakeUpstream;

const ROUTE: &str = "/api/data/underlying/NIFTY";

/// The embedded config with the data routes' `default` policy set to `limit` per minute.
fn cfg(upstream: &FakeUpstream, limit: u64, redis_url: Option<String>) -> Config {
    let url = upstream.url();
    let mut cfg = config_with_upstreams(move |_| url.clone());
    cfg.rate_limit.policies = vec![
        PolicyConfig {
            name: "default".into(),
            limit,
            window: Dur::from_secs(60),
            key: KeySource::Ip,
        },
        PolicyConfig {
            name: "auth".into(),
            limit: 10,
            window: Dur::from_secs(60),
            key: KeySource::Ip,
        },
    ];
    cfg.rate_limit.redis_url = redis_url;
    // Generous timeouts: a busy CI machine must not flip the limiter into fallback.
    cfg.rate_limit.command_timeout = Dur::from_secs(1);
    cfg.rate_limit.connect_timeout = Dur::from_secs(1);
    cfg
}

#[tokio::test]
async fn the_limit_holds_with_the_documented_429_and_headers() {
    let up = FakeUpstream::ok().await;
    let gw = spawn(cfg(&up, 3, None)).await;
    let c = client();
    for i in 0..3 {
        let r = c
            .get(format!("{}{ROUTE}", gw.url()))
            // Rotating spoofed forwarding headers from an untrusted peer change nothing.
            .header("x-forwarded-for", format!("10.0.0.{i}"))
            .header("forwarded", format!("for=10.1.0.{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["ratelimit-policy"], "\"default\";q=3;w=60");
        let rl = r.headers()["ratelimit"].to_str().unwrap();
        assert!(
            rl.starts_with(&format!("\"default\";r={};t=", 2 - i)),
            "{rl}"
        );
    }
    let r = c
        .get(format!("{}{ROUTE}", gw.url()))
        .header("x-forwarded-for", "10.9.9.9")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // The sliding estimate still counts the previous window's requests after a rollover, so
    // a retry may have to wait past the end of the current window (up to two windows).
    assert!((1..=120).contains(&retry_after), "{retry_after}");
    assert!(r.headers().contains_key("ratelimit"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "Rate limit exceeded");
    assert_eq!(body["reason"], "rate_limited");
    assert!(body["request_id"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(
        up.hits(),
        3,
        "a limited request must not reach the upstream"
    );
    // Unlimited built-ins are unaffected.
    assert_eq!(
        c.get(format!("{}/health", gw.url()))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn a_trusted_proxy_selects_the_client_key() {
    let up = FakeUpstream::ok().await;
    let mut config = cfg(&up, 2, None);
    config.trusted_proxies = vec!["127.0.0.1/32".into()];
    let gw = spawn(config).await;
    let c = client();
    let mut statuses = Vec::new();
    for client_ip in ["203.0.113.1", "203.0.113.1", "203.0.113.1", "203.0.113.2"] {
        let r = c
            .get(format!("{}{ROUTE}", gw.url()))
            .header("x-forwarded-for", client_ip)
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, vec![200, 200, 429, 200]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_sharing_redis_enforce_one_limit() {
    let redis = RedisServer::start();
    let up = FakeUpstream::ok().await;
    let a = spawn(cfg(&up, 10, Some(redis.url()))).await;
    let b = spawn(cfg(&up, 10, Some(redis.url()))).await;
    let c = client();
    let mut allowed = 0;
    for i in 0..30 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let r = c.get(format!("{}{ROUTE}", gw.url())).send().await.unwrap();
        match r.status().as_u16() {
            200 => allowed += 1,
            429 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    // Exact: one Lua script per decision, clocked by Redis TIME, no local state.
    assert_eq!(allowed, 10);
    assert_eq!(up.hits(), 10);
}

fn backend_gauge(metrics: &str, state: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| {
            l.starts_with("gateway_ratelimit_backend") && l.contains(&format!("state=\"{state}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dying_mid_run_never_yields_5xx_and_the_shared_limit_resumes() {
    let mut redis = RedisServer::start();
    let up = FakeUpstream::ok().await;
    let gw = spawn(cfg(&up, 5, Some(redis.url()))).await;
    let c = client();
    let url = format!("{}{ROUTE}", gw.url());
    for _ in 0..3 {
        assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    }
    redis.kill();
    // Fallback: in-process limiter with the same policy, never a 5xx.
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(c.get(&url).send().await.unwrap().status().as_u16());
    }
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&429),
        "fallback must still limit: {statuses:?}"
    );
    let metrics = scrape(gw.admin_addr).await;
    assert_eq!(backend_gauge(&metrics, "fallback"), Some(1.0), "{metrics}");

    // Redis back (empty): the shared limit resumes without restarting the gateway.
    redis.restart();
    let mut resumed = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if gw.state().limiter.backend_state() == deltastream_gateway::ratelimit::BackendState::Redis
        {
            resumed = true;
            break;
        }
    }
    assert!(resumed, "the limiter did not go back to Redis within 15 s");
    let fresh: Vec<u16> = futures_util::future::join_all((0..7).map(|_| {
        let c = c.clone();
        let url = url.clone();
        async move { c.get(url).send().await.unwrap().status().as_u16() }
    }))
    .await;
    assert_eq!(fresh.iter().filter(|s| **s == 200).count(), 5, "{fresh:?}");
}
