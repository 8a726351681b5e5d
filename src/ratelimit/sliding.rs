//! The sliding-window counter (Cloudflare's weighted two-window estimate) as pure integer
//! arithmetic. The in-process limiter uses it directly; the Lua script in `redis.rs` is a
//! line-by-line transcription, so both backends decide identically.
//!
//! With window `W`, the current fixed window started `e` ms ago and holds `cur` requests, the
//! previous one holds `prev`. The estimated count over the last `W` ms is
//! `prev * (W - e) / W + cur`; a request is allowed when that estimate plus one is at most the
//! limit. Everything below is multiplied by `W` so it stays in integers.

/// Counters of one (policy, subject): the fixed window index and the counts of that window and
/// of the one before it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowCounts {
    pub index: u64,
    pub current: u64,
    pub previous: u64,
}

impl WindowCounts {
    /// The counts as seen at window `index`: a window or two later, old counts roll or vanish.
    pub fn rolled_to(self, index: u64) -> WindowCounts {
        if self.index == index {
            self
        } else if self.index + 1 == index {
            WindowCounts {
                index,
                current: 0,
                previous: self.current,
            }
        } else {
            WindowCounts {
                index,
                current: 0,
                previous: 0,
            }
        }
    }
}

/// Where `now` falls: the window index and how far into that window it is.
pub fn position(now_ms: u64, window_ms: u64) -> (u64, u64) {
    (now_ms / window_ms, now_ms % window_ms)
}

/// The weighted estimate times `window_ms`.
fn scaled_estimate(c: WindowCounts, elapsed_ms: u64, window_ms: u64) -> u128 {
    c.previous as u128 * (window_ms - elapsed_ms) as u128 + c.current as u128 * window_ms as u128
}

/// Would one more request fit?
pub fn admits(c: WindowCounts, elapsed_ms: u64, window_ms: u64, limit: u64) -> bool {
    scaled_estimate(c, elapsed_ms, window_ms) + window_ms as u128
        <= limit as u128 * window_ms as u128
}

/// How many more requests fit right now (ignoring the capacity that decay will free).
pub fn remaining(c: WindowCounts, elapsed_ms: u64, window_ms: u64, limit: u64) -> u64 {
    let cap = limit as u128 * window_ms as u128;
    let used = scaled_estimate(c, elapsed_ms, window_ms);
    (cap.saturating_sub(used) / window_ms as u128) as u64
}

/// Milliseconds until one more request fits, assuming nothing else is counted meanwhile;
/// 0 when it fits now. Rounded up so a client that waits this long is never early.
pub fn retry_after_ms(c: WindowCounts, elapsed_ms: u64, window_ms: u64, limit: u64) -> u64 {
    if admits(c, elapsed_ms, window_ms, limit) {
        return 0;
    }
    let w = window_ms as u128;
    let to_window_end = (window_ms - elapsed_ms) as u128;
    let (cur, prev, limit) = (c.current as u128, c.previous as u128, limit as u128);
    let wait = if cur < limit {
        // The previous window's weight is what blocks: wait until it has decayed enough.
        // prev * (W - e - d) + (cur + 1) * W <= limit * W
        let excess = prev * to_window_end - (limit - cur - 1) * w;
        excess.div_ceil(prev)
    } else {
        // The current window alone is full: wait into the next window, where today's count
        // becomes the decaying previous count.  cur * (W - e') + W <= limit * W
        to_window_end + ((cur - limit + 1) * w).div_ceil(cur)
    };
    wait as u64
}

/// Milliseconds until the current fixed window rolls over (the `t` of an allowed request).
pub fn reset_ms(elapsed_ms: u64, window_ms: u64) -> u64 {
    window_ms - elapsed_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: u64 = 10_000;

    fn counts(previous: u64, current: u64) -> WindowCounts {
        WindowCounts {
            index: 0,
            current,
            previous,
        }
    }

    #[test]
    fn fixed_window_part() {
        assert!(admits(counts(0, 9), 0, W, 10));
        assert!(!admits(counts(0, 10), 0, W, 10));
        assert_eq!(remaining(counts(0, 4), 0, W, 10), 6);
    }

    #[test]
    fn previous_window_decays_linearly() {
        // Half way through the window, 10 previous requests weigh 5.
        let c = counts(10, 0);
        assert_eq!(remaining(c, 5_000, W, 10), 5);
        assert!(admits(counts(10, 4), 5_000, W, 10));
        assert!(!admits(counts(10, 5), 5_000, W, 10));
        // Blocked by the previous window: the weight must fall by one request (1 s of 10).
        assert_eq!(retry_after_ms(counts(10, 5), 5_000, W, 10), 1_000);
        assert!(admits(counts(10, 5), 6_000, W, 10));
        assert!(!admits(counts(10, 5), 5_999, W, 10));
    }

    #[test]
    fn full_current_window_waits_into_the_next() {
        // 10 in this window, 2 s left: next window, 10 * (W - e') / W + 1 <= 10 => e' >= 1 s.
        let wait = retry_after_ms(counts(0, 10), 8_000, W, 10);
        assert_eq!(wait, 2_000 + 1_000);
        let next = counts(0, 10).rolled_to(1);
        assert!(!admits(next, 999, W, 10));
        assert!(admits(next, 1_000, W, 10));
        // A limit of 1 has to wait out the whole next window too.
        assert_eq!(retry_after_ms(counts(0, 1), 0, W, 1), W + W);
    }

    #[test]
    fn retry_is_never_early() {
        for limit in 1..6 {
            for prev in 0..8 {
                for cur in 0..8 {
                    for e in (0..W).step_by(700) {
                        let c = counts(prev, cur);
                        let d = retry_after_ms(c, e, W, limit);
                        let at = e + d;
                        let (idx, el) = position(at, W);
                        let later = c.rolled_to(idx);
                        assert!(admits(later, el, W, limit), "{c:?} e={e} d={d}");
                        if d > 0 {
                            let (idx, el) = position(at - 1, W);
                            assert!(!admits(c.rolled_to(idx), el, W, limit), "late {c:?} {e}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rolling() {
        let c = WindowCounts {
            index: 5,
            current: 3,
            previous: 9,
        };
        assert_eq!(c.rolled_to(5), c);
        assert_eq!(c.rolled_to(6).previous, 3);
        assert_eq!(c.rolled_to(7), WindowCounts::default().rolled_to(7));
    }
}
