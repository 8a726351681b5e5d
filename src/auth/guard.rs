//! Failed verifications per client: a client that keeps sending tokens the verifier rejects
//! is refused (429) without another verify call once it is over `auth.failure_policy`.
//!
//! The failures are counted by the rate limiter (so replicas sharing Redis share the count);
//! the refusal itself is remembered in-process until the policy's window lets the client in
//! again, so a blocked client costs no Redis round trip and no auth-service call. A token the
//! verifier accepted recently is still let through for a blocked address: clients behind one
//! NAT must not be locked out by a neighbour's bad tokens.

use std::time::Duration;

use http::HeaderMap;
use tokio::time::Instant;

use crate::client::ClientKey;
use crate::error::GatewayError;
use crate::ratelimit::{PolicyId, RateLimiter, Subject};

/// Most blocked addresses remembered at once; beyond it the oldest are forgotten (and
/// re-blocked on their next failure).
const BLOCKED_CAPACITY: u64 = 100_000;

pub struct FailureGuard {
    /// The limiter policy failures are counted against; `None`: no counting.
    policy: Option<PolicyId>,
    /// Clients (IPv6 by prefix) over the policy, with when they may try again.
    blocked: moka::sync::Cache<ClientKey, Instant>,
}

impl FailureGuard {
    pub fn new(policy: Option<PolicyId>, longest_block: Duration) -> FailureGuard {
        FailureGuard {
            policy,
            blocked: moka::sync::Cache::builder()
                .max_capacity(BLOCKED_CAPACITY)
                .time_to_live(longest_block.max(Duration::from_secs(1)))
                .build(),
        }
    }

    /// `Err(RateLimited)` while `client` is blocked.
    pub fn check(&self, client: ClientKey) -> Result<(), GatewayError> {
        let Some(until) = self.blocked.get(&client) else {
            return Ok(());
        };
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            self.blocked.invalidate(&client);
            return Ok(());
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::RETRY_AFTER,
            crate::error::retry_after_value(left),
        );
        Err(GatewayError::RateLimited { headers })
    }

    /// Counts one failed verification by `client`; `Err(RateLimited)` when this one took it
    /// over the policy (the client is blocked from now on).
    pub async fn failed(
        &self,
        limiter: &RateLimiter,
        client: ClientKey,
        headers: &HeaderMap,
        route: &str,
    ) -> Result<(), GatewayError> {
        let Some(policy) = self.policy else {
            return Ok(());
        };
        let subject = Subject {
            client,
            user_id: None,
            headers,
            route,
        };
        let decision = limiter.check(&[policy], &subject).await;
        if decision.allowed || decision.unavailable {
            return Ok(());
        }
        let wait = Duration::from_secs(decision.retry_after_secs().unwrap_or(1));
        self.blocked.insert(
            client,
            crate::upstream::call::instant_after(Instant::now(), wait),
        );
        metrics::counter!("gateway_auth_failures_blocked_total").increment(1);
        tracing::info!(client = %client, wait_secs = wait.as_secs(), "too many failed token verifications; client blocked");
        let mut headers = HeaderMap::new();
        decision.apply_headers(&mut headers);
        Err(GatewayError::RateLimited { headers })
    }
}
