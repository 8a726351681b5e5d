//! The per-upstream circuit breaker and the middleware that puts it in the pipeline.
//!
//! # What failsafe does here, and what we wrote
//!
//! The trip decision uses failsafe's [`FailurePolicy`] trait: its `consecutive_failures` policy
//! (a pure counter) and our [`FailureRate`] policy (failure share over a sliding window with a
//! minimum volume). The state machine around them (closed / open / half-open) is ours, because
//! failsafe's `StateMachine` cannot do what the gateway needs:
//! - it reads `std::time::Instant` (its mock clock is a hidden thread-local), so a paused tokio
//!   clock cannot drive the open time in tests;
//! - half-open admits every caller, we must admit at most `half_open_probes` at a time;
//! - it keeps the open deadline private, so it cannot report the time until the next probe
//!   (the `Retry-After` of a circuit-open 503 and `/admin`);
//! - its backoffs work in whole seconds and panic below one second.
//!
//! failsafe's `success_rate_over_time_window` is not used either: it is an exponential moving
//! average on the std clock that only trips once a full window has passed since the last close,
//! not "50% of at least 20 calls in the last 10s".
//!
//! The policies are handed a zero constant backoff; the open time is chosen by
//! [`open_duration`]: `open_base * 2^(openings-1)` capped at `open_max`, minus up to 20% jitter
//! so that replicas do not probe in lockstep, reset to `open_base` after a close.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use failsafe::backoff::{self, Constant};
use failsafe::failure_policy::{consecutive_failures, ConsecutiveFailures};
use failsafe::FailurePolicy;
use http::Extensions;
use rand::Rng;
use reqwest::{Request, Response};
use reqwest_middleware::{Middleware, Next};
use serde::Serialize;
use tokio::time::Instant;

pub use super::call::BreakerOpen;
use super::call::{instant_after, NoCall};
use super::window::SlidingWindow;
use crate::config::BreakerConfig;

/// The state as reported in metrics (`gateway_circuit_breaker_state`) and `/admin`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    /// The `state` label and the `/admin` word.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
    /// Every state, for the one-series-per-state gauge.
    pub const ALL: [BreakerState; 3] = [
        BreakerState::Closed,
        BreakerState::Open,
        BreakerState::HalfOpen,
    ];
}

/// What `/admin` shows for one upstream's breaker.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BreakerSnapshot {
    pub upstream: String,
    pub enabled: bool,
    pub state: BreakerState,
    pub consecutive_failures: u32,
    pub window_calls: u64,
    pub window_failures: u64,
    /// How many times the breaker has opened since the process started.
    pub opened_count: u64,
    /// Seconds until a probe is let through; `None` unless open.
    pub seconds_until_probe: Option<f64>,
}

/// Asks the upstream whether it is back: `true` for a healthy answer. Boxed so that tests can
/// stand in for the network (see [`Breaker::set_health_probe`]).
pub type HealthCheck =
    Arc<dyn Fn() -> futures_util::future::BoxFuture<'static, bool> + Send + Sync>;

/// The production [`HealthCheck`]: `GET url` on the upstream's pooled client, healthy on a 2xx
/// within `timeout`.
pub fn http_health_check(
    client: reqwest::Client,
    url: reqwest::Url,
    timeout: Duration,
) -> HealthCheck {
    Arc::new(move || {
        let request = client.get(url.clone()).timeout(timeout).send();
        Box::pin(async move { matches!(request.await, Ok(r) if r.status().is_success()) })
    })
}

/// failsafe `FailurePolicy`: trips when at least `rate` of the calls in the window failed and the
/// window holds at least `min_calls`, on tokio's clock.
#[derive(Debug)]
pub struct FailureRate {
    rate: f64,
    min_calls: u64,
    /// (calls, failures).
    window: SlidingWindow,
}

impl FailureRate {
    pub fn new(rate: f64, min_calls: u32, window: Duration) -> Self {
        FailureRate {
            rate,
            min_calls: u64::from(min_calls),
            window: SlidingWindow::new(window),
        }
    }

    /// (calls, failures) in the window now.
    pub fn counts(&self) -> (u64, u64) {
        self.window.totals(Instant::now())
    }
}

impl FailurePolicy for FailureRate {
    fn record_success(&mut self) {
        self.window.add(Instant::now(), 1, 0);
    }

