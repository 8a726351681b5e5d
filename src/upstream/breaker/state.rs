//! The breaker's state machine: closed / open / half-open, one short lock, on tokio's clock.
//!
//! Closed, it counts calls against the trip rule (`trip.rs`); tripped, it opens for a time
//! from the doubling backoff (`backoff.rs`, minus up to 20% jitter so that replicas do not
//! probe in lockstep); when that runs out (or the health probe says the upstream is back)
//! it goes half-open and admits at most `half_open_probes` calls, whose result closes or
//! re-opens it. Every transition bumps an epoch, so an answer to a call admitted before it
//! cannot move the new phase.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::probe::{self, HealthCheck};
use crate::config::BreakerConfig;
use crate::upstream::backoff::Backoff;
use crate::upstream::call::{instant_after, BreakerOpen};
use crate::upstream::trip::Tripwire;

/// The largest share of a planned open time taken off at random.
const OPEN_TIME_JITTER: f64 = 0.2;

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
    /// The calls' outcomes while closed, against `consecutive_failures` and the failure rate.
    trip: Tripwire,
    /// The open time: doubles per opening in a row, back to `open_base` after a close.
    open_time: Backoff,
    opened_total: u64,
}

/// One upstream's circuit breaker. Cheap to query; all state sits behind one short lock.
pub struct Breaker {
    upstream: Arc<str>,
    config: BreakerConfig,
    inner: Mutex<Inner>,
    /// The active health probe run while open, when `probe_path` is set and the pipeline
    /// supplied the upstream's URL.
    health: OnceLock<HealthCheck>,
}

/// Permission for one client call, held across its attempts (see [`Breaker::admit_attempt`]).
/// Report the call's final result with [`Permit::record`]; dropping it unrecorded (the call was
/// cancelled, or failed for a reason of our own) frees a half-open probe slot and counts as
/// nothing.
#[derive(Debug)]
#[must_use]
pub struct Permit {
    /// Owned, so that the permit can live in the call's `CallPermit` across its attempts.
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
                trip: Tripwire::new(config.trip_rule()),
                open_time: Backoff::new(config.open_time()).with_jitter(OPEN_TIME_JITTER),
                opened_total: 0,
            }),
            health: OnceLock::new(),
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
        let (window_calls, window_failures) = inner.trip.window_counts(now);
        BreakerSnapshot {
            upstream: self.upstream.to_string(),
            enabled: self.config.enabled,
            state: inner.phase.state(),
            consecutive_failures: inner.trip.consecutive_failures(),
            window_calls,
            window_failures,
            opened_count: inner.opened_total,
            seconds_until_probe: match inner.phase {
                Phase::Open { until } => Some(until.saturating_duration_since(now).as_secs_f64()),
                Phase::Closed | Phase::HalfOpen { .. } => None,
            },
        }
    }

    /// Takes over `old`'s state: a reload rebuilt the upstream's pipeline (new settings) for
    /// the same addresses, and must neither forgive an outage nor restart its backoff (issue
    /// 25: while the upstream was down, a reload that changed a timeout cost slow 503s without
    /// `Retry-After`). An open breaker stays open until the same moment (half-open: open until
    /// now, so the next call probes); the call history and the open-time doubling carry over
    /// when the trip rule and the open times are the same. Not a transition: the transition
    /// counters do not move, the state gauge says the state.
    pub(crate) fn inherit(self: &Arc<Self>, old: &Breaker) {
        if !self.config.enabled || !old.config.enabled {
            return;
        }
        let now = Instant::now();
        let (phase, trip, open_time, opened_total) = {
            let mut before = old.lock();
            old.advance(&mut before, now);
            let phase = match before.phase {
                Phase::Closed => Phase::Closed,
                Phase::Open { until } => Phase::Open { until },
                Phase::HalfOpen { .. } => Phase::Open { until: now },
            };
            (
                phase,
                before.trip.clone(),
                before.open_time.clone(),
                before.opened_total,
            )
        };
        let opened = {
            let mut inner = self.lock();
            if self.config.trip_rule() == old.config.trip_rule() {
                inner.trip = trip;
            }
            if self.config.open_time() == old.config.open_time() {
                inner.open_time = open_time;
            }
            inner.opened_total = opened_total;
            if matches!(phase, Phase::Closed) {
                return;
            }
            inner.phase = phase;
            inner.epoch += 1;
            inner.epoch
        };
        self.report_state(BreakerState::Open);
        tracing::info!(upstream = %self.upstream, "configuration reloaded; the circuit breaker stays open");
        Breaker::start_health_probe(self, opened);
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
            (Phase::Closed, _, _) => {
                if inner.trip.record(Instant::now(), failed) {
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
    /// pipeline supplies it because only it knows the upstream's instances and clients).
    pub fn set_health_probe(&self, check: HealthCheck) {
        if self.config.enabled && self.config.probe_path.is_some() {
            let _ = self.health.set(check);
        }
    }

    /// Starts the health probe for the opening `epoch` (when there is one): it asks while
    /// the breaker is still in that opening, and its first healthy answer moves it to
    /// half-open, so the next real call (a probe with its usual limits) can close it.
    fn start_health_probe(breaker: &Arc<Breaker>, epoch: u64) {
        let Some(check) = breaker.health.get().cloned() else {
            return;
        };
        let (asking, passing) = (breaker.clone(), breaker.clone());
        probe::watch(
            breaker.upstream.clone(),
            check,
            breaker.config.probe_interval.0,
            move || asking.is_open_in(epoch),
            move || passing.health_probe_passed(epoch),
        );
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
        inner.opened_total += 1;
        let open_for = inner.open_time.next();
        let until = instant_after(Instant::now(), open_for);
        self.transition(inner, Phase::Open { until });
        tracing::warn!(
            upstream = %self.upstream,
            open_ms = open_for.as_millis() as u64,
            consecutive_failures = inner.trip.consecutive_failures(),
            "circuit breaker opened"
        );
    }

    fn close(&self, inner: &mut Inner) {
        inner.trip.reset();
        inner.open_time.reset();
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
