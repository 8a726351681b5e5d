//! Rate limiting shared by every gateway replica.
//!
//! Where to start reading: [`RateLimiter::check`], which decides a request against every
//! policy of its route at once and says who decided ([`Decision::source`]). The settings are
//! `config::ratelimit` (the `[rate_limit]` section and its validation).
//!
//! - this file: [`RateLimiter`] (the backend choice, the Redis guard below, the metrics) and
//!   [`Decision`], which becomes the response headers.
//! - `sliding`: the sliding-window counter arithmetic (pure, unit-tested).
//! - `redis`: the Lua script that decides a whole request in one atomic round trip.
//! - `local`: the same algorithm in process, for no-Redis setups and Redis outages.
//! - `keys`: subject hashing and the Redis key layout (hash tags for Cluster).
//! - `headers`: `RateLimit` / `RateLimit-Policy` / `Retry-After` formatting.
//! - `fleet`: how many gateway replicas share the upstreams, announced in the same Redis
//!   (the divisor of each upstream's `initial_limit`, `upstream::concurrency::Fleet`).
//!
//! Redis is guarded by a small breaker: after a failure or timeout, requests are decided
//! without touching Redis while a background task probes it (one `SCRIPT LOAD`) with a short
//! backoff (250 ms doubling to 1 s); the first successful probe switches back, so every replica
//! is on Redis again within about a second of it accepting connections (with a 1 -> 10 s
//! backoff a replica took up to 11 s, admitting against its local window all that time). A probe
//! a second is cheap for Redis and for us. Each switch is logged once and exported as
//! `gateway_ratelimit_backend{state}` (`redis`, `fallback`, or `local` when no Redis is
//! configured); every decision is counted in
//! `gateway_ratelimit_decisions_total{policy,decision}`.

mod fleet;
mod headers;
mod keys;
mod local;
mod redis;
mod sliding;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use tokio::time::Instant;

pub use self::headers::{RATELIMIT, RATELIMIT_POLICY};
use crate::config::ratelimit::{parse_redis_target, MAX_WINDOW};
use crate::config::{KeySource, OnRedisError, RateLimitConfig};

use self::keys::SubjectHash;
use self::local::{LocalLimiter, LocalPolicy};
use self::redis::{RedisConn, ScriptOutcome};

/// First wait after Redis fails before probing it again.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Longest wait between probes of a Redis that stays down: bounds how long a replica keeps
/// deciding alone (each replica's local window admits up to the whole limit) after Redis is back.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What a request is counted against.
#[derive(Clone, Copy, Debug)]
pub struct Subject<'a> {
    /// The client (IPv6 grouped by prefix): the `ip` key source.
    pub client: crate::client::ClientKey,
    /// The verified user id, when the route authenticated the request.
    pub user_id: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
    /// The route template (never the raw path), for `key = "route"` policies.
    pub route: &'a str,
}

/// A policy resolved at startup, so the request path never looks names up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyId(usize);

/// Where the limiter currently sends decisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    /// Shared counters in Redis: the limit holds across all replicas.
    Redis,
    /// Redis is configured but unreachable: in-process counters until a probe succeeds.
    Fallback,
    /// No Redis configured: in-process counters, limits are per replica by design.
    LocalOnly,
}

/// Who produced a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecisionSource {
    /// The shared counters in Redis: every replica saw this request.
    Redis,
    /// The in-process counters: no Redis is configured, or it is unreachable and
    /// `on_redis_error = "local"`; other replicas did not see this request.
    Local,
    /// Redis was unreachable and `on_redis_error` is allow or deny: nothing was counted.
    Unlimited,
}

/// One policy's verdict and numbers, for headers and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyOutcome {
    pub name: Arc<str>,
    /// The limit actually enforced (the per-replica share while falling back, if configured).
    pub limit: u64,
    pub window_secs: u64,
    /// Whether this policy alone would have admitted the request.
    pub allowed: bool,
    /// Requests still available under this policy right now.
    pub remaining: u64,
    /// Until the current fixed window rolls over.
    pub reset_ms: u64,
    /// Until one more request would fit (0 when this policy admits).
    pub retry_ms: u64,
}

