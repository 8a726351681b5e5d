//! The socket service: live ticks over WebSocket from the seeded [`market`](super::market).
//!
//! ```text
//! GET /ws  (WebSocket; text messages, one JSON object each)
//!   -> {"action":"subscribe","products":["NIFTY","banknifty"]}
//!   <- {"type":"subscribed","products":["NIFTY","BANKNIFTY"]}
//!   <- {"type":"tick","product":"NIFTY","price":24012.35,"volume":1275,
//!       "ts":"2025-01-06T03:45:07Z","emitted_ms":1767225600123}   each product, every interval
//!   -> {"action":"unsubscribe","products":["NIFTY"]}
//!   <- {"type":"unsubscribed","products":["NIFTY"]}                no NIFTY tick after this
//!   -> anything else
//!   <- {"type":"error","error":"unknown action \"buy\": expected \"subscribe\" or \"unsubscribe\""}
//! ```
//!
//! Products match case-insensitively and acknowledgements carry the canonical symbols. An
//! unknown product, a `products` that is not a non-empty list of strings, an unknown action,
//! a text that is not JSON, a binary message or a text over [`MAX_COMMAND_BYTES`] gets an
//! `error` message and changes nothing; the connection stays open.
//!
//! One feed serves every connection. Each tick interval (250 ms by default) it takes the next
//! second of the storage service's session, for all products at once, renders each product's
//! tick once and broadcasts the batch; connections pick the products they subscribed to. So
//! `ts` is market time (the `timestamp` under which `GET /underlying/{product}` lists the same
//! price: the session replays from its opening tick, faster than real time, and wraps at the
//! close), while `emitted_ms` is the wall clock (Unix milliseconds) when the feed emitted the
//! batch: receive time minus `emitted_ms` is the delivery latency a load test wants.
//!
//! With `--faults`, `hang` and `latency_ms` + jitter hold back each batch of ticks as they hold
//! back requests, and `POST /_faults/drop` closes every open WebSocket without a close frame
//! (see [`super::faults`]). At shutdown every connection gets close code 1001.

use std::array;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::future::OptionFuture;
use futures_util::SinkExt;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, watch};
use tokio::time::MissedTickBehavior;

use super::faults::Faults;
use super::market::{Market, Tick, PRODUCTS};
use super::ApiError;

/// Four ticks per second per product: "live" to a person watching, light for a load test.
pub const DEFAULT_TICK_INTERVAL: Duration = Duration::from_millis(250);

/// Largest command accepted. Real commands are under 100 bytes; a longer text is answered
/// with an `error` message and the connection stays open.
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// Largest frame or message the WebSocket layer reads at all; beyond it the connection is
/// closed with 1009. It sits above [`MAX_COMMAND_BYTES`] because a message the codec refuses
/// cannot be skipped (its payload is left unread), so only messages it accepted can be
/// answered with an error and survived.
const TRANSPORT_LIMIT_BYTES: usize = 4 * MAX_COMMAND_BYTES;

/// Entries allowed in one command's `products`, so a command cannot make us walk a huge
/// list. Subscriptions themselves are a flag per listed product, bounded by construction.
const MAX_PRODUCTS_PER_COMMAND: usize = 16;

/// Initial read buffer per connection (tungstenite allocates 128 KiB by default): commands
/// are tiny and load tests hold thousands of connections open.
const READ_BUFFER_BYTES: usize = 4 * 1024;

/// Batches a subscriber may fall behind before it skips to the oldest one still kept: a slow
/// consumer loses ticks rather than growing our memory.
const FEED_BACKLOG: usize = 16;

/// A peer that cannot take a few hundred bytes in this long is gone; without a bound its
/// connection would also ignore drop faults and hold shutdown up forever.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// How long we wait for the peer to answer our close frame before dropping the connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// RFC 6455 close codes we send.
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_TOO_BIG: u16 = 1009;

/// The socket service's shared state; clones share it.
#[derive(Clone)]
pub struct SocketService {
    inner: Arc<Inner>,
}

