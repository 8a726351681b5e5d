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
//! On HTTP/2, bytes are not the measure: a client can keep a connection's bytes moving with
//! PING, SETTINGS or WINDOW_UPDATE frames alone. There idleness counts from the last frame
//! that carries a request or a response (HEADERS, CONTINUATION, DATA with a payload or the end
//! of a stream) or the end of a request ([`FrameWatch`]), so a connection that only sends
//! control frames is idle for the idle timeout and for shedding. h2 itself keeps one PONG and
//! one SETTINGS acknowledgement pending at a time and stops reading until they are written,
//! which bounds what a flood of them costs in memory, but not in CPU: PING and SETTINGS beyond
//! a per-connection budget ([`H2_CONTROL_BURST`], refilled at [`H2_CONTROL_PER_SEC`]) close the
//! connection (gRPC servers answer more than one PING per 5 minutes without a stream with
//! GOAWAY; this is far more lenient).
//!
//! A close (shutdown, idleness, shedding) waits for what is in flight (a request being handled
//! or a response body being sent), within `close_grace`, and for nothing else: a half-sent
//! head or an HTTP/2 client that never acknowledges the GOAWAY's PING is dropped
//! [`CLOSE_FLUSH`] after nothing is in flight.
//!
//! A client that takes response data more slowly than `min_send_rate` bytes/s over a whole
//! `min_send_rate_window`, while the connection had data waiting for it all along, is cut
//! off, in addition to `send_timeout` (no progress at all). The rate is what actually went
//! into the socket; "data waiting" is a write the socket refused, or an HTTP/2 response body
//! that handed hyper a chunk hyper has not finished with (a stream whose peer grants no
//! flow-control window never asks for the next one, while its socket stays writable and even
//! busy with PINGs). Like Kestrel's `MinResponseDataRate`; a stream that is merely quiet (an
//! event stream between events) owes nothing and is never cut for it.
//!
//! An HTTP/1 keep-alive connection that waits for its next request is closed after
//! `header_read_timeout`, before `idle_timeout`: hyper starts the header-read timer as soon as
//! a response is written (hyperium/hyper#3828) and has no separate keep-alive timeout. Raising
//! hyper's timer to `idle_timeout` would give a slowloris head that long, so the shorter bound
//! is kept.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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

/// HTTP/2 PING and SETTINGS frames a client may send at once...
pub const H2_CONTROL_BURST: f64 = 100.0;
/// ...and on average per second after that; beyond, the connection is closed.
pub const H2_CONTROL_PER_SEC: f64 = 10.0;

/// After a close was asked for, how long a connection with nothing in flight keeps its socket
/// (to flush a GOAWAY or a last response) before it is dropped.
pub const CLOSE_FLUSH: Duration = Duration::from_millis(250);

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// When the request about to be handled began to arrive on its connection: what the request
/// duration (the access log's `latency_ms`, `gateway_request_duration_seconds`) counts from,
/// so that the time a request waited for the gateway to get to it (a busy or starved runtime:
/// the task reading the socket waits to be scheduled) is in the gateway's own figures, as it
/// is in the client's.
///
/// The first request of a connection counts from the `accept` if its bytes were already
/// waiting when the connection's task first ran (it waited for the accept loop and the
/// scheduler; a preconnected client that sends later is not charged its own idle time), else
/// from its first byte read. A later HTTP/1 request counts from its first byte read (a read
/// while nothing is in flight on the connection); on HTTP/2 from the read of a HEADERS frame
/// (approximate with streams in parallel: a stream opened while another's HEADERS are still
/// untaken counts from those). What this cannot see: the time bytes spent in the kernel's
/// queues before the gateway's first read or `accept`; the runtime's scheduling delay
/// (`gateway_runtime_scheduling_delay_seconds`) is the measure of that wait.
pub struct Arrival {
    /// The `accept`.
    epoch: std::time::Instant,
    /// Microseconds after `epoch` when the next request's first byte was read; [`NOT_YET`]
    /// until then.
    at_us: AtomicU64,
}

/// `Arrival::at_us` before the next request's first byte.
const NOT_YET: u64 = u64::MAX;