/// The answer for one request.
#[derive(Clone, Debug)]
pub struct Decision {
    /// Every policy admitted the request.
    pub allowed: bool,
    /// Redis is down and `on_redis_error = "deny"`: answer 503, not 429.
    pub unavailable: bool,
    /// Which counters decided: the shared ones, this replica's own, or none (logged and
    /// exported, so a limit that was only per replica during an outage can be told apart).
    pub source: DecisionSource,
    /// Per checked policy, in the order given to `check`.
    pub policies: Vec<PolicyOutcome>,
    /// Set only when refused: the wait before a retry can succeed.
    retry_after_ms: Option<u64>,
    /// Copied from config so `apply_headers` needs nothing else.
    legacy_headers: bool,
}

impl Decision {
    fn allow_all() -> Decision {
        Decision {
            allowed: true,
            unavailable: false,
            source: DecisionSource::Unlimited,
            policies: Vec::new(),
            retry_after_ms: None,
            legacy_headers: false,
        }
    }

    /// Adds `RateLimit-Policy` and `RateLimit`, the legacy `X-RateLimit-*` trio when
    /// configured, and `Retry-After` when refused.
    pub fn apply_headers(&self, headers: &mut http::HeaderMap) {
        headers::apply(self, headers);
    }

    /// Whole seconds, rounded up, before a retry can succeed; `None` when allowed.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after_ms.map(|ms| headers::ceil_secs(ms).max(1))
    }

    /// Names of the policies that refused the request (for the 429 body and logs).
    pub fn violated_policies(&self) -> impl Iterator<Item = &str> {
        self.policies
            .iter()
            .filter(|p| !p.allowed)
            .map(|p| &*p.name)
    }
}

struct Policy {
    name: Arc<str>,
    limit: u64,
    /// The limit the in-process limiter enforces (divided by replicas when configured).
    local_limit: u64,
    window_ms: u64,
    key: KeySource,
}

struct RedisBackend {
    /// Swappable so a probe can replace a connection that stopped recovering by itself.
    conn: RwLock<RedisConn>,
    target: crate::config::ratelimit::RedisTarget,
    script: ::redis::Script,
    connect_timeout: Duration,
    command_timeout: Duration,
    /// Current backend: `STATE_REDIS` or `STATE_FALLBACK`; flipped by compare-exchange so
    /// each transition is logged and exported exactly once.
    state: AtomicU8,
    /// When the current outage's breaker opened; answers `Retry-After` for 503s.
    open_until: Mutex<Option<Instant>>,
}

const STATE_REDIS: u8 = 0;
const STATE_FALLBACK: u8 = 1;

struct Inner {
    policies: Vec<Policy>,
    by_name: HashMap<String, PolicyId>,
    local: LocalLimiter,
    redis: Option<RedisBackend>,
    on_redis_error: OnRedisError,
    count_denied: bool,
    legacy_headers: bool,
    key_prefix: String,
}

/// The rate limiter; cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct RateLimiter {
    inner: Arc<Inner>,
}

fn set_backend_gauge(redis: bool) {
    let (r, f) = if redis { (1.0, 0.0) } else { (0.0, 1.0) };
    metrics::gauge!("gateway_ratelimit_backend", "state" => "redis").set(r);
    metrics::gauge!("gateway_ratelimit_backend", "state" => "fallback").set(f);
    metrics::gauge!("gateway_ratelimit_backend", "state" => "local").set(0.0);
}

/// No Redis configured: in-process limiting is the configuration, not a failure, so it is
/// `local`, never `fallback` (which alerts).
fn set_local_gauge() {
    metrics::gauge!("gateway_ratelimit_backend", "state" => "redis").set(0.0);
    metrics::gauge!("gateway_ratelimit_backend", "state" => "fallback").set(0.0);
    metrics::gauge!("gateway_ratelimit_backend", "state" => "local").set(1.0);
}

