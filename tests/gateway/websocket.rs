//! WebSocket routes through the real gateway with real WebSocket clients (tokio-tungstenite),
//! in front of the simulated socket service or a small recording WebSocket upstream: ticks
//! relayed, many subscribers, the edge's policies at the handshake (token, origin, limits,
//! identity headers), and the failure semantics (upstream gone -> 1012 within a second,
//! gateway shutdown -> 1001, client gone -> the upstream connection closes).

use crate::support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deltastream_gateway::config::{Config, Dur, PolicyConfig};
use deltastream_gateway::server::Running;
use deltastream_gateway::sim::{Service, SimOptions};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::gateway::{client, config_with_upstreams, scrape, spawn};
use support::sim::SimServer;
use support::FakeUpstream;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Plenty on a loaded machine; reaching it is a failure.
const PATIENCE: Duration = Duration::from_secs(20);

/// The simulated socket service on a free port, ticking every 50 ms; it stops when dropped.
async fn socket_service(faults: bool) -> SimServer {
    let opts = SimOptions {
        faults,
        tick_interval: Duration::from_millis(50),
        ..SimOptions::default()
    };
    SimServer::start(Service::Socket, opts).await
}

/// The embedded config with the socket upstream at `socket` (others at a fake), limits lifted.
fn config(socket: &str, other: &FakeUpstream) -> Config {
    let (s, o) = (socket.to_string(), other.url());
    let mut cfg = config_with_upstreams(move |name| {
        if name == "socket" {
            s.clone()
        } else {
            o.clone()
        }
    });
    cfg.rate_limit.policies = ["default", "auth", "ws"]
        .into_iter()
        .map(|name| PolicyConfig {
            name: name.into(),
            limit: 1_000_000,
            window: Dur::from_secs(60),
            key: Default::default(),
        })
        .collect();
    cfg.websocket.max_connections_per_ip = 10_000;
    cfg
}

fn ws_url(gw: &Running) -> String {
    format!("ws://{}/ws", gw.addr)
}

async fn connect(url: &str) -> Ws {
    let (ws, resp) = tokio::time::timeout(PATIENCE, connect_async(url))
        .await
        .expect("handshake in time")
        .expect("handshake");
    assert_eq!(resp.status(), 101);
    ws
}

async fn subscribe(ws: &mut Ws, product: &str) {
    ws.send(Message::text(
        json!({"action": "subscribe", "products": [product]}).to_string(),
    ))
    .await
    .unwrap();
}

/// The next text message that parses as JSON with `type == kind`.
async fn next_of(ws: &mut Ws, kind: &str) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no {kind} in time"))
            .expect("open")
            .expect("message");
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == kind {
                return v;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_was_silent_for_a_while_still_gets_its_close_answered() {
    // Found by the load test's idle holders: the relay took its clock reading before a long
    // wait, so a close that came after more than close_timeout (1 s) of silence started an
    // already-expired close deadline and the upstream's reply was never relayed (1006).
    let socket = socket_service(false).await;
    let other = FakeUpstream::ok().await;
    let gw = spawn(config(&socket.url(""), &other)).await;
    let mut ws = connect(&ws_url(&gw)).await;
    // Subscribed to nothing: no tick wakes the relay.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ws.send(Message::Close(Some(
        tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        },
    )))
    .await
    .unwrap();
    assert_eq!(
        close_code(&mut ws, Duration::from_secs(3)).await,
        Some(CloseCode::Normal),
        "the close was not answered"
    );
}

