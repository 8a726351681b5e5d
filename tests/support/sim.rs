//! A simulated DeltaStream service (`deltastream_gateway::sim`) served in-process on
//! 127.0.0.1:0: the simulators' own tests, and gateways in front of the real socket service.

use std::net::SocketAddr;

use deltastream_gateway::sim::{self, Service, SimOptions};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running simulated service; it shuts down gracefully on `stop` or when dropped.
pub struct SimServer {
    pub addr: SocketAddr,
    /// Sending, or dropping it with the server, starts the graceful shutdown.
    pub stop: oneshot::Sender<()>,
    /// The serve task: its result once the shutdown is done.
    pub server: JoinHandle<std::io::Result<()>>,
}

impl SimServer {
    pub async fn start(service: Service, opts: SimOptions) -> SimServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind ephemeral port");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(sim::serve(service, listener, opts, async move {
            // Fires on send, or when the sender is dropped with the server.
            let _ = stopped.await;
        }));
        SimServer { addr, stop, server }
    }

    /// `http://addr` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// A storage simulator with a capacity fault: `workers` requests served at once for
/// `latency_ms` each, the rest in a FIFO backlog (as under gunicorn): a healthy upstream
/// that real demand can overload.
pub async fn capacity_limited_storage(workers: u32, latency_ms: u64) -> SimServer {
    let server = SimServer::start(
        Service::Storage,
        SimOptions {
            faults: true,
            seed: 7,
            ..SimOptions::default()
        },
    )
    .await;
    let set = reqwest::Client::new()
        .post(server.url("/_faults"))
        .json(&serde_json::json!({"workers": workers, "latency_ms": latency_ms}))
        .send()
        .await
        .expect("set the capacity fault");
    assert_eq!(set.status(), 200, "POST /_faults");
    server
}
