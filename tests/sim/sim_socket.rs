//! The socket service over real WebSockets: each test serves it on `127.0.0.1:0` in-process
//! and talks to it with tokio-tungstenite. Timing is only ever asserted as a lower bound or
//! with generous upper bounds (the feed's exact pace is a paused-clock unit test in
//! src/sim/socket.rs): these run on a busy 2-core machine.

use crate::support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use deltastream_gateway::sim::market::{find_product, Market};
use deltastream_gateway::sim::{Service, SimOptions};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::sim::SimServer;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Long enough for anything that should happen on a loaded machine; reaching it is a failure.
const PATIENCE: Duration = Duration::from_secs(20);

/// The socket service on an ephemeral port; dropping it (or `stop`) shuts the server down.
async fn start(opts: SimOptions) -> SimServer {
    SimServer::start(Service::Socket, opts).await
}

fn ws_url(service: &SimServer) -> String {
    format!("ws://{}/ws", service.addr)
}

/// A WebSocket client of `service`, handshake done.
async fn connect(service: &SimServer) -> Client {
    let (client, response) = tokio::time::timeout(PATIENCE, connect_async(ws_url(service)))
        .await
        .expect("handshake in time")
        .expect("handshake");
    assert_eq!(response.status(), 101);
    client
}

fn options(tick_interval: Duration) -> SimOptions {
    SimOptions {
        faults: false,
        seed: 42,
        jwt_secret: None,
        tick_interval,
    }
}

fn with_faults(tick_interval: Duration) -> SimOptions {
    SimOptions {
        faults: true,
        ..options(tick_interval)
    }
}

async fn send_json(client: &mut Client, message: Value) {
    send_text(client, &message.to_string()).await;
}

async fn send_text(client: &mut Client, text: &str) {
    client
        .send(Message::text(text))
        .await
        .expect("send a message");
}

