//! `deltastream-gateway probe URL`, the images' health check (they have no curl), against
//! real sockets: the exit status follows the status code, and a peer that accepts but never
//! answers, or nothing listening, fails within `--timeout`.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_deltastream-gateway");

/// A one-shot server on a free port: answers the first request with `answer` (or holds it
/// unanswered when `None`) and hands back what the probe sent.
fn server(answer: Option<&'static str>) -> (String, std::thread::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let handle = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        match answer {
            Some(a) => {
                let _ = s.write_all(a.as_bytes());
            }
            // Hold the connection open past the probe's timeout.
            None => std::thread::sleep(Duration::from_secs(3)),
        }
        String::from_utf8_lossy(&got).into_owned()
    });
    (addr, handle)
}

fn probe(url: &str, timeout: &str) -> (bool, String, Duration) {
    let started = Instant::now();
    let out = Command::new(BIN)
        .args(["probe", url, "--timeout", timeout])
        .env_remove("GATEWAY_CONFIG")
        .output()
        .expect("run probe");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

#[test]
fn a_2xx_passes_and_the_request_is_a_plain_get_of_the_path_and_query() {
    let (addr, server) = server(Some(
        "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    ));
    let (ok, stderr, _) = probe(&format!("http://{addr}/health?deep=1"), "5s");
    assert!(ok, "{stderr}");
    let sent = server.join().expect("server");
    assert!(
        sent.starts_with("GET /health?deep=1 HTTP/1.1\r\n"),
        "{sent:?}"
    );
    assert!(sent.contains(&format!("\r\nHost: {addr}\r\n")), "{sent:?}");
}

#[test]
fn a_503_fails_and_says_the_status() {
    let (addr, server) = server(Some(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
    ));
    let (ok, stderr, _) = probe(&format!("http://{addr}/health"), "5s");
    assert!(!ok);
    assert!(stderr.contains("503"), "{stderr}");
    server.join().expect("server");
}

#[test]
fn a_peer_that_never_answers_fails_within_the_timeout() {
    let (addr, _server) = server(None);
    let (ok, stderr, took) = probe(&format!("http://{addr}/health"), "300ms");
    assert!(!ok);
    assert!(stderr.contains("no answer within 300ms"), "{stderr}");
    // 300 ms, plus a process start on a busy machine; the peer holds on for 3 s.
    assert!(took < Duration::from_millis(2500), "{took:?}");
}

#[test]
fn nothing_listening_or_not_http_fails() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let (ok, stderr, _) = probe(&format!("http://{addr}/health"), "2s");
    assert!(!ok, "{stderr}");

    let (addr, server) = server(Some("SSH-2.0-OpenSSH_9.2\r\n"));
    let (ok, stderr, _) = probe(&format!("http://{addr}/health"), "2s");
    assert!(!ok);
    assert!(stderr.contains("not an HTTP answer"), "{stderr}");
    server.join().expect("server");
}
