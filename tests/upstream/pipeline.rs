//! The upstream pipeline against the in-process fake upstream: retries, budget, breaker and
//! deadline as a client of the gateway would see them.
//!
//! Only the deadline tests look at the wall clock, with a margin for a busy 2-core machine
//! (deadline + 250ms); speed itself is measured by benchmarks, not here.

use crate::support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use deltastream_gateway::config::{BreakerConfig, Dur, RetryConfig, UpstreamConfig};
use deltastream_gateway::upstream::{BreakerState, CallOptions, Pipeline, UpstreamError};
use reqwest::{Method, Request};
use support::{refused_addr, FakeUpstream, Step};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Default retry settings with a short backoff, so tests do not wait on it.
fn quick_retry() -> RetryConfig {
    RetryConfig {
        backoff_base: Dur::from_millis(1),
        backoff_cap: Dur::from_millis(5),
        ..RetryConfig::default()
    }
}

fn no_breaker() -> BreakerConfig {
    BreakerConfig {
        enabled: false,
        ..BreakerConfig::default()
    }
}

/// A breaker that, once open, stays open for the whole test.
fn long_breaker() -> BreakerConfig {
    BreakerConfig {
        open_base: Dur::from_secs(30),
        ..BreakerConfig::default()
    }
}

/// A breaker whose open time is short enough to wait out (160-200ms).
fn short_breaker() -> BreakerConfig {
    BreakerConfig {
        open_base: Dur::from_millis(200),
        open_max: Dur::from_millis(400),
        ..BreakerConfig::default()
    }
}

/// The pipeline of an upstream at `url` with these retry and breaker settings.
fn pipeline(url: &str, retry: &RetryConfig, breaker: &BreakerConfig) -> Pipeline {
    let cfg = UpstreamConfig {
        url: url.to_string(),
        retry: retry.clone(),
        breaker: breaker.clone(),
        ..UpstreamConfig::default()
    };
    Pipeline::new("test", &cfg).expect("valid upstream")
}

fn request(method: Method, base: &str) -> Request {
    let mut req = Request::new(method, format!("{base}/x").parse().expect("url"));
    if req.method() == Method::POST {
        *req.body_mut() = Some(reqwest::Body::from("{\"a\":1}"));
    }
    req
}

fn get(base: &str) -> Request {
    request(Method::GET, base)
}

fn post(base: &str) -> Request {
    request(Method::POST, base)
}

fn opts(idempotent: bool) -> CallOptions {
    CallOptions {
        deadline: Duration::from_secs(5),
        attempt_timeout: Duration::from_secs(2),
        idempotent,
        retry_non_idempotent: false,
        max_retries: None,
        hedge_after: None,
    }
}

#[tokio::test]
async fn retries_503_until_the_upstream_answers() {
    let up = FakeUpstream::builder().statuses([503, 503]).start().await;
    let p = pipeline(&up.url(), &quick_retry(), &BreakerConfig::default());
    let delivered = p.send(get(&up.url()), opts(true)).await.expect("delivered");
    assert_eq!(delivered.response.status(), 200);
    assert_eq!(delivered.attempts, 3);
    assert_eq!(up.hits(), 3);
    // The body is still there to be streamed.
    assert_eq!(
        delivered.response.text().await.expect("body"),
        "{\"status\":200}"
    );
}