fn count_decision(policy: &Arc<str>, decision: &'static str) {
    metrics::counter!(
        "gateway_ratelimit_decisions_total",
        "policy" => policy.to_string(),
        "decision" => decision
    )
    .increment(1);
}

impl RateLimiter {
    /// Builds the limiter. Never fails because Redis is down: it then starts in fallback and
    /// probes Redis in the background. Logs once which backend is in use. Expects a config
    /// that passed `validate`; invalid policies are skipped with an error log rather than
    /// taking the gateway down.
    pub async fn new(cfg: &RateLimitConfig) -> RateLimiter {
        let divisor = if cfg.fallback_divide_by_replicas {
            u64::from(cfg.expected_replicas.max(1))
        } else {
            1
        };
        let mut policies = Vec::new();
        let mut by_name = HashMap::new();
        for p in &cfg.policies {
            let window_ms = p.window.0.as_millis() as u64;
            if p.limit == 0 || window_ms < 1000 || by_name.contains_key(&p.name) {
                tracing::error!(policy = %p.name, "invalid rate-limit policy skipped");
                continue;
            }
            by_name.insert(p.name.clone(), PolicyId(policies.len()));
            policies.push(Policy {
                name: p.name.as_str().into(),
                limit: p.limit,
                local_limit: p.limit.div_ceil(divisor),
                window_ms: window_ms.min(MAX_WINDOW.as_millis() as u64),
                key: p.key.clone(),
            });
        }
        let max_window = policies
            .iter()
            .map(|p| Duration::from_millis(p.window_ms))
            .max()
            .unwrap_or(Duration::from_secs(60));

        let redis = match &cfg.redis_url {
            None => None,
            Some(url) => {
                let opened = parse_redis_target(url).and_then(|target| {
                    RedisConn::open(&target, cfg.connect_timeout.0, cfg.command_timeout.0)
                        .map(|conn| (target, conn))
                        .map_err(|e| e.to_string())
                });
                match opened {
                    Ok((target, conn)) => Some(RedisBackend {
                        conn: RwLock::new(conn),
                        target,
                        script: redis::script(),
                        connect_timeout: cfg.connect_timeout.0,
                        command_timeout: cfg.command_timeout.0,
                        state: AtomicU8::new(STATE_FALLBACK),
                        open_until: Mutex::new(None),
                    }),
                    Err(e) => {
                        tracing::error!(error = %e, "rate_limit.redis_url unusable; limits are per replica");
                        None
                    }
                }
            }
        };

        let limiter = RateLimiter {
            inner: Arc::new(Inner {
                policies,
                by_name,
                local: LocalLimiter::new(max_window),
                redis,
                on_redis_error: cfg.on_redis_error,
                count_denied: cfg.count_denied,
                legacy_headers: cfg.legacy_headers,
                key_prefix: cfg.key_prefix.clone(),
            }),
        };

        match &limiter.inner.redis {
            // A redis_url that cannot be used is a failure (`fallback`); none at all is not.
            None if cfg.redis_url.is_some() => set_backend_gauge(false),
            None => {
                set_local_gauge();
                tracing::info!(
                    "rate limiting: in-process only (no redis_url); limits are per replica"
                );
            }
            Some(backend) => match probe(backend).await {
                Ok(()) => {
                    backend.state.store(STATE_REDIS, Ordering::SeqCst);
                    set_backend_gauge(true);
                    tracing::info!(
                        cluster = backend.target_is_cluster(),
                        "rate limiting: shared through Redis"
                    );
                }
                Err(e) => {
                    set_backend_gauge(false);
                    tracing::warn!(
                        error = %e,
                        "rate limiting: Redis unreachable at startup; using in-process fallback \
                         and retrying in the background"
                    );
                    *lock(&backend.open_until) = Some(Instant::now() + BACKOFF_MIN);
                    spawn_prober(Arc::downgrade(&limiter.inner));
                }
            },
        }
        limiter
    }

