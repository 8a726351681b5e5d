//! Relaying one WebSocket connection between a client and an upstream instance, after the
//! handshake (`routes/websocket.rs`) let it through.
//!
//! Bytes are passed on as they arrive, never gathered into whole messages: the relay only
//! follows the frame boundaries (`frame.rs`) in each direction, which tells it how many
//! messages went by, what close code ended the connection, and where it may insert a frame of
//! its own. Its own frames: a ping to a client that has been silent for half the idle timeout;
//! a (masked) ping to an upstream that has been quiet for `upstream_ping.interval`; a close to
//! the client when the upstream goes away or goes silent (1012, "service restart": try again)
//! or the gateway shuts down or the client idles out (1001, going away); a close to the
//! upstream (masked, as a client's) when the client goes away. A close handshake gets
//! `close_timeout` to complete; then both connections are dropped. A side that is cut off
//! mid-frame cannot be closed cleanly: its TCP connection is closed instead.
//!
//! A silent upstream (a paused process, a frozen container: its TCP connection stays open and
//! its kernel still acknowledges what it is sent) looks exactly like a quiet market: only an
//! answer it owes can tell them apart. So when it has sent nothing for the interval it gets a
//! ping, and if nothing at all (the pong, or any frame) comes back within the pong timeout,
//! its client is closed with 1012, the code a vanished upstream gets too: to the client both
//! mean "the service behind this connection is not serving it; reconnect" (1011 would claim
//! an unexpected condition in the gateway itself). The reason text says `upstream silent`.
//! The pongs that answer the gateway's pings, in either direction, are relayed like any frame
//! (cutting them out would mean buffering frames): the other side sees an unsolicited pong,
//! which RFC 6455 (5.5.3) allows and endpoints ignore. Both watches are deadlines in the one
//! timer the relay loop already has: no task or timer per connection is added.
//!
//! - this file: [`relay`], the two directions, idleness, the close handshake and the
//!   metrics; start reading there.
//! - `frame`: following frame boundaries through a byte stream (no buffering), and the
//!   close and ping frames the relay writes itself.

pub(crate) mod frame;

use std::future::Future;
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use frame::{close_frame, control_frame, FrameCursor, OP_PING};

/// Read buffer per direction. Small on purpose: an idle connection holds two of them, and
/// ticks are a few hundred bytes.
const BUFFER: usize = 4 * 1024;

/// The relay's limits, from `[websocket]` and `limits.send_timeout`.
#[derive(Clone, Copy, Debug)]
pub struct RelaySettings {
    pub idle_timeout: Duration,
    pub max_lifetime: Option<Duration>,
    pub close_timeout: Duration,
    /// A write that cannot make progress for this long (a peer that stopped reading) drops
    /// the connection.
    pub send_timeout: Duration,
    /// Watch the upstream for silence (`[websocket] upstream_ping`); `None`: not watched.
    pub upstream_ping: Option<UpstreamPing>,
}

/// When the upstream side counts as silent.
#[derive(Clone, Copy, Debug)]
pub struct UpstreamPing {
    /// The upstream has sent nothing this long: it is pinged.
    pub interval: Duration,
    /// Nothing came back this long after the ping: it is silent, its client is closed.
    pub timeout: Duration,
}

/// Counters the relay adds to as bytes and messages pass (handles registered once per
/// connection by the caller), in batches at most a second apart while frames flow and once
/// at the end (see `Published`).
#[derive(Clone)]
pub struct RelayCounters {
    pub bytes_in: metrics::Counter,
    pub bytes_out: metrics::Counter,
    pub messages_in: metrics::Counter,
    pub messages_out: metrics::Counter,
}

/// What the connection did, for its closing access line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Client to upstream.
    pub bytes_in: u64,
    /// Upstream to client.
    pub bytes_out: u64,
    pub messages_in: u64,
    pub messages_out: u64,
    /// The code of the first close frame either side sent or the gateway sent; `None` when
    /// the connection ended without one.
    pub close_code: Option<u16>,
    /// Who ended it: `client`, `upstream`, `upstream_silent`, `idle`, `lifetime`,
    /// `shutdown`, `stalled` (also the `reason` of `gateway_websocket_closed_total`).
    pub ended_by: &'static str,
}