struct Inner {
    market: Arc<Market>,
    /// Wall time between two batches; each batch is one market second.
    tick_interval: Duration,
    /// Present with `--faults`: batches wait on its `hang` and latency like requests do.
    faults: Option<Faults>,
    /// The feed's batches, rendered once and shared by every subscribed connection.
    batches: broadcast::Sender<Arc<Batch>>,
    /// The feed task is spawned by the first subscription, not at construction, so building
    /// a router needs no runtime and an unused one spawns nothing.
    feed_started: AtomicBool,
    /// Tells every open connection to drop (fault) or to say goodbye (shutdown).
    control: watch::Sender<Control>,
    /// Open connections, so shutdown can wait until each has sent its close frame.
    open: watch::Sender<usize>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Control {
    /// Bumped by `POST /_faults/drop`; a connection that sees it change drops its socket.
    drops: u64,
    /// Set once at shutdown: every connection sends close 1001 and ends.
    going_away: bool,
}

/// One market second for every product, each already rendered as its text message.
struct Batch {
    /// Same order as [`PRODUCTS`].
    ticks: [Utf8Bytes; PRODUCTS.len()],
}

impl SocketService {
    /// A zero `tick_interval` is raised to 1 ms: tokio's interval cannot tick every 0 ms.
    pub fn new(market: Arc<Market>, tick_interval: Duration, faults: Option<Faults>) -> Self {
        SocketService {
            inner: Arc::new(Inner {
                market,
                tick_interval: tick_interval.max(Duration::from_millis(1)),
                faults,
                batches: broadcast::Sender::new(FEED_BACKLOG),
                feed_started: AtomicBool::new(false),
                control: watch::Sender::new(Control::default()),
                open: watch::Sender::new(0),
            }),
        }
    }

    /// `GET /ws`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/ws", get(upgrade))
            .with_state(self.inner.clone())
    }

    /// `POST /_faults/drop`, mounted next to `/_faults` when faults are enabled.
    pub fn fault_routes(&self) -> Router {
        Router::new()
            .route("/_faults/drop", post(drop_connections))
            .with_state(self.inner.clone())
    }

    /// Asks every open connection (and any that opens later) to close with 1001.
    pub fn go_away(&self) {
        self.inner
            .control
            .send_modify(|control| control.going_away = true);
    }

    /// Completes when no connection is open; after [`Self::go_away`], once each has closed.
    pub async fn closed(&self) {
        // Only errs if the sender is gone, which cannot happen while `self` holds it.
        let _ = self
            .inner
            .open
            .subscribe()
            .wait_for(|open| *open == 0)
            .await;
    }

    /// Open WebSocket connections right now.
    pub fn open_connections(&self) -> usize {
        *self.inner.open.borrow()
    }
}

impl Inner {
    /// Joins the feed, starting it on first use.
    fn join_feed(self: &Arc<Inner>) -> broadcast::Receiver<Arc<Batch>> {
        // Subscribed before the feed starts, so its first batch (sent at once) has a reader.
        let receiver = self.batches.subscribe();
        if !self.feed_started.swap(true, Ordering::AcqRel) {
            tokio::spawn(run_feed(Arc::downgrade(self), self.tick_interval));
        }
        receiver
    }

    /// The batch for the feed's `step`-th interval.
    fn render(&self, step: u64) -> Batch {
        let emitted_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_millis());
        Batch {
            ticks: array::from_fn(|index| {
                let spec = &PRODUCTS[index];
                let session = self.market.ticks(spec);
                let tick = usize::try_from(step)
                    .ok()
                    .and_then(|step| step.checked_rem(session.len()))
                    .and_then(|second| session.get(second))
                    .copied()
                    .unwrap_or(Tick {
                        price: self.market.spot(spec),
                        volume: 0,
                        timestamp: super::market::REFERENCE_TIME,
                    });
                Outgoing::Tick {
                    product: spec.symbol,
                    price: tick.price,
                    volume: tick.volume,
                    ts: tick.timestamp_rfc3339(),
                    emitted_ms,
                }
                .render()
            }),
        }
    }
}

/// Emits one batch per interval until the service is gone. Market time advances whether or
/// not anyone listens, like a real market; rendering is skipped when nobody does.
async fn run_feed(service: Weak<Inner>, period: Duration) {
    let mut interval = tokio::time::interval(period);
    // After a stall the feed keeps its pace instead of bursting out the batches it missed.
    interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut step: u64 = 0;
    loop {
        interval.tick().await;
        let Some(inner) = service.upgrade() else {
            return;
        };
        if inner.batches.receiver_count() > 0 {
            // Errs only when the last receiver left since the check; that batch has no reader.
            let _ = inner.batches.send(Arc::new(inner.render(step)));
        }
        step = step.wrapping_add(1);
    }
}

