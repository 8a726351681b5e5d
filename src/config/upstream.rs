//! `[upstreams.NAME]`: where an upstream is and how calls to it behave (timeouts, pool,
//! bulkhead, retries, circuit breaker), with validation that names each field.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::concurrency::ConcurrencyConfig;
use super::types::{join, Dur, FieldError};

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Base URL; `http://` or `https://` (rustls), optionally with a path prefix. A host name
    /// that resolves to several addresses is several instances.
    pub url: String,
    /// Several base URLs instead of `url`, one or more instances each (same path prefix).
    pub urls: Vec<String>,
    /// How often host names are resolved again: new addresses get traffic, vanished ones are
    /// drained. A failed resolution keeps the last known set.
    pub discovery_interval: Dur,
    /// How each attempt picks an instance.
    pub balancer: BalancerKind,
    /// How long an instance that answered 429 or 503 is passed over while others can serve.
    pub bias_duration: Dur,
    /// Passive health per instance: a failing instance is ejected, not the whole upstream.
    pub ejection: EjectionConfig,
    /// Default route timeout for routes to this upstream.
    pub timeout: Dur,
    pub connect_timeout: Dur,
    pub pool_max_idle_per_host: usize,
    pub pool_idle_timeout: Dur,
    /// Calls in flight (so connections) to this upstream at most; more wait for a free one
    /// within their deadline. A bulkhead, and the bound on what upstream connections cost.
    pub max_connections: usize,
    /// The fraction of `max_connections` one client (an IPv4 address, an IPv6
    /// `server.ipv6_client_prefix` network) may hold or wait for at once, in (0, 1]; beyond
    /// it, 429 `too_many_in_flight` at once. At least one slot. `1.0` turns it off.
    pub max_client_share: f64,
    /// The `error` text clients see when it is down (default "<Name> service unavailable").
    pub unavailable_message: Option<String>,
    /// Bounded retries on 503 and connection failures.
    pub retry: RetryConfig,
    /// The circuit breaker in front of this upstream.
    pub breaker: BreakerConfig,
    /// The adaptive concurrency limit under `max_connections` and the bounded wait for it.
    pub concurrency: ConcurrencyConfig,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: String::new(),
            urls: Vec::new(),
            discovery_interval: Dur::from_secs(5),
            balancer: BalancerKind::P2cEwma,
            bias_duration: Dur::from_millis(100),
            ejection: EjectionConfig::default(),
            timeout: Dur::from_secs(10),
            connect_timeout: Dur::from_secs(2),
            pool_max_idle_per_host: 256,
            pool_idle_timeout: Dur::from_secs(60),
            max_connections: 256,
            max_client_share: 0.25,
            unavailable_message: None,
            retry: RetryConfig::default(),
            breaker: BreakerConfig::default(),
            concurrency: ConcurrencyConfig::default(),
        }
    }
}

/// `upstreams.<name>.balancer`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BalancerKind {
    /// Power of two choices over the healthy instances by peak-EWMA latency x (in-flight + 1),
    /// as linkerd2-proxy and Finagle do: a slow or busy instance gets less traffic.
    #[default]
    P2cEwma,
    /// Each healthy instance in turn.
    RoundRobin,
}

/// `upstreams.<name>.ejection`: when one instance is taken out of rotation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EjectionConfig {
    /// `false`: instances are never ejected (the upstream's breaker still protects it).
    pub enabled: bool,
    /// Ejected after this many failed attempts in a row (connect error, reset, timeout, 5xx).
    pub consecutive_failures: u32,
    /// Or when at least this share of its attempts in `window` failed...
    pub failure_rate: f64,
    /// ...over this sliding window...
    pub window: Dur,
    /// ...with at least this many attempts in it.
    pub min_calls: u32,
    /// First ejection's length; each re-ejection doubles it...
    pub base_time: Dur,
    /// ...up to this.
    pub max_time: Dur,
    /// Never more than this share of the instances ejected at once; beyond it (a "panic"),
    /// failing instances stay in rotation and retries and the breaker take over.
    pub max_ejected_percent: u32,
}

