//! Retries: which outcomes are retried, how long to wait, and the budget that stops retries
//! from multiplying an outage.
//!
//! The retry loop itself is `reqwest-retry`'s `RetryTransientMiddleware`; we plug in
//! - [`RetryOn`], its `RetryableStrategy`: only 503 and connection failures are retryable, a
//!   non-idempotent request only when it provably never reached the upstream, a circuit-open
//!   rejection never; a 503 whose `Retry-After` is over the cap or past the deadline is returned
//!   at once;
//! - [`RetryWithin`], its `RetryPolicy`: the attempt limit, exponential backoff with full jitter
//!   (`retry-policies`' `ExponentialBackoff`, which reqwest-retry re-exports), `Retry-After`
//!   in place of the backoff when the upstream sent one, the call's deadline, and the
//!   [`RetryBudget`].
//!
//! Neither trait sees the request, so per-call facts (deadline, idempotency, the last outcome,
//! the upstream's `Retry-After`) live in the task-local [`CallState`] scoped around the call.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use http::header::RETRY_AFTER;
use http::{HeaderMap, StatusCode};
use reqwest_retry::policies::ExponentialBackoff;
use reqwest_retry::{Jitter, RetryDecision, RetryPolicy, Retryable, RetryableStrategy};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::pipeline::{CallState, Outcome};
use super::window::SlidingWindow;
use crate::config::{join, Dur, FieldError};

/// `upstreams.<name>.retry`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Retries after the first attempt; a route may lower or raise it (`CallOptions::max_retries`).
    pub max_retries: u32,
    /// First backoff step; each retry doubles it, then full jitter picks in [0, step].
    pub backoff_base: Dur,
    /// Largest backoff step, so a long outage does not push waits past any useful deadline.
    pub backoff_cap: Dur,
    /// Longest `Retry-After` we wait for; a longer one returns the 503 to the client at once.
    pub retry_after_cap: Dur,
    /// Retries may be at most this share of the requests seen over `budget_window`.
    pub budget_ratio: f64,
    /// How far back the budget counts requests and retries.
    pub budget_window: Dur,
    /// Retries always allowed per second, so a quiet upstream still gets its few retries.
    pub budget_min_per_sec: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_retries: 2,
            backoff_base: Dur::from_millis(25),
            backoff_cap: Dur::from_millis(250),
            retry_after_cap: Dur::from_secs(2),
            budget_ratio: 0.2,
            budget_window: Dur::from_secs(10),
            budget_min_per_sec: 3,
        }
    }
}

impl RetryConfig {
    /// Highest `max_retries` accepted: more only adds load to a struggling upstream.
    pub const MAX_RETRIES_LIMIT: u32 = 10;

    pub fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        let mut bad =
            |field: &str, message: String| errors.push(FieldError::new(join(path, field), message));
        if self.max_retries > Self::MAX_RETRIES_LIMIT {
            bad(
                "max_retries",
                format!(
                    "must be at most {}, got {}",
                    Self::MAX_RETRIES_LIMIT,
                    self.max_retries
                ),
            );
        }
        if self.backoff_base.0.is_zero() {
            bad("backoff_base", "must be greater than zero".into());
        }
        if self.backoff_cap < self.backoff_base {
            bad(
                "backoff_cap",
                format!("must be at least backoff_base ({})", self.backoff_base),
            );
        }
        if !(0.0..=1.0).contains(&self.budget_ratio) {
            bad(
                "budget_ratio",
                format!("must be between 0.0 and 1.0, got {}", self.budget_ratio),
            );
        }
        if self.budget_window.0 < Duration::from_secs(1)
            || self.budget_window.0 > Duration::from_secs(300)
        {
            bad(
                "budget_window",
                format!("must be between 1s and 5m, got {}", self.budget_window),
            );
        }
    }

    /// Full-jitter exponential backoff; the bounds are ordered here so that a config that skipped
    /// validation cannot make `retry-policies` panic.
    pub(crate) fn backoff(&self) -> ExponentialBackoff {
        let cap = self.backoff_cap.0.max(self.backoff_base.0);
        ExponentialBackoff::builder()
            .retry_bounds(self.backoff_base.0, cap)
            .jitter(Jitter::Full)
            .base(2)
            .build_with_max_retries(u32::MAX)
    }
}

/// The wait before retry number `n_past_retries + 1`: uniform in `[0, min(cap, base * 2^n)]`.
pub(crate) fn backoff_delay(backoff: &ExponentialBackoff, n_past_retries: u32) -> Duration {
    let now = SystemTime::now();
    match backoff.should_retry(now, n_past_retries) {
        RetryDecision::Retry { execute_after } => {
            execute_after.duration_since(now).unwrap_or_default()
        }
        RetryDecision::DoNotRetry => Duration::ZERO,
    }
}

/// What a 503's `Retry-After` means for the next attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RetryAfter {
    /// No usable header: wait for our own backoff.
    Absent,
    /// Wait this long, then retry.
    Wait(Duration),
    /// The upstream asks for longer than we may wait: return its 503 now.
    TooLong,
}