    /// Keeps `fleet`'s replica count: announced in this limiter's Redis while the limiter
    /// lives (see `fleet.rs`), or `expected` (`rate_limit.expected_replicas`) without Redis.
    pub fn keep_fleet(&self, fleet: &Arc<crate::upstream::concurrency::Fleet>, expected: usize) {
        match &self.inner.redis {
            Some(_) => fleet::announce(Arc::downgrade(&self.inner), fleet.clone()),
            None => fleet.set_replicas(expected),
        }
    }

    /// The handle of a configured policy.
    pub fn policy(&self, name: &str) -> Option<PolicyId> {
        self.inner.by_name.get(name).copied()
    }

    pub fn backend_state(&self) -> BackendState {
        match &self.inner.redis {
            None => BackendState::LocalOnly,
            Some(b) if b.state.load(Ordering::SeqCst) == STATE_REDIS => BackendState::Redis,
            Some(_) => BackendState::Fallback,
        }
    }

    /// Decides one request against `policies`, all in one Redis round trip and atomically:
    /// a denial by any policy is counted against none (unless `count_denied`).
    pub async fn check(&self, policies: &[PolicyId], subject: &Subject<'_>) -> Decision {
        let inner = &*self.inner;
        let mut ids: Vec<usize> = Vec::with_capacity(policies.len());
        for id in policies {
            // Unknown ids cannot come from `policy()`; duplicates would count twice.
            if id.0 < inner.policies.len() && !ids.contains(&id.0) {
                ids.push(id.0);
            }
        }
        if ids.is_empty() {
            return Decision::allow_all();
        }
        let hashes: Vec<SubjectHash> = ids
            .iter()
            .map(|&i| keys::subject_hash(&inner.policies[i].key, subject))
            .collect();

        if let Some(backend) = &inner.redis {
            if backend.state.load(Ordering::SeqCst) == STATE_REDIS {
                match self.check_redis(backend, &ids, &hashes).await {
                    Ok(decision) => return decision,
                    Err(e) => self.redis_failed(backend, &e),
                }
            }
            match inner.on_redis_error {
                OnRedisError::Fallback => {}
                OnRedisError::Allow => {
                    for &i in &ids {
                        count_decision(&inner.policies[i].name, "error_allowed");
                    }
                    return Decision::allow_all();
                }
                OnRedisError::Deny => {
                    for &i in &ids {
                        count_decision(&inner.policies[i].name, "error_denied");
                    }
                    let wait = lock(&backend.open_until)
                        .map(|t| t.saturating_duration_since(Instant::now()))
                        .unwrap_or(BACKOFF_MIN);
                    return Decision {
                        allowed: false,
                        unavailable: true,
                        source: DecisionSource::Unlimited,
                        policies: Vec::new(),
                        retry_after_ms: Some(wait.as_millis() as u64),
                        legacy_headers: false,
                    };
                }
            }
        }
        self.check_local(&ids, &hashes)
    }

    fn check_local(&self, ids: &[usize], hashes: &[SubjectHash]) -> Decision {
        let inner = &*self.inner;
        let local: Vec<LocalPolicy<'_>> = ids
            .iter()
            .zip(hashes)
            .map(|(&i, h)| {
                let p = &inner.policies[i];
                LocalPolicy {
                    index: i,
                    subject: *h,
                    limit: p.local_limit,
                    window_ms: p.window_ms,
                    name: &p.name,
                }
            })
            .collect();
        let (allowed, outcomes) = inner.local.check(&local, inner.count_denied);
        self.finish(allowed, outcomes, DecisionSource::Local)
    }