impl Default for EjectionConfig {
    fn default() -> Self {
        EjectionConfig {
            enabled: true,
            consecutive_failures: 5,
            failure_rate: 0.5,
            window: Dur::from_secs(10),
            min_calls: 20,
            base_time: Dur::from_secs(10),
            max_time: Dur::from_secs(300),
            max_ejected_percent: 50,
        }
    }
}

impl EjectionConfig {
    /// When an instance is ejected: the keys `consecutive_failures`, `failure_rate`, `window`
    /// and `min_calls`, counted over the instance's attempts.
    pub fn trip_rule(&self) -> TripRule {
        TripRule {
            consecutive_failures: self.consecutive_failures,
            failure_rate: self.failure_rate,
            window: self.window,
            min_calls: self.min_calls,
        }
    }

    /// How long an ejection lasts: `base_time`, doubling per re-ejection up to `max_time`.
    pub fn ejection_time(&self) -> DoublingBackoff {
        DoublingBackoff {
            base: self.base_time,
            max: self.max_time,
        }
    }

    pub fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        self.trip_rule().validate(path, errors);
        self.ejection_time()
            .validate(path, ["base_time", "max_time"], errors);
        if self.max_ejected_percent > 100 {
            errors.push(FieldError::new(
                join(path, "max_ejected_percent"),
                format!("must be at most 100, got {}", self.max_ejected_percent),
            ));
        }
    }
}

/// The one rule for "this has failed enough to take it out", shared by the service breaker
/// (`[upstreams.X.breaker]`, over calls) and instance ejection (`[upstreams.X.ejection]`, over
/// attempts): `consecutive_failures` failures in a row, or at least `failure_rate` of the
/// outcomes in the last `window` once it holds `min_calls` (so 1 failure of 2 is no outage).
/// Both sections spell it with the same keys; this is their common view, validated once.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TripRule {
    pub consecutive_failures: u32,
    pub failure_rate: f64,
    pub window: Dur,
    pub min_calls: u32,
}

impl TripRule {
    /// `path` is the section holding the four keys.
    pub fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        let mut bad =
            |field: &str, message: String| errors.push(FieldError::new(join(path, field), message));
        if self.consecutive_failures == 0 {
            bad("consecutive_failures", "must be at least 1".into());
        }
        if !(self.failure_rate > 0.0 && self.failure_rate <= 1.0) {
            bad(
                "failure_rate",
                format!(
                    "must be above 0.0 and at most 1.0, got {}",
                    self.failure_rate
                ),
            );
        }
        if self.window.0 < Duration::from_millis(100) {
            bad(
                "window",
                format!("must be at least 100ms, got {}", self.window),
            );
        }
        if self.min_calls == 0 {
            bad("min_calls", "must be at least 1".into());
        }
    }
}

/// How long something that tripped stays out, shared by the breaker's open time and an
/// instance's ejection: `base` the first time, doubling with each trip in a row, at most
/// `max`. (Retry waits are another rule: full jitter under a cap, `RetryConfig`.)
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DoublingBackoff {
    pub base: Dur,
    pub max: Dur,
}

impl DoublingBackoff {
    /// `keys` are the names of `base` and `max` in the section at `path`.
    pub fn validate(&self, path: &str, keys: [&str; 2], errors: &mut Vec<FieldError>) {
        let [base_key, max_key] = keys;
        if self.base.0.is_zero() {
            errors.push(FieldError::new(
                join(path, base_key),
                "must be greater than zero",
            ));
        }
        if self.max < self.base {
            errors.push(FieldError::new(
                join(path, max_key),
                format!("must be at least {base_key} ({})", self.base),
            ));
        }
    }
}

impl UpstreamConfig {
    /// The configured base URLs: `urls`, or `url` alone.
    pub fn targets(&self) -> Vec<&str> {
        if self.urls.is_empty() {
            vec![self.url.as_str()]
        } else {
            self.urls.iter().map(String::as_str).collect()
        }
    }

    /// The base URL requests are built against (the first target); the balancer moves each
    /// attempt to its instance.
    pub fn primary_url(&self) -> &str {
        self.urls.first().map_or(self.url.as_str(), String::as_str)
    }

