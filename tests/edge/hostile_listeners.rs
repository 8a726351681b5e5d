//! Every listener under hostile clients, over real sockets (issue 23, items 4, 5, 10, 12).
//!
//! Attack list (finding -> class -> test):
//! - the redirect and admin listeners had no connection cap and no timeouts (6,000 idle
//!   connections held 75 s) -> every listener gets the same guards (its own cap with
//!   shedding, header-read and idle timeouts) ->
//!   `every_listener_closes_silent_and_half_sent_connections`,
//!   `each_listener_has_its_own_cap_and_sheds_idle_connections`;
//! - with the fd limit at 1,024, idle connections to the redirect listener made the TLS port
//!   fail with EMFILE -> the listeners' caps are fitted under the descriptor limit, each its
//!   own share -> `with_a_low_fd_limit_idle_connections_to_one_listener_starve_no_other`;
//! - a half-sent request on the admin port blocked SIGTERM for ever -> shutdown has one hard
//!   deadline whatever is open -> `sigterm_exits_within_the_grace_whatever_is_open`;
//! - HTTP/2 connections that only PING held connection slots for ever -> a connection with no
//!   stream at work is idle whatever control frames it sends, and PING / SETTINGS floods are
//!   bounded per connection -> `http2_connections_that_only_ping_are_shed_at_the_cap`,
//!   `an_http2_connection_that_only_pings_is_closed_after_idle_timeout`,
//!   `ping_and_settings_floods_are_cut_off`;
//! - `X-Forwarded-Proto` was `http` for requests over TLS -> the scheme comes from the
//!   connection -> `x_forwarded_proto_is_the_connections_scheme`;
//! - the redirect listener copied an unchecked `Host` into `Location` -> only a valid
//!   host[:port] (or the configured name) is written, anything else is 400 ->
//!   `the_redirect_listener_writes_only_valid_hosts`; HSTS on TLS responses only ->
//!   `hsts_is_sent_over_tls_only`.

use crate::support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use deltastream_gateway::config::{Config, Dur, HstsConfig, RedirectConfig, TlsConfig};
use deltastream_gateway::server::Running;
use support::gateway::{client, config_with_upstreams, scrape, spawn};
use support::process::{serve_command, GatewayProcess, BINARY};
use support::raw::{closed_within, exchange};
use support::tls::Ca;
use support::{FakeUpstream, Step};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn cfg_for(up: &FakeUpstream) -> Config {
    let u = up.url();
    config_with_upstreams(move |_| u.clone())
}

/// `cfg` with TLS from a fresh CA's leaf and, optionally, the redirect listener on a free port.
fn with_tls(mut cfg: Config, ca: &Ca, dir: &std::path::Path, redirect: bool) -> Config {
    let (cert, key) = ca.leaf_files(dir);
    cfg.server.tls = Some(TlsConfig {
        cert_file: cert.display().to_string(),
        key_file: key.display().to_string(),
        min_version: "1.2".into(),
        hsts: None,
    });
    if redirect {
        cfg.server.host = "127.0.0.1".parse().unwrap();
        cfg.server.redirect_http = Some(RedirectConfig {
            port: 0,
            host: None,
            max_connections: 1024,
        });
    }
    cfg
}

async fn status(c: &reqwest::Client, url: String) -> Option<u16> {
    let r = c.get(url).timeout(Duration::from_secs(8)).send().await;
    r.ok().map(|r| r.status().as_u16())
}

// --- HTTP/2 frames by hand -----------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];

fn ping(n: u64) -> Vec<u8> {
    let mut f = vec![0, 0, 8, 6, 0, 0, 0, 0, 0];
    f.extend_from_slice(&n.to_be_bytes());
    f
}

/// An HTTP/2 client that has sent its preface and SETTINGS and nothing else.
async fn h2_open(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(PREFACE).await.unwrap();
    s.write_all(&SETTINGS).await.unwrap();
    s
}

/// (frame type, flags) of every complete frame in `data`.
fn frames(data: &[u8]) -> Vec<(u8, u8)> {
    let mut out = Vec::new();
    let mut at = 0;
    while data.len() >= at + 9 {
        let len = u32::from_be_bytes([0, data[at], data[at + 1], data[at + 2]]) as usize;
        out.push((data[at + 3], data[at + 4]));
        at += 9 + len;
    }
    out
}

