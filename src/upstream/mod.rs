//! Upstream calls: the response cache, the resilience pipeline and the pooled clients, i.e.
//! how one request reaches an instance of a backend service.
//!
//! One [`Pipeline`] per upstream, composed in [`Pipeline::new`] (read that function first);
//! every call to an upstream, token verification included, goes through it:
//!
//! ```text
//! client share + concurrency limit (a short wait, then `Overloaded`) + deadline + bulkhead
//!   (Pipeline::send_for)
//!   -> retry (503 + connect errors, budget, backoff with full jitter, Retry-After; a retry
//!      or hedge goes to another instance)
//!   -> the attempt, one layer (attempt.rs), in this order:
//!      record (one tracing event + metrics per attempt)
//!      -> service breaker (fast `CircuitOpen` while open; admits per attempt, records one
//!         outcome per client call when the retries are done)
//!      -> balancer (picks the instance: P2C by peak EWMA; feeds its load and health)
//!      -> per-attempt timeout
//!      -> the chosen instance's pooled reqwest client
//! ```
//!
//! - [`bulkhead`]: the slots of one upstream and each client's share of them.
//! - [`concurrency`]: the limit learnt from latency under the bulkhead, the short CoDel wait
//!   for it, priorities.
//! - [`call`]: the per-call types: options, results, outcomes, and the state the layers of
//!   one call share through the request's `Extensions`.
//! - [`pipeline`]: the composition and [`Pipeline::send`].
//! - `attempt`: one attempt below the retry layer, as one middleware layer.
//! - [`retry`]: the retry loop, its decisions, the retry budget and `Retry-After` handling.
//! - [`breaker`]: the service circuit breaker: state machine, per-call permit, health probe.
//! - [`balancer`]: the choice of instance per attempt (P2C / peak EWMA, round robin) and
//!   the dispatch to its client.
//! - [`instances`]: the upstream's instances: membership and passive health (ejection).
//! - [`discovery`]: resolving the configured names into instances, again every interval,
//!   and probing ejected instances.
//! - `trip`: the one trip rule (N failures in a row, or a failure rate over a window with a
//!   minimum volume) that the breaker and ejection share.
//! - `backoff`: the one doubling backoff (breaker open time, ejection time).
//! - [`timeout`]: the per-attempt timeout.
//! - [`client`]: the pooled reqwest client of one instance.
//! - [`cache`]: the RFC 9111 response cache in front of the pipeline (routes opt in).
//! - `window`: a bucketed sliding window on tokio's clock, shared by the budget and the trip
//!   rule.
//!
//! Every clock read here is `tokio::time::Instant`, so `#[tokio::test(start_paused = true)]` can
//! drive the breaker's open time, the failure-rate window, ejections and the retry budget.

mod attempt;
mod backoff;
pub mod balancer;
pub mod breaker;
pub mod bulkhead;
pub mod cache;
pub mod call;
pub mod client;
pub mod concurrency;
pub mod discovery;
pub mod instances;
pub mod pipeline;
pub mod retry;
pub mod timeout;
mod trip;
mod window;

pub use breaker::{
    http_health_check, Breaker, BreakerOpen, BreakerSnapshot, BreakerState, HealthCheck,
};
pub use call::{
    AttemptTimedOut, CallLimits, CallOptions, Caller, Delivered, TraceParent, UpstreamError,
    UpstreamRequest,
};
pub use discovery::{Resolve, SystemResolver};
pub use instances::{InstanceSnapshot, InstanceState};
pub use pipeline::Pipeline;
pub use retry::RetryBudget;

/// Registers the zero values of one upstream's metric families, so they show in the first
/// scrape (see `observability::catalog`).
pub fn register_zeroes(upstream: &str) {
    use metrics::{counter, histogram};
    let u = upstream.to_string();
    let _ = histogram!("gateway_upstream_attempt_duration_seconds", "upstream" => u.clone(), "outcome" => "ok");
    for outcome in call::Outcome::LABELS {
        counter!("gateway_upstream_attempts_total", "upstream" => u.clone(), "outcome" => outcome)
            .increment(0);
    }
    metrics::gauge!("gateway_upstream_in_flight", "upstream" => u.clone()).increment(0.0);
    metrics::gauge!("gateway_upstream_concurrency_limit", "upstream" => u.clone()).increment(0.0);
    let _ = histogram!("gateway_upstream_queue_wait_seconds", "upstream" => u.clone());
    for family in [
        "gateway_upstream_retry_budget_exhausted_total",
        "gateway_upstream_hedges_total",
        "gateway_upstream_ejections_total",
    ] {
        counter!(family, "upstream" => u.clone()).increment(0);
    }
    for to in BreakerState::ALL {
        counter!("gateway_circuit_breaker_transitions_total", "upstream" => u.clone(), "to" => to.as_str())
            .increment(0);
    }
    for result in ["healthy", "unhealthy"] {
        counter!("gateway_circuit_breaker_health_probes_total", "upstream" => u.clone(), "result" => result)
            .increment(0);
        counter!("gateway_upstream_instance_probes_total", "upstream" => u.clone(), "result" => result)
            .increment(0);
    }
}
