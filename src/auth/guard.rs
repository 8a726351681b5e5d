//! Failed verifications per client: a client that keeps sending tokens the verifier rejects
//! is refused (429) without another verify call once it is over `auth.failure_policy`.
//!
//! The failures are counted by the rate limiter (so replicas sharing Redis share the count);
//! the refusal itself is remembered in-process until the policy's window lets the client in
//! again, so a blocked client costs no Redis round trip and no auth-service call. A token the
//! verifier accepted recently is still let through for a blocked address: clients behind one
//! NAT must not be locked out by a neighbour's bad tokens.
//!
//! Counting after the fact is not enough: N requests that arrive together all pass the check
//! before the first failure is counted. So each client also has a failure budget per policy
//! window, a semaphore of `limit` permits: a verification holds a permit while it runs, gives
//! it back when the token was good (or the auth service could not say) and burns it when the
//! token was rejected; with the budget spent the client is refused like a blocked one. The
//! guarantee, whatever the concurrency: per replica, at most `limit` verifications of tokens
//! the verifier rejects start for one client within one policy window (from its first
//! verification), and at most `limit` of its verifications run at once (more wait for a
//! permit, up to the verify timeout).
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::client::ClientKey;
use crate::error::GatewayError;
use crate::ratelimit::{PolicyId, RateLimiter, Subject};

/// Most blocked addresses remembered at once; beyond it the oldest are forgotten (and
/// re-blocked on their next failure).
const BLOCKED_CAPACITY: u64 = 100_000;

/// Most failure budgets remembered at once (one per client with a verification in the last
/// window, about 200 bytes each); beyond it the oldest are forgotten and start afresh.
const BUDGET_CAPACITY: u64 = 100_000;

/// The policy failures are counted against, as the guard needs it.
#[derive(Clone, Copy, Debug)]
pub struct FailurePolicy {
    pub id: PolicyId,
    /// Failed verifications a client may have per window.
    pub limit: u32,
    pub window: Duration,
}

/// One client's failure budget for the current window.
struct Budget {
    /// `limit` permits minus the burned ones; closed once none are left.
    permits: Arc<Semaphore>,
    /// Permits burned by rejected tokens so far.
    burned: AtomicU32,
    /// When a fresh budget replaces this one (the entry's time to live).
    renews_at: Instant,
}

pub struct FailureGuard {
    /// The limiter policy failures are counted against; `None`: no counting.
    policy: Option<FailurePolicy>,
    /// Clients (IPv6 by prefix) over the policy, with when they may try again.
    blocked: moka::sync::Cache<ClientKey, Instant>,
    /// Failure budgets per client, each living one policy window.
    budgets: moka::sync::Cache<ClientKey, Arc<Budget>>,
}

/// A verification under way: holds one permit of its client's budget until [`FailureGuard::
/// rejected`] burns it or it is dropped (a good token, an auth-service failure, a client
/// that went away), which gives it back.
pub struct Verification {
    permit: Option<(OwnedSemaphorePermit, Arc<Budget>)>,
}

impl FailureGuard {
    pub fn new(policy: Option<FailurePolicy>, longest_block: Duration) -> FailureGuard {
        let window = policy.map_or(Duration::from_secs(1), |p| p.window);
        FailureGuard {
            policy,
            blocked: moka::sync::Cache::builder()
                .max_capacity(BLOCKED_CAPACITY)
                .time_to_live(longest_block.max(Duration::from_secs(1)))
                .build(),
            budgets: moka::sync::Cache::builder()
                .max_capacity(BUDGET_CAPACITY)
                .time_to_live(window.max(Duration::from_millis(1)))
                .build(),
        }
    }

    fn refusal(left: Duration) -> GatewayError {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::RETRY_AFTER,
            crate::error::retry_after_value(left),
        );
        GatewayError::RateLimited { headers }
    }

    /// Takes a permit of `client`'s failure budget for one verification, waiting at most
    /// `wait` for one while the client's other verifications run. `Err(RateLimited)`, without
    /// a verify call, when the budget is spent or no permit came free in time.
    pub async fn admit(
        &self,
        client: ClientKey,
        wait: Duration,
    ) -> Result<Verification, GatewayError> {
        let Some(policy) = self.policy else {
            return Ok(Verification { permit: None });
        };
        let budget = self.budgets.get_with(client, || {
            Arc::new(Budget {
                permits: Arc::new(Semaphore::new(policy.limit as usize)),
                burned: AtomicU32::new(0),
                renews_at: crate::upstream::call::instant_after(Instant::now(), policy.window),
            })
        });
        match tokio::time::timeout(wait, budget.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Verification {
                permit: Some((permit, budget)),
            }),
            // Closed: every permit burned in this window.
            Ok(Err(_)) => Err(Self::refusal(
                budget.renews_at.saturating_duration_since(Instant::now()),
            )),
            Err(_) => Err(Self::refusal(Duration::from_secs(1))),
        }
    }

    /// `verification`'s token was rejected: its permit is burned, and with the last one the
    /// client is blocked until the budget renews.
    pub fn rejected(&self, client: ClientKey, verification: Verification) {
        let Some((permit, budget)) = verification.permit else {
            return;
        };
        permit.forget();
        let burned = budget.burned.fetch_add(1, Ordering::AcqRel) + 1;
        let spent = self.policy.is_some_and(|p| burned >= p.limit);
        if spent {
            // Waiters are refused at once instead of waiting for a permit that never comes.
            budget.permits.close();
            let until = budget.renews_at;
            if self.blocked.get(&client).is_none_or(|t| t < until) {
                self.blocked.insert(client, until);
            }
            metrics::counter!("gateway_auth_failures_blocked_total").increment(1);
            tracing::info!(client = %client, "failed-verification budget spent; client blocked until it renews");
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
        Err(Self::refusal(left))
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
        let Some(policy) = self.policy.map(|p| p.id) else {
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