/// Reads until the close frame; its code, and how long it took to come.
async fn close_code(ws: &mut Ws, within: Duration) -> Option<CloseCode> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| f.code),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_)) | None) => return None,
            Err(_) => panic!("no close frame within {within:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticks_are_relayed_and_a_bad_message_keeps_the_connection() {
    let socket = socket_service(false).await;
    let other = FakeUpstream::ok().await;
    let gw = spawn(config(&socket.url(""), &other)).await;
    let mut ws = connect(&ws_url(&gw)).await;
    subscribe(&mut ws, "NIFTY").await;
    assert_eq!(
        next_of(&mut ws, "subscribed").await["products"],
        json!(["NIFTY"])
    );
    for _ in 0..3 {
        let tick = next_of(&mut ws, "tick").await;
        assert_eq!(tick["product"], "NIFTY");
        assert!(tick["price"].as_f64().unwrap() > 0.0);
    }
    ws.send(Message::text("not json")).await.unwrap();
    assert!(next_of(&mut ws, "error").await["error"].is_string());
    assert_eq!(next_of(&mut ws, "tick").await["product"], "NIFTY");
    // Also under the version prefix.
    let mut v1 = connect(&format!("ws://{}/api/v1/ws", gw.addr)).await;
    subscribe(&mut v1, "BANKNIFTY").await;
    assert_eq!(next_of(&mut v1, "tick").await["product"], "BANKNIFTY");
    ws.close(None).await.unwrap();
    // Visible: upgrades and the connection gauge.
    let metrics = scrape(gw.admin_addr).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("gateway_requests_total{")
                && l.contains("route=\"/ws\"")
                && l.contains("status=\"1xx\"")),
        "{metrics}"
    );
    assert!(
        metrics.contains("gateway_websocket_connections{route=\"/ws\"}"),
        "{metrics}"
    );
    assert!(metrics
        .lines()
        .any(|l| l.starts_with("gateway_websocket_messages_total{")
            && l.contains("direction=\"out\"")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_subscribers_all_receive_their_ticks() {
    let socket = socket_service(false).await;
    let other = FakeUpstream::ok().await;
    let mut cfg = config(&socket.url(""), &other);
    // This test is about fan-out, not handshake speed: 500 handshakes at once through a debug
    // build and a debug simulator on a busy 2-core machine take longer than the 3 s default
    // handshake timeout (and the timeouts then open the breaker), so it gets a data route's.
    cfg.websocket.handshake_timeout = Dur::from_secs(10);
    let gw = spawn(cfg).await;
    let url = ws_url(&gw);
    let products = ["NIFTY", "BANKNIFTY", "FINNIFTY"];
    let tasks: Vec<_> = (0..500)
        .map(|i| {
            let url = url.clone();
            let product = products[i % 3];
            tokio::spawn(async move {
                let mut ws = connect(&url).await;
                subscribe(&mut ws, product).await;
                for _ in 0..2 {
                    let tick = next_of(&mut ws, "tick").await;
                    assert_eq!(tick["product"], product);
                }
                ws
            })
        })
        .collect();
    let mut open = Vec::new();
    for t in tasks {
        open.push(t.await.unwrap());
    }
    assert_eq!(open.len(), 500);
}

/// A WebSocket upstream that records each handshake's request and tells when a connection
/// ends (echoes text otherwise).
struct Recorder {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Request>>>,
    closed: Arc<tokio::sync::Notify>,
}

async fn recorder() -> Recorder {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests: Arc<Mutex<Vec<Request>>> = Arc::default();
    let closed = Arc::new(tokio::sync::Notify::new());
    let (reqs, done) = (requests.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (reqs, done) = (reqs.clone(), done.clone());
            tokio::spawn(async move {
                #[allow(clippy::result_large_err)] // the Err type is tungstenite's callback API
                let callback = |req: &Request, resp: Response| {
                    reqs.lock().unwrap().push(req.clone());
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() && ws.send(msg).await.is_err() {
                        break;
                    }
                }
                done.notify_one();
            });
        }
    });
    Recorder {
        addr,
        requests,
        closed,
    }
}

