//! `[server.saturation]`: when the gateway process itself is saturated (its runtime cannot
//! keep up, or too many requests are in flight for its memory), new routed requests are
//! refused at once (503 `overloaded`) instead of queueing behind the work it cannot finish;
//! and an opt-in readiness rule (`/ready` 503 while the runtime stays late).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::types::{join, Dur, FieldError};

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SaturationConfig {
    /// Refuse new routed requests while saturated; `false` admits everything (the scheduling
    /// delay is still measured and exported).
    pub enabled: bool,
    /// The runtime is saturated when its scheduling delay (how late a 10 ms tick wakes) stays
    /// at or above this...
    pub lag_threshold: Dur,
    /// ...for at least this long (one late tick after a pause is not saturation).
    pub lag_for: Dur,
    /// Routed requests in flight at once, all listeners together; past it new ones are
    /// refused. 0: derived from the memory limit (the cgroup's, else the machine's), like the
    /// connection caps.
    pub max_in_flight: usize,
    /// `Retry-After` on a refusal.
    pub retry_after: Dur,
    /// Opt-in readiness rule: `/ready` answers 503 while the scheduling delay, averaged over
    /// about `ready_lag_for`, is at or above this (a starved replica leaves the load
    /// balancer). 0s: off.
    pub ready_lag_threshold: Dur,
    /// The time constant of that average.
    pub ready_lag_for: Dur,
}

impl Default for SaturationConfig {
    fn default() -> Self {
        SaturationConfig {
            enabled: true,
            lag_threshold: Dur::from_millis(50),
            lag_for: Dur::from_secs(1),
            max_in_flight: 0,
            retry_after: Dur::from_secs(1),
            ready_lag_threshold: Dur::from_millis(0),
            ready_lag_for: Dur::from_secs(5),
        }
    }
}

/// The lag monitor's tick: a threshold below it could not be told from timer resolution.
pub const MIN_LAG_THRESHOLD: Duration = Duration::from_millis(2);
/// Longest `lag_for` / `ready_lag_for`: a rule that waits longer reacts to nothing useful.
pub const MAX_LAG_FOR: Duration = Duration::from_secs(300);

impl SaturationConfig {
    pub fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        let mut check = |field: &str, ok: bool, message: String| {
            if !ok {
                errors.push(FieldError::new(join(path, field), message));
            }
        };
        check(
            "lag_threshold",
            self.lag_threshold.0 >= MIN_LAG_THRESHOLD,
            format!(
                "must be at least {} (the timer's resolution), got {}",
                Dur(MIN_LAG_THRESHOLD),
                self.lag_threshold
            ),
        );
        for (field, v) in [
            ("lag_for", self.lag_for),
            ("ready_lag_for", self.ready_lag_for),
        ] {
            check(
                field,
                v.0 <= MAX_LAG_FOR,
                format!("must be at most {}, got {v}", Dur(MAX_LAG_FOR)),
            );
        }
        check(
            "retry_after",
            (Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&self.retry_after.0),
            format!("must be between 1s and 1h, got {}", self.retry_after),
        );
        let ready = self.ready_lag_threshold.0;
        check(
            "ready_lag_threshold",
            ready.is_zero() || ready >= MIN_LAG_THRESHOLD,
            format!(
                "must be 0s (off) or at least {}, got {}",
                Dur(MIN_LAG_THRESHOLD),
                self.ready_lag_threshold
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bad_field_is_named_and_the_defaults_pass() {
        let mut errors = Vec::new();
        SaturationConfig::default().validate("server.saturation", &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let bad = SaturationConfig {
            enabled: true,
            lag_threshold: Dur::from_millis(1),
            lag_for: Dur::from_secs(600),
            max_in_flight: 0,
            retry_after: Dur::from_millis(0),
            ready_lag_threshold: Dur::from_millis(1),
            ready_lag_for: Dur::from_secs(301),
        };
        bad.validate("server.saturation", &mut errors);
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "server.saturation.lag_threshold",
                "server.saturation.lag_for",
                "server.saturation.ready_lag_for",
                "server.saturation.retry_after",
                "server.saturation.ready_lag_threshold",
            ]
        );
    }
}
