//! Token verification is a call to the auth upstream like any other: it goes through that
//! upstream's pipeline, so a hung auth service opens the auth breaker, and from then on a
//! request with a token nobody has seen is answered `503 auth_unavailable` at once instead
//! of waiting out the verify timeout. It reads exact counts from the process-wide metrics, so
//! the auth upstream is named `auth_hung` here, a name no other test of the binary uses.

use crate::support;

use std::time::{Duration, Instant};

use deltastream_gateway::config::{BreakerConfig, Dur};
use serde_json::Value;
use support::gateway::{client, config_with_upstreams, rename_upstream, scrape, spawn};
use support::{FakeUpstream, Step};

/// The upstream that verifies tokens in this test.
const VERIFIER: &str = "auth_hung";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_auth_service_opens_its_breaker_and_unseen_tokens_fail_fast() {
    let auth = FakeUpstream::builder().then(Step::Hang).start().await;
    let url = auth.url();
    let mut cfg = config_with_upstreams(move |_| url.clone());
    cfg.auth.verify_timeout = Dur::from_millis(200);
    rename_upstream(&mut cfg, "auth", VERIFIER);
    cfg.upstreams.get_mut(VERIFIER).unwrap().breaker = BreakerConfig {
        consecutive_failures: 5,
        open_base: Dur::from_secs(60),
        open_max: Dur::from_secs(60),
        ..BreakerConfig::default()
    };
    let gw = spawn(cfg).await;
    let c = client();
    let me = format!("{}/api/user/me", gw.url());
    // Five verify calls time out (each waits the verify timeout): the breaker opens.
    for i in 0..5 {
        let r = c
            .get(&me)
            .bearer_auth(format!("slow.token.{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["reason"], "auth_unavailable");
    }
    let admin = format!("http://{}", gw.admin_addr);
    let breakers: Value = c
        .get(format!("{admin}/admin/breakers"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let auth_breaker = breakers["breakers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["upstream"] == VERIFIER)
        .expect("verifier breaker listed")
        .clone();
    assert_eq!(auth_breaker["state"], "open", "{auth_breaker}");
    // Twenty unseen tokens: each refused fast by the open breaker, none reaches auth.
    for i in 0..20 {
        let started = Instant::now();
        let r = c
            .get(&me)
            .bearer_auth(format!("unseen.token.{i}"))
            .send()
            .await
            .unwrap();
        let took = started.elapsed();
        assert_eq!(r.status(), 503);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["reason"], "auth_unavailable");
        assert!(
            took < Duration::from_millis(100),
            "request {i} took {took:?} with the auth breaker open"
        );
    }
    assert_eq!(
        auth.hits(),
        5,
        "verify calls reached auth past the open breaker"
    );
    // The attempt metrics count the verify calls like any other call to auth.
    let metrics = scrape(gw.admin_addr).await;
    let count = |outcome: &str| -> u64 {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("gateway_upstream_attempts_total{")
                    && l.contains(&format!("upstream=\"{VERIFIER}\""))
                    && l.contains(&format!("outcome=\"{outcome}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(count("timeout"), 5, "{metrics}");
    assert_eq!(count("circuit_open"), 20, "{metrics}");
}