    fn mark_dead_on_failure(&mut self) -> Option<Duration> {
        let now = Instant::now();
        self.window.add(now, 1, 1);
        let (calls, failures) = self.window.totals(now);
        (calls >= self.min_calls && failures as f64 >= self.rate * calls as f64)
            .then_some(Duration::ZERO)
    }

    fn revived(&mut self) {
        self.window.clear();
    }
}

/// Open time for the `openings`-th opening in a row (1-based): exponential from `base`, capped
/// at `max`, then reduced by a uniform 0-20% jitter.
pub fn open_duration(base: Duration, max: Duration, openings: u32) -> Duration {
    let doublings = openings.saturating_sub(1).min(32);
    let planned = base
        .checked_mul(1u32 << doublings.min(31))
        .map_or(max, |d| d.min(max));
    planned.mul_f64(1.0 - rand::rng().random_range(0.0..=0.2))
}

#[derive(Debug)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { probes_in_flight: u32 },
}

impl Phase {
    fn state(&self) -> BreakerState {
        match self {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    /// Bumped on every transition: an answer to a call admitted in an earlier phase is stale
    /// and must not move the current one (e.g. a slow pre-open call closing a half-open breaker).
    epoch: u64,
    /// failsafe's policy for "N failures in a row".
    consecutive: ConsecutiveFailures<Constant>,
    /// failsafe keeps its count private; this copy is for the snapshot only.
    consecutive_count: u32,
    rate: FailureRate,
    /// Openings since the last close; drives the growth of the open time.
    openings_in_a_row: u32,
    opened_total: u64,
}

/// One upstream's circuit breaker. Cheap to query; all state sits behind one short lock.
pub struct Breaker {
    upstream: Arc<str>,
    config: BreakerConfig,
    inner: Mutex<Inner>,
    /// The active health probe run while open, when `probe_path` is set and the pipeline
    /// supplied the upstream's URL.
    health: std::sync::OnceLock<HealthCheck>,
}

/// Permission for one client call, held across its attempts (see [`Breaker::admit_attempt`]).
/// Report the call's final result with [`Permit::record`]; dropping it unrecorded (the call was
/// cancelled, or failed for a reason of our own) frees a half-open probe slot and counts as
/// nothing.
#[derive(Debug)]
#[must_use]
pub struct Permit {
    /// Owned, so that the permit can live in the call's task-local state across attempts.
    breaker: Arc<Breaker>,
    epoch: u64,
    /// This call is a half-open probe holding one of the slots.
    probe: bool,
    /// A disabled breaker's permits record nothing.
    counted: bool,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("upstream", &self.upstream)
            .field("config", &self.config)
            .field("inner", &self.inner)
            .field("health_probe", &self.health.get().is_some())
            .finish()
    }
}

impl Permit {
    /// Records the call's outcome: `failed` = its final attempt failed in a way the breaker
    /// counts (connection error, timeout, reset, 5xx).
    pub fn record(mut self, failed: bool) {
        if self.counted {
            if let Some(opened) = self.breaker.on_result(self.epoch, self.probe, failed) {
                Breaker::start_health_probe(&self.breaker, opened);
            }
        }
        self.counted = false;
        self.probe = false;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.probe {
            self.breaker.release_probe(self.epoch);
        }
    }
}

impl Breaker {
    pub fn new(upstream: &str, config: &BreakerConfig) -> Breaker {
        let breaker = Breaker {
            upstream: Arc::from(upstream),
            config: config.clone(),
            inner: Mutex::new(Inner {
                phase: Phase::Closed,
                epoch: 0,
                consecutive: consecutive_failures(
                    config.consecutive_failures,
                    backoff::constant(Duration::ZERO),
                ),
                consecutive_count: 0,
                rate: FailureRate::new(config.failure_rate, config.min_calls, config.window.0),
                openings_in_a_row: 0,
                opened_total: 0,
            }),
            health: std::sync::OnceLock::new(),
        };
        breaker.report_state(BreakerState::Closed);
        breaker
    }

    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks to make one call. Fast when refused: one lock, no allocation.
    pub fn try_acquire(self: &Arc<Self>) -> Result<Permit, BreakerOpen> {
        if !self.config.enabled {
            return Ok(Permit {
                breaker: self.clone(),
                epoch: 0,
                probe: false,
                counted: false,
            });
        }
        let now = Instant::now();
        let mut inner = self.lock();
        self.advance(&mut inner, now);
        let epoch = inner.epoch;
        match &mut inner.phase {
            Phase::Closed => Ok(Permit {
                breaker: self.clone(),
                epoch,
                probe: false,
                counted: true,
            }),
            Phase::Open { until } => Err(BreakerOpen {
                retry_after: until.saturating_duration_since(now),
            }),
            Phase::HalfOpen { probes_in_flight } => {
                if *probes_in_flight < self.config.half_open_probes {
                    *probes_in_flight += 1;
                    Ok(Permit {
                        breaker: self.clone(),
                        epoch,
                        probe: true,
                        counted: true,
                    })
                } else {
                    // The probe in flight decides; we cannot know when, so ask for a short wait.
                    Err(BreakerOpen {
                        retry_after: self.config.open_base.0.min(Duration::from_secs(1)),
                    })
                }
            }
        }
    }

