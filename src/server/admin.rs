//! The admin listener (loopback by default): readiness, Prometheus metrics and operator
//! actions (breakers, cache, configuration reload). Kept off the public listener so clients
//! cannot read internals, reset state or reload.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::extract::{FromRef, Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use http::header::CONTENT_TYPE;
use http::{HeaderValue, StatusCode};
use serde_json::json;

use super::reload::{Gateway, ReloadError};
use crate::routes::AppState;

/// The admin listener's state: the gateway, `/ready`'s reachability checks, and the
/// serving runtime (the admin listener has a thread and runtime of its own, `server::own_thread`;
/// a reload runs on the serving one, where the new state's tasks belong).
#[derive(Clone)]
struct Admin {
    gateway: Arc<Gateway>,
    checks: Arc<ReadyChecks>,
    serving: tokio::runtime::Handle,
}

impl FromRef<Admin> for Arc<Gateway> {
    fn from_ref(admin: &Admin) -> Arc<Gateway> {
        admin.gateway.clone()
    }
}

pub fn router(gateway: Arc<Gateway>, serving: tokio::runtime::Handle) -> Router {
    let state = Admin {
        gateway,
        checks: Arc::default(),
        serving,
    };
    Router::new()
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/admin/breakers", get(breakers))
        .route("/admin/upstreams", get(upstreams))
        .route("/admin/breakers/{upstream}/reset", post(reset_breaker))
        .route("/admin/cache", delete(purge_cache))
        .route("/admin/reload", post(reload))
        .route("/admin/config", get(config))
        .with_state(state)
        // Readiness, metrics and admin answers describe this instant: no cache keeps them.
        .layer(axum::middleware::map_response(no_store))
}

async fn no_store(mut resp: Response) -> Response {
    resp.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    resp
}

/// Reloads the configuration from its source (the `--config` file and the environment):
/// 200 with what changed and what needs a restart, or 400 with the field errors (the running
/// configuration stays).
async fn reload(State(admin): State<Admin>) -> Response {
    // On the serving runtime: the new state's tasks (saturation monitor, discovery, probes)
    // are spawned where they run.
    let gw = admin.gateway.clone();
    let outcome = match admin.serving.spawn(async move { gw.reload().await }).await {
        Ok(outcome) => outcome,
        Err(e) => Err(ReloadError::Failed(format!("the reload task ended: {e}"))),
    };
    match outcome {
        Ok(report) => Json(report).into_response(),
        Err(ReloadError::Invalid(errors)) => (
            StatusCode::BAD_REQUEST,
            Json(json!({
                "result": "rejected",
                "reason": "invalid_configuration",
                "errors": errors.0.iter().map(|e| json!({"field": e.path, "message": e.message})).collect::<Vec<_>>(),
            })),
        )
            .into_response(),
        Err(ReloadError::Failed(message)) => admin_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "reload_failed",
            message,
        ),
    }
}

