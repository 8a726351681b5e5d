//! Configuration: raw serde types, the embedded DeltaStream default, validation that names the
//! field path of every problem, and environment overrides.
//!
//! Every section type checks its own fields with `validate(&self, path, errors)` beside its
//! definition (`upstream.rs` shows the shape: a subsection is checked at `join(path, name)`).
//! [`Config::validate`] checks the top-level fields, calls every section's `validate`, and
//! itself checks only what spans sections: names given in one section that must exist in
//! another, and duplicate route paths.
//!
//! Precedence, lowest first: the embedded default (the DeltaStream route table, so `serve`
//! runs with zero files) -> the `--config` TOML file -> environment variables.
//! With `inherit_defaults = true` (the default) a file *extends* the embedded table: an
//! upstream with the same name is merged over the default one (a file may tune one field and
//! keep the URL), a route with the same path replaces the default one, others are added; the
//! file's routes come first, so `routes[i]` is the file's i-th route in every error.
//!
//! Where to start reading: [`Config`] (one field per section), then [`Config::validate`];
//! `upstream.rs` is the model section. Nothing here imports the gateway's other modules.
//!
//! - this file: [`Config`], loading (embedded, file, environment) and the cross-section
//!   checks.
//! - [`types`]: the small value types every section uses ([`Dur`], [`ByteSize`]) and the
//!   field-path error validation reports.
//! - [`defaults`]: the embedded DeltaStream configuration, so `serve` runs with zero files.
//! - [`server`]: the listener-side sections (`[server]`, `[admin]`, `[cors]`, `[limits]`,
//!   `[headers]`, `[errors]`, `[websocket]`).
//! - [`upstream`]: `[upstreams.NAME]`: instances, timeouts, pool, bulkhead, retries,
//!   breaker, ejection.
//! - [`routes`]: `[[routes]]`, the public route table as plain data (compiled by
//!   `routes::table`).
//! - [`cache`]: `[cache]` and the per-route cache policy.
//! - [`ratelimit`]: `[rate_limit]`: the Redis backend, what happens when it is unreachable,
//!   the named policies.
//! - [`auth`]: `[auth]`: remote or local token verification and its caches.
//! - [`telemetry`]: `[tracing]`: the optional OTLP span export.
//! - [`concurrency`]: `[upstreams.NAME.concurrency]`, the adaptive concurrency limit and its
//!   bounded wait, and the route `priority` it sheds by.
//! - [`compression`]: `[compression]`: which codings, how hard, from what size, for which
//!   media types.
//! - [`saturation`]: `[server.saturation]`: when the gateway refuses new requests because it
//!   is itself saturated, and the opt-in readiness rule.
//! - [`responses`]: what each DeltaStream service answers on each route of the embedded
//!   table, for the OpenAPI document.
//! - [`schema`]: response schemas in the route table: read from files, checked, named.
//! - [`redact`]: what may be shown of a configuration: secrets masked, and its fingerprint.

