//! Hostile requests over real sockets (raw TCP where a client library would refuse or
//! normalise): path tricks, header tricks and request smuggling, body tricks, token abuse.
//! Behind the gateway, fake upstreams record everything they receive, so each test asserts
//! both what the client got and that nothing outside the route's rewrite template (or no
//! request at all) reached an upstream. After each group the gateway still serves normally.

use crate::support;

use std::time::Duration;

use deltastream_gateway::config::Dur;
use deltastream_gateway::config::{KeySource, PolicyConfig};
use deltastream_gateway::routes::template::check_param;
use serde_json::Value;
use support::gateway::{client, spawn};
use support::raw::{exchange, read_response, status_of};
use support::{Step, Trio};
use tokio::io::AsyncWriteExt;

/// Every path any upstream received is one of the rewrite templates with a parameter
/// that passes the gateway's own parameter check: nothing escaped a template.
fn assert_only_template_paths(trio: &Trio) {
    let templates: [&[&str]; 8] = [
        &["register"],
        &["login"],
        &["verify"],
        &["products"],
        &["underlying", "{}"],
        &["option", "chain", "{}"],
        &["pcr", "{}"],
        &["volatility-surface", "{}"],
    ];
    for up in [&trio.auth, &trio.storage, &trio.analytics] {
        for r in up.requests() {
            let path = r.path_and_query.split('?').next().unwrap_or("");
            let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
            let ok = templates.iter().any(|t| {
                t.len() == segs.len()
                    && t.iter().zip(&segs).all(|(want, got)| {
                        if *want == "{}" {
                            !got.is_empty() && check_param(got).is_ok()
                        } else {
                            want == got
                        }
                    })
            });
            assert!(
                ok,
                "upstream received a path outside every template: {path:?}"
            );
        }
    }
}

