//! The pooled HTTP client of one upstream instance (reqwest over hyper; rustls for
//! `https://`).

use std::sync::OnceLock;

use reqwest::redirect::Policy;

use super::instances::Endpoint;
use crate::config::UpstreamConfig;

/// Builds the client every attempt to one instance goes through. One client per instance
/// keeps pools separate (so one slow instance cannot hog the others' connections) and lets a
/// resolved address be pinned while the URL, `Host` and TLS SNI keep the configured name.
pub(crate) fn build_client(
    cfg: &UpstreamConfig,
    endpoint: &Endpoint,
) -> reqwest::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(cfg.connect_timeout.0)
        .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
        .pool_idle_timeout(cfg.pool_idle_timeout.0)
        .tcp_nodelay(true)
        // A gateway passes redirects through to the client; following them would hide them.
        .redirect(Policy::none());
    if let Some(addr) = endpoint.pinned {
        builder = builder.resolve(&endpoint.host, addr);
    }
    builder.build()
}

/// The client reqwest-middleware's chain is built around. The chain never reaches it (it ends
/// in the attempt layer, on the chosen instance's client), so one process-wide instance serves all.
pub(crate) fn unused_base() -> reqwest::Client {
    static BASE: OnceLock<reqwest::Client> = OnceLock::new();
    BASE.get_or_init(reqwest::Client::new).clone()
}