impl Arrival {
    /// The arrival clock of a connection accepted at `accepted`.
    pub fn new(accepted: std::time::Instant) -> Arc<Arrival> {
        Arc::new(Arrival {
            epoch: accepted,
            at_us: AtomicU64::new(NOT_YET),
        })
    }
    /// The first request's bytes were there when the connection's task first looked.
    fn count_from_accept(&self) {
        self.at_us.store(0, Ordering::Relaxed);
    }
    /// A request's first byte was read now (the first read since the last request was taken).
    fn stamp(&self) {
        let now = self.epoch.elapsed().as_micros() as u64;
        let _ = self
            .at_us
            .compare_exchange(NOT_YET, now, Ordering::Relaxed, Ordering::Relaxed);
    }
    /// When the request being handed to the service now began to arrive (now, if no read
    /// was noted for it); the next read starts the next request.
    pub fn take(&self) -> std::time::Instant {
        match self.at_us.swap(NOT_YET, Ordering::Relaxed) {
            NOT_YET => std::time::Instant::now(),
            us => self.epoch + Duration::from_micros(us),
        }
    }
}

/// Whether the client has sent bytes that wait to be read (`MSG_PEEK | MSG_DONTWAIT`: no
/// wait, nothing consumed).
fn bytes_waiting(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    // SAFETY: recv writes at most 1 byte into `byte`, on a descriptor `stream` owns.
    let n = unsafe {
        libc::recv(
            std::os::fd::AsRawFd::as_raw_fd(stream),
            byte.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n > 0
}

/// The connection-level limits, from `[limits]`.
#[derive(Clone, Debug)]
pub struct ConnSettings {
    /// A client must have sent its whole request head within this (slowloris); on HTTP/1
    /// keep-alive it also bounds the wait for the next request (see the module docs).
    pub header_read_timeout: Duration,
    /// The largest request head: hyper's exact `max_header_size` on HTTP/1 (431 beyond it)
    /// and the header-list size on HTTP/2. Also hyper's read buffer, so one large read on a
    /// reused connection cannot overshoot it.
    pub max_header_bytes: usize,
    /// A connection that moves no bytes (HTTP/2: does no stream work) for this long is closed.
    pub idle_timeout: Duration,
    /// A write to the client that makes no progress for this long closes the connection: a
    /// client that stops reading must not hold the response, its upstream connection and
    /// its bulkhead slot for ever (nginx's `send_timeout`).
    pub send_timeout: Duration,
    /// Bytes per second a client must take while data waits for it (0: no minimum): a
    /// client that trickles along just fast enough to beat `send_timeout` is cut too.
    pub min_send_rate: u64,
    /// How long the rate is measured over before a client is cut.
    pub min_send_rate_window: Duration,
    /// Upper bound on a graceful close (in-flight responses) before the socket is dropped.
    pub close_grace: Duration,
}

/// `Activity::write_blocked_ms` when no write is waiting for the client.
const NOT_BLOCKED: u64 = u64::MAX;
/// `Activity::work_ms` on an HTTP/1 connection (its idleness is measured in bytes).
const NOT_H2: u64 = u64::MAX;

impl ConnSettings {
    /// The connection limits of a configuration (`[limits]`; the close grace is the
    /// shutdown grace).
    pub fn from_config(cfg: &crate::config::Config) -> ConnSettings {
        ConnSettings {
            header_read_timeout: cfg.limits.header_read_timeout.0,
            max_header_bytes: cfg.limits.max_header_bytes.0 as usize,
            idle_timeout: cfg.limits.idle_timeout.0,
            send_timeout: cfg.limits.send_timeout.0,
            min_send_rate: cfg.limits.min_send_rate.0,
            min_send_rate_window: cfg.limits.min_send_rate_window.0,
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
    /// HTTP/2: when a stream last did work, which idleness is measured from there (control
    /// frames move bytes but do no work); [`NOT_H2`] on HTTP/1.
    work_ms: AtomicU64,
    /// Requests being handled or whose response body is still being sent: what a graceful
    /// close waits for.
    in_flight: AtomicUsize,
    /// Woken when `in_flight` falls to zero (a closing connection waits for it).
    all_done: Notify,
    /// Bytes written to the socket: what the client took ([`ConnSettings::min_send_rate`]).
    written: AtomicU64,
    /// Response bodies whose last chunk hyper has not finished with (see [`Metered`]).
    waiting_bodies: AtomicUsize,
    /// The rate watch is running (or about to): set by whatever may start a debt, so an
    /// idle connection runs no timer.
    rate_armed: AtomicBool,
    /// Wakes the rate watch when `rate_armed` goes up.
    rate_wake: Notify,
    /// The connection's socket, to reset it when a client is cut off (see [`cut_off`]).
    socket: std::os::fd::RawFd,
    /// When the next request began to arrive (stamped by reads, taken by the service).
    arrival: Arc<Arrival>,
}

impl Activity {
    /// The activity of the connection on `socket` (its descriptor, see [`cut_off`]), noting
    /// its requests' arrivals in `arrival`.
    fn new(socket: std::os::fd::RawFd, arrival: Arc<Arrival>) -> Arc<Activity> {
        Arc::new(Activity {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            write_blocked_ms: AtomicU64::new(NOT_BLOCKED),
            work_ms: AtomicU64::new(NOT_H2),
            in_flight: AtomicUsize::new(0),
            all_done: Notify::new(),
            written: AtomicU64::new(0),
            waiting_bodies: AtomicUsize::new(0),
            rate_armed: AtomicBool::new(false),
            rate_wake: Notify::new(),
            socket,
            arrival,
        })
    }
    /// From now on idleness counts from stream work, not bytes (HTTP/2).
    fn start_h2(&self) {
        self.work_ms.store(self.now_ms(), Ordering::Relaxed);
    }
    /// A stream did work (HTTP/2; nothing to note on HTTP/1, where every byte counts).
    fn worked(&self) {
        if self.work_ms.load(Ordering::Relaxed) != NOT_H2 {
            self.work_ms.store(self.now_ms(), Ordering::Relaxed);
        }
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
                self.written.fetch_add(*n as u64, Ordering::Relaxed);
                self.write_blocked_ms.store(NOT_BLOCKED, Ordering::SeqCst);
            }
            Poll::Pending => {
                let started = self.write_blocked_ms.compare_exchange(
                    NOT_BLOCKED,
                    self.now_ms(),
                    Ordering::SeqCst,
                    Ordering::Relaxed,
                );
                if started.is_ok() {
                    self.arm_rate_watch();
                }
            }
            Poll::Ready(_) => {}
        }
    }
    /// How long a write has been waiting for the client, if one is.
    fn write_blocked_for(&self) -> Option<Duration> {
        let since = self.write_blocked_ms.load(Ordering::Relaxed);
        (since != NOT_BLOCKED).then(|| Duration::from_millis(self.now_ms().saturating_sub(since)))
    }
    /// Data is waiting for the client: a write the socket refused, or a chunk hyper holds.
    fn owes_client(&self) -> bool {
        self.waiting_bodies.load(Ordering::SeqCst) > 0
            || self.write_blocked_ms.load(Ordering::SeqCst) != NOT_BLOCKED
    }
    fn arm_rate_watch(&self) {
        if !self.rate_armed.swap(true, Ordering::SeqCst) {
            self.rate_wake.notify_one();
        }
    }
    fn idle_for(&self) -> Duration {
        let last = match self.work_ms.load(Ordering::Relaxed) {
            NOT_H2 => self.last_ms.load(Ordering::Relaxed),
            work => work,
        };
        self.epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(last))
    }
}

/// One request in flight on a connection, from the service call to the end of its response
/// body (or its drop).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.worked();
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.all_done.notify_waiters();
        }
        self.0.worked();
    }
}

