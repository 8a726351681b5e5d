//! The gateway protects itself: when its own process is saturated, new routed requests are
//! refused at once (503 `overloaded`, `Retry-After`) instead of joining a queue it cannot
//! serve in time, so what it does serve stays fast and `/health`, `/ready`, `/metrics` keep
//! answering (issue 24 item 5).
//!
//! Two signals. The runtime's scheduling delay ([`crate::observability::lag`]): when it
//! stays at or above `lag_threshold` for `lag_for`, the process has more work than CPU (a
//! flood, a CPU quota, a starved host), and every request already waits that long before its
//! first instruction runs. And the requests in flight against a cap derived from the memory
//! limit, like the connection caps: past it, more requests would only hold memory.
//!
//! The lag drives an admission limit on requests in flight, a multiplicative-decrease /
//! additive-increase controller ([`Controller`]): while saturated, the limit is cut to 90% of
//! what is in flight every 100 ms (so the work admitted shrinks until the runtime keeps up);
//! otherwise it grows by a sixteenth a tick (doubling in about 0.12 s) back to the cap. A refusal
//! costs a counter and a small JSON answer, far less than the proxying it saves, so shedding
//! gives the runtime its time back. An on/off switch ("refuse everything while late") was the
//! alternative: it admits a burst as soon as the lag falls, which brings the lag back.
//!
//! The check runs after the route is matched and before anything else (identity, rate limit,
//! the body): built-in answers (`/health`, the docs) and the admin listener are never refused.
//!
//! Readiness, opt in (`ready_lag_threshold`): `/ready` answers 503 while the delay, averaged
//! over about `ready_lag_for`, is at or above that threshold, so an orchestrator takes a
//! starved replica out of its load balancer (issue 25 item 4: a replica at 0.05 CPU answered
//! `/ready` 200 throughout).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::SaturationConfig;
use crate::error::GatewayError;

/// The smallest admission limit: a saturated gateway still serves a few requests at a time
/// (a limit of 0 would learn nothing when the saturation ends).
pub const MIN_LIMIT: usize = 4;

/// The rules of [`Controller`], from `[server.saturation]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    pub threshold: Duration,
    pub sustain: Duration,
    /// `Duration::ZERO`: no readiness rule.
    pub ready_threshold: Duration,
    pub ready_sustain: Duration,
}

impl Rules {
    pub fn of(cfg: &SaturationConfig) -> Rules {
        Rules {
            threshold: cfg.lag_threshold.0,
            sustain: cfg.lag_for.0,
            ready_threshold: cfg.ready_lag_threshold.0,
            ready_sustain: cfg.ready_lag_for.0,
        }
    }
}

/// "At or above a threshold for a while": since when every sample has been, counted from the
/// moment the first late tick was due (the backlog it waited behind started at least then).
/// Any tick on time ends it: shedding is for a backlog that lasts, not for a process that is
/// paused now and then (the readiness rule looks at an average instead).
#[derive(Clone, Copy, Debug, Default)]
struct Sustained {
    since: Option<Instant>,
}

impl Sustained {
    /// Takes one sample; whether the delay has now been at or above `threshold` for `sustain`.
    fn sample(
        &mut self,
        now: Instant,
        lag: Duration,
        threshold: Duration,
        sustain: Duration,
    ) -> bool {
        if threshold.is_zero() || lag < threshold {
            self.since = None;
            return false;
        }
        let since = *self
            .since
            .get_or_insert(now.checked_sub(lag).unwrap_or(now));
        now.duration_since(since) >= sustain
    }
}

/// The decision after one tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Requests in flight admitted from now on.
    pub limit: usize,
    /// The delay has been over `lag_threshold` for `lag_for`.
    pub saturated: bool,
    /// The readiness rule holds (`/ready` 503): the delay averaged over `ready_lag_for` is at
    /// or above `ready_lag_threshold`.
    pub not_ready: bool,
}

/// The lag arithmetic and the admission limit, free of clocks and atomics (tested with a
/// paused clock).
#[derive(Debug)]
pub struct Controller {
    limit: f64,
    shed: Sustained,
    /// The delay averaged over time (seconds; an exponential average whose time constant is
    /// `ready_lag_for`), for the readiness rule. An average, not "every tick late": a replica
    /// starved by a CPU quota runs at the start of each CFS period and is frozen for the rest,
    /// so its ticks alternate between a period late and on time, and no run of late ticks
    /// lasts; its average delay is most of a period.
    ready_avg: f64,
    /// When the last tick was taken (the average weighs each sample by the time it covers).
    last: Option<Instant>,
    /// When the limit was last cut: at most once per [`CUT_EVERY`], however many ticks come.
    last_cut: Option<Instant>,
}

