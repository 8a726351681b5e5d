//! The reference WebSocket relay for `loadtest/ws-relay`: the bare tokio-tungstenite relay of
//! the same frames, what any tokio WebSocket proxy pays before it does anything of its own.
//! No limits, no idle or silence watch, no metrics, no logs. NOT a product.
//!
//!   ws-ref-relay LISTEN_ADDR UPSTREAM_URL        (e.g. 127.0.0.1:9000 ws://127.0.0.1:8003/ws)
//!
//! `WORKERS` (1): tokio worker threads; 1 is a current-thread runtime, as the benchmark pins
//! the relay under test to one core. Each client connection gets one task that opens its own
//! upstream connection and then relays messages both ways, decoded and re-encoded by
//! tungstenite, one write (send = feed + flush) per message. Pings are answered by
//! tungstenite on each side and not forwarded; a close from either side is passed on and
//! ends the pair.

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// Read buffer per socket: the gateway's relay reads into 4 KiB too (ticks are ~150 bytes).
const READ_BUFFER: usize = 4 * 1024;

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: ws-ref-relay LISTEN_ADDR UPSTREAM_URL";
    let listen: SocketAddr = args.next().and_then(|a| a.parse().ok()).expect(usage);
    let upstream: String = args.next().expect(usage);
    let workers: usize = std::env::var("WORKERS")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(1);
    let rt = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
    .expect("runtime");
    rt.block_on(async move {
        let listener = TcpListener::bind(listen).await.expect("bind");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(relay_pair(stream, upstream.clone()));
        }
    });
}

fn config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(READ_BUFFER)
}

/// One client and its own upstream connection, until either side closes or fails.
async fn relay_pair(stream: TcpStream, upstream: String) {
    let Ok(client) = tokio_tungstenite::accept_async_with_config(stream, Some(config())).await
    else {
        return;
    };
    let Ok((up, _)) =
        tokio_tungstenite::connect_async_with_config(upstream.as_str(), Some(config()), true).await
    else {
        return;
    };
    let (mut client_tx, mut client_rx) = client.split();
    let (mut up_tx, mut up_rx) = up.split();
    loop {
        tokio::select! {
            m = up_rx.next() => match m {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(m)) => {
                    let close = m.is_close();
                    if client_tx.send(m).await.is_err() || close {
                        break;
                    }
                }
                _ => break,
            },
            m = client_rx.next() => match m {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(m)) => {
                    let close = m.is_close();
                    if up_tx.send(m).await.is_err() || close {
                        // The upstream's close reply is not waited for: the client has its
                        // reply from tungstenite already.
                        break;
                    }
                }
                _ => break,
            },
        }
    }
    let _ = client_tx.close().await;
    let _ = up_tx.close().await;
}
