//! Peak-EWMA load, as tower's `load::PeakEwma` and linkerd measure it: a latency estimate
//! that takes a slower sample at once and forgets it gradually, times the calls in flight.
//! Each instance carries one ([`PeakEwma`]); the P2C choice (`p2c.rs`) compares two.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// How long a latency sample counts: the estimate decays toward zero over this, so an
/// instance that was slow gets tried again (tower's and linkerd's default decay).
pub(crate) const EWMA_DECAY: Duration = Duration::from_secs(10);
/// The latency assumed for an instance with no samples yet, so a new instance is neither
/// flooded (zero) nor starved (large).
pub(crate) const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// A latency estimate without a new sample for this long no longer steers the balancer.
const STALE_AFTER: Duration = Duration::from_secs(1);

/// Peak-EWMA latency: a slower sample replaces the estimate at once, a faster one pulls it
/// down gradually; with no samples it decays toward zero (see [`EWMA_DECAY`]).
#[derive(Debug)]
struct Estimate {
    rtt_ns: f64,
    at: Instant,
    /// No sample yet: the balancer then assumes the other candidate's latency, so a new
    /// instance neither waits for the others' estimates to decay (starved) nor takes
    /// everything (flooded: calls in flight still count).
    sampled: bool,
}

impl Estimate {
    fn decayed(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_nanos() as f64;
        self.rtt_ns * (-elapsed / EWMA_DECAY.as_nanos() as f64).exp()
    }

    fn sample(&mut self, rtt: Duration, now: Instant) {
        self.sampled = true;
        let rtt = rtt.as_nanos() as f64;
        let current = self.decayed(now);
        self.rtt_ns = if rtt > current {
            rtt
        } else {
            let elapsed = now.saturating_duration_since(self.at).as_nanos() as f64;
            let weight = (-elapsed / EWMA_DECAY.as_nanos() as f64).exp();
            current * weight + rtt * (1.0 - weight)
        };
        self.at = now;
    }
}

/// One instance's load: its latency estimate and its calls in flight.
#[derive(Debug)]
pub(crate) struct PeakEwma {
    estimate: Mutex<Estimate>,
    /// Attempts sent and not finished (cancelled ones end too): the "in flight" of the cost,
    /// and what keeps a drained instance listed until its last call is done.
    in_flight: AtomicU32,
}

impl PeakEwma {
    pub(crate) fn new() -> PeakEwma {
        PeakEwma {
            estimate: Mutex::new(Estimate {
                rtt_ns: DEFAULT_RTT.as_nanos() as f64,
                at: Instant::now(),
                sampled: false,
            }),
            in_flight: AtomicU32::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Estimate> {
        self.estimate.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An attempt starts; pair with [`PeakEwma::end`].
    pub(crate) fn start(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn end(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// A successful attempt took `rtt`. Failures are not sampled: a refused connection is
    /// fast, and a fast error must not look like a fast instance (health does that steering).
    pub(crate) fn sample(&self, rtt: Duration, now: Instant) {
        self.lock().sample(rtt, now);
    }

    /// The decayed estimate in nanoseconds (for `/admin`); none until the instance answered:
    /// the assumed starting value is no measurement.
    pub(crate) fn estimate_ns(&self, now: Instant) -> Option<f64> {
        let e = self.lock();
        e.sampled.then(|| e.decayed(now))
    }

    /// The decayed latency, if the instance has answered recently. An estimate older than
    /// [`STALE_AFTER`] counts as none (the other candidate's latency is assumed): one slow
    /// answer would otherwise keep an instance out of every P2C comparison while its estimate
    /// decays for tens of seconds, and an instance that gets no traffic never gets a fresh
    /// sample (seen in chaos experiment 13: a healthy instance starved for 12 s).
    pub(crate) fn latency(&self, now: Instant) -> Option<f64> {
        let e = self.lock();
        (e.sampled && now.saturating_duration_since(e.at) < STALE_AFTER).then(|| e.decayed(now))
    }

    /// The balancer's cost: latency x (calls in flight + 1), with `assumed` as the latency of
    /// an instance that has not answered (recently).
    pub(crate) fn cost(&self, latency: Option<f64>, assumed: f64) -> f64 {
        latency.unwrap_or(assumed) * f64::from(self.in_flight() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_takes_a_slow_sample_at_once_and_forgets_it_gradually() {
        let e = PeakEwma::new();
        assert_eq!(e.estimate_ns(Instant::now()), None, "nothing measured yet");
        e.sample(ms(300), Instant::now());
        let estimate = |e: &PeakEwma| e.estimate_ns(Instant::now()).expect("sampled");
        assert!(
            (estimate(&e) - 300e6).abs() < 1.0,
            "the peak is taken at once"
        );
        // A fast sample right after moves it little (the slow one is recent)...
        tokio::time::advance(ms(10)).await;
        e.sample(ms(1), Instant::now());
        assert!(estimate(&e) > 250e6);
        // ...and with time the estimate decays toward zero (e^-1 after one decay period).
        tokio::time::advance(EWMA_DECAY).await;
        let later = estimate(&e);
        assert!(later < 120e6 && later > 80e6, "{later}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_estimate_without_fresh_samples_stops_steering() {
        let e = PeakEwma::new();
        assert_eq!(e.latency(Instant::now()), None, "no sample yet");
        e.sample(ms(200), Instant::now());
        assert!(e.latency(Instant::now()).is_some());
        tokio::time::advance(STALE_AFTER).await;
        assert_eq!(e.latency(Instant::now()), None, "stale after a second");
    }

    #[tokio::test(start_paused = true)]
    async fn calls_in_flight_multiply_the_cost() {
        let e = PeakEwma::new();
        assert_eq!(e.cost(Some(10.0), 99.0), 10.0);
        e.start();
        e.start();
        assert_eq!(e.cost(Some(10.0), 99.0), 30.0);
        assert_eq!(e.cost(None, 5.0), 15.0, "the assumed latency stands in");
        e.end();
        assert_eq!(e.in_flight(), 1);
    }
}