fn verify_ok() -> support::Step {
    support::Step::body(
        200,
        "application/json",
        r#"{"valid":true,"user_id":"u-7","email":"u7@example.com"}"#,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_identity_and_origin_are_checked_at_the_handshake() {
    let up = recorder().await;
    let auth = FakeUpstream::builder()
        .steps([support::Step::status(401)])
        .then(verify_ok())
        .start()
        .await;
    let mut cfg = config(&format!("http://{}", up.addr), &auth);
    cfg.cors.allowed_origins = vec!["https://app.example".into()];
    for r in cfg.routes.iter_mut() {
        if r.path == "/ws" {
            r.auth = true;
        }
    }
    let gw = spawn(cfg).await;
    let url = ws_url(&gw);
    // No token, then a rejected one: 401 before any upgrade, nothing reaches the upstream.
    let err = connect_async(url.as_str()).await.expect_err("refused");
    assert!(err.to_string().contains("401"), "{err}");
    let mut req = url.as_str().into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", "Bearer rejected.token".parse().unwrap());
    let err = connect_async(req).await.expect_err("refused");
    assert!(err.to_string().contains("401"), "{err}");
    assert!(up.requests.lock().unwrap().is_empty());
    // A foreign Origin: 403.
    let mut req = url.as_str().into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", "Bearer good.token".parse().unwrap());
    req.headers_mut()
        .insert("origin", "https://evil.example".parse().unwrap());
    let err = connect_async(req).await.expect_err("refused");
    assert!(err.to_string().contains("403"), "{err}");
    // A good token in the Authorization header, with spoofed identity headers: the upstream
    // sees only the gateway's.
    let mut req = url.as_str().into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", "Bearer good.token".parse().unwrap());
    req.headers_mut()
        .insert("origin", "https://app.example".parse().unwrap());
    req.headers_mut()
        .insert("x-user-id", "admin".parse().unwrap());
    req.headers_mut()
        .insert("x_user_email", "root@example.com".parse().unwrap());
    let (mut ws, _) = connect_async(req).await.expect("upgraded");
    ws.send(Message::text("ping?")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("ping?"));
    {
        let seen = up.requests.lock().unwrap();
        let h = seen.last().unwrap().headers();
        assert_eq!(h["x-user-id"], "u-7");
        assert_eq!(h["x-user-email"], "u7@example.com");
        assert!(h.get("x_user_email").is_none());
        assert!(h.get("authorization").is_none(), "the token was forwarded");
    }
    // A browser's token: in the protocol list (the 101 selects "bearer") or the query; it is
    // never forwarded.
    let mut req = format!("{url}?product=NIFTY")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "bearer, browser.token".parse().unwrap(),
    );
    let (_ws2, resp) = connect_async(req)
        .await
        .expect("upgraded with a protocol token");
    assert_eq!(resp.headers()["sec-websocket-protocol"], "bearer");
    let (_ws3, _) = connect_async(format!("{url}?access_token=query.token&product=NIFTY"))
        .await
        .expect("upgraded with a query token");
    let seen = up.requests.lock().unwrap();
    for r in seen.iter().rev().take(2) {
        assert_eq!(r.uri().query(), Some("product=NIFTY"), "{:?}", r.uri());
        assert!(r.headers().get("sec-websocket-protocol").is_none());
        assert_eq!(r.headers()["x-user-id"], "u-7");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_handshake_gets_a_clear_error_and_limits_give_429() {
    let up = recorder().await;
    let other = FakeUpstream::ok().await;
    let mut cfg = config(&format!("http://{}", up.addr), &other);
    cfg.websocket.max_connections_per_ip = 2;
    let gw = spawn(cfg).await;
    let http = client();
    let base = format!("http://{}/ws", gw.addr);
    // A plain GET: 426 with the version; a wrong version: 426; no key: 400. All JSON.
    let r = http.get(&base).send().await.unwrap();
    assert_eq!(r.status(), 426);
    assert_eq!(r.headers()["sec-websocket-version"], "13");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["reason"], "upgrade_required");
    let upgrade = |version: &str, key: Option<&str>| {
        let mut rb = http
            .get(&base)
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", version);
        if let Some(k) = key {
            rb = rb.header("sec-websocket-key", k);
        }
        rb.send()
    };
    assert_eq!(
        upgrade("8", Some("dGhlIHNhbXBsZSBub25jZQ=="))
            .await
            .unwrap()
            .status(),
        426
    );
    let r = upgrade("13", None).await.unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["reason"], "bad_request");
    assert_eq!(upgrade("13", Some("short")).await.unwrap().status(), 400);
    assert!(up.requests.lock().unwrap().is_empty());
    // Two connections per IP: the third gets 429 until one closes.
    let mut a = connect(&ws_url(&gw)).await;
    let _b = connect(&ws_url(&gw)).await;
    let err = connect_async(ws_url(&gw))
        .await
        .expect_err("over the limit");
    assert!(err.to_string().contains("429"), "{err}");
    a.close(None).await.unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        match connect_async(ws_url(&gw)).await {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("slot never freed: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_upstream_goes_every_client_gets_a_close_code_within_a_second() {
    let socket = socket_service(true).await;
    let other = FakeUpstream::ok().await;
    let gw = spawn(config(&socket.url(""), &other)).await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut ws = connect(&ws_url(&gw)).await;
        subscribe(&mut ws, "NIFTY").await;
        next_of(&mut ws, "tick").await;
        clients.push(ws);
    }
    // The socket service drops every connection abruptly (no close frame).
    let dropped = client()
        .post(socket.url("/_faults/drop"))
        .send()
        .await
        .unwrap();
    assert!(dropped.status().is_success());
    let started = Instant::now();
    for mut ws in clients {
        let code = close_code(&mut ws, Duration::from_secs(2)).await;
        assert_eq!(code, Some(CloseCode::Restart), "expected 1012");
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // The gateway stays up; a reconnect works.
    let mut again = connect(&ws_url(&gw)).await;
    subscribe(&mut again, "NIFTY").await;
    next_of(&mut again, "tick").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_client_closes_its_upstream_connection_and_shutdown_sends_1001() {
    let up = recorder().await;
    let other = FakeUpstream::ok().await;
    let gw = spawn(config(&format!("http://{}", up.addr), &other)).await;
    // A client that vanishes (TCP closed, no close frame).
    let ws = connect(&ws_url(&gw)).await;
    drop(ws);
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(3), up.closed.notified())
        .await
        .expect("the upstream connection outlived its client");
    assert!(started.elapsed() < Duration::from_secs(2));
    // Gateway shutdown: every client gets 1001.
    let mut a = connect(&ws_url(&gw)).await;
    let mut b = connect(&ws_url(&gw)).await;
    let shutdown = tokio::spawn(gw.shutdown());
    assert_eq!(
        close_code(&mut a, Duration::from_secs(3)).await,
        Some(CloseCode::Away)
    );
    assert_eq!(
        close_code(&mut b, Duration::from_secs(3)).await,
        Some(CloseCode::Away)
    );
    tokio::time::timeout(Duration::from_secs(5), shutdown)
        .await
        .expect("the gateway stopped")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_are_rate_limited_and_a_silent_client_is_pinged_then_closed() {
    let up = recorder().await;
    let other = FakeUpstream::ok().await;
    let mut cfg = config(&format!("http://{}", up.addr), &other);
    cfg.rate_limit.policies.retain(|p| p.name != "ws");
    cfg.rate_limit.policies.push(PolicyConfig {
        name: "ws".into(),
        limit: 3,
        window: Dur::from_secs(60),
        key: Default::default(),
    });
    cfg.websocket.idle_timeout = Dur::from_millis(600);
    let gw = spawn(cfg).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(connect(&ws_url(&gw)).await);
    }
    let err = connect_async(ws_url(&gw)).await.expect_err("rate limited");
    assert!(err.to_string().contains("429"), "{err}");
    // A client that reads nothing (so answers no ping) for the idle timeout: pinged at half of
    // it, then closed with 1001.
    let mut silent = open.pop().unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    let mut saw_ping = false;
    let deadline = Instant::now() + PATIENCE;
    let code = loop {
        match tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            silent.next(),
        )
        .await
        {
            Ok(Some(Ok(Message::Ping(_)))) => saw_ping = true,
            Ok(Some(Ok(Message::Close(frame)))) => break frame.map(|f| f.code),
            Ok(Some(Ok(_))) => {}
            other => panic!("no close: {other:?}"),
        }
    };
    assert!(saw_ping, "no ping before the idle close");
    assert_eq!(code, Some(CloseCode::Away));
}
