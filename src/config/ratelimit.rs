//! The `rate_limit` config section: where the shared counters live, what happens when they
//! are unreachable, and the named policies routes refer to.

use std::fmt;
use std::time::Duration;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use super::types::{join, Dur, FieldError};

/// Largest accepted window: the Lua script does its arithmetic in doubles (exact up to 2^53),
/// and `limit * window_ms` must stay exact for the decision to be exact.
pub const MAX_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);
/// Largest accepted limit, for the same exactness reason as [`MAX_WINDOW`].
pub const MAX_LIMIT: u64 = 1_000_000_000;

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Where the counters shared by every replica live. `None` keeps limits per replica
    /// (in-process only), which is fine for one replica and for local development.
    /// `redis://host:port`, `redis+cluster://h1:p1,h2:p2` or a comma-separated list of
    /// `redis://` node URLs (the latter two use the Redis Cluster client).
    pub redis_url: Option<String>,
    /// What a request gets while Redis is unreachable.
    pub on_redis_error: OnRedisError,
    /// Bound on establishing a Redis connection, so a black-holed Redis fails fast.
    pub connect_timeout: Dur,
    /// Bound on one rate-limit decision round trip: this is latency every request pays when
    /// Redis is slow, so it is short; past it the request is decided locally.
    pub command_timeout: Dur,
    /// How many gateway replicas share the limit; used to shrink the per-replica fallback limit,
    /// and as the count of replicas sharing each upstream's concurrency `initial_limit` until
    /// the replicas have counted each other in Redis (always, without Redis).
    pub expected_replicas: u32,
    /// While falling back, enforce `ceil(limit / expected_replicas)` per replica so the fleet
    /// as a whole stays near the configured limit instead of N times it.
    pub fallback_divide_by_replicas: bool,
    /// Count denied requests too: clients that keep hammering while limited stay limited.
    /// Off by default so a well-behaved client that backs off recovers on schedule.
    pub count_denied: bool,
    /// Also send the pre-standard `X-RateLimit-Limit/-Remaining/-Reset` headers that older
    /// clients read.
    pub legacy_headers: bool,
    /// Namespace for every key, so several gateways (or environments) can share one Redis.
    pub key_prefix: String,
    pub policies: Vec<PolicyConfig>,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            redis_url: None,
            on_redis_error: OnRedisError::Fallback,
            connect_timeout: Dur::from_millis(200),
            command_timeout: Dur::from_millis(50),
            expected_replicas: 1,
            fallback_divide_by_replicas: false,
            count_denied: false,
            legacy_headers: false,
            key_prefix: "dsgw:rl".to_string(),
            policies: default_policies(),
        }
    }
}

/// `default` guards the data and analytics routes; `auth` is much tighter because login and
/// register are where credential stuffing happens. (`ws` and `auth_failures` are built in:
/// see [`builtin_policy`].)
pub fn default_policies() -> Vec<PolicyConfig> {
    vec![
        PolicyConfig {
            name: "default".to_string(),
            limit: 100,
            window: Dur::from_secs(60),
            key: KeySource::Ip,
        },
        PolicyConfig {
            name: "auth".to_string(),
            limit: 10,
            window: Dur::from_secs(60),
            key: KeySource::Ip,
        },
    ]
}

/// Policies the gateway uses on its own account, present even when a config's
/// `rate_limit.policies` does not list them; a policy of the same name overrides the built-in.
/// `auth_failures`: failed token verifications per client IP (`auth.failure_policy`), 20 per
/// minute; `ws`: WebSocket upgrades per client IP (each is a long-lived connection), 20 per
/// minute. Built in rather than in the default list so that a config which lists its own
/// policies keeps working with the embedded routes that use them.
pub fn builtin_policy(name: &str) -> Option<PolicyConfig> {
    match name {
        "ws" => Some(PolicyConfig {
            name: name.to_string(),
            limit: 20,
            window: Dur::from_secs(60),
            key: KeySource::Ip,
        }),
        "auth_failures" => Some(PolicyConfig {
            name: name.to_string(),
            limit: 20,
            window: Dur::from_secs(60),
            key: KeySource::Ip,
        }),
        _ => None,
    }
}

