//! The listener-side sections: `[server]`, `[admin]`, `[cors]`, `[limits]`, `[headers]`,
//! `[errors]`, `[websocket]`, each with its `validate(path, errors)`.

use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::types::{join, ByteSize, Dur, FieldError};

/// Headers that claim something about the client or the request's routing which only a
/// proxy in front of us could know: from a peer that is not a trusted proxy they are lies an
/// upstream might believe (client address, original URL, method override), so they are
/// removed. `X-Forwarded-For` and `X-Forwarded-Proto` are not listed: the gateway replaces them.
pub const DEFAULT_STRIP_FROM_UNTRUSTED: &[&str] = &[
    "forwarded",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-cluster-client-ip",
    "x-forwarded-host",
    "x-forwarded-server",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-original-url",
    "x-original-uri",
    "x-rewrite-url",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub host: IpAddr,
    /// `PORT`.
    pub port: u16,
    /// How long in-flight requests may run after SIGTERM/SIGINT before the process exits.
    pub shutdown_grace: Dur,
    /// How often freed heap is handed back to the kernel (glibc `malloc_trim`; with the
    /// `mimalloc` feature, mimalloc's collection, also by each runtime thread as it goes idle),
    /// so resident memory falls back after a burst; `0s` turns it off (see `server::memory`).
    pub memory_trim_interval: Dur,
    /// Terminate TLS on the public listener (HTTP/2 and HTTP/1.1 by ALPN); absent: plain HTTP
    /// (HTTP/2 with prior knowledge still works).
    pub tls: Option<TlsConfig>,
    /// Also listen for plain HTTP on this port and answer 308 to the https:// URL.
    pub redirect_http: Option<RedirectConfig>,
    /// Reload the configuration when the `--config` file changes (polled every second), as
    /// SIGHUP and `POST /admin/reload` do.
    pub watch_config: bool,
    /// IPv6 clients are keyed by this many leading bits (1..=128) in every per-client policy
    /// (rate limits, failed verifications, WebSocket and upstream-slot caps): one host
    /// usually holds a whole /64 and can use a fresh address per request.
    pub ipv6_client_prefix: u8,
    /// `[server.saturation]`: refusing new requests while the process itself is saturated.
    pub saturation: super::saturation::SaturationConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: IpAddr::from([0, 0, 0, 0]),
            port: 8000,
            shutdown_grace: Dur::from_secs(30),
            memory_trim_interval: Dur::from_secs(5),
            tls: None,
            redirect_http: None,
            watch_config: false,
            ipv6_client_prefix: 64,
            saturation: Default::default(),
        }
    }
}

/// `[server.tls]`: the public listener's certificate.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM: the certificate first, then its chain.
    pub cert_file: String,
    /// PEM: the private key (PKCS#8, RSA or EC) matching the certificate.
    pub key_file: String,
    /// Lowest protocol version accepted: `"1.2"` or `"1.3"`.
    #[serde(default = "default_min_tls")]
    pub min_version: String,
    /// `Strict-Transport-Security` on every response over TLS (never over plain HTTP, where
    /// browsers must ignore it); absent: not sent.
    #[serde(default)]
    pub hsts: Option<HstsConfig>,
}

fn default_min_tls() -> String {
    "1.2".into()
}

impl TlsConfig {
    pub fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        if !matches!(self.min_version.as_str(), "1.2" | "1.3") {
            errors.push(FieldError::new(
                join(path, "min_version"),
                format!("must be \"1.2\" or \"1.3\", got {:?}", self.min_version),
            ));
        }
        if let Some(hsts) = &self.hsts {
            hsts.validate(&join(path, "hsts"), errors);
        }
    }
}

/// `[server.tls.hsts]`: what browsers are told to remember (RFC 6797).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HstsConfig {
    /// How long a browser goes to https by itself; `0s` tells browsers to forget it.
    pub max_age: Dur,
    /// The rule covers every subdomain too.
    pub include_subdomains: bool,
    /// Consent to browsers' built-in preload lists (needs `include_subdomains` and a
    /// `max_age` of at least a year, as the lists require).
    pub preload: bool,
}

/// What the preload lists require of `max_age` (hstspreload.org).
pub const HSTS_PRELOAD_MIN_AGE: std::time::Duration = std::time::Duration::from_secs(31_536_000);

