//! One client connection, from the first byte to the close.
//!
//! Why not hyper-util's `auto` builder: it waits for the first bytes (to tell HTTP/1 from the
//! HTTP/2 preface) with no deadline, so a client that connects and says nothing holds a
//! connection slot forever; and it does not expose hyper's exact `max_header_size`, leaving
//! only `max_buf_size`, which a single large read on a reused connection overshoots (a 100 KB
//! header was accepted on keep-alive). Here the protocol is sniffed with `peek` under the
//! header-read deadline, and each protocol gets the head-size limit it understands.
//!
//! Every connection is closed when idle (no bytes either way) for `idle_timeout`, and, while
//! the accept loop is at `max_connections` with a client waiting, as soon as it has been idle
//! for [`SHED_AFTER_IDLE`]: idle sockets must not lock out clients that have work to do.
//! Closing is always graceful: an HTTP/1 request in flight still gets its response, HTTP/2
//! gets GOAWAY and its open streams finish.
//!
//! An HTTP/1 keep-alive connection that waits for its next request is closed after
//! `header_read_timeout`, before `idle_timeout`: hyper starts the header-read timer as soon as
//! a response is written (hyperium/hyper#3828) and has no separate keep-alive timeout. Raising
//! hyper's timer to `idle_timeout` would give a slowloris head that long, so the shorter bound
//! is kept.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// At capacity, connections idle at least this long are closed to make room.
pub const SHED_AFTER_IDLE: Duration = Duration::from_secs(1);

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The connection-level limits, from `[limits]`.
#[derive(Clone, Debug)]
pub struct ConnSettings {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub idle_timeout: Duration,
    /// A write to the client that makes no progress for this long closes the connection: a
    /// client that stops reading must not hold the response, its upstream connection and
    /// its bulkhead slot for ever (nginx's `send_timeout`).
    pub send_timeout: Duration,
    /// Upper bound on a graceful close (in-flight responses) before the socket is dropped.
    pub close_grace: Duration,
}

/// `Activity::write_blocked_ms` when no write is waiting for the client.
const NOT_BLOCKED: u64 = u64::MAX;

impl ConnSettings {
    /// The connection limits of a configuration (`[limits]`; the close grace is the
    /// shutdown grace).
    pub fn from_config(cfg: &crate::config::Config) -> ConnSettings {
        ConnSettings {
            header_read_timeout: cfg.limits.header_read_timeout.0,
            max_header_bytes: cfg.limits.max_header_bytes.0 as usize,
            idle_timeout: cfg.limits.idle_timeout.0,
            send_timeout: cfg.limits.send_timeout.0,
            close_grace: cfg.server.shutdown_grace.0,
        }
    }
}

/// When the connection last moved a byte, and since when a write has been waiting for the
/// client to read, in milliseconds since `epoch`.
struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
    /// Set when a write finds the socket full, cleared when a write gets through: how long
    /// the client has left us unable to send ([`ConnSettings::send_timeout`]).
    write_blocked_ms: AtomicU64,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            write_blocked_ms: AtomicU64::new(NOT_BLOCKED),
        })
    }
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }
    /// Notes how a write went: progress clears the stall, a full socket starts it (once).
    fn wrote(&self, result: &Poll<std::io::Result<usize>>) {
        match result {
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.touch();
                self.write_blocked_ms.store(NOT_BLOCKED, Ordering::Relaxed);
            }
            Poll::Pending => {
                let _ = self.write_blocked_ms.compare_exchange(
                    NOT_BLOCKED,
                    self.now_ms(),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
            Poll::Ready(_) => {}
        }
    }
    /// How long a write has been waiting for the client, if one is.
    fn write_blocked_for(&self) -> Option<Duration> {
        let since = self.write_blocked_ms.load(Ordering::Relaxed);
        (since != NOT_BLOCKED).then(|| Duration::from_millis(self.now_ms().saturating_sub(since)))
    }
    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

pin_project_lite::pin_project! {
    /// The socket, noting every read and write in `activity`.
    struct Tracked<S> {
        #[pin]
        inner: S,
        activity: Arc<Activity>,
    }
}

impl<S: AsyncRead> AsyncRead for Tracked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.touch();
        }
        r
    }
}

