//! Retries: which outcomes are retried, how long to wait, and the budget that stops retries
//! from multiplying an outage.
//!
//! [`RetryLayer`] is the retry loop, a reqwest-middleware layer. It decides with the call's
//! own facts (deadline, idempotency, how the last attempt ended), which it reads from the
//! request's `Extensions` like every other layer:
//! - only 503 and connection failures are retryable; a non-idempotent request only when it
//!   provably never reached the upstream (connect refused), unless the route opts in; a
//!   circuit-open refusal or a timeout never;
//! - the wait is exponential backoff with full jitter (reqwest-retry's `ExponentialBackoff`
//!   policy, from `retry-policies`), or the 503's `Retry-After` when it is under the cap and
//!   fits the deadline (over either, the 503 is returned at once);
//! - the next attempt must start before the deadline, and must be paid for from the
//!   [`RetryBudget`].
//!
//! Why not reqwest-retry's own `RetryTransientMiddleware` loop: its strategy and policy traits
//! see neither the request nor its extensions, so the per-call facts had to live in a
//! task-local, and the layers below needed an "outside a call" branch for when it was absent.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use http::header::RETRY_AFTER;
use http::{Extensions, HeaderMap, StatusCode};
use reqwest::{Request, Response};
use reqwest_middleware::{Middleware, Next};
use reqwest_retry::policies::ExponentialBackoff;
use reqwest_retry::{Jitter, RetryDecision, RetryPolicy};
use tokio::time::Instant;

use super::balancer::Abandoned;
use super::call::{instant_after, Call, Outcome};
use super::instances::InstanceSet;
use super::window::SlidingWindow;
use crate::config::RetryConfig;

/// Full-jitter exponential backoff; the bounds are ordered here so that a config that skipped
/// validation cannot make `retry-policies` panic.
pub(crate) fn backoff_policy(cfg: &RetryConfig) -> ExponentialBackoff {
    let cap = cfg.backoff_cap.0.max(cfg.backoff_base.0);
    ExponentialBackoff::builder()
        .retry_bounds(cfg.backoff_base.0, cap)
        .jitter(Jitter::Full)
        .base(2)
        .build_with_max_retries(u32::MAX)
}