/// Reads `Retry-After` (delta-seconds or an HTTP date) and checks it against the cap and the
/// time left before the deadline (the next attempt must start before the deadline).
pub(crate) fn judge_retry_after(
    headers: &HeaderMap,
    now: SystemTime,
    remaining: Duration,
    cap: Duration,
) -> RetryAfter {
    let Some(wait) = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, now))
    else {
        return RetryAfter::Absent;
    };
    if wait > cap || wait >= remaining {
        RetryAfter::TooLong
    } else {
        RetryAfter::Wait(wait)
    }
}

/// `Retry-After: 120` or `Retry-After: Wed, 21 Oct 2015 07:28:00 GMT`; a date in the past is 0.
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at: SystemTime = chrono::DateTime::parse_from_rfc2822(value).ok()?.into();
    Some(at.duration_since(now).unwrap_or_default())
}

/// Caps retries at `ratio` of recent requests plus a per-second floor, per upstream.
///
/// Every call deposits one request; every retry must withdraw. During an outage where every
/// request fails, the upstream therefore sees at most `(1 + ratio)` times the offered load
/// (plus the floor), instead of `1 + max_retries` times.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    /// Retries always allowed inside one window: `min_per_sec * window`.
    floor: f64,
    /// (requests, retries) over the budget window.
    window: Mutex<SlidingWindow>,
}

impl RetryBudget {
    pub fn new(config: &RetryConfig) -> Self {
        RetryBudget {
            ratio: config.budget_ratio,
            floor: f64::from(config.budget_min_per_sec) * config.budget_window.0.as_secs_f64(),
            window: Mutex::new(SlidingWindow::new(config.budget_window.0)),
        }
    }

    /// Counts one client request.
    pub fn deposit(&self) {
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        window.add(Instant::now(), 1, 0);
    }

    /// Takes one retry from the budget; `false` means the retry must not happen.
    pub fn try_withdraw(&self) -> bool {
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let (requests, retries) = window.totals(now);
        let allowed = self.ratio * requests as f64 + self.floor;
        if (retries + 1) as f64 <= allowed {
            window.add(now, 0, 1);
            true
        } else {
            false
        }
    }
}

/// reqwest-retry's `RetryableStrategy`: decides whether the last attempt may be retried at all.
pub(crate) struct RetryOn {
    /// Longest `Retry-After` honoured (`RetryConfig::retry_after_cap`).
    pub(crate) retry_after_cap: Duration,
}

impl RetryableStrategy for RetryOn {
    fn handle(
        &self,
        res: &Result<reqwest::Response, reqwest_middleware::Error>,
    ) -> Option<Retryable> {
        // Outside a pipeline call there are no per-call facts to decide with: never retry.
        CallState::with(|call| {
            let replay_safe = call.idempotent || call.retry_non_idempotent;
            match call.last_outcome() {
                // Refused or failed to connect: the request never left us, so even a POST is safe.
                Some(Outcome::ConnectError) => Some(Retryable::Transient),
                Some(Outcome::Reset) if replay_safe => Some(Retryable::Transient),
                Some(Outcome::Status(code))
                    if code == StatusCode::SERVICE_UNAVAILABLE && replay_safe =>
                {
                    let Ok(response) = res else {
                        return Some(Retryable::Fatal);
                    };
                    let remaining = call.deadline.saturating_duration_since(Instant::now());
                    match judge_retry_after(
                        response.headers(),
                        SystemTime::now(),
                        remaining,
                        self.retry_after_cap,
                    ) {
                        RetryAfter::Absent => Some(Retryable::Transient),
                        RetryAfter::Wait(wait) => {
                            call.set_retry_after(wait);
                            Some(Retryable::Transient)
                        }
                        RetryAfter::TooLong => Some(Retryable::Fatal),
                    }
                }
                // A status we pass through, or an error we must not retry (timeouts: the upstream
                // is already slow; circuit open: pointless; a POST that may have been processed).
                Some(Outcome::Status(_)) => None,
                Some(_) | None => Some(Retryable::Fatal),
            }
        })
        .flatten()
    }
}

/// reqwest-retry's `RetryPolicy`: whether and when the next attempt happens.
pub(crate) struct RetryWithin {
    /// Computes the jittered backoff step.
    pub(crate) backoff: ExponentialBackoff,
    /// Shared by every call to this upstream.
    pub(crate) budget: Arc<RetryBudget>,
    /// Label for the budget-exhausted metric.
    pub(crate) upstream: Arc<str>,
}

impl RetryPolicy for RetryWithin {
    fn should_retry(&self, _request_start_time: SystemTime, n_past_retries: u32) -> RetryDecision {
        let decision = CallState::with(|call| {
            if n_past_retries >= call.max_retries {
                return RetryDecision::DoNotRetry;
            }
            let wait = call
                .take_retry_after()
                .unwrap_or_else(|| backoff_delay(&self.backoff, n_past_retries));
            // The next attempt must start before the deadline; otherwise the last outcome stands.
            if Instant::now() + wait >= call.deadline {
                return RetryDecision::DoNotRetry;
            }
            // Checked last so that only retries that will really happen spend the budget.
            if !self.budget.try_withdraw() {
                metrics::counter!("gateway_upstream_retry_budget_exhausted_total",
                    "upstream" => self.upstream.clone())
                .increment(1);
                return RetryDecision::DoNotRetry;
            }
            RetryDecision::Retry {
                execute_after: SystemTime::now() + wait,
            }
        });
        decision.unwrap_or(RetryDecision::DoNotRetry)
    }
}
