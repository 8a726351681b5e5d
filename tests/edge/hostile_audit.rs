//! The weakness classes an outside audit found (issue "Harden the edge"), one test per class,
//! over real sockets against a running gateway in front of recording upstreams:
//! cache keys that are not injective over what the upstream sees, identity and framing
//! headers in `_` spellings and client claims from untrusted peers, unbounded buffering of
//! large answers on cached routes, verification amplification, slow readers holding
//! upstream slots, and the request-head rules (Host, Transfer-Encoding).

use crate::support;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use deltastream_gateway::config::{Config, Dur};
use deltastream_gateway::routes::proxy::{parse_base, parse_upstream_url};
use deltastream_gateway::upstream::cache::ResponseCache;
use proptest::prelude::*;
use serde_json::Value;
use support::gateway::{client, config_with_upstreams, spawn};
use support::raw::{exchange, read_response};
use support::{FakeUpstream, Step};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn all_to(up: &FakeUpstream) -> Config {
    let url = up.url();
    config_with_upstreams(move |_| url.clone())
}

// --- 1. Cache keys are injective over the forwarded request target -----------------------

/// What the upstream receives for `query` on the products route.
fn forwarded(query: Option<&str>) -> String {
    let base = "http://storage:8003";
    parse_upstream_url(parse_base(base).as_ref(), base, "/products", query)
        .map(|u| u.to_string())
        .unwrap_or_default()
}

fn key_of(query: Option<&str>) -> deltastream_gateway::upstream::cache::CacheKey {
    let route: Arc<str> = Arc::from("/api/data/products");
    let upstream: Arc<str> = Arc::from("storage");
    ResponseCache::key_for_route(&route, &upstream, "/products", query)
}

proptest! {
    #![proptest_config(support::proptest_config(256))]
    /// key(q1) == key(q2) implies the upstream receives the same target for both, over
    /// queries made of the characters that normalisations like to fold.
    #[test]
    fn equal_cache_keys_mean_equal_forwarded_targets(
        q1 in proptest::option::of("[ab=&?%2F1;+ ]{0,10}"),
        q2 in proptest::option::of("[ab=&?%2F1;+ ]{0,10}"),
    ) {
        if key_of(q1.as_deref()) == key_of(q2.as_deref()) {
            prop_assert_eq!(forwarded(q1.as_deref()), forwarded(q2.as_deref()));
        }
    }
}

#[test]
fn queries_a_normalising_key_merged_get_their_own_keys() {
    for (a, b) in [
        ("a=1", "?a=1"),
        ("a=1", "a=1&&"),
        ("a=1", "&a=1"),
        ("a=1&b=2", "b=2&a=1"),
    ] {
        assert_ne!(forwarded(Some(a)), forwarded(Some(b)), "{a} / {b}");
        assert_ne!(key_of(Some(a)), key_of(Some(b)), "{a} / {b}");
    }
}

#[tokio::test]
async fn a_crafted_query_cannot_poison_another_querys_cache_entry() {
    let storage = FakeUpstream::ok().await;
    let gw = spawn(all_to(&storage)).await;
    let c = client();
    let get = |q: &'static str| {
        let c = c.clone();
        let url = format!("{}/api/data/products{q}", gw.url());
        async move {
            let r = c.get(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.headers()["x-cache"].to_str().unwrap().to_string()
        }
    };
    // The attacker's variants first, each a different target upstream...
    for (i, q) in ["??a=1", "?a=1&&", "?&a=1", "?b=2&a=1"]
        .into_iter()
        .enumerate()
    {
        assert_eq!(get(q).await, "MISS", "{q}");
        assert_eq!(storage.hits(), i + 1, "{q} was answered from another entry");
    }
    // ...then the victim's query is a miss of its own, and only then a hit.
    assert_eq!(get("?a=1&b=2").await, "MISS");
    assert_eq!(get("?a=1&b=2").await, "HIT");
    let targets: Vec<String> = storage
        .requests()
        .iter()
        .map(|r| r.path_and_query.clone())
        .collect();
    assert_eq!(
        targets,
        [
            "/products??a=1",
            "/products?a=1&&",
            "/products?&a=1",
            "/products?b=2&a=1",
            "/products?a=1&b=2"
        ]
    );
}

// --- 2. Identity, framing and client-claim headers in every spelling ----------------------

