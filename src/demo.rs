//! `demo`: the four simulated DeltaStream services and the gateway in one process, so the
//! whole platform can be tried (and tested end to end) with one command and no containers.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::server::{start, start_with_source, ConfigSource, Running};
use crate::sim::{self, Service, SimOptions};

/// Where the demo listens. Port 0 picks a free port (tests).
#[derive(Clone, Debug)]
pub struct DemoPorts {
    pub gateway: u16,
    pub admin: u16,
    pub auth: u16,
    pub storage: u16,
    pub analytics: u16,
    pub socket: u16,
    /// Storage simulators to run: the first on `storage`, the others on free ports the
    /// system picks (consecutive ports ran into analytics' 8004); the gateway's storage
    /// upstream becomes that many instances.
    pub storage_instances: u16,
}

impl Default for DemoPorts {
    fn default() -> Self {
        DemoPorts {
            gateway: 8000,
            admin: 9000,
            auth: Service::Auth.default_port(),
            storage: Service::Storage.default_port(),
            analytics: Service::Analytics.default_port(),
            socket: Service::Socket.default_port(),
            storage_instances: 1,
        }
    }
}

pub struct Demo {
    pub gateway: Running,
    /// Each service and the address it listens on.
    pub services: Vec<(Service, SocketAddr)>,
    stop_services: watch::Sender<bool>,
    service_tasks: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
}

async fn bind(host: IpAddr, port: u16, what: &str) -> Result<TcpListener, String> {
    TcpListener::bind((host, port))
        .await
        .map_err(|e| format!("demo: cannot listen on {host}:{port} for {what}: {e}"))
}

/// Starts the services on loopback and the gateway in front of them. `cfg` is the gateway
/// config (embedded default or `--config`); its upstream URLs are pointed at the services
/// (those it has: a config without a `socket` upstream still gets a socket service). With
/// no source, `POST /admin/reload` has nothing to read (see [`start_demo_from`]).
pub async fn start_demo(cfg: Config, ports: DemoPorts, faults: bool) -> Result<Demo, String> {
    start_demo_from(cfg, None, ports, faults).await
}