    /// Admits one attempt of a call. `held` is the permit the call got on an earlier attempt:
    /// while the breaker is still in the phase that issued it (closed, or half-open with this
    /// call as a probe), the call's retries go through on it; after any transition the call
    /// must ask again like a new one, so an opening stops every retry in flight at once.
    pub fn admit_attempt(self: &Arc<Self>, held: &mut Option<Permit>) -> Result<(), BreakerOpen> {
        if let Some(permit) = held {
            if !self.config.enabled || self.is_current(permit.epoch) {
                return Ok(());
            }
        }
        // A stale permit counts for nothing; dropping it first frees nothing it still holds.
        *held = None;
        *held = Some(self.try_acquire()?);
        Ok(())
    }

    /// No transition since `epoch` (an open time that just ran out is a transition).
    fn is_current(&self, epoch: u64) -> bool {
        let mut inner = self.lock();
        self.advance(&mut inner, Instant::now());
        inner.epoch == epoch
    }

    pub fn state(&self) -> BreakerState {
        if !self.config.enabled {
            return BreakerState::Closed;
        }
        let mut inner = self.lock();
        self.advance(&mut inner, Instant::now());
        inner.phase.state()
    }

    pub fn snapshot(&self) -> BreakerSnapshot {
        let now = Instant::now();
        let mut inner = self.lock();
        if self.config.enabled {
            self.advance(&mut inner, now);
        }
        let (window_calls, window_failures) = inner.rate.counts();
        BreakerSnapshot {
            upstream: self.upstream.to_string(),
            enabled: self.config.enabled,
            state: inner.phase.state(),
            consecutive_failures: inner.consecutive_count,
            window_calls,
            window_failures,
            opened_count: inner.opened_total,
            seconds_until_probe: match inner.phase {
                Phase::Open { until } => Some(until.saturating_duration_since(now).as_secs_f64()),
                Phase::Closed | Phase::HalfOpen { .. } => None,
            },
        }
    }

    /// Closes the breaker and forgets its history (operator action from `/admin`).
    pub fn reset(&self) {
        let mut inner = self.lock();
        self.close(&mut inner);
    }

    /// Open -> half-open once the open time has passed (time-driven, so done lazily on access).
    fn advance(&self, inner: &mut Inner, now: Instant) {
        if let Phase::Open { until } = inner.phase {
            if now >= until {
                self.transition(
                    inner,
                    Phase::HalfOpen {
                        probes_in_flight: 0,
                    },
                );
            }
        }
    }

    /// Applies one call's result; returns the epoch of the opening it caused, if it opened.
    fn on_result(&self, epoch: u64, probe: bool, failed: bool) -> Option<u64> {
        let mut inner = self.lock();
        if inner.epoch != epoch {
            return None;
        }
        match (&inner.phase, probe, failed) {
            (Phase::Closed, _, false) => {
                inner.consecutive.record_success();
                inner.rate.record_success();
                inner.consecutive_count = 0;
            }
            (Phase::Closed, _, true) => {
                inner.consecutive_count = inner.consecutive_count.saturating_add(1);
                // Both policies must see the failure, so no short-circuit `||`.
                let by_count = inner.consecutive.mark_dead_on_failure().is_some();
                let by_rate = inner.rate.mark_dead_on_failure().is_some();
                if by_count | by_rate {
                    self.open(&mut inner);
                    return Some(inner.epoch);
                }
            }
            (Phase::HalfOpen { .. }, true, false) => self.close(&mut inner),
            (Phase::HalfOpen { .. }, true, true) => {
                self.open(&mut inner);
                return Some(inner.epoch);
            }
            // Only probes speak while half-open; nothing is admitted while open.
            (Phase::HalfOpen { .. }, false, _) | (Phase::Open { .. }, _, _) => {}
        }
        None
    }

