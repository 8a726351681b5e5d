//! Starting a real gateway on 127.0.0.1:0 in front of fake upstreams.

use deltastream_gateway::config::Config;
use deltastream_gateway::server::{start, Running};
use tokio::net::TcpListener;

use super::FakeUpstream;

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

/// The admin listener's `/admin/upstreams`.
pub async fn admin_upstreams(admin: std::net::SocketAddr) -> serde_json::Value {
    client()
        .get(format!("http://{admin}/admin/upstreams"))
        .send()
        .await
        .expect("/admin/upstreams")
        .json()
        .await
        .expect("/admin/upstreams JSON")
}

/// Upstream `name`'s entry of the admin listener's `/admin/upstreams`.
pub async fn upstream_view(admin: std::net::SocketAddr, name: &str) -> serde_json::Value {
    let view = admin_upstreams(admin).await;
    view["upstreams"]
        .as_array()
        .expect("upstreams")
        .iter()
        .find(|u| u["upstream"] == name)
        .unwrap_or_else(|| panic!("no upstream {name} in {view}"))
        .clone()
}

/// One recording fake upstream per DeltaStream service (auth, storage, analytics; the
/// socket upstream shares analytics'), so a test can tell which service a request reached.
pub struct Trio {
    pub auth: FakeUpstream,
    pub storage: FakeUpstream,
    pub analytics: FakeUpstream,
}

impl Trio {
    /// Three fakes that answer 200 to everything.
    pub async fn new() -> Trio {
        Trio {
            auth: FakeUpstream::ok().await,
            storage: FakeUpstream::ok().await,
            analytics: FakeUpstream::ok().await,
        }
    }

    /// The embedded config with each upstream pointed at its fake.
    pub fn config(&self) -> Config {
        let (a, s, an) = (self.auth.url(), self.storage.url(), self.analytics.url());
        config_with_upstreams(move |name| match name {
            "auth" => a.clone(),
            "storage" => s.clone(),
            _ => an.clone(),
        })
    }

    /// Requests received by all three.
    pub fn hits(&self) -> usize {
        self.auth.hits() + self.storage.hits() + self.analytics.hits()
    }
}

/// Gives upstream `from` the name `to`, in the routes and token verification too. The metrics
/// registry is the process's, shared by every test of a binary: a test that asserts an exact
/// series (a count, a gauge) gives its upstream a name no other test uses.
pub fn rename_upstream(cfg: &mut Config, from: &str, to: &str) {
    let upstream = cfg.upstreams.remove(from).expect("upstream to rename");
    cfg.upstreams.insert(to.to_string(), upstream);
    for route in &mut cfg.routes {
        if route.upstream.as_deref() == Some(from) {
            route.upstream = Some(to.to_string());
        }
    }
    if cfg.auth.upstream == from {
        cfg.auth.upstream = to.to_string();
    }
}
