//! Starting a real gateway on 127.0.0.1:0 in front of fake upstreams.

use deltastream_gateway::config::Config;
use deltastream_gateway::server::{start, Running};
use tokio::net::TcpListener;

/// The embedded DeltaStream config with every upstream pointed at `url_for(name)`.
pub fn config_with_upstreams(url_for: impl Fn(&str) -> String) -> Config {
    let mut cfg = Config::embedded();
    for (name, u) in cfg.upstreams.iter_mut() {
        u.url = url_for(name);
    }
    cfg.server.shutdown_grace = deltastream_gateway::config::Dur::from_secs(2);
    // The gateway here shares its runtime (often its one thread) with the test's clients and
    // fake upstreams, on a machine other builds keep busy: a test's own burst makes it "late"
    // and it would refuse requests the test means to see served. The gateway's own saturation
    // is tested where it is the subject (tests/self_protection.rs turns it back on).
    cfg.server.saturation.enabled = false;
    cfg
}

/// Validates and starts `cfg` on free loopback ports.
pub async fn spawn(cfg: Config) -> Running {
    cfg.validate().expect("test config is valid");
    let public = TcpListener::bind("127.0.0.1:0").await.expect("bind public");
    let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
    start(cfg, public, admin).await.expect("gateway starts")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// The admin listener's `/metrics` text.
pub async fn scrape(admin: std::net::SocketAddr) -> String {
    client()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics text")
}
