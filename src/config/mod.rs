//! Configuration: raw serde types, the embedded DeltaStream default, validation that names the
//! field path of every problem, and environment overrides.
//!
//! Precedence, lowest first: the embedded default (the DeltaStream route table, so `serve`
//! runs with zero files) -> the `--config` TOML file -> environment variables.
//! With `inherit_defaults = true` (the default) a file *extends* the embedded table: an
//! upstream or route with the same name / path replaces the default one, others are added.

pub mod defaults;
pub mod types;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use crate::ratelimit::RateLimitConfig;
pub use crate::upstream::cache::{CacheConfig, RouteCachePolicy};
pub use crate::upstream::{BreakerConfig, RetryConfig};
pub use types::{join, ByteSize, Dur, FieldError};

/// The whole gateway configuration, after defaults and overrides.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Keep the embedded upstreams and routes and merge this file's over them.
    pub inherit_defaults: bool,
    /// Reported by `/health`; `SERVICE_NAME`.
    pub service_name: String,
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub cors: CorsConfig,
    pub limits: LimitsConfig,
    pub auth: AuthConfig,
    pub errors: ErrorsConfig,
    /// Peers (CIDRs) whose `X-Forwarded-For` / `Forwarded` are believed. Empty by default:
    /// trusting those headers from anyone lets a client choose its own rate-limit key.
    pub trusted_proxies: Vec<String>,
    /// Which client headers cross to the upstreams.
    pub headers: HeadersConfig,
    /// The shared response cache's size limits.
    pub cache: CacheConfig,
    /// Rate-limit policies and the Redis backend (`REDIS_URL`).
    pub rate_limit: RateLimitConfig,
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub host: IpAddr,
    /// `PORT`.
    pub port: u16,
    /// How long in-flight requests may run after SIGTERM/SIGINT before the process exits.
    pub shutdown_grace: Dur,
    /// How often freed heap is handed back to the kernel (glibc `malloc_trim`), so resident
    /// memory falls back after a burst; `0s` turns it off (see `server::memory`).
    pub memory_trim_interval: Dur,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Loopback by default: `/metrics` and `/admin/*` are operator-only.
    pub host: IpAddr,
    /// `ADMIN_PORT`; 0 picks a free port (tests).
    pub port: u16,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// `["*"]` (the original service's permissive default) or exact origins.
    pub allowed_origins: Vec<String>,
    pub allowed_methods: Vec<String>,
    /// `["*"]` mirrors whatever the browser asks for.
    pub allowed_headers: Vec<String>,
    /// Only allowed with explicit origins (browsers refuse credentials with `*`).
    pub allow_credentials: bool,
    pub max_age: Dur,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Larger request bodies get 413 and never reach an upstream.
    pub max_body: ByteSize,
    /// A client that has not sent its whole header section by then is disconnected
    /// (slowloris).
    pub header_read_timeout: Dur,
    /// Largest request head (request line + headers) accepted; larger gets 431.
    pub max_header_bytes: ByteSize,
    /// Concurrent client connections; further ones wait in the accept queue.
    pub max_connections: usize,
    /// Keep-alive connections idle longer than this are closed.
    pub idle_timeout: Dur,
    /// A response write that makes no progress (the client stopped reading) for this long
    /// closes the connection, freeing the upstream connection it held.
    pub send_timeout: Dur,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeadersConfig {
    /// Removed from requests of peers outside `trusted_proxies`, in any `-`/`_` spelling:
    /// client-address and routing claims that upstreams tend to believe. Replaces the
    /// default list (README, Security).
    pub strip_from_untrusted: Vec<String>,
}

