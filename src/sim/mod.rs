//! Simulated DeltaStream backends: the services the gateway fronts, small enough to run
//! in-process in tests and in a container for the demo and the chaos experiments.
//!
//! - [`auth`]: register / login / verify with Argon2 password hashes and HS256 JWTs.
//! - [`storage`]: products, underlying ticks and option chains from the seeded [`market`].
//! - [`analytics`]: put-call ratio and volatility surface, computed from the same [`market`]
//!   in-process, so it needs no running storage service and agrees with it exactly.
//! - [`socket`]: WebSocket `/ws`: subscribe to products, receive live ticks replayed from the
//!   same [`market`], so every streamed price is one the storage service also serves.
//! - [`faults`]: opt-in `/_faults` switch (latency, errors, hang, a worker limit with a FIFO
//!   backlog; dropped WebSockets) for resilience and overload tests.
//! - [`workers`]: the worker limit and backlog behind `/_faults`' capacity fault.
//! - [`black_scholes`]: option prices and greeks, with which the [`market`] prices its
//!   option chains.
//!
//! Where to start reading: [`serve`] and [`router`] (one service, its routes and fault
//! switch), then [`market`], the seeded data every service answers from.
//!
//! Every error body is JSON `{"error": "..."}`, like the services the gateway was written for.

pub mod analytics;
pub mod auth;
pub mod black_scholes;
pub mod faults;
pub mod market;
pub mod socket;
pub mod storage;
pub mod workers;

use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::json;

use self::faults::Faults;
use self::market::Market;
use self::socket::SocketService;

/// Which backend to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    Auth,
    Storage,
    Analytics,
    Socket,
}

impl Service {
    /// The port each service listens on in the original deployment.
    pub fn default_port(self) -> u16 {
        match self {
            Service::Auth => 8001,
            Service::Storage => 8003,
            Service::Analytics => 8004,
            Service::Socket => 8002,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Service::Auth => "auth",
            Service::Storage => "storage",
            Service::Analytics => "analytics",
            Service::Socket => "socket",
        }
    }
}

/// The service name given on the command line was none of the four.
#[derive(Debug, thiserror::Error)]
#[error("unknown service {0:?}: expected auth, storage, analytics or socket")]
pub struct UnknownService(String);

impl FromStr for Service {
    type Err = UnknownService;

    fn from_str(name: &str) -> Result<Service, UnknownService> {
        match name.to_ascii_lowercase().as_str() {
            "auth" => Ok(Service::Auth),
            "storage" => Ok(Service::Storage),
            "analytics" => Ok(Service::Analytics),
            "socket" => Ok(Service::Socket),
            _ => Err(UnknownService(name.to_owned())),
        }
    }
}

/// How a simulated service behaves.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Mounts `/_faults`; off by default so a demo cannot be slowed by a stray request.
    pub faults: bool,
    /// Seeds the market generator: the same seed yields byte-identical market data.
    pub seed: u64,
    /// HS256 key for auth tokens; shared with the gateway when it verifies tokens locally.
    /// `None` makes the auth service pick a random per-process key.
    pub jwt_secret: Option<String>,
    /// How often the socket service sends each subscribed product's next tick.
    pub tick_interval: Duration,
}

impl Default for SimOptions {
    fn default() -> SimOptions {
        SimOptions {
            faults: false,
            seed: 42,
            jwt_secret: std::env::var("JWT_SECRET").ok(),
            tick_interval: socket::DEFAULT_TICK_INTERVAL,
        }
    }
}

/// Builds the service's router, ready to serve.
pub fn router(service: Service, opts: &SimOptions) -> Router {
    build(service, opts).app
}

/// Serves `service` on `listener` until `shutdown` completes, then drains in-flight requests
/// and closes open WebSockets (code 1001).
pub async fn serve(
    service: Service,
    listener: tokio::net::TcpListener,
    opts: SimOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let Built {
        app,
        faults,
        sockets,
    } = build(service, &opts);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(service = service.name(), %addr, faults = opts.faults, "sim service listening");
    }
    let closing_sockets = sockets.clone();
    // Draining waits for every in-flight request, so requests parked by a `hang` fault must be
    // released on shutdown or the process would never exit.
    let shutdown = async move {
        shutdown.await;
        if let Some(faults) = faults {
            faults.release_hung_requests();
        }
        if let Some(sockets) = closing_sockets {
            sockets.go_away();
        }
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    // Upgraded connections are no longer axum's: its drain does not wait for them. Each one
    // bounds its own close handshake; this bound only guards against a bug in that.
    if let Some(sockets) = sockets {
        if tokio::time::timeout(Duration::from_secs(10), sockets.closed())
            .await
            .is_err()
        {
            tracing::warn!(
                open = sockets.open_connections(),
                "WebSockets still open after shutdown; dropping them"
            );
        }
    }
    Ok(())
}

