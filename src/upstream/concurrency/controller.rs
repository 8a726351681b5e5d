//! The arithmetic of the adaptive limit, apart from any locking or waiting, so that it can be
//! driven sample by sample on tokio's paused clock.
//!
//! A gradient controller in the style of Envoy's adaptive concurrency filter and Netflix's
//! Gradient2, against a no-load latency learnt from light load:
//!
//! - every call that got an answer is a sample: its round trip against `expected`, the
//!   no-load latency of its latency class plus `tolerance` of it plus `slack`. A class is a
//!   route: one upstream's endpoints differ (a product list in 5 ms, a chain in 100 ms), and
//!   comparing one with the other's latency would read a slow endpoint as a queue;
//! - the no-load latency is the average round trip of the calls made while at most half the
//!   limit was busy, over about `baseline_window` (the lowest round trip until there are
//!   some). An average and not the minimum: on a busy machine the luckiest call is far
//!   faster than a typical unqueued one, and then every typical call read as a queue. Calls
//!   made at or near the limit never count, so under overload it holds still, and an
//!   upstream that really became slower is learnt as soon as the load is light;
//! - once per window (`sample_window`, at least the fastest class's no-load round trip, so
//!   each change shows in the latency before the next), the limit becomes
//!   `limit * gradient`, where `gradient = expected / measured` (the mean over the window's
//!   samples) is at most 1 and at least 0.5;
//! - it grows only on what calls made at the limit (started with every slot taken) said:
//!   by one slot per such call that found no queue (doubling per round trip while nothing
//!   queues), and, when the window had such calls and none of them found a queue, by
//!   `sqrt(limit)` (headroom: a small queue at the upstream, so that its workers never idle
//!   while a slot travels back), and to half as much again if no call queued at all (slow
//!   start), so that a burst to a healthy upstream, or demand that rose, is not held back.
//!   The answers of calls made under the limit say nothing about one more slot: at a
//!   spike's start they are those the workers took at once, and growing on them let
//!   through, a round trip later, calls that queued behind the ones already too many;
//! - it grows only while the calls use it: when at most half its slots were busy in the
//!   window, it shrinks toward twice the calls seen, but not under `initial_limit` (an idle
//!   upstream otherwise kept a limit far above its demand, and the next spike went through
//!   whole, to queue at the upstream for a round trip before the latency showed it; and a
//!   burst after a quiet spell must not meet a limit of a few slots);
//! - a timed-out call counts as the worst sample (four times its class's expected
//!   round trip), an error says nothing about queueing and is no sample.
//!
//! Under a worker-limited upstream of N workers x S, the limit settles a little above N,
//! where calls made at the limit start to find a queue: for 16 x 200 ms under a 3x-5x spike
//! the harness (`spike.rs`) shows limits of 15-28 after the first second and successes' p99
//! of 1.35-2.3 S, whatever N and S are (nothing here knows them).

use std::time::Duration;

use tokio::time::Instant;

use crate::config::ConcurrencyConfig;

/// The worst a sample can say (a timeout, or a round trip this many times the expected one):
/// beyond it, a sample would outweigh a whole window of good ones.
const WORST: f64 = 4.0;
/// The gradient's floor: the limit at most halves per window.
const MIN_GRADIENT: f64 = 0.5;
/// Latency classes remembered per upstream (routes); more share the last one.
const MAX_CLASSES: usize = 64;
/// Growth per window while nothing queues at the upstream.
const SLOW_START: f64 = 1.5;
/// What an application-limited window keeps of the limit, at least.
const IDLE_DECAY: f64 = 0.9;
/// The longest window, whatever the upstream's latency.
const MAX_WINDOW: Duration = Duration::from_secs(1);

/// One of `shares` parts of `initial_limit` (rounded up), within the bounds.
fn share(cfg: &ConcurrencyConfig, max_connections: usize, shares: usize) -> f64 {
    let (min, max) = cfg.bounds(max_connections);
    cfg.initial_limit.div_ceil(shares.max(1)).clamp(min, max) as f64
}

/// What one call says about the upstream.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sample {
    /// An answer (not a 5xx) after this round trip, to response headers.
    Answered(Duration),
    /// No answer in time.
    TimedOut,
}

/// One latency class's no-load baseline.
#[derive(Debug)]
struct Baseline {
    class: u32,
    /// The no-load round trip: the average of calls made at most half busy, over about
    /// `baseline_window`; until such calls were seen, the lowest round trip.
    latency: Duration,
    /// Windows with light calls averaged into `latency` so far (0: not learnt yet).
    windows: u32,
    /// Light calls since the last window closed: sum of their round trips, in seconds...
    light_sum: f64,
    /// ...and how many.
    light_calls: u32,
}