async fn upgrade(
    State(inner): State<Arc<Inner>>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    // axum's own rejections are plain text; every error of these services is JSON.
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => {
            return ApiError::new(rejection.status(), rejection.body_text()).into_response()
        }
    };
    upgrade
        .read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(TRANSPORT_LIMIT_BYTES)
        .max_frame_size(TRANSPORT_LIMIT_BYTES)
        .on_upgrade(move |socket| serve_connection(inner, socket))
}

async fn drop_connections(State(inner): State<Arc<Inner>>) -> Json<Value> {
    let dropped = *inner.open.borrow();
    tracing::warn!(
        dropped,
        "fault injection: dropping every WebSocket connection"
    );
    inner.control.send_modify(|control| control.drops += 1);
    Json(json!({ "dropped": dropped }))
}

/// Counts a connection as open for as long as it lives.
struct OpenConnection(Arc<Inner>);

impl OpenConnection {
    fn new(inner: Arc<Inner>) -> OpenConnection {
        inner.open.send_modify(|open| *open += 1);
        OpenConnection(inner)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0
            .open
            .send_modify(|open| *open = open.saturating_sub(1));
    }
}

/// A batch waiting out the fault latency before it is sent.
type DelayedBatch = Pin<Box<dyn Future<Output = Arc<Batch>> + Send>>;