#[tokio::test]
async fn underscore_spellings_and_untrusted_claims_never_reach_the_upstream() {
    let storage = FakeUpstream::ok().await;
    let gw = spawn(all_to(&storage)).await;
    let raw = "GET /api/data/underlying/NIFTY HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\
        X-User_Id: 1\r\nX_User_Id: 2\r\nx_user-email: root@example.com\r\n\
        X_Forwarded_For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nX_Real_IP: 6.6.6.6\r\n\
        X-Client-IP: 6.6.6.6\r\nTrue-Client-IP: 6.6.6.6\r\nX-Original-URL: /admin\r\n\
        X-Rewrite-URL: /admin\r\nX-HTTP-Method-Override: DELETE\r\nX_Request_Id: forged\r\n\
        X-Harmless: kept\r\n\r\n";
    let responses = exchange(gw.addr, raw.as_bytes()).await;
    assert_eq!(responses.first().map(|r| r.status), Some(200));
    let got = storage.last_request().expect("forwarded");
    let names: Vec<&str> = got.headers.keys().map(|k| k.as_str()).collect();
    for name in &names {
        let folded = name.replace('_', "-");
        assert!(!folded.starts_with("x-user-"), "{name} forwarded");
        for claim in [
            "x-real-ip",
            "x-client-ip",
            "true-client-ip",
            "x-original-url",
            "x-rewrite-url",
            "x-http-method-override",
        ] {
            assert_ne!(folded, claim, "{name} forwarded");
        }
    }
    assert_eq!(got.headers.get_all("x-forwarded-for").iter().count(), 1);
    assert!(!names.contains(&"x_forwarded_for") && !names.contains(&"x_request_id"));
    assert_eq!(got.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(got.headers["x-harmless"], "kept");

    // Framing headers spelled with `_`, and two Authorization headers: 400, nothing sent.
    let before = storage.hits();
    for (what, extra) in [
        ("Transfer_Encoding", "Transfer_Encoding: chunked\r\n"),
        ("Content_Length", "Content_Length: 5\r\n"),
        (
            "two Authorization",
            "Authorization: Bearer a\r\nAuthorization: Bearer b\r\n",
        ),
    ] {
        let raw = format!(
            "GET /api/data/underlying/NIFTY HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n{extra}\r\n"
        );
        let responses = exchange(gw.addr, raw.as_bytes()).await;
        let r = responses.first().expect("an answer");
        assert_eq!(r.status, 400, "{what}");
        let body: Value = serde_json::from_str(&r.body_text()).unwrap();
        assert_eq!(body["reason"], "bad_request", "{what}");
    }
    assert_eq!(
        storage.hits(),
        before,
        "a refused request reached the upstream"
    );
}

// --- 3. Bounded buffering of large answers on cached routes --------------------------------

/// An upstream that sends `first` bytes of a `total`-byte body, then waits for `release`
/// before sending the rest: shows whether the gateway passes bytes on before the end.
async fn slow_large_upstream(
    first: usize,
    total: usize,
    release: Arc<tokio::sync::Notify>,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let release = release.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let release = release.clone();
                    async move {
                        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
                        tokio::spawn(async move {
                            let _ = tx.send(Bytes::from(vec![b'a'; first])).await;
                            release.notified().await;
                            let _ = tx.send(Bytes::from(vec![b'b'; total - first])).await;
                        });
                        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                            rx.recv()
                                .await
                                .map(|b| (Ok::<_, Infallible>(http_body::Frame::data(b)), rx))
                        });
                        let body = http_body_util::StreamBody::new(stream);
                        Ok::<_, Infallible>(
                            http::Response::builder()
                                .header("content-length", total)
                                .header("cache-control", "max-age=60")
                                .body(body)
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn an_answer_larger_than_a_cache_entry_is_streamed_not_buffered() {
    let release = Arc::new(tokio::sync::Notify::new());
    let (first, total) = (3 << 20, 5 << 20);
    let url = slow_large_upstream(first, total, release.clone()).await;
    let mut cfg = config_with_upstreams(move |_| url.clone());
    cfg.cache.max_entry_bytes = deltastream_gateway::config::ByteSize(1 << 20);
    let gw = spawn(cfg).await;
    let mut resp = client()
        .get(format!("{}/api/data/chain/BIG", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-cache"], "MISS");
    // The first part arrives while the upstream still holds back the rest: the gateway
    // stopped buffering at max_entry_bytes instead of waiting for the whole body.
    let mut received = 0usize;
    let deadline = Instant::now() + Duration::from_secs(10);
    while received < first {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, resp.chunk()).await {
            Ok(Ok(Some(chunk))) => received += chunk.len(),
            other => panic!("only {received} bytes before the upstream finished: {other:?}"),
        }
    }
    release.notify_one();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        received += chunk.len();
    }
    assert_eq!(received, total);
    // Not stored: the next request goes upstream again (and streams again).
    let release2 = release.clone();
    let next = tokio::spawn({
        let url = format!("{}/api/data/chain/BIG", gw.url());
        async move { client().get(url).send().await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    release2.notify_one();
    let r = next.await.unwrap();
    assert_eq!(r.headers()["x-cache"], "MISS");
    assert_eq!(r.bytes().await.unwrap().len(), total);
}

// --- 4. Verification amplification ---------------------------------------------------------

#[tokio::test]
async fn a_rejected_token_is_not_verified_again_and_failures_per_client_are_limited() {
    let auth = FakeUpstream::builder()
        .then(Step::body(
            401,
            "application/json",
            r#"{"error":"Invalid token"}"#,
        ))
        .start()
        .await;
    let gw = spawn(all_to(&auth)).await;
    let c = client();
    let me = format!("{}/api/user/me", gw.url());
    // One bad token ten times: one verify call.
    for _ in 0..10 {
        let r = c.get(&me).bearer_auth("bad.token.1").send().await.unwrap();
        assert_eq!(r.status(), 401);
    }
    assert_eq!(auth.hits(), 1, "a rejected token was verified again");
    // Distinct bad tokens: counted per client (built-in auth_failures: 20 per minute); the
    // tenth failure above is #10, so ten more reach the limit and the rest are refused
    // without any verify call.
    let mut statuses = Vec::new();
    for i in 0..20 {
        let r = c
            .get(&me)
            .bearer_auth(format!("bad.token.x{i}"))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert!(refused >= 9, "{statuses:?}");
    let hits = auth.hits();
    assert!(hits <= 12, "{hits} verify calls for 30 bad requests");
    let r = c.get(&me).bearer_auth("bad.token.y").send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["reason"], "rate_limited");
    assert_eq!(
        auth.hits(),
        hits,
        "a blocked client still caused verify calls"
    );
}

#[tokio::test]
async fn the_user_route_is_rate_limited() {
    let auth = FakeUpstream::builder()
        .then(Step::body(
            200,
            "application/json",
            r#"{"valid":true,"user_id":"u-1","email":"u@example.com"}"#,
        ))
        .start()
        .await;
    let gw = spawn(all_to(&auth)).await;
    let r = client()
        .get(format!("{}/api/user/me", gw.url()))
        .bearer_auth("good.token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("ratelimit"), "{:?}", r.headers());
}

// --- 5. Slow readers do not hold upstream slots --------------------------------------------

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_frees_its_upstream_slot() {
    let big = Bytes::from(vec![b'z'; 32 << 20]);
    let storage = FakeUpstream::builder()
        .then(Step::body(200, "application/octet-stream", big))
        .start()
        .await;
    let mut cfg = all_to(&storage);
    cfg.limits.send_timeout = Dur::from_millis(500);
    for u in cfg.upstreams.values_mut() {
        u.max_connections = 1;
        // The second client must WAIT for the one slot (the bulkhead's behaviour under
        // test), not be refused after the adaptive limit's short wait.
        u.concurrency.enabled = false;
    }
    let gw = spawn(cfg).await;
    // The only upstream slot goes to a client that reads a few bytes and then nothing.
    let mut slow = TcpStream::connect(gw.addr).await.unwrap();
    slow.write_all(b"GET /api/data/underlying/BIG HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut few = [0u8; 64];
    let _ = slow.read(&mut few).await.unwrap();
    // Another client of the same upstream is served once the slow one is cut off (from
    // another address: the slow one's own next request is over its share and refused).
    let started = Instant::now();
    let r = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap()
        .get(format!("{}/api/data/underlying/NIFTY", gw.url()))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the slot stayed with the slow reader");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    drop(r);
    // The slow reader's connection was closed by the gateway (reads end, not hang).
    let mut sink = vec![0u8; 1 << 16];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, slow.read(&mut sink)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the stalled connection was never closed"),
        }
    }
}

// --- 6. Request-head rules -----------------------------------------------------------------

#[tokio::test]
async fn host_and_transfer_coding_rules_and_bare_lf() {
    let storage = FakeUpstream::ok().await;
    let gw = spawn(all_to(&storage)).await;
    for (what, raw) in [
        (
            "no Host",
            "GET /api/data/underlying/NIFTY HTTP/1.1\r\nConnection: close\r\n\r\n",
        ),
        (
            "two Host",
            "GET /api/data/underlying/NIFTY HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
        ),
        (
            "a coding before chunked",
            "POST /api/auth/login HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "two Transfer-Encoding fields",
            "POST /api/auth/login HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
    ] {
        let responses = exchange(gw.addr, raw.as_bytes()).await;
        assert_eq!(responses.first().map(|r| r.status), Some(400), "{what}");
    }
    assert_eq!(storage.hits(), 0);
    // HTTP/1.0 needs no Host.
    let responses = exchange(gw.addr, b"GET /api/data/underlying/NIFTY HTTP/1.0\r\n\r\n").await;
    assert_eq!(responses.first().map(|r| r.status), Some(200));
    // Bare LF line endings are accepted (RFC 9112 section 2.2 allows a recipient to) and the
    // request is re-framed: the upstream gets an ordinary request (README, Security).
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /api/data/underlying/NIFTY HTTP/1.1\nHost: gw\nX-Note: lf\n\n")
        .await
        .unwrap();
    let r = read_response(&mut s, Duration::from_secs(5)).await.unwrap();
    assert_eq!(r.status, 200);
    let got = storage.last_request().unwrap();
    assert_eq!(got.path_and_query, "/underlying/NIFTY");
    assert_eq!(got.headers["x-note"], "lf");
}