impl Default for HstsConfig {
    fn default() -> Self {
        HstsConfig {
            max_age: Dur::from_secs(31_536_000),
            include_subdomains: false,
            preload: false,
        }
    }
}

impl HstsConfig {
    pub fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        if self.preload && (!self.include_subdomains || self.max_age.0 < HSTS_PRELOAD_MIN_AGE) {
            errors.push(FieldError::new(
                join(path, "preload"),
                "needs include_subdomains = true and max_age of at least 365 days \
                 (what the preload lists require)",
            ));
        }
    }

    /// The header value, e.g. `max-age=31536000; includeSubDomains`.
    pub fn header_value(&self) -> String {
        let mut v = format!("max-age={}", self.max_age.0.as_secs());
        if self.include_subdomains {
            v.push_str("; includeSubDomains");
        }
        if self.preload {
            v.push_str("; preload");
        }
        v
    }
}

/// `[server.redirect_http]`: a plain listener that only redirects to https.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectConfig {
    pub port: u16,
    /// The host (`name` or `name:port`) every redirect names. Absent: the host the client
    /// asked for, if it is a valid DNS name or IP literal (else 400), with the public
    /// listener's port.
    #[serde(default)]
    pub host: Option<String>,
    /// Concurrent connections on this listener; further ones wait in the accept queue while
    /// idle ones are shed. Its own cap, so a flood here cannot take the public listener's.
    #[serde(default = "default_redirect_connections")]
    pub max_connections: usize,
}

fn default_redirect_connections() -> usize {
    1024
}

impl RedirectConfig {
    /// The listener's own rules; that it needs `[server.tls]` and its own port is
    /// `ServerConfig::validate`'s to say.
    pub fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        if self.max_connections == 0 {
            errors.push(FieldError::new(
                join(path, "max_connections"),
                "must be at least 1",
            ));
        }
        if let Some(host) = &self.host {
            if parse_host_port(host).is_none() {
                errors.push(FieldError::new(
                    join(path, "host"),
                    format!(
                        "{host:?} is not a DNS name, IPv4 address or [IPv6] address with an optional :port"
                    ),
                ));
            }
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Loopback by default: `/metrics` and `/admin/*` are operator-only.
    pub host: IpAddr,
    /// `ADMIN_PORT`; 0 picks a free port (tests).
    pub port: u16,
    /// Concurrent connections on the admin listener. Its own cap, so the operator's scrape
    /// and `/ready` get through while the public listener is full, and the other way round.
    pub max_connections: usize,
    /// `CONFIG_FINGERPRINT_KEY`: when set (the same on every replica), the configuration
    /// fingerprint is an HMAC under this key and covers the secrets too; unset, it is a hash
    /// of the redacted configuration (see `config::redact::fingerprint`).
    pub fingerprint_key: Option<String>,
}

/// Shortest accepted `admin.fingerprint_key`: a short key could be guessed, and with it the
/// fingerprint would test guesses of the secrets again.
pub const MIN_FINGERPRINT_KEY_LEN: usize = 16;

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            host: IpAddr::from([127, 0, 0, 1]),
            port: 9000,
            max_connections: 64,
            fingerprint_key: None,
        }
    }
}

impl AdminConfig {
    pub fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        if self.max_connections == 0 {
            errors.push(FieldError::new(
                join(path, "max_connections"),
                "must be at least 1",
            ));
        }
        if let Some(key) = &self.fingerprint_key {
            if key.len() < MIN_FINGERPRINT_KEY_LEN {
                errors.push(FieldError::new(
                    join(path, "fingerprint_key"),
                    format!("must be at least {MIN_FINGERPRINT_KEY_LEN} characters (a short key can be guessed)"),
                ));
            }
        }
    }
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

