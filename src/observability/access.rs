//! The outermost middleware: request id, panic -> 500, one JSON access-log line and the
//! request metrics. Doing all four in one place costs one clock read and one pass.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use futures_util::FutureExt;
use http::{HeaderName, HeaderValue, StatusCode};

use super::metrics::{method_label, record_request, status_class};
use crate::error::GatewayError;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request's id, from a well-formed client `X-Request-Id` or freshly made.
#[derive(Clone, Debug)]
pub struct RequestId(pub HeaderValue);

impl RequestId {
    pub fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or("")
    }
}

/// The TCP peer, inserted by the server for every request.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub SocketAddr);

/// What the handler learned that the access log needs; set as a response extension.
#[derive(Clone, Debug, Default)]
pub struct RouteInfo {
    pub route: Option<Arc<str>>,
    pub upstream: Option<Arc<str>>,
}

/// Settings the middleware needs, shared by every request.
#[derive(Clone)]
pub struct AccessSettings {
    pub timeout_status: StatusCode,
}

/// Accepts a client id only if short and made of safe characters: it is echoed in
/// headers and logs, so anything else is replaced rather than trusted.
fn client_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'))
}

fn new_request_id() -> HeaderValue {
    let n: u128 = rand::random();
    let mut buf = [0u8; 32];
    hex::encode_to_slice(n.to_be_bytes(), &mut buf).expect("32 hex chars for 16 bytes");
    HeaderValue::from_bytes(&buf).expect("hex is a valid header value")
}

pub async fn access_layer(
    State(settings): State<AccessSettings>,
    mut req: Request,
    next: Next,
) -> Response {
    let start = Instant::now();
    let rid = match req.headers().get(&X_REQUEST_ID) {
        Some(v) if client_request_id(v) => v.clone(),
        _ => new_request_id(),
    };
    req.extensions_mut().insert(RequestId(rid.clone()));
    let method = req.method().clone();
    // A `Uri` clone shares its bytes: the path for the log line costs no copy.
    let uri = req.uri().clone();
    let remote = req.extensions().get::<ClientAddr>().map(|c| c.0);

    let mut resp = match AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(resp) => resp,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!(request_id = rid.to_str().unwrap_or(""), panic = %what, "handler panicked");
            GatewayError::Internal.to_response(rid.to_str().unwrap_or(""), settings.timeout_status)
        }
    };
    resp.headers_mut().insert(X_REQUEST_ID.clone(), rid.clone());

    let status = resp.status().as_u16();
    let elapsed = start.elapsed();
    let info = resp.extensions().get::<RouteInfo>();
    let route = info.and_then(|i| i.route.clone());
    let upstream = info.and_then(|i| i.upstream.clone());
    record_request(
        route.as_deref().unwrap_or("unmatched"),
        method_label(&method),
        status_class(status),
        elapsed.as_secs_f64(),
    );
    tracing::info!(
        target: "access",
        method = %method,
        path = uri.path(),
        route = route.as_deref().unwrap_or(""),
        status,
        latency_ms = elapsed.as_secs_f64() * 1000.0,
        upstream = upstream.as_deref().unwrap_or(""),
        remote = %remote.map(|r| r.to_string()).unwrap_or_default(),
        request_id = rid.to_str().unwrap_or(""),
    );
    resp
}