/// Every [`RelayStats::ended_by`]: the `reason` label values of
/// `gateway_websocket_closed_total`, registered at zero per WebSocket route.
pub const END_REASONS: &[&str] = &[
    "client",
    "upstream",
    "upstream_silent",
    "idle",
    "lifetime",
    "shutdown",
    "stalled",
];

fn mask() -> Option<[u8; 4]> {
    Some(rand::random())
}

/// Relays until the connection ends; returns what went through.
pub async fn relay<C, U>(
    client: C,
    upstream: U,
    settings: RelaySettings,
    mut shutdown: watch::Receiver<bool>,
    counters: RelayCounters,
) -> RelayStats
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_rd, mut client_wr) = tokio::io::split(client);
    let (mut up_rd, mut up_wr) = tokio::io::split(upstream);
    let mut client_buf = vec![0u8; BUFFER];
    let mut up_buf = vec![0u8; BUFFER];
    // Follow the frames of what each side sends (and so of what the other receives).
    let mut from_client = FrameCursor::default();
    let mut from_upstream = FrameCursor::default();
    let mut stats = RelayStats::default();
    let started = Instant::now();
    let mut client_heard = started;
    let mut pinged = false;
    // The upstream side: when it last sent anything, and when the gateway pinged it since.
    let mut upstream_heard = started;
    let mut upstream_pinged: Option<Instant> = None;
    let mut upstream_gone = false;
    // The close handshake with the client: each direction done once a close went that way.
    let mut close_to_client = false;
    let mut close_from_client = false;
    let mut closing_until: Option<Instant> = None;
    let send = settings.send_timeout;

    /// Writes `bytes`, bounded by the send timeout; `false` when the peer is gone or stalled.
    async fn write<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8], limit: Duration) -> bool {
        write_bounded(w, bytes, limit).await
    }

    // Both live across the loop's turns, so each registers once rather than once per frame:
    // a shutdown watch re-made per turn joins and leaves the shutdown channel's waiter list
    // (a lock shared by every connection) for each frame relayed.
    let stop = stopped(&mut shutdown);
    tokio::pin!(stop);
    // The one timer, and the deadline it is set for (`None`: it has fired, set it again). It
    // is moved only when a deadline comes EARLIER than that: every frame from the upstream
    // pushes its ping `interval` away, and following that would take the timer out of the
    // wheel and put it back (two lock round trips) per frame. A timer that fires before the
    // real deadline finds nothing due, and is set again to it.
    let timer = tokio::time::sleep_until(started);
    tokio::pin!(timer);
    let mut armed: Option<Instant> = None;
    let mut published = Published::new(started);

    loop {
        if close_to_client && close_from_client {
            break;
        }
        let mut wake = client_heard + settings.idle_timeout;
        if !pinged {
            wake = wake.min(client_heard + settings.idle_timeout / 2);
        }
        if let Some(life) = settings.max_lifetime {
            wake = wake.min(started + life);
        }
        if let Some(until) = closing_until {
            wake = wake.min(until);
        }
        // Not while a close is under way: the close timeout bounds that.
        let watch_upstream = settings
            .upstream_ping
            .filter(|_| !upstream_gone && closing_until.is_none());
        if let Some(hb) = watch_upstream {
            wake = wake.min(match upstream_pinged {
                Some(at) => at + hb.timeout,
                None => upstream_heard + hb.interval,
            });
        }
        if armed.is_none_or(|at| wake < at) {
            timer.as_mut().reset(wake);
            armed = Some(wake);
        }
        tokio::select! {
            read = client_rd.read(&mut client_buf) => {
                let n = match read {
                    Ok(n) if n > 0 => n,
                    // The client went away without a close: tell the upstream, drop it.
                    _ => {
                        if !upstream_gone && !close_from_client && from_client.at_boundary() {
                            let _ = write(&mut up_wr, &close_frame(1001, "client gone", mask()), send).await;
                        }
                        stats.ended_by = if stats.ended_by.is_empty() { "client" } else { stats.ended_by };
                        break;
                    }
                };
                client_heard = Instant::now();
                pinged = false;
                let seen = from_client.advance(&client_buf[..n]);
                stats.bytes_in += n as u64;
                stats.messages_in += seen.messages;
                published.catch_up(&stats, &counters, client_heard, false);
                if !upstream_gone && !write(&mut up_wr, &client_buf[..n], send).await {
                    upstream_gone = true;
                    if stats.ended_by.is_empty() {
                        stats.ended_by = "upstream";
                    }
                }
                if let Some(code) = seen.close {
                    close_from_client = true;
                    stats.close_code.get_or_insert(code);
                    if stats.ended_by.is_empty() {
                        stats.ended_by = "client";
                    }
                    closing_until.get_or_insert(Instant::now() + settings.close_timeout);
                }
                if upstream_gone && !close_to_client {
                    // The upstream cannot answer the client's close: the gateway does.
                    if !end_to_client(&mut client_wr, &from_upstream, &mut stats, 1012, "upstream gone", send).await {
                        break;
                    }
                    close_to_client = true;
                    closing_until.get_or_insert(Instant::now() + settings.close_timeout);
                }
            }
            read = up_rd.read(&mut up_buf), if !upstream_gone => {
                let n = match read {
                    Ok(n) if n > 0 => n,
                    _ => {
                        upstream_gone = true;
                        if close_to_client {
                            // Its close was relayed already; the client's answer may follow.
                            continue;
                        }
                        // The client may have closed first (its close is on the way to an
                        // upstream that then vanished): the log names who ended it first.
                        if stats.ended_by.is_empty() {
                            stats.ended_by = "upstream";
                        }
                        if !end_to_client(&mut client_wr, &from_upstream, &mut stats, 1012, "upstream gone", send).await {
                            break;
                        }
                        close_to_client = true;
                        closing_until = Some(Instant::now() + settings.close_timeout);
                        continue;
                    }
                };
                upstream_heard = Instant::now();
                upstream_pinged = None;
                let seen = from_upstream.advance(&up_buf[..n]);
                stats.bytes_out += n as u64;
                stats.messages_out += seen.messages;
                published.catch_up(&stats, &counters, upstream_heard, false);
                if !write(&mut client_wr, &up_buf[..n], send).await {
                    stats.ended_by = "stalled";
                    break;
                }
                if let Some(code) = seen.close {
                    close_to_client = true;
                    stats.close_code.get_or_insert(code);
                    if stats.ended_by.is_empty() {
                        stats.ended_by = "upstream";
                    }
                    closing_until.get_or_insert(Instant::now() + settings.close_timeout);
                }
            }
            _ = &mut timer => {
                armed = None;
                let now = Instant::now();
                published.catch_up(&stats, &counters, now, true);
                if closing_until.is_some_and(|u| now >= u) {
                    break;
                }
                let lifetime_over = settings.max_lifetime.is_some_and(|l| now >= started + l);
                let client_idle = now >= client_heard + settings.idle_timeout;
                let mut upstream_silent = false;
                if let Some(hb) = watch_upstream.filter(|_| !lifetime_over && !client_idle) {
                    match upstream_pinged {
                        Some(at) => upstream_silent = now >= at + hb.timeout,
                        None if now >= upstream_heard + hb.interval => {
                            if from_client.at_boundary() {
                                upstream_pinged = Some(now);
                                // Bounded by the pong timeout: an upstream that cannot take
                                // six bytes is as silent as one that does not answer them.
                                let ping = control_frame(OP_PING, b"gw", mask());
                                upstream_silent = !write(&mut up_wr, &ping, hb.timeout.min(send)).await;
                            } else {
                                // Mid-frame toward the upstream: try again shortly.
                                upstream_heard += Duration::from_millis(50).min(hb.interval / 4);
                            }
                        }
                        None => {}
                    }
                }
                if upstream_silent {
                    // Pinged, and not a byte since: nothing more is read from or written to
                    // it (its TCP connection is closed at the end); the client is told to
                    // reconnect.
                    tracing::warn!(
                        quiet_ms = now.saturating_duration_since(upstream_heard).as_millis() as u64,
                        "websocket: upstream silent, closing its client with 1012"
                    );
                    upstream_gone = true;
                    stats.ended_by = "upstream_silent";
                    if !end_to_client(&mut client_wr, &from_upstream, &mut stats, 1012, "upstream silent", send).await {
                        break;
                    }
                    close_to_client = true;
                    closing_until = Some(now + settings.close_timeout);
                    continue;
                }
                let (code, why) = if lifetime_over {
                    (1001, "lifetime")
                } else if client_idle {
                    (1001, "idle")
                } else {
                    if !pinged && now >= client_heard + settings.idle_timeout / 2 {
                        if from_upstream.at_boundary() && !close_to_client {
                            pinged = true;
                            if !write(&mut client_wr, &control_frame(OP_PING, b"gw", None), send).await {
                                stats.ended_by = "stalled";
                                break;
                            }
                        } else {
                            // Mid-frame toward the client: try again shortly.
                            client_heard += Duration::from_millis(50).min(settings.idle_timeout / 4);
                        }
                    }
                    continue;
                };
                if close_to_client {
                    continue;
                }
                stats.ended_by = why;
                go_away(&mut client_wr, &mut up_wr, &from_client, &from_upstream, upstream_gone, &mut stats, code, why, send).await;
                close_to_client = true;
                closing_until = Some(now + settings.close_timeout);
            }
            _ = &mut stop, if !close_to_client => {
                stats.ended_by = "shutdown";
                go_away(&mut client_wr, &mut up_wr, &from_client, &from_upstream, upstream_gone, &mut stats, 1001, "going away", send).await;
                close_to_client = true;
                closing_until = Some(Instant::now() + settings.close_timeout);
            }
        }
    }
    published.catch_up(&stats, &counters, Instant::now(), true);
    let _ = tokio::time::timeout(Duration::from_millis(100), client_wr.shutdown()).await;
    let _ = tokio::time::timeout(Duration::from_millis(100), up_wr.shutdown()).await;
    stats
}

