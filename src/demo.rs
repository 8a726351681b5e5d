//! `demo`: the four simulated DeltaStream services and the gateway in one process, so the
//! whole platform can be tried (and tested end to end) with one command and no containers.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::server::{start, Running};
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
    /// Storage simulators to run, on consecutive ports from `storage` (any free ports when
    /// it is 0): the gateway's storage upstream becomes that many instances.
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
/// (those it has: a config without a `socket` upstream still gets a socket service).
pub async fn start_demo(mut cfg: Config, ports: DemoPorts, faults: bool) -> Result<Demo, String> {
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    // One secret for the auth service and for the gateway's optional local verification.
    let secret = cfg.auth.jwt_secret.clone().unwrap_or_else(|| {
        let bytes: [u8; 32] = rand::random();
        hex::encode(bytes)
    });
    cfg.auth.jwt_secret = Some(secret.clone());
    let opts = SimOptions {
        faults,
        jwt_secret: Some(secret),
        ..SimOptions::default()
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut services = Vec::new();
    let mut service_tasks = Vec::new();
    let storage_ports = (0..ports.storage_instances.max(1)).map(|i| match ports.storage {
        0 => 0,
        p => p.saturating_add(i),
    });
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
    for (name, u) in cfg.upstreams.iter_mut() {
        let mine: Vec<String> = urls
            .iter()
            .filter(|(s, _)| s.name() == name)
            .map(|(_, url)| url.clone())
            .collect();
        match mine.len() {
            0 => {}
            1 => {
                u.url = mine[0].clone();
                u.urls = Vec::new();
            }
            _ => {
                u.url = String::new();
                u.urls = mine;
            }
        }
    }
    crate::server::check(&cfg).map_err(|e| format!("invalid configuration:\n{e}"))?;
    let public = bind(cfg.server.host, ports.gateway, "the gateway").await?;
    let admin = bind(cfg.admin.host, ports.admin, "the admin listener").await?;
    let gateway = start(cfg, public, admin).await?;
    Ok(Demo {
        gateway,
        services,
        stop_services: stop_tx,
        service_tasks,
    })
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
