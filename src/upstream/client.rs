//! The pooled HTTP client for one upstream (reqwest over hyper; rustls for `https://`).

use reqwest::redirect::Policy;

use crate::config::UpstreamConfig;

/// Builds the client every attempt to one upstream goes through. One client per upstream
/// keeps pools (and their limits) separate, so one slow upstream cannot hog the others'
/// connections.
pub fn build_client(cfg: &UpstreamConfig) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(cfg.connect_timeout.0)
        .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
        .pool_idle_timeout(cfg.pool_idle_timeout.0)
        .tcp_nodelay(true)
        // A gateway passes redirects through to the client; following them would hide them.
        .redirect(Policy::none())
        .build()
}
