//! Configuration: raw serde types, the embedded DeltaStream default, validation that names the
//! field path of every problem, and environment overrides.
//!
//! Precedence, lowest first: the embedded default (the DeltaStream route table, so `serve`
//! runs with zero files) -> the `--config` TOML file -> environment variables.
//! With `inherit_defaults = true` (the default) a file *extends* the embedded table: an
//! upstream or route with the same name / path replaces the default one, others are added.

pub mod auth;
pub mod cache;
pub mod defaults;
pub mod ratelimit;
pub mod routes;
pub mod server;
pub mod telemetry;
pub mod types;
pub mod upstream;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use auth::{AuthConfig, AuthMode, JwtAlgorithm};
pub use cache::{CacheConfig, RouteCachePolicy};
pub use ratelimit::{
    builtin_policy, default_policies, KeySource, OnRedisError, PolicyConfig, RateLimitConfig,
};
pub use routes::{OpenApiDoc, ParamDoc, ParamLocation, RouteConfig, RouteKind};
pub use server::{
    AdminConfig, CorsConfig, ErrorsConfig, HeadersConfig, LimitsConfig, RedirectConfig,
    ServerConfig, TlsConfig, WebSocketConfig, DEFAULT_STRIP_FROM_UNTRUSTED,
};
pub use telemetry::TracingConfig;
pub use types::{join, ByteSize, Dur, FieldError};
pub use upstream::{BalancerKind, BreakerConfig, EjectionConfig, RetryConfig, UpstreamConfig};

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
    /// Limits of relayed WebSocket connections.
    pub websocket: WebSocketConfig,
    /// The shared response cache's size limits.
    pub cache: CacheConfig,
    /// Rate-limit policies and the Redis backend (`REDIS_URL`).
    pub rate_limit: RateLimitConfig,
    /// OpenTelemetry span export (`[tracing]`), off by default.
    pub tracing: TracingConfig,
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
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

/// The 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
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
        let de = toml::Deserializer::parse(text).map_err(|e| {
            let at = e
                .span()
                .map(|span| line_column(text, span.start))
                .map(|(line, column)| format!(" at line {line}, column {column}"))
                .unwrap_or_default();
            FieldError::new("", format!("invalid TOML{at}: {}", e.message()))
        })?;
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
    /// environment. Not yet validated: `server::check` does that, templates included.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigErrors> {
        let mut c = match file {
            Some(p) => Config::from_file(p)?,
            None => Config::embedded(),
        };
        c.apply_env(|k| std::env::var(k).ok())?;
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
            ("SOCKET_SERVICE_URL", "socket"),
        ] {
            if let Some(url) = lookup(var).filter(|s| !s.is_empty()) {
                match self.upstreams.get_mut(upstream) {
                    // A comma-separated list is several instances.
                    Some(u) if url.contains(',') => {
                        u.url = String::new();
                        u.urls = url.split(',').map(|s| s.trim().to_string()).collect();
                    }
                    Some(u) => {
                        u.url = url;
                        u.urls = Vec::new();
                    }
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
        if !(1..=128).contains(&self.server.ipv6_client_prefix) {
            errors.push(FieldError::new(
                "server.ipv6_client_prefix",
                format!(
                    "must be between 1 and 128, got {}",
                    self.server.ipv6_client_prefix
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
        if let Some(tls) = &self.server.tls {
            if !matches!(tls.min_version.as_str(), "1.2" | "1.3") {
                errors.push(FieldError::new(
                    "server.tls.min_version",
                    format!("must be \"1.2\" or \"1.3\", got {:?}", tls.min_version),
                ));
            }
        }
        if let Some(redirect) = &self.server.redirect_http {
            if self.server.tls.is_none() {
                errors.push(FieldError::new(
                    "server.redirect_http",
                    "redirects to https need [server.tls]",
                ));
            } else if redirect.port == self.server.port && redirect.port != 0 {
                errors.push(FieldError::new(
                    "server.redirect_http.port",
                    "must differ from server.port",
                ));
            }
        }
        self.tracing.validate(errors);
        let ws = &self.websocket;
        for (field, zero) in [
            ("websocket.max_connections", ws.max_connections == 0),
            (
                "websocket.max_connections_per_ip",
                ws.max_connections_per_ip == 0,
            ),
            ("websocket.idle_timeout", ws.idle_timeout.0.is_zero()),
            ("websocket.close_timeout", ws.close_timeout.0.is_zero()),
            (
                "websocket.max_lifetime",
                ws.max_lifetime.is_some_and(|d| d.0.is_zero()),
            ),
        ] {
            if zero {
                errors.push(FieldError::new(field, "must be greater than 0"));
            }
        }
        if self.limits.send_timeout.0.is_zero() {
            errors.push(FieldError::new(
                "limits.send_timeout",
                "must be greater than 0",
            ));
        }
        if self.limits.min_send_rate_window.0 < std::time::Duration::from_secs(1) {
            errors.push(FieldError::new(
                "limits.min_send_rate_window",
                format!(
                    "must be at least 1s, got {}",
                    self.limits.min_send_rate_window
                ),
            ));
        }
        if self.limits.response_buffer.0 > MAX_RESPONSE_BUFFER {
            errors.push(FieldError::new(
                "limits.response_buffer",
                format!(
                    "must be at most 64MiB (it is held per slow client), got {}",
                    self.limits.response_buffer
                ),
            ));
        }
        let total = self.limits.response_buffer_total.0;
        if total > MAX_RESPONSE_BUFFER_TOTAL || total < self.limits.response_buffer.0 {
            errors.push(FieldError::new(
                "limits.response_buffer_total",
                format!(
                    "must be at least limits.response_buffer ({}) and at most 1GiB, got {}",
                    self.limits.response_buffer, self.limits.response_buffer_total
                ),
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
            && builtin_policy(failure_policy).is_none()
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
}

/// The largest `limits.response_buffer`: a buffer is held per response a client has not read.
const MAX_RESPONSE_BUFFER: u64 = 64 << 20;
/// The largest `limits.response_buffer_total`: a sanity bound on memory held for clients.
const MAX_RESPONSE_BUFFER_TOTAL: u64 = 1 << 30;

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
            websocket: WebSocketConfig::default(),
            tracing: TracingConfig::default(),
            cache: CacheConfig::default(),
            rate_limit: RateLimitConfig::default(),
            upstreams: BTreeMap::new(),
            routes: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_toml_syntax_error_names_its_line_and_column() {
        let text = "[server]\nport = 8000\nshutdown_grace = \"5s\n";
        let errors = Config::from_toml(text).unwrap_err();
        let shown = errors.to_string();
        assert!(shown.contains("invalid TOML at line 3, column"), "{shown}");
        assert_eq!(line_column("ab\ncé\nx", 6), (2, 3));
        assert_eq!(line_column("", 10), (1, 1));
    }
}
