//! The pipeline's metrics, read back from the process's Prometheus recorder (the one the
//! gateway installs, shared with every other test of this binary: the upstream name
//! `metered` is this test's alone, so its series are exact).

use crate::support;

use std::time::Duration;

use deltastream_gateway::config::Dur;
use deltastream_gateway::config::{BreakerConfig, RetryConfig, UpstreamConfig};
use deltastream_gateway::upstream::{CallOptions, Pipeline};
use reqwest::{Method, Request};
use support::{FakeUpstream, Step};

#[tokio::test]
async fn attempts_outcomes_and_breaker_state_are_exported() {
    // Installed before the pipeline takes its metric handles (taken earlier, they record
    // nothing).
    let handle = deltastream_gateway::observability::metrics::handle();
    let up = FakeUpstream::builder()
        .statuses([503])
        .then(Step::status(500))
        .start()
        .await;
    let retry = RetryConfig {
        backoff_base: Dur::from_millis(1),
        backoff_cap: Dur::from_millis(1),
        ..RetryConfig::default()
    };
    let breaker = BreakerConfig {
        consecutive_failures: 2,
        open_base: Dur::from_secs(30),
        ..BreakerConfig::default()
    };
    let cfg = UpstreamConfig {
        url: up.url(),
        retry,
        breaker,
        ..UpstreamConfig::default()
    };
    let p = Pipeline::new("metered", &cfg).expect("valid upstream");
    let call = CallOptions {
        deadline: Duration::from_secs(5),
        attempt_timeout: Duration::from_secs(2),
        idempotent: true,
        retry_non_idempotent: false,
        max_retries: None,
        hedge_after: None,
    };
    let req = || Request::new(Method::GET, up.url().parse().expect("url"));
    // Call 1: 503, retried, 500 (one failed call, two 5xx attempts). Call 2: 500, the second
    // failed call opens the breaker. Call 3 is refused.
    let _ = p.send(req(), call).await;
    assert_eq!(p.breaker().snapshot().consecutive_failures, 1);
    let _ = p.send(req(), call).await;
    let _ = p.send(req(), call).await;

    let text = handle.render();
    for line in [
        r#"gateway_upstream_attempts_total{upstream="metered",outcome="status_5xx"} 3"#,
        r#"gateway_upstream_attempts_total{upstream="metered",outcome="circuit_open"} 1"#,
        r#"gateway_circuit_breaker_state{upstream="metered",state="open"} 1"#,
        r#"gateway_circuit_breaker_state{upstream="metered",state="closed"} 0"#,
        r#"gateway_circuit_breaker_transitions_total{upstream="metered",to="open"} 1"#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    assert!(text.contains("gateway_upstream_attempt_duration_seconds"));
}