    /// Installs the active health probe (used only when `probe_path` is configured; the
    /// pipeline supplies it because only it knows the upstream's URL and client).
    pub fn set_health_probe(&self, check: HealthCheck) {
        if self.config.enabled && self.config.probe_path.is_some() {
            let _ = self.health.set(check);
        }
    }

    /// Spawns the probe loop for the opening `epoch`: every `probe_interval` while the breaker
    /// is still in that opening, ask the upstream; the first healthy answer moves it to
    /// half-open, so the next real call (a probe with its usual limits) can close it. One loop
    /// per opening; it ends with the opening, whatever ended it (open time over, reset).
    fn start_health_probe(breaker: &Arc<Breaker>, epoch: u64) {
        let Some(check) = breaker.health.get().cloned() else {
            return;
        };
        // Outside a runtime (never in the gateway) there is nothing to run the loop on.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let breaker = breaker.clone();
        let interval = breaker.config.probe_interval.0;
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                if !breaker.is_open_in(epoch) {
                    return;
                }
                let healthy = tokio::time::timeout(interval, check())
                    .await
                    .unwrap_or(false);
                metrics::counter!("gateway_circuit_breaker_health_probes_total",
                    "upstream" => breaker.upstream.clone(),
                    "result" => if healthy { "healthy" } else { "unhealthy" })
                .increment(1);
                if healthy {
                    breaker.health_probe_passed(epoch);
                    return;
                }
            }
        });
    }

    /// Still open, in the opening `epoch`.
    fn is_open_in(&self, epoch: u64) -> bool {
        let mut inner = self.lock();
        self.advance(&mut inner, Instant::now());
        inner.epoch == epoch && matches!(inner.phase, Phase::Open { .. })
    }

    fn health_probe_passed(&self, epoch: u64) {
        let mut inner = self.lock();
        self.advance(&mut inner, Instant::now());
        if inner.epoch == epoch && matches!(inner.phase, Phase::Open { .. }) {
            tracing::info!(upstream = %self.upstream, "health probe passed before the open time ran out");
            self.transition(
                &mut inner,
                Phase::HalfOpen {
                    probes_in_flight: 0,
                },
            );
        }
    }

    fn release_probe(&self, epoch: u64) {
        let mut inner = self.lock();
        if inner.epoch != epoch {
            return;
        }
        if let Phase::HalfOpen { probes_in_flight } = &mut inner.phase {
            *probes_in_flight = probes_in_flight.saturating_sub(1);
        }
    }

    fn open(&self, inner: &mut Inner) {
        inner.openings_in_a_row = inner.openings_in_a_row.saturating_add(1);
        inner.opened_total += 1;
        let open_for = open_duration(
            self.config.open_base.0,
            self.config.open_max.0,
            inner.openings_in_a_row,
        );
        let until = instant_after(Instant::now(), open_for);
        self.transition(inner, Phase::Open { until });
        tracing::warn!(
            upstream = %self.upstream,
            open_ms = open_for.as_millis() as u64,
            consecutive_failures = inner.consecutive_count,
            "circuit breaker opened"
        );
    }

    fn close(&self, inner: &mut Inner) {
        inner.consecutive.revived();
        inner.rate.revived();
        inner.consecutive_count = 0;
        inner.openings_in_a_row = 0;
        if !matches!(inner.phase, Phase::Closed) {
            self.transition(inner, Phase::Closed);
            tracing::info!(upstream = %self.upstream, "circuit breaker closed");
        }
    }

    fn transition(&self, inner: &mut Inner, to: Phase) {
        let state = to.state();
        inner.phase = to;
        inner.epoch += 1;
        if state == BreakerState::HalfOpen {
            tracing::info!(upstream = %self.upstream, "circuit breaker half-open: probing");
        }
        metrics::counter!("gateway_circuit_breaker_transitions_total",
            "upstream" => self.upstream.clone(), "to" => state.as_str())
        .increment(1);
        self.report_state(state);
    }

    /// `gateway_circuit_breaker_state{upstream,state}`: 1 for the current state, 0 for the
    /// others (the one convention for states: the limiter's backend gauge is the same).
    fn report_state(&self, state: BreakerState) {
        for s in BreakerState::ALL {
            metrics::gauge!("gateway_circuit_breaker_state",
                "upstream" => self.upstream.clone(), "state" => s.as_str())
            .set(if s == state { 1.0 } else { 0.0 });
        }
    }
}