/// Writes `bytes` within `limit`; `false` when the peer is gone or stalled. A frame almost
/// always goes into the socket at once, and only a write that has to wait needs a deadline:
/// making one per frame (a clock read, the runtime's handle, a timer entry) cost more than
/// the rest of the frame's bookkeeping together.
async fn write_bounded<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8], limit: Duration) -> bool {
    let mut all = std::pin::pin!(w.write_all(bytes));
    match std::future::poll_fn(|cx| Poll::Ready(all.as_mut().poll(cx))).await {
        Poll::Ready(done) => done.is_ok(),
        Poll::Pending => matches!(tokio::time::timeout(limit, all).await, Ok(Ok(()))),
    }
}

/// How often, at most, the relay adds what it relayed to the shared counters while frames
/// flow (and once more at the end).
const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// What of a connection's [`RelayStats`] the counters have been given. Every connection of a
/// route adds to the same four counters: per frame, that is four atomic read-modify-writes on
/// cache lines every worker shares; in batches, a few a second.
struct Published {
    /// When the next batch is due (a comparison per frame, no clock arithmetic).
    due: Instant,
    bytes_in: u64,
    bytes_out: u64,
    messages_in: u64,
    messages_out: u64,
}

impl Published {
    fn new(now: Instant) -> Published {
        Published {
            due: now + PUBLISH_EVERY,
            bytes_in: 0,
            bytes_out: 0,
            messages_in: 0,
            messages_out: 0,
        }
    }

