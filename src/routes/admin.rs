//! The admin listener (loopback by default): readiness, Prometheus metrics and operator
//! actions. Kept off the public listener so clients cannot read internals or reset state.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use http::header::CONTENT_TYPE;
use http::{HeaderValue, StatusCode};
use serde_json::json;

use super::AppState;

pub fn router(app: Arc<AppState>) -> Router {
    Router::new()
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(app)
}

/// TCP reachability of one upstream's host:port within `timeout`.
async fn reachable(url: &str, timeout: Duration) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| e.to_string())?;
    let host = parsed.host_str().ok_or("no host")?.to_string();
    let port = parsed.port_or_known_default().ok_or("no port")?;
    match tokio::time::timeout(
        timeout,
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no connection within {}ms", timeout.as_millis())),
    }
}

/// 200 only when every upstream accepts connections; otherwise 503 with per-upstream detail.
async fn ready(State(app): State<Arc<AppState>>) -> Response {
    let checks = app.upstreams.iter().map(|u| async move {
        (
            u.name.clone(),
            reachable(&u.base_url, Duration::from_secs(1)).await,
        )
    });
    let results = futures_util::future::join_all(checks).await;
    let all_ok = results.iter().all(|(_, r)| r.is_ok());
    let upstreams: serde_json::Map<String, serde_json::Value> = results
        .into_iter()
        .map(|(name, r)| {
            let v = match r {
                Ok(()) => json!({"status": "up"}),
                Err(e) => json!({"status": "down", "error": e}),
            };
            (name.to_string(), v)
        })
        .collect();
    let status = if all_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body =
        json!({"status": if all_ok { "ready" } else { "not_ready" }, "upstreams": upstreams});
    (status, Json(body)).into_response()
}

async fn metrics() -> Response {
    let text = crate::observability::metrics::handle().render();
    let mut resp = text.into_response();
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}
