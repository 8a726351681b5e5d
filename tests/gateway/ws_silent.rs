//! A silent upstream behind a WebSocket route: a real WebSocket upstream (tokio-tungstenite)
//! that stops polling everything (no read, so no pong; no write; no accept) while its TCP
//! connections and its listener stay open, as a paused process's do, and real clients
//! through the real gateway. Its subscribers are closed with 1012 once the gateway's ping goes
//! unanswered, new subscribers get a JSON 503 within the handshake timeout (not the route's
//! 10 s), and a quiet upstream that still answers keeps its subscribers.

use crate::support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use deltastream_gateway::config::{Config, Dur};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use support::gateway::{client, config_with_upstreams, scrape, spawn};
use support::FakeUpstream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The test settings: the upstream is pinged after 500 ms of quiet and has 500 ms to answer.
const PING_INTERVAL: Duration = Duration::from_millis(500);
const PONG_TIMEOUT: Duration = Duration::from_millis(500);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);
/// Headroom for a loaded 2-core machine on every upper bound.
const MARGIN: Duration = Duration::from_secs(3);

/// A WebSocket upstream on a free port. While `silence` is false it serves: every connection
/// gets a tick every 100 ms (when `ticks`) and has its frames read (tungstenite answers pings
/// as it reads). Once `silence` is true it polls nothing at all, holding every connection and
/// the listener open.
async fn upstream(ticks: bool) -> (SocketAddr, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (silence, silenced) = watch::channel(false);
    let mut rx = silenced.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = until_silent(&mut rx) => break,
                accepted = listener.accept() => {
                    let Ok((tcp, _)) = accepted else { continue };
                    tokio::spawn(serve(tcp, ticks, silenced.clone()));
                }
            }
        }
        let _held = listener;
        std::future::pending::<()>().await;
    });
    (addr, silence)
}

async fn until_silent(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn serve(tcp: TcpStream, ticks: bool, mut silence: watch::Receiver<bool>) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
        return;
    };
    let mut every = tokio::time::interval(Duration::from_millis(100));
    loop {
        let silent = tokio::select! {
            _ = until_silent(&mut silence) => true,
            _ = every.tick(), if ticks => {
                if ws.send(Message::text(r#"{"type":"tick"}"#)).await.is_err() {
                    return;
                }
                false
            }
            msg = ws.next() => match msg {
                Some(Ok(_)) => false,
                _ => return,
            },
        };
        if silent {
            break;
        }
    }
    let _held = ws;
    std::future::pending::<()>().await;
}

/// The embedded config with the socket upstream at `socket` (the others at a fake) and the
/// test's watch settings (each test opens at most 5 connections: the built-in upgrade limit,
/// 20 a minute, stays).
fn config(socket: SocketAddr, other: &FakeUpstream) -> Config {
    let (s, o) = (format!("http://{socket}"), other.url());
    let mut cfg = config_with_upstreams(move |name| {
        if name == "socket" {
            s.clone()
        } else {
            o.clone()
        }
    });
    cfg.websocket.upstream_ping_interval = Dur(PING_INTERVAL);
    cfg.websocket.upstream_pong_timeout = Dur(PONG_TIMEOUT);
    cfg.websocket.handshake_timeout = Dur(HANDSHAKE_TIMEOUT);
    cfg
}

async fn connect(url: &str) -> Ws {
    let (ws, resp) = tokio::time::timeout(Duration::from_secs(20), connect_async(url))
        .await
        .expect("handshake in time")
        .expect("handshake");
    assert_eq!(resp.status(), 101);
    ws
}

/// The next message that is not a ping or pong, within `within`.
async fn next_message(ws: &mut Ws, within: Duration) -> Option<Message> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return None,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(Some(Ok(m))) => return Some(m),
            Ok(other) => panic!("connection ended without a close frame: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_upstream_s_subscribers_are_closed_with_1012_after_the_pong_timeout() {
    let (socket, silence) = upstream(true).await;
    let other = FakeUpstream::ok().await;
    let gw = spawn(config(socket, &other)).await;
    let url = format!("ws://{}/ws", gw.addr);
    let mut subscribers = Vec::new();
    for _ in 0..5 {
        let mut ws = connect(&url).await;
        let first = next_message(&mut ws, MARGIN).await;
        assert!(matches!(first, Some(Message::Text(_))), "{first:?}");
        subscribers.push(ws);
    }
    // Ticking for longer than interval + timeout: a live upstream is never closed.
    tokio::time::sleep(PING_INTERVAL + PONG_TIMEOUT + Duration::from_millis(500)).await;
    silence.send(true).unwrap();
    let silent_since = Instant::now();
    for mut ws in subscribers {
        let close = loop {
            match next_message(&mut ws, PING_INTERVAL + PONG_TIMEOUT + MARGIN).await {
                // Ticks sent before the silence, still on their way.
                Some(Message::Text(_)) => continue,
                Some(Message::Close(frame)) => break frame.expect("a close code"),
                other => panic!("no close within the bound: {other:?}"),
            }
        };
        let at = silent_since.elapsed();
        assert_eq!(close.code, CloseCode::Restart, "{close:?}");
        assert_eq!(close.reason.as_str(), "upstream silent");
        // Not before the ping went unanswered (the last tick came up to 100 ms before the
        // silence), and within the bound.
        assert!(
            at >= PING_INTERVAL + PONG_TIMEOUT - Duration::from_millis(150),
            "closed after only {at:?}"
        );
        assert!(at <= PING_INTERVAL + PONG_TIMEOUT + MARGIN, "{at:?}");
    }
    // Counted by reason.
    let metrics = scrape(gw.admin_addr).await;
    let silent_closes: f64 = metrics
        .lines()
        .find(|l| {
            l.starts_with("gateway_websocket_closed_total{")
                && l.contains("reason=\"upstream_silent\"")
                && l.contains("route=\"/ws\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no upstream_silent closes counted:\n{metrics}"));
    assert!(silent_closes >= 5.0, "{silent_closes}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_to_a_silent_upstream_gets_503_within_the_handshake_timeout() {
    let (socket, silence) = upstream(true).await;
    silence.send(true).unwrap();
    let other = FakeUpstream::ok().await;
    let gw = spawn(config(socket, &other)).await;
    // The upstream's kernel accepts the connection; nothing answers the upgrade request.
    let started = Instant::now();
    let resp = client()
        .get(format!("http://{}/ws", gw.addr))
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["reason"], "upstream_timeout", "{body}");
    // The handshake timeout (1 s), not the route's 10 s deadline.
    assert!(
        took >= HANDSHAKE_TIMEOUT - Duration::from_millis(50),
        "{took:?}"
    );
    assert!(took <= HANDSHAKE_TIMEOUT + MARGIN, "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_upstream_that_answers_pings_keeps_its_subscribers() {
    // Sends nothing, but reads (and so answers the gateway's pings).
    let (socket, _silence) = upstream(false).await;
    let other = FakeUpstream::ok().await;
    let gw = spawn(config(socket, &other)).await;
    let mut ws = connect(&format!("ws://{}/ws", gw.addr)).await;
    // Four rounds of ping and pong; the client sees the upstream's pongs at most.
    let quiet = 4 * (PING_INTERVAL + PONG_TIMEOUT);
    assert_eq!(next_message(&mut ws, quiet).await, None);
    // Still relayed both ways: a message to the upstream, and a clean close answered.
    ws.send(Message::text("hello")).await.unwrap();
    ws.close(None).await.unwrap();
    let end = next_message(&mut ws, MARGIN).await;
    assert!(matches!(end, Some(Message::Close(_))), "{end:?}");
}