/// The connection's service, counting its requests in flight.
struct Counted<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S, B> hyper::service::Service<http::Request<hyper::body::Incoming>> for Counted<S>
where
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>,
{
    type Response = http::Response<CountedBody<B>>;
    type Error = S::Error;
    type Future = CountedCall<S::Future>;

    fn call(&self, req: http::Request<hyper::body::Incoming>) -> Self::Future {
        CountedCall {
            guard: Some(InFlight::new(self.activity.clone())),
            inner: self.inner.call(req),
        }
    }
}

pin_project_lite::pin_project! {
    /// A counted request until its response is ready; then its body carries the count.
    struct CountedCall<F> {
        #[pin]
        inner: F,
        guard: Option<InFlight>,
    }
}

impl<F, B, E> std::future::Future for CountedCall<F>
where
    F: std::future::Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<CountedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = std::task::ready!(this.inner.poll(cx))?;
        let guard = this.guard.take();
        Poll::Ready(Ok(resp.map(|inner| CountedBody { inner, guard })))
    }
}

pin_project_lite::pin_project! {
    /// A response body, counted in flight until it has ended.
    struct CountedBody<B> {
        #[pin]
        inner: B,
        guard: Option<InFlight>,
    }
}

impl<B: hyper::body::Body> hyper::body::Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        if matches!(frame, Poll::Ready(None | Some(Err(_)))) {
            this.guard.take();
        }
        frame
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
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
            // HTTP/1: bytes while nothing is in flight begin the next request (HTTP/2 marks
            // its requests by frame, in `FrameWatch`).
            let a = &this.activity;
            if a.work_ms.load(Ordering::Relaxed) == NOT_H2
                && a.in_flight.load(Ordering::Acquire) == 0
            {
                a.arrival.stamp();
            }
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