/// The most one delay sample counts for the readiness average, in thresholds: from there the
/// average falls back under the threshold within ln(4) = 1.4 time constants of on-time ticks.
const READY_SAMPLE_CAP: f64 = 4.0;

/// While saturated, the limit is cut at most this often: each cut needs time to show in the
/// delay (the requests already admitted still run), and a late runtime's ticks bunch up.
pub const CUT_EVERY: Duration = Duration::from_millis(100);

impl Controller {
    pub fn new(cap: usize) -> Controller {
        Controller {
            limit: cap as f64,
            shed: Sustained::default(),
            ready_avg: 0.0,
            last: None,
            last_cut: None,
        }
    }

    /// One tick: `lag` measured at `now`, `in_flight` requests admitted, `cap` the hard cap.
    pub fn tick(
        &mut self,
        rules: &Rules,
        now: Instant,
        lag: Duration,
        in_flight: usize,
        cap: usize,
    ) -> Verdict {
        let saturated = self.shed.sample(now, lag, rules.threshold, rules.sustain);
        let covered = self
            .last
            .map_or(crate::observability::lag::TICK, |t| now.duration_since(t));
        self.last = Some(now);
        let weight = if rules.ready_sustain.is_zero() {
            1.0
        } else {
            1.0 - (-covered.as_secs_f64() / rules.ready_sustain.as_secs_f64()).exp()
        };
        // One sample counts at most READY_SAMPLE_CAP thresholds: the rule asks whether the
        // delay STAYS above the threshold, and a multi-second stall of a starved replica
        // otherwise held the average up for several time constants after the starvation
        // ended (chaos 20: /ready 503 for 5.6 s after the CPU cap was lifted, every tick on
        // time).
        let most = rules.ready_threshold.as_secs_f64() * READY_SAMPLE_CAP;
        let sample = if most > 0.0 {
            lag.as_secs_f64().min(most)
        } else {
            lag.as_secs_f64()
        };
        self.ready_avg += (sample - self.ready_avg) * weight;
        let not_ready = !rules.ready_threshold.is_zero()
            && self.ready_avg >= rules.ready_threshold.as_secs_f64();
        let floor = MIN_LIMIT.min(cap) as f64;
        let cut_due = self
            .last_cut
            .is_none_or(|t| now.duration_since(t) >= CUT_EVERY);
        if saturated && cut_due {
            // From what is in flight, not from the old limit: at the first saturated tick the
            // limit is usually the cap, far above the work that saturates the runtime.
            self.limit = (self.limit.min(in_flight as f64) * 0.9).max(floor);
            self.last_cut = Some(now);
        } else if lag < rules.threshold {
            self.limit = (self.limit + (self.limit / 16.0).max(2.0)).min(cap as f64);
        }
        // Late but not yet for long enough, or cut a moment ago: hold.
        self.limit = self.limit.clamp(floor, cap as f64);
        Verdict {
            limit: self.limit as usize,
            saturated,
            not_ready,
        }
    }
}

/// The process's saturation state, shared by every request and kept across reloads (a
/// reload only changes its rules). The monitor task ends when the last handle is dropped.
pub struct Saturation {
    /// Routed requests admitted and not yet answered (their handler has not returned).
    in_flight: AtomicUsize,
    /// Requests in flight admitted at once now ([`Controller`]'s limit, at most the cap).
    limit: AtomicUsize,
    /// The hard cap: `max_in_flight`, or derived from the memory limit.
    cap: AtomicUsize,
    /// `[server.saturation] enabled`: refuse at all (the counts and the lag are kept anyway).
    enabled: AtomicBool,
    /// The readiness rule holds.
    not_ready: AtomicBool,
    /// The scheduling delay of the last tick, in microseconds (for `/ready`'s body).
    last_lag_us: AtomicU64,
    /// `Retry-After` on a refusal, in milliseconds.
    retry_after_ms: AtomicU64,
    /// The controller's rules, read by the monitor at each tick.
    rules: Mutex<Rules>,
}

