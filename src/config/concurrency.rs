//! `[upstreams.NAME.concurrency]`: the adaptive concurrency limit under the static
//! `max_connections` bulkhead, and how long a call may wait for a slot under it; and the
//! route-level `priority` that decides who waits and who is shed first.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::types::{join, Dur, FieldError};

/// `upstreams.<name>.concurrency`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConcurrencyConfig {
    /// `false`: only the static bulkhead (`max_connections`) bounds calls, and a call waits
    /// for a slot until its deadline, as before the limit existed.
    pub enabled: bool,
    /// The learned limit never goes below this (a slow upstream still gets some traffic).
    pub min_limit: usize,
    /// Nor above this; `None`: the upstream's `max_connections`, which is always the ceiling.
    pub max_limit: Option<usize>,
    /// The limit before the first latency samples (and after a reload).
    pub initial_limit: usize,
    /// Latency above the no-load latency the limit tolerates before it shrinks, as a
    /// fraction of it (0.1: 10%)...
    pub tolerance: f64,
    /// ...plus this much in absolute terms, so a fast upstream's millisecond jitter is not
    /// read as a queue.
    pub slack: Dur,
    /// The limit is recomputed once per window (at least one no-load round trip, so each
    /// change is seen in the latency before the next).
    pub sample_window: Dur,
    /// The no-load latency is the average round trip of calls made while at most half the
    /// limit was busy (never of calls that queued), over about this long.
    pub baseline_window: Dur,
    /// CoDel: when the wait for a slot has not been empty for `queue_interval`, or a call
    /// was refused within the last `queue_interval`, a call waits at most this long...
    pub queue_target: Dur,
    /// ...otherwise (a burst, not a standing queue) at most this long.
    pub queue_interval: Dur,
}

impl Default for ConcurrencyConfig {
    fn default() -> Self {
        ConcurrencyConfig {
            enabled: true,
            min_limit: 4,
            max_limit: None,
            initial_limit: 20,
            tolerance: 0.1,
            slack: Dur::from_millis(5),
            sample_window: Dur::from_millis(100),
            baseline_window: Dur::from_secs(10),
            queue_target: Dur::from_millis(5),
            queue_interval: Dur::from_millis(100),
        }
    }
}

impl ConcurrencyConfig {
    /// `max_connections` is the upstream's, the hard ceiling the bounds must fit under.
    pub fn validate(&self, path: &str, max_connections: usize, errors: &mut Vec<FieldError>) {
        let mut bad =
            |field: &str, message: String| errors.push(FieldError::new(join(path, field), message));
        if self.min_limit == 0 {
            bad("min_limit", "must be at least 1".into());
        }
        if let Some(max) = self.max_limit {
            if max > max_connections {
                bad(
                    "max_limit",
                    format!("must be at most the upstream's max_connections ({max_connections}), got {max}"),
                );
            }
            if max < self.min_limit {
                bad(
                    "max_limit",
                    format!("must be at least min_limit ({}), got {max}", self.min_limit),
                );
            }
        }
        // An initial or minimum limit over a small upstream's max_connections is clamped to
        // it (the defaults must suit `max_connections = 4` too); only an explicit
        // `max_limit` over it is a mistake.
        if self.initial_limit < self.min_limit
            || self.max_limit.is_some_and(|max| self.initial_limit > max)
        {
            bad(
                "initial_limit",
                format!(
                    "must be between min_limit ({}) and max_limit, got {}",
                    self.min_limit, self.initial_limit
                ),
            );
        }
        if !(self.tolerance >= 0.0 && self.tolerance <= 10.0) {
            bad(
                "tolerance",
                format!("must be between 0.0 and 10.0, got {}", self.tolerance),
            );
        }
        if self.sample_window.0 < Duration::from_millis(10) {
            bad(
                "sample_window",
                format!("must be at least 10ms, got {}", self.sample_window),
            );
        }
        if self.baseline_window.0 < Duration::from_secs(1) {
            bad(
                "baseline_window",
                format!("must be at least 1s, got {}", self.baseline_window),
            );
        }
        if self.queue_interval.0.is_zero() {
            bad("queue_interval", "must be greater than zero".into());
        }
        if self.queue_target > self.queue_interval {
            bad(
                "queue_target",
                format!(
                    "must be at most queue_interval ({}), got {}",
                    self.queue_interval, self.queue_target
                ),
            );
        }
    }

    /// The bounds the learned limit stays within: `[min_limit, max_limit or max_connections]`.
    pub fn bounds(&self, max_connections: usize) -> (usize, usize) {
        let max = self
            .max_limit
            .unwrap_or(max_connections)
            .min(max_connections)
            .max(1);
        (self.min_limit.clamp(1, max), max)
    }
}

/// A route's `priority`: who is shed first when its upstream is overloaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Login, token verification: shed last; waits two no-load round trips of the upstream
    /// (at least `queue_interval`, at most 1 s) even when overloaded, and is served before
    /// the others.
    Critical,
    /// Waits `queue_interval` in a burst, `queue_target` when overloaded.
    #[default]
    Default,
    /// Analytics and other work a client can retry later: waits `queue_target` in a burst
    /// and not at all once a queue stands, and is served after the others.
    Sheddable,
}

impl Priority {
    /// Every priority, most important first (the order waiters are served in).
    pub const ALL: [Priority; 3] = [Priority::Critical, Priority::Default, Priority::Sheddable];

    /// The `priority` label of `gateway_shed_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::Default => "default",
            Priority::Sheddable => "sheddable",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_unknown_fields_are_refused() {
        let mut errors = Vec::new();
        ConcurrencyConfig::default().validate("c", 256, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let parsed: ConcurrencyConfig =
            toml::from_str("queue_target = \"2ms\"\nmax_limit = 64").expect("parse");
        assert_eq!(parsed.queue_target, Dur::from_millis(2));
        assert_eq!(parsed.bounds(256), (4, 64));
        assert!(toml::from_str::<ConcurrencyConfig>("target = \"2ms\"").is_err());
        let p: Priority = serde_json::from_str("\"sheddable\"").expect("priority");
        assert_eq!(p, Priority::Sheddable);
    }

    #[test]
    fn each_bad_setting_names_its_field() {
        let bad = ConcurrencyConfig {
            min_limit: 0,
            max_limit: Some(300),
            initial_limit: 400,
            tolerance: -1.0,
            sample_window: Dur::from_millis(1),
            baseline_window: Dur::from_millis(10),
            queue_target: Dur::from_millis(200),
            ..ConcurrencyConfig::default()
        };
        let mut errors = Vec::new();
        bad.validate("upstreams.storage.concurrency", 256, &mut errors);
        let shown: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            shown,
            [
                "upstreams.storage.concurrency.min_limit: must be at least 1",
                "upstreams.storage.concurrency.max_limit: must be at most the upstream's max_connections (256), got 300",
                "upstreams.storage.concurrency.initial_limit: must be between min_limit (0) and max_limit, got 400",
                "upstreams.storage.concurrency.tolerance: must be between 0.0 and 10.0, got -1",
                "upstreams.storage.concurrency.sample_window: must be at least 10ms, got 1ms",
                "upstreams.storage.concurrency.baseline_window: must be at least 1s, got 10ms",
                "upstreams.storage.concurrency.queue_target: must be at most queue_interval (100ms), got 200ms",
            ]
        );
        // The defaults suit a small upstream: its max_connections caps them.
        let mut errors = Vec::new();
        ConcurrencyConfig::default().validate("c", 2, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(ConcurrencyConfig::default().bounds(2), (2, 2));
    }
}
