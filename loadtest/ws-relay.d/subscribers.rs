//! The subscribers of `loadtest/ws-relay`: N WebSocket connections to the socket service's
//! `/ws` (directly or through a relay), each subscribed to one product, held for a while and
//! closed. Cheap on purpose (a current-thread runtime; a tick is found by a substring, not
//! parsed), so the load generator's own queueing stays small next to what is measured.
//!
//!   ws-subscribers URL N DURATION_S
//!
//! Subscriber i subscribes to product i mod 3 (NIFTY, BANKNIFTY, FINNIFTY). They are opened
//! ONE AT A TIME (each waits for its `subscribed` acknowledgement), so the relay's upstream
//! connections open in the same order as its client connections: `ws_trace.py` pairs the two
//! legs of each tick by that order. After the last one is open, WARMUP seconds (2) pass before
//! the measured window, which ends DURATION_S seconds after the last open.
//!
//! Environment: WARMUP (2), RELAY_PID (a process whose CPU time over the measured window is
//! reported, with the ticks received in the same window: CPU per relayed frame).
//!
//! Prints one JSON object: subscribed, refused, ticks (measured window), unexpected closes
//! (the server side closed before our close), errors, clean closes (our close answered within
//! 5 s), the receive latency (receive wall clock - the tick's `emitted_ms`, whole ms at both
//! ends: what a subscriber sees, load generator included), the relay's CPU and our own.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const PRODUCTS: [&str; 3] = ["NIFTY", "BANKNIFTY", "FINNIFTY"];

/// How one subscriber's hold went.
#[derive(Default)]
struct Held {
    /// Ticks received inside the measured window.
    ticks: u64,
    /// Receive latency of each of them, ms.
    latency_ms: Vec<i64>,
    /// The server side closed (or the stream ended) before our close.
    unexpected_close: bool,
    /// A read or write error before our close.
    error: bool,
    /// Our close was answered with a close.
    clean_close: bool,
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `emitted_ms` of a tick message, without parsing the JSON.
fn emitted_ms(text: &str) -> Option<i64> {
    if !text.starts_with("{\"type\":\"tick\"") {
        return None;
    }
    let at = text.find("\"emitted_ms\":")? + "\"emitted_ms\":".len();
    let digits: &str = &text[at..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// CPU seconds (user + system) `pid` has used so far.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf only reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / hz)
}

/// CPU seconds this process has used (user + system).
fn own_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

async fn open(url: &str, product: &str) -> Result<Ws, String> {
    let config = WebSocketConfig::default().read_buffer_size(4 * 1024);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true)
        .await
        .map_err(|e| e.to_string())?;
    let command = format!("{{\"action\":\"subscribe\",\"products\":[\"{product}\"]}}");
    ws.send(Message::text(command))
        .await
        .map_err(|e| e.to_string())?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.starts_with("{\"type\":\"subscribed\"") => {
                return Ok(ws)
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("closed before the acknowledgement".into()),
        }
    }
}

/// The measured window (from, until), once every subscriber is open.
type Window = watch::Receiver<Option<(Instant, Instant)>>;

