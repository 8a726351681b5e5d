//! Retries: which outcomes are retried, how long to wait, and the budget that stops retries
//! from multiplying an outage.
//!
//! The retry loop itself is `reqwest-retry`'s `RetryTransientMiddleware`; we plug in
//! - `RetryOn`, its `RetryableStrategy`: only 503 and connection failures are retryable, a
//!   non-idempotent request only when it provably never reached the upstream, a circuit-open
//!   rejection never; a 503 whose `Retry-After` is over the cap or past the deadline is returned
//!   at once;
//! - `RetryWithin`, its `RetryPolicy`: the attempt limit, exponential backoff with full jitter
//!   (`retry-policies`' `ExponentialBackoff`, which reqwest-retry re-exports), `Retry-After`
//!   in place of the backoff when the upstream sent one, the call's deadline, and the
//!   [`RetryBudget`].
//!
//! Neither trait sees the request, so per-call facts (deadline, idempotency, the last outcome,
//! the upstream's `Retry-After`) live in the task-local `CallState` scoped around the call.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use http::header::RETRY_AFTER;
use http::{HeaderMap, StatusCode};
use reqwest_retry::policies::ExponentialBackoff;
use reqwest_retry::{Jitter, RetryDecision, RetryPolicy, Retryable, RetryableStrategy};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::pipeline::{instant_after, CallState, Outcome};
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
            if instant_after(Instant::now(), wait) >= call.deadline {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::pipeline::CallOptions;
    use crate::upstream::timeout::AttemptTimedOut;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn backoff_is_full_jitter_under_the_exponential_step_and_the_cap() {
        let backoff = RetryConfig::default().backoff();
        for n in 0..8u32 {
            let step = ms(25 * (1 << n)).min(ms(250));
            let samples: Vec<Duration> = (0..500).map(|_| backoff_delay(&backoff, n)).collect();
            assert!(
                samples.iter().all(|d| *d <= step),
                "retry {n} over {step:?}"
            );
            // Full jitter: draws land across the whole [0, step] range.
            assert!(samples.iter().any(|d| *d < step / 4), "retry {n}: none low");
            assert!(
                samples.iter().any(|d| *d > step * 3 / 4),
                "retry {n}: none high"
            );
        }
    }

    #[test]
    fn retry_after_parses_seconds_and_http_dates() {
        let date = "Wed, 21 Oct 2015 07:28:00 GMT";
        let at: SystemTime = chrono::DateTime::parse_from_rfc2822(date).unwrap().into();
        let now = at - Duration::from_secs(30);
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(date, now), Some(Duration::from_secs(30)));
        // A date already past means "now".
        assert_eq!(
            parse_retry_after(date, at + Duration::from_secs(5)),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("-1", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn retry_after_is_honoured_only_within_the_cap_and_the_deadline() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(RETRY_AFTER, v.parse().unwrap());
            h
        };
        let now = SystemTime::now();
        let cap = Duration::from_secs(2);
        let judge = |h: &HeaderMap, remaining| judge_retry_after(h, now, remaining, cap);
        assert_eq!(judge(&HeaderMap::new(), ms(5000)), RetryAfter::Absent);
        assert_eq!(judge(&with("garbage"), ms(5000)), RetryAfter::Absent);
        // Fits in the deadline and under the cap.
        assert_eq!(judge(&with("1"), ms(5000)), RetryAfter::Wait(ms(1000)));
        // Does not fit the deadline.
        assert_eq!(judge(&with("1"), ms(800)), RetryAfter::TooLong);
        // Over the cap, even with time to spare.
        assert_eq!(judge(&with("3"), ms(60_000)), RetryAfter::TooLong);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_allows_the_ratio_of_requests_plus_the_floor_over_the_window() {
        let budget = RetryBudget::new(&RetryConfig::default());
        for _ in 0..100 {
            budget.deposit();
        }
        // 20% of 100 requests + 3/s over 10s.
        let granted = (0..200).take_while(|_| budget.try_withdraw()).count();
        assert_eq!(granted, 20 + 30);
        tokio::time::advance(Duration::from_secs(11)).await;
        // The old requests and retries slid out: only the floor is left.
        let granted = (0..200).take_while(|_| budget.try_withdraw()).count();
        assert_eq!(granted, 30);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_without_floor_is_pure_ratio() {
        let budget = RetryBudget::new(&RetryConfig {
            budget_min_per_sec: 0,
            ..RetryConfig::default()
        });
        assert!(!budget.try_withdraw());
        for _ in 0..10 {
            budget.deposit();
        }
        assert!(budget.try_withdraw());
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw());
    }

    fn call(idempotent: bool) -> CallOptions {
        CallOptions {
            deadline: ms(1000),
            attempt_timeout: ms(1000),
            idempotent,
            retry_non_idempotent: false,
            max_retries: None,
        }
    }

    fn policy(config: &RetryConfig) -> RetryWithin {
        RetryWithin {
            backoff: config.backoff(),
            budget: Arc::new(RetryBudget::new(config)),
            upstream: Arc::from("t"),
        }
    }

    fn wait_of(decision: RetryDecision) -> Option<Duration> {
        match decision {
            RetryDecision::Retry { execute_after } => Some(
                execute_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default(),
            ),
            RetryDecision::DoNotRetry => None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn policy_stops_at_max_retries_and_before_the_deadline() {
        let config = RetryConfig::default();
        let p = policy(&config);
        let deadline = Instant::now() + ms(300);
        CallState::new(deadline, &call(true), 2)
            .scope(async {
                let now = SystemTime::now();
                assert!(wait_of(p.should_retry(now, 0)).is_some_and(|w| w <= ms(25)));
                assert!(wait_of(p.should_retry(now, 1)).is_some());
                assert_eq!(wait_of(p.should_retry(now, 2)), None);
                // A Retry-After that still fits replaces the backoff...
                CallState::with(|c| c.set_retry_after(ms(200)));
                let wait = wait_of(p.should_retry(now, 0)).expect("retry");
                assert!(wait > ms(190) && wait <= ms(200), "{wait:?}");
                // ...but the next attempt must start before the deadline.
                tokio::time::advance(ms(250)).await;
                CallState::with(|c| c.set_retry_after(ms(60)));
                assert_eq!(wait_of(p.should_retry(now, 0)), None);
            })
            .await;
    }

    #[tokio::test(start_paused = true)]
    async fn policy_stops_when_the_budget_is_spent() {
        let config = RetryConfig {
            budget_min_per_sec: 0,
            budget_ratio: 0.0,
            ..RetryConfig::default()
        };
        let p = policy(&config);
        CallState::new(Instant::now() + ms(1000), &call(true), 2)
            .scope(async { assert_eq!(wait_of(p.should_retry(SystemTime::now(), 0)), None) })
            .await;
    }

    fn answer(
        status: u16,
        retry_after: Option<&str>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        let mut builder = http::Response::builder().status(status);
        if let Some(v) = retry_after {
            builder = builder.header(RETRY_AFTER, v);
        }
        Ok(reqwest::Response::from(builder.body("").unwrap()))
    }

    fn failed() -> reqwest_middleware::Result<reqwest::Response> {
        Err(reqwest_middleware::Error::middleware(AttemptTimedOut {
            after: ms(1),
        }))
    }

    /// What the strategy says about `result` after an attempt that ended in `outcome`.
    async fn judged(
        idempotent: bool,
        outcome: Outcome,
        result: reqwest_middleware::Result<reqwest::Response>,
    ) -> Option<&'static str> {
        let strategy = RetryOn {
            retry_after_cap: Duration::from_secs(2),
        };
        CallState::new(Instant::now() + ms(5000), &call(idempotent), 2)
            .scope(async {
                CallState::with(|c| c.record(outcome, &result));
                // `Retryable` has no Debug, so name it for the assertions.
                strategy.handle(&result).map(|r| match r {
                    Retryable::Transient => "transient",
                    Retryable::Fatal => "fatal",
                })
            })
            .await
    }

    #[tokio::test(start_paused = true)]
    async fn strategy_retries_503_and_connection_failures_only_when_safe() {
        let s503 = Outcome::Status(StatusCode::SERVICE_UNAVAILABLE);
        let s500 = Outcome::Status(StatusCode::INTERNAL_SERVER_ERROR);
        let t = Some("transient");
        let f = Some("fatal");
        assert_eq!(judged(true, s503, answer(503, None)).await, t);
        assert_eq!(judged(true, s503, answer(503, Some("1"))).await, t);
        // Over the Retry-After cap: the 503 goes back at once.
        assert_eq!(judged(true, s503, answer(503, Some("30"))).await, f);
        assert_eq!(judged(true, s500, answer(500, None)).await, None);
        // A POST answered 503 reached the upstream: not retried.
        assert_eq!(judged(false, s503, answer(503, None)).await, None);
        // A POST that never connected is safe to send again; after a reset it is not.
        assert_eq!(judged(false, Outcome::ConnectError, failed()).await, t);
        assert_eq!(judged(false, Outcome::Reset, failed()).await, f);
        assert_eq!(judged(true, Outcome::Reset, failed()).await, t);
        assert_eq!(judged(true, Outcome::Timeout, failed()).await, f);
        let open = Outcome::CircuitOpen(Duration::from_secs(3));
        assert_eq!(judged(true, open, failed()).await, f);
    }

    #[test]
    fn config_defaults_unknown_fields_and_field_paths() {
        let parsed: RetryConfig = toml::from_str("max_retries = 1").expect("parse");
        assert_eq!(parsed.max_retries, 1);
        assert_eq!(parsed.backoff_base, Dur::from_millis(25));
        assert!(toml::from_str::<RetryConfig>("max_retry = 1").is_err());
        assert!(toml::from_str::<RetryConfig>("backoff_base = 25").is_err());

        let bad = RetryConfig {
            max_retries: 50,
            backoff_cap: Dur::from_millis(10),
            budget_ratio: -0.1,
            ..RetryConfig::default()
        };
        let mut errors = Vec::new();
        bad.validate("upstreams.storage.retry", &mut errors);
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "upstreams.storage.retry.max_retries",
                "upstreams.storage.retry.backoff_cap",
                "upstreams.storage.retry.budget_ratio",
            ]
        );
        let mut errors = Vec::new();
        RetryConfig::default().validate("r", &mut errors);
        assert!(errors.is_empty());
    }
}