impl CorsConfig {
    pub fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        for (i, m) in self.allowed_methods.iter().enumerate() {
            if http::Method::from_bytes(m.as_bytes()).is_err() {
                errors.push(FieldError::new(
                    format!("{}[{i}]", join(path, "allowed_methods")),
                    format!("invalid HTTP method {m:?}"),
                ));
            }
        }
        let wildcard = self.allowed_origins.iter().any(|o| o == "*");
        if wildcard && self.allowed_origins.len() > 1 {
            errors.push(FieldError::new(
                join(path, "allowed_origins"),
                "\"*\" cannot be combined with explicit origins",
            ));
        }
        if wildcard && self.allow_credentials {
            errors.push(FieldError::new(
                join(path, "allow_credentials"),
                "cannot be true with allowed_origins = [\"*\"] (browsers reject it)",
            ));
        }
        for (i, o) in self.allowed_origins.iter().enumerate() {
            if o != "*" && http::HeaderValue::from_str(o).is_err() {
                errors.push(FieldError::new(
                    format!("{}[{i}]", join(path, "allowed_origins")),
                    format!("invalid origin {o:?}"),
                ));
            }
        }
    }
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
    /// Bytes per second a client must take while response data waits for it, measured over
    /// `min_send_rate_window`; slower clients are cut off. `0B` turns it off.
    pub min_send_rate: ByteSize,
    /// The window `min_send_rate` is measured over (at least 1s).
    pub min_send_rate_window: Dur,
    /// Upstream response bodies up to this size are read whole at the upstream's speed, so
    /// the upstream slot and connection are free before a slow client has read them; bodies
    /// of unknown length are read ahead into a buffer this large. `0B`: stream everything.
    pub response_buffer: ByteSize,
    /// Response bytes held for clients, all responses together; with it spent, bodies stream
    /// (their upstream slot held until the client has them). Bounds what slow readers cost.
    pub response_buffer_total: ByteSize,
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
            min_send_rate: ByteSize(1024),
            min_send_rate_window: Dur::from_secs(10),
            response_buffer: ByteSize(256 << 10),
            response_buffer_total: ByteSize(32 << 20),
        }
    }
}

impl LimitsConfig {
    pub fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        if self.max_body.0 == 0 {
            errors.push(FieldError::new(
                join(path, "max_body"),
                "must be greater than 0",
            ));
        }
        if self.max_header_bytes.0 < 8192 {
            errors.push(FieldError::new(
                join(path, "max_header_bytes"),
                "must be at least 8KiB",
            ));
        }
        if self.max_connections == 0 {
            errors.push(FieldError::new(
                join(path, "max_connections"),
                "must be at least 1",
            ));
        }
        for (field, zero) in [
            ("send_timeout", self.send_timeout.0.is_zero()),
            ("header_read_timeout", self.header_read_timeout.0.is_zero()),
        ] {
            if zero {
                errors.push(FieldError::new(join(path, field), "must be greater than 0"));
            }
        }
        if self.min_send_rate_window.0 < Duration::from_secs(1) {
            errors.push(FieldError::new(
                join(path, "min_send_rate_window"),
                format!("must be at least 1s, got {}", self.min_send_rate_window),
            ));
        }
        if self.response_buffer.0 > MAX_RESPONSE_BUFFER {
            errors.push(FieldError::new(
                join(path, "response_buffer"),
                format!(
                    "must be at most 64MiB (it is held per slow client), got {}",
                    self.response_buffer
                ),
            ));
        }
        let total = self.response_buffer_total.0;
        if total > MAX_RESPONSE_BUFFER_TOTAL || total < self.response_buffer.0 {
            errors.push(FieldError::new(
                join(path, "response_buffer_total"),
                format!(
                    "must be at least limits.response_buffer ({}) and at most 1GiB, got {}",
                    self.response_buffer, self.response_buffer_total
                ),
            ));
        }
    }
}

/// The largest `limits.response_buffer`: a buffer is held per response a client has not read.
const MAX_RESPONSE_BUFFER: u64 = 64 << 20;
/// The largest `limits.response_buffer_total`: a sanity bound on memory held for clients.
const MAX_RESPONSE_BUFFER_TOTAL: u64 = 1 << 30;

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
            strip_from_untrusted: DEFAULT_STRIP_FROM_UNTRUSTED
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