/// Reads from the moment the subscriber is open (a subscriber that stopped reading while the
/// others open would fill its socket and, silent, be pinged and closed by the gateway), and
/// counts what arrives inside the window.
async fn hold(mut ws: Ws, mut window: Window) -> Held {
    let mut held = Held::default();
    let mut from = None;
    // Far away until the window is known.
    let deadline = tokio::time::sleep(Duration::from_secs(86_400));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            changed = window.changed(), if from.is_none() => {
                if changed.is_err() {
                    break;
                }
                if let Some((start, until)) = *window.borrow_and_update() {
                    from = Some(start);
                    deadline.as_mut().reset(until);
                }
            }
            _ = &mut deadline => break,
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    if let Some(emitted) = emitted_ms(&t) {
                        if from.is_some_and(|from| Instant::now() >= from) {
                            held.ticks += 1;
                            held.latency_ms.push(unix_ms() - emitted);
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None => {
                    held.unexpected_close = true;
                    return held;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) => {
                    held.error = true;
                    return held;
                }
            }
        }
    }
    if ws.close(None).await.is_err() {
        held.error = true;
        return held;
    }
    let reply = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(m) = ws.next().await {
            if matches!(m, Ok(Message::Close(_)) | Err(_)) {
                break;
            }
        }
    });
    held.clean_close = reply.await.is_ok();
    held
}

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: ws-subscribers URL N DURATION_S";
    let url = args.next().expect(usage);
    let n: usize = args.next().and_then(|a| a.parse().ok()).expect(usage);
    let duration: u64 = args.next().and_then(|a| a.parse().ok()).expect(usage);
    let warmup: u64 = std::env::var("WARMUP")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(2);
    let relay_pid: Option<u32> = std::env::var("RELAY_PID").ok().and_then(|p| p.parse().ok());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let opening = Instant::now();
        let (set_window, window) = watch::channel(None);
        let mut tasks = Vec::with_capacity(n);
        let mut refused = 0usize;
        let mut first_refusal = None;
        for i in 0..n {
            let product = PRODUCTS[i % PRODUCTS.len()];
            match tokio::time::timeout(Duration::from_secs(10), open(&url, product)).await {
                Ok(Ok(ws)) => tasks.push(tokio::spawn(hold(ws, window.clone()))),
                Ok(Err(e)) => {
                    refused += 1;
                    first_refusal.get_or_insert(e);
                }
                Err(_) => {
                    refused += 1;
                    first_refusal.get_or_insert_with(|| "open timed out".into());
                }
            }
        }
        let open_s = opening.elapsed().as_secs_f64();
        let subscribed = tasks.len();
        eprintln!("[ws-subscribers] {subscribed} open in {open_s:.1} s, {refused} refused");
        let from = Instant::now() + Duration::from_secs(warmup);
        let until = from + Duration::from_secs(duration);
        let _ = set_window.send(Some((from, until)));
        // The relay's CPU over exactly the measured window.
        let cpu = tokio::spawn(async move {
            let pid = relay_pid?;
            tokio::time::sleep_until(from).await;
            let before = cpu_seconds(pid)?;
            tokio::time::sleep_until(until).await;
            Some(cpu_seconds(pid)? - before)
        });
        let mut all = Held::default();
        let (mut unexpected, mut errors, mut clean) = (0, 0, 0);
        for t in tasks {
            let Ok(h) = t.await else {
                errors += 1;
                continue;
            };
            all.ticks += h.ticks;
            all.latency_ms.extend(h.latency_ms);
            unexpected += usize::from(h.unexpected_close);
            errors += usize::from(h.error);
            clean += usize::from(h.clean_close);
        }
        let relay_cpu_s = cpu.await.ok().flatten();
        all.latency_ms.sort_unstable();
        let pick = |q: f64| -> i64 {
            let l = &all.latency_ms;
            if l.is_empty() {
                return -1;
            }
            l[((q * l.len() as f64) as usize).min(l.len() - 1)]
        };
        let cpu_us_per_frame = relay_cpu_s
            .filter(|_| all.ticks > 0)
            .map(|s| s * 1e6 / all.ticks as f64);
        println!(
            "{{\"subscribed\":{subscribed},\"refused\":{refused},\"first_refusal\":{},\
             \"open_s\":{open_s:.2},\"window_s\":{duration},\"ticks\":{},\
             \"unexpected_closes\":{unexpected},\"errors\":{errors},\"clean_closes\":{clean},\
             \"latency_ms\":{{\"p50\":{},\"p90\":{},\"p99\":{},\"max\":{}}},\
             \"relay_cpu_s\":{},\"relay_cpu_us_per_frame\":{},\"self_cpu_s\":{:.3}}}",
            first_refusal.map_or("null".into(), |e: String| format!("{e:?}")),
            all.ticks,
            pick(0.5),
            pick(0.9),
            pick(0.99),
            all.latency_ms.last().copied().unwrap_or(-1),
            relay_cpu_s.map_or("null".into(), |s| format!("{s:.3}")),
            cpu_us_per_frame.map_or("null".into(), |s| format!("{s:.2}")),
            own_cpu_seconds(),
        );
    });
}
