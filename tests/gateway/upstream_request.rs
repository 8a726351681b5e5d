//! The request the gateway sends upstream, as the upstream receives it: one builder
//! (`routes::outgoing`) for proxied requests, cache fills and WebSocket handshakes, so each
//! carries the same forwarding headers, request id, verified identity and trace context; the
//! gateway's own token verification carries none of the client's.

use crate::support;

use deltastream_gateway::config::Config;
use http::HeaderMap;
use support::gateway::{client, config_with_upstreams, spawn};
use support::{FakeUpstream, Step};

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

struct Upstreams {
    auth: FakeUpstream,
    storage: FakeUpstream,
    socket: FakeUpstream,
}

async fn upstreams() -> Upstreams {
    let verified = Step::body(
        200,
        "application/json",
        r#"{"valid":true,"user_id":"u-7","email":"u7@example.com"}"#,
    );
    Upstreams {
        auth: FakeUpstream::builder().then(verified).start().await,
        storage: FakeUpstream::ok().await,
        // Refuses the upgrade: its answer reaches the client, and the handshake it was sent
        // is recorded like any request.
        socket: FakeUpstream::builder()
            .then(Step::status(404))
            .start()
            .await,
    }
}

/// The embedded routes, `/api/data/underlying/{product}` and `/ws` behind a token.
fn config(u: &Upstreams) -> Config {
    let (a, s, w) = (u.auth.url(), u.storage.url(), u.socket.url());
    let mut cfg = config_with_upstreams(move |name| match name {
        "auth" => a.clone(),
        "socket" => w.clone(),
        _ => s.clone(),
    });
    for r in cfg.routes.iter_mut() {
        if r.path == "/api/data/underlying/{product}" || r.path == "/ws" {
            r.auth = true;
        }
    }
    cfg
}

/// What every request sent for a client carries: the gateway's view of where it came from,
/// the client's request id, and the client's trace with the gateway's span as the parent.
fn assert_forwarded(h: &HeaderMap, what: &str) {
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{what}: {h:?}");
    assert_eq!(h["x-forwarded-proto"], "http", "{what}");
    assert_eq!(h["x-request-id"], "client-rid-1", "{what}");
    let tp = h["traceparent"].to_str().unwrap();
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{what}: {tp}");
    assert_eq!(
        parts[1], CLIENT_TRACE,
        "{what}: the client's trace continues"
    );
    assert_ne!(
        parts[2], CLIENT_SPAN,
        "{what}: the gateway is a hop of its own"
    );
    assert_eq!(parts[3], "01", "{what}");
    assert_eq!(h["tracestate"], "vendor=x", "{what}");
    // Hop-by-hop headers and those the client named in `Connection` stop here.
    assert!(h.get("x-hop").is_none(), "{what}: {h:?}");
    assert!(h.get("keep-alive").is_none(), "{what}");
}

fn client_request(req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    req.header("x-request-id", "client-rid-1")
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .header("tracestate", "vendor=x")
        .header("connection", "x-hop")
        .header("x-hop", "1")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-user-id", "spoofed")
}

#[tokio::test]
async fn proxied_requests_and_cache_fills_carry_forwarding_identity_and_trace() {
    let u = upstreams().await;
    let gw = spawn(config(&u)).await;
    let c = client();

    // A route behind a token: the identity the auth service vouched for, never the client's.
    let resp = client_request(c.get(format!(
        "http://{}/api/data/underlying/NIFTY?limit=5",
        gw.addr
    )))
    .header("authorization", "Bearer good.token")
    .send()
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "client-rid-1");
    let seen = u.storage.last_request().unwrap();
    assert_eq!(seen.path_and_query, "/underlying/NIFTY?limit=5");
    assert_forwarded(&seen.headers, "proxied");
    assert_eq!(seen.headers["x-user-id"], "u-7");
    assert_eq!(seen.headers["x-user-email"], "u7@example.com");
    assert_eq!(seen.headers["authorization"], "Bearer good.token");

    // The gateway's own call to verify the token: none of the client's headers, request id
    // or trace (concurrent requests with one token share that call).
    let verify = u.auth.last_request().unwrap();
    assert_eq!(verify.method, http::Method::POST);
    assert_eq!(verify.path_and_query, "/verify");
    assert_eq!(verify.headers["content-type"], "application/json");
    for absent in [
        "x-request-id",
        "traceparent",
        "x-forwarded-for",
        "x-user-id",
        "authorization",
    ] {
        assert!(verify.headers.get(absent).is_none(), "{absent}: {verify:?}");
    }
    let body: serde_json::Value = serde_json::from_slice(&verify.body).unwrap();
    assert_eq!(body["token"], "good.token");

    // A cache fill (a HEAD asks the upstream for GET, so the entry has a body) is built the
    // same way.
    let resp = client_request(c.head(format!("http://{}/api/data/products", gw.addr)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-cache"], "MISS");
    let fill = u.storage.last_request().unwrap();
    assert_eq!(fill.method, http::Method::GET);
    assert_eq!(fill.path_and_query, "/products");
    assert_forwarded(&fill.headers, "cache fill");
    assert!(fill.headers.get("x-user-id").is_none(), "{fill:?}");
}

#[tokio::test]
async fn the_websocket_handshake_is_built_like_any_forwarded_request() {
    let u = upstreams().await;
    let gw = spawn(config(&u)).await;
    let resp = client_request(client().get(format!(
        "http://{}/ws?access_token=query.token&product=NIFTY",
        gw.addr
    )))
    // The client's `Connection` names the upgrade and `x-hop`.
    .header("connection", "upgrade, x-hop")
    .header("upgrade", "websocket")
    .header("sec-websocket-version", "13")
    .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
    .send()
    .await
    .unwrap();
    // The upstream's refusal is the answer, as for any route.
    assert_eq!(resp.status(), 404);
    let seen = u.socket.last_request().unwrap();
    assert_eq!(seen.method, http::Method::GET);
    assert_eq!(
        seen.path_and_query, "/ws?product=NIFTY",
        "the token stays here"
    );
    assert_forwarded(&seen.headers, "handshake");
    assert_eq!(seen.headers["x-user-id"], "u-7");
    assert!(seen.headers.get("authorization").is_none(), "{seen:?}");
    assert_eq!(seen.headers["connection"], "Upgrade");
    assert_eq!(seen.headers["upgrade"], "websocket");
    assert_eq!(
        seen.headers["sec-websocket-key"],
        "dGhlIHNhbXBsZSBub25jZQ=="
    );
}

#[tokio::test]
async fn the_websocket_origin_check_is_the_cors_policy() {
    let u = upstreams().await;
    let mut cfg = config(&u);
    cfg.cors.allowed_origins = vec!["https://app.example".into()];
    let gw = spawn(cfg).await;
    let c = client();
    let handshake = |origin: &'static str| {
        c.get(format!("http://{}/ws?access_token=t", gw.addr))
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("origin", origin)
    };
    // CORS grants this origin nothing, so neither does the handshake.
    let preflight = c
        .request(
            http::Method::OPTIONS,
            format!("http://{}/api/data/products", gw.addr),
        )
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(preflight
        .headers()
        .get("access-control-allow-origin")
        .is_none());
    let resp = handshake("https://evil.example").send().await.unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(u.socket.hits(), 0);
    // The origin CORS allows reaches the upstream (whose 404 is the answer).
    let resp = handshake("https://app.example").send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(u.socket.hits(), 1);
    assert_eq!(
        u.socket.last_request().unwrap().headers["origin"],
        "https://app.example"
    );
}