    pub fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        let (field, list): (String, bool) = if self.urls.is_empty() {
            ("url".into(), false)
        } else {
            ("urls".into(), true)
        };
        if !self.url.is_empty() && !self.urls.is_empty() {
            errors.push(FieldError::new(
                join(path, "urls"),
                "give `url` or `urls`, not both",
            ));
        }
        let mut prefix: Option<String> = None;
        for (i, target) in self.targets().iter().enumerate() {
            let at = if list {
                format!("{}[{i}]", join(path, &field))
            } else {
                join(path, &field)
            };
            match reqwest::Url::parse(target) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
                    if u.query().is_some() || u.fragment().is_some() {
                        errors.push(FieldError::new(
                            &at,
                            format!("{target:?} must not have a query or fragment"),
                        ));
                    }
                    let path_prefix = u.path().trim_end_matches('/').to_string();
                    match &prefix {
                        Some(p) if *p != path_prefix => errors.push(FieldError::new(
                            &at,
                            format!(
                                "{target:?} has path prefix {path_prefix:?}, the first has {p:?}: \
                                 every instance must serve the same paths"
                            ),
                        )),
                        Some(_) => {}
                        None => prefix = Some(path_prefix),
                    }
                }
                _ => errors.push(FieldError::new(
                    &at,
                    format!("invalid upstream URL {target:?} (expected http:// or https://host)"),
                )),
            }
        }
        if self.discovery_interval.0 < Duration::from_millis(100) {
            errors.push(FieldError::new(
                join(path, "discovery_interval"),
                format!("must be at least 100ms, got {}", self.discovery_interval),
            ));
        }
        self.ejection.validate(&join(path, "ejection"), errors);
        // These two were never called before the settings moved here: an out-of-range retry
        // or breaker setting was accepted silently.
        self.retry.validate(&join(path, "retry"), errors);
        self.breaker.validate(&join(path, "breaker"), errors);
        self.concurrency
            .validate(&join(path, "concurrency"), self.max_connections, errors);
        if self.timeout.0.is_zero() {
            errors.push(FieldError::new(
                join(path, "timeout"),
                "must be greater than 0",
            ));
        }
        if self.connect_timeout.0.is_zero() {
            errors.push(FieldError::new(
                join(path, "connect_timeout"),
                "must be greater than 0",
            ));
        }
        if self.max_connections == 0 {
            errors.push(FieldError::new(
                join(path, "max_connections"),
                "must be greater than 0",
            ));
        }
        if !(self.max_client_share > 0.0 && self.max_client_share <= 1.0) {
            errors.push(FieldError::new(
                join(path, "max_client_share"),
                format!(
                    "must be greater than 0 and at most 1, got {}",
                    self.max_client_share
                ),
            ));
        }
    }

    /// The message clients see when this upstream is down.
    pub fn unavailable_message(&self, name: &str) -> String {
        self.unavailable_message.clone().unwrap_or_else(|| {
            let mut chars = name.chars();
            let cap: String = match chars.next() {
                Some(c) => c.to_uppercase().chain(chars).collect(),
                None => String::new(),
            };
            format!("{cap} service unavailable")
        })
    }
}

/// `upstreams.<name>.retry`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Retries after the first attempt; a route may lower or raise it (`CallOptions::max_retries`).
    pub max_retries: u32,
    /// First backoff step; each retry doubles it, then full jitter picks in [0, step].
    pub backoff_base: Dur,
    /// Largest backoff step, so a long outage does not push waits past any useful deadline.
    pub backoff_cap: Dur,
    /// Longest `Retry-After` we wait for; a longer one returns the 503 to the client at once.
    pub retry_after_cap: Dur,
    /// Retries may be at most this share of the requests seen over `budget_window`.
    pub budget_ratio: f64,
    /// How far back the budget counts requests and retries.
    pub budget_window: Dur,
    /// Retries always allowed per second, so a quiet upstream still gets its few retries.
    pub budget_min_per_sec: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_retries: 2,
            backoff_base: Dur::from_millis(25),
            backoff_cap: Dur::from_millis(250),
            retry_after_cap: Dur::from_secs(2),
            budget_ratio: 0.2,
            budget_window: Dur::from_secs(10),
            budget_min_per_sec: 3,
        }
    }
}