impl Saturation {
    /// The state for `cfg` with `cap` requests in flight at most (`max_in_flight`, or what
    /// the memory limit leaves room for: `server::memory::request_budget`), its monitor
    /// started on the current runtime.
    pub fn start(cfg: &SaturationConfig, cap: usize) -> Arc<Saturation> {
        let state = Arc::new(Saturation {
            in_flight: AtomicUsize::new(0),
            limit: AtomicUsize::new(cap),
            cap: AtomicUsize::new(cap),
            enabled: AtomicBool::new(cfg.enabled),
            not_ready: AtomicBool::new(false),
            last_lag_us: AtomicU64::new(0),
            retry_after_ms: AtomicU64::new(cfg.retry_after.0.as_millis() as u64),
            rules: Mutex::new(Rules::of(cfg)),
        });
        tokio::spawn(monitor(Arc::downgrade(&state), cap));
        state
    }

    /// Applies a reloaded `[server.saturation]` and cap.
    pub fn configure(&self, cfg: &SaturationConfig, cap: usize) {
        self.cap.store(cap, Ordering::Relaxed);
        self.enabled.store(cfg.enabled, Ordering::Relaxed);
        self.retry_after_ms
            .store(cfg.retry_after.0.as_millis() as u64, Ordering::Relaxed);
        *self.rules.lock().unwrap_or_else(|p| p.into_inner()) = Rules::of(cfg);
    }

    /// Admits one routed request, or refuses it (`route` labels the count of refusals). The
    /// returned guard is the request's place in flight until dropped.
    pub fn admit(&self, route: &str) -> Result<Admitted<'_>, GatewayError> {
        let n = self.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        if n > self.limit.load(Ordering::Relaxed) && self.enabled.load(Ordering::Relaxed) {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            record_shed(route);
            return Err(GatewayError::GatewaySaturated {
                retry_after: Duration::from_millis(self.retry_after_ms.load(Ordering::Relaxed)),
            });
        }
        Ok(Admitted(self))
    }

    /// The readiness rule holds: `/ready` should answer 503.
    pub fn not_ready(&self) -> bool {
        self.not_ready.load(Ordering::Relaxed)
    }

    /// What `/ready` shows: the last delay, requests in flight, the limit and the cap.
    pub fn snapshot(&self) -> serde_json::Value {
        serde_json::json!({
            "scheduling_delay_ms": self.last_lag_us.load(Ordering::Relaxed) as f64 / 1000.0,
            "in_flight": self.in_flight.load(Ordering::Relaxed),
            "limit": self.limit.load(Ordering::Relaxed),
            "max_in_flight": self.cap.load(Ordering::Relaxed),
            "not_ready": self.not_ready(),
        })
    }
}

/// A routed request's place in flight ([`Saturation::admit`]).
pub struct Admitted<'a>(&'a Saturation);

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Ticks the controller on every scheduling-delay sample, publishing the limit, the
/// readiness verdict and the gauges, until the state is dropped.
async fn monitor(state: Weak<Saturation>, cap: usize) {
    let mut controller = Controller::new(cap);
    let in_flight_gauge = metrics::gauge!("gateway_requests_in_flight");
    let limit_gauge = metrics::gauge!("gateway_admission_limit");
    let mut was_saturated = false;
    crate::observability::lag::watch(move |now, lag| {
        let Some(state) = state.upgrade() else {
            return false;
        };
        let rules = *state.rules.lock().unwrap_or_else(|p| p.into_inner());
        let in_flight = state.in_flight.load(Ordering::Relaxed);
        let cap = state.cap.load(Ordering::Relaxed);
        let v = controller.tick(&rules, now, lag, in_flight, cap);
        state.limit.store(v.limit, Ordering::Relaxed);
        state.not_ready.store(v.not_ready, Ordering::Relaxed);
        state
            .last_lag_us
            .store(lag.as_micros() as u64, Ordering::Relaxed);
        in_flight_gauge.set(in_flight as f64);
        limit_gauge.set(v.limit as f64);
        if v.saturated != was_saturated {
            was_saturated = v.saturated;
            if v.saturated {
                tracing::warn!(
                    scheduling_delay_ms = lag.as_secs_f64() * 1000.0,
                    in_flight,
                    limit = v.limit,
                    "gateway saturated: refusing new requests over the limit (503 overloaded)"
                );
            } else {
                tracing::info!(limit = v.limit, "gateway no longer saturated");
            }
        }
        true
    })
    .await;
}

