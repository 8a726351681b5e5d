//! Slow readers and per-client keys (issue 23, items 1 and 3), over real sockets against a
//! running gateway in front of in-process upstreams. The attacks, each a class with the
//! test that covers it:
//!
//! - Slow readers take over an upstream (HTTP/1 clients that never read, with a tiny receive
//!   buffer; HTTP/2 streams that never grant flow-control window while the connection stays
//!   busy with PINGs): a body up to `limits.response_buffer` is read at the upstream's speed
//!   and its slot and connection are free before the client reads it, known length or
//!   chunked (`slow_readers_no_longer_hold_upstream_slots`,
//!   `a_chunked_body_that_fits_the_buffer_frees_its_slot_before_the_client_reads`); what
//!   they hold in total is bounded (`limits.response_buffer_total`), beyond it bodies stream
//!   (`what_slow_readers_hold_in_total_is_bounded_and_beyond_it_bodies_stream`); larger
//!   bodies and event streams still flow chunk by chunk
//!   (`a_body_larger_than_the_buffer_still_streams_and_holds_its_slot_until_sent`,
//!   `event_streams_flow_event_by_event_and_a_quiet_one_is_not_cut`).
//! - One client holds every slot of an upstream: at most `max_client_share` of them, waiting
//!   included, beyond it 429 `too_many_in_flight` at once while other clients are served
//!   (`one_client_holds_at_most_its_share_and_others_are_served`).
//! - A reader just fast enough to beat `send_timeout`, or an HTTP/2 stream without window:
//!   cut below `limits.min_send_rate` (`a_client_below_the_minimum_rate_is_cut_off`,
//!   `an_http2_stream_that_never_grants_window_is_cut_off`).
//! - Held slots invisible: `/admin/upstreams` `in_flight` and `gateway_upstream_in_flight`
//!   count them (checked in the tests above).
//! - Memory per slow reader: measured on the binary, 256 readers
//!   (`memory_per_slow_reader_is_bounded`).
//! - IPv6 clients keyed per /128 (149 addresses of one /64 walked past every per-client
//!   limit): rate limits, the failed-verification guard, the WebSocket per-client cap and the
//!   slot share key IPv6 by `server.ipv6_client_prefix` (/64), IPv4-mapped as IPv4
//!   (`ipv6_rate_limits_count_one_prefix_as_one_client`,
//!   `ipv6_failed_verifications_count_one_prefix_as_one_client`,
//!   `ipv6_websocket_cap_counts_one_prefix_as_one_client`,
//!   `ipv6_slot_share_counts_one_prefix_as_one_client`; the key itself is unit-tested in
//!   `src/client.rs`). The addresses come through `X-Forwarded-For` from a
//!   trusted proxy: loopback has one IPv6 address, and adding a /64 needs a network
//!   namespace the test suite cannot assume.

use crate::support;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use deltastream_gateway::config::{ByteSize, Config, Dur, PolicyConfig};
use deltastream_gateway::server::Running;
use deltastream_gateway::sim::{Service, SimOptions};
use http_body_util::{BodyExt, Empty};
use serde_json::Value;
use support::gateway::{client, config_with_upstreams, scrape, spawn};
use support::process::{serve_command, status_kib, GatewayProcess, BINARY};
use support::sim::SimServer;
use support::{FakeUpstream, Step};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Notify;

/// Generous for a loaded 2-core machine; reaching it is a failure.
const PATIENCE: Duration = Duration::from_secs(20);