impl RetryConfig {
    /// Highest `max_retries` accepted: more only adds load to a struggling upstream.
    pub const MAX_RETRIES_LIMIT: u32 = 10;

    pub fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        let mut bad =
            |field: &str, message: String| errors.push(FieldError::new(join(path, field), message));
        if self.max_retries > Self::MAX_RETRIES_LIMIT {
            bad(
                "max_retries",
                format!(
                    "must be at most {}, got {}",
                    Self::MAX_RETRIES_LIMIT,
                    self.max_retries
                ),
            );
        }
        if self.backoff_base.0.is_zero() {
            bad("backoff_base", "must be greater than zero".into());
        }
        if self.backoff_cap < self.backoff_base {
            bad(
                "backoff_cap",
                format!("must be at least backoff_base ({})", self.backoff_base),
            );
        }
        if !(0.0..=1.0).contains(&self.budget_ratio) {
            bad(
                "budget_ratio",
                format!("must be between 0.0 and 1.0, got {}", self.budget_ratio),
            );
        }
        if self.budget_window.0 < Duration::from_secs(1)
            || self.budget_window.0 > Duration::from_secs(300)
        {
            bad(
                "budget_window",
                format!("must be between 1s and 5m, got {}", self.budget_window),
            );
        }
    }
}

/// `upstreams.<name>.breaker`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// `false` lets every call through and records nothing.
    pub enabled: bool,
    /// Opens after this many failures in a row, however few calls there were.
    pub consecutive_failures: u32,
    /// Opens when at least this share of the calls in `window` failed...
    pub failure_rate: f64,
    /// ...over this sliding window...
    pub window: Dur,
    /// ...and the window holds at least this many calls (so 1 failure of 2 calls is no outage).
    pub min_calls: u32,
    /// Open time after the first opening.
    pub open_base: Dur,
    /// Longest open time, however often the probes fail.
    pub open_max: Dur,
    /// Calls let through at once while half-open; the rest fail fast.
    pub half_open_probes: u32,
    /// While open, GET this path (on the upstream's base URL) every `probe_interval`; a 2xx
    /// answer moves the breaker to half-open at once, so a route reopens within one interval
    /// of the upstream's return instead of after the whole open time. `None`: no probing.
    pub probe_path: Option<String>,
    /// How often the health probe runs while open; also its timeout.
    pub probe_interval: Dur,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            enabled: true,
            consecutive_failures: 5,
            failure_rate: 0.5,
            window: Dur::from_secs(10),
            min_calls: 20,
            open_base: Dur::from_secs(5),
            open_max: Dur::from_secs(60),
            half_open_probes: 1,
            probe_path: None,
            probe_interval: Dur::from_secs(1),
        }
    }
}

impl BreakerConfig {
    /// When the breaker opens: the keys `consecutive_failures`, `failure_rate`, `window` and
    /// `min_calls`, counted over the upstream's calls.
    pub fn trip_rule(&self) -> TripRule {
        TripRule {
            consecutive_failures: self.consecutive_failures,
            failure_rate: self.failure_rate,
            window: self.window,
            min_calls: self.min_calls,
        }
    }

    /// How long it stays open: `open_base`, doubling per re-opening up to `open_max`.
    pub fn open_time(&self) -> DoublingBackoff {
        DoublingBackoff {
            base: self.open_base,
            max: self.open_max,
        }
    }

