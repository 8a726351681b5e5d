//! Per-attempt timeout: bounds one upstream attempt until its response headers arrive.
//!
//! It runs inside the breaker's admission and the balancer's report (`upstream/attempt.rs`),
//! so a timed-out attempt is a failure for both, and it never lets an attempt run past the
//! call's overall deadline, so the deadline is enforced by the innermost step that can still
//! tell the breaker about it.

use std::future::Future;

use reqwest::Response;
use tokio::time::Instant;

pub use super::call::AttemptTimedOut;
use super::call::Call;

/// Runs `attempt` within the call's attempt timeout (`CallOptions::attempt_timeout`, clamped
/// to the remaining deadline): the limit comes from the call, because routes differ.
pub(crate) async fn within_attempt_limit(
    call: &Call,
    attempt: impl Future<Output = reqwest_middleware::Result<Response>>,
) -> reqwest_middleware::Result<Response> {
    let limit = call.attempt_limit(Instant::now());
    match tokio::time::timeout(limit, attempt).await {
        Ok(result) => result,
        Err(_elapsed) => Err(reqwest_middleware::Error::middleware(AttemptTimedOut {
            after: limit,
        })),
    }
}
