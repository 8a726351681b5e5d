//! The `/_faults` switch: make a simulated service slow, failing or unresponsive on demand, so
//! tests and chaos experiments can exercise the gateway's timeouts, retries and breakers
//! without stopping containers.
//!
//! `POST /_faults` replaces the whole setting (omitted fields fall back to their defaults, so a
//! POST never silently keeps an old fault); `GET` shows it; `DELETE` clears it. The switch
//! itself and `/health` are never affected.
//!
//! Order per request: wait while `hang` is on; then take a place in line for one of `workers`
//! (the capacity fault, see [`super::workers`]: 0 = unlimited; beyond `backlog` waiting
//! requests, a 503 `{"error": "backlog full"}` at once); then, HOLDING the worker, sleep
//! `latency_ms` plus uniform jitter and fail with probability `error_rate` or serve the
//! request. So 16 workers x 200 ms serve 80 req/s at most, and a request whose client gave up
//! is still served when its turn comes (a request in gunicorn's backlog is). Requests parked
//! by `hang` are released as soon as `hang` is turned off (or the server shuts down) and
//! continue with whatever setting is then current, like a paused container that is resumed;
//! latency and errors are likewise drawn when a request gets its worker.
//!
//! `GET /_faults` shows the setting plus `state`: `busy` (holding a worker), `queued`
//! (waiting for one), and the totals `served` and `refused` (backlog full) since start.
//!
//! The socket service's WebSocket handshake (`GET /ws`) is a request like any other. After
//! the upgrade, `hang` and `latency_ms` + jitter also hold back every batch of ticks (see
//! [`Faults::delay`]); `error_rate` does not apply to ticks. The socket service adds one
//! action of its own, `POST /_faults/drop`: every open WebSocket is closed abruptly (TCP
//! close, no close frame) and the answer is `{"dropped": <count>}`.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;

use super::workers::{PoolState, WorkerPool};
use super::{parse_json_body, ApiError};

/// Longest latency or jitter accepted: long enough for any timeout test, short enough that a
/// typo cannot park requests for days.
const MAX_DELAY_MS: u64 = 3_600_000;

/// Most workers accepted: far beyond any simulated service, small enough to catch a typo.
const MAX_WORKERS: u32 = 100_000;

/// Longest backlog bound accepted (an unbounded backlog is `null`).
const MAX_BACKLOG: u32 = 1_000_000;

/// The active fault setting, as posted and as returned.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultSettings {
    pub latency_ms: u64,
    /// Extra delay drawn uniformly from `0..=jitter_ms`, so latency is not perfectly regular.
    pub jitter_ms: u64,
    /// Probability in [0, 1] of answering `error_status` instead of the real response.
    pub error_rate: f64,
    pub error_status: u16,
    /// Park requests without answering, to exercise client timeouts.
    pub hang: bool,
    /// Requests served at once (each holds its worker for latency + jitter), the rest wait
    /// in a FIFO backlog, as under gunicorn sync workers: the capacity fault. 0 = unlimited.
    pub workers: u32,
    /// Waiting requests beyond which new ones get a 503 at once; `None` = unbounded.
    pub backlog: Option<u32>,
}

impl Default for FaultSettings {
    fn default() -> FaultSettings {
        FaultSettings {
            latency_ms: 0,
            jitter_ms: 0,
            error_rate: 0.0,
            error_status: 503,
            hang: false,
            workers: 0,
            backlog: None,
        }
    }
}

impl FaultSettings {
    fn validate(&self) -> Result<(), ApiError> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err(ApiError::bad_request("error_rate must be between 0 and 1"));
        }
        if !(400..=599).contains(&self.error_status) {
            return Err(ApiError::bad_request(
                "error_status must be between 400 and 599",
            ));
        }
        if self.latency_ms > MAX_DELAY_MS || self.jitter_ms > MAX_DELAY_MS {
            return Err(ApiError::bad_request(format!(
                "latency_ms and jitter_ms must be at most {MAX_DELAY_MS}"
            )));
        }
        if self.workers > MAX_WORKERS {
            return Err(ApiError::bad_request(format!(
                "workers must be at most {MAX_WORKERS} (0 = unlimited)"
            )));
        }
        if let Some(backlog) = self.backlog {
            if self.workers == 0 {
                return Err(ApiError::bad_request(
                    "backlog needs workers > 0: without a worker limit nothing waits",
                ));
            }
            if backlog > MAX_BACKLOG {
                return Err(ApiError::bad_request(format!(
                    "backlog must be at most {MAX_BACKLOG} (null = unbounded)"
                )));
            }
        }
        Ok(())
    }
}

/// What hung requests watch: the setting plus whether the server is shutting down.
#[derive(Clone, Copy, Debug, Default)]
struct Switch {
    settings: FaultSettings,
    /// Set once on shutdown so graceful drain is not blocked forever by parked requests.
    draining: bool,
}