    pub fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        self.trip_rule().validate(path, errors);
        self.open_time()
            .validate(path, ["open_base", "open_max"], errors);
        let mut bad =
            |field: &str, message: String| errors.push(FieldError::new(join(path, field), message));
        if self.half_open_probes == 0 {
            bad("half_open_probes", "must be at least 1".into());
        }
        if let Some(probe_path) = &self.probe_path {
            if !probe_path.starts_with('/') || probe_path.contains(['?', '#']) {
                bad(
                    "probe_path",
                    format!("must be a path starting with '/' (no query), got {probe_path:?}"),
                );
            }
        }
        if self.probe_interval.0 < Duration::from_millis(50) {
            bad(
                "probe_interval",
                format!("must be at least 50ms, got {}", self.probe_interval),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_defaults_unknown_fields_and_field_paths() {
        let parsed: RetryConfig = toml::from_str("max_retries = 1").expect("parse");
        assert_eq!(parsed.max_retries, 1);
        assert_eq!(parsed.backoff_base, Dur::from_millis(25));
        assert!(toml::from_str::<RetryConfig>("max_retry = 1").is_err());
        assert!(toml::from_str::<RetryConfig>("backoff_base = 25").is_err());

        let bad = RetryConfig {
            max_retries: 50,
            backoff_cap: Dur::from_millis(10),
            budget_ratio: -0.1,
            ..RetryConfig::default()
        };
        let mut errors = Vec::new();
        bad.validate("upstreams.storage.retry", &mut errors);
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "upstreams.storage.retry.max_retries",
                "upstreams.storage.retry.backoff_cap",
                "upstreams.storage.retry.budget_ratio",
            ]
        );
        let mut errors = Vec::new();
        RetryConfig::default().validate("r", &mut errors);
        assert!(errors.is_empty());
    }

    #[test]
    fn ejection_checks_the_shared_rule_and_backoff_under_its_own_keys() {
        let bad = EjectionConfig {
            consecutive_failures: 0,
            failure_rate: 0.0,
            window: Dur::from_millis(10),
            min_calls: 0,
            base_time: Dur::from_secs(0),
            max_ejected_percent: 101,
            ..EjectionConfig::default()
        };
        let mut errors = Vec::new();
        bad.validate("upstreams.storage.ejection", &mut errors);
        let shown: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            shown,
            [
                "upstreams.storage.ejection.consecutive_failures: must be at least 1",
                "upstreams.storage.ejection.failure_rate: must be above 0.0 and at most 1.0, got 0",
                "upstreams.storage.ejection.window: must be at least 100ms, got 10ms",
                "upstreams.storage.ejection.min_calls: must be at least 1",
                "upstreams.storage.ejection.base_time: must be greater than zero",
                "upstreams.storage.ejection.max_ejected_percent: must be at most 100, got 101",
            ]
        );
        let short = EjectionConfig {
            max_time: Dur::from_secs(1),
            ..EjectionConfig::default()
        };
        let mut errors = Vec::new();
        short.validate("e", &mut errors);
        assert_eq!(
            errors[0].to_string(),
            "e.max_time: must be at least base_time (10s)"
        );
        let mut errors = Vec::new();
        EjectionConfig::default().validate("e", &mut errors);
        assert!(errors.is_empty());
    }

    #[test]
    fn breaker_defaults_unknown_fields_and_field_paths() {
        let parsed: BreakerConfig = toml::from_str("open_base = \"200ms\"").expect("parse");
        assert_eq!(parsed.open_base, Dur::from_millis(200));
        assert_eq!(parsed.consecutive_failures, 5);
        assert!(toml::from_str::<BreakerConfig>("open_bse = \"1s\"").is_err());

        let bad = BreakerConfig {
            consecutive_failures: 0,
            failure_rate: 1.5,
            open_max: Dur::from_secs(1),
            half_open_probes: 0,
            probe_path: Some("health".into()),
            probe_interval: Dur::from_millis(10),
            ..BreakerConfig::default()
        };
        let mut errors = Vec::new();
        bad.validate("upstreams.storage.breaker", &mut errors);
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "upstreams.storage.breaker.consecutive_failures",
                "upstreams.storage.breaker.failure_rate",
                "upstreams.storage.breaker.open_max",
                "upstreams.storage.breaker.half_open_probes",
                "upstreams.storage.breaker.probe_path",
                "upstreams.storage.breaker.probe_interval",
            ]
        );
        let mut errors = Vec::new();
        BreakerConfig::default().validate("b", &mut errors);
        assert!(errors.is_empty());
    }
}