impl RateLimitConfig {
    /// The configured policies plus the built-in `wanted` ones they do not override.
    pub fn with_builtins<'a>(&self, wanted: impl IntoIterator<Item = &'a str>) -> RateLimitConfig {
        let mut cfg = self.clone();
        for name in wanted {
            if !cfg.policies.iter().any(|p| p.name == name) {
                cfg.policies.extend(builtin_policy(name));
            }
        }
        cfg
    }
}

/// The behaviour while Redis is unreachable (down, slow past `command_timeout`, or in backoff).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnRedisError {
    /// Decide with the in-process limiter (per replica): still limited, never a 500.
    #[default]
    Fallback,
    /// Let requests through unlimited (counted as `error_allowed`).
    Allow,
    /// Refuse with 503 (counted as `error_denied`): for limits that protect money.
    Deny,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Routes refer to the policy by this name; it is also sent to clients in `RateLimit`.
    pub name: String,
    /// Requests allowed per window.
    pub limit: u64,
    #[serde(default = "default_window")]
    pub window: Dur,
    /// What identifies "one client" for this policy.
    #[serde(default)]
    pub key: KeySource,
}

fn default_window() -> Dur {
    Dur::from_secs(60)
}

/// Which part of the request the counter is keyed on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum KeySource {
    /// The client address, IPv6 by `server.ipv6_client_prefix` (see [`crate::client`]).
    #[default]
    Ip,
    /// The verified user id; anonymous requests fall back to the client address.
    User,
    /// A request header (stored lower-case); requests without it fall back to the client address.
    Header(String),
    /// The route template: one budget shared by every client of the route.
    Route,
}

impl KeySource {
    pub fn parse(text: &str) -> Result<KeySource, String> {
        let t = text.trim();
        if let Some(name) = t.strip_prefix("header:") {
            let name = name.trim();
            return match http::HeaderName::from_bytes(name.as_bytes()) {
                Ok(h) => Ok(KeySource::Header(h.as_str().to_string())),
                Err(_) => Err(format!("invalid header name {name:?} in key {text:?}")),
            };
        }
        match t {
            "ip" => Ok(KeySource::Ip),
            "user" => Ok(KeySource::User),
            "route" => Ok(KeySource::Route),
            _ => Err(format!(
                "unknown key {text:?} (expected \"ip\", \"user\", \"route\" or \"header:<Name>\")"
            )),
        }
    }
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Ip => f.write_str("ip"),
            KeySource::User => f.write_str("user"),
            KeySource::Route => f.write_str("route"),
            KeySource::Header(h) => write!(f, "header:{h}"),
        }
    }
}

impl Serialize for KeySource {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for KeySource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        KeySource::parse(&text).map_err(de::Error::custom)
    }
}

/// Policy names travel in Redis keys and in an HTTP structured-field string, so they are kept
/// to a conservative alphabet that needs no escaping in either place.
fn valid_policy_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// What the Redis URL means: the client kind and the node list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum RedisTarget {
    Single(String),
    Cluster(Vec<String>),
}

/// Splits `redis_url` into a single node or a cluster node list, or says what is wrong.
pub(crate) fn parse_redis_target(url: &str) -> Result<RedisTarget, String> {
    let url = url.trim();
    if let Some(rest) = url.strip_prefix("redis+cluster://") {
        let nodes: Vec<String> = rest
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(|n| {
                if n.contains("://") {
                    n.to_string()
                } else {
                    format!("redis://{n}")
                }
            })
            .collect();
        if nodes.is_empty() {
            return Err("redis+cluster:// needs at least one host:port".to_string());
        }
        for n in &nodes {
            check_node_url(n)?;
        }
        return Ok(RedisTarget::Cluster(nodes));
    }
    if url.contains(',') {
        let nodes: Vec<String> = url.split(',').map(|n| n.trim().to_string()).collect();
        for n in &nodes {
            check_node_url(n)?;
        }
        return Ok(RedisTarget::Cluster(nodes));
    }
    check_node_url(url)?;
    Ok(RedisTarget::Single(url.to_string()))
}

