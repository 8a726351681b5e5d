//! Response headers for a decision.
//!
//! Syntax follows draft-ietf-httpapi-ratelimit-headers-11: both fields are Structured Field
//! Lists whose items are Strings naming the policy, e.g.
//! `RateLimit-Policy: "default";q=100;w=60` (quota, window in seconds) and
//! `RateLimit: "default";r=42;t=17` (remaining quota, seconds of the effective window).
//! For an allowed request `t` is the time until the current fixed window rolls over; for a
//! policy that denied it, `t` equals the retry delay, because the draft asks that a
//! `Retry-After` never point earlier than the end of the effective window.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::sync::Arc;

use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use http::HeaderMap;

use super::{Decision, PolicyOutcome};

pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
pub const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
pub const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// Milliseconds to whole seconds, rounded up: a client told "retry in N s" must not be early.
pub fn ceil_secs(ms: u64) -> u64 {
    ms.div_ceil(1000)
}

/// An sf-string. Policy names are validated to need no escaping; this stays correct anyway.
fn sf_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('?'),
        }
    }
    out.push('"');
}

fn effective_window_secs(p: &PolicyOutcome) -> u64 {
    if p.allowed {
        ceil_secs(p.reset_ms)
    } else {
        ceil_secs(p.retry_ms).max(1)
    }
}

pub fn policy_field(policies: &[PolicyOutcome]) -> String {
    let mut out = String::new();
    for (i, p) in policies.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        sf_string(&mut out, &p.name);
        let _ = write!(out, ";q={};w={}", p.limit, p.window_secs);
    }
    out
}

pub fn ratelimit_field(policies: &[PolicyOutcome]) -> String {
    let mut out = String::new();
    for (i, p) in policies.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        sf_string(&mut out, &p.name);
        let _ = write!(out, ";r={};t={}", p.remaining, effective_window_secs(p));
    }
    out
}

/// `RateLimit-Policy` for `policies`. It changes only with the configuration (and the
/// per-replica share while Redis is down), so the last single-policy value is kept per
/// thread and cloned (its bytes shared) while it still applies: every answer on a limited
/// route carries it, and formatting it was most of the headers' ~4.5k instructions.
fn policy_value(policies: &[PolicyOutcome]) -> Option<HeaderValue> {
    type Last = Option<(Arc<str>, u64, u64, HeaderValue)>;
    thread_local! {
        static LAST: RefCell<Last> = const { RefCell::new(None) };
    }
    let [p] = policies else {
        return HeaderValue::try_from(policy_field(policies)).ok();
    };
    LAST.with_borrow_mut(|last| {
        if let Some((name, q, w, v)) = last.as_ref() {
            if *name == p.name && *q == p.limit && *w == p.window_secs {
                return Some(v.clone());
            }
        }
        let v = HeaderValue::try_from(policy_field(policies)).ok()?;
        *last = Some((p.name.clone(), p.limit, p.window_secs, v.clone()));
        Some(v)
    })
}

/// The policy legacy single-valued headers describe: the one that denied with the longest
/// wait, or else the one closest to denying.
fn most_restrictive(policies: &[PolicyOutcome]) -> Option<&PolicyOutcome> {
    policies
        .iter()
        .filter(|p| !p.allowed)
        .max_by_key(|p| p.retry_ms)
        .or_else(|| policies.iter().min_by_key(|p| p.remaining))
}

fn set(headers: &mut HeaderMap, name: HeaderName, value: String) {
    // Every value is built from digits, validated names and ASCII punctuation.
    if let Ok(v) = HeaderValue::try_from(value) {
        headers.insert(name, v);
    }
}