/// What one stretch of HTTP/2 bytes held.
#[derive(Debug, Default, PartialEq, Eq)]
struct FramesSeen {
    /// A frame of a request or response: HEADERS, CONTINUATION, PUSH_PROMISE, or DATA with a
    /// payload or the end of its stream (an empty DATA frame is no work).
    work: bool,
    /// A HEADERS frame: a request begins (read side) or a response (write side).
    headers: bool,
    /// PING and SETTINGS frames that ask for an acknowledgement.
    control: u32,
}

/// Follows HTTP/2 frame boundaries through one direction of a connection, looking only at the
/// 9-byte frame headers (payloads are skipped, however the reads split them).
struct FrameScan {
    /// Bytes of the client connection preface still to pass (it is not a frame).
    preface_left: usize,
    /// The frame header being assembled, `head_len` bytes of it so far.
    head: [u8; 9],
    head_len: usize,
    /// Payload bytes of the current frame still to pass.
    payload_left: usize,
}

impl FrameScan {
    fn new(preface: usize) -> FrameScan {
        FrameScan {
            preface_left: preface,
            head: [0; 9],
            head_len: 0,
            payload_left: 0,
        }
    }

    fn feed(&mut self, mut data: &[u8]) -> FramesSeen {
        let mut seen = FramesSeen::default();
        // Each turn consumes at least one byte or ends.
        while !data.is_empty() {
            let skip = if self.preface_left > 0 {
                &mut self.preface_left
            } else {
                &mut self.payload_left
            };
            if *skip > 0 {
                let n = (*skip).min(data.len());
                *skip -= n;
                data = &data[n..];
                continue;
            }
            let n = (9 - self.head_len).min(data.len());
            self.head[self.head_len..self.head_len + n].copy_from_slice(&data[..n]);
            self.head_len += n;
            data = &data[n..];
            if self.head_len < 9 {
                break;
            }
            self.head_len = 0;
            let h = self.head;
            let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
            let (kind, flags) = (h[3], h[4]);
            const DATA: u8 = 0;
            const HEADERS: u8 = 1;
            const SETTINGS: u8 = 4;
            const PUSH_PROMISE: u8 = 5;
            const PING: u8 = 6;
            const CONTINUATION: u8 = 9;
            // END_STREAM on DATA, ACK on SETTINGS and PING: the same bit.
            let flag_1 = flags & 1 == 1;
            match kind {
                DATA => seen.work |= len > 0 || flag_1,
                HEADERS => {
                    seen.work = true;
                    seen.headers = true;
                }
                CONTINUATION | PUSH_PROMISE => seen.work = true,
                SETTINGS | PING if !flag_1 => seen.control += 1,
                _ => {}
            }
            self.payload_left = len;
        }
        seen
    }
}

/// A token bucket over a connection's PING and SETTINGS frames.
struct ControlBudget {
    tokens: f64,
    at: Instant,
}