    /// Adds what the counters have not seen of `stats` yet, if a batch is due (`force`: now).
    fn catch_up(
        &mut self,
        stats: &RelayStats,
        counters: &RelayCounters,
        now: Instant,
        force: bool,
    ) {
        if !force && now < self.due {
            return;
        }
        self.due = now + PUBLISH_EVERY;
        let add = |counter: &metrics::Counter, total: u64, seen: &mut u64| {
            if total > *seen {
                counter.increment(total - *seen);
                *seen = total;
            }
        };
        add(&counters.bytes_in, stats.bytes_in, &mut self.bytes_in);
        add(&counters.bytes_out, stats.bytes_out, &mut self.bytes_out);
        add(
            &counters.messages_in,
            stats.messages_in,
            &mut self.messages_in,
        );
        add(
            &counters.messages_out,
            stats.messages_out,
            &mut self.messages_out,
        );
    }
}

/// Resolves once shutdown was requested (the watch guard is not held across awaits).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Sends the client a close frame with `code` when its stream is between frames (`false`:
/// it is not, or the write failed; the caller drops the connection).
async fn end_to_client<W: AsyncWrite + Unpin>(
    client: &mut W,
    toward_client: &FrameCursor,
    stats: &mut RelayStats,
    code: u16,
    why: &str,
    send: Duration,
) -> bool {
    if !toward_client.at_boundary() {
        return false;
    }
    stats.close_code.get_or_insert(code);
    matches!(
        tokio::time::timeout(send, client.write_all(&close_frame(code, why, None))).await,
        Ok(Ok(()))
    )
}

