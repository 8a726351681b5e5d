//! Per-attempt timeout: bounds one upstream attempt until its response headers arrive.
//!
//! It sits inside the circuit breaker so a timed-out attempt is recorded as a breaker failure,
//! and it never lets an attempt run past the call's overall deadline, so the deadline is enforced
//! by the innermost layer that can still tell the breaker about it.

use std::time::Duration;

use http::Extensions;
use reqwest::{Request, Response};
use reqwest_middleware::{Middleware, Next};
use tokio::time::Instant;

use super::pipeline::CallState;

/// One attempt got no response headers in time (its own timeout, or what was left of the deadline).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("upstream attempt timed out after {after:?}")]
pub struct AttemptTimedOut {
    pub after: Duration,
}

/// The middleware; the limit comes from the call (`CallOptions::attempt_timeout`, clamped to
/// the remaining deadline), not from this struct, because routes differ.
#[derive(Debug, Default)]
pub(crate) struct AttemptTimeout;

#[async_trait::async_trait]
impl Middleware for AttemptTimeout {
    async fn handle(
        &self,
        req: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        let limit = CallState::with(|call| call.attempt_limit(Instant::now()));
        // Outside a pipeline call (never in the gateway) there is no limit to apply.
        let Some(limit) = limit else {
            return next.run(req, extensions).await;
        };
        match tokio::time::timeout(limit, next.run(req, extensions)).await {
            Ok(result) => result,
            Err(_elapsed) => Err(reqwest_middleware::Error::middleware(AttemptTimedOut {
                after: limit,
            })),
        }
    }
}
