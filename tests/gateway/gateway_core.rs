//! The gateway core against in-process fake upstreams over real HTTP: routing and
//! rewriting, byte-for-byte pass-through, the error contract, token verification, CORS,
//! body limits and path parameters that try to escape their template.

use crate::support;

use std::time::Duration;

use deltastream_gateway::config::Dur;
use serde_json::Value;
use support::gateway::{client, scrape, spawn};
use support::{refused_addr, FakeUpstream, Step, Trio};

async fn json(resp: reqwest::Response) -> Value {
    let text = resp.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

#[tokio::test]
async fn every_public_route_reaches_its_upstream_path() {
    let t = Trio::new().await;
    let gw = spawn(t.config()).await;
    let c = client();
    let cases: &[(&str, &str, &FakeUpstream, &str)] = &[
        ("POST", "/api/auth/register", &t.auth, "/register"),
        ("POST", "/api/auth/login", &t.auth, "/login"),
        (
            "GET",
            "/api/data/underlying/NIFTY?limit=5&tag=a&tag=b",
            &t.storage,
            "/underlying/NIFTY?limit=5&tag=a&tag=b",
        ),
        (
            "GET",
            "/api/data/chain/BANKNIFTY?expiry=2026-12-31",
            &t.storage,
            "/option/chain/BANKNIFTY?expiry=2026-12-31",
        ),
        ("GET", "/api/data/products", &t.storage, "/products"),
        (
            "GET",
            "/api/analytics/pcr/NIFTY?expiry=2026-12-31",
            &t.analytics,
            "/pcr/NIFTY?expiry=2026-12-31",
        ),
        (
            "GET",
            "/api/analytics/volatility-surface/FINNIFTY",
            &t.analytics,
            "/volatility-surface/FINNIFTY",
        ),
        (
            "GET",
            "/api/v1/data/underlying/NIFTY%20X?a=%2F",
            &t.storage,
            "/underlying/NIFTY%20X?a=%2F",
        ),
        (
            "GET",
            "/api/v1/analytics/pcr/NIFTY",
            &t.analytics,
            "/pcr/NIFTY",
        ),
    ];
    for (method, path, upstream, expected) in cases {
        let before = upstream.hits();
        let body = if *method == "POST" {
            r#"{"email":"a@b.c","password":"p"}"#
        } else {
            ""
        };
        let resp = c
            .request(method.parse().unwrap(), format!("{}{path}", gw.url()))
            .header("content-type", "application/json")
            .header("x-custom", "kept")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{method} {path}");
        assert_eq!(
            upstream.hits(),
            before + 1,
            "{path} did not reach its upstream"
        );
        let got = upstream.last_request().unwrap();
        assert_eq!(got.path_and_query, *expected);
        assert_eq!(got.method.as_str(), *method);
        assert_eq!(got.body, body.as_bytes());
        assert_eq!(got.headers["x-custom"], "kept");
        assert_eq!(got.headers["x-forwarded-for"], "127.0.0.1");
        assert_eq!(got.headers["x-forwarded-proto"], "http");
        assert!(got.headers.contains_key("x-request-id"));
        assert_eq!(got.headers["host"], upstream.addr.to_string());
    }
}

#[tokio::test]
async fn upstream_status_headers_and_body_pass_through_untouched() {
    let t = Trio::new().await;
    let csv = "strike,iv\n24000,0.12\n\u{1F600} not json at all\0";
    t.storage.set_steps([
        Step::body(200, "text/csv; charset=utf-8", csv).with_header("x-upstream-thing", "1"),
        Step::body(404, "application/json", r#"{"error":"Unknown product"}"#),
        Step::body(
            201,
            "application/octet-stream",
            vec![0u8, 159, 146, 150, 255],
        ),
    ]);
    let gw = spawn(t.config()).await;
    let c = client();
    let r = c
        .get(format!("{}/api/data/products", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/csv; charset=utf-8");
    assert_eq!(r.headers()["x-upstream-thing"], "1");
    assert!(r.headers().contains_key("x-request-id"));
    assert_eq!(r.text().await.unwrap(), csv);
    let r = c
        .get(format!("{}/api/data/underlying/NOPE", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.text().await.unwrap(), r#"{"error":"Unknown product"}"#);
    let r = c
        .get(format!("{}/api/data/underlying/BIN", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(&r.bytes().await.unwrap()[..], &[0u8, 159, 146, 150, 255]);
}

#[tokio::test]
async fn request_id_is_propagated_or_created() {
    let t = Trio::new().await;
    let gw = spawn(t.config()).await;
    let c = client();
    let r = c
        .get(format!("{}/api/data/underlying/NIFTY", gw.url()))
        .header("x-request-id", "client-chosen-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "client-chosen-123");
    assert_eq!(
        t.storage.last_request().unwrap().headers["x-request-id"],
        "client-chosen-123"
    );
    // An id with characters that could corrupt logs is replaced, not echoed.
    let r = c
        .get(format!("{}/api/data/underlying/NIFTY", gw.url()))
        .header("x-request-id", "bad id\"{}")
        .send()
        .await
        .unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 32);
    assert_eq!(
        t.storage.last_request().unwrap().headers["x-request-id"],
        id.as_str()
    );
}

#[tokio::test]
async fn health_is_exactly_the_original_shape() {
    let t = Trio::new().await;
    let mut cfg = t.config();
    cfg.service_name = "edge-7".into();
    let gw = spawn(cfg).await;
    let r = client()
        .get(format!("{}/health", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.text().await.unwrap(),
        r#"{"status":"healthy","service":"edge-7"}"#
    );
}

#[tokio::test]
async fn unreachable_upstream_is_503_with_the_seed_message() {
    let dead = refused_addr().await;
    let t = Trio::new().await;
    let mut cfg = t.config();
    cfg.upstreams.get_mut("storage").unwrap().url = format!("http://{dead}");
    cfg.upstreams.get_mut("analytics").unwrap().url = format!("http://{dead}");
    let gw = spawn(cfg).await;
    let c = client();
    for (path, msg, upstream) in [
        (
            "/api/data/products",
            "Storage service unavailable",
            "storage",
        ),
        (
            "/api/analytics/pcr/NIFTY",
            "Analytics service unavailable",
            "analytics",
        ),
    ] {
        let r = c.get(format!("{}{path}", gw.url())).send().await.unwrap();
        assert_eq!(r.status(), 503);
        let rid = r.headers()["x-request-id"].to_str().unwrap().to_string();
        let body = json(r).await;
        assert_eq!(body["error"], msg);
        assert_eq!(body["reason"], "upstream_unavailable");
        assert_eq!(body["upstream"], upstream);
        assert_eq!(body["request_id"], rid.as_str());
    }
}

#[tokio::test]
async fn slow_upstream_is_503_timeout_by_default_and_504_by_config() {
    let t = Trio::new().await;
    t.storage.set_steps([Step::Hang, Step::Hang]);
    for (status, expected) in [(503u16, 503u16), (504, 504)] {
        let mut cfg = t.config();
        cfg.errors.timeout_status = status;
        let products = cfg
            .routes
            .iter_mut()
            .find(|r| r.path == "/api/data/products")
            .unwrap();
        products.timeout = Some(Dur::from_millis(200));
        let gw = spawn(cfg).await;
        let started = std::time::Instant::now();
        let r = client()
            .get(format!("{}/api/data/products", gw.url()))
            .send()
            .await
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(r.status().as_u16(), expected);
        let body = json(r).await;
        assert_eq!(body["reason"], "upstream_timeout");
        assert_eq!(body["error"], "Storage service unavailable");
    }
}

#[tokio::test]
async fn not_found_method_not_allowed_and_bad_params_are_json() {
    let t = Trio::new().await;
    let gw = spawn(t.config()).await;
    let c = client();
    let r = c
        .get(format!("{}/api/nope", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(json(r).await["reason"], "not_found");

    let r = c
        .get(format!("{}/api/auth/login", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    assert_eq!(json(r).await["reason"], "method_not_allowed");

    let r = c
        .delete(format!("{}/api/v1/data/products", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET, HEAD");

    let r = c.post(format!("{}/health", gw.url())).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET, HEAD");
    assert_eq!(t.storage.hits() + t.auth.hits() + t.analytics.hits(), 0);
}

#[tokio::test]
async fn path_params_cannot_escape_the_rewrite_template() {
    let t = Trio::new().await;
    let gw = spawn(t.config()).await;
    let c = client();
    for evil in [
        "..%2Fproducts",
        "%2e%2e",
        "..",
        "%2E%2E%2Fadmin",
        "a%2Fb",
        "a%5Cb",
        "%252F..%252F",
        "NIFTY%00",
        "NIFTY%0D%0AX-Injected:%201",
    ] {
        let r = c
            .get(format!("{}/api/data/underlying/{evil}", gw.url()))
            .send()
            .await
            .unwrap();
        assert!(
            r.status() == 400 || r.status() == 404,
            "{evil}: {} {:?}",
            r.status(),
            r.headers()
        );
        let body = json(r).await;
        assert!(body["reason"] == "bad_request" || body["reason"] == "not_found");
    }
    // Raw dot segments (a client library would normalise them away, so send raw bytes).
    for raw in [
        "/api/data/underlying/../../auth/login",
        "/api/data/underlying/..",
        "/api/data/underlying/%2e%2e/products",
    ] {
        let status = raw_get_status(gw.addr, raw).await;
        assert!(status == 400 || status == 404, "{raw}: {status}");
    }
    assert_eq!(
        t.storage.hits() + t.auth.hits() + t.analytics.hits(),
        0,
        "something reached an upstream"
    );
}

/// Sends `GET {path}` exactly as given and returns the status code.
async fn raw_get_status(addr: std::net::SocketAddr, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn oversized_body_is_413_and_never_reaches_the_upstream() {
    let t = Trio::new().await;
    let gw = spawn(t.config()).await;
    let c = client();
    let big = vec![b'x'; (1 << 20) + 1];
    let r = c
        .post(format!("{}/api/auth/register", gw.url()))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(json(r).await["reason"], "payload_too_large");
    // Without a Content-Length (chunked), the limit still holds.
    let stream = futures_util::stream::iter(
        big.chunks(64 * 1024)
            .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    );
    let r = c
        .post(format!("{}/api/auth/login", gw.url()))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(t.auth.hits(), 0);
    // Exactly at the limit is fine.
    let r = c
        .post(format!("{}/api/auth/register", gw.url()))
        .body(vec![b'x'; 1 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(t.auth.last_request().unwrap().body.len(), 1 << 20);
}

#[tokio::test]
async fn cors_preflight_and_simple_requests() {
    let t = Trio::new().await;
    let gw = spawn(t.config()).await;
    let c = client();
    let r = c
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/api/data/products", gw.url()),
        )
        .header("origin", "https://app.example")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    assert!(r.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("GET"));
    assert_eq!(r.headers()["access-control-allow-headers"], "authorization");
    assert_eq!(t.storage.hits(), 0, "preflight must not reach the upstream");
    let r = c
        .get(format!("{}/api/data/products", gw.url()))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["access-control-allow-origin"], "*");

    // Explicit origins: others get no CORS grant.
    let mut cfg = t.config();
    cfg.cors.allowed_origins = vec!["https://ok.example".into()];
    let gw = spawn(cfg).await;
    let r = c
        .get(format!("{}/api/data/products", gw.url()))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(!r.headers().contains_key("access-control-allow-origin"));
    let r = c
        .get(format!("{}/api/data/products", gw.url()))
        .header("origin", "https://ok.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://ok.example"
    );
}

#[tokio::test]
async fn hop_by_hop_and_spoofed_forwarding_headers_are_not_forwarded() {
    let t = Trio::new().await;
    t.storage.set_steps([Step::status(200)
        .with_header("x-keep", "1")
        .with_header("keep-alive", "timeout=5")]);
    let gw = spawn(t.config()).await;
    let r = client()
        .get(format!("{}/api/data/products", gw.url()))
        .header("connection", "x-secret-hop")
        .header("x-secret-hop", "1")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-forwarded-for", "6.6.6.6")
        .header("forwarded", "for=6.6.6.6")
        .header("x-user-id", "admin")
        .header("x-user-email", "admin@evil")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-keep"], "1");
    assert!(!r.headers().contains_key("keep-alive"));
    let got = t.storage.last_request().unwrap();
    for h in [
        "x-secret-hop",
        "te",
        "proxy-authorization",
        "forwarded",
        "x-user-id",
        "x-user-email",
    ] {
        assert!(!got.headers.contains_key(h), "{h} was forwarded");
    }
    assert_eq!(got.headers["x-forwarded-for"], "127.0.0.1");
}

#[tokio::test]
async fn a_trusted_proxy_keeps_its_forwarded_chain() {
    let t = Trio::new().await;
    let mut cfg = t.config();
    cfg.trusted_proxies = vec!["127.0.0.0/8".into()];
    let gw = spawn(cfg).await;
    client()
        .get(format!("{}/api/data/products", gw.url()))
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    let got = t.storage.last_request().unwrap();
    assert_eq!(got.headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(got.headers["x-forwarded-proto"], "https");
}

// ---- token verification ------------------------------------------------------------

fn verify_ok(user_id: &str, email: &str) -> Step {
    Step::body(
        200,
        "application/json",
        format!(r#"{{"valid":true,"user_id":"{user_id}","email":"{email}"}}"#),
    )
}

#[tokio::test]
async fn user_me_needs_a_token_and_answers_from_the_verification() {
    let t = Trio::new().await;
    let gw = spawn(t.config()).await;
    let c = client();
    let me = format!("{}/api/user/me", gw.url());

    let r = c.get(&me).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body = json(r).await;
    assert_eq!(body["error"], "Missing Authorization header");
    assert_eq!(body["reason"], "unauthenticated");

    let r = c
        .get(&me)
        .header("authorization", "Token abc")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(json(r).await["error"], "Missing Authorization header");
    assert_eq!(
        t.auth.hits(),
        0,
        "malformed headers are refused without a verify call"
    );

    t.auth.set_steps([Step::body(
        401,
        "application/json",
        r#"{"valid":false,"error":"Invalid token"}"#,
    )]);
    let r = c
        .get(&me)
        .bearer_auth("rejected-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(json(r).await["error"], "Invalid token");
    let verify = t.auth.last_request().unwrap();
    assert_eq!(verify.path_and_query, "/verify");
    assert_eq!(
        serde_json::from_slice::<Value>(&verify.body).unwrap()["token"],
        "rejected-token"
    );

    t.auth.set_steps([verify_ok("42", "trader@example.com")]);
    let r = c.get(&me).bearer_auth("good-token").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body = json(r).await;
    assert_eq!(body["user_id"], "42");
    assert_eq!(body["email"], "trader@example.com");
}

#[tokio::test]
async fn verified_identity_reaches_the_upstream_and_spoofs_never_do() {
    let t = Trio::new().await;
    t.auth.set_steps([verify_ok("7", "seven@example.com")]);
    let mut cfg = t.config();
    let chain = cfg
        .routes
        .iter_mut()
        .find(|r| r.path == "/api/data/chain/{product}")
        .unwrap();
    chain.auth = true;
    chain.cache = None;
    let gw = spawn(cfg).await;
    let c = client();
    let r = c
        .get(format!("{}/api/data/chain/NIFTY", gw.url()))
        .bearer_auth("tok")
        .header("x-user-id", "1")
        .header("X-User-Email", "root@evil")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let got = t.storage.last_request().unwrap();
    assert_eq!(got.headers["x-user-id"], "7");
    assert_eq!(got.headers["x-user-email"], "seven@example.com");
    assert_eq!(got.headers.get_all("x-user-id").iter().count(), 1);

    // On a public route the spoofed headers are simply removed.
    c.get(format!("{}/api/data/underlying/NIFTY", gw.url()))
        .header("x-user-id", "1")
        .header("x-user-role", "admin")
        .send()
        .await
        .unwrap();
    let got = t.storage.last_request().unwrap();
    assert!(!got.headers.contains_key("x-user-id"));
    assert!(!got.headers.contains_key("x-user-role"));
}

#[tokio::test]
async fn auth_service_down_or_slow_is_503_never_401() {
    let dead = refused_addr().await;
    let t = Trio::new().await;
    let mut cfg = t.config();
    cfg.upstreams.get_mut("auth").unwrap().url = format!("http://{dead}");
    let gw = spawn(cfg).await;
    let r = client()
        .get(format!("{}/api/user/me", gw.url()))
        .bearer_auth("tok")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body = json(r).await;
    assert_eq!(body["reason"], "auth_unavailable");

    t.auth.set_steps([Step::Hang]);
    let mut cfg = t.config();
    cfg.auth.verify_timeout = Dur::from_millis(200);
    let gw = spawn(cfg).await;
    let r = client()
        .get(format!("{}/api/user/me", gw.url()))
        .bearer_auth("tok")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(json(r).await["reason"], "auth_unavailable");

    t.auth.set_steps([Step::status(500)]);
    let r = client()
        .get(format!("{}/api/user/me", gw.url()))
        .bearer_auth("tok2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
}

#[tokio::test]
async fn a_burst_with_one_token_makes_one_verify_call() {
    let t = Trio::new().await;
    t.auth
        .set_steps([verify_ok("9", "nine@example.com").delayed(Duration::from_millis(100))]);
    let gw = spawn(t.config()).await;
    let c = client();
    let url = format!("{}/api/user/me", gw.url());
    let calls = (0..50).map(|_| {
        let c = c.clone();
        let url = url.clone();
        async move {
            c.get(url)
                .bearer_auth("burst-token")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    let statuses = futures_util::future::join_all(calls).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(t.auth.hits(), 1);
    // A different token is verified on its own.
    t.auth.set_steps([verify_ok("10", "ten@example.com")]);
    let r = c.get(&url).bearer_auth("other-token").send().await.unwrap();
    assert_eq!(json(r).await["user_id"], "10");
    assert_eq!(t.auth.hits(), 2);
}

// ---- docs and admin ----------------------------------------------------------------

#[tokio::test]
async fn docs_list_every_route_and_ui_is_served_without_a_cdn() {
    let t = Trio::new().await;
    let gw = spawn(t.config()).await;
    let c = client();
    let doc = json(
        c.get(format!("{}/api/docs", gw.url()))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(doc["openapi"], "3.0.3");
    for path in [
        "/api/auth/register",
        "/api/auth/login",
        "/api/data/underlying/{product}",
        "/api/data/chain/{product}",
        "/api/data/products",
        "/api/analytics/pcr/{product}",
        "/api/analytics/volatility-surface/{product}",
        "/api/user/me",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing");
    }
    assert!(doc["components"]["securitySchemes"]["bearerAuth"].is_object());
    let ui = c
        .get(format!("{}/api/docs/ui", gw.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(ui.contains("/api/docs/ui/swagger-ui-bundle.js"));
    assert!(
        !ui.contains("http"),
        "the UI page must not load anything from a CDN"
    );
    let js = c
        .get(format!("{}/api/docs/ui/swagger-ui-bundle.js", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(js.status(), 200);
    assert!(js.bytes().await.unwrap().len() > 100_000);
}

#[tokio::test]
async fn admin_serves_readiness_and_metrics_by_route_template() {
    let t = Trio::new().await;
    let gw = spawn(t.config()).await;
    let c = client();
    c.get(format!("{}/api/data/underlying/NIFTY", gw.url()))
        .send()
        .await
        .unwrap();
    let admin = format!("http://{}", gw.admin_addr);
    let r = c.get(format!("{admin}/ready")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let m = scrape(gw.admin_addr).await;
    assert!(m.contains("gateway_requests_total"), "{m}");
    assert!(m.contains(r#"route="/api/data/underlying/{product}""#));
    assert!(!m.contains("NIFTY"), "raw paths must not become labels");
    // The admin endpoints are not on the public listener.
    let r = c.get(format!("{}/metrics", gw.url())).send().await.unwrap();
    assert_eq!(r.status(), 404);

    let dead = refused_addr().await;
    let mut cfg = t.config();
    cfg.upstreams.get_mut("analytics").unwrap().url = format!("http://{dead}");
    let gw = spawn(cfg).await;
    let r = c
        .get(format!("http://{}/ready", gw.admin_addr))
        .send()
        .await
        .unwrap();
    // Still ready: one backend down must not take the gateway out of rotation (it answers
    // honest 503s for that backend); the body says which is down.
    assert_eq!(r.status(), 200);
    let body = json(r).await;
    assert_eq!(body["status"], "ready");
    assert_eq!(body["upstreams"]["analytics"]["status"], "down");
    assert_eq!(body["upstreams"]["storage"]["status"], "up");
}

/// `/ready` reuses its upstreams' reachability for a second: a flood of probes (or an
/// orchestrator probing every 100 ms) does not connect to every upstream each time, and an
/// answer after that second starts one new round in the background without waiting for it.
#[tokio::test]
async fn ready_checks_reachability_at_most_once_a_second() {
    let t = Trio::new().await;
    // The analytics upstream is a listener that counts the connections made to it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connects = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = connects.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(s);
        }
    });
    let mut cfg = t.config();
    cfg.upstreams.get_mut("analytics").unwrap().url = format!("http://{addr}");
    let gw = spawn(cfg).await;
    let c = client();
    let ready = format!("http://{}/ready", gw.admin_addr);
    let connects_now = || connects.load(std::sync::atomic::Ordering::SeqCst);
    let until = |want: usize| async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while connects_now() < want && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        connects_now()
    };

    let started = std::time::Instant::now();
    let body = json(c.get(&ready).send().await.unwrap()).await;
    assert_eq!(body["upstreams"]["analytics"]["status"], "up", "{body}");
    assert_eq!(body["reachability_age_ms"], 0, "{body}");
    assert_eq!(until(1).await, 1);
    for _ in 0..20 {
        let r = c.get(&ready).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Within the second, none of the 20 connected again (a busy machine may have taken
    // longer than the second over them: then one background round is allowed).
    let within = started.elapsed() < Duration::from_millis(900);
    assert!(
        connects_now() == 1 || (!within && connects_now() == 2),
        "{} connects in {:?}",
        connects_now(),
        started.elapsed()
    );

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = connects_now();
    let body = json(c.get(&ready).send().await.unwrap()).await;
    // Answered from the last round, which is over a second old; the next one runs behind it.
    assert!(
        body["reachability_age_ms"].as_u64().unwrap() >= 1000,
        "{body}"
    );
    assert_eq!(until(before + 1).await, before + 1);
    let body = json(c.get(&ready).send().await.unwrap()).await;
    assert!(
        body["reachability_age_ms"].as_u64().unwrap() < 1000,
        "{body}"
    );
}

/// The admin listener has a thread and runtime of its own: with the serving runtime blocked
/// (a task that never yields stands in for a runtime saturated by a flood or starved by a
/// CPU quota), `/ready` and `/metrics` still answer at once while public `/health` waits.
#[tokio::test]
async fn admin_answers_while_the_serving_runtime_is_blocked() {
    let t = Trio::new().await;
    let gw = spawn(t.config()).await;
    // Warm both listeners up (first connections, the reachability round).
    let c = client();
    let ready = format!("http://{}/ready", gw.admin_addr);
    assert_eq!(c.get(&ready).send().await.unwrap().status(), 200);
    assert_eq!(
        c.get(format!("{}/health", gw.url()))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    /// One GET over a blocking socket: the status and how long it took.
    fn get(addr: std::net::SocketAddr, path: &str) -> (u16, Duration) {
        use std::io::{Read, Write};
        let started = std::time::Instant::now();
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out)
            .unwrap_or_else(|e| panic!("{path}: {e}: {out:?}"));
        (out[9..12].parse().expect("status"), started.elapsed())
    }
    const BLOCKED: Duration = Duration::from_millis(2000);
    let (admin, public) = (gw.admin_addr, gw.addr);
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let client = std::thread::spawn(move || {
        wait.recv().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let ready = get(admin, "/ready");
        let metrics = get(admin, "/metrics");
        let health = get(public, "/health");
        (ready, metrics, health)
    });
    go.send(()).unwrap();
    // The test's runtime is the gateway's serving runtime: block it.
    std::thread::sleep(BLOCKED);
    // Joined off the runtime: the client's last request needs it running again.
    let (ready, metrics, health) = tokio::task::spawn_blocking(move || client.join().unwrap())
        .await
        .unwrap();
    assert_eq!(ready.0, 200);
    assert_eq!(metrics.0, 200);
    // Answered while the serving runtime was still blocked (margins for a busy machine: the
    // two answers take milliseconds, the block lasts 1.9 s after they were asked).
    assert!(
        ready.1 + metrics.1 < Duration::from_millis(1500),
        "/ready {:?}, /metrics {:?}",
        ready.1,
        metrics.1
    );
    // Public /health was asked after them and waited for the block to end: it really was
    // blocked.
    assert_eq!(health.0, 200);
    assert!(
        ready.1 + metrics.1 + health.1 >= BLOCKED - Duration::from_millis(150),
        "public /health answered during the block: {:?}",
        health.1
    );
}

#[tokio::test]
async fn graceful_shutdown_lets_in_flight_requests_finish() {
    let t = Trio::new().await;
    t.storage
        .set_steps([Step::status(200).delayed(Duration::from_millis(400))]);
    let gw = spawn(t.config()).await;
    let url = format!("{}/api/data/products", gw.url());
    let in_flight =
        tokio::spawn(async move { client().get(url).send().await.map(|r| r.status().as_u16()) });
    // Shut down only once the request is provably in flight (the upstream has it).
    while t.storage.hits() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let addr = gw.addr;
    gw.shutdown().await;
    assert_eq!(in_flight.await.unwrap().unwrap(), 200);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
}

#[tokio::test]
async fn local_jwt_mode_verifies_in_process() {
    use base64::Engine;
    let t = Trio::new().await;
    let mut cfg = t.config();
    cfg.auth.mode = deltastream_gateway::config::AuthMode::Local;
    cfg.auth.jwt_secret = Some("s3cret-for-tests".into());
    let gw = spawn(cfg).await;
    let c = client();
    let me = format!("{}/api/user/me", gw.url());
    let good = deltastream_gateway::sim::auth::issue_token(
        b"s3cret-for-tests",
        "u-1",
        "local@example.com",
        Duration::from_secs(600),
    )
    .unwrap();
    let r = c.get(&me).bearer_auth(&good).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(json(r).await["user_id"], "u-1");

    let wrong_key = deltastream_gateway::sim::auth::issue_token(
        b"other",
        "u-1",
        "x@y",
        Duration::from_secs(600),
    )
    .unwrap();
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let alg_none = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(r#"{"sub":"admin","email":"a@b","exp":9999999999}"#)
    );
    // Over the verifier's 8 KiB token cap but inside the 64 KiB head limit: 401. (A 100 KB
    // one is refused earlier, with 431, by the connection's head-size limit.)
    let huge = "a".repeat(20_000);
    for bad in [
        wrong_key.as_str(),
        alg_none.as_str(),
        "not.a.jwt",
        huge.as_str(),
    ] {
        let r = c.get(&me).bearer_auth(bad).send().await.unwrap();
        assert_eq!(r.status(), 401, "accepted {bad:.40}");
    }
    let r = c
        .get(&me)
        .bearer_auth("a".repeat(100_000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    assert_eq!(
        t.auth.hits(),
        0,
        "local mode must not call the auth service"
    );
}
