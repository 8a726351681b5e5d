//! The second outside audit ("the edge under hostile clients"): the request-level and
//! admin-side findings, one test per class, over real sockets against a running gateway in
//! front of recording upstreams. The attack list (finding -> class -> test):
//!
//! - 200 concurrent distinct bad tokens from one address all reached the auth service ->
//!   verify calls multiplied by concurrency -> `concurrent_bad_tokens_cannot_multiply_verify_calls`
//!   (and `concurrent_good_tokens_still_verify`: the bound does not refuse good ones).
//! - a GET body was forwarded but not keyed, so a later plain GET got the attacker's answer ->
//!   anything forwarded that is not in the cache key ->
//!   `a_get_or_head_body_is_refused_and_never_reaches_the_cache` and, for the headers an
//!   answer depends on (Range, validators, preconditions),
//!   `ranges_validators_and_preconditions_never_reach_clients_that_did_not_send_them`.
//! - the config fingerprint was a plain SHA-256 of the unredacted configuration, so guesses
//!   of `jwt_secret` could be checked offline -> a published function of the secrets ->
//!   `the_fingerprint_cannot_be_used_to_test_guesses_of_the_secrets`.
//! - `..;`, `%2e%2e;`, `.%2e;` passed the parameter check -> dot segments as an upstream
//!   resolves them (servlet `;` parameters, double decoding) ->
//!   `dot_segments_with_path_parameters_are_refused` and the property test
//!   `no_accepted_parameter_is_a_dot_segment_to_any_upstream`.
//! - a Redis node list, upstream URLs and an OTLP endpoint with `user:password@` were shown
//!   in clear -> user information in any URL-valued field ->
//!   `credentials_in_every_url_field_are_masked_in_admin_config`,
//!   `every_string_field_of_the_configuration_is_redacted` and
//!   `check_config_output_and_errors_mask_credentials`.
//! - `X-User.Id` and `X-UserId` were not stripped -> identity spellings ->
//!   `identity_and_gateway_headers_are_matched_by_their_letters`.
//! - duplicate `Sec-WebSocket-Key`/`Version`/`Origin` were forwarded while the first was
//!   checked -> a checked header with a second value -> `repeated_websocket_handshake_headers_are_refused`.
//! - `Expect: 100-continue` was forwarded -> expectations are the edge's to answer ->
//!   `expect_100_continue_is_answered_at_the_edge_and_never_forwarded`.

use crate::support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use deltastream_gateway::config::{redact, Config};
use deltastream_gateway::routes::template::check_param;
use http::HeaderMap;
use proptest::prelude::*;
use serde_json::Value;
use sha2::{Digest, Sha256};
use support::gateway::{client, config_with_upstreams, scrape, spawn};
use support::raw::{read_response, RawResponse, READ_LIMIT};
use support::{FakeUpstream, Step};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn all_to(up: &FakeUpstream) -> Config {
    let url = up.url();
    config_with_upstreams(move |_| url.clone())
}

/// Sends `bytes` on a new connection and reads one response (a 1xx counts as one).
async fn one(addr: SocketAddr, bytes: &[u8]) -> RawResponse {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    read_response(&mut s, READ_LIMIT)
        .await
        .expect("a response within the read limit")
}