/// The gateway still answers health and a normal proxied request.
async fn still_serving(base: &str, t: &Trio) {
    let c = client();
    let r = c.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let before = t.storage.hits();
    let r = c
        .get(format!("{base}/api/data/underlying/NIFTY"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(t.storage.hits(), before + 1);
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n").into_bytes()
}

#[tokio::test]
async fn path_tricks_never_leave_the_rewrite_template() {
    let t = Trio::new().await;
    let gw = spawn(t.config()).await;
    let long_segment = "a".repeat(8_000);
    let many_segments = "/x".repeat(3_000);
    let dot_segments = "/..".repeat(2_000);
    let refused: Vec<String> = vec![
        "/api/data/underlying/..".into(),
        "/api/data/underlying/.".into(),
        "/api/data/underlying/../../auth/login".into(),
        "/api/data/underlying/%2e%2e".into(),
        "/api/data/underlying/%2E%2e".into(),
        "/api/data/underlying/.%2e".into(),
        "/api/data/underlying/%2e%2e%2fproducts".into(),
        "/api/data/underlying/..%2F..%2Flogin".into(),
        "/api/data/underlying/a%2Fb".into(),
        "/api/data/underlying/a%2fb".into(),
        "/api/data/underlying/%252e%252e".into(),
        "/api/data/underlying/%252F".into(),
        "/api/data/underlying/%25252F".into(),
        "/api/data/underlying/a%5Cb".into(),
        "/api/data/underlying/a%5c..%5cb".into(),
        "/api/data/underlying/a\\b".into(),
        "/api/data/underlying/..\\..\\login".into(),
        "/api/data/underlying/NIFTY%00".into(),
        "/api/data/underlying/NIFTY%00.json".into(),
        "/api/data/underlying/NIFTY%0d%0aX-User-Id:%201".into(),
        "/api/data/underlying/NIFTY%09".into(),
        "/api/data/underlying/NIFTY%7f".into(),
        "/api/data/underlying/%ff%fe".into(),
        "/api/data/underlying/%c0%ae%c0%ae".into(),
        "/api/data/underlying/%".into(),
        "/api/data/underlying/%zz".into(),
        "/api/data/underlying/NIFTY/".into(),
        "/api/data/underlying//NIFTY".into(),
        "/api/data/underlying/NIFTY/../../products".into(),
        "/api/data/../auth/login".into(),
        "/api/v1/../data/products".into(),
        "/api/data/products/.".into(),
        "/api/data/products/..".into(),
        "//api/data/products".into(),
        "/api//data/products".into(),
        "/api/data/./products".into(),
        "/api/data/products%2f".into(),
        "/api/data/products;x=1".into(),
        "/API/data/products".into(),
        "*".into(),
        format!("/api/data/underlying/{long_segment}/x"),
        many_segments,
        dot_segments,
    ];
    for path in &refused {
        let status = status_of(gw.addr, &get(path)).await;
        assert!(
            [400, 404, 414, 431].contains(&status),
            "{:.80}: got {status}",
            path
        );
    }
    // Raw control bytes in the request line: hyper refuses the request outright.
    for raw in [
        &b"GET /api/data/underlying/NI\x00FTY HTTP/1.1\r\nHost: gw\r\n\r\n"[..],
        b"GET /api/data/underlying/NI\rFTY HTTP/1.1\r\nHost: gw\r\n\r\n",
        b"GET /api/data/underlying/NI FTY HTTP/1.1\r\nHost: gw\r\n\r\n",
        b"GET /api/data/underlying/NI\x7fFTY HTTP/1.1\r\nHost: gw\r\n\r\n",
        b"GET /api/data/underlying/\xc3\xa9 HTTP/1.1\r\nHost: gw\r\n\r\n",
    ] {
        let status = status_of(gw.addr, raw).await;
        assert!(
            status == 400 || status == 0 || status == 404,
            "{:?}: {status}",
            String::from_utf8_lossy(raw)
        );
    }
    assert_eq!(t.hits(), 0, "a path trick reached an upstream");

    // A long path is refused at the head limit (431) or as a URI (414), never forwarded.
    let huge_path = format!("/api/data/underlying/{}", "A".repeat(70_000));
    let status = status_of(gw.addr, &get(&huge_path)).await;
    assert!(status == 414 || status == 431, "huge path: {status}");
    assert_eq!(t.hits(), 0);

    // Accepted parameters are forwarded exactly as encoded, and a query string, however
    // odd, travels only as the query.
    let accepted = [
        (
            "/api/data/underlying/BANK%20NIFTY",
            "/underlying/BANK%20NIFTY",
        ),
        ("/api/data/underlying/a.b", "/underlying/a.b"),
        // A fragment is not part of the request target's path: dropped, never forwarded.
        (
            "/api/data/underlying/NIFTY#../../login",
            "/underlying/NIFTY",
        ),
        ("/api/data/underlying/...", "/underlying/..."),
        ("/api/data/underlying/caf%C3%A9", "/underlying/caf%C3%A9"),
        (
            "/api/data/underlying/NIFTY?p=../../admin&q=%2F..%2F&r=%0d%0a",
            "/underlying/NIFTY?p=../../admin&q=%2F..%2F&r=%0d%0a",
        ),
        (
            "/api/v1/data/underlying/NIFTY?x=/../login",
            "/underlying/NIFTY?x=/../login",
        ),
    ];
    for (path, upstream_sees) in accepted {
        let status = status_of(gw.addr, &get(path)).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(
            t.storage.last_request().unwrap().path_and_query,
            upstream_sees
        );
    }
    // An overlong query within the head limit is forwarded as a query, path unchanged.
    let q = "q=".to_string() + &"z".repeat(40_000);
    let status = status_of(gw.addr, &get(&format!("/api/data/underlying/NIFTY?{q}"))).await;
    assert_eq!(status, 200);
    assert_eq!(
        t.storage.last_request().unwrap().path_and_query,
        format!("/underlying/NIFTY?{q}")
    );
    // Over the head limit it is 414/431 and not forwarded.
    let before = t.hits();
    let q = "q=".to_string() + &"z".repeat(80_000);
    let status = status_of(gw.addr, &get(&format!("/api/data/products?{q}"))).await;
    assert!(status == 414 || status == 431, "huge query: {status}");
    assert_eq!(t.hits(), before);

    assert_only_template_paths(&t);
    still_serving(&gw.url(), &t).await;
}

#[tokio::test]
async fn spoofed_identity_forwarding_and_host_headers_have_no_effect() {
    let t = Trio::new().await;
    let mut cfg = t.config();
    cfg.rate_limit.redis_url = None;
    cfg.rate_limit.policies.push(PolicyConfig {
        name: "tiny".into(),
        limit: 3,
        window: Dur::from_secs(60),
        key: KeySource::Ip,
    });
    for r in cfg.routes.iter_mut() {
        if r.path == "/api/data/underlying/{product}" {
            r.rate_limit = vec!["tiny".into()];
        }
    }
    let gw = spawn(cfg).await;
    let c = client();
    let url = format!("{}/api/data/underlying/NIFTY", gw.url());
    // Each request claims a different client address, in every way a client can.
    for i in 0..3 {
        let r = c
            .get(&url)
            .header("x-user-id", "admin")
            .header("x-user-email", "root@example.com")
            .header("x-user-role", "admin")
            .header("x-forwarded-for", format!("10.0.0.{i}"))
            .header("forwarded", format!("for=10.1.0.{i};proto=https"))
            .header("x-real-ip", format!("10.2.0.{i}"))
            .header("x-forwarded-host", "evil.example")
            .header("x-forwarded-proto", "https")
            .header("host", "evil.example")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i}");
        let got = t.storage.last_request().unwrap();
        for h in ["x-user-id", "x-user-email", "x-user-role"] {
            assert!(!got.headers.contains_key(h), "{h} was forwarded");
        }
        assert_eq!(got.headers["x-forwarded-for"], "127.0.0.1");
        assert_eq!(got.headers["x-forwarded-proto"], "http");
        assert!(!got.headers.contains_key("forwarded"));
        assert!(!got.headers.contains_key("x-real-ip"));
        assert!(!got.headers.contains_key("x-forwarded-host"));
        assert_eq!(got.headers["host"], t.storage.addr.to_string());
    }
    // The fourth is limited although it claims yet another address: the key is the socket.
    let r = c
        .get(&url)
        .header("x-forwarded-for", "203.0.113.99")
        .header("forwarded", "for=203.0.113.98")
        .header("x-real-ip", "203.0.113.97")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["reason"], "rate_limited");
    assert_eq!(t.storage.hits(), 3);

    // Host abuse on the raw wire: absolute-form targets, duplicate (400, RFC 9112 3.2) and odd
    // Host headers.
    let before = t.storage.hits();
    let raws: [&[u8]; 4] = [
        b"GET http://evil.example/api/data/products HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
        b"GET /api/data/products HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: close\r\n\r\n",
        b"GET /api/data/products HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n",
        b"GET /api/data/products HTTP/1.1\r\nHost: localhost:1@evil.example\r\nConnection: close\r\n\r\n",
    ];
    for raw in raws {
        let status = status_of(gw.addr, raw).await;
        assert!(
            [200, 400].contains(&status),
            "{}: {status}",
            String::from_utf8_lossy(raw)
        );
    }
    for r in t.storage.requests().iter().skip(before) {
        assert_eq!(r.headers["host"], t.storage.addr.to_string());
        assert_eq!(r.path_and_query, "/products");
        assert!(!r.headers.contains_key("x-forwarded-host"));
    }
    still_serving_unlimited(&gw.url(), &t).await;
}