impl ControlBudget {
    fn new() -> ControlBudget {
        ControlBudget {
            tokens: H2_CONTROL_BURST,
            at: Instant::now(),
        }
    }
    /// Takes `n` frames from the budget; false once it is overdrawn.
    fn spend(&mut self, n: u32) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * H2_CONTROL_PER_SEC;
        self.tokens = (self.tokens + refill).min(H2_CONTROL_BURST) - f64::from(n);
        self.at = now;
        self.tokens >= 0.0
    }
}

pin_project_lite::pin_project! {
    /// An HTTP/2 connection's plaintext, watched frame by frame: stream work keeps it from
    /// being idle, control frames do not, and too many PING / SETTINGS end it.
    struct FrameWatch<S> {
        #[pin]
        inner: S,
        activity: Arc<Activity>,
        reads: FrameScan,
        writes: FrameScan,
        budget: ControlBudget,
        flooded: bool,
    }
}

impl<S> FrameWatch<S> {
    fn new(inner: S, activity: Arc<Activity>) -> FrameWatch<S> {
        activity.start_h2();
        FrameWatch {
            inner,
            activity,
            reads: FrameScan::new(H2_PREFACE.len()),
            writes: FrameScan::new(0),
            budget: ControlBudget::new(),
            flooded: false,
        }
    }
}

/// What the connection's reads fail with once its control-frame budget is spent.
fn control_flood() -> std::io::Error {
    std::io::Error::other("HTTP/2 PING/SETTINGS flood")
}

impl<S: AsyncRead> AsyncRead for FrameWatch<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        if *this.flooded {
            return Poll::Ready(Err(control_flood()));
        }
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) {
            let seen = this.reads.feed(&buf.filled()[before..]);
            if seen.work {
                this.activity.worked();
            }
            if seen.headers {
                this.activity.arrival.stamp();
            }
            if seen.control > 0 && !this.budget.spend(seen.control) {
                *this.flooded = true;
                metrics::counter!("gateway_connections_closed_total", "reason" => "h2_control_flood")
                    .increment(1);
                tracing::info!("HTTP/2 PING/SETTINGS flood; connection closed");
                return Poll::Ready(Err(control_flood()));
            }
        }
        r
    }
}

impl<S: AsyncWrite> AsyncWrite for FrameWatch<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            if this.writes.feed(&buf[..n]).work {
                this.activity.worked();
            }
        }
        r
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            let mut left = n;
            let mut work = false;
            for b in bufs {
                if left == 0 {
                    break;
                }
                let k = left.min(b.len());
                work |= this.writes.feed(&b[..k]).work;
                left -= k;
            }
            if work {
                this.activity.worked();
            }
        }
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

/// Samples of the written-bytes count per `min_send_rate_window`.
const RATE_STEPS: u32 = 5;

