//! The admin listener (loopback by default): readiness, Prometheus metrics and operator
//! actions. Kept off the public listener so clients cannot read internals or reset state.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use http::header::CONTENT_TYPE;
use http::{HeaderValue, StatusCode};
use serde_json::json;

use super::AppState;

pub fn router(app: Arc<AppState>) -> Router {
    Router::new()
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/admin/breakers", get(breakers))
        .route("/admin/upstreams", get(upstreams))
        .route("/admin/breakers/{upstream}/reset", post(reset_breaker))
        .route("/admin/cache", delete(purge_cache))
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

/// Each upstream's breaker: state, counts, seconds until the next probe.
async fn breakers(State(app): State<Arc<AppState>>) -> Response {
    let list: Vec<_> = app
        .upstreams
        .iter()
        .map(|u| u.pipeline.breaker().snapshot())
        .collect();
    Json(json!({ "breakers": list })).into_response()
}

/// Each upstream's instances: address, state (healthy / ejected / draining), how long an
/// ejection or a 429/503 bias still lasts, calls in flight, peak-EWMA latency, counts.
async fn upstreams(State(app): State<Arc<AppState>>) -> Response {
    let list: Vec<_> = app
        .upstreams
        .iter()
        .map(|u| {
            let instances = u.pipeline.instances().snapshot();
            json!({
                "upstream": &*u.name,
                "breaker": u.pipeline.breaker().state(),
                "instances": instances,
            })
        })
        .collect();
    Json(json!({ "upstreams": list })).into_response()
}

fn admin_error(status: StatusCode, reason: &str, message: String) -> Response {
    (status, Json(json!({"error": message, "reason": reason}))).into_response()
}

/// Closes one upstream's breaker (an operator who knows the upstream is back).
async fn reset_breaker(State(app): State<Arc<AppState>>, Path(upstream): Path<String>) -> Response {
    match app.upstreams.iter().find(|u| *u.name == *upstream) {
        Some(u) => {
            u.pipeline.breaker().reset();
            tracing::info!(upstream = %u.name, "circuit breaker reset by operator");
            Json(u.pipeline.breaker().snapshot()).into_response()
        }
        None => admin_error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no upstream named {upstream:?}"),
        ),
    }
}

#[derive(serde::Deserialize)]
struct PurgeQuery {
    /// A route template, e.g. `/api/data/products`; all routes when absent.
    route: Option<String>,
}

/// Purges the response cache, or one route's entries.
async fn purge_cache(State(app): State<Arc<AppState>>, Query(q): Query<PurgeQuery>) -> Response {
    match q.route {
        Some(route) => {
            if !app.table.routes().iter().any(|r| *r.label == *route) {
                return admin_error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("no route {route:?}"),
                );
            }
            app.cache.purge_route(&route).await;
            Json(json!({"purged": route})).into_response()
        }
        None => {
            app.cache.purge().await;
            Json(json!({"purged": "all"})).into_response()
        }
    }
}