/// The samples of the current window.
#[derive(Debug)]
struct Window {
    started: Instant,
    /// Sum of measured / expected.
    sum: f64,
    samples: u32,
    /// Most slots held at once by the window's calls.
    peak_in_flight: usize,
    /// Calls of the window that started with every slot taken...
    at_limit: u32,
    /// ...and how many of them found a queue at the upstream.
    at_limit_queued: u32,
}

/// The adaptive limit of one upstream.
#[derive(Debug)]
pub struct Controller {
    limit: f64,
    min_limit: f64,
    max_limit: f64,
    /// An idle limit shrinks no further than `initial_limit` (this instance's share of it): a
    /// burst to a healthy upstream after a quiet spell (market open) must not meet a limit of
    /// a few slots.
    idle_floor: f64,
    /// How many share `initial_limit`: the instances in rotation times the gateway replicas.
    shares: usize,
    tolerance: f64,
    slack: Duration,
    sample_window: Duration,
    baseline_window: Duration,
    baselines: Vec<Baseline>,
    window: Window,
}

impl Controller {
    /// Starts at `initial_limit`, within `[min_limit, max_limit or max_connections]`.
    pub fn new(cfg: &ConcurrencyConfig, max_connections: usize, now: Instant) -> Controller {
        Controller::with_share(cfg, max_connections, now, 1)
    }

    /// Starts at `initial_limit / instances` (rounded up), within the bounds: one of
    /// `instances` that share the upstream's initial limit.
    pub fn with_share(
        cfg: &ConcurrencyConfig,
        max_connections: usize,
        now: Instant,
        instances: usize,
    ) -> Controller {
        let (min, max) = cfg.bounds(max_connections);
        let share = share(cfg, max_connections, instances);
        Controller {
            limit: share,
            idle_floor: share,
            shares: instances.max(1),
            min_limit: min as f64,
            max_limit: max as f64,
            tolerance: cfg.tolerance,
            slack: cfg.slack.0,
            sample_window: cfg.sample_window.0,
            baseline_window: cfg.baseline_window.0,
            baselines: Vec::new(),
            window: Window {
                started: now,
                sum: 0.0,
                samples: 0,
                peak_in_flight: 0,
                at_limit: 0,
                at_limit_queued: 0,
            },
        }
    }

    /// The limit now (whole slots).
    pub fn limit(&self) -> usize {
        self.limit as usize
    }

    /// Makes the idle floor `initial_limit / shares` (rounded up): the upstream's instances
    /// in rotation, on every gateway replica, share its initial limit, so an idle upstream
    /// of many instances, behind many replicas, does not meet the next spike with many
    /// times the limit it was configured to start at.
    /// The limit itself is not moved: an idle one falls to the new floor window by window.
    pub fn share_floor(&mut self, cfg: &ConcurrencyConfig, max_connections: usize, shares: usize) {
        self.shares = shares.max(1);
        self.idle_floor = share(cfg, max_connections, shares);
    }

    /// How many share `initial_limit` (see [`Controller::share_floor`]).
    pub fn shares(&self) -> usize {
        self.shares
    }

    /// Records one call of latency class `class` that started with `in_flight` slots held
    /// (itself included). Returns the new limit when it changed (a window closed, or the
    /// call grew it).
    pub fn record(
        &mut self,
        now: Instant,
        class: u32,
        in_flight: usize,
        sample: Sample,
    ) -> Option<usize> {
        let light = in_flight as f64 * 2.0 <= self.limit;
        let ratio = match sample {
            Sample::Answered(rtt) => {
                let base = self.baseline(class, rtt);
                if base.windows == 0 && rtt < base.latency {
                    base.latency = rtt;
                }
                if light {
                    base.light_sum += rtt.as_secs_f64();
                    base.light_calls += 1;
                }
                let expected = base.latency.mul_f64(1.0 + self.tolerance) + self.slack;
                (rtt.as_secs_f64() / expected.as_secs_f64().max(1e-6)).min(WORST)
            }
            Sample::TimedOut => WORST,
        };
        // Slow start per call: a call that started with every slot taken and found no queue
        // says the limit, not the upstream, held it back. One more slot per such answer
        // doubles the limit per round trip while the latency stays flat (a burst to a
        // healthy upstream, or a limit cut below what it serves, is not held back for many
        // windows); a queue at the upstream stops it at once.
        let at_limit = in_flight as f64 >= self.limit.floor();
        let grew = ratio <= 1.0 && at_limit && self.limit < self.max_limit;
        if grew {
            self.limit = (self.limit + 1.0).min(self.max_limit);
        }
        let window = &mut self.window;
        window.sum += ratio;
        window.samples += 1;
        window.peak_in_flight = window.peak_in_flight.max(in_flight);
        if at_limit {
            window.at_limit += 1;
            window.at_limit_queued += u32::from(ratio > 1.0);
        }
        if now.duration_since(window.started) < self.window_length() {
            return grew.then(|| self.limit());
        }
        Some(self.close_window(now))
    }