/// The breaker's permit for one call, kept in the call's `Extensions` across its attempts
/// (an `Arc`, so a hedged attempt's copy shares it) and recorded once when the call ends.
#[derive(Clone, Debug, Default)]
pub(crate) struct CallPermit(Arc<Mutex<Option<Permit>>>);

impl CallPermit {
    fn slot(&self) -> MutexGuard<'_, Option<Permit>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records the call's final outcome with the breaker: `failed` as for
    /// `Outcome::breaker_failure`; `None` records nothing (and frees a probe slot).
    pub(crate) fn finish(&self, failed: Option<bool>) {
        let permit = self.slot().take();
        if let (Some(permit), Some(failed)) = (permit, failed) {
            permit.record(failed);
        }
    }
}

/// The breaker as a reqwest-middleware layer: asks the breaker before every attempt (fast
/// refusal while open) and leaves the recording to the end of the call.
///
/// The permit is kept in the call's [`CallPermit`], and [`Pipeline::send`] records ONE
/// outcome per client call once the retry layer is done: a call that a retry saved is not an
/// upstream failure as far as the breaker is concerned. Counting attempts instead would turn a
/// partial brownout into a full outage: with a share `p` of attempts failing, `N` failures in
/// a row come every ~1/p^N attempts, while `N` failed calls in a row need
/// `N * (max_retries + 1)` failed attempts.
///
/// [`Pipeline::send`]: super::pipeline::Pipeline::send
pub(crate) struct BreakerLayer {
    pub(crate) breaker: Arc<Breaker>,
}