/// One client, from upgrade to close. Returning drops the socket; where no close frame was
/// sent first, that is the abrupt TCP close the drop fault wants.
async fn serve_connection(inner: Arc<Inner>, mut ws: WebSocket) {
    let _open = OpenConnection::new(inner.clone());
    let mut control = inner.control.subscribe();
    let drops_at_start = control.borrow_and_update().drops;
    if control.borrow().going_away {
        close(&mut ws, CLOSE_GOING_AWAY, "server shutting down").await;
        return;
    }

    let mut subscribed = [false; PRODUCTS.len()];
    // Joined only while something is subscribed, so idle connections are never woken.
    let mut feed: Option<broadcast::Receiver<Arc<Batch>>> = None;
    // At most one batch is held back by a fault at a time; the feed's backlog queues the rest.
    let mut delayed: Option<DelayedBatch> = None;

    loop {
        tokio::select! {
            changed = control.changed() => {
                // The sender lives in `inner`, which we hold, so this cannot fail; were it to,
                // ending beats spinning on an error that returns at once.
                if changed.is_err() {
                    return;
                }
                let now = *control.borrow_and_update();
                if now.drops != drops_at_start {
                    tracing::debug!("WebSocket dropped by fault injection");
                    return;
                }
                if now.going_away {
                    close(&mut ws, CLOSE_GOING_AWAY, "server shutting down").await;
                    return;
                }
            }
            incoming = ws.recv() => {
                let reply = match incoming {
                    // The peer closed (after our automatic close reply) or vanished.
                    None => return,
                    Some(Err(err)) => {
                        read_failed(&mut ws, err).await;
                        return;
                    }
                    Some(Ok(Message::Text(text))) => {
                        let reply = apply_command(&mut subscribed, text.as_str());
                        if !subscribed.contains(&true) {
                            feed = None;
                            delayed = None;
                        } else if feed.is_none() {
                            feed = Some(inner.join_feed());
                        }
                        reply
                    }
                    Some(Ok(Message::Binary(_))) => error_message(
                        "binary messages are not supported: send JSON text such as \
                         {\"action\":\"subscribe\",\"products\":[\"NIFTY\"]}",
                    ),
                    // tungstenite answers pings itself.
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    // tungstenite has queued its reply to the peer's close frame, but writes it
                    // only on the next read or flush. Sending a tick now would fail
                    // (`SendAfterClosing`) and end the connection with the reply unsent, so
                    // deliver nothing more: flush the reply and end.
                    Some(Ok(Message::Close(_))) => {
                        let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.flush()).await;
                        return;
                    }
                };
                if send(&mut ws, vec![Message::Text(reply)]).await.is_err() {
                    return;
                }
            }
            batch = next_batch(&mut feed), if feed.is_some() && delayed.is_none() => {
                match &inner.faults {
                    Some(faults) => {
                        let faults = faults.clone();
                        delayed = Some(Box::pin(async move {
                            faults.delay().await;
                            batch
                        }));
                    }
                    None => {
                        if deliver(&mut ws, &subscribed, &batch).await.is_err() {
                            return;
                        }
                    }
                }
            }
            Some(batch) = OptionFuture::from(delayed.as_mut()), if delayed.is_some() => {
                delayed = None;
                if deliver(&mut ws, &subscribed, &batch).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The next batch, skipping whatever a slow subscriber missed. Never returns while the
/// feed's sender exists, which is as long as the connection holds the service.
async fn next_batch(feed: &mut Option<broadcast::Receiver<Arc<Batch>>>) -> Arc<Batch> {
    let Some(feed) = feed.as_mut() else {
        return std::future::pending().await;
    };
    loop {
        match feed.recv().await {
            Ok(batch) => return batch,
            Err(RecvError::Lagged(skipped)) => {
                tracing::debug!(skipped, "slow WebSocket subscriber skipped tick batches");
            }
            Err(RecvError::Closed) => return std::future::pending().await,
        }
    }
}

/// Sends the batch's ticks for the subscribed products; subscriptions are read now, not when
/// the batch arrived, so nothing follows an `unsubscribed` acknowledgement.
async fn deliver(
    ws: &mut WebSocket,
    subscribed: &[bool; PRODUCTS.len()],
    batch: &Batch,
) -> Result<(), SendFailed> {
    // Collected before any await: an iterator of borrowing closures held across one trips
    // the compiler's `Send` check for the spawned connection task.
    let mut ticks = Vec::with_capacity(PRODUCTS.len());
    for (on, tick) in subscribed.iter().zip(&batch.ticks) {
        if *on {
            ticks.push(Message::Text(tick.clone()));
        }
    }
    send(ws, ticks).await
}

/// The peer is gone, or sent something the codec refused.
#[derive(Debug)]
struct SendFailed;

/// Queues every message and flushes once, within [`SEND_TIMEOUT`].
async fn send(ws: &mut WebSocket, messages: Vec<Message>) -> Result<(), SendFailed> {
    let sending = async {
        for message in messages {
            ws.feed(message).await?;
        }
        ws.flush().await
    };
    match tokio::time::timeout(SEND_TIMEOUT, sending).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) | Err(_) => Err(SendFailed),
    }
}

/// Sends a close frame and waits (bounded) for the peer's, so the close handshake completes.
async fn close(ws: &mut WebSocket, code: u16, reason: &'static str) {
    let handshake = async {
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        };
        if ws.send(Message::Close(Some(frame))).await.is_err() {
            return;
        }
        while let Some(Ok(_)) = ws.recv().await {}
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, handshake).await;
}

