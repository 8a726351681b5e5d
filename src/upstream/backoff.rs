//! The one doubling backoff: how long something that tripped stays out. The breaker's open
//! time and an instance's ejection time both use it (`config::DoublingBackoff`): `base` the
//! first time, doubling with each trip in a row, capped at `max`, optionally minus a random
//! share so that replicas do not come back in lockstep.
//!
//! Retry waits are a different rule (full jitter under a cap, drawn by `retry-policies`; see
//! `retry.rs`): a retry wants to spread load, this wants to give a failure time.

use std::time::Duration;

use rand::Rng;

use crate::config::DoublingBackoff;

/// A [`DoublingBackoff`] and the trips in a row it has answered.
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
    /// The largest share taken off at random (0.2: a time out lasts 80-100% of its plan).
    jitter: f64,
    /// Trips in a row so far: the next time out is `base * 2^steps`.
    steps: u32,
}

impl Backoff {
    /// Exact times, no jitter.
    pub(crate) fn new(settings: DoublingBackoff) -> Backoff {
        Backoff {
            base: settings.base.0,
            max: settings.max.0,
            jitter: 0.0,
            steps: 0,
        }
    }

    /// Takes up to `share` (0.0 to 1.0) off every time out, at random.
    pub(crate) fn with_jitter(self, share: f64) -> Backoff {
        Backoff {
            jitter: share.clamp(0.0, 1.0),
            ..self
        }
    }

    /// The time out for one more trip in a row.
    pub(crate) fn next(&mut self) -> Duration {
        let planned = planned(self.base, self.max, self.steps);
        self.steps = self.steps.saturating_add(1);
        if self.jitter > 0.0 {
            planned.mul_f64(1.0 - rand::rng().random_range(0.0..=self.jitter))
        } else {
            planned
        }
    }

    /// The run of trips is over: the next time out is `base` again.
    pub(crate) fn reset(&mut self) {
        self.steps = 0;
    }
}

/// `base * 2^steps`, at most `max` (and never an overflow, however many steps).
fn planned(base: Duration, max: Duration, steps: u32) -> Duration {
    base.checked_mul(1u32 << steps.min(31))
        .map_or(max, |d| d.min(max))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;

    fn settings(base: u64, max: u64) -> DoublingBackoff {
        DoublingBackoff {
            base: Dur::from_secs(base),
            max: Dur::from_secs(max),
        }
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn doubles_per_trip_up_to_the_cap_and_starts_over_after_a_reset() {
        let mut b = Backoff::new(settings(10, 300));
        let times: Vec<u64> = (0..7).map(|_| b.next().as_secs()).collect();
        assert_eq!(times, [10, 20, 40, 80, 160, 300, 300]);
        b.reset();
        assert_eq!(b.next(), Duration::from_secs(10));
    }

    #[test]
    fn far_past_the_cap_it_stays_at_the_cap() {
        let mut b = Backoff::new(settings(5, 60));
        for _ in 0..100 {
            b.next();
        }
        assert_eq!(b.next(), Duration::from_secs(60));
        assert_eq!(planned(secs(5.0), secs(60.0), u32::MAX), secs(60.0));
    }

    #[test]
    fn jitter_takes_off_at_most_its_share_and_varies() {
        let samples: Vec<Duration> = (0..1000)
            .map(|_| Backoff::new(settings(5, 60)).with_jitter(0.2).next())
            .collect();
        assert!(samples.iter().all(|d| *d >= secs(4.0) && *d <= secs(5.0)));
        let (min, max) = (samples.iter().min(), samples.iter().max());
        let spread = max.zip(min).map(|(a, b)| *a - *b).unwrap_or_default();
        assert!(spread > Duration::from_millis(500), "no jitter: {spread:?}");
    }
}