/// [`start_demo`], reloading from `source` (`demo --config F`: that file, then the
/// environment) on SIGHUP and `POST /admin/reload`; every reloaded configuration is pointed
/// at the same services, with the same token secret.
pub async fn start_demo_from(
    mut cfg: Config,
    source: Option<ConfigSource>,
    ports: DemoPorts,
    faults: bool,
) -> Result<Demo, String> {
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    // One secret for the auth service and for the gateway's optional local verification.
    let secret = cfg.auth.jwt_secret.clone().unwrap_or_else(|| {
        let bytes: [u8; 32] = rand::random();
        hex::encode(bytes)
    });
    let opts = SimOptions {
        faults,
        jwt_secret: Some(secret.clone()),
        ..SimOptions::default()
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut services = Vec::new();
    let mut service_tasks = Vec::new();
    // The first storage simulator on --storage-port, the others where the system has room:
    // consecutive ports from 8003 took analytics' 8004.
    let storage_ports =
        (0..ports.storage_instances.max(1)).map(|i| if i == 0 { ports.storage } else { 0 });
    let plan = [(Service::Auth, ports.auth)]
        .into_iter()
        .chain(storage_ports.map(|p| (Service::Storage, p)))
        .chain([
            (Service::Analytics, ports.analytics),
            (Service::Socket, ports.socket),
        ]);
    let mut urls: Vec<(Service, String)> = Vec::new();
    for (service, port) in plan {
        let listener = bind(loopback, port, service.name()).await?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        urls.push((service, format!("http://{addr}")));
        let mut rx = stop_rx.clone();
        let stop = async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        service_tasks.push(tokio::spawn(sim::serve(
            service,
            listener,
            opts.clone(),
            stop,
        )));
        services.push((service, addr));
    }
    let pins = Pins {
        jwt_secret: secret,
        urls,
    };
    pins.apply(&mut cfg);
    crate::server::check(&cfg).map_err(|e| format!("invalid configuration:\n{e}"))?;
    let public = bind(cfg.server.host, ports.gateway, "the gateway").await?;
    let admin = bind(cfg.admin.host, ports.admin, "the admin listener").await?;
    let gateway = match source {
        Some(source) => {
            let running = start_with_source(cfg, source, public, admin).await?;
            running
                .gateway
                .override_reloads(Box::new(move |cfg| pins.apply(cfg)));
            running
        }
        None => start(cfg, public, admin).await?,
    };
    Ok(Demo {
        gateway,
        services,
        stop_services: stop_tx,
        service_tasks,
    })
}

/// What the demo sets in every configuration it runs, the first and each reloaded one.
struct Pins {
    /// The auth simulator signs with it; the gateway's local verification needs the same.
    jwt_secret: String,
    /// Each simulator's URL: the upstream of the same name is pointed at them.
    urls: Vec<(Service, String)>,
}

impl Pins {
    fn apply(&self, cfg: &mut Config) {
        cfg.auth.jwt_secret = Some(self.jwt_secret.clone());
        for (name, u) in cfg.upstreams.iter_mut() {
            let mine: Vec<String> = self
                .urls
                .iter()
                .filter(|(s, _)| s.name() == name)
                .map(|(_, url)| url.clone())
                .collect();
            match mine.len() {
                0 => continue,
                1 => {
                    u.url = mine[0].clone();
                    u.urls = Vec::new();
                }
                _ => {
                    u.url = String::new();
                    u.urls = mine;
                }
            }
            // The demo's value, not the environment's: an error names the field.
            let prefix = format!("upstreams.{name}.");
            cfg.from_env
                .retain(|(field, _)| !field.starts_with(&prefix));
        }
    }
}

impl Demo {
    /// Stops the gateway first (draining it), then the services behind it.
    pub async fn shutdown(self) {
        self.gateway.shutdown().await;
        let _ = self.stop_services.send(true);
        for t in self.service_tasks {
            let _ = t.await;
        }
    }

    /// What the demo prints on start: addresses and ready-to-paste commands.
    pub fn banner(&self) -> String {
        let port = self.gateway.addr.port();
        let gw = format!("http://localhost:{port}");
        let mut s = String::from("DeltaStream demo is running.\n\n");
        s.push_str(&format!(
            "  gateway     {gw}   (admin: http://{})\n",
            self.gateway.admin_addr
        ));
        for (svc, addr) in &self.services {
            let url = match svc {
                Service::Socket => format!("ws://{addr}/ws"),
                _ => format!("http://{addr}"),
            };
            s.push_str(&format!("  {:<11} {url}\n", svc.name()));
        }
        s.push_str(&format!(
            "\nTry:\n\
  curl {gw}/health\n\
  curl -X POST {gw}/api/auth/register -H 'content-type: application/json' \\\n\
       -d '{{\"email\":\"ada@example.com\",\"password\":\"correct-horse\",\"name\":\"Ada\"}}'\n\
  TOKEN=$(curl -s -X POST {gw}/api/auth/login -H 'content-type: application/json' \\\n\
       -d '{{\"email\":\"ada@example.com\",\"password\":\"correct-horse\"}}' | sed 's/.*\"token\":\"\\([^\"]*\\)\".*/\\1/')\n\
  curl {gw}/api/user/me -H \"Authorization: Bearer $TOKEN\"\n\
  curl '{gw}/api/data/underlying/NIFTY?limit=5'\n\
  curl {gw}/api/data/products\n\
  curl {gw}/api/analytics/pcr/NIFTY\n\
  python3 scripts/ws-client.py ws://localhost:{port}/ws NIFTY --count 5\n\
  open {gw}/api/docs/ui\n\nCtrl-C stops everything.\n"
        ));
        s
    }
}