fn check_node_url(url: &str) -> Result<(), String> {
    let scheme = url.split("://").next().unwrap_or_default();
    if !url.contains("://") {
        return Err(format!(
            "{url:?} has no scheme (expected redis://host:port)"
        ));
    }
    match scheme {
        "redis" | "redis+unix" | "unix" => {}
        "rediss" => {
            return Err(
                "rediss:// (TLS to Redis) is not compiled into this build; use redis://"
                    .to_string(),
            )
        }
        other => {
            return Err(format!(
                "unsupported scheme {other:?} (expected redis://, redis+cluster:// or a \
                 comma-separated list of redis:// nodes)"
            ))
        }
    }
    redis::IntoConnectionInfo::into_connection_info(url)
        .map(|_| ())
        .map_err(|e| format!("invalid Redis URL: {e}"))
}

impl RateLimitConfig {
    /// Appends every problem found, each located by its field path under `path`.
    pub fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        if let Some(url) = &self.redis_url {
            if let Err(msg) = parse_redis_target(url) {
                errors.push(FieldError::new(join(path, "redis_url"), msg));
            }
        }
        if self.connect_timeout.0.is_zero() {
            errors.push(FieldError::new(
                join(path, "connect_timeout"),
                "must be greater than 0",
            ));
        }
        if self.command_timeout.0.is_zero() {
            errors.push(FieldError::new(
                join(path, "command_timeout"),
                "must be greater than 0",
            ));
        }
        if self.expected_replicas == 0 {
            errors.push(FieldError::new(
                join(path, "expected_replicas"),
                "must be at least 1",
            ));
        }
        let prefix = &self.key_prefix;
        if prefix.is_empty() {
            errors.push(FieldError::new(
                join(path, "key_prefix"),
                "must not be empty",
            ));
        } else if prefix
            .bytes()
            .any(|b| b == b'{' || b == b'}' || !b.is_ascii_graphic())
        {
            // A brace would move the Redis Cluster hash tag into the prefix and put every
            // counter of every client in one slot.
            errors.push(FieldError::new(
                join(path, "key_prefix"),
                "must be printable ASCII without spaces or braces",
            ));
        }
        for (i, p) in self.policies.iter().enumerate() {
            let at = join(path, &format!("policies[{i}]"));
            if !valid_policy_name(&p.name) {
                errors.push(FieldError::new(
                    join(&at, "name"),
                    "must be 1-64 characters of A-Z, a-z, 0-9, '_', '-', '.'",
                ));
            } else if self.policies[..i].iter().any(|q| q.name == p.name) {
                errors.push(FieldError::new(
                    join(&at, "name"),
                    format!("duplicate policy name {:?}", p.name),
                ));
            }
            if p.limit == 0 {
                errors.push(FieldError::new(join(&at, "limit"), "must be at least 1"));
            } else if p.limit > MAX_LIMIT {
                errors.push(FieldError::new(
                    join(&at, "limit"),
                    format!("must be at most {MAX_LIMIT}"),
                ));
            }
            let w = p.window.0;
            if w < Duration::from_secs(1) {
                errors.push(FieldError::new(join(&at, "window"), "must be at least 1s"));
            } else if w.subsec_nanos() != 0 {
                // The RateLimit-Policy `w` parameter is whole seconds.
                errors.push(FieldError::new(
                    join(&at, "window"),
                    "must be a whole number of seconds",
                ));
            } else if w > MAX_WINDOW {
                errors.push(FieldError::new(join(&at, "window"), "must be at most 24h"));
            }
            if let KeySource::Header(h) = &p.key {
                if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                    errors.push(FieldError::new(
                        join(&at, "key"),
                        format!("invalid header name {h:?}"),
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors_of(cfg: &RateLimitConfig) -> Vec<String> {
        let mut errors = Vec::new();
        cfg.validate("rate_limit", &mut errors);
        errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn defaults_are_valid_and_match_the_contract() {
        let cfg = RateLimitConfig::default();
        assert!(errors_of(&cfg).is_empty());
        assert_eq!(cfg.policies[0].name, "default");
        assert_eq!(cfg.policies[0].limit, 100);
        assert_eq!(cfg.policies[1].name, "auth");
        assert_eq!(cfg.policies[1].limit, 10);
        assert_eq!(cfg.command_timeout, Dur::from_millis(50));
    }

    #[test]
    fn parses_toml_with_key_sources() {
        let cfg: RateLimitConfig = toml::from_str(
            r#"
            redis_url = "redis://127.0.0.1:6379"
            on_redis_error = "deny"
            policies = [
              { name = "a", limit = 5, window = "10s", key = "header:X-Api-Key" },
              { name = "b", limit = 7, key = "user" },
              { name = "c", limit = 7, key = "route" },
            ]
            "#,
        )
        .unwrap();
        assert_eq!(cfg.on_redis_error, OnRedisError::Deny);
        assert_eq!(cfg.policies[0].key, KeySource::Header("x-api-key".into()));
        assert_eq!(cfg.policies[1].key, KeySource::User);
        assert_eq!(cfg.policies[1].window, Dur::from_secs(60));
        assert_eq!(cfg.policies[2].key, KeySource::Route);
        assert!(errors_of(&cfg).is_empty());
        let back = toml::to_string(&cfg).unwrap();
        assert!(back.contains("header:x-api-key"), "{back}");
    }

    #[test]
    fn rejects_unknown_fields_and_keys() {
        assert!(toml::from_str::<RateLimitConfig>("redis = \"x\"").is_err());
        let e = toml::from_str::<RateLimitConfig>(
            "policies = [{ name = \"a\", limit = 1, key = \"cookie\" }]",
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown key"), "{e}");
    }

    #[test]
    fn validation_names_the_field() {
        let mut cfg = RateLimitConfig {
            redis_url: Some("http://localhost".into()),
            key_prefix: "a{b}".into(),
            ..RateLimitConfig::default()
        };
        cfg.policies.push(PolicyConfig {
            name: "default".into(),
            limit: 0,
            window: Dur::from_millis(500),
            key: KeySource::Ip,
        });
        let errs = errors_of(&cfg);
        let want = [
            "rate_limit.redis_url: unsupported scheme \"http\"",
            "rate_limit.key_prefix: must be printable ASCII",
            "rate_limit.policies[2].name: duplicate policy name \"default\"",
            "rate_limit.policies[2].limit: must be at least 1",
            "rate_limit.policies[2].window: must be at least 1s",
        ];
        for w in want {
            assert!(
                errs.iter().any(|e| e.starts_with(w)),
                "{w} not in {errs:#?}"
            );
        }
        assert_eq!(errs.len(), want.len(), "{errs:#?}");
    }

    #[test]
    fn redis_targets() {
        assert_eq!(
            parse_redis_target("redis://a:1").unwrap(),
            RedisTarget::Single("redis://a:1".into())
        );
        assert_eq!(
            parse_redis_target("redis+cluster://a:1,b:2").unwrap(),
            RedisTarget::Cluster(vec!["redis://a:1".into(), "redis://b:2".into()])
        );
        assert_eq!(
            parse_redis_target("redis://a:1, redis://b:2").unwrap(),
            RedisTarget::Cluster(vec!["redis://a:1".into(), "redis://b:2".into()])
        );
        assert!(parse_redis_target("rediss://a:1")
            .unwrap_err()
            .contains("not compiled"));
        assert!(parse_redis_target("localhost:6379").is_err());
    }
}