/// The embedded config plus an upstream `name` at `url` (`upstream_toml`: more of its
/// settings) and the route `/api/{name}/{item}` to it, without rate limits. Its own upstream
/// name gives the test its own `gateway_upstream_in_flight{upstream}` series: the metrics
/// recorder is one per process, shared by the tests running in parallel.
fn own_upstream(name: &str, url: &str, upstream_toml: &str) -> (Config, String) {
    let mut cfg = Config::from_toml(&format!(
        r#"
[upstreams.{name}]
url = "{url}"
{upstream_toml}

[[routes]]
path = "/api/{name}/{{item}}"
upstream = "{name}"
upstream_path = "/{{item}}"
"#
    ))
    .unwrap();
    let url = url.to_string();
    for u in cfg.upstreams.values_mut() {
        u.url = url.clone();
    }
    cfg.server.shutdown_grace = Dur::from_secs(2);
    lift_limits(&mut cfg);
    (cfg, format!("/api/{name}/item"))
}

fn lift_limits(cfg: &mut Config) {
    cfg.rate_limit.policies = ["default", "auth", "ws"]
        .into_iter()
        .map(|name| PolicyConfig {
            name: name.into(),
            limit: 1_000_000,
            window: Dur::from_secs(60),
            key: Default::default(),
        })
        .collect();
}

/// A reqwest client whose connections come from `ip` (any 127.0.0.0/8 address is loopback):
/// another client address as far as the gateway can tell.
fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(ip.parse::<IpAddr>().unwrap())
        .timeout(PATIENCE)
        .build()
        .unwrap()
}

/// An HTTP/1.1 request on a connection with a 4 KiB receive buffer that is never read.
async fn slow_h1_reader(gw: SocketAddr, path: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(gw).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n").as_bytes())
        .await
        .unwrap();
    s
}