/// Keeps `s` busy with a PING every `every` (reading whatever comes back) until the server
/// closes it or `limit` passes; returns how long it stayed open.
async fn ping_until_closed(s: TcpStream, every: Duration, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        for n in 0u64.. {
            if wr.write_all(&ping(n)).await.is_err() || started.elapsed() > limit {
                return;
            }
            tokio::time::sleep(every).await;
        }
    });
    let mut buf = [0u8; 4096];
    let closed = loop {
        let left = limit.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, rd.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break Some(started.elapsed()),
            Ok(Ok(_)) => {}
            Err(_) => break None,
        }
    };
    writer.abort();
    closed
}

// --- Item 4: the same guards on every listener ---------------------------------------------

#[tokio::test]
async fn every_listener_closes_silent_and_half_sent_connections() {
    let up = FakeUpstream::ok().await;
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = with_tls(cfg_for(&up), &ca, dir.path(), true);
    cfg.limits.header_read_timeout = Dur::from_millis(500);
    cfg.limits.idle_timeout = Dur::from_secs(1);
    let gw = spawn(cfg).await;
    let redirect = gw.redirect_addr.unwrap();
    for (name, addr) in [("admin", gw.admin_addr), ("redirect", redirect)] {
        // Connects and says nothing.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        // The audit's reproduction: a head without its final CRLF.
        let mut half = TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        // An HTTP/2 connection that opens and idles.
        let mut h2 = h2_open(addr).await;
        let started = Instant::now();
        for s in [&mut silent, &mut half, &mut h2] {
            assert!(
                closed_within(s, Duration::from_secs(6)).await,
                "{name}: an idle or half-sent connection stayed open"
            );
        }
        assert!(started.elapsed() >= Duration::from_millis(400), "{name}");
    }
    // Both still answer.
    let r = client()
        .get(format!("http://{}/metrics", gw.admin_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client()
        .get(format!("http://{redirect}/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
}

#[tokio::test]
async fn each_listener_has_its_own_cap_and_sheds_idle_connections() {
    let up = FakeUpstream::ok().await;
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = with_tls(cfg_for(&up), &ca, dir.path(), true);
    // Long timeouts: only the caps (and shedding at them) are at work here.
    cfg.limits.header_read_timeout = Dur::from_secs(30);
    cfg.limits.idle_timeout = Dur::from_secs(60);
    cfg.limits.max_connections = 4;
    cfg.admin.max_connections = 4;
    if let Some(r) = cfg.server.redirect_http.as_mut() {
        r.max_connections = 4;
    }
    let gw = spawn(cfg).await;
    let redirect = gw.redirect_addr.unwrap();
    // A new client (so a new connection) for every check.
    let https = || ca.client(false);
    let health = format!("https://127.0.0.1:{}/health", gw.addr.port());
    let metrics = format!("http://{}/metrics", gw.admin_addr);
    // Silent sockets twice over the admin and redirect caps: the public listener is not
    // affected at all (its own slots), and each flooded listener still serves within the
    // shedding bound.
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(TcpStream::connect(gw.admin_addr).await.unwrap());
        idle.push(TcpStream::connect(redirect).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    assert_eq!(status(&https(), health.clone()).await, Some(200));
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "the public listener waited for the others' idle connections: {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    assert_eq!(status(&client(), metrics.clone()).await, Some(200));
    let r = client()
        .get(format!("http://{redirect}/"))
        .timeout(Duration::from_secs(8))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    assert!(started.elapsed() < Duration::from_secs(8));
    // A capped listener holds at most its cap: the admin and redirect sockets beyond it wait
    // in the kernel's queue, unaccepted, and are not closed by the header-read timeout of a
    // connection that was never accepted. The shed ones were closed gracefully (EOF).
    let mut closed = 0;
    for s in idle.iter_mut() {
        if closed_within(s, Duration::from_millis(50)).await {
            closed += 1;
        }
    }
    assert!(closed >= 4, "only {closed} idle sockets were shed");
    drop(idle);
    // And the other way round: the public listener full of idle TLS-less sockets does not
    // delay the operator's scrape.
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    assert_eq!(status(&client(), metrics).await, Some(200));
    assert!(started.elapsed() < Duration::from_millis(900));
    assert_eq!(status(&https(), health).await, Some(200));
}

// --- Item 4 against the binary: descriptors and the shutdown deadline ----------------------

/// The binary with `toml` (the upstreams appended) and at most `nofile` descriptors (soft
/// and hard, so the gateway cannot raise it); `dir` holds the files it reads.
fn start_binary(
    toml: &str,
    upstream: &str,
    nofile: Option<u64>,
    dir: tempfile::TempDir,
) -> GatewayProcess {
    let path = dir.path().join("gateway.toml");
    let text = format!(
        "{toml}\n[upstreams.auth]\nurl = \"{upstream}\"\n[upstreams.storage]\nurl = \"{upstream}\"\n\
         [upstreams.analytics]\nurl = \"{upstream}\"\n[upstreams.socket]\nurl = \"{upstream}\"\n"
    );
    std::fs::write(&path, text).unwrap();
    let mut cmd = serve_command(BINARY, &path);
    if let Some(n) = nofile {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe and only reads the struct passed.
        unsafe {
            cmd.pre_exec(move || {
                let lim = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    GatewayProcess::start(cmd).keeping(dir)
}

fn tls_toml(dir: &std::path::Path, ca: &Ca, extra: &str) -> String {
    let (cert, key) = ca.leaf_files(dir);
    format!(
        r#"
[server]
host = "127.0.0.1"
port = 0
shutdown_grace = "1s"
[server.tls]
cert_file = "{}"
key_file = "{}"
[server.redirect_http]
port = 0
[admin]
host = "127.0.0.1"
port = 0
[limits]
header_read_timeout = "60s"
idle_timeout = "60s"
{extra}
"#,
        cert.display(),
        key.display()
    )
}

/// Opens `n` connections to `addr` (each within 300 ms; the ones the kernel's accept queue
/// cannot take are given up).
async fn open_many(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut out = Vec::new();
    for _ in 0..n {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await
        {
            out.push(s);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_low_fd_limit_idle_connections_to_one_listener_starve_no_other() {
    let up = FakeUpstream::ok().await;
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let toml = tls_toml(dir.path(), &ca, "");
    let gw = start_binary(&toml, &up.url(), Some(256), dir);
    // A new client (so a new connection) for every check.
    let https = || ca.client(false);
    let health = format!("https://127.0.0.1:{}/health", gw.addr.port());
    let metrics = format!("http://{}/metrics", gw.admin);
    let redirect = gw
        .redirect
        .expect("the redirect listener's address is logged");
    assert_eq!(status(&https(), health.clone()).await, Some(200));
    // More idle connections than the process has descriptors, to each listener in turn: the
    // other listeners keep answering at once.
    for (name, flooded) in [("redirect", redirect), ("admin", gw.admin)] {
        let idle = open_many(flooded, 450).await;
        // Well past what the process has (256): without the caps, EMFILE everywhere.
        assert!(idle.len() >= 250, "{name}: only {} connected", idle.len());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        assert_eq!(
            status(&https(), health.clone()).await,
            Some(200),
            "TLS port with {name} flooded:\n{}",
            gw.log_text()
        );
        let other = if name == "redirect" {
            metrics.clone()
        } else {
            format!("http://{redirect}/")
        };
        let got = status(&client(), other).await;
        assert!(
            matches!(got, Some(200 | 308)),
            "with {name} flooded: {got:?}"
        );
        eprintln!(
            "{} idle connections to {name}: the TLS port and the other listener answered in {:?}",
            idle.len(),
            started.elapsed()
        );
        // Once the flood is gone, the flooded listener serves again.
        drop(idle);
        let r = client()
            .get(format!("http://{flooded}/metrics"))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map(|r| r.status().as_u16());
        assert!(
            matches!(r, Ok(200 | 308)),
            "{name} after the flood: {r:?}\n{}",
            gw.log_text()
        );
    }
    let log = gw.log_text();
    assert!(
        !log.contains("Too many open files"),
        "a listener ran out of descriptors:\n{log}"
    );
    assert!(
        log.contains("lowered") && log.contains("open-file limit"),
        "the fitted caps are not logged:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_within_the_grace_whatever_is_open() {
    let hang = FakeUpstream::builder().then(Step::Hang).start().await;
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let toml = tls_toml(dir.path(), &ca, "");
    let mut gw = start_binary(&toml, &hang.url(), None, dir);
    let redirect = gw.redirect.unwrap();
    // The audit's reproduction on the admin port, and the same on every other listener.
    let mut held = Vec::new();
    for addr in [gw.admin, redirect, gw.addr] {
        held.push(TcpStream::connect(addr).await.unwrap());
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        held.push(s);
        held.push(h2_open(addr).await);
    }
    // A request in flight on a hung upstream, over TLS.
    let https = ca.client(true);
    let url = format!("https://127.0.0.1:{}/api/data/products", gw.addr.port());
    let in_flight = tokio::spawn(async move { https.get(url).send().await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    // SAFETY: kill only sends a signal to our own child.
    unsafe {
        libc::kill(gw.child.id() as i32, libc::SIGTERM);
    }
    let deadline = started + Duration::from_secs(10);
    let exited = loop {
        if let Some(status) = gw.child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = started.elapsed();
    let status = exited.unwrap_or_else(|| {
        panic!(
            "still running 10 s after SIGTERM (shutdown_grace 1s):\n{}",
            gw.log_text()
        )
    });
    assert!(status.success(), "{status:?}\n{}", gw.log_text());
    // The grace (1 s) plus the one-second hard stop, with room for a busy machine.
    assert!(took < Duration::from_secs(5), "exited after {took:?}");
    eprintln!("exited {took:?} after SIGTERM (shutdown_grace 1s)");
    let _ = in_flight.await;
    drop(held);
}

// --- Item 5: HTTP/2 control frames are not work --------------------------------------------

#[tokio::test]
async fn http2_connections_that_only_ping_are_shed_at_the_cap() {
    let up = FakeUpstream::ok().await;
    let mut cfg = cfg_for(&up);
    cfg.limits.max_connections = 4;
    cfg.limits.header_read_timeout = Dur::from_secs(30);
    cfg.limits.idle_timeout = Dur::from_secs(60);
    let gw = spawn(cfg).await;
    // Twice the cap of HTTP/2 connections that PING every 200 ms and read every answer.
    let mut pingers = Vec::new();
    for _ in 0..8 {
        let s = h2_open(gw.addr).await;
        pingers.push(tokio::spawn(ping_until_closed(
            s,
            Duration::from_millis(200),
            Duration::from_secs(20),
        )));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let got = status(&client(), format!("{}/health", gw.url())).await;
    assert_eq!(got, Some(200), "/health blocked by PING-only connections");
    eprintln!(
        "/health behind 8 PING-only connections, cap 4: {:?}",
        started.elapsed()
    );
    // Two rounds of shedding (1 s of idleness each) at most, with room for a busy machine.
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    for p in pingers {
        p.abort();
    }
}

#[tokio::test]
async fn an_http2_connection_that_only_pings_is_closed_after_idle_timeout() {
    let up = FakeUpstream::ok().await;
    let mut cfg = cfg_for(&up);
    cfg.limits.idle_timeout = Dur::from_secs(1);
    cfg.limits.header_read_timeout = Dur::from_secs(30);
    let gw = spawn(cfg).await;
    let s = h2_open(gw.addr).await;
    let open_for = ping_until_closed(s, Duration::from_millis(200), Duration::from_secs(8))
        .await
        .expect("a PING-only HTTP/2 connection stayed open");
    assert!(open_for >= Duration::from_millis(800), "{open_for:?}");
    // A connection doing real work is not idle: 12 requests over ~2.4 s, one connection.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for _ in 0..12 {
        let r = h2
            .get(format!("{}/api/data/products", gw.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(up.connections(), 1, "the busy HTTP/2 connection was cut");
}

#[tokio::test]
async fn ping_and_settings_floods_are_cut_off() {
    let up = FakeUpstream::ok().await;
    let gw = spawn(cfg_for(&up)).await;
    for (what, frame, ack_type) in [("PING", ping(7), 6u8), ("SETTINGS", SETTINGS.to_vec(), 4)] {
        let (mut rd, mut wr) = h2_open(gw.addr).await.into_split();
        let flood: Vec<u8> = (0..1_000).flat_map(|_| frame.clone()).collect();
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(&flood).await;
            // Held open: only the server may end the connection.
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let mut data = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        let started = Instant::now();
        let closed = loop {
            let left = Duration::from_secs(8).saturating_sub(started.elapsed());
            match tokio::time::timeout(left, rd.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(n)) => data.extend_from_slice(&buf[..n]),
                Err(_) => break false,
            }
        };
        writer.abort();
        let acks = frames(&data)
            .iter()
            .filter(|(t, f)| *t == ack_type && f & 1 == 1)
            .count();
        assert!(closed, "a {what} flood kept its connection ({acks} acks)");
        assert!(acks < 1_000, "every {what} of the flood was answered");
    }
    let text = scrape(gw.admin_addr).await;
    let line = text
        .lines()
        .find(|l| l.starts_with("gateway_connections_closed_total{reason=\"h2_control_flood\"}"))
        .unwrap_or_else(|| panic!("no flood counter:\n{text}"));
    let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 2.0, "{line}");
    // Ordinary HTTP/2 still works.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2.get(format!("{}/health", gw.url())).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

// --- Item 10: X-Forwarded-Proto --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_proto_is_the_connections_scheme() {
    let up = FakeUpstream::ok().await;
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = with_tls(cfg_for(&up), &ca, dir.path(), false);
    cfg.trusted_proxies = vec![];
    let gw = spawn(cfg).await;
    let url = format!(
        "https://127.0.0.1:{}/api/data/underlying/NIFTY",
        gw.addr.port()
    );
    for http2 in [false, true] {
        let r = ca
            .client(http2)
            .get(&url)
            .header("x-forwarded-proto", "http")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let want = if http2 {
            reqwest::Version::HTTP_2
        } else {
            reqwest::Version::HTTP_11
        };
        assert_eq!(r.version(), want);
        let seen = up.last_request().unwrap();
        let protos: Vec<_> = seen.headers.get_all("x-forwarded-proto").iter().collect();
        assert_eq!(protos, ["https"], "over TLS, {want:?}");
    }
    // (Not a cached route: every request reaches the upstream.)
    // A trusted proxy's own claim stands; without one, the connection's scheme.
    let mut cfg = with_tls(cfg_for(&up), &ca, dir.path(), false);
    cfg.trusted_proxies = vec!["127.0.0.1/32".into()];
    let trusted = spawn(cfg).await;
    let url = format!(
        "https://127.0.0.1:{}/api/data/underlying/NIFTY",
        trusted.addr.port()
    );
    let c = ca.client(false);
    c.get(&url).send().await.unwrap();
    assert_eq!(
        up.last_request().unwrap().headers["x-forwarded-proto"],
        "https"
    );
    c.get(&url)
        .header("x-forwarded-proto", "http")
        .send()
        .await
        .unwrap();
    assert_eq!(
        up.last_request().unwrap().headers["x-forwarded-proto"],
        "http"
    );
    // Plain HTTP: http, whatever the client says.
    let plain = spawn(cfg_for(&up)).await;
    client()
        .get(format!("{}/api/data/underlying/NIFTY", plain.url()))
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    assert_eq!(
        up.last_request().unwrap().headers["x-forwarded-proto"],
        "http"
    );
}

// --- Item 12: the redirect's Host, HSTS ----------------------------------------------------

async fn redirect_of(gw: &Running, head: &str) -> support::raw::RawResponse {
    let req = format!("{head}\r\n\r\n");
    exchange(gw.redirect_addr.unwrap(), req.as_bytes())
        .await
        .into_iter()
        .next()
        .expect("an answer")
}

#[tokio::test]
async fn the_redirect_listener_writes_only_valid_hosts() {
    let up = FakeUpstream::ok().await;
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let cfg = with_tls(cfg_for(&up), &ca, dir.path(), true);
    let gw = spawn(cfg.clone()).await;
    let port = gw.addr.port();
    // A valid name (its port is the redirect listener's, replaced by the TLS port).
    let r = redirect_of(&gw, "GET /api/x?a=1 HTTP/1.1\r\nHost: gw.example:8080").await;
    assert_eq!(r.status, 308);
    assert_eq!(
        r.header("location").unwrap(),
        format!("https://gw.example:{port}/api/x?a=1")
    );
    let r = redirect_of(&gw, "GET / HTTP/1.1\r\nHost: [::1]").await;
    assert_eq!(
        r.header("location").unwrap(),
        format!("https://[::1]:{port}/")
    );
    // Everything that is not a host[:port] is refused with the JSON error, no Location.
    for host in [
        "evil.example?",
        "evil.example/x",
        "evil.example#",
        "user@evil.example",
        "evil.example\\x",
        "evil.example:8080:1",
        "evil.example:abc",
        "%65vil.example",
        "evil.example;x",
        "",
    ] {
        let r = redirect_of(&gw, &format!("GET /p HTTP/1.1\r\nHost: {host}")).await;
        assert_eq!(r.status, 400, "Host {host:?}: {}", r.head);
        assert!(r.header("location").is_none(), "{host:?}");
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["reason"], "bad_request", "{host:?}");
        assert!(!body["request_id"].as_str().unwrap().is_empty());
    }
    // No Host, two Hosts, or an absolute-form target naming another host than it may.
    for head in [
        "GET /p HTTP/1.1",
        "GET /p HTTP/1.1\r\nHost: a.example\r\nHost: b.example",
        "GET http://user@evil.example/p HTTP/1.1\r\nHost: a.example",
        "GET http://evil.example:8080:1/p HTTP/1.1\r\nHost: a.example",
    ] {
        let r = redirect_of(&gw, head).await;
        assert_eq!(r.status, 400, "{head:?}: {}", r.head);
    }
    // An absolute-form target's authority is the host (RFC 9112 section 3.2.2).
    let r = redirect_of(
        &gw,
        "GET http://gw.example/p HTTP/1.1\r\nHost: other.example",
    )
    .await;
    assert_eq!(
        r.header("location").unwrap(),
        format!("https://gw.example:{port}/p")
    );
    // With a configured name, the client's Host is not used at all.
    let mut cfg = cfg;
    if let Some(r) = cfg.server.redirect_http.as_mut() {
        r.host = Some("api.example.com".into());
    }
    let named = spawn(cfg).await;
    for host in ["evil.example?", "evil.example", "x"] {
        let r = redirect_of(&named, &format!("GET /q HTTP/1.1\r\nHost: {host}")).await;
        assert_eq!(r.status, 308);
        assert_eq!(
            r.header("location").unwrap(),
            format!("https://api.example.com:{}/q", named.addr.port())
        );
    }
    // An invalid configured name is a field error.
    let mut bad = named.state().config.clone();
    if let Some(r) = bad.server.redirect_http.as_mut() {
        r.host = Some("evil.example?".into());
    }
    let errors = bad.validate().unwrap_err().to_string();
    assert!(errors.contains("server.redirect_http.host"), "{errors}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsts_is_sent_over_tls_only() {
    let up = FakeUpstream::ok().await;
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = with_tls(cfg_for(&up), &ca, dir.path(), true);
    if let Some(t) = cfg.server.tls.as_mut() {
        t.hsts = Some(HstsConfig {
            max_age: Dur::from_secs(31_536_000),
            include_subdomains: true,
            preload: false,
        });
    }
    let gw = spawn(cfg.clone()).await;
    let base = format!("https://127.0.0.1:{}", gw.addr.port());
    for http2 in [false, true] {
        let c = ca.client(http2);
        for (path, want) in [
            ("/health", 200),
            ("/api/data/products", 200),
            ("/nope", 404),
        ] {
            let r = c.get(format!("{base}{path}")).send().await.unwrap();
            assert_eq!(r.status(), want);
            assert_eq!(
                r.headers()["strict-transport-security"],
                "max-age=31536000; includeSubDomains",
                "{path} over TLS (h2: {http2})"
            );
        }
    }
    // Never over plain HTTP: the redirect listener, the refusal on the TLS port, the admin.
    let r = redirect_of(&gw, "GET / HTTP/1.1\r\nHost: localhost").await;
    assert_eq!(r.status, 308);
    assert!(r.header("strict-transport-security").is_none());
    let r = exchange(gw.addr, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(r[0].status, 400);
    assert!(r[0].header("strict-transport-security").is_none());
    let r = client()
        .get(format!("http://{}/metrics", gw.admin_addr))
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("strict-transport-security").is_none());
    // Off by default.
    if let Some(t) = cfg.server.tls.as_mut() {
        t.hsts = None;
    }
    let off = spawn(cfg.clone()).await;
    let r = ca
        .client(false)
        .get(format!("https://127.0.0.1:{}/health", off.addr.port()))
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("strict-transport-security").is_none());
    // preload without what the lists require is a field error.
    if let Some(t) = cfg.server.tls.as_mut() {
        t.hsts = Some(HstsConfig {
            max_age: Dur::from_secs(86_400),
            include_subdomains: false,
            preload: true,
        });
    }
    let errors = cfg.validate().unwrap_err().to_string();
    assert!(errors.contains("server.tls.hsts.preload"), "{errors}");
}
