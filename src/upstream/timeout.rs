//! Per-attempt timeout: bounds one upstream attempt until its response headers arrive.
//!
//! It sits inside the circuit breaker so a timed-out attempt is recorded as a breaker failure,
//! and it never lets an attempt run past the call's overall deadline, so the deadline is enforced
//! by the innermost layer that can still tell the breaker about it.

use http::Extensions;
use reqwest::{Request, Response};
use reqwest_middleware::{Middleware, Next};
use tokio::time::Instant;

pub use super::call::AttemptTimedOut;
use super::call::Call;

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
        let limit = Call::of(extensions)?.attempt_limit(Instant::now());
        match tokio::time::timeout(limit, next.run(req, extensions)).await {
            Ok(result) => result,
            Err(_elapsed) => Err(reqwest_middleware::Error::middleware(AttemptTimedOut {
                after: limit,
            })),
        }
    }
}
