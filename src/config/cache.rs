//! Cache configuration: the global `[cache]` section and the per-route `cache = { ttl = .. }`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::types::{join, ByteSize, Dur, FieldError};

/// Largest entry the byte weigher can express (moka weights are `u32`), with room left for
/// the key and headers.
const MAX_ENTRY_LIMIT: u64 = 1 << 31;

/// The global `[cache]` section: one memory budget shared by every cached route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Budget for keys, headers and bodies together, so caching can never be why the gateway
    /// runs out of memory.
    pub max_bytes: ByteSize,
    /// Largest body worth storing: one huge response would otherwise evict hundreds of small,
    /// hot ones.
    pub max_entry_bytes: ByteSize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_bytes: ByteSize(64 << 20),
            max_entry_bytes: ByteSize(1 << 20),
        }
    }
}

impl CacheConfig {
    pub fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        if self.max_bytes.0 == 0 {
            errors.push(FieldError::new(
                join(path, "max_bytes"),
                "must be greater than 0 (remove `cache` from routes to disable caching)",
            ));
        }
        if self.max_entry_bytes.0 == 0 {
            errors.push(FieldError::new(
                join(path, "max_entry_bytes"),
                "must be greater than 0",
            ));
        } else if self.max_entry_bytes.0 > self.max_bytes.0 {
            errors.push(FieldError::new(
                join(path, "max_entry_bytes"),
                format!(
                    "{} is larger than max_bytes ({}): such an entry could never be kept",
                    self.max_entry_bytes, self.max_bytes
                ),
            ));
        } else if self.max_entry_bytes.0 > MAX_ENTRY_LIMIT {
            errors.push(FieldError::new(
                join(path, "max_entry_bytes"),
                format!("must be at most {}", ByteSize(MAX_ENTRY_LIMIT)),
            ));
        }
    }
}

/// A route's opt-in to caching: `cache = { ttl = "5s" }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteCachePolicy {
    /// Freshness lifetime when the upstream does not give one (`s-maxage` / `max-age` win).
    pub ttl: Dur,
    /// How long past expiry an entry may still be served when the upstream fails or answers
    /// 5xx, so an outage shows slightly old data instead of errors.
    #[serde(default = "default_stale_if_error")]
    pub stale_if_error: Dur,
}

fn default_stale_if_error() -> Dur {
    Dur::from_secs(60)
}

impl RouteCachePolicy {
    /// A policy with the given TTL and the default stale-if-error window.
    pub fn new(ttl: Duration) -> Self {
        RouteCachePolicy {
            ttl: Dur(ttl),
            stale_if_error: default_stale_if_error(),
        }
    }

    pub fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        if self.ttl.0.is_zero() {
            errors.push(FieldError::new(
                join(path, "ttl"),
                "must be greater than 0 (remove `cache` to disable caching for this route)",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        #[serde(default)]
        cache: CacheConfig,
        route: Option<RouteCachePolicy>,
    }

    fn parse(text: &str) -> Result<Doc, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn defaults() {
        let doc = parse("").expect("empty config parses");
        assert_eq!(doc.cache, CacheConfig::default());
        assert_eq!(doc.cache.max_bytes, ByteSize(64 << 20));
        assert_eq!(doc.cache.max_entry_bytes, ByteSize(1 << 20));
        let doc = parse("route = { ttl = \"5s\" }").expect("route policy parses");
        assert_eq!(
            doc.route,
            Some(RouteCachePolicy {
                ttl: Dur::from_secs(5),
                stale_if_error: Dur::from_secs(60)
            })
        );
    }

    #[test]
    fn unknown_fields_and_missing_ttl_are_rejected() {
        let err = parse("[cache]\nmax_byte = \"1MiB\"").expect_err("typo rejected");
        assert!(err.to_string().contains("max_byte"), "{err}");
        assert!(parse("route = { stale_if_error = \"5s\" }").is_err());
        assert!(parse("route = { ttl = \"5s\", tll = \"1s\" }").is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let mut errors = Vec::new();
        CacheConfig {
            max_bytes: ByteSize(1 << 20),
            max_entry_bytes: ByteSize(2 << 20),
        }
        .validate("cache", &mut errors);
        RouteCachePolicy::new(Duration::ZERO).validate("routes[2].cache", &mut errors);
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["cache.max_entry_bytes", "routes[2].cache.ttl"]);

        let mut errors = Vec::new();
        CacheConfig::default().validate("cache", &mut errors);
        RouteCachePolicy::new(Duration::from_secs(2)).validate("r", &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
    }
}