#[async_trait::async_trait]
impl Middleware for BreakerLayer {
    async fn handle(
        &self,
        req: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        let permit = extensions
            .get::<CallPermit>()
            .ok_or_else(|| reqwest_middleware::Error::middleware(NoCall))?;
        self.breaker
            .admit_attempt(&mut permit.slot())
            .map_err(reqwest_middleware::Error::middleware)?;
        next.run(req, extensions).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::config::Dur;

    fn fail(b: &Arc<Breaker>) {
        b.try_acquire().expect("admitted").record(true);
    }
    fn succeed(b: &Arc<Breaker>) {
        b.try_acquire().expect("admitted").record(false);
    }
    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }
    /// Open time just chosen (the clock is paused, so none of it has elapsed yet).
    fn open_for(b: &Arc<Breaker>) -> Duration {
        b.try_acquire().expect_err("open").retry_after
    }
    fn in_jitter_bounds(d: Duration, planned: f64) -> bool {
        d >= secs(planned * 0.8) && d <= secs(planned)
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_a_success_resets_the_count() {
        let b = Arc::new(Breaker::new("t", &BreakerConfig::default()));
        for _ in 0..4 {
            fail(&b);
        }
        succeed(&b);
        for _ in 0..4 {
            fail(&b);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.snapshot().consecutive_failures, 4);
        fail(&b);
        assert_eq!(b.state(), BreakerState::Open);
        let open = open_for(&b);
        assert!(in_jitter_bounds(open, 5.0), "{open:?}");
        let snap = b.snapshot();
        assert_eq!(snap.opened_count, 1);
        assert!(snap.seconds_until_probe.is_some_and(|s| s > 0.0));
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_failure_rate_only_with_the_minimum_volume() {
        let b = Arc::new(Breaker::new("t", &BreakerConfig::default()));
        // success, failure, ... never 5 in a row; 50% failures.
        for _ in 0..9 {
            succeed(&b);
            fail(&b);
        }
        succeed(&b);
        // 19 calls, 9 failures: under the 20-call minimum.
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b);
        // 20 calls, 10 failures = 50%.
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn failure_rate_forgets_calls_older_than_the_window() {
        let b = Arc::new(Breaker::new("t", &BreakerConfig::default()));
        for _ in 0..9 {
            succeed(&b);
            fail(&b);
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(b.snapshot().window_calls, 0);
        succeed(&b);
        fail(&b);
        succeed(&b);
        fail(&b);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(
            (b.snapshot().window_calls, b.snapshot().window_failures),
            (4, 2)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn open_time_grows_with_jitter_up_to_the_cap_and_resets_after_a_close() {
        let b = Arc::new(Breaker::new("t", &BreakerConfig::default()));
        for _ in 0..5 {
            fail(&b);
        }
        for planned in [5.0, 10.0, 20.0, 40.0, 60.0, 60.0] {
            let open = open_for(&b);
            assert!(in_jitter_bounds(open, planned), "{open:?} for {planned}");
            tokio::time::advance(open).await;
            assert_eq!(b.state(), BreakerState::HalfOpen);
            // The failed probe re-opens it for longer.
            fail(&b);
            assert_eq!(b.state(), BreakerState::Open);
        }
        tokio::time::advance(Duration::from_secs(60)).await;
        succeed(&b);
        assert_eq!(b.state(), BreakerState::Closed);
        for _ in 0..5 {
            fail(&b);
        }
        assert!(in_jitter_bounds(open_for(&b), 5.0));
    }

    #[test]
    fn open_duration_jitter_stays_in_bounds_and_varies() {
        let base = Duration::from_secs(5);
        let max = Duration::from_secs(60);
        let samples: Vec<Duration> = (0..1000).map(|_| open_duration(base, max, 1)).collect();
        assert!(samples.iter().all(|d| in_jitter_bounds(*d, 5.0)));
        let spread = *samples.iter().max().unwrap() - *samples.iter().min().unwrap();
        assert!(spread > Duration::from_millis(500), "no jitter: {spread:?}");
        // Far past the cap (and past any overflow) it stays at the cap.
        assert!(in_jitter_bounds(open_duration(base, max, 40), 60.0));
        assert!(in_jitter_bounds(open_duration(base, max, u32::MAX), 60.0));
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_one_probe_at_a_time_under_concurrency() {
        let b = Arc::new(Breaker::new("t", &BreakerConfig::default()));
        for _ in 0..5 {
            fail(&b);
        }
        tokio::time::advance(open_for(&b)).await;
        let admitted = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (b, admitted) = (b.clone(), admitted.clone());
                tokio::spawn(async move {
                    match b.try_acquire() {
                        Ok(probe) => {
                            admitted.fetch_add(1, Ordering::SeqCst);
                            // A slow probe: everyone else arrives while it is in flight.
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            probe.record(false);
                        }
                        Err(open) => assert!(open.retry_after > Duration::ZERO),
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task");
        }
        assert_eq!(admitted.load(Ordering::SeqCst), 1);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_probe_frees_its_slot() {
        let b = Arc::new(Breaker::new("t", &BreakerConfig::default()));
        for _ in 0..5 {
            fail(&b);
        }
        tokio::time::advance(open_for(&b)).await;
        let probe = b.try_acquire().expect("probe");
        assert!(b.try_acquire().is_err());
        drop(probe);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        succeed(&b);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_from_before_the_opening_cannot_close_it() {
        let b = Arc::new(Breaker::new("t", &BreakerConfig::default()));
        let slow = b.try_acquire().expect("closed");
        for _ in 0..5 {
            fail(&b);
        }
        tokio::time::advance(open_for(&b)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        slow.record(false);
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    /// One client call as the pipeline makes it: `attempts[i]` says whether attempt `i` fails;
    /// the call stops at its first success (the retry layer) and the breaker records the final
    /// attempt once. `None` when the breaker refused an attempt (nothing is recorded then).
    fn call(b: &Arc<Breaker>, attempts: &[bool]) -> Option<bool> {
        let mut held = None;
        let mut last = None;
        for &failed in attempts {
            b.admit_attempt(&mut held).ok()?;
            last = Some(failed);
            if !failed {
                break;
            }
        }
        if let (Some(permit), Some(failed)) = (held, last) {
            permit.record(failed);
        }
        last
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_saved_by_a_retry_is_one_success() {
        let b = Arc::new(Breaker::new("t", &BreakerConfig::default()));
        for _ in 0..100 {
            assert_eq!(call(&b, &[true, true, false]), Some(false));
        }
        let snap = b.snapshot();
        assert_eq!(snap.state, BreakerState::Closed);
        // 100 calls (not 300 attempts), none failed.
        assert_eq!((snap.window_calls, snap.window_failures), (100, 0));
        assert_eq!(snap.consecutive_failures, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn thirty_percent_failed_attempts_behind_retries_do_not_trip_it() {
        use rand::{rngs::StdRng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(7);
        let per_call = Arc::new(Breaker::new("calls", &BreakerConfig::default()));
        // The same attempts, each counted as if it were a call: what the breaker did before.
        let per_attempt = Arc::new(Breaker::new("attempts", &BreakerConfig::default()));
        for max_retries in [2usize, 3] {
            for _ in 0..5_000 {
                let attempts: Vec<bool> = (0..=max_retries).map(|_| rng.random_bool(0.3)).collect();
                call(&per_call, &attempts);
                for &failed in &attempts {
                    if let Ok(p) = per_attempt.try_acquire() {
                        p.record(failed);
                    }
                    if !failed {
                        break;
                    }
                }
                // Let any open time run out, so the per-attempt breaker keeps being tested.
                tokio::time::advance(Duration::from_millis(1)).await;
            }
        }
        assert_eq!(per_call.snapshot().opened_count, 0);
        assert_eq!(per_call.state(), BreakerState::Closed);
        // A run of 5 failed attempts comes about every 1 / 0.3^5 = 412 attempts.
        assert!(per_attempt.snapshot().opened_count > 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hard_down_upstream_trips_it_after_n_failed_calls() {
        let b = Arc::new(Breaker::new("t", &BreakerConfig::default()));
        for n in 1..=4 {
            assert_eq!(call(&b, &[true, true, true]), Some(true));
            assert_eq!(b.state(), BreakerState::Closed);
            assert_eq!(b.snapshot().consecutive_failures, n);
        }
        assert_eq!(call(&b, &[true, true, true]), Some(true));
        assert_eq!(b.state(), BreakerState::Open);
        // Refused at the first attempt: no upstream call at all.
        assert_eq!(call(&b, &[false]), None);
        assert!(in_jitter_bounds(open_for(&b), 5.0));
    }

    #[tokio::test(start_paused = true)]
    async fn an_opening_stops_the_retries_of_calls_in_flight() {
        let b = Arc::new(Breaker::new("t", &BreakerConfig::default()));
        let mut held = None;
        b.admit_attempt(&mut held).expect("closed");
        for _ in 0..5 {
            call(&b, &[true]);
        }
        assert_eq!(b.state(), BreakerState::Open);
        // The call's retry asks again and is refused; its old permit is gone.
        assert!(b.admit_attempt(&mut held).is_err());
        assert!(held.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_open_probe_keeps_its_slot_for_its_retries_and_decides_once() {
        let b = Arc::new(Breaker::new("t", &BreakerConfig::default()));
        for _ in 0..5 {
            call(&b, &[true]);
        }
        tokio::time::advance(open_for(&b)).await;
        // A failed probe call (all its attempts failed) re-opens.
        let mut probe = None;
        b.admit_attempt(&mut probe).expect("probe");
        assert!(b.admit_attempt(&mut None).is_err(), "one probe at a time");
        b.admit_attempt(&mut probe).expect("the probe's own retry");
        probe.take().expect("held").record(true);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.snapshot().opened_count, 2);

        // A probe call that a retry saved closes it.
        tokio::time::advance(open_for(&b)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(call(&b, &[true, false]), Some(false));
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn the_failure_rate_window_counts_calls() {
        let b = Arc::new(Breaker::new("t", &BreakerConfig::default()));
        // Alternate a call that succeeds and one whose three attempts all fail: 50% of calls.
        for _ in 0..9 {
            call(&b, &[false]);
            call(&b, &[true, true, true]);
        }
        call(&b, &[false]);
        let snap = b.snapshot();
        assert_eq!((snap.window_calls, snap.window_failures), (19, 9));
        assert_eq!(
            snap.state,
            BreakerState::Closed,
            "19 calls: under min_calls"
        );
        call(&b, &[true, true, true]);
        assert_eq!(b.state(), BreakerState::Open, "20 calls, 10 failed");
    }

    /// A breaker with a health probe every 100 ms (open time 5 s) whose answer the test sets;
    /// the counter says how often it was asked.
    fn probed() -> (
        Arc<Breaker>,
        Arc<std::sync::atomic::AtomicBool>,
        Arc<AtomicUsize>,
    ) {
        use std::sync::atomic::AtomicBool;
        let config = BreakerConfig {
            probe_path: Some("/health".into()),
            probe_interval: Dur::from_millis(100),
            ..BreakerConfig::default()
        };
        let b = Arc::new(Breaker::new("t", &config));
        let healthy = Arc::new(AtomicBool::new(false));
        let asked = Arc::new(AtomicUsize::new(0));
        let (h, a) = (healthy.clone(), asked.clone());
        b.set_health_probe(Arc::new(move || {
            a.fetch_add(1, Ordering::SeqCst);
            let answer = h.load(Ordering::SeqCst);
            Box::pin(async move { answer })
        }));
        (b, healthy, asked)
    }

    /// Lets spawned probe loops run up to `d` of (paused) time.
    async fn run_for(d: Duration) {
        tokio::time::sleep(d).await;
    }

    #[tokio::test(start_paused = true)]
    async fn while_open_the_health_probe_goes_half_open_within_one_interval_of_recovery() {
        let (b, healthy, asked) = probed();
        for _ in 0..5 {
            call(&b, &[true]);
        }
        assert_eq!(b.state(), BreakerState::Open);
        run_for(Duration::from_millis(350)).await;
        // Asked every 100 ms, the upstream is still down: open, 4 s or more to go.
        assert_eq!(asked.load(Ordering::SeqCst), 3);
        assert_eq!(b.state(), BreakerState::Open);
        healthy.store(true, Ordering::SeqCst);
        run_for(Duration::from_millis(100)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(asked.load(Ordering::SeqCst), 4);
        // Half-open as usual: one real call probes, the others fail fast, and the probe's
        // success closes the breaker.
        let mut probe = None;
        b.admit_attempt(&mut probe).expect("the probe call");
        assert!(b.try_acquire().is_err());
        probe.take().expect("probe").record(false);
        assert_eq!(b.state(), BreakerState::Closed);
        // The loop ended with its opening: no more questions while closed.
        run_for(Duration::from_secs(1)).await;
        assert_eq!(asked.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_call_after_a_healthy_answer_reopens_and_probing_resumes() {
        let (b, healthy, asked) = probed();
        healthy.store(true, Ordering::SeqCst);
        for _ in 0..5 {
            call(&b, &[true]);
        }
        run_for(Duration::from_millis(150)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        // The health endpoint says yes but the API still fails: re-open, probe again.
        assert_eq!(call(&b, &[true, true]), Some(true));
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.snapshot().opened_count, 2);
        let before = asked.load(Ordering::SeqCst);
        run_for(Duration::from_millis(150)).await;
        assert_eq!(asked.load(Ordering::SeqCst), before + 1);
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn probing_stops_when_the_opening_ends_and_is_off_without_probe_path() {
        let (b, _healthy, asked) = probed();
        for _ in 0..5 {
            call(&b, &[true]);
        }
        run_for(Duration::from_millis(250)).await;
        assert_eq!(asked.load(Ordering::SeqCst), 2);
        b.reset();
        run_for(Duration::from_secs(2)).await;
        assert_eq!(asked.load(Ordering::SeqCst), 2, "probed after the reset");

        // Without probe_path the breaker ignores a health check and waits out its open time.
        let plain = Arc::new(Breaker::new("t", &BreakerConfig::default()));
        let asked = Arc::new(AtomicUsize::new(0));
        let a = asked.clone();
        plain.set_health_probe(Arc::new(move || {
            a.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { true })
        }));
        for _ in 0..5 {
            call(&plain, &[true]);
        }
        run_for(Duration::from_secs(3)).await;
        assert_eq!(plain.state(), BreakerState::Open);
        assert_eq!(asked.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn reset_closes_and_forgets() {
        let b = Arc::new(Breaker::new("t", &BreakerConfig::default()));
        for _ in 0..5 {
            fail(&b);
        }
        b.reset();
        let snap = b.snapshot();
        assert_eq!(snap.state, BreakerState::Closed);
        assert_eq!((snap.consecutive_failures, snap.window_calls), (0, 0));
        assert_eq!(snap.seconds_until_probe, None);
        assert_eq!(snap.opened_count, 1);
        for _ in 0..5 {
            fail(&b);
        }
        assert!(in_jitter_bounds(open_for(&b), 5.0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_disabled_breaker_never_opens() {
        let config = BreakerConfig {
            enabled: false,
            ..BreakerConfig::default()
        };
        let b = Arc::new(Breaker::new("t", &config));
        for _ in 0..100 {
            fail(&b);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(!b.snapshot().enabled);
    }

    #[test]
    fn snapshot_serializes_for_admin() {
        let b = Arc::new(Breaker::new("storage", &BreakerConfig::default()));
        let json = serde_json::to_value(b.snapshot()).expect("json");
        assert_eq!(json["upstream"], "storage");
        assert_eq!(json["state"], "closed");
        assert_eq!(json["seconds_until_probe"], serde_json::Value::Null);
    }
}
