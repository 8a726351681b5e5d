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