pub fn apply(decision: &Decision, headers: &mut HeaderMap) {
    if !decision.policies.is_empty() {
        if let Some(v) = policy_value(&decision.policies) {
            headers.insert(RATELIMIT_POLICY, v);
        }
        set(headers, RATELIMIT, ratelimit_field(&decision.policies));
        if decision.legacy_headers {
            if let Some(p) = most_restrictive(&decision.policies) {
                set(headers, X_RATELIMIT_LIMIT, p.limit.to_string());
                set(headers, X_RATELIMIT_REMAINING, p.remaining.to_string());
                // Delta seconds, not an epoch: immune to client clock skew.
                set(
                    headers,
                    X_RATELIMIT_RESET,
                    effective_window_secs(p).to_string(),
                );
            }
        }
    }
    if let Some(secs) = decision.retry_after_secs() {
        set(headers, RETRY_AFTER, secs.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::DecisionSource;

    fn outcome(name: &str, allowed: bool, remaining: u64, reset: u64, retry: u64) -> PolicyOutcome {
        PolicyOutcome {
            name: name.into(),
            limit: 100,
            window_secs: 60,
            allowed,
            remaining,
            reset_ms: reset,
            retry_ms: retry,
        }
    }

    fn decision(policies: Vec<PolicyOutcome>, legacy: bool) -> Decision {
        let allowed = policies.iter().all(|p| p.allowed);
        let retry = policies.iter().map(|p| p.retry_ms).max().unwrap_or(0);
        Decision {
            allowed,
            unavailable: false,
            source: DecisionSource::Redis,
            retry_after_ms: (!allowed).then_some(retry),
            policies,
            legacy_headers: legacy,
        }
    }

    #[test]
    fn allowed_single_policy() {
        let d = decision(vec![outcome("default", true, 42, 16_001, 0)], false);
        let mut h = HeaderMap::new();
        d.apply_headers(&mut h);
        assert_eq!(h["ratelimit-policy"], "\"default\";q=100;w=60");
        assert_eq!(h["ratelimit"], "\"default\";r=42;t=17");
        assert!(h.get("retry-after").is_none());
        assert!(h.get("x-ratelimit-limit").is_none());
        assert_eq!(d.retry_after_secs(), None);
    }

    #[test]
    fn the_kept_policy_value_follows_a_changed_limit() {
        let policy = |name: &str, limit: u64| {
            let mut h = HeaderMap::new();
            let mut p = outcome(name, true, 1, 1_000, 0);
            p.limit = limit;
            decision(vec![p], false).apply_headers(&mut h);
            h["ratelimit-policy"].to_str().unwrap().to_string()
        };
        assert_eq!(policy("default", 100), "\"default\";q=100;w=60");
        assert_eq!(policy("default", 100), "\"default\";q=100;w=60");
        // The per-replica share while Redis is down, another policy, and back.
        assert_eq!(policy("default", 50), "\"default\";q=50;w=60");
        assert_eq!(policy("ws", 50), "\"ws\";q=50;w=60");
        assert_eq!(policy("default", 100), "\"default\";q=100;w=60");
    }

    #[test]
    fn denied_rounds_retry_up_and_lists_every_policy() {
        let d = decision(
            vec![
                outcome("auth", false, 0, 30_000, 2_001),
                outcome("default", true, 7, 30_000, 0),
            ],
            true,
        );
        let mut h = HeaderMap::new();
        d.apply_headers(&mut h);
        assert_eq!(
            h["ratelimit-policy"],
            "\"auth\";q=100;w=60, \"default\";q=100;w=60"
        );
        assert_eq!(h["ratelimit"], "\"auth\";r=0;t=3, \"default\";r=7;t=30");
        assert_eq!(h["retry-after"], "3");
        assert_eq!(h["x-ratelimit-limit"], "100");
        assert_eq!(h["x-ratelimit-remaining"], "0");
        assert_eq!(h["x-ratelimit-reset"], "3");
        assert_eq!(d.retry_after_secs(), Some(3));
        assert_eq!(d.violated_policies().collect::<Vec<_>>(), ["auth"]);
    }

    #[test]
    fn exact_seconds_are_not_rounded_further() {
        assert_eq!(ceil_secs(3_000), 3);
        assert_eq!(ceil_secs(3_001), 4);
        assert_eq!(ceil_secs(1), 1);
        assert_eq!(ceil_secs(0), 0);
    }

    #[test]
    fn sf_strings_escape() {
        let mut s = String::new();
        sf_string(&mut s, "a\"b\\c\u{e9}");
        assert_eq!(s, r#""a\"b\\c?""#);
    }
}
