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

/// The embedded config with upstream `name` spread over `urls` (the others at the first of
/// them) and the rate limits out of the way, so the volume is the test's.
pub fn config_with_instances(name: &str, urls: &[String]) -> Config {
    let first = urls[0].clone();
    let mut cfg = config_with_upstreams(move |_| first.clone());
    let u = cfg.upstreams.get_mut(name).expect("a configured upstream");
    u.url = String::new();
    u.urls = urls.to_vec();
    cfg.rate_limit.policies = ["default", "auth"]
        .into_iter()
        .map(|policy| deltastream_gateway::config::PolicyConfig {
            name: policy.into(),
            limit: 1_000_000,
            window: deltastream_gateway::config::Dur::from_secs(60),
            key: Default::default(),
        })
        .collect();
    cfg
}

/// Upstream `name`'s entry of the admin listener's `/admin/upstreams`.
pub async fn upstream_view(admin: std::net::SocketAddr, name: &str) -> serde_json::Value {
    let view: serde_json::Value = client()
        .get(format!("http://{admin}/admin/upstreams"))
        .send()
        .await
        .expect("/admin/upstreams")
        .json()
        .await
        .expect("/admin/upstreams JSON");
    view["upstreams"]
        .as_array()
        .expect("upstreams")
        .iter()
        .find(|u| u["upstream"] == name)
        .unwrap_or_else(|| panic!("no upstream {name} in {view}"))
        .clone()
}
