//! Upstream calls: the response cache, the resilience pipeline and the pooled client, i.e.
//! how one proxied request reaches a backend service.
//!
//! One [`Pipeline`] per upstream, composed in [`Pipeline::new`] (read that function first):
//!
//! ```text
//! deadline -> retry (reqwest-retry + our strategy/policy: 503 + connect errors, budget,
//!             backoff with full jitter, Retry-After)
//!          -> attempt record (one tracing event + metrics per attempt)
//!          -> circuit breaker (fast `CircuitOpen` while open; admits per attempt, records
//!             one outcome per client call when the retries are done)
//!          -> per-attempt timeout
//!          -> the pooled reqwest client (built by the caller)
//! ```
//!
//! - [`pipeline`]: the composition, the per-call state the layers share, outcome classification.
//! - [`retry`]: `RetryConfig`, the retryable strategy and retry policy plugged into
//!   `reqwest-retry`, the retry budget and `Retry-After` handling.
//! - [`breaker`]: `BreakerConfig`, the per-upstream circuit breaker and its middleware.
//! - [`timeout`]: the per-attempt timeout middleware.
//! - [`client`]: the pooled reqwest client of one upstream.
//! - [`cache`]: the RFC 9111 response cache in front of the pipeline (routes opt in).
//! - `window`: a bucketed sliding window on tokio's clock, shared by the budget and the breaker.
//!
//! Every clock read here is `tokio::time::Instant`, so `#[tokio::test(start_paused = true)]` can
//! drive the breaker's open time, the failure-rate window and the retry budget.

pub mod breaker;
pub mod cache;
pub mod client;
pub mod pipeline;
pub mod retry;
pub mod timeout;
mod window;

pub use breaker::{
    http_health_check, Breaker, BreakerConfig, BreakerOpen, BreakerSnapshot, BreakerState,
    HealthCheck,
};
pub use pipeline::{CallOptions, Delivered, Pipeline, UpstreamError};
pub use retry::{RetryBudget, RetryConfig};
pub use timeout::AttemptTimedOut;