/// The next data message, parsed; control frames are skipped.
async fn next_json(client: &mut Client) -> Value {
    loop {
        let message = tokio::time::timeout(PATIENCE, client.next())
            .await
            .expect("a message in time")
            .expect("connection still open")
            .expect("a readable message");
        match message {
            Message::Text(text) => return serde_json::from_str(text.as_str()).expect("JSON"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

/// The next message that is not a tick (acknowledgements and errors arrive among ticks).
async fn next_reply(client: &mut Client) -> Value {
    loop {
        let message = next_json(client).await;
        if message["type"] != "tick" {
            return message;
        }
    }
}

/// Asserts that nothing but ticks for `allowed` arrives for `window`.
async fn only_ticks_for(client: &mut Client, allowed: &[&str], window: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + window;
    let mut seen = 0;
    while let Ok(message) = tokio::time::timeout_at(deadline, next_json(client)).await {
        assert_eq!(message["type"], "tick", "{message}");
        let product = message["product"].as_str().unwrap_or_default();
        assert!(allowed.contains(&product), "unexpected tick {message}");
        seen += 1;
    }
    seen
}

fn wall_clock_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis())
}

#[tokio::test]
async fn subscribers_get_ticks_of_their_product_from_the_storage_market() {
    let service = start(options(Duration::from_millis(50))).await;
    let mut client = connect(&service).await;
    send_json(
        &mut client,
        json!({"action": "subscribe", "products": ["nifty"]}),
    )
    .await;
    assert_eq!(
        next_json(&mut client).await,
        json!({"type": "subscribed", "products": ["NIFTY"]})
    );

    let market = Market::new(42);
    let session = market.ticks(find_product("NIFTY").expect("listed"));
    let mut last_ts = String::new();
    for _ in 0..8 {
        let tick = next_json(&mut client).await;
        let fields: BTreeSet<&str> = tick
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            fields,
            BTreeSet::from(["type", "product", "price", "volume", "ts", "emitted_ms"]),
            "{tick}"
        );
        assert_eq!(tick["type"], "tick");
        assert_eq!(tick["product"], "NIFTY");
        let ts = tick["ts"].as_str().expect("ts is a string");
        // The same price and volume the storage service has at that instant of its session.
        let expected = session
            .iter()
            .find(|t| t.timestamp_rfc3339() == ts)
            .unwrap_or_else(|| panic!("{ts} is not a second of the storage session"));
        assert_eq!(tick["price"], json!(expected.price), "{tick}");
        assert_eq!(tick["volume"], json!(expected.volume), "{tick}");
        // Market time moves forward (a skipped batch on a slow machine is allowed).
        assert!(ts > last_ts.as_str(), "{ts} after {last_ts}");
        last_ts = ts.to_owned();
        let emitted = tick["emitted_ms"].as_u64().expect("emitted_ms") as u128;
        assert!(emitted <= wall_clock_ms());
    }
}

#[tokio::test]
async fn unsubscribe_stops_that_products_ticks() {
    let service = start(options(Duration::from_millis(50))).await;
    let mut client = connect(&service).await;
    send_json(
        &mut client,
        json!({"action": "subscribe", "products": ["NIFTY", "BANKNIFTY"]}),
    )
    .await;
    assert_eq!(next_reply(&mut client).await["type"], "subscribed");
    let mut products = BTreeSet::new();
    while products.len() < 2 {
        let tick = next_json(&mut client).await;
        products.insert(tick["product"].as_str().unwrap_or_default().to_owned());
    }

    send_json(
        &mut client,
        json!({"action": "unsubscribe", "products": ["NIFTY"]}),
    )
    .await;
    assert_eq!(
        next_reply(&mut client).await,
        json!({"type": "unsubscribed", "products": ["NIFTY"]})
    );
    // Ordering, not timing: nothing for NIFTY may follow the acknowledgement.
    let seen = only_ticks_for(&mut client, &["BANKNIFTY"], Duration::from_millis(1500)).await;
    assert!(seen > 0, "BANKNIFTY ticks keep coming");

    send_json(
        &mut client,
        json!({"action": "unsubscribe", "products": ["BANKNIFTY"]}),
    )
    .await;
    assert_eq!(next_reply(&mut client).await["type"], "unsubscribed");
    assert_eq!(
        only_ticks_for(&mut client, &[], Duration::from_millis(500)).await,
        0
    );
}

#[tokio::test]
async fn bad_messages_get_an_error_and_the_connection_keeps_working() {
    let service = start(options(Duration::from_millis(50))).await;
    let mut client = connect(&service).await;
    let huge = format!(
        r#"{{"action":"subscribe","products":["{}"]}}"#,
        "N".repeat(70 * 1024)
    );
    let cases: [(&str, &str); 7] = [
        ("not json", "not valid JSON"),
        (r#"{"action":"buy","products":["NIFTY"]}"#, "unknown action"),
        (
            r#"{"action":"subscribe","products":["AAPL"]}"#,
            "unknown product \"AAPL\"",
        ),
        (
            r#"{"action":"subscribe","products":"NIFTY"}"#,
            "list of product symbols",
        ),
        (
            r#"{"action":"subscribe","products":[42]}"#,
            "list of strings",
        ),
        (r#"{"action":"subscribe"}"#, "list of product symbols"),
        (&huge, "message too large"),
    ];
    for (sent, expected) in cases {
        send_text(&mut client, sent).await;
        let reply = next_json(&mut client).await;
        assert_eq!(reply["type"], "error", "{reply}");
        let error = reply["error"].as_str().expect("error text");
        assert!(error.contains(expected), "{expected:?} not in {error:?}");
        assert!(error.len() < 300, "the reply does not echo a huge input");
    }
    client
        .send(Message::binary(vec![1, 2, 3]))
        .await
        .expect("send binary");
    assert_eq!(next_json(&mut client).await["type"], "error");

    // Still open, still subscribable, and pings are answered.
    client
        .send(Message::Ping(b"still there?".to_vec().into()))
        .await
        .expect("ping");
    let pong = tokio::time::timeout(PATIENCE, client.next())
        .await
        .expect("pong in time")
        .expect("open")
        .expect("readable");
    assert_eq!(pong, Message::Pong(b"still there?".to_vec().into()));
    send_json(
        &mut client,
        json!({"action": "subscribe", "products": ["FINNIFTY"]}),
    )
    .await;
    assert_eq!(next_json(&mut client).await["type"], "subscribed");
    assert_eq!(next_json(&mut client).await["product"], "FINNIFTY");

    // Beyond what the WebSocket layer reads at all: closed with 1009 (Message Too Big).
    send_text(&mut client, &"x".repeat(512 * 1024)).await;
    let close = loop {
        match tokio::time::timeout(PATIENCE, client.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => break frame,
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(close.map(|frame| frame.code), Some(CloseCode::Size));
}

#[tokio::test]
async fn client_close_is_answered_cleanly() {
    let service = start(options(Duration::from_millis(50))).await;
    let mut client = connect(&service).await;
    send_json(
        &mut client,
        json!({"action": "subscribe", "products": ["NIFTY"]}),
    )
    .await;
    next_json(&mut client).await;
    client.close(None).await.expect("send close");
    // The server echoes the close frame; the stream then ends without an error.
    loop {
        match tokio::time::timeout(PATIENCE, client.next())
            .await
            .expect("closed in time")
        {
            Some(Ok(Message::Close(_))) | None => break,
            Some(Ok(_)) => continue,
            Some(Err(err)) => panic!("unclean close: {err}"),
        }
    }
}

#[tokio::test]
async fn drop_fault_closes_every_connection_without_a_close_frame() {
    let service = start(with_faults(Duration::from_millis(50))).await;
    let mut clients = Vec::new();
    for _ in 0..2 {
        let mut client = connect(&service).await;
        send_json(
            &mut client,
            json!({"action": "subscribe", "products": ["NIFTY"]}),
        )
        .await;
        assert_eq!(next_json(&mut client).await["type"], "subscribed");
        clients.push(client);
    }

    let http = reqwest::Client::new();
    let answer: Value = http
        .post(service.url("/_faults/drop"))
        .send()
        .await
        .expect("drop")
        .json()
        .await
        .expect("JSON");
    assert_eq!(answer, json!({"dropped": 2}));

    for mut client in clients {
        // Ticks already in flight may still arrive; then the TCP connection ends with no
        // close frame, which tungstenite reports as a reset without closing handshake.
        let ending = loop {
            match tokio::time::timeout(PATIENCE, client.next())
                .await
                .expect("dropped in time")
            {
                Some(Ok(Message::Text(_))) => continue,
                other => break other,
            }
        };
        match ending {
            // An RST instead of a FIN (data still unread on the server side) is as abrupt.
            Some(Err(
                WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) | WsError::Io(_),
            )) => {}
            other => panic!("expected an abrupt close, got {other:?}"),
        }
    }

    // The service itself is fine: new connections work.
    let mut client = connect(&service).await;
    send_json(
        &mut client,
        json!({"action": "subscribe", "products": ["NIFTY"]}),
    )
    .await;
    assert_eq!(next_json(&mut client).await["type"], "subscribed");
    assert_eq!(next_json(&mut client).await["type"], "tick");
}

#[tokio::test]
async fn latency_and_hang_faults_hold_back_handshake_and_ticks() {
    let service = start(with_faults(Duration::from_millis(50))).await;
    let http = reqwest::Client::new();
    let set = |body: Value| {
        let request = http.post(service.url("/_faults")).json(&body).send();
        async move {
            let response = request.await.expect("set faults");
            assert_eq!(response.status(), 200);
        }
    };

    set(json!({"latency_ms": 300})).await;
    let started = Instant::now();
    let mut client = connect(&service).await;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "handshake delayed"
    );
    send_json(
        &mut client,
        json!({"action": "subscribe", "products": ["NIFTY"]}),
    )
    .await;
    assert_eq!(next_json(&mut client).await["type"], "subscribed");
    for _ in 0..2 {
        let tick = next_json(&mut client).await;
        let emitted = tick["emitted_ms"].as_u64().expect("emitted_ms") as u128;
        let late = wall_clock_ms().saturating_sub(emitted);
        assert!(late >= 299, "tick delivered {late} ms after it was emitted");
    }

    set(json!({"hang": true})).await;
    // A batch already waiting out its latency may still arrive; then nothing.
    let _ = only_ticks_for(&mut client, &["NIFTY"], Duration::from_millis(500)).await;
    assert_eq!(
        only_ticks_for(&mut client, &[], Duration::from_millis(500)).await,
        0,
        "no ticks while hung"
    );
    set(json!({})).await;
    assert_eq!(next_json(&mut client).await["type"], "tick");
}

#[tokio::test]
async fn shutdown_closes_sockets_with_going_away() {
    let service = start(options(Duration::from_millis(50))).await;
    let mut client = connect(&service).await;
    send_json(
        &mut client,
        json!({"action": "subscribe", "products": ["NIFTY"]}),
    )
    .await;
    next_json(&mut client).await;

    let SimServer { stop, server, .. } = service;
    let _ = stop.send(());
    let close = loop {
        match tokio::time::timeout(PATIENCE, client.next())
            .await
            .expect("closed in time")
        {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(close.map(|frame| frame.code), Some(CloseCode::Away));
    // Our side of the close handshake (tungstenite replies on the next read).
    let _ = tokio::time::timeout(PATIENCE, client.next()).await;
    let result = tokio::time::timeout(PATIENCE, server)
        .await
        .expect("serve returns once the socket closed")
        .expect("task");
    assert!(result.is_ok());
}

#[tokio::test]
async fn a_plain_get_of_ws_is_a_json_error() {
    let service = start(options(Duration::from_millis(50))).await;
    let response = reqwest::get(service.url("/ws")).await.expect("request");
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.expect("JSON body");
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_subscribers_all_get_ticks() {
    const SUBSCRIBERS: usize = 200;
    let service = start(options(Duration::from_millis(100))).await;
    let products = ["NIFTY", "BANKNIFTY", "FINNIFTY"];
    let mut tasks = Vec::new();
    for index in 0..SUBSCRIBERS {
        let url = ws_url(&service);
        let product = products[index % products.len()];
        tasks.push(tokio::spawn(async move {
            let (mut client, _) = connect_async(url).await.expect("handshake");
            send_json(
                &mut client,
                json!({"action": "subscribe", "products": [product]}),
            )
            .await;
            assert_eq!(next_json(&mut client).await["type"], "subscribed");
            for _ in 0..3 {
                let tick = next_json(&mut client).await;
                assert_eq!(tick["product"], product, "{tick}");
            }
            client.close(None).await.expect("close");
        }));
    }
    let all = futures_util::future::join_all(tasks);
    let results = tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("every subscriber got its ticks in time");
    let failed = results.iter().filter(|result| result.is_err()).count();
    assert_eq!(failed, 0, "{failed} of {SUBSCRIBERS} subscribers failed");
}

/// A client that closes while ticks are flowing gets the close reply. tungstenite queues the
/// reply when it reads the close frame and writes it on the next read or flush; the service
/// used to try the next tick batch first, which fails after a close (`SendAfterClosing`), and
/// dropped the connection with the reply unsent: the client saw a reset or a bare EOF instead
/// of a close handshake. A fast feed to many subscribers makes a batch pending at the moment
/// a close arrives the common case, not a rare one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_closing_during_tick_bursts_all_get_the_close_reply() {
    const SUBSCRIBERS: usize = 200;
    let service = start(options(Duration::from_millis(2))).await;
    let mut tasks = Vec::new();
    for _ in 0..SUBSCRIBERS {
        let url = ws_url(&service);
        tasks.push(tokio::spawn(async move {
            let (mut client, _) = connect_async(url).await.expect("handshake");
            send_json(
                &mut client,
                json!({"action": "subscribe", "products": ["NIFTY", "BANKNIFTY", "FINNIFTY"]}),
            )
            .await;
            assert_eq!(next_json(&mut client).await["type"], "subscribed");
            for _ in 0..6 {
                assert_eq!(next_json(&mut client).await["type"], "tick");
            }
            client.close(None).await.expect("send close");
            // Ticks already in flight may still arrive; then the reply, then the end.
            loop {
                match client.next().await {
                    Some(Ok(Message::Close(_))) => return Ok(()),
                    Some(Ok(_)) => continue,
                    Some(Err(err)) => return Err(format!("no close reply: {err}")),
                    None => return Err("no close reply: the stream ended".to_owned()),
                }
            }
        }));
    }
    let all = futures_util::future::join_all(tasks);
    let results = tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("every subscriber closed in time");
    let unanswered: Vec<String> = results
        .into_iter()
        .filter_map(|result| match result {
            Ok(Ok(())) => None,
            Ok(Err(err)) => Some(err),
            Err(panic) => Some(format!("subscriber failed: {panic}")),
        })
        .collect();
    assert!(
        unanswered.is_empty(),
        "{} of {SUBSCRIBERS} subscribers got no close reply, e.g. {:?}",
        unanswered.len(),
        unanswered.first()
    );
}