/// Shared handle on one service's fault switch.
#[derive(Clone, Debug)]
pub struct Faults {
    /// A watch channel rather than a mutex: parked requests need to be woken when it changes.
    switch: watch::Sender<Switch>,
    /// The capacity fault's workers and backlog, resized by every setting change.
    workers: WorkerPool,
}

impl Default for Faults {
    fn default() -> Faults {
        Faults {
            switch: watch::Sender::new(Switch::default()),
            workers: WorkerPool::default(),
        }
    }
}

/// `GET /_faults`: the setting and what the capacity fault is doing right now.
#[derive(Debug, Serialize)]
struct FaultView {
    #[serde(flatten)]
    settings: FaultSettings,
    state: PoolState,
}

impl Faults {
    pub fn settings(&self) -> FaultSettings {
        self.switch.borrow().settings
    }

    /// Wraps every route of `api` (and its fallback) with the fault middleware.
    pub fn wrap(&self, api: Router) -> Router {
        api.layer(middleware::from_fn_with_state(self.clone(), inject))
    }

    /// `GET | POST | DELETE /_faults`.
    pub fn control_routes(&self) -> Router {
        Router::new()
            .route(
                "/_faults",
                get(show_faults).post(set_faults).delete(clear_faults),
            )
            .with_state(self.clone())
    }

    /// Lets every parked or queued request continue; called when the server starts draining.
    pub fn release_hung_requests(&self) {
        self.switch.send_modify(|switch| switch.draining = true);
        self.workers.drain();
    }

    /// The capacity fault's occupancy and totals.
    pub fn pool_state(&self) -> PoolState {
        self.workers.state()
    }

    fn replace(&self, settings: FaultSettings) {
        tracing::warn!(?settings, "fault injection setting changed");
        self.switch.send_modify(|switch| switch.settings = settings);
        self.workers.configure(settings.workers, settings.backlog);
    }

    async fn wait_while_hung(&self) {
        let mut changes = self.switch.subscribe();
        // `wait_for` checks the current value first, then every change; it only errs if the
        // sender is gone, which cannot happen while `self` holds it.
        let _ = changes
            .wait_for(|switch| !switch.settings.hang || switch.draining)
            .await;
    }

    /// Holds back a message the way a request is held back: while `hang` is on, then for
    /// `latency_ms` plus jitter. The socket service awaits this before each batch of ticks.
    pub async fn delay(&self) {
        self.wait_while_hung().await;
        let delay = jittered_latency(&self.settings());
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
    }
}

/// `latency_ms` plus a uniform draw from `0..=jitter_ms`, in milliseconds.
fn jittered_latency(settings: &FaultSettings) -> u64 {
    let jitter = if settings.jitter_ms > 0 {
        rand::random_range(0..=settings.jitter_ms)
    } else {
        0
    };
    settings.latency_ms.saturating_add(jitter)
}

async fn inject(State(faults): State<Faults>, request: Request, next: Next) -> Response {
    faults.wait_while_hung().await;

    // The place in line is taken on arrival, so the backlog is FIFO by arrival.
    let ticket = match faults.workers.enter() {
        Ok(ticket) => ticket,
        Err(full) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": full.to_string()})),
            )
                .into_response()
        }
    };
    // On a task of its own: when the client gives up (a gateway's timeout), the request still
    // waits its turn and spends its worker's service time, as a request already accepted into
    // gunicorn's backlog does. That wasted work is what makes a long queue in front of a
    // saturated service so costly, and the simulator must not hide it.
    let served = tokio::spawn(async move {
        let _worker = ticket.worker().await;
        let settings = faults.settings();
        // Drawn before any await: the thread-local RNG must not be held across one.
        let delay = jittered_latency(&settings);
        let fail = settings.error_rate > 0.0 && rand::random::<f64>() < settings.error_rate;

        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if fail {
            let status = StatusCode::from_u16(settings.error_status)
                .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return (status, Json(json!({"error": "injected fault"}))).into_response();
        }
        next.run(request).await
    });
    match served.await {
        Ok(response) => response,
        Err(join_error) => ApiError::internal(join_error).into_response(),
    }
}

async fn show_faults(State(faults): State<Faults>) -> Json<FaultView> {
    Json(FaultView {
        settings: faults.settings(),
        state: faults.pool_state(),
    })
}

async fn set_faults(
    State(faults): State<Faults>,
    body: Bytes,
) -> Result<Json<FaultSettings>, ApiError> {
    // An empty POST means "defaults", the same as `{}`.
    let settings: FaultSettings = if body.iter().all(u8::is_ascii_whitespace) {
        FaultSettings::default()
    } else {
        parse_json_body(&body)?
    };
    settings.validate()?;
    faults.replace(settings);
    Ok(Json(settings))
}

async fn clear_faults(State(faults): State<Faults>) -> Json<FaultSettings> {
    faults.replace(FaultSettings::default());
    Json(FaultSettings::default())
}