/// A service ready to serve, plus the handles `serve` needs at shutdown.
struct Built {
    app: Router,
    /// Releases requests parked by a `hang` fault.
    faults: Option<Faults>,
    /// Sends the socket service's open connections their close frames.
    sockets: Option<SocketService>,
}

fn build(service: Service, opts: &SimOptions) -> Built {
    let faults = opts.faults.then(Faults::default);
    let mut sockets = None;
    let api = match service {
        Service::Auth => auth::router(opts),
        Service::Storage => storage::router(Arc::new(Market::new(opts.seed))),
        Service::Analytics => analytics::router(Arc::new(Market::new(opts.seed))),
        Service::Socket => {
            let market = Arc::new(Market::new(opts.seed));
            let service = SocketService::new(market, opts.tick_interval, faults.clone());
            let router = service.router();
            sockets = Some(service);
            router
        }
    };
    let api = api.fallback(not_found);

    // Faults wrap the API (and its fallback) but not `/health` or `/_faults`, which are merged
    // afterwards: health checks must keep passing and the switch must stay reachable while
    // requests are being failed or hung.
    let api = match &faults {
        Some(faults) => faults.wrap(api),
        None => api,
    };

    let name = service.name();
    let mut app = api.route(
        "/health",
        get(move || async move { Json(json!({"status": "healthy", "service": name})) }),
    );
    if let Some(faults) = &faults {
        app = app.merge(faults.control_routes());
        if let Some(sockets) = &sockets {
            app = app.merge(sockets.fault_routes());
        }
    }
    Built {
        app,
        faults,
        sockets,
    }
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "Not found")
}

/// A client-visible error: a status and a message, rendered as `{"error": message}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    /// For failures that are our fault: the detail goes to the log, the client gets nothing useful
    /// to an attacker.
    pub fn internal(detail: impl std::fmt::Display) -> ApiError {
        tracing::error!(%detail, "sim service internal error");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal server error")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

/// Parses a JSON request body ourselves instead of using axum's `Json` extractor, whose
/// rejections are plain text with 415/422 statuses: clients of these services expect a JSON
/// 400 for any unreadable body, and a missing `Content-Type` is tolerated as the originals did.
pub fn parse_json_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|err| ApiError::bad_request(format!("Invalid JSON body: {err}")))
}

/// Turns a query-string rejection into the JSON 400 every other input error uses.
pub fn query_error(rejection: QueryRejection) -> ApiError {
    ApiError::bad_request(format!("Invalid query string: {}", rejection.body_text()))
}

/// `?expiry=YYYY-MM-DD`, taken as a raw string so a bad value gets our message.
#[derive(serde::Deserialize)]
struct ExpiryQuery {
    expiry: Option<String>,
}

/// Resolves a `{product}` path segment (case-insensitive) or answers 404.
fn product_or_404(name: &str) -> Result<&'static market::ProductSpec, ApiError> {
    market::find_product(name)
        .ok_or_else(|| ApiError::not_found(format!("Unknown product: {name}")))
}

/// Resolves an optional `expiry` query value for a product. Absent or empty means "all
/// expiries"; something that is not a `YYYY-MM-DD` date is the client's mistake (400); a real
/// date that is not listed is a missing resource (404), like an unknown product.
fn expiry_filter(
    market: &Market,
    spec: &market::ProductSpec,
    raw: Option<&str>,
) -> Result<Option<chrono::NaiveDate>, ApiError> {
    let Some(raw) = raw.map(str::trim).filter(|raw| !raw.is_empty()) else {
        return Ok(None);
    };
    let expiry = chrono::NaiveDate::parse_from_str(raw, "%Y-%m-%d").map_err(|_| {
        ApiError::bad_request(format!(
            "expiry must be a date like 2025-01-30, got {raw:?}"
        ))
    })?;
    if !market.expiries(spec).contains(&expiry) {
        return Err(ApiError::not_found(format!(
            "No {} expiry on {expiry}",
            spec.symbol
        )));
    }
    Ok(Some(expiry))
}

/// Dates as the API prints them.
fn date_strings(dates: &[chrono::NaiveDate]) -> Vec<String> {
    dates
        .iter()
        .map(|date| date.format("%Y-%m-%d").to_string())
        .collect()
}
