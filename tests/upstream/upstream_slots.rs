//! The per-upstream connection bound (`max_connections`): concurrent calls beyond it wait for
//! a slot within their deadline, so the pooled client never opens more connections than that,
//! and a wait that outlives the deadline is a timeout that the breaker never sees.

use crate::support;

use std::time::Duration;

use deltastream_gateway::config::UpstreamConfig;
use deltastream_gateway::upstream::{BreakerState, CallOptions, Pipeline, UpstreamError};
use reqwest::{Method, Request};
use support::{FakeUpstream, Step};

fn opts(deadline: Duration) -> CallOptions {
    CallOptions {
        deadline,
        attempt_timeout: Duration::from_secs(2),
        idempotent: true,
        retry_non_idempotent: false,
        max_retries: None,
        hedge_after: None,
    }
}

/// A default pipeline to `url` with at most `slots` calls in flight.
fn bounded(name: &str, url: &str, slots: usize) -> std::sync::Arc<Pipeline> {
    let cfg = UpstreamConfig {
        url: url.to_string(),
        max_connections: slots,
        ..UpstreamConfig::default()
    };
    std::sync::Arc::new(Pipeline::new(name, &cfg).expect("valid upstream"))
}

fn get(base: &str) -> Request {
    Request::new(Method::GET, format!("{base}/x").parse().expect("url"))
}

#[tokio::test]
async fn calls_beyond_the_bound_wait_for_a_slot_instead_of_opening_connections() {
    let up = FakeUpstream::builder()
        .then(Step::status(200).delayed(Duration::from_millis(50)))
        .start()
        .await;
    let p = bounded("slots", &up.url(), 2);
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let (p, url) = (p.clone(), up.url());
            tokio::spawn(async move {
                let delivered = p.send(get(&url), opts(Duration::from_secs(5))).await?;
                let status = delivered.response.status();
                // Reading the body is what frees the connection (and, after it, the slot).
                let _ = delivered.response.bytes().await;
                Ok::<_, UpstreamError>(status)
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.expect("task").expect("delivered"), 200);
    }
    assert_eq!(up.hits(), 8);
    // Two slots, two connections, reused; one more is tolerated for a connection the pool
    // had not taken back yet when the next slot was handed out.
    assert!(
        up.connections() <= 3,
        "{} upstream connections for 2 slots",
        up.connections()
    );
}

#[tokio::test]
async fn waiting_for_a_slot_counts_against_the_deadline_not_the_breaker() {
    let up = FakeUpstream::builder()
        .then(Step::status(200).delayed(Duration::from_millis(400)))
        .start()
        .await;
    let p = bounded("one-slot", &up.url(), 1);
    let holder = {
        let (p, url) = (p.clone(), up.url());
        tokio::spawn(async move { p.send(get(&url), opts(Duration::from_secs(5))).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let waited = p
        .send(get(&up.url()), opts(Duration::from_millis(100)))
        .await;
    assert!(
        matches!(waited, Err(UpstreamError::Timeout { attempts: 0 })),
        "{waited:?}"
    );
    assert_eq!(
        holder
            .await
            .expect("task")
            .expect("delivered")
            .response
            .status(),
        200
    );
    assert_eq!(p.breaker().state(), BreakerState::Closed);
    assert_eq!(up.hits(), 1);
}