#[tokio::test]
async fn a_route_can_lower_the_retry_count() {
    let up = FakeUpstream::builder()
        .then(Step::status(503))
        .start()
        .await;
    let p = pipeline(&up.url(), &quick_retry(), &BreakerConfig::default());
    let call = CallOptions {
        max_retries: Some(0),
        ..opts(true)
    };
    let delivered = p.send(get(&up.url()), call).await.expect("delivered");
    assert_eq!(
        (delivered.response.status().as_u16(), delivered.attempts),
        (503, 1)
    );
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn a_post_answered_503_reaches_the_upstream_once() {
    let up = FakeUpstream::builder()
        .then(Step::status(503))
        .start()
        .await;
    let p = pipeline(&up.url(), &quick_retry(), &BreakerConfig::default());
    let delivered = p
        .send(post(&up.url()), opts(false))
        .await
        .expect("delivered");
    assert_eq!(delivered.response.status(), 503);
    assert_eq!(delivered.attempts, 1);
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn a_post_opted_in_is_retried_like_a_get() {
    let up = FakeUpstream::builder().statuses([503]).start().await;
    let p = pipeline(&up.url(), &quick_retry(), &BreakerConfig::default());
    let call = CallOptions {
        retry_non_idempotent: true,
        ..opts(false)
    };
    let delivered = p.send(post(&up.url()), call).await.expect("delivered");
    assert_eq!(
        (delivered.response.status().as_u16(), delivered.attempts),
        (200, 2)
    );
}

#[tokio::test]
async fn a_post_to_a_refused_port_is_retried_because_it_never_arrived() {
    let addr = refused_addr().await;
    let p = pipeline(
        &format!("http://{addr}"),
        &quick_retry(),
        &BreakerConfig::default(),
    );
    match p.send(post(&format!("http://{addr}")), opts(false)).await {
        Err(UpstreamError::Unavailable { attempts, detail }) => {
            assert_eq!(attempts, 3);
            assert!(!detail.is_empty());
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn a_reset_is_retried_for_a_get_but_not_for_a_post() {
    let up = FakeUpstream::builder().steps([Step::Reset]).start().await;
    let p = pipeline(&up.url(), &quick_retry(), &BreakerConfig::default());
    let delivered = p.send(get(&up.url()), opts(true)).await.expect("delivered");
    assert_eq!(
        (delivered.response.status().as_u16(), delivered.attempts),
        (200, 2)
    );

    up.set_steps([Step::Reset]);
    let before = up.hits();
    match p.send(post(&up.url()), opts(false)).await {
        Err(UpstreamError::Unavailable { attempts: 1, .. }) => {}
        other => panic!("expected Unavailable after 1 attempt, got {other:?}"),
    }
    assert_eq!(up.hits(), before + 1);
}

#[tokio::test]
async fn retry_after_is_honoured_when_short_and_returned_at_once_when_long() {
    let up = FakeUpstream::builder()
        .steps([Step::status(503).with_header("retry-after", "0")])
        .start()
        .await;
    let p = pipeline(&up.url(), &quick_retry(), &BreakerConfig::default());
    let delivered = p.send(get(&up.url()), opts(true)).await.expect("delivered");
    assert_eq!(
        (delivered.response.status().as_u16(), delivered.attempts),
        (200, 2)
    );

    // 30s is over the 2s cap (and past the 5s deadline): the client gets the 503 now.
    up.set_steps([Step::status(503).with_header("retry-after", "30")]);
    let before = up.hits();
    let delivered = p.send(get(&up.url()), opts(true)).await.expect("delivered");
    assert_eq!(
        (delivered.response.status().as_u16(), delivered.attempts),
        (503, 1)
    );
    assert_eq!(
        delivered.response.headers()["retry-after"],
        "30",
        "passed through"
    );
    assert_eq!(up.hits(), before + 1);
}

#[tokio::test]
async fn the_budget_keeps_an_outage_from_multiplying_the_load() {
    let up = FakeUpstream::builder()
        .then(Step::status(503))
        .start()
        .await;
    let retry = quick_retry();
    // The breaker would stop the calls first; this test is about the budget alone.
    let p = pipeline(&up.url(), &retry, &no_breaker());
    let requests = 100;
    for _ in 0..requests {
        let delivered = p.send(get(&up.url()), opts(true)).await.expect("delivered");
        assert_eq!(delivered.response.status(), 503);
    }
    // Without a budget: 3 attempts each (300). With it: at most 20% more, plus the floor of
    // 3/s over the 10s window.
    let floor = retry.budget_min_per_sec as usize * retry.budget_window.0.as_secs() as usize;
    let limit = requests * 12 / 10 + floor;
    let hits = up.hits();
    assert!(
        hits <= limit,
        "{hits} upstream requests for {requests} calls (limit {limit})"
    );
    assert!(hits > requests, "the budget allowed no retry at all");
}

async fn open_the_breaker_with(failure: Step) {
    let up = FakeUpstream::builder().then(failure).start().await;
    let p = pipeline(&up.url(), &quick_retry(), &long_breaker());
    let mut calls = 0;
    while p.breaker().state() != BreakerState::Open {
        calls += 1;
        assert!(calls <= 5, "breaker still closed after {calls} calls");
        let _ = p.send(get(&up.url()), opts(true)).await;
    }
    // The breaker counts calls: it opens on the 5th failed call, whatever each retried.
    assert_eq!(calls, 5);
    assert!(
        up.hits() <= 5 * 3,
        "{} failed attempts before opening",
        up.hits()
    );

    let hits = up.hits();
    for _ in 0..100 {
        match p.send(get(&up.url()), opts(true)).await {
            Err(UpstreamError::CircuitOpen { retry_after }) => {
                assert!(retry_after > Duration::ZERO)
            }
            other => panic!("expected CircuitOpen, got {other:?}"),
        }
    }
    assert_eq!(up.hits(), hits, "an open breaker let a call through");
    let snapshot = p.breaker().snapshot();
    assert_eq!(snapshot.opened_count, 1);
    assert!(snapshot.seconds_until_probe.is_some_and(|s| s > 0.0));
}

#[tokio::test]
async fn the_breaker_opens_on_500s_and_then_makes_no_upstream_call() {
    open_the_breaker_with(Step::status(500)).await;
}

#[tokio::test]
async fn the_breaker_opens_on_resets_and_then_makes_no_upstream_call() {
    open_the_breaker_with(Step::Reset).await;
}

#[tokio::test]
async fn a_503_brownout_behind_retries_does_not_open_the_breaker() {
    // Two of every three attempts fail, more than the breaker's 50% failure rate and its
    // minimum volume of 20 if attempts were counted; every call is saved by a retry.
    let script = std::iter::repeat_n([503, 503, 200], 25).flatten();
    let up = FakeUpstream::builder().statuses(script).start().await;
    // Two retries per call is over the default budget (20% + 3/s); this test is about the breaker.
    let retry = RetryConfig {
        budget_ratio: 1.0,
        ..quick_retry()
    };
    let p = pipeline(&up.url(), &retry, &long_breaker());
    for _ in 0..25 {
        let delivered = p.send(get(&up.url()), opts(true)).await.expect("delivered");
        assert_eq!(
            (delivered.response.status().as_u16(), delivered.attempts),
            (200, 3)
        );
    }
    assert_eq!(up.hits(), 75);
    let snapshot = p.breaker().snapshot();
    assert_eq!(snapshot.state, BreakerState::Closed);
    assert_eq!(snapshot.opened_count, 0);
    assert_eq!((snapshot.window_calls, snapshot.window_failures), (25, 0));
}

#[tokio::test]
async fn a_hard_down_upstream_opens_the_breaker_after_five_failed_calls() {
    let addr = refused_addr().await;
    let url = format!("http://{addr}");
    let p = pipeline(&format!("http://{addr}"), &quick_retry(), &long_breaker());
    for n in 1..=5 {
        match p.send(get(&url), opts(true)).await {
            Err(UpstreamError::Unavailable { attempts: 3, .. }) => {}
            other => panic!("call {n}: expected Unavailable after 3 attempts, got {other:?}"),
        }
        let expected = if n < 5 {
            BreakerState::Closed
        } else {
            BreakerState::Open
        };
        assert_eq!(p.breaker().state(), expected, "after {n} failed calls");
    }
    assert_eq!(p.breaker().snapshot().consecutive_failures, 5);
    match p.send(get(&url), opts(true)).await {
        Err(UpstreamError::CircuitOpen { retry_after }) => assert!(retry_after > Duration::ZERO),
        other => panic!("expected CircuitOpen, got {other:?}"),
    }
}

#[tokio::test]
async fn a_timed_out_attempt_counts_as_a_breaker_failure() {
    let up = FakeUpstream::builder().then(Step::Hang).start().await;
    let p = pipeline(&up.url(), &quick_retry(), &long_breaker());
    let call = CallOptions {
        attempt_timeout: ms(30),
        ..opts(true)
    };
    for _ in 0..5 {
        match p.send(get(&up.url()), call).await {
            // Timeouts are not retried: a slow upstream must not get more load.
            Err(UpstreamError::Timeout { attempts: 1 }) => {}
            other => panic!("expected Timeout after 1 attempt, got {other:?}"),
        }
    }
    assert_eq!(p.breaker().state(), BreakerState::Open);
}

#[tokio::test]
async fn client_errors_do_not_open_the_breaker() {
    let up = FakeUpstream::builder()
        .then(Step::status(404))
        .start()
        .await;
    let p = pipeline(&up.url(), &quick_retry(), &long_breaker());
    for _ in 0..30 {
        let delivered = p.send(get(&up.url()), opts(true)).await.expect("delivered");
        assert_eq!(
            (delivered.response.status().as_u16(), delivered.attempts),
            (404, 1)
        );
    }
    assert_eq!(p.breaker().state(), BreakerState::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_sends_exactly_one_probe_for_fifty_concurrent_calls() {
    let up = FakeUpstream::builder()
        .statuses([500; 5])
        // The probe is slow, so every other call arrives while it is in flight.
        .then(Step::status(200).delayed(ms(300)))
        .start()
        .await;
    let p = Arc::new(pipeline(&up.url(), &quick_retry(), &short_breaker()));
    for _ in 0..5 {
        let _ = p.send(get(&up.url()), opts(true)).await;
    }
    assert_eq!(p.breaker().state(), BreakerState::Open);
    tokio::time::sleep(ms(250)).await;

    let calls: Vec<_> = (0..50)
        .map(|_| {
            let (p, url) = (p.clone(), up.url());
            tokio::spawn(async move { p.send(get(&url), opts(true)).await })
        })
        .collect();
    let (mut delivered, mut refused) = (0, 0);
    for call in calls {
        match call.await.expect("task") {
            Ok(d) => {
                assert_eq!(d.response.status(), 200);
                delivered += 1;
            }
            Err(UpstreamError::CircuitOpen { retry_after }) => {
                assert!(retry_after > Duration::ZERO);
                refused += 1;
            }
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((delivered, refused), (1, 49));
    assert_eq!(up.hits(), 6, "exactly one probe reached the upstream");
    assert_eq!(p.breaker().state(), BreakerState::Closed);
}

#[tokio::test]
async fn recovery_closes_the_breaker_after_a_failed_probe_reopens_it() {
    let up = FakeUpstream::builder()
        .statuses([500; 6]) // 5 to open, 1 failed probe
        .start()
        .await;
    let p = pipeline(&up.url(), &quick_retry(), &short_breaker());
    for _ in 0..5 {
        let _ = p.send(get(&up.url()), opts(true)).await;
    }
    assert_eq!(p.breaker().state(), BreakerState::Open);

    tokio::time::sleep(ms(250)).await;
    let probe = p
        .send(get(&up.url()), opts(true))
        .await
        .expect("probe answered");
    assert_eq!(probe.response.status(), 500);
    assert_eq!(
        p.breaker().state(),
        BreakerState::Open,
        "failed probe re-opens"
    );
    assert_eq!(p.breaker().snapshot().opened_count, 2);

    // The second open time is longer (320-400ms).
    tokio::time::sleep(ms(450)).await;
    let probe = p
        .send(get(&up.url()), opts(true))
        .await
        .expect("probe answered");
    assert_eq!(probe.response.status(), 200);
    assert_eq!(p.breaker().state(), BreakerState::Closed);
    let hits = up.hits();
    for _ in 0..3 {
        p.send(get(&up.url()), opts(true)).await.expect("delivered");
    }
    assert_eq!(up.hits(), hits + 3);
}

#[tokio::test]
async fn the_health_probe_reopens_the_route_long_before_the_open_time() {
    let up = FakeUpstream::builder().statuses([500; 5]).start().await;
    let breaker = BreakerConfig {
        probe_path: Some("/health".into()),
        probe_interval: Dur::from_millis(50),
        ..long_breaker()
    };
    let p = pipeline(&up.url(), &quick_retry(), &breaker);
    for _ in 0..5 {
        let _ = p.send(get(&up.url()), opts(true)).await;
    }
    assert_eq!(p.breaker().state(), BreakerState::Open);
    // Open for 24-30 s, but the upstream answers its health check: half-open within an interval
    // or two (generous margin for a busy machine).
    let started = Instant::now();
    while p.breaker().state() == BreakerState::Open {
        assert!(started.elapsed() < ms(2000), "still open");
        tokio::time::sleep(ms(10)).await;
    }
    assert_eq!(p.breaker().state(), BreakerState::HalfOpen);
    assert!(up.requests().iter().any(|r| r.path_and_query == "/health"));
    let delivered = p
        .send(get(&up.url()), opts(true))
        .await
        .expect("probe call");
    assert_eq!(delivered.response.status(), 200);
    assert_eq!(p.breaker().state(), BreakerState::Closed);
}

#[tokio::test]
async fn the_deadline_holds_when_every_attempt_hangs() {
    let up = FakeUpstream::builder().then(Step::Hang).start().await;
    let p = pipeline(&up.url(), &quick_retry(), &BreakerConfig::default());
    let deadline = ms(300);
    let call = CallOptions {
        deadline,
        // Longer than the deadline: the deadline must cut the attempt.
        attempt_timeout: Duration::from_secs(10),
        ..opts(true)
    };
    let started = Instant::now();
    let result = p.send(get(&up.url()), call).await;
    let elapsed = started.elapsed();
    assert!(
        matches!(result, Err(UpstreamError::Timeout { attempts: 1 })),
        "{result:?}"
    );
    // Margin for a busy shared 2-core machine.
    assert!(elapsed < deadline + ms(250), "took {elapsed:?}");
    assert!(elapsed >= deadline - ms(5), "gave up early: {elapsed:?}");
}

#[tokio::test]
async fn retries_and_backoff_never_run_past_the_deadline() {
    // Every attempt is a slow 503: three of them do not fit in the deadline.
    let up = FakeUpstream::builder()
        .then(Step::status(503).delayed(ms(120)))
        .start()
        .await;
    let retry = RetryConfig {
        backoff_base: Dur::from_millis(100),
        backoff_cap: Dur::from_millis(100),
        ..RetryConfig::default()
    };
    let p = pipeline(&up.url(), &retry, &no_breaker());
    let deadline = ms(300);
    let call = CallOptions {
        deadline,
        ..opts(true)
    };
    let started = Instant::now();
    let result = p.send(get(&up.url()), call).await;
    let elapsed = started.elapsed();
    match result {
        Ok(d) => assert_eq!(d.response.status(), 503),
        Err(UpstreamError::Timeout { .. }) => {}
        Err(other) => panic!("unexpected {other:?}"),
    }
    assert!(elapsed < deadline + ms(250), "took {elapsed:?}");
    assert!(up.hits() <= 3);
}
