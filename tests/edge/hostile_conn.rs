//! Connection abuse over real sockets: slowloris heads, silent sockets, idle keep-alive and
//! HTTP/2 connections, a flood of idle connections at `max_connections`, and clients that
//! vanish mid-response. Each test ends by checking the gateway still serves normally.

use crate::support;

use std::time::{Duration, Instant};

use deltastream_gateway::config::{ByteSize, Config, Dur};
use support::gateway::{client, config_with_upstreams, spawn};
use support::raw::{closed_within, read_response};
use support::{FakeUpstream, Step};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn cfg_for(up: &FakeUpstream) -> Config {
    let u = up.url();
    let mut cfg = config_with_upstreams(move |_| u.clone());
    cfg.limits.header_read_timeout = Dur::from_millis(500);
    cfg
}

async fn serves(base: &str) {
    let r = client()
        .get(format!("{base}/api/data/underlying/NIFTY"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("the gateway still answers");
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn slowloris_heads_and_silent_sockets_are_closed_after_the_header_timeout() {
    let up = FakeUpstream::ok().await;
    let gw = spawn(cfg_for(&up)).await;
    // A head dribbled a byte every 100 ms never completes within 500 ms: closed.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let started = Instant::now();
    let head = b"GET /api/data/products HTTP/1.1\r\nHost: gw\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut closed = false;
    for b in head {
        if s.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        if closed_within(&mut s, Duration::from_millis(100)).await {
            closed = true;
            break;
        }
    }
    assert!(closed, "a slowloris head was never cut off");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // A client that connects and says nothing (before any protocol is known) likewise.
    let mut silent = TcpStream::connect(gw.addr).await.unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(3)).await);
    // Half an HTTP/2 preface, then nothing.
    let mut half = TcpStream::connect(gw.addr).await.unwrap();
    half.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    assert!(closed_within(&mut half, Duration::from_secs(3)).await);
    // An idle keep-alive connection after a request: closed too.
    let mut ka = TcpStream::connect(gw.addr).await.unwrap();
    ka.write_all(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        read_response(&mut ka, Duration::from_secs(3))
            .await
            .unwrap()
            .status,
        200
    );
    assert!(closed_within(&mut ka, Duration::from_secs(3)).await);
    assert_eq!(up.hits(), 0);
    serves(&gw.url()).await;
}

#[tokio::test]
async fn idle_http2_connections_are_closed_after_idle_timeout() {
    let up = FakeUpstream::ok().await;
    let mut cfg = cfg_for(&up);
    cfg.limits.idle_timeout = Dur::from_secs(1);
    let gw = spawn(cfg).await;
    // HTTP/2 with prior knowledge works (and so the h2 path is exercised at all).
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2
        .get(format!("{}/api/data/underlying/NIFTY", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    // Its head limit matches HTTP/1's 64 KiB rather than hyper's 16 KiB default.
    let r = h2
        .get(format!("{}/api/data/underlying/NIFTY", gw.url()))
        .header("x-mid", "m".repeat(40_000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A raw HTTP/2 connection that opens and then idles: GOAWAY and close after ~1 s.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let started = Instant::now();
    assert!(closed_within(&mut s, Duration::from_secs(5)).await);
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(800), "{took:?}");
    serves(&gw.url()).await;
}

#[tokio::test]
async fn idle_connections_at_the_cap_make_room_for_new_clients() {
    let up = FakeUpstream::ok().await;
    let mut cfg = cfg_for(&up);
    cfg.limits.max_connections = 4;
    // Long timeouts: only shedding at the cap can free these slots quickly.
    cfg.limits.header_read_timeout = Dur::from_secs(30);
    cfg.limits.idle_timeout = Dur::from_secs(60);
    let gw = spawn(cfg).await;
    // Fill every slot, twice over, with idle sockets: silent ones and idle keep-alives.
    let mut idle = Vec::new();
    for i in 0..8 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        if i % 2 == 0 {
            let _ = s
                .write_all(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
                .await;
        }
        idle.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A real client is served within a few seconds (shedding starts after 1 s of idleness).
    let started = Instant::now();
    for _ in 0..3 {
        serves(&gw.url()).await;
    }
    assert!(started.elapsed() < Duration::from_secs(8));
    drop(idle);
    // And while busy clients hold every slot, none of them is cut off.
    let mut busy = Vec::new();
    for _ in 0..4 {
        let base = gw.url();
        busy.push(tokio::spawn(async move {
            let c = client();
            for _ in 0..20 {
                let r = c
                    .get(format!("{base}/api/data/underlying/NIFTY"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
            }
        }));
    }
    for b in busy {
        b.await.unwrap();
    }
}

#[tokio::test]
async fn clients_that_vanish_mid_response_leak_no_upstream_connections() {
    // A 4 MiB body the client never reads, and an upstream that never answers.
    let big = bytes::Bytes::from(vec![b'z'; 4 << 20]);
    let up = FakeUpstream::builder()
        .then(Step::body(200, "application/octet-stream", big))
        .start()
        .await;
    let hang = FakeUpstream::builder().then(Step::Hang).start().await;
    let (u, h) = (up.url(), hang.url());
    let mut cfg = config_with_upstreams(move |name| match name {
        "analytics" => h.clone(),
        _ => u.clone(),
    });
    cfg.limits.max_body = ByteSize(1 << 20);
    let gw = spawn(cfg).await;
    for _ in 0..10 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(b"GET /api/data/underlying/BIG HTTP/1.1\r\nHost: gw\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let _ = tokio::time::timeout(
            Duration::from_secs(3),
            tokio::io::AsyncReadExt::read(&mut s, &mut buf),
        )
        .await;
        drop(s);
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(b"GET /api/analytics/pcr/NIFTY HTTP/1.1\r\nHost: gw\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(s);
    }
    // Abandoned calls are dropped, so their upstream connections close (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(10);
    while (hang.open_connections() > 0 || up.open_connections() > 2) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        hang.open_connections(),
        0,
        "calls to a hung upstream outlived their clients"
    );
    assert!(
        up.open_connections() <= 2,
        "{} upstream connections left open",
        up.open_connections()
    );
    assert!(hang.hits() >= 1);
    let r = client()
        .get(format!("{}/api/data/products", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