/// The configuration in effect (secrets redacted), when it was loaded, its hash and source.
async fn config(State(gw): State<Arc<Gateway>>) -> Response {
    Json(gw.describe()).into_response()
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

/// How long `/ready` reuses its upstreams' reachability: probed every 100 ms by an
/// orchestrator, or flooded, it would otherwise resolve and connect to every upstream each time,
/// which on a replica short of CPU is work taken from the requests it serves (issue 24 item 5).
const READY_CHECK_EVERY: Duration = Duration::from_secs(1);

/// What one round of reachability checks found, one entry per upstream of `app`.
struct Checked {
    /// The configuration state the checks were made for: a reload starts over.
    app: Weak<AppState>,
    at: tokio::time::Instant,
    results: Arc<[Result<(), String>]>,
}

/// `/ready`'s reachability checks, made at most once per [`READY_CHECK_EVERY`]: an answer
/// after that shows the last round's results and starts the next round in the background
/// (at most one at a time), so `/ready` never waits for a connect, except the first time
/// after a start or a reload.
#[derive(Default)]
struct ReadyChecks {
    last: Mutex<Option<Checked>>,
    refreshing: AtomicBool,
}

impl ReadyChecks {
    /// The reachability of each upstream of `app`, and how old that finding is.
    async fn get(self: &Arc<Self>, app: &Arc<AppState>) -> (Arc<[Result<(), String>]>, Duration) {
        let cached = {
            let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            last.as_ref()
                .filter(|c| std::ptr::eq(c.app.as_ptr(), Arc::as_ptr(app)))
                .map(|c| (c.results.clone(), c.at.elapsed()))
        };
        match cached {
            Some((results, age)) => {
                if age >= READY_CHECK_EVERY && !self.refreshing.swap(true, Ordering::AcqRel) {
                    let (checks, app) = (self.clone(), app.clone());
                    tokio::spawn(async move {
                        checks.check(&app).await;
                        checks.refreshing.store(false, Ordering::Release);
                    });
                }
                (results, age)
            }
            None => (self.check(app).await, Duration::ZERO),
        }
    }

    /// One round: every upstream's primary address, at once, each within a second.
    async fn check(&self, app: &Arc<AppState>) -> Arc<[Result<(), String>]> {
        let checks = app
            .upstreams
            .iter()
            .map(|u| reachable(&u.base_url, Duration::from_secs(1)));
        let results: Arc<[_]> = futures_util::future::join_all(checks).await.into();
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(Checked {
            app: Arc::downgrade(app),
            at: tokio::time::Instant::now(),
            results: results.clone(),
        });
        results
    }
}

/// Readiness: 200 while the gateway serves (it answers every route, with honest 503s for an
/// upstream that is down), so one backend's outage never takes the gateway's replicas out of
/// a load balancer; 503 once it is draining, and, with `server.saturation.ready_lag_threshold`
/// set, while its runtime's scheduling delay stays over that threshold (`"saturated"`). The
/// body says how each upstream looks: its primary address's TCP reachability (checked at
/// most once a second: `reachability_age_ms` says how long ago), its breaker, its instances.
async fn ready(State(admin): State<Admin>) -> Response {
    let app = admin.gateway.current();
    let (reach, age) = admin.checks.get(&app).await;
    let upstreams: serde_json::Map<String, serde_json::Value> = app
        .upstreams
        .iter()
        .zip(reach.iter())
        .map(|(u, r)| {
            let instances = u.pipeline.instances().snapshot();
            let healthy = instances
                .iter()
                .filter(|i| i.state == crate::upstream::InstanceState::Healthy)
                .count();
            let mut v = match r {
                Ok(()) => json!({"status": "up"}),
                Err(e) => json!({"status": "down", "error": e}),
            };
            v["breaker"] = json!(u.pipeline.breaker().state());
            v["instances"] = json!(instances.len());
            v["healthy_instances"] = json!(healthy);
            (u.name.to_string(), v)
        })
        .collect();
    let draining = *app.shutdown.borrow();
    // The opt-in rule (`server.saturation.ready_lag_threshold`): a replica whose runtime has
    // stayed late leaves the load balancer until it catches up.
    let starved = app.saturation.not_ready();
    let (status, word) = if draining {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if starved {
        (StatusCode::SERVICE_UNAVAILABLE, "saturated")
    } else {
        (StatusCode::OK, "ready")
    };
    let mut body = json!({
        "status": word,
        "upstreams": upstreams,
        "reachability_age_ms": age.as_millis() as u64,
        "saturation": app.saturation.snapshot(),
    });
    // A 503 says why in `reason`, as every error answer of the gateway does.
    if status != StatusCode::OK {
        body["reason"] = json!(word);
    }
    (status, Json(body)).into_response()
}

async fn metrics(State(gw): State<Arc<Gateway>>) -> Response {
    // moka counts lazily: settle them so the cache gauges are exact at each scrape.
    let app = gw.current();
    app.cache.run_pending_tasks().await;
    app.cache.stats();
    // The instances' in-flight gauges are read here, not kept by every call.
    for u in app.upstreams.iter() {
        u.pipeline.instances().publish_limits();
    }
    let text = crate::observability::metrics::render();
    let mut resp = text.into_response();
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// Each upstream's breaker: state, counts, seconds until the next probe.
async fn breakers(State(gw): State<Arc<Gateway>>) -> Response {
    let app = gw.current();
    let list: Vec<_> = app
        .upstreams
        .iter()
        .map(|u| u.pipeline.breaker().snapshot())
        .collect();
    Json(json!({ "breakers": list })).into_response()
}

/// Each upstream's slots (held ones are `in_flight`: calls from their start until the
/// upstream has sent the whole body, however slowly the client reads; `max_connections`;
/// `max_per_client`), the adaptive `concurrency` limit (the admission `limit`: the sum of
/// the limits of the instances in rotation; its `in_flight`, calls `waiting`) and instances:
/// address, state (healthy / ejected / draining), how long an ejection or a 429/503 bias
/// still lasts, attempts waiting for response headers (`in_flight`, the balancer's load),
/// peak-EWMA latency, counts, and the instance's own `concurrency` (learnt `limit`, attempts
/// of limited calls `in_flight`, whether it is `counted` in the upstream's limit); and
/// `fleet_replicas`, the gateway replicas that share each upstream's `initial_limit`.
async fn upstreams(State(gw): State<Arc<Gateway>>) -> Response {
    let app = gw.current();
    let list: Vec<_> = app
        .upstreams
        .iter()
        .map(|u| {
            let instances = u.pipeline.instances().snapshot();
            let slots = u.pipeline.bulkhead();
            json!({
                "upstream": &*u.name,
                "breaker": u.pipeline.breaker().state(),
                "in_flight": slots.in_flight(),
                "max_connections": slots.capacity(),
                "max_per_client": slots.per_client(),
                // The limit learnt from latency and the calls waiting under it (null: off).
                "concurrency": u.pipeline.concurrency().map(|c| json!({
                    "limit": c.limit(),
                    "in_flight": c.in_flight(),
                    "waiting": c.waiting(),
                })),
                "instances": instances,
            })
        })
        .collect();
    Json(json!({ "upstreams": list, "fleet_replicas": app.fleet.replicas() })).into_response()
}

fn admin_error(status: StatusCode, reason: &str, message: String) -> Response {
    (status, Json(json!({"error": message, "reason": reason}))).into_response()
}

/// Closes one upstream's breaker (an operator who knows the upstream is back).
async fn reset_breaker(State(gw): State<Arc<Gateway>>, Path(upstream): Path<String>) -> Response {
    let app = gw.current();
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
async fn purge_cache(State(gw): State<Arc<Gateway>>, Query(q): Query<PurgeQuery>) -> Response {
    let app = gw.current();
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