pub mod auth;
pub mod cache;
pub mod compression;
pub mod concurrency;
pub mod defaults;
pub mod ratelimit;
pub mod redact;
pub mod responses;
pub mod routes;
pub mod saturation;
pub mod schema;
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
pub use compression::{CompressionConfig, CompressionLevel};
pub use concurrency::{ConcurrencyConfig, Priority};
pub use ratelimit::{
    builtin_policy, default_policies, KeySource, OnRedisError, PolicyConfig, RateLimitConfig,
};
pub use routes::{OpenApiDoc, ParamDoc, ParamLocation, ResponseDoc, RouteConfig, RouteKind};
pub use saturation::SaturationConfig;
pub use server::{
    parse_host_port, AdminConfig, CorsConfig, ErrorsConfig, HeadersConfig, HstsConfig,
    LimitsConfig, RedirectConfig, ServerConfig, TlsConfig, WebSocketConfig,
    DEFAULT_STRIP_FROM_UNTRUSTED,
};
pub use telemetry::TracingConfig;
pub use types::{join, ByteSize, Dur, FieldError};
pub use upstream::{
    BalancerKind, BreakerConfig, DoublingBackoff, EjectionConfig, RetryConfig, TripRule,
    UpstreamConfig,
};

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
    /// Response compression (`Accept-Encoding`).
    pub compression: CompressionConfig,
    /// Rate-limit policies and the Redis backend (`REDIS_URL`).
    pub rate_limit: RateLimitConfig,
    /// OpenTelemetry span export (`[tracing]`), off by default.
    pub tracing: TracingConfig,
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
    /// The settings the environment gave (field path, variable): a bad value is reported by
    /// the variable's name, since the operator will not find it in the file.
    #[serde(skip)]
    pub from_env: Vec<(String, &'static str)>,
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
    /// unless it sets `inherit_defaults = false`. Errors name the field path. Response schema
    /// files are read relative to the current directory.
    pub fn from_toml(text: &str) -> Result<Config, ConfigErrors> {
        Config::from_toml_in(text, Path::new("."))
    }

    /// [`Config::from_toml`] for a document in directory `dir`: its response schema files
    /// (`schema_file`) are read relative to it. Every problem is reported, not only the
    /// first: each section, each upstream and each route is read on its own.
    pub fn from_toml_in(text: &str, dir: &Path) -> Result<Config, ConfigErrors> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let at = e
                .span()
                .map(|span| line_column(text, span.start))
                .map(|(line, column)| format!(" at line {line}, column {column}"))
                .unwrap_or_default();
            FieldError::new("", format!("invalid TOML{at}: {}", e.message()))
        })?;
        let inherit = table
            .get("inherit_defaults")
            .and_then(toml::Value::as_bool)
            .unwrap_or(true);
        if inherit {
            complete_embedded_upstreams(&mut table);
        }
        let mut file = deserialize_reporting_all(table)?;
        let errors = routes::load_schema_files(&mut file.routes, dir);
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
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
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        Config::from_toml_in(&text, dir)
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

    /// The file's routes first, so `routes[i]` is the file's i-th route in every message
    /// (parse errors, validation, templates), then the embedded routes it does not replace.
    fn merged_over(mut self, base: Config) -> Config {
        let mut upstreams = base.upstreams;
        upstreams.append(&mut self.upstreams);
        self.upstreams = upstreams;
        let kept: Vec<RouteConfig> = base
            .routes
            .into_iter()
            .filter(|r| !self.routes.iter().any(|o| o.path == r.path))
            .collect();
        self.routes.extend(kept);
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
        let mut set = Vec::new();
        if let Some(p) = parse_port("PORT", &mut errors) {
            self.server.port = p;
            set.push(("server.port".to_string(), "PORT"));
        }
        if let Some(p) = parse_port("ADMIN_PORT", &mut errors) {
            self.admin.port = p;
            set.push(("admin.port".to_string(), "ADMIN_PORT"));
        }
        if let Some(name) = lookup("SERVICE_NAME").filter(|s| !s.is_empty()) {
            self.service_name = name;
            set.push(("service_name".to_string(), "SERVICE_NAME"));
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
                        set.push((format!("upstreams.{upstream}.urls"), var));
                    }
                    Some(u) => {
                        u.url = url;
                        u.urls = Vec::new();
                        set.push((format!("upstreams.{upstream}.url"), var));
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
            set.push(("rate_limit.redis_url".to_string(), "REDIS_URL"));
        }
        if let Some(secret) = lookup("JWT_SECRET").filter(|s| !s.is_empty()) {
            self.auth.jwt_secret = Some(secret);
            set.push(("auth.jwt_secret".to_string(), "JWT_SECRET"));
        }
        if let Some(key) = lookup("CONFIG_FINGERPRINT_KEY").filter(|s| !s.is_empty()) {
            self.admin.fingerprint_key = Some(key);
            set.push((
                "admin.fingerprint_key".to_string(),
                "CONFIG_FINGERPRINT_KEY",
            ));
        }
        for (field, var) in set {
            self.from_env.retain(|(f, _)| *f != field);
            self.from_env.push((field, var));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Checks everything serde cannot: ranges, formats, templates, references between
    /// sections. Every problem is reported, each at its field path.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        if self.service_name.trim().is_empty() {
            errors.push(FieldError::new("service_name", "must not be empty"));
        }
        for (i, cidr) in self.trusted_proxies.iter().enumerate() {
            if parse_cidr(cidr).is_none() {
                errors.push(FieldError::new(
                    format!("trusted_proxies[{i}]"),
                    format!("invalid CIDR or IP address {cidr:?}"),
                ));
            }
        }
        self.server.validate("server", &mut errors);
        self.admin.validate("admin", &mut errors);
        self.cors.validate("cors", &mut errors);
        self.limits.validate("limits", &mut errors);
        self.auth.validate("auth", &mut errors);
        self.errors.validate("errors", &mut errors);
        self.headers.validate("headers", &mut errors);
        self.websocket.validate("websocket", &mut errors);
        self.cache.validate("cache", &mut errors);
        self.compression.validate("compression", &mut errors);
        self.rate_limit.validate("rate_limit", &mut errors);
        self.tracing.validate("tracing", &mut errors);
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
        self.validate_references(&mut errors);
        for e in &mut errors {
            self.name_the_variable(e);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// An error in a value the environment gave names the variable, and the field it sets.
    fn name_the_variable(&self, e: &mut FieldError) {
        let Some((_, var)) = self.from_env.iter().find(|(field, _)| {
            e.path
                .strip_prefix(field.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['[', '.']))
        }) else {
            return;
        };
        e.message = format!("{} (the variable sets {})", e.message, e.path);
        e.path = (*var).to_string();
    }

    /// What `[auth]` names elsewhere: the upstream that verifies tokens (when a route needs
    /// one) and the rate-limit policy that counts failed verifications. (A route's own
    /// references are `RouteConfig::validate`'s.)
    fn validate_references(&self, errors: &mut Vec<FieldError>) {
        let a = &self.auth;
        let auth_needed = self
            .routes
            .iter()
            .any(|r| r.auth || r.kind == RouteKind::UserMe);
        if a.mode == AuthMode::Remote && auth_needed && !self.upstreams.contains_key(&a.upstream) {
            errors.push(FieldError::new(
                "auth.upstream",
                format!("no upstream named {:?}", a.upstream),
            ));
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
    }
}

/// `[upstreams.NAME]` tables that name an embedded upstream are completed from it, so a file
/// can tune one field (`[upstreams.storage] max_connections = 16`) and keep the rest: the URL
/// (which the environment or the demo may replace), the timeout, everything else. A table that
/// gives `url` or `urls` takes neither from the embedded one.
fn complete_embedded_upstreams(table: &mut toml::Table) {
    let Some(toml::Value::Table(upstreams)) = table.get_mut("upstreams") else {
        return;
    };
    let embedded = defaults::upstreams();
    for (name, given) in upstreams.iter_mut() {
        let (Some(base), toml::Value::Table(given)) = (embedded.get(name), given) else {
            continue;
        };
        let Ok(toml::Value::Table(mut base)) = toml::Value::try_from(base) else {
            continue;
        };
        if given.contains_key("url") || given.contains_key("urls") {
            base.remove("url");
            base.remove("urls");
        }
        let given_table = std::mem::take(given);
        overlay(&mut base, given_table);
        *given = base;
    }
}

/// `over`'s keys replace `base`'s, tables merging key by key.
fn overlay(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => overlay(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// `T` from a TOML value; the error at its field path under `prefix`, and the path itself.
fn deserialize_at<T: serde::de::DeserializeOwned>(
    value: toml::Value,
    prefix: &str,
) -> Result<T, (FieldError, serde_path_to_error::Path)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = match (prefix, path.as_str()) {
            (p, ".") => p.to_string(),
            ("", path) => path.to_string(),
            (p, path) if path.starts_with('[') => format!("{p}{path}"),
            (p, path) => format!("{p}.{path}"),
        };
        let at = e.path().clone();
        (
            FieldError::new(path, e.into_inner().message().to_string()),
            at,
        )
    })
}

