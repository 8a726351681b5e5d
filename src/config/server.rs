//! The listener-side sections: `[server]`, `[admin]`, `[cors]`, `[limits]`, `[headers]`,
//! `[errors]`, `[websocket]`.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::types::{ByteSize, Dur};

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
    /// How often freed heap is handed back to the kernel (glibc `malloc_trim`), so resident
    /// memory falls back after a burst; `0s` turns it off (see `server::memory`).
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
}

fn default_min_tls() -> String {
    "1.2".into()
}

/// `[server.redirect_http]`: a plain listener that only redirects to https.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectConfig {
    pub port: u16,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Loopback by default: `/metrics` and `/admin/*` are operator-only.
    pub host: IpAddr,
    /// `ADMIN_PORT`; 0 picks a free port (tests).
    pub port: u16,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            host: IpAddr::from([127, 0, 0, 1]),
            port: 9000,
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
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            max_connections: 10_000,
            max_connections_per_ip: 50,
            idle_timeout: Dur::from_secs(60),
            max_lifetime: None,
            close_timeout: Dur::from_secs(1),
        }
    }
}