/// A read error ends the connection; an oversized message is told so (1009) first.
async fn read_failed(ws: &mut WebSocket, err: axum::Error) {
    let too_big = err
        .into_inner()
        .downcast::<tungstenite::Error>()
        .is_ok_and(|err| matches!(*err, tungstenite::Error::Capacity(_)));
    if too_big {
        let frame = CloseFrame {
            code: CLOSE_TOO_BIG,
            reason: Utf8Bytes::from_static("message too big"),
        };
        if tokio::time::timeout(CLOSE_TIMEOUT, ws.send(Message::Close(Some(frame))))
            .await
            .is_ok_and(|sent| sent.is_ok())
        {
            // The codec stopped mid-message, so nothing more can be read. Closing now, with
            // the rest of the message unread, makes the kernel send a reset that can destroy
            // the close frame before the peer reads it: give the peer time to read it first.
            tokio::time::sleep(CLOSE_TIMEOUT).await;
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Subscribe,
    Unsubscribe,
}

/// A valid command: the action and the products it names, as indexes into [`PRODUCTS`].
#[derive(Debug, PartialEq, Eq)]
struct Command {
    action: Action,
    products: Vec<usize>,
}

/// Applies one text message to the subscriptions and returns the reply to send.
fn apply_command(subscribed: &mut [bool; PRODUCTS.len()], text: &str) -> Utf8Bytes {
    match parse_command(text) {
        Ok(command) => {
            let on = command.action == Action::Subscribe;
            for &index in &command.products {
                subscribed[index] = on;
            }
            let products = command
                .products
                .iter()
                .map(|&index| PRODUCTS[index].symbol)
                .collect();
            if on {
                Outgoing::Subscribed { products }.render()
            } else {
                Outgoing::Unsubscribed { products }.render()
            }
        }
        Err(message) => error_message(&message),
    }
}

fn error_message(message: &str) -> Utf8Bytes {
    Outgoing::Error { error: message }.render()
}

/// Every message we send, `type` first: a struct rather than `json!` so the field order on
/// the wire is the documented one.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Outgoing<'a> {
    Tick {
        product: &'static str,
        price: f64,
        volume: u64,
        ts: String,
        emitted_ms: u128,
    },
    Subscribed {
        products: Vec<&'static str>,
    },
    Unsubscribed {
        products: Vec<&'static str>,
    },
    Error {
        error: &'a str,
    },
}

impl Outgoing<'_> {
    fn render(&self) -> Utf8Bytes {
        // Serialising these plain fields cannot fail; the fallback keeps the reply JSON anyway.
        Utf8Bytes::from(
            serde_json::to_string(self)
                .unwrap_or_else(|_| r#"{"type":"error","error":"internal error"}"#.to_owned()),
        )
    }
}

/// Validates a command completely before anything changes: a command naming one unknown
/// product subscribes to nothing.
fn parse_command(text: &str) -> Result<Command, String> {
    const EXAMPLE: &str = r#"{"action":"subscribe","products":["NIFTY"]}"#;
    if text.len() > MAX_COMMAND_BYTES {
        return Err(format!(
            "message too large: {} bytes, the limit is {MAX_COMMAND_BYTES}",
            text.len()
        ));
    }
    let value: Value = serde_json::from_str(text)
        .map_err(|err| format!("message is not valid JSON ({err}): expected {EXAMPLE}"))?;
    let Value::Object(object) = value else {
        return Err(format!("expected a JSON object such as {EXAMPLE}"));
    };
    let action = match object.get("action") {
        Some(Value::String(action)) if action == "subscribe" => Action::Subscribe,
        Some(Value::String(action)) if action == "unsubscribe" => Action::Unsubscribe,
        Some(Value::String(action)) => {
            return Err(format!(
                "unknown action {}: expected \"subscribe\" or \"unsubscribe\"",
                quoted(action)
            ))
        }
        Some(_) => return Err("action must be the string \"subscribe\" or \"unsubscribe\"".into()),
        None => return Err(format!("missing \"action\": expected {EXAMPLE}")),
    };
    let list = match object.get("products") {
        Some(Value::Array(list)) => list,
        _ => {
            return Err(format!(
                "products must be a list of product symbols, e.g. [\"NIFTY\"] in {EXAMPLE}"
            ))
        }
    };
    if list.is_empty() {
        return Err("products must name at least one product".into());
    }
    if list.len() > MAX_PRODUCTS_PER_COMMAND {
        return Err(format!(
            "products lists {} entries, at most {MAX_PRODUCTS_PER_COMMAND} are allowed",
            list.len()
        ));
    }
    let mut products = Vec::with_capacity(list.len());
    for entry in list {
        let Value::String(symbol) = entry else {
            return Err(format!(
                "products must be a list of strings, got {}",
                quoted(&entry.to_string())
            ));
        };
        let Some(index) = PRODUCTS
            .iter()
            .position(|spec| spec.symbol.eq_ignore_ascii_case(symbol))
        else {
            return Err(format!(
                "unknown product {}: expected one of {}",
                quoted(symbol),
                known_symbols()
            ));
        };
        if !products.contains(&index) {
            products.push(index);
        }
    }
    Ok(Command { action, products })
}

/// Echoes client text in an error, cut short so a 64 KiB string is not sent back whole.
fn quoted(text: &str) -> String {
    const SHOWN_CHARS: usize = 40;
    match text.char_indices().nth(SHOWN_CHARS) {
        Some((cut, _)) => format!("{:?}...", &text[..cut]),
        None => format!("{text:?}"),
    }
}

fn known_symbols() -> String {
    PRODUCTS
        .iter()
        .map(|spec| spec.symbol)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> String {
        parse_command(text).expect_err(text)
    }

    #[test]
    fn commands_name_products_case_insensitively_once_each() {
        let command = parse_command(
            r#"{"action":"subscribe","products":["nifty","BANKNIFTY","Nifty"],"id":7}"#,
        );
        assert_eq!(
            command,
            Ok(Command {
                action: Action::Subscribe,
                products: vec![0, 1],
            })
        );
        let mut subscribed = [false; PRODUCTS.len()];
        let reply = apply_command(
            &mut subscribed,
            r#"{"action":"subscribe","products":["finnifty"]}"#,
        );
        assert_eq!(
            reply.as_str(),
            r#"{"type":"subscribed","products":["FINNIFTY"]}"#
        );
        assert_eq!(subscribed, [false, false, true]);
        apply_command(
            &mut subscribed,
            r#"{"action":"unsubscribe","products":["FINNIFTY"]}"#,
        );
        assert_eq!(subscribed, [false; 3]);
    }

    #[test]
    fn bad_commands_say_what_is_wrong_and_change_nothing() {
        assert!(error_of("hello").contains("not valid JSON"));
        assert!(error_of("[1]").contains("JSON object"));
        assert!(error_of(r#"{"products":["NIFTY"]}"#).contains("missing \"action\""));
        assert!(
            error_of(r#"{"action":"buy","products":["NIFTY"]}"#).contains("unknown action \"buy\"")
        );
        assert!(error_of(r#"{"action":1,"products":["NIFTY"]}"#).contains("action must be"));
        assert!(error_of(r#"{"action":"subscribe","products":"NIFTY"}"#)
            .contains("list of product symbols"));
        assert!(error_of(r#"{"action":"subscribe","products":[]}"#).contains("at least one"));
        assert!(error_of(r#"{"action":"subscribe","products":[1]}"#).contains("list of strings"));
        assert!(
            error_of(r#"{"action":"subscribe","products":["NIFTY","AAPL"]}"#)
                .contains("unknown product \"AAPL\": expected one of NIFTY, BANKNIFTY, FINNIFTY")
        );
        let many = format!(
            r#"{{"action":"subscribe","products":[{}]}}"#,
            vec!["\"NIFTY\""; 17].join(",")
        );
        assert!(error_of(&many).contains("at most 16"));
        let huge = format!(r#"{{"action":"{}"}}"#, "x".repeat(MAX_COMMAND_BYTES));
        assert!(error_of(&huge).contains("message too large"));

        let mut subscribed = [false; PRODUCTS.len()];
        let reply = apply_command(
            &mut subscribed,
            r#"{"action":"subscribe","products":["NIFTY","AAPL"]}"#,
        );
        assert!(reply
            .as_str()
            .starts_with(r#"{"type":"error","error":"unknown product"#));
        assert_eq!(
            subscribed, [false; 3],
            "a rejected command subscribes to nothing"
        );
    }

    #[test]
    fn echoed_client_text_is_cut_short() {
        let long = "é".repeat(1000);
        let shown = quoted(&long);
        assert!(shown.len() < 100, "{shown}");
        assert!(shown.ends_with("..."));
    }

    /// The feed's pace, on tokio's paused clock: one batch at once, then one per interval,
    /// each the next second of the storage session.
    #[tokio::test(start_paused = true)]
    async fn feed_emits_one_market_second_per_interval() {
        let market = Arc::new(Market::new(42));
        let service = SocketService::new(market.clone(), Duration::from_millis(250), None);
        let mut feed = service.inner.join_feed();
        let started = tokio::time::Instant::now();
        let session = market.ticks(&PRODUCTS[0]);
        for (second, expected) in session.iter().take(8).enumerate() {
            let batch = feed.recv().await.expect("a batch");
            assert_eq!(
                started.elapsed(),
                Duration::from_millis(250) * second as u32
            );
            let tick: Value = serde_json::from_str(batch.ticks[0].as_str()).expect("JSON");
            assert_eq!(tick["price"], json!(expected.price));
            assert_eq!(tick["volume"], json!(expected.volume));
            assert_eq!(tick["ts"], json!(expected.timestamp_rfc3339()));
        }
    }
}