/// Closes both sides with `code` (the upstream's close masked, as from a client).
#[allow(clippy::too_many_arguments)]
async fn go_away<C: AsyncWrite + Unpin, U: AsyncWrite + Unpin>(
    client: &mut C,
    upstream: &mut U,
    from_client: &FrameCursor,
    from_upstream: &FrameCursor,
    upstream_gone: bool,
    stats: &mut RelayStats,
    code: u16,
    why: &str,
    send: Duration,
) {
    if !upstream_gone && from_client.at_boundary() {
        let _ =
            tokio::time::timeout(send, upstream.write_all(&close_frame(code, why, mask()))).await;
    }
    let _ = end_to_client(client, from_upstream, stats, code, why, send).await;
}

#[cfg(test)]
mod tests {
    //! The relay's own deadlines on tokio's paused clock, over in-memory pipes: what each end
    //! receives, frame by frame, and when.

    use super::*;
    use tokio::io::{duplex, DuplexStream};

    const OP_TEXT: u8 = 0x1;
    const OP_CLOSE: u8 = 0x8;
    const OP_PONG: u8 = 0xA;

    fn settings(upstream_ping: Option<UpstreamPing>) -> RelaySettings {
        RelaySettings {
            // Far away: only the upstream watch acts in these tests.
            idle_timeout: Duration::from_secs(3600),
            max_lifetime: None,
            close_timeout: Duration::from_secs(1),
            send_timeout: Duration::from_secs(30),
            upstream_ping,
        }
    }

    const WATCH: UpstreamPing = UpstreamPing {
        interval: Duration::from_secs(5),
        timeout: Duration::from_secs(5),
    };

    fn counters() -> RelayCounters {
        RelayCounters {
            bytes_in: metrics::Counter::noop(),
            bytes_out: metrics::Counter::noop(),
            messages_in: metrics::Counter::noop(),
            messages_out: metrics::Counter::noop(),
        }
    }

    /// The relay between two pipes; the test holds the client's and the upstream's ends.
    struct Running {
        client: DuplexStream,
        upstream: DuplexStream,
        shutdown: watch::Sender<bool>,
        relay: tokio::task::JoinHandle<RelayStats>,
    }

    fn start(settings: RelaySettings) -> Running {
        start_counting(settings, counters())
    }

    fn start_counting(settings: RelaySettings, counters: RelayCounters) -> Running {
        let (client, client_side) = duplex(64 * 1024);
        let (upstream, upstream_side) = duplex(64 * 1024);
        let (shutdown, rx) = watch::channel(false);
        let relay = tokio::spawn(relay(client_side, upstream_side, settings, rx, counters));
        Running {
            client,
            upstream,
            shutdown,
            relay,
        }
    }