    async fn check_redis(
        &self,
        backend: &RedisBackend,
        ids: &[usize],
        hashes: &[SubjectHash],
    ) -> Result<Decision, String> {
        let inner = &*self.inner;
        let mut conn = read(&backend.conn).clone();
        let anchor = conn.is_cluster().then_some(&hashes[0]);
        let mut invocation = backend.script.prepare_invoke();
        invocation.arg(u8::from(inner.count_denied));
        for (&i, h) in ids.iter().zip(hashes) {
            let p = &inner.policies[i];
            invocation.key(keys::redis_key(&inner.key_prefix, &p.name, h, anchor));
            invocation.arg(p.limit).arg(p.window_ms);
        }
        let reply: Vec<i64> =
            tokio::time::timeout(backend.command_timeout, invocation.invoke_async(&mut conn))
                .await
                .map_err(|_| format!("no answer within {:?}", backend.command_timeout))?
                .map_err(|e| e.to_string())?;
        let (allowed, outcomes) = redis::parse_reply(&reply, ids.len())
            .ok_or_else(|| format!("unexpected script reply {reply:?}"))?;
        let outcomes = ids
            .iter()
            .zip(outcomes)
            .map(|(&i, o): (&usize, ScriptOutcome)| {
                let p = &inner.policies[i];
                PolicyOutcome {
                    name: p.name.clone(),
                    limit: p.limit,
                    window_secs: p.window_ms / 1000,
                    allowed: o.allowed,
                    remaining: o.remaining,
                    reset_ms: o.reset_ms,
                    retry_ms: o.retry_ms,
                }
            })
            .collect();
        Ok(self.finish(allowed, outcomes, DecisionSource::Redis))
    }

    fn finish(
        &self,
        allowed: bool,
        outcomes: Vec<PolicyOutcome>,
        source: DecisionSource,
    ) -> Decision {
        for o in &outcomes {
            count_decision(&o.name, if o.allowed { "allowed" } else { "denied" });
        }
        let retry_after_ms = if allowed {
            None
        } else {
            Some(outcomes.iter().map(|o| o.retry_ms).max().unwrap_or(0))
        };
        Decision {
            allowed,
            unavailable: false,
            source,
            policies: outcomes,
            retry_after_ms,
            legacy_headers: self.inner.legacy_headers,
        }
    }

    /// Opens the breaker (once per outage) and starts the background prober.
    fn redis_failed(&self, backend: &RedisBackend, error: &str) {
        if backend
            .state
            .compare_exchange(
                STATE_REDIS,
                STATE_FALLBACK,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
        {
            *lock(&backend.open_until) = Some(Instant::now() + BACKOFF_MIN);
            set_backend_gauge(false);
            tracing::warn!(
                error = %error,
                fallback = ?self.inner.on_redis_error,
                "rate limiting: Redis failed; switching to fallback until it answers again"
            );
            spawn_prober(Arc::downgrade(&self.inner));
        }
    }
}

impl RedisBackend {
    fn target_is_cluster(&self) -> bool {
        matches!(
            self.target,
            crate::config::ratelimit::RedisTarget::Cluster(_)
        )
    }
}

/// One health check: loads the script (which also proves the server answers, and on a
/// cluster loads it on every primary), bounded by connect + command timeouts.
async fn probe(backend: &RedisBackend) -> Result<(), String> {
    let mut conn = read(&backend.conn).clone();
    let bound = backend.connect_timeout + backend.command_timeout;
    let attempt = async {
        match backend.script.load_async(&mut conn).await {
            // A connection that failed earlier reports that old failure once and starts
            // reconnecting; the second attempt waits for that fresh connection, so a Redis
            // that is back is adopted now rather than one backoff later.
            Err(e) if e.is_io_error() || e.is_connection_dropped() => {
                backend.script.load_async(&mut conn).await
            }
            other => other,
        }
    };
    match tokio::time::timeout(bound, attempt).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {bound:?}")),
    }
}