thread_local! {
    /// `gateway_shed_total{cause="gateway_saturated"}` handles per route, per thread: a
    /// refusal must stay cheap under the flood that causes it.
    static SHED: std::cell::RefCell<crate::observability::metrics::RouteSlots<Option<metrics::Counter>>> =
        std::cell::RefCell::default();
}

/// The priority label of a refusal: routes have no priority of their own here.
const PRIORITY: &str = "default";

/// Counts one refusal in `gateway_shed_total{route,priority,cause="gateway_saturated"}`.
fn record_shed(route: &str) {
    use crate::observability::metrics::{with_kept, with_route_slot};
    SHED.with(|cache| {
        with_route_slot(cache, route, |slot| {
            with_kept(
                slot,
                || shed_counter(route),
                |c: &metrics::Counter| c.increment(1),
            )
        })
    });
}

/// The refusal counter of `route`.
pub fn shed_counter(route: &str) -> metrics::Counter {
    metrics::counter!("gateway_shed_total",
        "route" => route.to_string(), "priority" => PRIORITY, "cause" => "gateway_saturated")
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: usize = 1_000;

    /// Saturated at 10 ms late for 50 ms (the chaos configuration's tight rule); not ready at
    /// 100 ms averaged over a second.
    fn rules() -> Rules {
        Rules {
            threshold: Duration::from_millis(10),
            sustain: Duration::from_millis(50),
            ready_threshold: Duration::from_millis(100),
            ready_sustain: Duration::from_secs(1),
        }
    }

    /// Ticks every 10 ms (plus `lag`) for `for_`, with `in_flight` requests; the last verdict.
    async fn run(c: &mut Controller, lag: Duration, in_flight: usize, for_: Duration) -> Verdict {
        let end = Instant::now() + for_;
        let mut v = None;
        while Instant::now() < end {
            tokio::time::sleep(crate::observability::lag::TICK + lag).await;
            v = Some(c.tick(&rules(), Instant::now(), lag, in_flight, CAP));
        }
        v.expect("at least one tick")
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_stall_is_not_saturation_a_sustained_delay_is() {
        let mut c = Controller::new(CAP);
        // Under the threshold: nothing happens, the limit stays the cap.
        let v = run(
            &mut c,
            Duration::from_millis(5),
            300,
            Duration::from_secs(1),
        )
        .await;
        assert_eq!((v.limit, v.saturated), (CAP, false));
        // One tick 30 ms late (a pause, a CFS period), then on time: never saturated.
        let v = c.tick(
            &rules(),
            Instant::now(),
            Duration::from_millis(30),
            300,
            CAP,
        );
        assert!(!v.saturated);
        let v = run(&mut c, Duration::ZERO, 300, Duration::from_millis(100)).await;
        assert_eq!((v.limit, v.saturated), (CAP, false));
        // 20 ms late at every tick: saturated once 50 ms have passed since the first late
        // tick was due (the second tick), and the limit is cut from what is in flight.
        let first = c.tick(
            &rules(),
            Instant::now(),
            Duration::from_millis(20),
            300,
            CAP,
        );
        assert!(!first.saturated);
        tokio::time::advance(Duration::from_millis(30)).await;
        let second = c.tick(
            &rules(),
            Instant::now(),
            Duration::from_millis(20),
            300,
            CAP,
        );
        assert!(second.saturated);
        assert_eq!(second.limit, 270);
        // A single tick as late as the whole `lag_for` is saturation by itself.
        let mut c = Controller::new(CAP);
        let v = c.tick(
            &rules(),
            Instant::now(),
            Duration::from_millis(60),
            300,
            CAP,
        );
        assert!(v.saturated);
        assert_eq!(v.limit, 270);
    }

    #[tokio::test(start_paused = true)]
    async fn while_saturated_the_limit_falls_to_the_floor_and_grows_back_to_the_cap_after() {
        let mut c = Controller::new(CAP);
        let late = Duration::from_millis(40);
        // Cut to 90% of what is in flight (or of the limit, if lower), every 100 ms at most:
        // ticks 50 ms apart cut every other time.
        let v = run(&mut c, late, 100, Duration::from_millis(100)).await;
        assert!(v.saturated);
        assert_eq!(v.limit, 90);
        let v = run(&mut c, late, 100, Duration::from_millis(100)).await;
        assert_eq!(v.limit, 81);
        let v = run(&mut c, late, 100, Duration::from_secs(4)).await;
        assert_eq!(v.limit, MIN_LIMIT);
        // Back on time: at the cap within a second, even from the floor.
        let v = run(&mut c, Duration::ZERO, 0, Duration::from_secs(1)).await;
        assert_eq!((v.limit, v.saturated), (CAP, false));
    }

    #[tokio::test(start_paused = true)]
    async fn the_readiness_rule_holds_while_the_average_delay_is_over_its_threshold() {
        let mut c = Controller::new(CAP);
        let late = Duration::from_millis(150);
        // 150 ms late every tick (100 ms threshold, 1 s average): not ready after ~1.1 s.
        let v = run(&mut c, late, 0, Duration::from_millis(500)).await;
        assert!(!v.not_ready);
        let v = run(&mut c, late, 0, Duration::from_millis(800)).await;
        assert!(v.not_ready);
        // One tick on time changes little; a second of them brings it back.
        let v = run(&mut c, Duration::ZERO, 0, Duration::from_millis(10)).await;
        assert!(v.not_ready);
        let v = run(&mut c, Duration::ZERO, 0, Duration::from_secs(1)).await;
        assert!(!v.not_ready);
        // A CPU quota's pattern: one tick 90 ms late per 100 ms period, the next on time. The
        // average says starved, though most ticks are on time.
        let mut c = Controller::new(CAP);
        let at_50ms = Rules {
            ready_threshold: Duration::from_millis(50),
            ..rules()
        };
        let mut last = None;
        for _ in 0..50 {
            tokio::time::advance(Duration::from_millis(100)).await;
            c.tick(&at_50ms, Instant::now(), Duration::from_millis(90), 10, CAP);
            tokio::time::advance(Duration::from_millis(10)).await;
            last = Some(c.tick(&at_50ms, Instant::now(), Duration::ZERO, 10, CAP));
        }
        assert!(last.is_some_and(|v| v.not_ready));
        // Off (threshold 0s): never.
        let off = Rules {
            ready_threshold: Duration::ZERO,
            ..rules()
        };
        let mut c = Controller::new(CAP);
        for _ in 0..500 {
            tokio::time::advance(Duration::from_millis(200)).await;
            let v = c.tick(&off, Instant::now(), Duration::from_secs(1), 0, CAP);
            assert!(!v.not_ready);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_stall_does_not_hold_a_recovered_replica_out_of_rotation() {
        // Starved: ticks up to 2 s late (100 ms threshold, 1 s average): not ready.
        let mut c = Controller::new(CAP);
        let v = run(&mut c, Duration::from_secs(2), 0, Duration::from_secs(6)).await;
        assert!(v.not_ready);
        // Every tick on time again: ready within 1.5 time constants (ln 4 = 1.39), not the
        // ~3 (ln 20) a 2 s sample taken at full weight would take.
        let v = run(&mut c, Duration::ZERO, 0, Duration::from_millis(1500)).await;
        assert!(!v.not_ready);
    }

    #[tokio::test]
    async fn admission_counts_in_flight_and_refuses_past_the_limit() {
        let cfg = SaturationConfig {
            max_in_flight: 2,
            ..SaturationConfig::default()
        };
        let s = Saturation::start(&cfg, 2);
        let a = s.admit("/r").expect("first");
        let b = s.admit("/r").expect("second");
        let refused = s.admit("/r").err().expect("third refused");
        assert_eq!(refused.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            matches!(refused, GatewayError::GatewaySaturated { retry_after } if retry_after == Duration::from_secs(1))
        );
        drop(a);
        let c = s.admit("/r").expect("a place came free");
        drop((b, c));
        assert_eq!(s.in_flight.load(Ordering::Relaxed), 0);
        // Disabled: counted, never refused.
        s.configure(
            &SaturationConfig {
                enabled: false,
                ..cfg
            },
            2,
        );
        let held: Vec<_> = (0..5).map(|_| s.admit("/r").expect("admitted")).collect();
        assert_eq!(s.in_flight.load(Ordering::Relaxed), 5);
        drop(held);
    }
}