/// The status of the first response head to `bytes` (a HEAD's answer has no body to wait
/// for, whatever its `Content-Length` says).
async fn head_status(addr: SocketAddr, bytes: &[u8]) -> u16 {
    use tokio::io::AsyncReadExt;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        while !data.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => data.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(READ_LIMIT, read).await;
    String::from_utf8_lossy(&data)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn reason(r: &RawResponse) -> String {
    serde_json::from_slice::<Value>(&r.body)
        .ok()
        .and_then(|v| v["reason"].as_str().map(str::to_string))
        .unwrap_or_default()
}

// --- Item 2: the failed-verification guard cannot be raced --------------------------------

#[tokio::test]
async fn concurrent_bad_tokens_cannot_multiply_verify_calls() {
    // Slow enough that all 200 requests are waiting on the auth service together.
    let auth = FakeUpstream::builder()
        .steps([Step::body(
            200,
            "application/json",
            r#"{"valid":true,"user_id":"u-1","email":"u@example.com"}"#,
        )])
        .then(
            Step::body(401, "application/json", r#"{"error":"Invalid token"}"#)
                .delayed(Duration::from_millis(500)),
        )
        .start()
        .await;
    let mut cfg = all_to(&auth);
    // This fake's latency jumps from a few ms to 500 ms at 20 concurrent calls: to the
    // adaptive concurrency limit, exactly an overloaded auth service. The subject here is
    // the failed-verification guard, so calls wait for slots as they did without it.
    for u in cfg.upstreams.values_mut() {
        u.concurrency.enabled = false;
    }
    let gw = spawn(cfg).await;
    let c = client();
    let me = format!("{}/api/user/me", gw.url());
    // A neighbour behind the same address verified its token before the flood.
    let r = c.get(&me).bearer_auth("good.token").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let calls: Vec<_> = (0..200)
        .map(|i| {
            let (c, me) = (c.clone(), me.clone());
            tokio::spawn(async move {
                let r = c
                    .get(&me)
                    .bearer_auth(format!("bad.token.{i}"))
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let body: Value = r.json().await.unwrap_or_default();
                (status, body["reason"].as_str().unwrap_or("").to_string())
            })
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }
    let verify_calls = auth.hits() - 1;
    // Built-in `auth_failures`: 20 failures per minute, so at most 20 bad-token verify calls.
    assert!(
        verify_calls <= 20,
        "{verify_calls} verify calls for 200 concurrent bad tokens"
    );
    let unauthorized = answers.iter().filter(|(s, _)| *s == 401).count();
    let limited = answers
        .iter()
        .filter(|(s, why)| *s == 429 && why == "rate_limited")
        .count();
    assert_eq!(unauthorized + limited, 200, "{answers:?}");
    assert!(unauthorized <= 20, "{unauthorized} x 401");
    // Blocked from now on, without a verify call; the neighbour's verified token still works.
    let r = c.get(&me).bearer_auth("bad.token.x").send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(auth.hits() - 1, verify_calls);
    let r = c.get(&me).bearer_auth("good.token").send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn concurrent_good_tokens_still_verify() {
    // 60 distinct good tokens at once from one address: at most 20 verify at a time (the
    // failure budget), the others wait their turn instead of being refused.
    let auth = FakeUpstream::builder()
        .then(
            Step::body(
                200,
                "application/json",
                r#"{"valid":true,"user_id":"u-1","email":"u@example.com"}"#,
            )
            .delayed(Duration::from_millis(200)),
        )
        .start()
        .await;
    let gw = spawn(all_to(&auth)).await;
    let c = client();
    let me = format!("{}/api/user/me", gw.url());
    let calls: Vec<_> = (0..60)
        .map(|i| {
            let (c, me) = (c.clone(), me.clone());
            tokio::spawn(async move {
                c.get(&me)
                    .bearer_auth(format!("good.token.{i}"))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), 200);
    }
    assert_eq!(auth.hits(), 60);
}

// --- Item 6: nothing forwarded on a cached route is outside its key -----------------------

#[tokio::test]
async fn a_get_or_head_body_is_refused_and_never_reaches_the_cache() {
    let storage = FakeUpstream::ok().await;
    let gw = spawn(all_to(&storage)).await;
    let c = client();
    let url = format!("{}/api/data/products?fat=1", gw.url());
    // The audit's request: a GET with a body on a cached route.
    let r = c
        .get(&url)
        .body(r#"{"q":"ATTACKER"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["reason"], "bad_request");
    // The same as chunked, as a HEAD, on an uncached route, and announced with
    // `Expect: 100-continue` (refused from the head: no 100, the body is never sent).
    let head = |method: &str, path: &str, extra: &str| {
        format!("{method} {path} HTTP/1.1\r\nHost: gw\r\n{extra}\r\n")
    };
    for request in [
        head(
            "GET",
            "/api/data/products?fat=1",
            "Transfer-Encoding: chunked\r\n",
        ) + "5\r\nEVIL!\r\n0\r\n\r\n",
        head("HEAD", "/api/data/products?fat=1", "Content-Length: 5\r\n") + "EVIL!",
        head("GET", "/api/data/underlying/NIFTY", "Content-Length: 5\r\n") + "EVIL!",
        head(
            "GET",
            "/api/data/products?fat=1",
            "Content-Length: 5\r\nExpect: 100-continue\r\n",
        ),
    ] {
        assert_eq!(
            head_status(gw.addr, request.as_bytes()).await,
            400,
            "{request:?}"
        );
    }
    assert_eq!(
        storage.hits(),
        0,
        "a request with a body reached the upstream"
    );
    // An empty chunked body is no body.
    let r = one(
        gw.addr,
        head(
            "GET",
            "/api/data/products?fat=1",
            "Transfer-Encoding: chunked\r\n",
        )
        .as_bytes()
        .iter()
        .chain(b"0\r\n\r\n")
        .copied()
        .collect::<Vec<u8>>()
        .as_slice(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-cache").as_deref(), Some("MISS"));
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.headers()["x-cache"], "HIT");
    assert_eq!(storage.hits(), 1);
    assert!(storage.requests().iter().all(|r| r.body.is_empty()));
}

/// An upstream whose answer depends on the request's headers, as the audit's recording one:
/// 206 for `Range`, 304 for `If-None-Match`, 412 for `If-Match`, otherwise 200 "full", each
/// after `delay`; it records every request's headers.
async fn conditional_upstream(delay: Duration) -> (String, Arc<Mutex<Vec<HeaderMap>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<HeaderMap>>> = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let record = record.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                    let record = record.clone();
                    async move {
                        let h = req.headers().clone();
                        record.lock().unwrap().push(h.clone());
                        tokio::time::sleep(delay).await;
                        let (status, body) = if h.contains_key("range") {
                            (206, "fu")
                        } else if h.contains_key("if-none-match") {
                            (304, "")
                        } else if h.contains_key("if-match") {
                            (412, "precondition")
                        } else {
                            (200, "full")
                        };
                        let mut resp = http::Response::builder()
                            .status(status)
                            .header("etag", "\"v1\"")
                            .header("cache-control", "max-age=60");
                        if status == 206 {
                            resp = resp.header("content-range", "bytes 0-1/4");
                        }
                        Ok::<_, Infallible>(
                            resp.body(http_body_util::Full::new(Bytes::from(body)))
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
    (format!("http://{addr}"), seen)
}

#[tokio::test]
async fn ranges_validators_and_preconditions_never_reach_clients_that_did_not_send_them() {
    let (url, seen) = conditional_upstream(Duration::from_millis(1000)).await;
    let gw = spawn(config_with_upstreams(move |_| url.clone())).await;
    let c = client();
    for (i, (name, value)) in [
        ("range", "bytes=0-1"),
        ("if-none-match", "\"v1\""),
        ("if-match", "\"v0\""),
    ]
    .into_iter()
    .enumerate()
    {
        // A client with the header starts the fetch of an entry; a plain GET of the same
        // resource arrives while it runs (a single flight would hand it the first's answer).
        let url = format!("{}/api/data/products?case={i}", gw.url());
        let first = tokio::spawn({
            let (c, url) = (c.clone(), url.clone());
            async move { c.get(url).header(name, value).send().await.unwrap() }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let plain = c.get(&url).send().await.unwrap();
        let first = first.await.unwrap();
        assert_eq!(plain.status(), 200, "{name}: {:?}", plain.headers());
        assert_eq!(plain.text().await.unwrap(), "full", "{name}");
        // The one with the header got an answer that is right for it.
        let want = match name {
            "range" => 206,
            "if-match" => 412,
            // The validator is not forwarded on a cached route; it matches the stored
            // answer's ETag, so the gateway itself answers 304.
            _ => 304,
        };
        assert_eq!(first.status(), want, "{name}");
    }
    // The entry fills never carry the client's validators.
    assert!(seen
        .lock()
        .unwrap()
        .iter()
        .all(|h| !h.contains_key("if-none-match") && !h.contains_key("if-modified-since")));
}

// --- Item 7: the fingerprint is not a function of the secrets -----------------------------

async fn described(admin: SocketAddr) -> Value {
    client()
        .get(format!("http://{admin}/admin/config"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_fingerprint_cannot_be_used_to_test_guesses_of_the_secrets() {
    let up = FakeUpstream::ok().await;
    let with = |secret: &str, password: &str| {
        let mut cfg = all_to(&up);
        cfg.auth.jwt_secret = Some(secret.into());
        cfg.rate_limit.redis_url = Some(format!("redis://:{password}@127.0.0.1:1"));
        cfg
    };
    let one_gw = spawn(with("hunter2-jwt", "hunter2-redis")).await;
    let other_gw = spawn(with("another-jwt", "another-redis")).await;
    let (a, b) = (
        described(one_gw.admin_addr).await,
        described(other_gw.admin_addr).await,
    );
    let sha = a["sha256"].as_str().unwrap().to_string();
    // The audit's attack: the redacted configuration plus a guess, hashed as the gateway
    // hashed it; a right guess must not match.
    let mut guessed: Config = serde_json::from_value(a["config"].clone()).unwrap();
    guessed.auth.jwt_secret = Some("hunter2-jwt".into());
    guessed.rate_limit.redis_url = Some("redis://:hunter2-redis@127.0.0.1:1".into());
    let guess = hex::encode(Sha256::digest(serde_json::to_vec(&guessed).unwrap()));
    assert_ne!(
        guess, sha,
        "the fingerprint confirms a guess of the secrets"
    );
    // Settings that differ only in secrets have one fingerprint: it holds none of them, and
    // replicas stay comparable.
    assert_eq!(b["sha256"], sha);
    let metrics = scrape(one_gw.admin_addr).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("gateway_config_info{") && l.contains(&sha)),
        "{metrics}"
    );
    // With a fingerprint key shared by the replicas the secrets count too, and the value
    // cannot be computed without the key.
    let keyed = |secret: &str, key: &str| {
        let mut cfg = with(secret, "pw");
        cfg.admin.fingerprint_key = Some(key.into());
        redact::fingerprint(&cfg)
    };
    let key = "a-key-of-sixteen-or-more";
    assert_eq!(keyed("s1", key), keyed("s1", key));
    assert_ne!(keyed("s1", key), keyed("s2", key));
    assert_ne!(keyed("s1", key), keyed("s1", "another-key-of-sixteen"));
    let mut from_env = with("s1", "pw");
    from_env
        .apply_env(|k| (k == "CONFIG_FINGERPRINT_KEY").then(|| key.to_string()))
        .unwrap();
    assert_eq!(redact::fingerprint(&from_env), keyed("s1", key));
    let mut short = with("s", "pw");
    short.admin.fingerprint_key = Some("short".into());
    let errors = short.validate().unwrap_err().to_string();
    assert!(errors.contains("admin.fingerprint_key"), "{errors}");
}

// --- Item 8: dot segments as the upstream resolves them -----------------------------------

#[tokio::test]
async fn dot_segments_with_path_parameters_are_refused() {
    let storage = FakeUpstream::ok().await;
    let gw = spawn(all_to(&storage)).await;
    for param in [
        "..;",
        "%2e%2e;",
        ".%2e;",
        "%2E%2E;jsessionid=x",
        "..%3B",
        ".;",
        "%252e%252e",
    ] {
        let request = format!("GET /api/data/chain/{param} HTTP/1.1\r\nHost: gw\r\n\r\n");
        let r = one(gw.addr, request.as_bytes()).await;
        assert_eq!(r.status, 400, "{param}");
        assert_eq!(reason(&r), "bad_request", "{param}");
    }
    assert_eq!(storage.hits(), 0);
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

fn is_dot(segment: &str) -> bool {
    segment == "." || segment == ".."
}

/// What upstreams make of a segment: decoded once then cut at `;` (Jetty), cut at `;` then
/// decoded (Tomcat), decoded twice (a second decoding layer behind the first).
fn upstream_readings(raw: &str) -> [String; 4] {
    let cut = |s: &str| s.split(';').next().unwrap_or("").to_string();
    [
        decode(raw),
        cut(&decode(raw)),
        decode(&cut(raw)),
        cut(&decode(&decode(raw))),
    ]
}

proptest! {
    #![proptest_config(support::proptest_config(4000))]
    /// Over parameters made of the pieces dot-segment tricks are made of, no parameter the
    /// gateway accepts is `.` or `..` to any upstream reading.
    #[test]
    fn no_accepted_parameter_is_a_dot_segment_to_any_upstream(
        pieces in proptest::collection::vec(
            proptest::sample::select(vec![
                ".", "%2e", "%2E", ";", "%3b", "%3B", "a", "%25", "2e", "%252e", "%252E",
                "x=1", "%00", "/", "%2f", "\\",
            ]),
            1..6,
        )
    ) {
        let raw: String = pieces.concat();
        if check_param(&raw).is_ok() {
            for reading in upstream_readings(&raw) {
                prop_assert!(!is_dot(&reading), "{raw:?} accepted, read as {reading:?}");
            }
        }
    }
}

// --- Item 9: credentials in URL-valued fields are masked everywhere -----------------------

/// Credentials in every URL-valued setting the configuration has today.
fn config_with_credentials(up: &FakeUpstream) -> Config {
    let mut cfg = all_to(up);
    let addr = up.addr;
    if let Some(storage) = cfg.upstreams.get_mut("storage") {
        storage.url = format!("http://store:STORAGE-SECRET@{addr}");
    }
    if let Some(analytics) = cfg.upstreams.get_mut("analytics") {
        analytics.url = String::new();
        analytics.urls = vec![
            format!("http://an:ANALYTICS-SECRET-1@{addr}"),
            format!("http://an:ANALYTICS-SECRET-2@{addr}"),
        ];
    }
    cfg.rate_limit.redis_url =
        Some("redis://:REDIS-SECRET-1@127.0.0.1:1,redis://u:REDIS-SECRET-2@127.0.0.1:2".into());
    cfg.tracing.otlp_endpoint = Some("http://otel:OTLP-SECRET@127.0.0.1:1/v1/traces".into());
    cfg.auth.jwt_secret = Some("JWT-SECRET-VALUE".into());
    cfg.admin.fingerprint_key = Some("FINGERPRINT-KEY-SECRET-0123".into());
    cfg
}

#[tokio::test]
async fn credentials_in_every_url_field_are_masked_in_admin_config() {
    let up = FakeUpstream::ok().await;
    let gw = spawn(config_with_credentials(&up)).await;
    let text = client()
        .get(format!("http://{}/admin/config", gw.admin_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!text.contains("SECRET"), "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v["config"]["rate_limit"]["redis_url"],
        "redis://***@127.0.0.1:1,redis://***@127.0.0.1:2"
    );
    assert_eq!(v["config"]["auth"]["jwt_secret"], "***");
    assert_eq!(v["config"]["admin"]["fingerprint_key"], "***");
    let metrics = scrape(gw.admin_addr).await;
    assert!(!metrics.contains("SECRET"));
    // Masking is for display only: the upstream with credentials in its URL still works.
    let r = client()
        .get(format!("{}/api/data/underlying/NIFTY", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Every string leaf of `v`, by JSON pointer.
fn string_leaves(v: &mut Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::String(_) => out.push(at),
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                string_leaves(item, format!("{at}/{i}"), out);
            }
        }
        Value::Object(map) => {
            for (k, item) in map.iter_mut() {
                string_leaves(item, format!("{at}/{k}"), out);
            }
        }
        _ => {}
    }
}

#[tokio::test]
async fn every_string_field_of_the_configuration_is_redacted() {
    let up = FakeUpstream::ok().await;
    let cfg = config_with_credentials(&up);
    // The list of fields is the serialized configuration itself: a setting added later is
    // walked without being named here. Every string field gets a URL with credentials.
    let mut value = serde_json::to_value(&cfg).unwrap();
    let mut leaves = Vec::new();
    string_leaves(&mut value, String::new(), &mut leaves);
    assert!(leaves.len() > 50, "{}", leaves.len());
    for (i, pointer) in leaves.iter().enumerate() {
        *value.pointer_mut(pointer).unwrap() =
            Value::String(format!("https://user:LEAF-{i}-SECRET@h.example/p"));
    }
    redact::redact_value(&mut value);
    let shown = value.to_string();
    assert!(!shown.contains("SECRET"), "{shown}");
    // The secrets that are not URLs are named; the names must still exist.
    let original = serde_json::to_value(&cfg).unwrap();
    for path in redact::SECRET_FIELDS {
        let pointer = format!("/{}", path.join("/"));
        assert!(original.pointer(&pointer).is_some(), "{pointer} is gone");
    }
    assert!(!redact::redacted_json(&cfg).to_string().contains("SECRET"));
}

#[test]
fn check_config_output_and_errors_mask_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let valid = dir.path().join("valid.toml");
    std::fs::write(
        &valid,
        r#"
[upstreams.storage]
url = "http://store:STORAGE-SECRET@127.0.0.1:9"
[upstreams.analytics]
urls = ["http://an:ANALYTICS-SECRET@127.0.0.1:9", "http://127.0.0.1:10"]
[rate_limit]
redis_url = "redis://:REDIS-SECRET-1@127.0.0.1:1,redis://:REDIS-SECRET-2@127.0.0.1:2"
[tracing]
otlp_endpoint = "http://otel:OTLP-SECRET@127.0.0.1:1/v1/traces"
"#,
    )
    .unwrap();
    let invalid = dir.path().join("invalid.toml");
    std::fs::write(
        &invalid,
        r#"
[rate_limit]
redis_url = "http://:REDIS-SECRET@127.0.0.1:1"
[tracing]
otlp_endpoint = "ftp://otel:OTLP-SECRET@127.0.0.1:1/v1/traces"
"#,
    )
    .unwrap();
    for (file, code) in [(&valid, 0), (&invalid, 2)] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_deltastream-gateway"))
            .arg("check-config")
            .arg(file)
            .env_remove("REDIS_URL")
            .env_remove("JWT_SECRET")
            .output()
            .unwrap();
        let shown = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(code), "{shown}");
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(shown.contains("***@127.0.0.1"), "{shown}");
    }
}

// --- Item 11: identity and gateway-set headers by their letters ---------------------------

#[tokio::test]
async fn identity_and_gateway_headers_are_matched_by_their_letters() {
    let storage = FakeUpstream::ok().await;
    let gw = spawn(all_to(&storage)).await;
    let spoofed = [
        ("X-User.Id", "admin"),
        ("X-UserId", "admin"),
        ("XUserEmail", "root@example.com"),
        ("x-user.email", "root@example.com"),
        ("X.User.Role", "admin"),
        ("X-Forwarded.For", "6.6.6.6"),
        ("X-ForwardedProto", "https"),
        ("X.Request.Id", "forged"),
        ("X-Real.IP", "6.6.6.6"),
        ("XOriginalURL", "/admin"),
    ];
    let mut request = "GET /api/data/underlying/NIFTY HTTP/1.1\r\nHost: gw\r\n".to_string();
    for (name, value) in spoofed {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("X-Keep: yes\r\n\r\n");
    let r = one(gw.addr, request.as_bytes()).await;
    assert_eq!(r.status, 200, "{}", r.head);
    let seen = storage.last_request().unwrap().headers;
    for (name, _) in spoofed {
        assert!(
            !seen.contains_key(name.to_ascii_lowercase().as_str()),
            "{name} reached the upstream: {seen:?}"
        );
    }
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.get_all("x-forwarded-for").iter().count(), 1);
    assert_eq!(seen["x-keep"], "yes");
    assert!(seen.keys().all(|k| {
        let letters: String = k
            .as_str()
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect();
        !(letters.starts_with("xuser") && letters.len() > 5)
    }));
    // Two Authorization headers in two spellings: which would the upstream believe? Refused.
    let r = one(
        gw.addr,
        b"GET /api/user/me HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer a\r\nAuthori_zation: Bearer b\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 400);
}

// --- Item 12 (part): WebSocket handshake duplicates and Expect ----------------------------

#[tokio::test]
async fn repeated_websocket_handshake_headers_are_refused() {
    let socket = FakeUpstream::ok().await;
    let gw = spawn(all_to(&socket)).await;
    let handshake = |extra: &str| {
        format!(
            "GET /ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        )
    };
    for extra in [
        "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n",
        "Sec_WebSocket_Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n",
        "Sec-WebSocket-Version: 8\r\n",
        "Origin: http://a.example\r\nOrigin: http://b.example\r\n",
    ] {
        let r = one(gw.addr, handshake(extra).as_bytes()).await;
        assert_eq!(r.status, 400, "{extra:?}: {}", r.head);
        assert_eq!(reason(&r), "bad_request", "{extra:?}");
    }
    assert_eq!(
        socket.hits(),
        0,
        "a duplicated handshake reached the upstream"
    );
    // One of each still reaches it (the fake answers 200, which the gateway passes on).
    let r = one(
        gw.addr,
        handshake("Origin: http://a.example\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(socket.hits(), 1);
}

#[tokio::test]
async fn expect_100_continue_is_answered_at_the_edge_and_never_forwarded() {
    let auth = FakeUpstream::ok().await;
    let gw = spawn(all_to(&auth)).await;
    let body = br#"{"email":"a@b.c","password":"pw"}"#;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /api/auth/login HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let interim = read_response(&mut s, READ_LIMIT).await.unwrap();
    assert_eq!(interim.status, 100, "{}", interim.head);
    s.write_all(body).await.unwrap();
    let done = read_response(&mut s, READ_LIMIT).await.unwrap();
    assert_eq!(done.status, 200, "{}", done.head);
    let seen = auth.last_request().unwrap();
    assert!(!seen.headers.contains_key("expect"), "{:?}", seen.headers);
    assert_eq!(&seen.body[..], &body[..]);
    // An expectation the gateway cannot meet: 417, nothing forwarded.
    let r = one(
        gw.addr,
        b"POST /api/auth/login HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\nExpect: x-something\r\n\r\n{}",
    )
    .await;
    assert_eq!(r.status, 417, "{}", r.head);
    assert_eq!(reason(&r), "expectation_failed");
    assert_eq!(auth.hits(), 1);
}