impl HeadersConfig {
    pub fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        for (i, name) in self.strip_from_untrusted.iter().enumerate() {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                errors.push(FieldError::new(
                    format!("{}[{i}]", join(path, "strip_from_untrusted")),
                    format!("invalid header name {name:?}"),
                ));
            }
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ErrorsConfig {
    /// Status for an upstream that is too slow: 503 (the original service) or 504.
    pub timeout_status: u16,
}

impl Default for ErrorsConfig {
    fn default() -> Self {
        ErrorsConfig {
            timeout_status: 503,
        }
    }
}

impl ErrorsConfig {
    pub fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        if !matches!(self.timeout_status, 503 | 504) {
            errors.push(FieldError::new(
                join(path, "timeout_status"),
                format!("must be 503 or 504, not {}", self.timeout_status),
            ));
        }
    }
}

/// `[websocket]`: limits of the relayed WebSocket connections (routes with
/// `kind = "websocket"`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Open WebSocket connections at most, all routes together; upgrades beyond get 429.
    pub max_connections: usize,
    /// Open WebSocket connections per client IP (IPv6: per `server.ipv6_client_prefix`) at
    /// most; upgrades beyond get 429.
    pub max_connections_per_ip: usize,
    /// A client that sends nothing (not even a pong) this long is closed with 1001; it is
    /// pinged after half of it, so a live but quiet client stays.
    pub idle_timeout: Dur,
    /// Connections are closed (1001) after this long, so long-lived clients rebalance over
    /// new instances and replicas; unset: no limit.
    pub max_lifetime: Option<Dur>,
    /// How long a close handshake may take before the connections are dropped.
    pub close_timeout: Dur,
    /// The upstream handshake (connect, request, 101) takes at most this long, or the
    /// route's timeout when that is shorter: a new subscriber of a service that does not
    /// answer gets its 503 in seconds, not after a data route's 10 s.
    pub handshake_timeout: Dur,
    /// Watch the upstream side of every relayed connection: ping it when it has been quiet
    /// for `upstream_ping_interval`, and when nothing at all (no pong, no frame) comes back
    /// within `upstream_pong_timeout` it is silent (paused, not dead): its client is closed
    /// with 1012 so it reconnects instead of taking stale data for live.
    pub upstream_ping: bool,
    /// How long the upstream may send nothing before the gateway pings it.
    pub upstream_ping_interval: Dur,
    /// How long after the ping the upstream has to send anything before it counts as silent.
    pub upstream_pong_timeout: Dur,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            max_connections: 10_000,
            max_connections_per_ip: 50,
            idle_timeout: Dur::from_secs(60),
            max_lifetime: None,
            close_timeout: Dur::from_secs(1),
            handshake_timeout: Dur::from_secs(3),
            upstream_ping: true,
            upstream_ping_interval: Dur::from_secs(5),
            upstream_pong_timeout: Dur::from_secs(5),
        }
    }
}

impl WebSocketConfig {
    pub fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        for (field, zero) in [
            ("max_connections", self.max_connections == 0),
            ("max_connections_per_ip", self.max_connections_per_ip == 0),
            ("idle_timeout", self.idle_timeout.0.is_zero()),
            ("close_timeout", self.close_timeout.0.is_zero()),
            ("handshake_timeout", self.handshake_timeout.0.is_zero()),
            (
                "upstream_ping_interval",
                self.upstream_ping_interval.0.is_zero(),
            ),
            (
                "upstream_pong_timeout",
                self.upstream_pong_timeout.0.is_zero(),
            ),
            (
                "max_lifetime",
                self.max_lifetime.is_some_and(|d| d.0.is_zero()),
            ),
        ] {
            if zero {
                errors.push(FieldError::new(join(path, field), "must be greater than 0"));
            }
        }
    }
}

/// A `host[:port]` that may appear in an `https://` URL the gateway writes: a DNS name
/// (letters, digits and `-` in dot-separated labels of 1-63 characters, at most 253 in all),
/// an IPv4 address, or a bracketed IPv6 address; the port 1-65535. Stricter than RFC 3986's
/// reg-name on purpose: https can only reach DNS names and IP addresses, and the rest of
/// reg-name (`%`, `!$&'()*+,;=`) is what URL parsers disagree about. A last label made of
/// digits must be a whole IPv4 address (browsers read `1.2.3` as one).
pub fn parse_host_port(text: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (inner, after) = rest.split_once(']')?;
        inner.parse::<std::net::Ipv6Addr>().ok()?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (&text[..inner.len() + 2], port)
    } else {
        match text.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (text, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) if (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()) => {
            Some(p.parse::<u16>().ok().filter(|p| *p != 0)?)
        }
        Some(_) => return None,
    };
    if host.starts_with('[') || host.parse::<std::net::Ipv4Addr>().is_ok() {
        return Some((host, port));
    }
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let last_numeric = host
        .rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
    (host.len() <= 253 && host.split('.').all(label_ok) && !last_numeric).then_some((host, port))
}