impl<S: AsyncWrite> AsyncWrite for Tracked<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write(cx, buf);
        this.activity.wrote(&r);
        r
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write_vectored(cx, bufs);
        this.activity.wrote(&r);
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

enum Protocol {
    Http1,
    Http2,
}

/// Reads (without consuming) enough of the first bytes to tell HTTP/2's preface from
/// HTTP/1. `None`: the client closed, errored, or said too little before `deadline`.
async fn sniff(stream: &TcpStream, deadline: Instant) -> Option<Protocol> {
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) | Err(_) => return None,
        };
        if n == 0 {
            return None;
        }
        if buf[..n] != H2_PREFACE[..n] {
            return Some(Protocol::Http1);
        }
        if n == H2_PREFACE.len() {
            return Some(Protocol::Http2);
        }
        // A partial preface: peek would return the same bytes at once, so wait a little.
        // Bounded by the deadline like the peek.
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Resolves once the connection has been idle for `limit`.
async fn idle_expired(activity: &Activity, limit: Duration) {
    loop {
        let left = limit.saturating_sub(activity.idle_for());
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left).await;
    }
}

/// Resolves once a write has waited `limit` for the client to read.
async fn write_stalled(activity: &Activity, limit: Duration) {
    loop {
        let waited = activity.write_blocked_for().unwrap_or_default();
        if waited >= limit {
            return;
        }
        tokio::time::sleep(limit - waited).await;
    }
}

/// Resolves when the accept loop asks for room and this connection has been idle long enough.
async fn shed_requested(shed: &Notify, activity: &Activity) {
    loop {
        shed.notified().await;
        if activity.idle_for() >= SHED_AFTER_IDLE {
            return;
        }
    }
}

async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Serves one accepted connection until it closes: over TLS when `tls` is set (HTTP/2 or
/// HTTP/1.1 by ALPN), else plain (HTTP/2 with prior knowledge, or HTTP/1.1).
pub async fn serve<S, B>(
    stream: TcpStream,
    service: S,
    settings: ConnSettings,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
    shed: Arc<Notify>,
) where
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let activity = Activity::new();
    let deadline = Instant::now() + settings.header_read_timeout;
    let Some(tls) = tls else {
        let protocol = tokio::select! {
            p = sniff(&stream, deadline) => p,
            _ = shed_requested(&shed, &activity) => None,
            _ = stopped(&mut shutdown) => None,
        };
        let Some(protocol) = protocol else {
            return;
        };
        let io = Tracked {
            inner: stream,
            activity: activity.clone(),
        };
        return run(
            io,
            protocol,
            service,
            &activity,
            &settings,
            &mut shutdown,
            &shed,
        )
        .await;
    };
    // Boxed for the same reason as HTTP/2 in `run`: a TLS stream (rustls' connection state)
    // inline would size every plain connection's task for it.
    Box::pin(serve_tls(
        stream, service, settings, tls, shutdown, shed, activity, deadline,
    ))
    .await
}

/// `serve` after the TLS handshake.
#[allow(clippy::too_many_arguments)]
async fn serve_tls<S, B>(
    stream: TcpStream,
    service: S,
    settings: ConnSettings,
    tls: tokio_rustls::TlsAcceptor,
    mut shutdown: watch::Receiver<bool>,
    shed: Arc<Notify>,
    activity: Arc<Activity>,
    deadline: Instant,
) where
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // The handshake counts against the header-read deadline, like a slow request head.
    let accepted = tokio::select! {
        a = tls_accept(stream, &tls, deadline) => a,
        _ = shed_requested(&shed, &activity) => None,
        _ = stopped(&mut shutdown) => None,
    };
    let Some(stream) = accepted else {
        return;
    };
    let protocol = match stream.get_ref().1.alpn_protocol() {
        Some(b"h2") => Protocol::Http2,
        _ => Protocol::Http1,
    };
    let io = Tracked {
        inner: stream,
        activity: activity.clone(),
    };
    run(
        io,
        protocol,
        service,
        &activity,
        &settings,
        &mut shutdown,
        &shed,
    )
    .await
}