/// Removes the key an error points at (the innermost table key on its path), so that reading
/// again finds the next problem. False when there is none to remove.
fn remove_at(value: &mut toml::Value, path: &serde_path_to_error::Path) -> bool {
    use serde_path_to_error::Segment;
    let segments: Vec<&Segment> = path.iter().collect();
    let Some(last_key) = segments
        .iter()
        .rposition(|s| matches!(s, Segment::Map { .. }))
    else {
        return false;
    };
    let mut node = value;
    for segment in &segments[..last_key] {
        node = match (segment, node) {
            (Segment::Map { key }, toml::Value::Table(t)) => match t.get_mut(key.as_str()) {
                Some(v) => v,
                None => return false,
            },
            (Segment::Seq { index }, toml::Value::Array(a)) => match a.get_mut(*index) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match (segments[last_key], node) {
        (Segment::Map { key }, toml::Value::Table(t)) => t.remove(key.as_str()).is_some(),
        _ => false,
    }
}

/// Every problem reading `value` as a `T`: serde stops at the first, so the offending key is
/// removed and the value read again, until it reads or nothing more can be removed.
fn every_error<T: serde::de::DeserializeOwned>(
    mut value: toml::Value,
    prefix: &str,
    errors: &mut Vec<FieldError>,
) {
    // Bounded: each round removes one key.
    for _ in 0..256 {
        match deserialize_at::<T>(value.clone(), prefix) {
            Ok(_) => return,
            Err((e, path)) => {
                errors.push(e);
                if !remove_at(&mut value, &path) {
                    return;
                }
            }
        }
    }
}

/// The configuration in `table`, or every problem in it (see [`every_error`]); each route is
/// read on its own, so a route's problem hides neither its own others nor another route's.
fn deserialize_reporting_all(mut table: toml::Table) -> Result<Config, ConfigErrors> {
    let first = match deserialize_at::<Config>(toml::Value::Table(table.clone()), "") {
        Ok(cfg) => return Ok(cfg),
        Err((e, _)) => e,
    };
    let mut errors = Vec::new();
    match table.remove("routes") {
        Some(toml::Value::Array(routes)) => {
            for (i, route) in routes.into_iter().enumerate() {
                every_error::<RouteConfig>(route, &format!("routes[{i}]"), &mut errors);
            }
        }
        Some(other) => {
            table.insert("routes".into(), other);
        }
        None => {}
    }
    every_error::<Config>(toml::Value::Table(table), "", &mut errors);
    if errors.is_empty() {
        errors.push(first);
    }
    Err(ConfigErrors(errors))
}

/// A URL (or a list of them) with any user information replaced, for logs and summaries.
pub fn redact_url(url: &str) -> String {
    redact::redact_userinfo(url).into_owned()
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
            compression: CompressionConfig::default(),
            rate_limit: RateLimitConfig::default(),
            upstreams: BTreeMap::new(),
            routes: Vec::new(),
            from_env: Vec::new(),
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

    /// Every section's own rules, each at its field path with its message: the paths
    /// operators and `tests/ops/config.rs` rely on, whichever `validate` checks them.
    #[test]
    fn every_section_names_the_field_paths_of_its_problems() {
        let shown = |cfg: &Config| -> Vec<String> {
            let mut all: Vec<String> = match cfg.validate() {
                Ok(()) => Vec::new(),
                Err(e) => e.0.iter().map(|f| f.to_string()).collect(),
            };
            all.sort();
            all
        };
        let mut cfg = Config::embedded();
        cfg.trusted_proxies = vec!["10.0.0.0/8".into(), "nope".into()];
        cfg.server.memory_trim_interval = Dur::from_millis(10);
        cfg.server.tls = Some(TlsConfig {
            cert_file: "c.pem".into(),
            key_file: "k.pem".into(),
            min_version: "1.1".into(),
            hsts: Some(HstsConfig {
                preload: true,
                ..HstsConfig::default()
            }),
        });
        cfg.server.redirect_http = Some(RedirectConfig {
            port: cfg.server.port,
            host: Some("evil.example?".into()),
            max_connections: 0,
        });
        cfg.admin.max_connections = 0;
        cfg.admin.fingerprint_key = Some("short".into());
        cfg.cors.allowed_methods = vec!["GET".into(), "GE T".into()];
        cfg.cors.allowed_origins = vec!["*".into(), "https://a.example".into(), "b\u{7f}".into()];
        cfg.cors.allow_credentials = true;
        cfg.limits.max_body = ByteSize(0);
        cfg.limits.max_header_bytes = ByteSize(100);
        cfg.limits.max_connections = 0;
        cfg.limits.send_timeout = Dur::from_secs(0);
        cfg.limits.header_read_timeout = Dur::from_secs(0);
        cfg.auth.upstream = "nowhere".into();
        cfg.auth.verify_path = "verify".into();
        cfg.auth.verify_timeout = Dur::from_secs(0);
        cfg.auth.failure_policy = "no_such_policy".into();
        cfg.errors.timeout_status = 502;
        cfg.headers.strip_from_untrusted = vec!["x-ok".into(), "bad header".into()];
        cfg.websocket.max_connections = 0;
        cfg.websocket.max_connections_per_ip = 0;
        cfg.websocket.idle_timeout = Dur::from_secs(0);
        cfg.websocket.close_timeout = Dur::from_secs(0);
        cfg.websocket.max_lifetime = Some(Dur::from_secs(0));
        cfg.websocket.handshake_timeout = Dur::from_secs(0);
        cfg.websocket.upstream_ping_interval = Dur::from_secs(0);
        cfg.websocket.upstream_pong_timeout = Dur::from_secs(0);
        cfg.tracing.otlp_endpoint = Some("ftp://collector".into());
        cfg.tracing.export_interval = Dur::from_secs(0);
        cfg.tracing.max_batch = 0;
        cfg.tracing.max_queue = 0;
        let mut want = vec![
            "trusted_proxies[1]: invalid CIDR or IP address \"nope\"",
            "server.memory_trim_interval: must be 0s (off) or at least 100ms, got 10ms",
            "server.tls.min_version: must be \"1.2\" or \"1.3\", got \"1.1\"",
            "server.tls.hsts.preload: needs include_subdomains = true and max_age of at least 365 days (what the preload lists require)",
            "server.redirect_http.port: must differ from server.port",
            "server.redirect_http.max_connections: must be at least 1",
            "server.redirect_http.host: \"evil.example?\" is not a DNS name, IPv4 address or [IPv6] address with an optional :port",
            "admin.max_connections: must be at least 1",
            "admin.fingerprint_key: must be at least 16 characters (a short key can be guessed)",
            "cors.allowed_methods[1]: invalid HTTP method \"GE T\"",
            "cors.allowed_origins: \"*\" cannot be combined with explicit origins",
            "cors.allow_credentials: cannot be true with allowed_origins = [\"*\"] (browsers reject it)",
            "cors.allowed_origins[2]: invalid origin \"b\\u{7f}\"",
            "limits.max_body: must be greater than 0",
            "limits.max_header_bytes: must be at least 8KiB",
            "limits.max_connections: must be at least 1",
            "limits.send_timeout: must be greater than 0",
            "limits.header_read_timeout: must be greater than 0",
            "auth.upstream: no upstream named \"nowhere\"",
            "auth.verify_path: must start with '/'",
            "auth.failure_policy: no rate-limit policy named \"no_such_policy\" (\"\" turns it off)",
            "auth.verify_timeout: must be greater than 0",
            "errors.timeout_status: must be 503 or 504, not 502",
            "headers.strip_from_untrusted[1]: invalid header name \"bad header\"",
            "websocket.max_connections: must be greater than 0",
            "websocket.max_connections_per_ip: must be greater than 0",
            "websocket.idle_timeout: must be greater than 0",
            "websocket.close_timeout: must be greater than 0",
            "websocket.max_lifetime: must be greater than 0",
            "websocket.handshake_timeout: must be greater than 0",
            "websocket.upstream_ping_interval: must be greater than 0",
            "websocket.upstream_pong_timeout: must be greater than 0",
            "tracing.otlp_endpoint: \"ftp://collector\" is not an http(s) URL",
            "tracing.export_interval: must be greater than 0",
            "tracing.max_batch: must be greater than 0",
            "tracing.max_queue: must be greater than 0",
        ];
        want.sort();
        assert_eq!(shown(&cfg), want);

        // The other branches: a redirect without TLS, local JWTs without their key.
        let mut cfg = Config::embedded();
        cfg.server.redirect_http = Some(RedirectConfig {
            port: 8080,
            host: None,
            max_connections: 1,
        });
        cfg.auth.mode = AuthMode::Local;
        cfg.auth.jwt_algorithm = JwtAlgorithm::RS256;
        assert_eq!(
            shown(&cfg),
            [
                "auth.jwt_public_key_file: required for RS256",
                "server.redirect_http: redirects to https need [server.tls]",
            ]
        );
        cfg.auth.jwt_algorithm = JwtAlgorithm::HS256;
        cfg.server.redirect_http = None;
        assert_eq!(
            shown(&cfg),
            ["auth.jwt_secret: required for mode = \"local\" with HS256 (or set JWT_SECRET)"]
        );
        assert_eq!(shown(&Config::embedded()), Vec::<String>::new());
    }
}
