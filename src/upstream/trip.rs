//! The one trip rule: "N failures in a row, or a failure share over a sliding window that
//! holds a minimum volume". The service breaker counts calls with it (`breaker/`), instance
//! ejection counts each instance's attempts with it (`instances/`); both take it from
//! `config::TripRule`, which both configuration sections spell with the same keys.
//!
//! failsafe has the same two policies, but its window reads `std::time::Instant` (a paused
//! tokio clock cannot move it) and keeps its counts private (`/admin` shows them): this is
//! the few lines we need instead, on [`SlidingWindow`].

use tokio::time::Instant;

use super::window::SlidingWindow;
use crate::config::TripRule;

/// Outcomes counted against a [`TripRule`].
#[derive(Clone, Debug)]
pub(crate) struct Tripwire {
    rule: TripRule,
    /// Failures since the last success (or reset).
    consecutive: u32,
    /// (outcomes, failures) over `rule.window`.
    window: SlidingWindow,
}

impl Tripwire {
    pub(crate) fn new(rule: TripRule) -> Tripwire {
        Tripwire {
            rule,
            consecutive: 0,
            window: SlidingWindow::new(rule.window.0),
        }
    }

    /// Counts one outcome at `now`; `true` when it is a failure that trips the rule (the
    /// caller decides what tripping means, and whether it still matters).
    pub(crate) fn record(&mut self, now: Instant, failed: bool) -> bool {
        if !failed {
            self.consecutive = 0;
            self.window.add(now, 1, 0);
            return false;
        }
        self.consecutive = self.consecutive.saturating_add(1);
        self.window.add(now, 1, 1);
        let (outcomes, failures) = self.window.totals(now);
        self.consecutive >= self.rule.consecutive_failures
            || (outcomes >= u64::from(self.rule.min_calls)
                && failures as f64 >= self.rule.failure_rate * outcomes as f64)
    }

    pub(crate) fn consecutive_failures(&self) -> u32 {
        self.consecutive
    }

    /// (outcomes, failures) in the window at `now`.
    pub(crate) fn window_counts(&self, now: Instant) -> (u64, u64) {
        self.window.totals(now)
    }

    /// Forgets everything (closed again, back in rotation).
    pub(crate) fn reset(&mut self) {
        self.consecutive = 0;
        self.window.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::Dur;

    /// The shipped defaults of both sections: 5 in a row, or 50% of at least 20 in 10 s.
    fn wire() -> Tripwire {
        Tripwire::new(TripRule {
            consecutive_failures: 5,
            failure_rate: 0.5,
            window: Dur::from_secs(10),
            min_calls: 20,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn trips_on_n_failures_in_a_row_and_a_success_restarts_the_count() {
        let mut w = wire();
        let now = Instant::now();
        assert!((0..4).all(|_| !w.record(now, true)));
        assert!(!w.record(now, false));
        assert!((0..4).all(|_| !w.record(now, true)));
        assert_eq!(w.consecutive_failures(), 4);
        assert!(w.record(now, true), "the fifth in a row");
        // A success never trips, however bad the window.
        assert!(!w.record(now, false));
    }

    #[tokio::test(start_paused = true)]
    async fn trips_on_the_failure_share_only_with_the_minimum_volume() {
        let mut w = wire();
        let now = Instant::now();
        // Never 5 in a row; 9 failures of 19: under the 20-outcome minimum.
        for _ in 0..9 {
            assert!(!w.record(now, false));
            assert!(!w.record(now, true));
        }
        assert!(!w.record(now, false));
        assert_eq!(w.window_counts(now), (19, 9));
        assert!(w.record(now, true), "10 of 20 = 50%");
    }

    #[tokio::test(start_paused = true)]
    async fn outcomes_older_than_the_window_no_longer_count() {
        let mut w = wire();
        for _ in 0..9 {
            w.record(Instant::now(), false);
            w.record(Instant::now(), true);
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(w.window_counts(Instant::now()), (0, 0));
        w.record(Instant::now(), true);
        assert!(!w.record(Instant::now(), false));
        assert_eq!(w.window_counts(Instant::now()), (2, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn reset_forgets_the_run_and_the_window() {
        let mut w = wire();
        let now = Instant::now();
        for _ in 0..4 {
            w.record(now, true);
        }
        w.reset();
        assert_eq!(
            (w.consecutive_failures(), w.window_counts(now)),
            (0, (0, 0))
        );
        assert!(
            (0..4).all(|_| !w.record(now, true)),
            "counting starts again"
        );
    }
}