impl Default for HeadersConfig {
    fn default() -> Self {
        HeadersConfig {
            strip_from_untrusted: crate::routes::headers::DEFAULT_STRIP_FROM_UNTRUSTED
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// `POST {auth}/verify` (the original behaviour).
    Remote,
    /// Verify JWTs in-process: no auth round trip, but revocation is not seen until expiry.
    Local,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub enum JwtAlgorithm {
    HS256,
    RS256,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// The upstream that answers `POST /verify`.
    pub upstream: String,
    pub verify_path: String,
    pub verify_timeout: Dur,
    /// Upper bound on how long a verification result is reused; never past the token's `exp`.
    pub cache_ttl: Dur,
    /// How long a token the verifier rejected is answered 401 without asking again, so one
    /// bad token sent N times is one verify call, not N. `0s` turns it off.
    pub negative_cache_ttl: Dur,
    /// Rate-limit policy that counts failed verifications per client (`auth_failures`, a
    /// built-in 20 per minute per IP unless `rate_limit.policies` defines one of that name);
    /// over it, that client's unverified tokens get 429 without a verify call. `""`: off.
    pub failure_policy: String,
    pub jwt_algorithm: JwtAlgorithm,
    /// HS256 secret for local mode (`JWT_SECRET` overrides).
    pub jwt_secret: Option<String>,
    /// RS256 public key (PEM file path) for local mode.
    pub jwt_public_key_file: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ErrorsConfig {
    /// Status for an upstream that is too slow: 503 (the original service) or 504.
    pub timeout_status: u16,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Base URL; `http://` or `https://` (rustls), optionally with a path prefix.
    pub url: String,
    /// Default route timeout for routes to this upstream.
    pub timeout: Dur,
    pub connect_timeout: Dur,
    pub pool_max_idle_per_host: usize,
    pub pool_idle_timeout: Dur,
    /// Calls in flight (so connections) to this upstream at most; more wait for a free one
    /// within their deadline. A bulkhead, and the bound on what upstream connections cost.
    pub max_connections: usize,
    /// The `error` text clients see when it is down (default "<Name> service unavailable").
    pub unavailable_message: Option<String>,
    /// Bounded retries on 503 and connection failures.
    pub retry: RetryConfig,
    /// The circuit breaker in front of this upstream.
    pub breaker: BreakerConfig,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RouteKind {
    /// Forward to the upstream (the generic proxy handler).
    #[default]
    Proxy,
    /// Answer `{"user_id","email"}` from the verified token; no upstream call.
    UserMe,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ParamLocation {
    Path,
    Query,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ParamDoc {
    pub name: String,
    #[serde(rename = "in")]
    pub location: ParamLocation,
    #[serde(default)]
    pub required: bool,
    /// JSON-schema type: string, integer, number or boolean.
    #[serde(default = "default_param_type", rename = "type")]
    pub schema_type: String,
    #[serde(default)]
    pub description: String,
}

fn default_param_type() -> String {
    "string".into()
}

/// What the OpenAPI document says about a route.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenApiDoc {
    pub summary: String,
    pub description: String,
    pub tags: Vec<String>,
    /// Query parameters (path parameters are documented from the template).
    pub params: Vec<ParamDoc>,
    /// Name of a documented JSON request body (`register`, `login`), if any.
    pub request_body: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteConfig {
    /// Public path template, e.g. `/api/data/underlying/{product}`; also served under `/api/v1`.
    pub path: String,
    /// GET also answers HEAD.
    pub methods: Vec<String>,
    pub kind: RouteKind,
    pub upstream: Option<String>,
    /// Upstream path template using the same `{params}`; defaults to `path`.
    pub upstream_path: Option<String>,
    /// Overall deadline including retries; defaults to the upstream's timeout.
    pub timeout: Option<Dur>,
    /// Per-attempt timeout; defaults to the route timeout.
    pub attempt_timeout: Option<Dur>,
    /// Overrides the upstream's retry count.
    pub retries: Option<u32>,
    /// POST & co. are retried only when the request never reached the upstream, unless set.
    pub retry_non_idempotent: bool,
    /// Require a verified bearer token.
    pub auth: bool,
    /// Rate-limit policy names applied to this route.
    pub rate_limit: Vec<String>,
    /// Forward the client's query string.
    pub forward_query: bool,
    /// Opt in to the shared response cache (GET/HEAD, unauthenticated requests only).
    pub cache: Option<RouteCachePolicy>,
    pub openapi: OpenApiDoc,
}

impl Default for RouteConfig {
    fn default() -> Self {
        RouteConfig {
            path: String::new(),
            methods: vec!["GET".into()],
            kind: RouteKind::Proxy,
            upstream: None,
            upstream_path: None,
            timeout: None,
            attempt_timeout: None,
            retries: None,
            retry_non_idempotent: false,
            auth: false,
            rate_limit: Vec::new(),
            forward_query: true,
            cache: None,
            openapi: OpenApiDoc::default(),
        }
    }
}

/// Everything wrong with a configuration, each located by field path.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<FieldError>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<FieldError> for ConfigErrors {
    fn from(e: FieldError) -> Self {
        ConfigErrors(vec![e])
    }
}

impl Config {
    /// The embedded default: the DeltaStream route table with env-less defaults.
    pub fn embedded() -> Config {
        Config {
            upstreams: defaults::upstreams(),
            routes: defaults::routes(),
            ..Config::default()
        }
    }

    /// Parses a TOML document (without env overrides), merging over the embedded default
    /// unless it sets `inherit_defaults = false`. Errors name the field path.
    pub fn from_toml(text: &str) -> Result<Config, ConfigErrors> {
        let de = toml::Deserializer::parse(text)
            .map_err(|e| FieldError::new("", format!("invalid TOML: {}", e.message())))?;
        let file: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            FieldError::new(path, e.into_inner().message().to_string())
        })?;
        Ok(if file.inherit_defaults {
            file.merged_over(Config::embedded())
        } else {
            file
        })
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            FieldError::new(
                "",
                format!("cannot read config file {}: {e}", path.display()),
            )
        })?;
        Config::from_toml(&text)
    }

    /// The effective configuration for `serve`: embedded default or file, then the process
    /// environment, then validation.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigErrors> {
        let mut c = match file {
            Some(p) => Config::from_file(p)?,
            None => Config::embedded(),
        };
        c.apply_env(|k| std::env::var(k).ok())?;
        c.validate()?;
        Ok(c)
    }

    fn merged_over(mut self, base: Config) -> Config {
        let mut upstreams = base.upstreams;
        upstreams.append(&mut self.upstreams);
        self.upstreams = upstreams;
        let mut routes: Vec<RouteConfig> = base
            .routes
            .into_iter()
            .filter(|r| !self.routes.iter().any(|o| o.path == r.path))
            .collect();
        routes.append(&mut self.routes);
        self.routes = routes;
        self
    }

    /// Applies the documented environment variables. `lookup` is the environment (a closure
    /// so tests need not mutate the process environment).
    pub fn apply_env(
        &mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        let parse_port = |var: &str, errors: &mut Vec<FieldError>| -> Option<u16> {
            let v = lookup(var)?;
            match v.trim().parse::<u16>() {
                Ok(p) => Some(p),
                Err(_) => {
                    errors.push(FieldError::new(var, format!("invalid port {v:?}")));
                    None
                }
            }
        };
        if let Some(p) = parse_port("PORT", &mut errors) {
            self.server.port = p;
        }
        if let Some(p) = parse_port("ADMIN_PORT", &mut errors) {
            self.admin.port = p;
        }
        if let Some(name) = lookup("SERVICE_NAME").filter(|s| !s.is_empty()) {
            self.service_name = name;
        }
        for (var, upstream) in [
            ("AUTH_SERVICE_URL", "auth"),
            ("STORAGE_SERVICE_URL", "storage"),
            ("ANALYTICS_SERVICE_URL", "analytics"),
        ] {
            if let Some(url) = lookup(var).filter(|s| !s.is_empty()) {
                match self.upstreams.get_mut(upstream) {
                    Some(u) => u.url = url,
                    None => errors.push(FieldError::new(
                        var,
                        format!("is set but the configuration has no upstream named {upstream:?}"),
                    )),
                }
            }
        }
        if let Some(url) = lookup("REDIS_URL") {
            // An empty REDIS_URL means "no Redis": the in-process limiter.
            self.rate_limit.redis_url = Some(url).filter(|u| !u.trim().is_empty());
        }
        if let Some(secret) = lookup("JWT_SECRET").filter(|s| !s.is_empty()) {
            self.auth.jwt_secret = Some(secret);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Checks everything serde cannot: references between sections, templates, ranges.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        if self.service_name.trim().is_empty() {
            errors.push(FieldError::new("service_name", "must not be empty"));
        }
        self.validate_sections(&mut errors);
        for (name, u) in &self.upstreams {
            u.validate(&format!("upstreams.{name}"), &mut errors);
        }
        for (i, r) in self.routes.iter().enumerate() {
            r.validate(&format!("routes[{i}]"), self, &mut errors);
        }
        for (i, r) in self.routes.iter().enumerate() {
            if let Some(j) = self.routes[..i].iter().position(|o| o.path == r.path) {
                errors.push(FieldError::new(
                    format!("routes[{i}].path"),
                    format!("duplicate route path {:?} (also routes[{j}])", r.path),
                ));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    fn validate_sections(&self, errors: &mut Vec<FieldError>) {
        self.cache.validate("cache", errors);
        self.rate_limit.validate("rate_limit", errors);
        let trim = self.server.memory_trim_interval.0;
        if !trim.is_zero() && trim < std::time::Duration::from_millis(100) {
            errors.push(FieldError::new(
                "server.memory_trim_interval",
                format!(
                    "must be 0s (off) or at least 100ms, got {}",
                    self.server.memory_trim_interval
                ),
            ));
        }
        if self.limits.max_body.0 == 0 {
            errors.push(FieldError::new("limits.max_body", "must be greater than 0"));
        }
        if self.limits.max_header_bytes.0 < 8192 {
            errors.push(FieldError::new(
                "limits.max_header_bytes",
                "must be at least 8KiB",
            ));
        }
        if self.limits.max_connections == 0 {
            errors.push(FieldError::new(
                "limits.max_connections",
                "must be at least 1",
            ));
        }
        if self.limits.send_timeout.0.is_zero() {
            errors.push(FieldError::new(
                "limits.send_timeout",
                "must be greater than 0",
            ));
        }
        if self.limits.header_read_timeout.0.is_zero() {
            errors.push(FieldError::new(
                "limits.header_read_timeout",
                "must be greater than 0",
            ));
        }
        if !matches!(self.errors.timeout_status, 503 | 504) {
            errors.push(FieldError::new(
                "errors.timeout_status",
                format!("must be 503 or 504, not {}", self.errors.timeout_status),
            ));
        }
        for (i, cidr) in self.trusted_proxies.iter().enumerate() {
            if parse_cidr(cidr).is_none() {
                errors.push(FieldError::new(
                    format!("trusted_proxies[{i}]"),
                    format!("invalid CIDR or IP address {cidr:?}"),
                ));
            }
        }
        for (i, name) in self.headers.strip_from_untrusted.iter().enumerate() {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                errors.push(FieldError::new(
                    format!("headers.strip_from_untrusted[{i}]"),
                    format!("invalid header name {name:?}"),
                ));
            }
        }
        for (i, m) in self.cors.allowed_methods.iter().enumerate() {
            if http::Method::from_bytes(m.as_bytes()).is_err() {
                errors.push(FieldError::new(
                    format!("cors.allowed_methods[{i}]"),
                    format!("invalid HTTP method {m:?}"),
                ));
            }
        }
        let wildcard = self.cors.allowed_origins.iter().any(|o| o == "*");
        if wildcard && self.cors.allowed_origins.len() > 1 {
            errors.push(FieldError::new(
                "cors.allowed_origins",
                "\"*\" cannot be combined with explicit origins",
            ));
        }
        if wildcard && self.cors.allow_credentials {
            errors.push(FieldError::new(
                "cors.allow_credentials",
                "cannot be true with allowed_origins = [\"*\"] (browsers reject it)",
            ));
        }
        for (i, o) in self.cors.allowed_origins.iter().enumerate() {
            if o != "*" && http::HeaderValue::from_str(o).is_err() {
                errors.push(FieldError::new(
                    format!("cors.allowed_origins[{i}]"),
                    format!("invalid origin {o:?}"),
                ));
            }
        }
        let a = &self.auth;
        let auth_needed = self
            .routes
            .iter()
            .any(|r| r.auth || r.kind == RouteKind::UserMe);
        match a.mode {
            AuthMode::Remote => {
                if auth_needed && !self.upstreams.contains_key(&a.upstream) {
                    errors.push(FieldError::new(
                        "auth.upstream",
                        format!("no upstream named {:?}", a.upstream),
                    ));
                }
                if !a.verify_path.starts_with('/') {
                    errors.push(FieldError::new("auth.verify_path", "must start with '/'"));
                }
            }
            AuthMode::Local => match a.jwt_algorithm {
                JwtAlgorithm::HS256 if a.jwt_secret.as_deref().unwrap_or("").is_empty() => errors
                    .push(FieldError::new(
                        "auth.jwt_secret",
                        "required for mode = \"local\" with HS256 (or set JWT_SECRET)",
                    )),
                JwtAlgorithm::RS256 if a.jwt_public_key_file.is_none() => errors.push(
                    FieldError::new("auth.jwt_public_key_file", "required for RS256"),
                ),
                _ => {}
            },
        }
        let failure_policy = a.failure_policy.as_str();
        if !failure_policy.is_empty()
            && !self
                .rate_limit
                .policies
                .iter()
                .any(|p| p.name == failure_policy)
            && crate::ratelimit::config::builtin_policy(failure_policy).is_none()
        {
            errors.push(FieldError::new(
                "auth.failure_policy",
                format!("no rate-limit policy named {failure_policy:?} (\"\" turns it off)"),
            ));
        }
        if a.verify_timeout.0.is_zero() {
            errors.push(FieldError::new(
                "auth.verify_timeout",
                "must be greater than 0",
            ));
        }
    }

    /// A few lines describing the effective configuration, for `check-config` and startup.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "service {:?}: public {}:{}, admin {}:{}\n",
            self.service_name, self.server.host, self.server.port, self.admin.host, self.admin.port
        );
        s.push_str(&format!("upstreams ({}):\n", self.upstreams.len()));
        for (name, u) in &self.upstreams {
            s.push_str(&format!("  {name:<10} {} (timeout {})\n", u.url, u.timeout));
        }
        s.push_str(&format!(
            "rate limiting: {}; policies: {}\n",
            match &self.rate_limit.redis_url {
                Some(url) => format!("Redis at {}", redact_url(url)),
                None => "in-process (no REDIS_URL)".to_string(),
            },
            self.rate_limit
                .policies
                .iter()
                .map(|p| format!("{} {}/{} per {}", p.name, p.limit, p.window, p.key))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        s.push_str(&format!(
            "cache: {} total, {} per entry; auth: {:?}\n",
            self.cache.max_bytes, self.cache.max_entry_bytes, self.auth.mode
        ));
        s.push_str(&format!("routes ({}):\n", self.routes.len()));
        for r in &self.routes {
            let target = match (r.kind, &r.upstream) {
                (RouteKind::UserMe, _) => "token verification only".to_string(),
                (RouteKind::Proxy, Some(u)) => format!(
                    "{u} {}",
                    r.upstream_path.as_deref().unwrap_or(r.path.as_str())
                ),
                (RouteKind::Proxy, None) => "?".into(),
            };
            let mut extras = Vec::new();
            if r.auth {
                extras.push("auth".to_string());
            }
            if let Some(c) = &r.cache {
                extras.push(format!("cache {}", c.ttl));
            }
            if !r.rate_limit.is_empty() {
                extras.push(format!("rate_limit={}", r.rate_limit.join("+")));
            }
            s.push_str(&format!(
                "  {:<8} {:<45} -> {target}{}\n",
                r.methods.join(","),
                r.path,
                if extras.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", extras.join(", "))
                }
            ));
        }
        s
    }
}

impl UpstreamConfig {
    fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        match reqwest::Url::parse(&self.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
                if u.query().is_some() || u.fragment().is_some() {
                    errors.push(FieldError::new(
                        join(path, "url"),
                        format!("{:?} must not have a query or fragment", self.url),
                    ));
                }
            }
            _ => errors.push(FieldError::new(
                join(path, "url"),
                format!(
                    "invalid upstream URL {:?} (expected http:// or https://host)",
                    self.url
                ),
            )),
        }
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

impl RouteConfig {
    fn validate(&self, path: &str, cfg: &Config, errors: &mut Vec<FieldError>) {
        let params = match crate::routes::template::parse_template(&self.path) {
            Ok(t) => t.param_names(),
            Err(e) => {
                errors.push(FieldError::new(join(path, "path"), e));
                Vec::new()
            }
        };
        if self.path.starts_with("/api/v1/") {
            errors.push(FieldError::new(
                join(path, "path"),
                "give the unversioned path; every route is also served under /api/v1",
            ));
        }
        if self.methods.is_empty() {
            errors.push(FieldError::new(
                join(path, "methods"),
                "must list at least one method",
            ));
        }
        for (i, m) in self.methods.iter().enumerate() {
            if http::Method::from_bytes(m.as_bytes()).is_err() || m.to_ascii_uppercase() != *m {
                errors.push(FieldError::new(
                    format!("{path}.methods[{i}]"),
                    format!("invalid HTTP method {m:?} (use upper case, e.g. \"GET\")"),
                ));
            }
        }
        match self.kind {
            RouteKind::Proxy => match &self.upstream {
                None => errors.push(FieldError::new(
                    join(path, "upstream"),
                    "required for a proxy route",
                )),
                Some(u) if !cfg.upstreams.contains_key(u) => errors.push(FieldError::new(
                    join(path, "upstream"),
                    format!(
                        "no upstream named {u:?} (known: {})",
                        cfg.upstreams.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                )),
                Some(_) => {}
            },
            RouteKind::UserMe => {}
        }
        if let Some(up) = &self.upstream_path {
            match crate::routes::template::parse_template(up) {
                Ok(t) => {
                    for p in t.param_names() {
                        if !params.contains(&p) {
                            errors.push(FieldError::new(
                                join(path, "upstream_path"),
                                format!("uses {{{p}}} which the route path does not define"),
                            ));
                        }
                    }
                }
                Err(e) => errors.push(FieldError::new(join(path, "upstream_path"), e)),
            }
        }
        for (field, d) in [
            ("timeout", self.timeout),
            ("attempt_timeout", self.attempt_timeout),
        ] {
            if d.is_some_and(|d| d.0.is_zero()) {
                errors.push(FieldError::new(join(path, field), "must be greater than 0"));
            }
        }
        for (i, name) in self.rate_limit.iter().enumerate() {
            if !cfg.rate_limit.policies.iter().any(|p| p.name == *name) {
                errors.push(FieldError::new(
                    format!("{path}.rate_limit[{i}]"),
                    format!(
                        "no rate-limit policy named {name:?} (known: {})",
                        cfg.rate_limit
                            .policies
                            .iter()
                            .map(|p| p.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        if let Some(policy) = &self.cache {
            policy.validate(&join(path, "cache"), errors);
            if !self.methods.iter().any(|m| m == "GET" || m == "HEAD") {
                errors.push(FieldError::new(
                    join(path, "cache"),
                    "only GET/HEAD responses are cached, and this route serves neither",
                ));
            }
            if self.auth {
                errors.push(FieldError::new(
                    join(path, "cache"),
                    "responses to authenticated requests are never shared; remove cache or auth",
                ));
            }
        }
        for (i, p) in self.openapi.params.iter().enumerate() {
            if !matches!(
                p.schema_type.as_str(),
                "string" | "integer" | "number" | "boolean"
            ) {
                errors.push(FieldError::new(
                    format!("{path}.openapi.params[{i}].type"),
                    format!("unknown type {:?}", p.schema_type),
                ));
            }
        }
    }

    /// Effective deadline for this route.
    pub fn effective_timeout(&self, cfg: &Config) -> Dur {
        self.timeout
            .or_else(|| {
                self.upstream
                    .as_ref()
                    .and_then(|u| cfg.upstreams.get(u))
                    .map(|u| u.timeout)
            })
            .unwrap_or(Dur::from_secs(10))
    }
}

/// A URL with any password replaced, for logs and summaries.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// Parses `10.0.0.0/8` or a bare address (a /32 or /128).
pub fn parse_cidr(text: &str) -> Option<ipnet::IpNet> {
    let t = text.trim();
    t.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| t.parse::<IpAddr>().ok().map(ipnet::IpNet::from))
}

impl Default for Config {
    fn default() -> Self {
        Config {
            inherit_defaults: true,
            service_name: "api-gateway".into(),
            server: ServerConfig::default(),
            admin: AdminConfig::default(),
            cors: CorsConfig::default(),
            limits: LimitsConfig::default(),
            auth: AuthConfig::default(),
            errors: ErrorsConfig::default(),
            trusted_proxies: Vec::new(),
            headers: HeadersConfig::default(),
            cache: CacheConfig::default(),
            rate_limit: RateLimitConfig::default(),
            upstreams: BTreeMap::new(),
            routes: Vec::new(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: IpAddr::from([0, 0, 0, 0]),
            port: 8000,
            shutdown_grace: Dur::from_secs(30),
            memory_trim_interval: Dur::from_secs(5),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            host: IpAddr::from([127, 0, 0, 1]),
            port: 9000,
        }
    }
}

impl Default for CorsConfig {
    fn default() -> Self {
        CorsConfig {
            allowed_origins: vec!["*".into()],
            allowed_methods: ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
                .into_iter()
                .map(String::from)
                .collect(),
            allowed_headers: vec!["*".into()],
            allow_credentials: false,
            max_age: Dur::from_secs(600),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_body: ByteSize(1 << 20),
            header_read_timeout: Dur::from_secs(10),
            max_header_bytes: ByteSize(64 << 10),
            max_connections: 10_000,
            idle_timeout: Dur::from_secs(60),
            send_timeout: Dur::from_secs(30),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::Remote,
            upstream: "auth".into(),
            verify_path: "/verify".into(),
            verify_timeout: Dur::from_secs(5),
            cache_ttl: Dur::from_secs(30),
            negative_cache_ttl: Dur::from_secs(5),
            failure_policy: "auth_failures".into(),
            jwt_algorithm: JwtAlgorithm::HS256,
            jwt_secret: None,
            jwt_public_key_file: None,
        }
    }
}

impl Default for ErrorsConfig {
    fn default() -> Self {
        ErrorsConfig {
            timeout_status: 503,
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: String::new(),
            timeout: Dur::from_secs(10),
            connect_timeout: Dur::from_secs(2),
            pool_max_idle_per_host: 256,
            pool_idle_timeout: Dur::from_secs(60),
            max_connections: 256,
            unavailable_message: None,
            retry: RetryConfig::default(),
            breaker: BreakerConfig::default(),
        }
    }
}