/// An HTTP/2 connection that grants no stream window (SETTINGS_INITIAL_WINDOW_SIZE 0) and
/// PINGs every 200 ms, so it never looks idle.
async fn h2_without_window(
    gw: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(gw).await.unwrap());
    let (send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .initial_stream_window_size(0)
            .keep_alive_interval(Duration::from_millis(200))
            .keep_alive_while_idle(true)
            .handshake(io)
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

/// Sends a GET on `h2` and returns its response (headers only: the body is never polled,
/// so no window is ever granted).
async fn h2_get(
    h2: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    gw: SocketAddr,
    path: &str,
) -> http::Response<hyper::body::Incoming> {
    let req = http::Request::get(format!("http://{gw}{path}"))
        .body(Empty::new())
        .unwrap();
    tokio::time::timeout(PATIENCE, h2.send_request(req))
        .await
        .expect("headers in time")
        .expect("response")
}

/// Waits (bounded) until `cond` holds; panics with `what` otherwise.
async fn eventually(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond().await {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `/admin/upstreams`' entry for `name`.
async fn upstream_entry(gw: &Running, name: &str) -> Value {
    let v: Value = client()
        .get(format!("http://{}/admin/upstreams", gw.admin_addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["upstream"] == name)
        .cloned()
        .unwrap()
}

async fn in_flight(gw: &Running, name: &str) -> u64 {
    upstream_entry(gw, name).await["in_flight"]
        .as_u64()
        .unwrap()
}

/// A sample's value from a Prometheus scrape (`name{labels} value`).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// An upstream answering every request with `chunks`, each sent once its gate (if any) is
/// notified; with no `content-length` (so chunked), and `content_type`.
async fn chunked_upstream(
    content_type: &'static str,
    chunks: Vec<(Bytes, Option<Arc<Notify>>)>,
) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let finished = done.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (chunks, finished) = (chunks.clone(), finished.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let (chunks, finished) = (chunks.clone(), finished.clone());
                    async move {
                        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
                        tokio::spawn(async move {
                            for (chunk, gate) in chunks {
                                if let Some(gate) = gate {
                                    gate.notified().await;
                                }
                                if tx.send(chunk).await.is_err() {
                                    return;
                                }
                            }
                            drop(tx);
                            finished.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        });
                        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                            rx.recv()
                                .await
                                .map(|b| (Ok::<_, Infallible>(http_body::Frame::data(b)), rx))
                        });
                        Ok::<_, Infallible>(
                            http::Response::builder()
                                .header("content-type", content_type)
                                .body(http_body_util::StreamBody::new(stream))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (format!("http://{addr}"), done)
}

// --- (a) the upstream is decoupled from a slow client -----------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_no_longer_hold_upstream_slots() {
    // The audit's case at test scale: a bulkhead of 8 and 12 slow readers from one address,
    // each of a body larger than what the sockets absorb (the kernel queues up to ~4 MiB for
    // a client that reads nothing; an HTTP/2 stream without window takes none of it).
    const BODY: usize = 5 << 20;
    let body = Bytes::from(vec![b'x'; BODY]);
    let storage = FakeUpstream::builder()
        .then(Step::body(200, "application/json", body))
        .start()
        .await;
    // Neither the share nor the rate floor may be what frees the slots here.
    let (mut cfg, path) = own_upstream(
        "decoupled",
        &storage.url(),
        "max_connections = 8\nmax_client_share = 1.0\ntimeout = \"3s\"",
    );
    cfg.limits.response_buffer = ByteSize(8 << 20);
    cfg.limits.response_buffer_total = ByteSize(64 << 20);
    cfg.limits.min_send_rate = ByteSize(0);
    let gw = spawn(cfg).await;
    let path = path.as_str();
    let mut h1 = Vec::new();
    let mut h2 = h2_without_window(gw.addr).await;
    let mut streams = Vec::new();
    for i in 0..6 {
        h1.push(slow_h1_reader(gw.addr, path).await);
        eventually(
            &format!("HTTP/1 slow reader {i} reaches the upstream"),
            async || storage.hits() > 2 * i,
        )
        .await;
        let resp = h2_get(&mut h2, gw.addr, path).await;
        assert_eq!(resp.status(), 200);
        streams.push(resp);
        assert_eq!(storage.hits(), 2 * i + 2);
    }
    // Nobody has read a byte, yet every slot is back once the upstream is done...
    eventually("every slot free again", async || {
        in_flight(&gw, "decoupled").await == 0
    })
    .await;
    let metrics = scrape(gw.admin_addr).await;
    assert_eq!(
        sample(
            &metrics,
            "gateway_upstream_in_flight{upstream=\"decoupled\"}"
        ),
        Some(0.0),
        "{metrics}"
    );
    // ...and the upstream connections went back to the pool: a handful, not one per reader.
    assert!(
        storage.connections() <= 6,
        "{} upstream connections",
        storage.connections()
    );
    // A client from another address is served at once, four times.
    let other = client_from("127.0.0.2");
    for _ in 0..4 {
        let started = Instant::now();
        let r = other
            .get(format!("{}{path}", gw.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap().len(), BODY);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
    drop((h1, streams));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_slow_readers_hold_in_total_is_bounded_and_beyond_it_bodies_stream() {
    // 8 MiB bodies: more than the kernel queues for a client that reads nothing (~4 MiB), so
    // a streamed one keeps its slot.
    let body = Bytes::from(vec![b'x'; 8 << 20]);
    let storage = FakeUpstream::builder()
        .then(Step::body(200, "application/json", body))
        .start()
        .await;
    let (mut cfg, path) = own_upstream("budget", &storage.url(), "max_client_share = 1.0");
    cfg.limits.response_buffer = ByteSize(8 << 20);
    cfg.limits.response_buffer_total = ByteSize(20 << 20);
    cfg.limits.min_send_rate = ByteSize(0);
    let gw = spawn(cfg).await;
    // Two bodies of 8 MiB fit the 20 MiB budget: held, their slots free.
    let mut readers = Vec::new();
    for i in 0..2 {
        readers.push(slow_h1_reader(gw.addr, &path).await);
        eventually(&format!("reader {i} served"), async || storage.hits() > i).await;
    }
    eventually("both slots free", async || {
        in_flight(&gw, "budget").await == 0
    })
    .await;
    // A third does not: it streams, its slot held while its client does not read.
    let third = slow_h1_reader(gw.addr, &path).await;
    eventually("third served", async || storage.hits() == 3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(in_flight(&gw, "budget").await, 1);
    // Once a held body is gone (its client left), the next one is held again.
    drop(readers.remove(0));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fourth = slow_h1_reader(gw.addr, &path).await;
    eventually("fourth served", async || storage.hits() == 4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(in_flight(&gw, "budget").await, 1, "only the third streams");
    drop((readers, third, fourth));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_that_fits_the_buffer_frees_its_slot_before_the_client_reads() {
    // `#` appears nowhere in a response head or chunk-size line.
    let chunks = (0..20)
        .map(|_| (Bytes::from(vec![b'#'; 10 << 10]), None))
        .collect();
    let (url, finished) = chunked_upstream("application/json", chunks).await;
    let (mut cfg, path) = own_upstream("chunked", &url, "");
    cfg.limits.min_send_rate = ByteSize(0);
    let gw = spawn(cfg).await;
    // 200 KiB, chunked: under the default 256 KiB buffer.
    let mut reader = slow_h1_reader(gw.addr, &path).await;
    let mut h2 = h2_without_window(gw.addr).await;
    let stream = h2_get(&mut h2, gw.addr, &path).await;
    eventually("the upstream sent both bodies", async || {
        finished.load(std::sync::atomic::Ordering::SeqCst) == 2
    })
    .await;
    eventually("both slots free", async || {
        in_flight(&gw, "chunked").await == 0
    })
    .await;
    // The client still gets all of it, later.
    let mut got = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    let mut buf = vec![0u8; 64 << 10];
    while !got.ends_with(b"\r\n0\r\n\r\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, reader.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            other => panic!("body cut short after {} bytes: {other:?}", got.len()),
        }
    }
    let body_bytes = got.iter().filter(|b| **b == b'#').count();
    assert_eq!(body_bytes, 200 << 10);
    drop(stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_larger_than_the_buffer_still_streams_and_holds_its_slot_until_sent() {
    let release = Arc::new(Notify::new());
    let first = Bytes::from(vec![b'a'; 1 << 20]);
    let rest = Bytes::from(vec![b'b'; 3 << 20]);
    // Chunked and larger than the buffer: read ahead, then streamed as the client takes it.
    let (url, finished) = chunked_upstream(
        "application/octet-stream",
        vec![(first, None), (rest, Some(release.clone()))],
    )
    .await;
    let (cfg, path) = own_upstream("large", &url, "");
    let gw = spawn(cfg).await;
    let mut resp = client()
        .get(format!("{}{path}", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The first MiB arrives while the upstream holds back the rest: nothing waits for the end.
    let mut received = 0usize;
    while received < 1 << 20 {
        let chunk = tokio::time::timeout(PATIENCE, resp.chunk())
            .await
            .expect("first part in time")
            .unwrap()
            .expect("more body");
        received += chunk.len();
    }
    // The call is not over: its slot is held and shown.
    assert_eq!(in_flight(&gw, "large").await, 1);
    let metrics = scrape(gw.admin_addr).await;
    assert_eq!(
        sample(&metrics, "gateway_upstream_in_flight{upstream=\"large\"}"),
        Some(1.0)
    );
    release.notify_one();
    while let Some(chunk) = tokio::time::timeout(PATIENCE, resp.chunk())
        .await
        .unwrap()
        .unwrap()
    {
        received += chunk.len();
    }
    assert_eq!(received, 4 << 20);
    assert_eq!(finished.load(std::sync::atomic::Ordering::SeqCst), 1);
    eventually("the slot is free", async || {
        in_flight(&gw, "large").await == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_flow_event_by_event_and_a_quiet_one_is_not_cut() {
    let gates: Vec<Arc<Notify>> = (0..2).map(|_| Arc::new(Notify::new())).collect();
    let (url, _) = chunked_upstream(
        "text/event-stream",
        vec![
            (Bytes::from_static(b"data: one\n\n"), None),
            (Bytes::from_static(b"data: two\n\n"), Some(gates[0].clone())),
            (
                Bytes::from_static(b"data: three\n\n"),
                Some(gates[1].clone()),
            ),
        ],
    )
    .await;
    let (mut cfg, path) = own_upstream("events", &url, "");
    // A strict floor over a short window: a stream that owes the client nothing between
    // events must still not be cut.
    cfg.limits.min_send_rate = ByteSize(64 << 10);
    cfg.limits.min_send_rate_window = Dur::from_secs(1);
    let gw = spawn(cfg).await;
    let mut resp = client()
        .get(format!("{}{path}", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let next = async |resp: &mut reqwest::Response| {
        tokio::time::timeout(PATIENCE, resp.chunk())
            .await
            .expect("event in time")
            .unwrap()
            .expect("stream open")
    };
    assert_eq!(&next(&mut resp).await[..], b"data: one\n\n");
    // Quiet for 2.5 windows.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    gates[0].notify_one();
    assert_eq!(&next(&mut resp).await[..], b"data: two\n\n");
    gates[1].notify_one();
    assert_eq!(&next(&mut resp).await[..], b"data: three\n\n");
    assert!(resp.chunk().await.unwrap().is_none());
}

// --- (b) no client holds more than its share of an upstream's slots -------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_holds_at_most_its_share_and_others_are_served() {
    // Answers that take their time: every call holds its slot for a while.
    let storage = FakeUpstream::builder()
        .then(Step::status(200).delayed(Duration::from_millis(1500)))
        .start()
        .await;
    let (cfg, path) = own_upstream("shared", &storage.url(), "max_connections = 8");
    let gw = spawn(cfg).await;
    assert_eq!(upstream_entry(&gw, "shared").await["max_per_client"], 2);
    let url = format!("{}{path}", gw.url());
    let hog = client_from("127.0.0.1");
    let held: Vec<_> = (0..2)
        .map(|_| {
            let (c, u) = (hog.clone(), url.clone());
            tokio::spawn(async move { c.get(u).send().await.unwrap().status() })
        })
        .collect();
    eventually("two calls in flight", async || {
        in_flight(&gw, "shared").await == 2
    })
    .await;
    // A third from the same address: refused at once, not queued behind the deadline.
    let started = Instant::now();
    let r = hog.get(&url).send().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["reason"], "too_many_in_flight");
    assert_eq!(body["upstream"], "shared");
    assert!(body["request_id"].is_string());
    // Other clients still get slots.
    let r = client_from("127.0.0.3").get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    for h in held {
        assert_eq!(h.await.unwrap(), 200);
    }
    // The refusal reached no upstream and counted for no breaker.
    assert_eq!(storage.hits(), 3);
    assert_eq!(upstream_entry(&gw, "shared").await["breaker"], "closed");
}

// --- (c) a minimum transfer rate -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_below_the_minimum_rate_is_cut_off() {
    let big = Bytes::from(vec![b'z'; 16 << 20]);
    let storage = FakeUpstream::builder()
        .then(Step::body(200, "application/octet-stream", big))
        .start()
        .await;
    let (mut cfg, path) = own_upstream("minrate", &storage.url(), "");
    cfg.limits.min_send_rate = ByteSize(64 << 10);
    cfg.limits.min_send_rate_window = Dur::from_secs(1);
    // Long enough that only the rate floor can explain a cut.
    cfg.limits.send_timeout = Dur::from_secs(120);
    let gw = spawn(cfg).await;
    let path = path.as_str();
    // A fast client of the same 16 MiB is not cut.
    let r = client()
        .get(format!("{}{path}", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().len(), 16 << 20);
    // A client that reads 512 bytes every 100 ms (5 KiB/s, progress all along).
    let mut slow = slow_h1_reader(gw.addr, path).await;
    let started = Instant::now();
    let mut buf = [0u8; 512];
    let cut = loop {
        assert!(
            started.elapsed() < PATIENCE,
            "the slow reader was never cut"
        );
        match tokio::time::timeout(Duration::from_millis(100), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break started.elapsed(),
            Ok(Ok(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(_) => {}
        }
    };
    // At least a window (it is measured over a whole one); the kernel's buffers on loopback
    // take a few more to fill before the rate shows.
    assert!(cut >= Duration::from_millis(900), "{cut:?}");
    assert_cut_counted(&gw).await;
    eventually("the slot is free", async || {
        in_flight(&gw, "minrate").await == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_that_never_grants_window_is_cut_off() {
    let storage = FakeUpstream::ok().await;
    let (mut cfg, path) = own_upstream("h2cut", &storage.url(), "");
    cfg.limits.min_send_rate_window = Dur::from_secs(1);
    // Far beyond the test: the PINGs keep the connection from ever being idle anyway.
    cfg.limits.idle_timeout = Dur::from_secs(120);
    let gw = spawn(cfg).await;
    let mut h2 = h2_without_window(gw.addr).await;
    let started = Instant::now();
    let resp = h2_get(&mut h2, gw.addr, &path).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    // The body never arrives (no window); the connection is closed under it.
    let ended = tokio::time::timeout(PATIENCE, body.frame()).await;
    let took = started.elapsed();
    assert!(
        matches!(ended, Ok(None) | Ok(Some(Err(_)))),
        "the stream was not cut: {ended:?}"
    );
    assert!(took >= Duration::from_millis(900), "{took:?}");
    eventually("the sender sees the connection closed", async || {
        h2.is_closed()
    })
    .await;
    assert_cut_counted(&gw).await;
}

/// The cut shows in `gateway_connections_closed_total{reason="min_send_rate"}` (at least
/// this one: the recorder is shared with the other tests of this binary).
async fn assert_cut_counted(gw: &Running) {
    let metrics = scrape(gw.admin_addr).await;
    let cuts = sample(
        &metrics,
        "gateway_connections_closed_total{reason=\"min_send_rate\"}",
    );
    assert!(cuts.is_some_and(|n| n >= 1.0), "{cuts:?}");
}

// --- Item 3: per-client keys group IPv6 by prefix ---------------------------------------------

/// A gateway behind a trusted proxy (the test connects from loopback and names the client in
/// `X-Forwarded-For`) with small per-client limits: `default` 5 per minute, `auth_failures`
/// 3 per minute, 2 WebSockets per client, storage 8 slots (2 per client). Storage answers
/// after 1.5 s, auth rejects every token.
struct Ipv6Setup {
    gw: Running,
    storage: FakeUpstream,
    auth: FakeUpstream,
    _socket: SimServer,
}

async fn ipv6_setup() -> Ipv6Setup {
    let storage = FakeUpstream::builder()
        .then(Step::status(200).delayed(Duration::from_millis(1500)))
        .start()
        .await;
    let auth = FakeUpstream::builder()
        .then(Step::body(
            401,
            "application/json",
            r#"{"error":"Invalid token"}"#,
        ))
        .start()
        .await;
    let socket_service = SimServer::start(Service::Socket, SimOptions::default()).await;
    let socket = socket_service.url("");
    let (s, a) = (storage.url(), auth.url());
    let mut cfg = config_with_upstreams(move |name| match name {
        "auth" => a.clone(),
        "socket" => socket.clone(),
        _ => s.clone(),
    });
    lift_limits(&mut cfg);
    cfg.trusted_proxies = vec!["127.0.0.1".into()];
    for p in &mut cfg.rate_limit.policies {
        if p.name == "default" {
            p.limit = 5;
        }
    }
    cfg.rate_limit.policies.push(PolicyConfig {
        name: "auth_failures".into(),
        limit: 3,
        window: Dur::from_secs(60),
        key: Default::default(),
    });
    cfg.websocket.max_connections_per_ip = 2;
    cfg.upstreams.get_mut("storage").unwrap().max_connections = 8;
    Ipv6Setup {
        gw: spawn(cfg).await,
        storage,
        auth,
        _socket: socket_service,
    }
}

/// A fresh address of 2001:db8:1:2::/64 per call, as one host can use.
fn fresh_v6() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    let (a, b) = (n.wrapping_mul(7919) & 0xffff, n & 0xffff);
    format!("2001:db8:1:2:{a:x}::{b:x}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_rate_limits_count_one_prefix_as_one_client() {
    let t = ipv6_setup().await;
    let http = client();
    // `default` is 5 per minute on the products route (cached: one upstream call).
    let products = format!("{}/api/data/products", t.gw.url());
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let r = http
            .get(&products)
            .header("x-forwarded-for", fresh_v6())
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429]);
    // Another /64, and an IPv4 client in either spelling, have budgets of their own.
    for other in ["2001:db8:1:3::1", "::ffff:203.0.113.9", "203.0.113.9"] {
        let r = http
            .get(&products)
            .header("x-forwarded-for", other)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{other}");
    }
    let r = http
        .get(&products)
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await
        .unwrap();
    let remaining = r.headers()["ratelimit"].to_str().unwrap().to_string();
    assert!(
        remaining.contains("r=2"),
        "mapped and plain IPv4 share one budget: {remaining}"
    );
    assert_eq!(t.storage.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_failed_verifications_count_one_prefix_as_one_client() {
    let t = ipv6_setup().await;
    let me = format!("{}/api/user/me", t.gw.url());
    let mut statuses = Vec::new();
    for i in 0..8 {
        let r = client()
            .get(&me)
            .bearer_auth(format!("bad.token.{i}"))
            .header("x-forwarded-for", fresh_v6())
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    // Three failures spend the /64's failure budget (src/auth/guard.rs); the rest are
    // refused without a verify call.
    assert_eq!(statuses, [401, 401, 401, 429, 429, 429, 429, 429]);
    assert_eq!(t.auth.hits(), 3, "verify calls for one /64");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_websocket_cap_counts_one_prefix_as_one_client() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let t = ipv6_setup().await;
    let ws_url = format!("ws://{}/ws", t.gw.addr);
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..3 {
        let mut req = ws_url.as_str().into_client_request().unwrap();
        req.headers_mut()
            .insert("x-forwarded-for", fresh_v6().parse().unwrap());
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => open.push(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), 429);
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((open.len(), refused), (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_slot_share_counts_one_prefix_as_one_client() {
    let t = ipv6_setup().await;
    let http = client();
    let underlying = format!("{}/api/data/underlying/NIFTY", t.gw.url());
    let held: Vec<_> = (0..2)
        .map(|_| {
            let (h, u) = (http.clone(), underlying.clone());
            tokio::spawn(async move {
                h.get(u)
                    .header("x-forwarded-for", fresh_v6())
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    eventually("two calls in flight", async || {
        in_flight(&t.gw, "storage").await == 2
    })
    .await;
    let r = http
        .get(&underlying)
        .header("x-forwarded-for", fresh_v6())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["reason"], "too_many_in_flight");
    for h in held {
        assert_eq!(h.await.unwrap(), 200);
    }
}

// --- (e) memory per slow reader ----------------------------------------------------------------

/// The binary (`serve`) in front of an upstream answering `body_kib` KiB, then 256 slow
/// readers: HTTP/1 clients that never read (4 KiB receive buffers), or HTTP/2 streams without
/// window (64 per connection); resident memory before and after, per reader. Another build
/// can be measured with `GATEWAY_BIN=path` (the config then uses only settings every build
/// knows; the README's before/after figures). Printed with `--nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_per_slow_reader_is_bounded() {
    const READERS: usize = 256;
    let other_build = std::env::var("GATEWAY_BIN").ok().filter(|b| !b.is_empty());
    for (http2, body_kib) in [(false, 16usize), (false, 200), (true, 200)] {
        let body = Bytes::from(vec![b'm'; body_kib << 10]);
        let storage = FakeUpstream::builder()
            .then(Step::body(200, "application/json", body))
            .start()
            .await;
        // What a reader holds until it is cut, not the cut: no rate floor while measuring.
        let limits = if other_build.is_some() {
            ""
        } else {
            "[limits]\nmin_send_rate = \"0B\""
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(
            &path,
            format!(
                r#"
[server]
host = "127.0.0.1"
port = 0
shutdown_grace = "1s"
memory_trim_interval = "200ms"
# What a slow reader holds, not the gateway's own saturation: a debug build taking 256
# requests at once on a machine other builds keep busy is late for a second or more, and
# would refuse some of them (503 overloaded) instead of holding them.
[server.saturation]
enabled = false
[admin]
host = "127.0.0.1"
port = 0
{limits}
[upstreams.storage]
url = "{url}"
max_connections = 1024
# 256 readers arrive at once on a loaded machine: the adaptive limit would shed some (its
# subject is tests/overload.rs); here every one must reach the upstream.
[upstreams.storage.concurrency]
enabled = false
[[rate_limit.policies]]
name = "default"
limit = 1000000
[[rate_limit.policies]]
name = "auth"
limit = 1000000
"#,
                url = storage.url()
            ),
        )
        .unwrap();
        let bin = other_build.clone().unwrap_or_else(|| BINARY.to_string());
        let gw = GatewayProcess::start(serve_command(&bin, &path)).keeping(dir);
        let (pid, addr) = (gw.pid(), gw.addr);
        let path = "/api/data/underlying/NIFTY";
        // Warm up (pools, allocator arenas, lazily built state), then the baseline.
        let warm = client();
        for _ in 0..20 {
            let r = warm
                .get(format!("http://{addr}{path}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.bytes().await.unwrap().len(), body_kib << 10);
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
        let before = status_kib(pid, "VmRSS").unwrap();
        let mut h1 = Vec::new();
        let mut h2 = Vec::new();
        let mut streams = Vec::new();
        for i in 0..READERS {
            if !http2 {
                h1.push(slow_h1_reader(addr, path).await);
                continue;
            }
            if i % 64 == 0 {
                h2.push(h2_without_window(addr).await);
            }
            let conn = h2.last_mut().unwrap();
            let req = http::Request::get(format!("http://{addr}{path}"))
                .body(Empty::new())
                .unwrap();
            streams.push(conn.send_request(req));
        }
        let deadline = Instant::now() + PATIENCE;
        while storage.hits() < 20 + READERS && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut held = Vec::new();
        for s in streams {
            held.push(tokio::time::timeout(PATIENCE, s).await.unwrap().unwrap());
        }
        // Let the gateway write what the sockets take and settle.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let served = storage.hits() - 20;
        let after = status_kib(pid, "VmRSS").unwrap();
        let per_reader = after.saturating_sub(before) as f64 / READERS as f64;
        let kind = if http2 {
            "HTTP/2 streams"
        } else {
            "HTTP/1 readers"
        };
        println!(
            "{READERS} slow {kind} of {body_kib} KiB: {served} reached the upstream; \
             RSS {before} KiB -> {after} KiB, {per_reader:.1} KiB per reader"
        );
        drop((h1, held, h2));
        drop(gw);
        assert_eq!(served, READERS, "not every slow reader was served");
        if other_build.is_none() {
            // What a reader can hold: its body (within response_buffer) plus connection state.
            let bound = body_kib as f64 + 96.0;
            assert!(
                per_reader < bound,
                "{per_reader:.1} KiB per slow {kind} of a {body_kib} KiB body (bound {bound})"
            );
        }
    }
}