    /// An unmasked frame, as the upstream sends.
    fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        control_frame(opcode, payload, None)
    }

    /// Reads one whole frame: (opcode, masked, unmasked payload); `None` at end of stream.
    async fn read_frame(rd: &mut DuplexStream) -> Option<(u8, bool, Vec<u8>)> {
        let mut head = [0u8; 2];
        rd.read_exact(&mut head).await.ok()?;
        let masked = head[1] & 0x80 != 0;
        let len = match head[1] & 0x7f {
            126 => u64::from(rd.read_u16().await.ok()?),
            127 => rd.read_u64().await.ok()?,
            n => u64::from(n),
        };
        let mut key = [0u8; 4];
        if masked {
            rd.read_exact(&mut key).await.ok()?;
        }
        let mut payload = vec![0u8; len as usize];
        rd.read_exact(&mut payload).await.ok()?;
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= if masked { key[i % 4] } else { 0 };
        }
        Some((head[0] & 0x0f, masked, payload))
    }

    /// Nothing arrives on `rd` for `wait`.
    async fn nothing_for(rd: &mut DuplexStream, wait: Duration) -> bool {
        let mut byte = [0u8; 1];
        tokio::time::timeout(wait, rd.read(&mut byte))
            .await
            .is_err()
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_upstream_is_pinged_then_its_client_closed_with_1012() {
        let mut r = start(settings(Some(WATCH)));
        r.upstream
            .write_all(&server_frame(OP_TEXT, b"tick"))
            .await
            .unwrap();
        assert_eq!(read_frame(&mut r.client).await.unwrap().2, b"tick");
        let last_tick = Instant::now();
        // After the interval the upstream gets a masked ping, as a client's frames must be;
        // it answers nothing (its connection stays open).
        let (op, masked, _) = read_frame(&mut r.upstream).await.expect("a ping");
        assert_eq!((op, masked), (OP_PING, true));
        let at = last_tick.elapsed();
        assert!(
            at >= WATCH.interval && at < WATCH.interval + Duration::from_millis(10),
            "{at:?}"
        );
        // After the pong timeout: the client is closed with 1012, "upstream silent".
        let (op, _, payload) = read_frame(&mut r.client).await.expect("a close");
        assert_eq!(op, OP_CLOSE);
        assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1012);
        assert_eq!(&payload[2..], b"upstream silent");
        let at = last_tick.elapsed();
        let bound = WATCH.interval + WATCH.timeout;
        assert!(
            at >= bound && at < bound + Duration::from_millis(10),
            "{at:?}"
        );
        // The client answers the close; the relay ends and drops the upstream connection
        // without writing to it again.
        r.client
            .write_all(&close_frame(1012, "", Some([1, 2, 3, 4])))
            .await
            .unwrap();
        let stats = r.relay.await.unwrap();
        assert_eq!(stats.ended_by, "upstream_silent");
        assert_eq!(stats.close_code, Some(1012));
        assert!(
            read_frame(&mut r.upstream).await.is_none(),
            "written to after silence"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_upstream_that_answers_its_pings_stays_and_a_ticking_one_is_not_pinged() {
        let mut r = start(settings(Some(WATCH)));
        // A quiet upstream that answers: pinged once per interval, never closed. Its pongs
        // reach the client (unsolicited pongs, which RFC 6455 allows).
        let quiet_since = Instant::now();
        for _ in 0..12 {
            let (op, _, payload) = read_frame(&mut r.upstream).await.expect("a ping");
            assert_eq!(op, OP_PING);
            r.upstream
                .write_all(&server_frame(OP_PONG, &payload))
                .await
                .unwrap();
            assert_eq!(read_frame(&mut r.client).await.unwrap().0, OP_PONG);
        }
        // One ping per 5 s of quiet (the timer rounds up to the millisecond).
        let took = quiet_since.elapsed();
        assert!(
            took >= WATCH.interval * 12 && took < WATCH.interval * 12 + Duration::from_millis(100),
            "{took:?}"
        );
        // An upstream that sends a frame every second is never pinged.
        for _ in 0..30 {
            r.upstream
                .write_all(&server_frame(OP_TEXT, b"tick"))
                .await
                .unwrap();
            assert_eq!(read_frame(&mut r.client).await.unwrap().0, OP_TEXT);
            assert!(nothing_for(&mut r.upstream, Duration::from_secs(1)).await);
        }
        assert!(!r.relay.is_finished());
        r.shutdown.send(true).unwrap();
        let (op, _, payload) = read_frame(&mut r.client).await.unwrap();
        assert_eq!((op, &payload[..2]), (OP_CLOSE, &1001u16.to_be_bytes()[..]));
    }

    #[tokio::test(start_paused = true)]
    async fn the_ping_waits_for_the_end_of_the_client_s_frame() {
        let mut r = start(settings(Some(WATCH)));
        // The client starts a 10-byte message and finishes it 7 s later: a ping in between
        // would corrupt the upstream's stream.
        let mask = [9, 9, 9, 9];
        let mut message = vec![0x80 | OP_TEXT, 0x80 | 10];
        message.extend_from_slice(&mask);
        message.extend(b"0123456789".iter().map(|b| b ^ 9));
        r.client.write_all(&message[..9]).await.unwrap();
        tokio::time::sleep(Duration::from_secs(7)).await;
        r.client.write_all(&message[9..]).await.unwrap();
        let (op, _, payload) = read_frame(&mut r.upstream).await.unwrap();
        assert_eq!((op, &payload[..]), (OP_TEXT, &b"0123456789"[..]));
        let (op, masked, _) = read_frame(&mut r.upstream)
            .await
            .expect("the ping, after it");
        assert_eq!((op, masked), (OP_PING, true));
        // Its pong keeps the connection.
        r.upstream
            .write_all(&server_frame(OP_PONG, b"gw"))
            .await
            .unwrap();
        assert_eq!(read_frame(&mut r.client).await.unwrap().0, OP_PONG);
        assert!(nothing_for(&mut r.client, Duration::from_secs(8)).await);
        assert!(!r.relay.is_finished());
    }

    #[tokio::test(start_paused = true)]
    async fn with_the_watch_off_a_silent_upstream_is_left_alone() {
        let mut r = start(settings(None));
        assert!(nothing_for(&mut r.upstream, Duration::from_secs(120)).await);
        assert!(nothing_for(&mut r.client, Duration::from_millis(1)).await);
        assert!(!r.relay.is_finished());
    }

    #[tokio::test(start_paused = true)]
    async fn counters_lag_the_frames_by_at_most_a_second_and_get_all_of_them_at_the_end() {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let messages = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let mut c = counters();
        c.messages_out = metrics::Counter::from_arc(messages.clone());
        c.bytes_out = metrics::Counter::from_arc(bytes.clone());
        let mut r = start_counting(settings(None), c);
        let tick = server_frame(OP_TEXT, b"tick");
        // Ten ticks a second for three seconds.
        for sent in 1..=30u64 {
            r.upstream.write_all(&tick).await.unwrap();
            assert_eq!(read_frame(&mut r.client).await.unwrap().2, b"tick");
            let counted = messages.load(Ordering::Relaxed);
            assert!(
                counted <= sent && counted + 11 >= sent,
                "{counted} counted after {sent} relayed"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Batched, not per frame: the count still lags the last frames.
        assert!(messages.load(Ordering::Relaxed) < 30);
        r.shutdown.send(true).unwrap();
        assert_eq!(read_frame(&mut r.client).await.unwrap().0, OP_CLOSE);
        let stats = r.relay.await.unwrap();
        assert_eq!(stats.messages_out, 30);
        assert_eq!(messages.load(Ordering::Relaxed), 30);
        assert_eq!(bytes.load(Ordering::Relaxed), 30 * tick.len() as u64);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_dropped_after_the_send_timeout() {
        let mut r = start(settings(None));
        let started = Instant::now();
        // The client reads nothing: its pipe (64 KiB) fills, then the relay's write waits.
        let frame = server_frame(OP_TEXT, &[b'x'; 100]);
        for _ in 0..2_000 {
            let sent =
                tokio::time::timeout(Duration::from_millis(10), r.upstream.write_all(&frame)).await;
            if sent.is_err() {
                break;
            }
        }
        let send = settings(None).send_timeout;
        let stats = tokio::time::timeout(send * 2, r.relay)
            .await
            .expect("a stalled client must not hold the relay")
            .unwrap();
        assert_eq!(stats.ended_by, "stalled");
        let took = started.elapsed();
        assert!(
            took >= send && took < send + Duration::from_secs(1),
            "{took:?}"
        );
    }
}