/// Probes Redis with doubling backoff until it answers, then switches back to it. Holds only
/// a weak reference so a dropped limiter stops its prober.
fn spawn_prober(inner: Weak<Inner>) {
    tokio::spawn(async move {
        let mut backoff = BACKOFF_MIN;
        let mut failures = 0u32;
        loop {
            tokio::time::sleep(backoff).await;
            let Some(inner) = inner.upgrade() else { return };
            let Some(backend) = &inner.redis else { return };
            match probe(backend).await {
                Ok(()) => {
                    *lock(&backend.open_until) = None;
                    backend.state.store(STATE_REDIS, Ordering::SeqCst);
                    set_backend_gauge(true);
                    tracing::info!("rate limiting: Redis answers again; limits are shared again");
                    return;
                }
                Err(e) => {
                    failures += 1;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    *lock(&backend.open_until) = Some(Instant::now() + backoff);
                    tracing::debug!(error = %e, failures, "rate limiting: Redis probe failed");
                    // The connection recovers by itself after I/O errors; a fresh client
                    // every few seconds of failures covers states it does not recover from
                    // (e.g. a cluster whose every node was replaced).
                    if failures.is_multiple_of(5) {
                        if let Ok(conn) = RedisConn::open(
                            &backend.target,
                            backend.connect_timeout,
                            backend.command_timeout,
                        ) {
                            *write(&backend.conn) = conn;
                        }
                    }
                }
            }
        }
    });
}

// Lock helpers: a poisoned lock means a panic elsewhere while holding it; the guarded values
// (a connection handle, a deadline) are still valid, so keep going instead of panicking too.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}
fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PolicyConfig;
    use http::HeaderMap;

    fn cfg(policies: Vec<PolicyConfig>) -> RateLimitConfig {
        RateLimitConfig {
            policies,
            ..RateLimitConfig::default()
        }
    }

    fn pol(name: &str, limit: u64, window_s: u64, key: KeySource) -> PolicyConfig {
        PolicyConfig {
            name: name.into(),
            limit,
            window: crate::config::Dur::from_secs(window_s),
            key,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn local_only_limiter_end_to_end() {
        let rl = RateLimiter::new(&cfg(vec![pol("p", 3, 10, KeySource::Ip)])).await;
        assert_eq!(rl.backend_state(), BackendState::LocalOnly);
        let p = rl.policy("p").unwrap();
        assert!(rl.policy("nope").is_none());
        let headers = HeaderMap::new();
        let subject = Subject {
            client: "192.0.2.1".parse().unwrap(),
            user_id: None,
            headers: &headers,
            route: "/r",
        };
        for _ in 0..3 {
            assert!(
                rl.check(&[p, p], &subject).await.allowed,
                "duplicates count once"
            );
        }
        let d = rl.check(&[p], &subject).await;
        assert!(!d.allowed && !d.unavailable);
        assert_eq!(d.source, DecisionSource::Local);
        // 3 in a fresh 10 s window: the next fits 10 s + ceil(1/3 * 10 s) later.
        assert_eq!(d.retry_after_secs(), Some(14));
        let mut h = HeaderMap::new();
        d.apply_headers(&mut h);
        assert_eq!(h["retry-after"], "14");
        assert_eq!(h["ratelimit"], "\"p\";r=0;t=14");
        tokio::time::advance(Duration::from_millis(13_334)).await;
        assert!(rl.check(&[p], &subject).await.allowed);
        assert!(rl.check(&[], &subject).await.allowed);
    }

    #[tokio::test(start_paused = true)]
    async fn fallback_share_is_divided_by_replicas() {
        let mut c = cfg(vec![pol("p", 10, 60, KeySource::Ip)]);
        c.expected_replicas = 3;
        c.fallback_divide_by_replicas = true;
        let rl = RateLimiter::new(&c).await;
        let p = rl.policy("p").unwrap();
        let headers = HeaderMap::new();
        let subject = Subject {
            client: "192.0.2.1".parse().unwrap(),
            user_id: None,
            headers: &headers,
            route: "/r",
        };
        let mut n = 0;
        while rl.check(&[p], &subject).await.allowed {
            n += 1;
        }
        assert_eq!(n, 4, "ceil(10 / 3)");
    }
}