    /// The fastest class's no-load round trip, once one is known.
    pub fn fastest_round_trip(&self) -> Option<Duration> {
        self.baselines.iter().map(|b| b.latency).min()
    }

    /// The window: `sample_window`, or the fastest class's no-load round trip if longer.
    fn window_length(&self) -> Duration {
        let fastest = self.baselines.iter().map(|b| b.latency).min();
        fastest
            .map_or(self.sample_window, |rtt| rtt.max(self.sample_window))
            .min(MAX_WINDOW)
    }

    fn close_window(&mut self, now: Instant) -> usize {
        let length = self.window_length();
        self.learn_baselines(length);
        let w = &self.window;
        let measured = w.sum / f64::from(w.samples.max(1));
        let limit = self.limit;
        let gradient = (1.0 / measured.max(1e-6)).clamp(MIN_GRADIENT, 1.0);
        // Grows only on what calls made AT the limit said: the window had some, and none of
        // them found a queue. The other calls' answers say nothing about one more slot: at a
        // spike's start the first answers are those of the calls the workers took at once,
        // and growing on them (as this did) let through, a round trip later, calls that
        // queued behind those the limit had already sent too many of (a spike's first second
        // at 16 x 200 ms: successes up to 600 ms; the harness in `spike.rs`).
        let tested = w.at_limit > 0 && w.at_limit_queued == 0;
        let mut next = limit * gradient;
        if tested {
            next += limit.sqrt();
            if measured <= 1.0 {
                // Nothing queues at the upstream: grow by half at once (slow start), so a
                // limit cut below what the upstream serves, or demand that rose, is not held
                // back for many windows.
                next = next.max(limit * SLOW_START);
            }
        }
        // Application-limited: at most half the slots were busy, so the latency said
        // nothing about more. The limit does not grow, and shrinks (a tenth per window)
        // toward twice the calls seen: a limit far above the demand would let a spike through
        // whole, to queue at the upstream until the latency shows it a round trip later.
        let used = w.peak_in_flight as f64 * 2.0;
        if used <= limit {
            next = next.min(used.max(limit * IDLE_DECAY).max(self.idle_floor));
        }
        self.limit = next.clamp(self.min_limit, self.max_limit);
        self.window = Window {
            started: now,
            sum: 0.0,
            samples: 0,
            peak_in_flight: 0,
            at_limit: 0,
            at_limit_queued: 0,
        };
        self.limit()
    }

    /// `class`'s baseline (a new class starts at `rtt`).
    fn baseline(&mut self, class: u32, rtt: Duration) -> &mut Baseline {
        let i = match self.baselines.iter().position(|b| b.class == class) {
            Some(i) => i,
            None if self.baselines.len() < MAX_CLASSES => {
                self.baselines.push(Baseline {
                    class,
                    latency: rtt,
                    windows: 0,
                    light_sum: 0.0,
                    light_calls: 0,
                });
                self.baselines.len() - 1
            }
            None => self.baselines.len() - 1,
        };
        &mut self.baselines[i]
    }

    /// Averages each class's light calls of the window that ends into its baseline: a
    /// running mean at first, then a moving average over about `baseline_window`. An average,
    /// not the lowest round trip: on a busy machine the luckiest call is far faster than a
    /// typical unqueued one, and every typical call read as a queue. Windows without light
    /// calls (overload) leave it as it is.
    fn learn_baselines(&mut self, window: Duration) {
        let moving = (window.as_secs_f64() / self.baseline_window.as_secs_f64()).min(1.0);
        for base in &mut self.baselines {
            if base.light_calls == 0 {
                continue;
            }
            let mean = base.light_sum / f64::from(base.light_calls);
            base.windows = base.windows.saturating_add(1);
            let weight = (1.0 / f64::from(base.windows)).max(moving);
            let latency = base.latency.as_secs_f64() * (1.0 - weight) + mean * weight;
            base.latency = Duration::from_secs_f64(latency.max(0.0));
            base.light_sum = 0.0;
            base.light_calls = 0;
        }
    }

    /// The no-load round trip of `class`, once seen.
    #[cfg(test)]
    pub fn baseline_of(&self, class: u32) -> Option<Duration> {
        self.baselines
            .iter()
            .find(|b| b.class == class)
            .map(|b| b.latency)
    }
}
