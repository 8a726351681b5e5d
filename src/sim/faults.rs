//! The `/_faults` switch: make a simulated service slow, failing or unresponsive on demand, so
//! tests and chaos experiments can exercise the gateway's timeouts, retries and breakers
//! without stopping containers.
//!
//! `POST /_faults` replaces the whole setting (omitted fields fall back to their defaults, so a
//! POST never silently keeps an old fault); `GET` shows it; `DELETE` clears it. The switch
//! itself and `/health` are never affected.
//!
//! Order per request: wait while `hang` is on, then sleep `latency_ms` plus uniform jitter,
//! then fail with probability `error_rate`. Requests parked by `hang` are released as soon as
//! `hang` is turned off (or the server shuts down) and continue with whatever setting is then
//! current, like a paused container that is resumed.
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

use super::{parse_json_body, ApiError};

/// Longest latency or jitter accepted: long enough for any timeout test, short enough that a
/// typo cannot park requests for days.
const MAX_DELAY_MS: u64 = 3_600_000;

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
}

impl Default for FaultSettings {
    fn default() -> FaultSettings {
        FaultSettings {
            latency_ms: 0,
            jitter_ms: 0,
            error_rate: 0.0,
            error_status: 503,
            hang: false,
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
}

impl Default for Faults {
    fn default() -> Faults {
        Faults {
            switch: watch::Sender::new(Switch::default()),
        }
    }
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

    /// Lets every parked request continue; called when the server starts draining.
    pub fn release_hung_requests(&self) {
        self.switch.send_modify(|switch| switch.draining = true);
    }

    fn replace(&self, settings: FaultSettings) {
        tracing::warn!(?settings, "fault injection setting changed");
        self.switch.send_modify(|switch| switch.settings = settings);
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

    let settings = faults.settings();
    // Drawn before any await: the thread-local RNG must not be held across one.
    let delay = jittered_latency(&settings);
    let fail = settings.error_rate > 0.0 && rand::random::<f64>() < settings.error_rate;

    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if fail {
        let status =
            StatusCode::from_u16(settings.error_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return (status, Json(json!({"error": "injected fault"}))).into_response();
    }
    next.run(request).await
}

async fn show_faults(State(faults): State<Faults>) -> Json<FaultSettings> {
    Json(faults.settings())
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
