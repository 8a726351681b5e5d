//! Relaying one WebSocket connection between a client and an upstream instance, after the
//! handshake (`routes/websocket.rs`) let it through.
//!
//! Bytes are passed on as they arrive, never gathered into whole messages: the relay only
//! follows the frame boundaries (`frame.rs`) in each direction, which tells it how many
//! messages went by, what close code ended the connection, and where it may insert a frame of
//! its own. Its own frames: a ping to a client that has been silent for half the idle timeout;
//! a close to the client when the upstream goes away (1012, "service restart": try again) or
//! the gateway shuts down or the client idles out (1001, going away); a close to the upstream
//! (masked, as a client's) when the client goes away. A close handshake gets `close_timeout`
//! to complete; then both connections are dropped. A side that is cut off mid-frame cannot be
//! closed cleanly: its TCP connection is closed instead.
//!
//! - this file: [`relay`], the two directions, idleness, the close handshake and the
//!   metrics; start reading there.
//! - `frame`: following frame boundaries through a byte stream (no buffering), and the
//!   close and ping frames the relay writes itself.

pub(crate) mod frame;

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
}

/// Counters the relay adds to as bytes and messages pass (handles registered once per
/// connection by the caller).
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
    /// Who ended it: `client`, `upstream`, `idle`, `lifetime`, `shutdown`, `stalled`.
    pub ended_by: &'static str,
}

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
    let mut upstream_gone = false;
    // The close handshake with the client: each direction done once a close went that way.
    let mut close_to_client = false;
    let mut close_from_client = false;
    let mut closing_until: Option<Instant> = None;
    let send = settings.send_timeout;

    /// Writes `bytes`, bounded by the send timeout; `false` when the peer is gone or stalled.
    async fn write<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8], limit: Duration) -> bool {
        matches!(
            tokio::time::timeout(limit, w.write_all(bytes)).await,
            Ok(Ok(()))
        )
    }

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
                counters.bytes_in.increment(n as u64);
                counters.messages_in.increment(seen.messages);
                if !upstream_gone && !write(&mut up_wr, &client_buf[..n], send).await {
                    upstream_gone = true;
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
                let seen = from_upstream.advance(&up_buf[..n]);
                stats.bytes_out += n as u64;
                stats.messages_out += seen.messages;
                counters.bytes_out.increment(n as u64);
                counters.messages_out.increment(seen.messages);
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
            _ = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                if closing_until.is_some_and(|u| now >= u) {
                    break;
                }
                let (code, why) = if settings.max_lifetime.is_some_and(|l| now >= started + l) {
                    (1001, "lifetime")
                } else if now >= client_heard + settings.idle_timeout {
                    (1001, "idle")
                } else {
                    if !pinged && from_upstream.at_boundary() && !close_to_client {
                        pinged = true;
                        if !write(&mut client_wr, &control_frame(OP_PING, b"gw", None), send).await {
                            stats.ended_by = "stalled";
                            break;
                        }
                    } else if !pinged {
                        // Mid-frame toward the client: try again shortly.
                        client_heard += Duration::from_millis(50).min(settings.idle_timeout / 4);
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
            _ = stopped(&mut shutdown), if !close_to_client => {
                stats.ended_by = "shutdown";
                go_away(&mut client_wr, &mut up_wr, &from_client, &from_upstream, upstream_gone, &mut stats, 1001, "going away", send).await;
                close_to_client = true;
                closing_until = Some(Instant::now() + settings.close_timeout);
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_millis(100), client_wr.shutdown()).await;
    let _ = tokio::time::timeout(Duration::from_millis(100), up_wr.shutdown()).await;
    stats
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
