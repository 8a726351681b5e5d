//! Reference builds of the bare client stack, for the side-by-side benchmark (`loadtest/bench`,
//! targets `ref-reqwest` and `ref-mw`): what an axum proxy pays for the client stack the gateway
//! chose, before any policy of its own. NOT a product: no timeouts, no limits, no logs.
//!
//!   ref-proxy LISTEN_ADDR BACKEND_ADDR [reqwest|mw]
//!
//! One current-thread runtime; axum serves ONE route (`/api/data/products`) that forwards the
//! request (method, headers but `Host`, buffered body, query) to the backend and streams the
//! answer back (status, headers, body):
//! - `reqwest`: over a plain pooled `reqwest::Client` (nodelay, redirects off, like the
//!   gateway's per-instance client);
//! - `mw`: over the same client wrapped by reqwest-middleware with reqwest-retry's
//!   `RetryTransientMiddleware` (exponential backoff, 2 retries, as the gateway's default). The
//!   backend always answers 200, so no retry is ever triggered: this measures the layers only.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;
use reqwest_middleware::ClientWithMiddleware;
use reqwest_retry::{policies::ExponentialBackoff, RetryTransientMiddleware};

enum Upstream {
    Plain(reqwest::Client),
    Middleware(ClientWithMiddleware),
}

struct Proxy {
    backend: String,
    client: Upstream,
}

async fn forward(State(proxy): State<Arc<Proxy>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 1 << 20).await else {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    };
    let url = format!(
        "http://{}{}",
        proxy.backend,
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let Ok(url) = reqwest::Url::parse(&url) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let mut headers = parts.headers;
    headers.remove(http::header::HOST);
    let mut upstream = reqwest::Request::new(parts.method, url);
    *upstream.headers_mut() = headers;
    if !body.is_empty() {
        *upstream.body_mut() = Some(reqwest::Body::from(body));
    }
    let answer = match &proxy.client {
        Upstream::Plain(client) => client.execute(upstream).await.map_err(|_| ()),
        Upstream::Middleware(client) => client.execute(upstream).await.map_err(|_| ()),
    };
    match answer {
        Ok(resp) => {
            let resp: http::Response<reqwest::Body> = resp.into();
            resp.map(Body::new)
        }
        Err(()) => StatusCode::BAD_GATEWAY.into_response(),
    }
}

fn main() {
    let usage = "usage: ref-proxy LISTEN_ADDR BACKEND_ADDR [reqwest|mw]";
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args.next().and_then(|a| a.parse().ok()).expect(usage);
    let backend = args.next().expect(usage);
    let mode = args.next().unwrap_or_else(|| "reqwest".into());
    let plain = reqwest::Client::builder()
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let client = match mode.as_str() {
        "reqwest" => Upstream::Plain(plain),
        "mw" => Upstream::Middleware(
            reqwest_middleware::ClientBuilder::new(plain)
                .with(RetryTransientMiddleware::new_with_policy(
                    ExponentialBackoff::builder().build_with_max_retries(2),
                ))
                .build(),
        ),
        other => panic!("unknown mode {other}; {usage}"),
    };
    let proxy = Arc::new(Proxy { backend, client });
    let app = axum::Router::new()
        .route("/api/data/products", axum::routing::any(forward))
        .with_state(proxy);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .expect("bind")
            .tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
        axum::serve(listener, app).await.expect("serve");
    });
}