/// Resolves once the connection owed the client data at every sample over a whole `window`
/// (sampled every fifth of it, from when the debt started) and the client took less than
/// `rate` bytes/s over it. Runs no timer while nothing is owed: whatever starts a debt (a
/// chunk handed to hyper, a refused write) wakes it, and it looks again only a step later,
/// so a connection answering request after request wakes it once per step, not per request.
async fn too_slow(activity: &Activity, rate: u64, window: Duration) {
    if rate == 0 || window.is_zero() {
        return std::future::pending().await;
    }
    let step = window / RATE_STEPS;
    let least = (rate as f64 * window.as_secs_f64()) as u64;
    let mut written: VecDeque<u64> = VecDeque::with_capacity(RATE_STEPS as usize + 1);
    loop {
        // Armed already (by a debt a watch dropped before this one saw): no wake will come.
        if !activity.rate_armed.load(Ordering::SeqCst) {
            activity.rate_wake.notified().await;
        }
        // Where the client stood when the debt started.
        written.clear();
        written.push_back(activity.written.load(Ordering::Relaxed));
        loop {
            tokio::time::sleep(step).await;
            if !activity.owes_client() {
                activity.rate_armed.store(false, Ordering::SeqCst);
                // A debt that started just before the store saw the watch armed and did not
                // wake it: look once more now that new debts will.
                if !activity.owes_client() {
                    break;
                }
                activity.rate_armed.store(true, Ordering::SeqCst);
                written.clear();
            }
            written.push_back(activity.written.load(Ordering::Relaxed));
            if written.len() > RATE_STEPS as usize {
                let first = written.pop_front().unwrap_or_default();
                let last = written.back().copied().unwrap_or_default();
                if last.saturating_sub(first) < least {
                    return;
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// An HTTP/2 response body that tells its connection's [`Activity`] when it has handed
    /// hyper a chunk that hyper has not finished with (it asks for the next one only once it
    /// has sent, or buffered, this one): data waiting for the client.
    pub struct Metered<B> {
        #[pin]
        inner: B,
        activity: Arc<Activity>,
        // This body is counted in `waiting_bodies` (pin-project-lite takes no field docs
        // in a struct with a `PinnedDrop`).
        waiting: bool,
    }

    impl<B> PinnedDrop for Metered<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if *this.waiting {
                this.activity.waiting_bodies.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

impl<B: hyper::body::Body> hyper::body::Body for Metered<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        let this = self.project();
        if std::mem::take(this.waiting) {
            this.activity.waiting_bodies.fetch_sub(1, Ordering::SeqCst);
        }
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if frame.data_ref().is_some_and(bytes::Buf::has_remaining) {
                *this.waiting = true;
                this.activity.waiting_bodies.fetch_add(1, Ordering::SeqCst);
                this.activity.arm_rate_watch();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// An HTTP/2 connection's service with every response body [`Metered`].
struct MeteredService<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S, B> hyper::service::Service<http::Request<hyper::body::Incoming>> for MeteredService<S>
where
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>,
{
    type Response = http::Response<Metered<B>>;
    type Error = S::Error;
    type Future = MeteredFuture<S::Future>;

    fn call(&self, req: http::Request<hyper::body::Incoming>) -> Self::Future {
        MeteredFuture {
            inner: self.inner.call(req),
            activity: self.activity.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    struct MeteredFuture<F> {
        #[pin]
        inner: F,
        activity: Arc<Activity>,
    }
}

impl<F, B, E> std::future::Future for MeteredFuture<F>
where
    F: std::future::Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<Metered<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = std::task::ready!(this.inner.poll(cx))?;
        Poll::Ready(Ok(resp.map(|inner| Metered {
            inner,
            activity: this.activity.clone(),
            waiting: false,
        })))
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
    arrival: Arc<Arrival>,
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
    // The first request waited since the accept if its bytes were already here.
    if bytes_waiting(&stream) {
        arrival.count_from_accept();
    }
    let activity = Activity::new(std::os::fd::AsRawFd::as_raw_fd(&stream), arrival);
    let service = Counted {
        inner: service,
        activity: activity.clone(),
    };
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

/// The HTTP/2 connection `run` drives (hyper's, on tokio, response bodies metered).
type Http2Conn<I, S> = hyper::server::conn::http2::Connection<
    TokioIo<FrameWatch<I>>,
    MeteredService<S>,
    TokioExecutor,
>;

/// Serves `io` with `protocol` until the connection closes.
async fn run<I, S, B>(
    io: I,
    protocol: Protocol,
    service: S,
    activity: &Arc<Activity>,
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
    match protocol {
        Protocol::Http1 => {
            let io = TokioIo::new(io);
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
            let io = TokioIo::new(FrameWatch::new(io, activity.clone()));
            // Only HTTP/2 bodies are metered: an HTTP/1 response that waits for its client
            // always shows as a refused write, while an HTTP/2 stream without window leaves
            // the socket writable. (Wrapping costs a move of each request's future, ~800
            // instructions per HTTP/1 request measured, for nothing there.)
            let service = MeteredService {
                inner: service,
                activity: activity.clone(),
            };
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
        _ = write_stalled(activity, settings.send_timeout) => {
            stalled(settings);
            return cut_off(activity);
        }
        _ = too_slow(activity, settings.min_send_rate, settings.min_send_rate_window) => {
            below_min_rate(settings);
            return cut_off(activity);
        }
    }
    close(conn.as_mut());
    tokio::select! {
        _ = tokio::time::timeout(settings.close_grace, conn) => {}
        _ = write_stalled(activity, settings.send_timeout) => {
            stalled(settings);
            cut_off(activity);
        }
        _ = too_slow(activity, settings.min_send_rate, settings.min_send_rate_window) => {
            below_min_rate(settings);
            cut_off(activity);
        }
        _ = settled(activity) => {}
    }
}

/// Resolves once nothing has been in flight for [`CLOSE_FLUSH`]: what a graceful close owes
/// is done.
async fn settled(activity: &Activity) {
    loop {
        // Created before the check, so a drop to zero in between still wakes it.
        let done = activity.all_done.notified();
        if activity.in_flight.load(Ordering::Acquire) == 0 {
            tokio::time::sleep(CLOSE_FLUSH).await;
            if activity.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
        } else {
            done.await;
        }
    }
}

/// Makes the coming close of a cut-off connection a reset (`SO_LINGER` 0, as nginx's
/// `reset_timedout_connection`): a plain close would still trickle out what the kernel holds
/// for the client (megabytes on loopback) before the FIN, so the client would keep reading
/// and the kernel keep that memory. Called while the connection (and so the socket) is still
/// open; it is dropped right after.
fn cut_off(activity: &Activity) {
    let fd = activity.socket;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `fd` is the connection's socket, open until the caller drops the connection
    // after this returns; setsockopt reads `linger` only for the duration of the call.
    let set = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if set != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "SO_LINGER not set on a cut-off connection");
    }
}

/// The client stopped reading: the connection is dropped (not closed gracefully: the
/// response it is stuck on would never finish) and reset, which frees what the response held.
fn stalled(settings: &ConnSettings) {
    metrics::counter!("gateway_connections_closed_total", "reason" => "send_timeout").increment(1);
    tracing::info!(
        send_timeout_ms = settings.send_timeout.as_millis() as u64,
        "client stopped reading; connection closed"
    );
}

/// The client took data too slowly for a whole window: dropped like a stalled one (what it
/// was sent so far is all it gets), freeing what its responses held.
fn below_min_rate(settings: &ConnSettings) {
    metrics::counter!("gateway_connections_closed_total", "reason" => "min_send_rate").increment(1);
    tracing::info!(
        min_send_rate = settings.min_send_rate,
        window_ms = settings.min_send_rate_window.as_millis() as u64,
        "client took response data below the minimum rate; connection closed"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags, 0, 0, 0, 1]);
        f.extend_from_slice(payload);
        f
    }

    /// Feeds `bytes` in pieces of `step` and adds up what was seen.
    fn scan(bytes: &[u8], step: usize, preface: usize) -> FramesSeen {
        let mut s = FrameScan::new(preface);
        let mut total = FramesSeen::default();
        for piece in bytes.chunks(step) {
            let seen = s.feed(piece);
            total.work |= seen.work;
            total.headers |= seen.headers;
            total.control += seen.control;
        }
        total
    }

    #[test]
    fn frame_headers_are_found_however_the_reads_split_them() {
        // Control frames only, with payloads that look like frame headers.
        let mut control = H2_PREFACE.to_vec();
        control.extend(frame(4, 0, &[0, 3, 0, 0, 0, 100]));
        control.extend(frame(6, 0, &[1, 0, 0, 0, 0, 0, 0, 0]));
        control.extend(frame(6, 1, &[0; 8])); // a PING ack asks for nothing
        control.extend(frame(4, 1, &[])); // nor does a SETTINGS ack
        control.extend(frame(8, 0, &[0, 0, 1, 0])); // WINDOW_UPDATE
        control.extend(frame(0, 0, &[])); // an empty DATA frame is no work
        control.extend(frame(2, 0, &[0, 0, 0, 0, 16])); // PRIORITY
        for step in 1..=control.len() {
            assert_eq!(
                scan(&control, step, H2_PREFACE.len()),
                FramesSeen {
                    work: false,
                    headers: false,
                    control: 2
                },
                "split every {step} bytes"
            );
        }
        for work in [
            frame(1, 4, &[0x82, 0x86]),
            frame(0, 0, b"hello"),
            frame(0, 1, &[]),
            frame(9, 4, &[0x84]),
        ] {
            let mut bytes = control.clone();
            bytes.extend(&work);
            for step in [1, 7, 9, 1000] {
                let seen = scan(&bytes, step, H2_PREFACE.len());
                assert!(seen.work, "{work:?}");
                // Only a HEADERS frame begins a request (`Arrival`).
                assert_eq!(seen.headers, work[3] == 1, "{work:?}");
            }
        }
        // The write side has no preface: a server SETTINGS frame comes first.
        assert_eq!(scan(&frame(4, 0, &[]), 3, 0).control, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_close_waits_for_requests_in_flight_and_nothing_else() {
        let activity = Activity::new(-1, Arrival::new(std::time::Instant::now()));
        // Nothing in flight: settled after the flush time.
        let started = Instant::now();
        settled(&activity).await;
        assert_eq!(started.elapsed(), CLOSE_FLUSH);
        // A request in flight holds it, however long; its end releases it.
        let request = InFlight::new(activity.clone());
        let waiting = settled(&activity);
        tokio::pin!(waiting);
        assert!(tokio::time::timeout(Duration::from_secs(60), &mut waiting)
            .await
            .is_err());
        drop(request);
        let ended = Instant::now();
        waiting.await;
        assert_eq!(ended.elapsed(), CLOSE_FLUSH);
        // On HTTP/2 a request's end is work; control frames are not (FrameWatch).
        activity.start_h2();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(activity.idle_for(), Duration::from_secs(5));
        drop(InFlight::new(activity.clone()));
        assert_eq!(activity.idle_for(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn the_control_frame_budget_allows_a_burst_then_a_rate() {
        let mut b = ControlBudget::new();
        assert!(b.spend(H2_CONTROL_BURST as u32));
        assert!(!b.spend(1), "past the burst");
        let mut b = ControlBudget::new();
        assert!(b.spend(H2_CONTROL_BURST as u32));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(
            b.spend(H2_CONTROL_PER_SEC as u32),
            "refilled after a second"
        );
        assert!(!b.spend(1));
        // A PING every 100 ms for an hour never runs out.
        let mut b = ControlBudget::new();
        for _ in 0..36_000 {
            tokio::time::advance(Duration::from_millis(100)).await;
            assert!(b.spend(1));
        }
    }

    /// Drives `too_slow` while the client takes `per_100ms` bytes every 100 ms; how long it
    /// took to cut, or `None` if it did not within `limit`.
    async fn cut_after(a: &Activity, per_100ms: u64, limit: Duration) -> Option<Duration> {
        let started = Instant::now();
        let watch = too_slow(a, 1024, Duration::from_secs(10));
        tokio::pin!(watch);
        while started.elapsed() < limit {
            tokio::select! {
                _ = &mut watch => return Some(started.elapsed()),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    a.written.fetch_add(per_100ms, Ordering::Relaxed);
                }
            }
        }
        None
    }

    /// A chunk handed to hyper and not finished with, as [`Metered`] records it.
    fn owe(a: &Activity) {
        a.waiting_bodies.fetch_add(1, Ordering::SeqCst);
        a.arm_rate_watch();
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_below_the_rate_for_a_whole_window_is_cut() {
        let a = Activity::new(-1, Arrival::new(std::time::Instant::now()));
        owe(&a);
        // 500 B/s against 1 KiB/s over 10 s.
        let took = cut_after(&a, 50, Duration::from_secs(60)).await;
        let took = took.expect("never cut");
        assert!(
            took >= Duration::from_secs(10) && took < Duration::from_secs(13),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_above_the_rate_is_never_cut() {
        let a = Activity::new(-1, Arrival::new(std::time::Instant::now()));
        owe(&a);
        // 2 KiB/s.
        assert_eq!(cut_after(&a, 200, Duration::from_secs(60)).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_connection_owes_nothing_and_the_window_starts_with_the_debt() {
        let a = Activity::new(-1, Arrival::new(std::time::Instant::now()));
        // Nothing waits for the client (an event stream between events): however little
        // it takes, no cut, and no timer runs.
        assert_eq!(cut_after(&a, 0, Duration::from_secs(60)).await, None);
        // A refused write starts a debt; the window is measured from then.
        a.wrote(&Poll::Pending);
        let took = cut_after(&a, 0, Duration::from_secs(60)).await;
        assert!(
            took.is_some_and(|t| t < Duration::from_secs(13)),
            "{took:?}"
        );
        // Paid off (the write got through, nothing else waits): no cut after that.
        a.wrote(&Poll::Ready(Ok(100)));
        assert_eq!(cut_after(&a, 0, Duration::from_secs(60)).await, None);
    }
}