impl ServerConfig {
    /// `[server]` with its `tls` (and `tls.hsts`) and `redirect_http` tables.
    pub fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        let trim = self.memory_trim_interval.0;
        if !trim.is_zero() && trim < Duration::from_millis(100) {
            errors.push(FieldError::new(
                join(path, "memory_trim_interval"),
                format!(
                    "must be 0s (off) or at least 100ms, got {}",
                    self.memory_trim_interval
                ),
            ));
        }
        if !(1..=128).contains(&self.ipv6_client_prefix) {
            errors.push(FieldError::new(
                join(path, "ipv6_client_prefix"),
                format!("must be between 1 and 128, got {}", self.ipv6_client_prefix),
            ));
        }
        if let Some(tls) = &self.tls {
            tls.validate(&join(path, "tls"), errors);
        }
        self.saturation.validate(&join(path, "saturation"), errors);
        if let Some(redirect) = &self.redirect_http {
            let at = join(path, "redirect_http");
            if self.tls.is_none() {
                errors.push(FieldError::new(&at, "redirects to https need [server.tls]"));
            } else if redirect.port == self.port && redirect.port != 0 {
                errors.push(FieldError::new(
                    join(&at, "port"),
                    "must differ from server.port",
                ));
            }
            redirect.validate(&at, errors);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_default_a_silent_upstream_is_found_within_15_s_and_a_handshake_waits_seconds() {
        // The promise in the README: the ping goes after the interval of quiet, the close
        // after the pong timeout; both on, and the handshake well under a route's 10 s.
        let ws = WebSocketConfig::default();
        assert!(ws.upstream_ping);
        let bound = ws.upstream_ping_interval.0 + ws.upstream_pong_timeout.0;
        assert!(bound <= Duration::from_secs(15), "{bound:?}");
        assert!(ws.handshake_timeout.0 <= Duration::from_secs(5));
    }

    #[test]
    fn redirect_hosts_are_dns_names_or_ip_literals_with_an_optional_port() {
        for ok in [
            "example.com",
            "gw.example.com:8443",
            "localhost",
            "127.0.0.1",
            "127.0.0.1:443",
            "[::1]",
            "[2001:db8::1]:8443",
            "a-b.c1",
            "xn--bcher-kva.example",
        ] {
            assert!(parse_host_port(ok).is_some(), "{ok}");
        }
        assert_eq!(
            parse_host_port("gw.example:8443"),
            Some(("gw.example", Some(8443)))
        );
        assert_eq!(parse_host_port("[::1]:9"), Some(("[::1]", Some(9))));
        for bad in [
            "",
            "evil.example?",
            "evil.example/",
            "evil.example#",
            "user@evil.example",
            "evil.example\\",
            "evil.example:",
            "evil.example:0",
            "evil.example:65536",
            "evil.example:80:80",
            "evil.example:+80",
            "evil example",
            "evil.example.",
            "-evil.example",
            "evil-.example",
            "a..b",
            "1.2.3",
            "1.2.3.4.5",
            "[::1",
            "[::1]x",
            "[fe80::1%eth0]",
            "[not-ip]",
            "%65vil.example",
            "evil.example;x",
            "evil_host.example",
            "\u{e9}vil.example",
        ] {
            assert!(parse_host_port(bad).is_none(), "{bad:?} accepted");
        }
        assert!(parse_host_port(&format!("{}.example", "a".repeat(64))).is_none());
        assert!(parse_host_port(&["a"; 130].join(".")).is_none());
    }

    #[test]
    fn hsts_header_values() {
        let mut h = HstsConfig::default();
        assert_eq!(h.header_value(), "max-age=31536000");
        h.include_subdomains = true;
        h.preload = true;
        h.max_age = Dur::from_secs(63_072_000);
        assert_eq!(
            h.header_value(),
            "max-age=63072000; includeSubDomains; preload"
        );
    }
}