/// `still_serving` for a gateway whose data route is rate limited: health plus products.
async fn still_serving_unlimited(base: &str, _t: &Trio) {
    let c = client();
    assert_eq!(
        c.get(format!("{base}/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        c.get(format!("{base}/api/data/products"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn crlf_smuggling_and_oversized_heads_are_refused_before_any_upstream() {
    let t = Trio::new().await;
    let gw = spawn(t.config()).await;
    let refused: Vec<(&str, Vec<u8>)> = vec![
        (
            "bare CR in a header value",
            b"GET /api/data/products HTTP/1.1\r\nHost: gw\r\nX-A: a\rX-User-Id: 1\r\n\r\n".to_vec(),
        ),
        (
            "bare LF in a header value",
            b"GET /api/data/products HTTP/1.1\r\nHost: gw\r\nX-A: a\nX-User-Id 1\r\n\r\n".to_vec(),
        ),
        (
            "obsolete line folding",
            b"GET /api/data/products HTTP/1.1\r\nHost: gw\r\nX-A: a\r\n X-User-Id: 1\r\n\r\n"
                .to_vec(),
        ),
        (
            "space before the colon",
            b"GET /api/data/products HTTP/1.1\r\nHost: gw\r\nX-User-Id : 1\r\n\r\n".to_vec(),
        ),
        (
            "NUL in a header value",
            b"GET /api/data/products HTTP/1.1\r\nHost: gw\r\nX-A: a\x00b\r\n\r\n".to_vec(),
        ),
        (
            "two different Content-Lengths",
            b"POST /api/auth/login HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".to_vec(),
        ),
        (
            "a list Content-Length",
            b"POST /api/auth/login HTTP/1.1\r\nHost: gw\r\nContent-Length: 5, 6\r\n\r\nhello!".to_vec(),
        ),
        (
            "a negative Content-Length",
            b"POST /api/auth/login HTTP/1.1\r\nHost: gw\r\nContent-Length: -1\r\n\r\nhello".to_vec(),
        ),
        (
            "a signed Content-Length",
            b"POST /api/auth/login HTTP/1.1\r\nHost: gw\r\nContent-Length: +5\r\n\r\nhello".to_vec(),
        ),
        (
            "a Transfer-Encoding that does not end in chunked",
            b"POST /api/auth/login HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip\r\n\r\nhello".to_vec(),
        ),
        (
            "an unknown Transfer-Encoding",
            b"POST /api/auth/login HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec(),
        ),
        (
            "a bad chunk size",
            b"POST /api/auth/login HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_vec(),
        ),
        ("HTTP/2 method in HTTP/1", b"PRI /api/data/products HTTP/1.1\r\nHost: gw\r\n\r\n".to_vec()),
        ("unknown version", b"GET /api/data/products HTTP/1.7\r\nHost: gw\r\n\r\n".to_vec()),
        ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec()),
    ];
    for (what, raw) in &refused {
        let responses = exchange(gw.addr, raw).await;
        let status = responses.first().map_or(0, |r| r.status);
        assert!(
            status == 400
                || status == 0
                || (matches!(status, 404 | 405) && what.starts_with("HTTP/2")),
            "{what}: got {status}"
        );
    }
    assert_eq!(t.hits(), 0, "a malformed request reached an upstream");

    // CL + TE (TE.CL smuggling): whatever the gateway does, the request hidden in the body
    // must never reach storage as a request of its own.
    let hidden = "GET /api/data/products HTTP/1.1\r\nHost: gw\r\n\r\n";
    let chunk = format!("{:x}\r\n{hidden}\r\n0\r\n\r\n", hidden.len());
    let smuggle = format!(
        "POST /api/auth/login HTTP/1.1\r\nHost: gw\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}"
    );
    let responses = exchange(gw.addr, smuggle.as_bytes()).await;
    assert!(!responses.is_empty());
    assert!(
        responses.iter().all(|r| r.status == 200 || r.status == 400),
        "{responses:?}"
    );
    assert_eq!(t.storage.hits(), 0, "a smuggled request reached storage");
    for r in t.auth.requests() {
        // Re-framed by the gateway: a plain body, never TE and CL together.
        assert!(
            !(r.headers.contains_key("transfer-encoding")
                && r.headers.contains_key("content-length"))
        );
        assert_eq!(r.path_and_query, "/login");
    }
    // CL.TE: the smuggled request after a short Content-Length.
    let smuggle = format!(
        "POST /api/auth/login HTTP/1.1\r\nHost: gw\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{hidden}",
        5 + hidden.len()
    );
    let _ = exchange(gw.addr, smuggle.as_bytes()).await;
    // hyper gives chunked precedence and closes after a CL+TE request, so the hidden GET
    // is either never parsed or parsed as a request of its own from the client's bytes,
    // answered to the client (not interleaved into another client's connection).
    assert!(t.storage.hits() <= 1);
    for r in t.auth.requests() {
        assert!(!r.headers.contains_key("transfer-encoding"));
    }

    // Oversized head sections: one huge header, many headers, many medium headers; fresh
    // and on a reused keep-alive connection (where max_buf_size alone let 100 KB through).
    let big = "b".repeat(100_000);
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let medium: String = (0..40)
        .map(|i| format!("X-M{i}: {}\r\n", "m".repeat(2_000)))
        .collect();
    for extra in [
        format!("Authorization: Bearer {big}\r\n"),
        format!("X-Big: {big}\r\n"),
        many,
        medium,
    ] {
        let raw = format!("GET /api/data/products HTTP/1.1\r\nHost: gw\r\n{extra}\r\n");
        assert_eq!(status_of(gw.addr, raw.as_bytes()).await, 431);
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
            .await
            .unwrap();
        let first = read_response(&mut s, Duration::from_secs(5)).await.unwrap();
        assert_eq!(first.status, 200);
        let _ = s.write_all(raw.as_bytes()).await;
        let second = read_response(&mut s, Duration::from_secs(5)).await;
        assert_eq!(second.map(|r| r.status), Some(431), "reused connection");
    }
    // Just under the limit is fine and forwarded whole.
    let r = client()
        .get(format!("{}/api/data/underlying/NIFTY", gw.url()))
        .header("x-big", "c".repeat(50_000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        t.storage.last_request().unwrap().headers["x-big"].len(),
        50_000
    );
    // Header names that are hop-by-hop by nomination are not forwarded either.
    let r = client()
        .get(format!("{}/api/data/underlying/NIFTY", gw.url()))
        .header("connection", "x-secret-hop")
        .header("x-secret-hop", "1")
        .header("te", "trailers")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let got = t.storage.last_request().unwrap();
    assert!(!got.headers.contains_key("x-secret-hop"));
    assert!(!got.headers.contains_key("te"));
    assert_only_template_paths(&t);
    still_serving(&gw.url(), &t).await;
}

#[tokio::test]
async fn body_tricks_are_bounded_and_never_forwarded_ambiguously() {
    let t = Trio::new().await;
    t.auth.set_steps([Step::body(
        400,
        "application/json",
        r#"{"detail":"malformed JSON"}"#,
    )]);
    let mut cfg = t.config();
    for r in cfg.routes.iter_mut() {
        if r.path == "/api/auth/login" || r.path == "/api/auth/register" {
            r.timeout = Some(Dur::from_millis(1500));
        }
    }
    let gw = spawn(cfg).await;
    let c = client();

    // Malformed JSON is the upstream's business: its own 400 passes through untouched.
    let r = c
        .post(format!("{}/api/auth/login", gw.url()))
        .header("content-type", "application/json")
        .body(&b"{\"email\": \"a@b\", \"password\": \xff\xfe"[..])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.text().await.unwrap(), r#"{"detail":"malformed JSON"}"#);
    assert_eq!(
        &t.auth.last_request().unwrap().body[..],
        &b"{\"email\": \"a@b\", \"password\": \xff\xfe"[..]
    );
    let auth_before = t.auth.hits();

    // A declared length over the limit is refused from the head alone: 413 at once, the
    // body is never awaited, and `Expect: 100-continue` gets no 100.
    for expect in ["", "Expect: 100-continue\r\n"] {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(
            format!(
                "POST /api/auth/register HTTP/1.1\r\nHost: gw\r\nContent-Length: 2000000\r\n{expect}\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let resp = read_response(&mut s, Duration::from_secs(3)).await.unwrap();
        assert_eq!(resp.status, 413, "{expect:?}");
    }
    assert_eq!(t.auth.hits(), auth_before);

    // Expect: 100-continue under the limit: 100, then the body, then the upstream's answer.
    t.auth.set_steps([]);
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"POST /api/auth/login HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: 13\r\nExpect: 100-continue\r\n\r\n").await.unwrap();
    let cont = read_response(&mut s, Duration::from_secs(3)).await.unwrap();
    assert_eq!(cont.status, 100);
    s.write_all(b"{\"email\":\"x\"}").await.unwrap();
    let resp = read_response(&mut s, Duration::from_secs(5)).await.unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(
        &t.auth.last_request().unwrap().body[..],
        b"{\"email\":\"x\"}"
    );

    // Declared longer than sent, then the client half-closes: 400, nothing forwarded.
    let before = t.auth.hits();
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(
        b"POST /api/auth/login HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\nonly-ten!!",
    )
    .await
    .unwrap();
    s.shutdown().await.unwrap();
    let resp = read_response(&mut s, Duration::from_secs(5)).await;
    assert!(resp.as_ref().is_none_or(|r| r.status == 400), "{resp:?}");
    // Declared longer than sent and the client just stops: answered (408) within the
    // route's deadline, never forwarded, never held forever.
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(
        b"POST /api/auth/login HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\nonly-ten!!",
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let resp = read_response(&mut s, Duration::from_secs(6)).await;
    assert_eq!(resp.map(|r| r.status), Some(408), "a stalled body");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(t.auth.hits(), before, "a truncated body was forwarded");

    // Declared shorter than sent: exactly the declared bytes are the body; the rest is the
    // next request on the connection (here garbage, answered 400), never appended.
    let responses = exchange(
        gw.addr,
        b"POST /api/auth/login HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\nhelloEXTRA-BYTES-THAT-ARE-NOT-HTTP\r\n\r\n",
    )
    .await;
    assert_eq!(responses.first().map(|r| r.status), Some(200));
    assert_eq!(&t.auth.last_request().unwrap().body[..], b"hello");
    assert!(responses.get(1).is_none_or(|r| r.status == 400));

    // A slow but steady body within the deadline is forwarded intact.
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"POST /api/auth/register HTTP/1.1\r\nHost: gw\r\nContent-Length: 10\r\n\r\n")
        .await
        .unwrap();
    for b in b"0123456789" {
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.write_all(&[*b]).await.unwrap();
    }
    let resp = read_response(&mut s, Duration::from_secs(5)).await.unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(&t.auth.last_request().unwrap().body[..], b"0123456789");

    // Chunked without a length, over the limit: 413 and nothing forwarded.
    let before = t.auth.hits();
    let mut raw =
        b"POST /api/auth/login HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..20 {
        raw.extend_from_slice(format!("{:x}\r\n", 64 * 1024).as_bytes());
        raw.extend(std::iter::repeat_n(b'x', 64 * 1024));
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(status_of(gw.addr, &raw).await, 413);
    assert_eq!(t.auth.hits(), before);
    still_serving(&gw.url(), &t).await;
}

#[tokio::test]
async fn abusive_bearer_tokens_are_401_in_local_mode() {
    use base64::Engine;
    let t = Trio::new().await;
    let mut cfg = t.config();
    cfg.auth.mode = deltastream_gateway::config::AuthMode::Local;
    cfg.auth.jwt_secret = Some("hostile-test-secret".into());
    let gw = spawn(cfg).await;
    let me = format!("{}/api/user/me", gw.url());
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let future = r#"{"sub":"admin","email":"a@b","exp":9999999999}"#;
    let alg_none = format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT"}"#), b64(future));
    let alg_none_upper = format!("{}.{}.", b64(r#"{"alg":"NONE"}"#), b64(future));
    let alg_rs = format!(
        "{}.{}.{}",
        b64(r#"{"alg":"RS256","typ":"JWT"}"#),
        b64(future),
        b64("sig")
    );
    // Expired an hour ago (well past the verifier's few seconds of leeway).
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": "u-1", "email": "x@y", "exp": chrono::Utc::now().timestamp() - 3600}),
        &jsonwebtoken::EncodingKey::from_secret(b"hostile-test-secret"),
    )
    .unwrap();
    let good = deltastream_gateway::sim::auth::issue_token(
        b"hostile-test-secret",
        "u-1",
        "x@y",
        Duration::from_secs(600),
    )
    .unwrap();
    // The good token with its signature stripped or its payload swapped.
    let mut parts: Vec<&str> = good.split('.').collect();
    let unsigned = format!("{}.{}.", parts[0], parts[1]);
    let forged_payload = b64(r#"{"sub":"admin","email":"a@b","exp":9999999999}"#);
    parts[1] = &forged_payload;
    let forged = parts.join(".");
    let huge = "h".repeat(20_000);
    let header_values: Vec<Vec<u8>> = vec![
        b"Bearer".to_vec(),
        b"Bearer ".to_vec(),
        b"Bearer    ".to_vec(),
        b"bearer".to_vec(),
        b"Basic dXNlcjpwYXNz".to_vec(),
        b"Token abc".to_vec(),
        format!("Bearer {huge}").into_bytes(),
        "Bearer \u{1F600}.\u{1F600}.\u{1F600}".as_bytes().to_vec(),
        b"Bearer \xff\xfe\xfd".to_vec(),
        b"Bearer a.b.c d.e.f".to_vec(),
        b"Bearer ....".to_vec(),
        format!("Bearer {alg_none}").into_bytes(),
        format!("Bearer {alg_none_upper}").into_bytes(),
        format!("Bearer {alg_rs}").into_bytes(),
        format!("Bearer {expired}").into_bytes(),
        format!("Bearer {unsigned}").into_bytes(),
        format!("Bearer {forged}").into_bytes(),
    ];
    for value in &header_values {
        let mut raw =
            b"GET /api/user/me HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nAuthorization: "
                .to_vec();
        raw.extend_from_slice(value);
        raw.extend_from_slice(b"\r\n\r\n");
        let responses = exchange(gw.addr, &raw).await;
        let r = responses.first().expect("an answer");
        assert_eq!(r.status, 401, "{:.60}", String::from_utf8_lossy(value));
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["reason"], "unauthenticated");
    }
    // No Authorization at all: 401; two of them: 400 (which one would an upstream believe?).
    assert_eq!(status_of(gw.addr, &get("/api/user/me")).await, 401);
    let two = format!("GET /api/user/me HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nAuthorization: Bearer {alg_none}\r\nAuthorization: Bearer {good}\r\n\r\n");
    assert_eq!(status_of(gw.addr, two.as_bytes()).await, 400);
    assert_eq!(t.auth.hits(), 0, "local mode called the auth service");
    // The real token still works.
    let r = client().get(&me).bearer_auth(&good).send().await.unwrap();
    assert_eq!(r.status(), 200);
    still_serving(&gw.url(), &t).await;
}