/// The wait before retry number `n_past_retries + 1`: uniform in `[0, min(cap, base * 2^n)]`.
pub(crate) fn backoff_delay(backoff: &ExponentialBackoff, n_past_retries: u32) -> Duration {
    // The policy adds its draw to its own reading of the clock, taken between these two:
    // measuring from the later one never overstates the draw (from the earlier one it did,
    // by the microseconds in between).
    match backoff.should_retry(SystemTime::now(), n_past_retries) {
        RetryDecision::Retry { execute_after } => execute_after
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
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

/// The retry loop (see the module docs). One per upstream: the budget is the upstream's.
pub(crate) struct RetryLayer {
    /// Computes the jittered backoff step.
    pub(crate) backoff: ExponentialBackoff,
    /// Shared by every call to this upstream.
    pub(crate) budget: Arc<RetryBudget>,
    /// Label for the budget-exhausted and hedge metrics.
    pub(crate) upstream: Arc<str>,
    /// Longest `Retry-After` honoured (`RetryConfig::retry_after_cap`).
    pub(crate) retry_after_cap: Duration,
    /// The upstream's instances: whether another one could take a retry or a hedge.
    pub(crate) instances: Arc<InstanceSet>,
}

/// How the next attempt may be paid for.
enum Cost {
    /// From the retry budget.
    Budget,
    /// Free: the request never reached an upstream and goes to another instance at once.
    Free,
}

impl RetryLayer {
    /// Whether an instance this call has not tried could take the next attempt: for a call
    /// under the adaptive limit, one under its own limit (a hedge or a retry elsewhere never
    /// pushes another instance past what it serves; with none there, a timed-out call is not
    /// retried and a refused connection is retried after a backoff, as with one instance).
    fn elsewhere(&self, call: &Call) -> bool {
        let need_room = call.state().limited.is_some();
        call.with_tried(|tried| self.instances.has_untried(tried, need_room))
    }

    /// How long to wait before retrying a call whose attempt number `n_past_retries + 1` just
    /// ended in `result` (`call` knows how), or `None` to return `result` as it is.
    pub(crate) fn next_wait(
        &self,
        call: &Call,
        result: &reqwest_middleware::Result<Response>,
        n_past_retries: u32,
    ) -> Option<Duration> {
        let state = call.state();
        let (wait, cost) = match call.last_outcome()? {
            // Refused on one instance with another at hand: the request never left us, so
            // it goes there at once, for free. Otherwise (one instance) after a backoff; even
            // a POST is safe either way.
            Outcome::ConnectError if self.elsewhere(call) => (Some(Duration::ZERO), Cost::Free),
            Outcome::ConnectError => (None, Cost::Budget),
            Outcome::Reset if call.replay_safe() => (None, Cost::Budget),
            // A timed-out attempt is abandoned for another instance (a paused or overloaded
            // one is never waited out twice); with one instance, retrying a slow upstream
            // only adds load.
            Outcome::Timeout if call.replay_safe() && self.elsewhere(call) => {
                (Some(Duration::ZERO), Cost::Budget)
            }
            Outcome::Status(StatusCode::SERVICE_UNAVAILABLE) if call.replay_safe() => {
                let response = result.as_ref().ok()?;
                let remaining = state.deadline.saturating_duration_since(Instant::now());
                match judge_retry_after(
                    response.headers(),
                    SystemTime::now(),
                    remaining,
                    self.retry_after_cap,
                ) {
                    RetryAfter::Absent => (None, Cost::Budget),
                    RetryAfter::Wait(wait) => (Some(wait), Cost::Budget),
                    RetryAfter::TooLong => return None,
                }
            }
            // A status we pass through, or an error we must not retry (circuit open:
            // pointless; a POST that may have been processed).
            Outcome::Status(_)
            | Outcome::Reset
            | Outcome::Timeout
            | Outcome::CircuitOpen(_)
            | Outcome::Internal
            | Outcome::Abandoned => return None,
        };
        if n_past_retries >= state.max_retries {
            return None;
        }
        let wait = wait.unwrap_or_else(|| backoff_delay(&self.backoff, n_past_retries));
        // The next attempt must start before the deadline; otherwise the last outcome stands.
        if instant_after(Instant::now(), wait) >= state.deadline {
            return None;
        }
        // Checked last so that only retries that will really happen spend the budget.
        if matches!(cost, Cost::Budget) && !self.budget.try_withdraw() {
            metrics::counter!("gateway_upstream_retry_budget_exhausted_total",
                "upstream" => self.upstream.clone())
            .increment(1);
            return None;
        }
        Some(wait)
    }

    /// The first attempt, hedged: if it has not answered after `delay`, a second goes to
    /// another instance (paid from the retry budget) and the first answer wins; the other
    /// attempt is cancelled. An error is no answer: if one attempt fails, the other's result
    /// is waited for.
    async fn hedged(
        &self,
        call: &Call,
        first: Request,
        second: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
        delay: Duration,
    ) -> reqwest_middleware::Result<Response> {
        // Each attempt gets a flag that marks it the loser of the race before it is dropped,
        // so its instance is charged with a timeout (balancer/layer.rs): a paused instance must
        // be ejected, not silently outraced forever.
        let (first_lost, second_lost) = (Abandoned::default(), Abandoned::default());
        extensions.insert(first_lost.clone());
        // The hedge's own extensions: the same call state and breaker permit (shared), its
        // own flag.
        let mut hedge_extensions = extensions.clone();
        hedge_extensions.insert(second_lost.clone());
        let result = self
            .race(
                call,
                first,
                second,
                extensions,
                hedge_extensions,
                next,
                delay,
                [first_lost, second_lost],
            )
            .await;
        extensions.remove::<Abandoned>();
        result
    }

    /// The race itself: `first` alone for `delay`, then (budget and another instance
    /// permitting) `second` beside it; the loser is marked before it is dropped.
    #[allow(clippy::too_many_arguments)]
    async fn race(
        &self,
        call: &Call,
        first: Request,
        second: Request,
        extensions: &mut Extensions,
        mut hedge_extensions: Extensions,
        next: Next<'_>,
        delay: Duration,
        [first_lost, second_lost]: [Abandoned; 2],
    ) -> reqwest_middleware::Result<Response> {
        let first = next.clone().run(first, extensions);
        tokio::pin!(first);
        tokio::select! {
            result = &mut first => return result,
            _ = tokio::time::sleep(delay) => {}
        }
        if !self.elsewhere(call) || !self.budget.try_withdraw() {
            return first.await;
        }
        metrics::counter!("gateway_upstream_hedges_total", "upstream" => self.upstream.clone())
            .increment(1);
        let second = next.run(second, &mut hedge_extensions);
        tokio::pin!(second);
        tokio::select! {
            result = &mut first => match result {
                Ok(answer) => {
                    second_lost.mark();
                    Ok(answer)
                }
                Err(_) => second.await,
            },
            result = &mut second => match result {
                Ok(answer) => {
                    first_lost.mark();
                    Ok(answer)
                }
                Err(_) => first.await,
            },
        }
    }
}

#[async_trait::async_trait]
impl Middleware for RetryLayer {
    async fn handle(
        &self,
        mut req: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        let call = Call::of(extensions)?.clone();
        let mut n_past_retries = 0;
        loop {
            // A body that cannot be copied (a stream) allows one attempt only.
            let copy = req.try_clone();
            let hedge = match (n_past_retries, call.state().hedge_after) {
                (0, Some(delay)) => req.try_clone().map(|r| (r, delay)),
                _ => None,
            };
            let result = match hedge {
                Some((second, delay)) => {
                    self.hedged(&call, req, second, extensions, next.clone(), delay)
                        .await
                }
                None => next.clone().run(req, extensions).await,
            };
            let wait = self.next_wait(&call, &result, n_past_retries);
            match (wait, copy) {
                (Some(wait), Some(copy)) => {
                    tokio::time::sleep(wait).await;
                    req = copy;
                    n_past_retries += 1;
                }
                _ => return result,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::call::CallOptions;
    use crate::upstream::timeout::AttemptTimedOut;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn backoff_is_full_jitter_under_the_exponential_step_and_the_cap() {
        let backoff = backoff_policy(&RetryConfig::default());
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

    fn options(idempotent: bool) -> CallOptions {
        CallOptions {
            deadline: ms(1000),
            attempt_timeout: ms(1000),
            idempotent,
            retry_non_idempotent: false,
            max_retries: None,
            hedge_after: None,
        }
    }

    /// The retry layer of a one-instance upstream.
    fn layer(config: &RetryConfig) -> RetryLayer {
        let upstream = crate::config::UpstreamConfig {
            url: "http://127.0.0.1:9".into(),
            ..crate::config::UpstreamConfig::default()
        };
        let instances = InstanceSet::new("t", &upstream, Box::new(|_| Ok(reqwest::Client::new())));
        instances.update(&[crate::upstream::instances::Endpoint {
            scheme: "http".into(),
            host: "127.0.0.1".into(),
            port: 9,
            pinned: None,
        }]);
        RetryLayer {
            backoff: backoff_policy(config),
            budget: Arc::new(RetryBudget::new(config)),
            upstream: Arc::from("t"),
            retry_after_cap: config.retry_after_cap.0,
            instances: Arc::new(instances),
        }
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

    /// A call whose last attempt ended in `outcome` with `result`.
    fn call_after(
        deadline: Duration,
        idempotent: bool,
        outcome: Outcome,
        result: &reqwest_middleware::Result<reqwest::Response>,
    ) -> Call {
        let call = Call::new(Instant::now() + deadline, &options(idempotent), 2);
        // The attempt went to the upstream's only instance (id 0).
        call.tried_instance(0);
        call.record(outcome, result);
        call
    }

    #[tokio::test(start_paused = true)]
    async fn stops_at_max_retries_and_before_the_deadline() {
        let l = layer(&RetryConfig::default());
        let s503 = Outcome::Status(StatusCode::SERVICE_UNAVAILABLE);
        let plain = answer(503, None);
        let call = call_after(ms(300), true, s503, &plain);
        assert!(l.next_wait(&call, &plain, 0).is_some_and(|w| w <= ms(25)));
        assert!(l.next_wait(&call, &plain, 1).is_some());
        assert_eq!(l.next_wait(&call, &plain, 2), None);
        // A Retry-After that still fits replaces the backoff...
        let later = answer(503, Some("0"));
        assert_eq!(l.next_wait(&call, &later, 0), Some(ms(0)));
        let one = answer(503, Some("1"));
        let long = call_after(ms(5000), true, s503, &one);
        assert_eq!(l.next_wait(&long, &one, 0), Some(ms(1000)));
        // ...but the next attempt must start before the deadline.
        assert_eq!(l.next_wait(&call, &one, 0), None);
        tokio::time::advance(ms(300)).await;
        assert_eq!(l.next_wait(&call, &plain, 0), None);
    }

    #[tokio::test(start_paused = true)]
    async fn stops_when_the_budget_is_spent() {
        let l = layer(&RetryConfig {
            budget_min_per_sec: 0,
            budget_ratio: 0.0,
            ..RetryConfig::default()
        });
        let refused = failed();
        let call = call_after(ms(1000), true, Outcome::ConnectError, &refused);
        assert_eq!(l.next_wait(&call, &refused, 0), None);
    }

    /// Whether the layer retries after an attempt that ended in `outcome` with `result`.
    fn retried(
        idempotent: bool,
        outcome: Outcome,
        result: reqwest_middleware::Result<reqwest::Response>,
    ) -> bool {
        let l = layer(&RetryConfig::default());
        let call = call_after(ms(5000), idempotent, outcome, &result);
        l.next_wait(&call, &result, 0).is_some()
    }

    #[tokio::test(start_paused = true)]
    async fn retries_503_and_connection_failures_only_when_safe() {
        let s503 = Outcome::Status(StatusCode::SERVICE_UNAVAILABLE);
        let s500 = Outcome::Status(StatusCode::INTERNAL_SERVER_ERROR);
        assert!(retried(true, s503, answer(503, None)));
        assert!(retried(true, s503, answer(503, Some("1"))));
        // Over the Retry-After cap: the 503 goes back at once.
        assert!(!retried(true, s503, answer(503, Some("30"))));
        assert!(!retried(true, s500, answer(500, None)));
        // A POST answered 503 reached the upstream: not retried.
        assert!(!retried(false, s503, answer(503, None)));
        // A POST that never connected is safe to send again; after a reset it is not.
        assert!(retried(false, Outcome::ConnectError, failed()));
        assert!(!retried(false, Outcome::Reset, failed()));
        assert!(retried(true, Outcome::Reset, failed()));
        assert!(!retried(true, Outcome::Timeout, failed()));
        let open = Outcome::CircuitOpen(Duration::from_secs(3));
        assert!(!retried(true, open, failed()));
    }

    #[tokio::test(start_paused = true)]
    async fn with_another_instance_refusals_go_there_at_once_and_free_and_timeouts_move_on() {
        let l = layer(&RetryConfig {
            budget_min_per_sec: 0,
            budget_ratio: 0.0,
            ..RetryConfig::default()
        });
        l.instances
            .update(&[0u16, 1].map(|i| crate::upstream::instances::Endpoint {
                scheme: "http".into(),
                host: "127.0.0.1".into(),
                port: 9 + i,
                pinned: None,
            }));
        let refused = failed();
        let call = call_after(ms(1000), false, Outcome::ConnectError, &refused);
        // Even with an empty budget: the request never left, another instance takes it now.
        assert_eq!(l.next_wait(&call, &refused, 0), Some(Duration::ZERO));
        // A timeout is retried elsewhere at once, from the budget (empty here: not retried).
        let call = call_after(ms(1000), true, Outcome::Timeout, &refused);
        assert_eq!(l.next_wait(&call, &refused, 0), None);
        let l = layer(&RetryConfig::default());
        l.instances
            .update(&[0u16, 1].map(|i| crate::upstream::instances::Endpoint {
                scheme: "http".into(),
                host: "127.0.0.1".into(),
                port: 9 + i,
                pinned: None,
            }));
        let call = call_after(ms(1000), true, Outcome::Timeout, &refused);
        assert_eq!(l.next_wait(&call, &refused, 0), Some(Duration::ZERO));
        // Never a POST that may have reached the instance.
        let call = call_after(ms(1000), false, Outcome::Timeout, &refused);
        assert_eq!(l.next_wait(&call, &refused, 0), None);
    }
}