/// What a plain-HTTP client gets on the TLS port: a readable refusal instead of a dropped
/// connection (its bytes are not a TLS handshake).
const PLAIN_ON_TLS: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: 94\r\n\r\n{\"error\":\"This port speaks HTTPS: plain HTTP was sent\",\"reason\":\"bad_request\",\"request_id\":\"\"}";

/// The TLS handshake, within `deadline`; `None` when the client sent something else (it is
/// told so if it looks like plain HTTP), failed the handshake, or was too slow.
async fn tls_accept(
    stream: TcpStream,
    tls: &tokio_rustls::TlsAcceptor,
    deadline: Instant,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let mut first = [0u8; 1];
    let n = tokio::time::timeout_at(deadline, stream.peek(&mut first))
        .await
        .ok()?
        .ok()?;
    // A TLS record starts with 0x16 (handshake); an HTTP/1 request with a method's letter.
    if n == 1 && first[0] != 0x16 {
        if first[0].is_ascii_uppercase() {
            let mut stream = stream;
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                use tokio::io::AsyncWriteExt;
                let _ = stream.write_all(PLAIN_ON_TLS).await;
                let _ = stream.shutdown().await;
            })
            .await;
        }
        return None;
    }
    match tokio::time::timeout_at(deadline, tls.accept(stream)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => None,
    }
}

/// The HTTP/2 connection `run` drives (hyper's, on tokio).
type Http2Conn<I, S> = hyper::server::conn::http2::Connection<TokioIo<I>, S, TokioExecutor>;

/// Serves `io` with `protocol` until the connection closes.
async fn run<I, S, B>(
    io: I,
    protocol: Protocol,
    service: S,
    activity: &Activity,
    settings: &ConnSettings,
    shutdown: &mut watch::Receiver<bool>,
    shed: &Notify,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let io = TokioIo::new(io);
    match protocol {
        Protocol::Http1 => {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(settings.header_read_timeout)
                .max_buf_size(settings.max_header_bytes)
                .max_header_size(settings.max_header_bytes)
                .serve_connection(io, service)
                // WebSocket routes answer 101 and take the connection over (the relay).
                .with_upgrades();
            let close = |c: Pin<&mut _>| {
                hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown(c)
            };
            drive(conn, close, activity, settings, shutdown, shed).await;
        }
        Protocol::Http2 => {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX))
                .serve_connection(io, service);
            // Boxed: h2's connection state is large, and inline it would size EVERY
            // connection's task for it (a plain HTTP/1 keep-alive client included).
            let close =
                |c: Pin<&mut Pin<Box<Http2Conn<I, S>>>>| c.get_mut().as_mut().graceful_shutdown();
            drive(Box::pin(conn), close, activity, settings, shutdown, shed).await;
        }
    }
}

/// Runs the connection; asks it to close gracefully (`close`) on shutdown, idleness or
/// shedding, and drops it if the graceful close takes longer than `close_grace`. An upgraded
/// HTTP/1 connection ends here as far as this loop is concerned: the relay owns it.
async fn drive<C: std::future::Future>(
    conn: C,
    close: impl FnOnce(Pin<&mut C>),
    activity: &Activity,
    settings: &ConnSettings,
    shutdown: &mut watch::Receiver<bool>,
    shed: &Notify,
) {
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stopped(shutdown) => {}
        _ = idle_expired(activity, settings.idle_timeout) => {}
        _ = shed_requested(shed, activity) => {}
        _ = write_stalled(activity, settings.send_timeout) => return stalled(settings),
    }
    close(conn.as_mut());
    tokio::select! {
        _ = tokio::time::timeout(settings.close_grace, conn) => {}
        _ = write_stalled(activity, settings.send_timeout) => stalled(settings),
    }
}

/// The client stopped reading: the connection is dropped (not closed gracefully: the
/// response it is stuck on would never finish), which frees what the response held.
fn stalled(settings: &ConnSettings) {
    metrics::counter!("gateway_connections_closed_total", "reason" => "send_timeout").increment(1);
    tracing::info!(
        send_timeout_ms = settings.send_timeout.as_millis() as u64,
        "client stopped reading; connection closed"
    );
}
