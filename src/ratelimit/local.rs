//! The in-process limiter: the same sliding window on local counters, used when no Redis is
//! configured and while Redis is unreachable.
//!
//! Time comes from `tokio::time::Instant`, so tests can drive it with a paused clock. State is
//! a bounded moka cache: its TinyLFU admission keeps frequent (abusive) subjects when a flood
//! of one-off subjects fills it, and idle entries expire after two windows.
//!
//! All counters touched by one decision are updated under one mutex, so a multi-policy check
//! is atomic here too. The critical section is a few hash lookups; this is the degraded path.

use std::sync::Mutex;
use std::time::Duration;

use moka::sync::Cache;
use tokio::time::Instant;

use super::keys::SubjectHash;
use super::sliding::{self, WindowCounts};
use super::PolicyOutcome;

/// Enough distinct (policy, subject) pairs for a large burst of clients on one replica,
/// while bounding memory to tens of megabytes.
const MAX_ENTRIES: u64 = 200_000;

pub(crate) struct LocalLimiter {
    /// Origin of local time; windows are aligned to it (there is no shared clock to align to).
    epoch: Instant,
    counters: Cache<(usize, SubjectHash), WindowCounts>,
    /// Serialises decisions so all policies of a request are decided and counted together.
    lock: Mutex<()>,
}

/// One policy as the local limiter sees it.
pub(crate) struct LocalPolicy<'a> {
    pub index: usize,
    pub subject: SubjectHash,
    pub limit: u64,
    pub window_ms: u64,
    pub name: &'a str,
}

impl LocalLimiter {
    pub fn new(max_window: Duration) -> LocalLimiter {
        LocalLimiter {
            epoch: Instant::now(),
            counters: Cache::builder()
                .max_capacity(MAX_ENTRIES)
                .time_to_idle(max_window * 2)
                .build(),
            lock: Mutex::new(()),
        }
    }

    fn now_ms(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.epoch)
            .as_millis() as u64
    }

    /// Decides one request against `policies`; counts it in all of them only when all admit
    /// it (or in all of them regardless, with `count_denied`).
    pub fn check(
        &self,
        policies: &[LocalPolicy<'_>],
        count_denied: bool,
    ) -> (bool, Vec<PolicyOutcome>) {
        let now = self.now_ms();
        // A poisoned lock only means another thread panicked mid-decision; the counters are
        // plain values and still usable.
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut states = Vec::with_capacity(policies.len());
        let mut all = true;
        for p in policies {
            let (index, elapsed) = sliding::position(now, p.window_ms);
            let counts = self
                .counters
                .get(&(p.index, p.subject))
                .unwrap_or_default()
                .rolled_to(index);
            let ok = sliding::admits(counts, elapsed, p.window_ms, p.limit);
            all &= ok;
            states.push((counts, elapsed, ok));
        }
        let mut outcomes = Vec::with_capacity(policies.len());
        for (p, (mut counts, elapsed, ok)) in policies.iter().zip(states) {
            if all || count_denied {
                counts.current += 1;
                self.counters.insert((p.index, p.subject), counts);
            }
            let retry = if all {
                0
            } else {
                sliding::retry_after_ms(counts, elapsed, p.window_ms, p.limit)
            };
            outcomes.push(PolicyOutcome {
                name: p.name.into(),
                limit: p.limit,
                window_secs: p.window_ms / 1000,
                allowed: ok,
                remaining: sliding::remaining(counts, elapsed, p.window_ms, p.limit),
                reset_ms: sliding::reset_ms(elapsed, p.window_ms),
                retry_ms: retry,
            });
        }
        (all, outcomes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(index: usize, subject: u8, limit: u64, window_s: u64) -> LocalPolicy<'static> {
        LocalPolicy {
            index,
            subject: [subject; 16],
            limit,
            window_ms: window_s * 1000,
            name: "p",
        }
    }

    #[tokio::test(start_paused = true)]
    async fn exact_limit_then_slides() {
        let l = LocalLimiter::new(Duration::from_secs(10));
        let p = [policy(0, 1, 10, 10)];
        for i in 0..10 {
            let (ok, o) = l.check(&p, false);
            assert!(ok, "request {i}");
            assert_eq!(o[0].remaining, 9 - i);
        }
        let (ok, o) = l.check(&p, false);
        assert!(!ok);
        // 10 in this window, 10 s left: next window needs e' >= 1 s.
        assert_eq!(o[0].retry_ms, 11_000);
        // Another subject is unaffected.
        assert!(l.check(&[policy(0, 2, 10, 10)], false).0);

        tokio::time::advance(Duration::from_millis(10_999)).await;
        assert!(!l.check(&p, false).0);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(l.check(&p, false).0);
        // Half way into the next window the previous 10 weigh 5: 1 + 4 more fit.
        tokio::time::advance(Duration::from_millis(4_000)).await;
        let mut allowed = 0;
        while l.check(&p, false).0 {
            allowed += 1;
        }
        assert_eq!(allowed, 4);
        // Two windows later everything is forgotten.
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(l.check(&p, false).1[0].remaining, 9);
    }

    #[tokio::test(start_paused = true)]
    async fn multi_policy_denial_counts_nothing() {
        let l = LocalLimiter::new(Duration::from_secs(60));
        let tight = policy(0, 1, 2, 60);
        let loose = policy(1, 1, 100, 60);
        let both = [tight, loose];
        assert!(l.check(&both, false).0);
        assert!(l.check(&both, false).0);
        for _ in 0..5 {
            let (ok, o) = l.check(&both, false);
            assert!(!ok);
            assert!(!o[0].allowed && o[1].allowed);
            assert_eq!(
                o[1].remaining, 98,
                "denials must not consume the loose policy"
            );
        }
        // With count_denied the denial is charged to both.
        let (_, o) = l.check(&both, true);
        assert_eq!(o[1].remaining, 97);
        assert_eq!(o[0].remaining, 0);
    }
}
