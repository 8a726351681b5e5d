//! A sliding window of two counters, bucketed on tokio's clock.
//!
//! failsafe has a `WindowedAdder`, but it reads `std::time::Instant`, so a paused tokio clock
//! cannot move it; this is the few lines we need instead.

use std::time::Duration;

use tokio::time::Instant;

/// Buckets per window: the window slides in steps of a tenth of its length.
const BUCKETS: usize = 10;

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    /// Which slot of time this bucket currently holds; `None` until first used.
    tick: Option<u64>,
    first: u64,
    second: u64,
}

/// Two counts (e.g. calls and failures) summed over roughly the last `window`.
#[derive(Clone, Debug)]
pub(crate) struct SlidingWindow {
    origin: Instant,
    slot: Duration,
    buckets: [Bucket; BUCKETS],
}

impl SlidingWindow {
    pub(crate) fn new(window: Duration) -> Self {
        SlidingWindow {
            origin: Instant::now(),
            slot: (window / BUCKETS as u32).max(Duration::from_millis(1)),
            buckets: [Bucket::default(); BUCKETS],
        }
    }

    fn tick(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.origin).as_nanos();
        (elapsed / self.slot.as_nanos()) as u64
    }

    pub(crate) fn add(&mut self, now: Instant, first: u64, second: u64) {
        let tick = self.tick(now);
        let bucket = &mut self.buckets[(tick % BUCKETS as u64) as usize];
        if bucket.tick != Some(tick) {
            *bucket = Bucket {
                tick: Some(tick),
                first: 0,
                second: 0,
            };
        }
        bucket.first += first;
        bucket.second += second;
    }

    /// Both counts over the buckets still inside the window at `now`.
    pub(crate) fn totals(&self, now: Instant) -> (u64, u64) {
        let current = self.tick(now);
        self.buckets
            .iter()
            .filter(|b| matches!(b.tick, Some(t) if current.saturating_sub(t) < BUCKETS as u64))
            .fold((0, 0), |(f, s), b| (f + b.first, s + b.second))
    }

    pub(crate) fn clear(&mut self) {
        self.buckets = [Bucket::default(); BUCKETS];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn counts_slide_out_after_the_window() {
        let mut w = SlidingWindow::new(Duration::from_secs(10));
        w.add(Instant::now(), 3, 1);
        tokio::time::advance(Duration::from_secs(5)).await;
        w.add(Instant::now(), 2, 2);
        assert_eq!(w.totals(Instant::now()), (5, 3));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(w.totals(Instant::now()), (2, 2));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(w.totals(Instant::now()), (0, 0));
    }
}
