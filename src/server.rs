//! Listeners (public + admin), the connection loop, and graceful shutdown.
//!
//! The public listener runs its own accept loop on hyper-util rather than `axum::serve`
//! because three protections live at the connection level: a header-read timeout
//! (slowloris), a cap on the request-head size (431), and a bound on concurrent connections
//! with an idle timeout (see `conn`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::StatusCode;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, Semaphore};

use crate::auth::TokenVerifier;
use crate::config::{parse_cidr, Config, ConfigErrors};
use crate::observability::access::{access, RouteInfo};
use crate::routes::table::RouteTable;
use crate::routes::{self, AppState, UpstreamRuntime};
use crate::upstream::Pipeline;

mod conn;
mod cors;
pub mod memory;

/// Everything `serve` refuses a configuration for, all at once and without binding or
/// connecting anything: the config's own validation and the route templates.
pub fn check(cfg: &Config) -> Result<(), ConfigErrors> {
    let mut errors = cfg.validate().err().map(|e| e.0).unwrap_or_default();
    if let Err(mut e) = RouteTable::check(cfg) {
        errors.append(&mut e.0);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Builds the shared state from a validated config; `shutdown` turns `true` when the
/// gateway stops (WebSocket relays watch it).
pub async fn build_state(
    cfg: Config,
    shutdown: watch::Receiver<bool>,
) -> Result<Arc<AppState>, String> {
    let timeout_status =
        StatusCode::from_u16(cfg.errors.timeout_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let mut upstreams = Vec::with_capacity(cfg.upstreams.len());
    for (name, u) in &cfg.upstreams {
        upstreams.push(UpstreamRuntime {
            name: Arc::from(name.as_str()),
            base_url: u.primary_url().trim_end_matches('/').to_string(),
            base: crate::routes::proxy::parse_base(u.primary_url()),
            message: Arc::from(u.unavailable_message(name)),
            timeout_status,
            pipeline: Arc::new(Pipeline::new(name, u)?),
        });
    }
    // Token verification is a call to the auth upstream like any other: its pipeline.
    let auth_upstream = upstreams
        .iter()
        .find(|u| *u.name == *cfg.auth.upstream)
        .map(|u| (u.pipeline.clone(), u.base_url.as_str()));
    let verifier = TokenVerifier::new(&cfg.auth, auth_upstream)?;
    let failure_policy = Some(cfg.auth.failure_policy.as_str()).filter(|p| !p.is_empty());
    // Built-in policies (`ws`, `auth_failures`) join the configured ones when something uses
    // them and the config does not define its own.
    let wanted = cfg
        .routes
        .iter()
        .flat_map(|r| r.rate_limit.iter().map(String::as_str))
        .chain(failure_policy);
    let limiter = crate::ratelimit::RateLimiter::new(&cfg.rate_limit.with_builtins(wanted)).await;
    let auth_guard = crate::auth::guard::FailureGuard::new(
        failure_policy.and_then(|p| limiter.policy(p)),
        crate::config::ratelimit::MAX_WINDOW,
    );
    let table = RouteTable::build(
        &cfg,
        |n| upstreams.iter().position(|u| &*u.name == n),
        |p| limiter.policy(p),
    )
    .map_err(|e| format!("invalid configuration:\n{e}"))?;
    let openapi = serde_json::to_vec(&routes::docs::openapi(&cfg)).map_err(|e| e.to_string())?;
    // Field order as the original service wrote it (serde_json would sort the keys).
    let health = format!(
        r#"{{"status":"healthy","service":{}}}"#,
        serde_json::Value::String(cfg.service_name.clone())
    );
    Ok(Arc::new(AppState {
        table,
        upstreams,
        verifier,
        auth_guard,
        limiter,
        cache: crate::upstream::cache::ResponseCache::new(&cfg.cache),
        max_body: cfg.limits.max_body.0,
        trusted_proxies: cfg
            .trusted_proxies
            .iter()
            .filter_map(|c| parse_cidr(c))
            .collect(),
        header_policy: crate::routes::headers::HeaderPolicy::new(&cfg.headers.strip_from_untrusted),
        openapi: Bytes::from(openapi),
        ws_connections: Arc::default(),
        shutdown,
        health: Bytes::from(health),
        config: cfg,
    }))
}

/// A running gateway (public + admin listeners).
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub state: Arc<AppState>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish within the grace period, and waits.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Starts the gateway on already-bound listeners (tests bind 127.0.0.1:0).
pub async fn start(
    cfg: Config,
    public: TcpListener,
    admin: TcpListener,
) -> Result<Running, String> {
    // The recorder first: the request path keeps metric handles, which must be real ones.
    crate::observability::metrics::handle();
    let addr = public.local_addr().map_err(|e| e.to_string())?;
    let admin_addr = admin.local_addr().map_err(|e| e.to_string())?;
    let limits = cfg.limits.clone();
    let grace = cfg.server.shutdown_grace.0;
    memory::start_trimmer(cfg.server.memory_trim_interval.0);
    let (tx, rx) = watch::channel(false);
    let state = build_state(cfg, rx.clone()).await?;
    let admin_router = routes::admin::router(state.clone());

    let mut admin_rx = rx.clone();
    let admin_task = tokio::spawn(async move {
        let _ = axum::serve(admin, admin_router)
            .with_graceful_shutdown(async move {
                let _ = admin_rx.wait_for(|s| *s).await;
            })
            .await;
    });
    let app = state.clone();
    let task = tokio::spawn(async move {
        accept_loop(public, app, limits, grace, rx).await;
        let _ = admin_task.await;
    });
    Ok(Running {
        addr,
        admin_addr,
        state,
        shutdown: tx,
        task,
    })
}

async fn accept_loop(
    listener: TcpListener,
    app: Arc<AppState>,
    limits: crate::config::LimitsConfig,
    grace: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let settings = conn::ConnSettings {
        header_read_timeout: limits.header_read_timeout.0,
        max_header_bytes: limits.max_header_bytes.0 as usize,
        idle_timeout: limits.idle_timeout.0,
        send_timeout: limits.send_timeout.0,
        close_grace: grace,
    };
    // The public application, outermost first: the access layer (request id, panic guard,
    // metrics, the log line: outermost so even CORS preflights and panics get a request id
    // and a log line) -> CORS (`cors`: header values computed once) -> the generic handler.
    // Composed by hand, not with axum's `Router` + `from_fn`: with one fallback handler those
    // only added a route lookup, a boxed service and boxed futures per request.
    let cors = Arc::new(cors::Cors::new(&app.config.cors));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    // Asks idle connections to close when a client is waiting for a slot.
    let shed = Arc::new(Notify::new());
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        // At the cap, this one client waits (the rest queue in the kernel's backlog, costing
        // us nothing) while connections idle for a while are asked to close.
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let waited = loop {
                    shed.notify_waiters();
                    tokio::select! {
                        p = slots.clone().acquire_owned() => break p.ok(),
                        _ = tokio::time::sleep(conn::SHED_AFTER_IDLE / 4) => {}
                        _ = stopped(&mut shutdown) => break None,
                    }
                };
                match waited {
                    Some(p) => p,
                    None => break,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let cors = cors.clone();
        let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let app = app.clone();
            let cors = cors.clone();
            async move {
                let req = req.map(Body::new);
                let resp = access(Some(peer), req, |req, rid| async move {
                    // Any OPTIONS is a preflight, answered here (as tower-http's CORS did).
                    if req.method() == http::Method::OPTIONS {
                        return (cors.preflight(req.headers()), RouteInfo::default());
                    }
                    let origin = cors.allowed_origin(req.headers());
                    // Not boxed: hyper keeps each connection's in-flight future in one box
                    // of its own, reused request after request. The handler's future is
                    // ~4.5 KB since the big parts (the upstream call, token verification)
                    // are boxed where they are awaited; boxing it whole here cost every
                    // request, cache hits included, an 11.8 KB allocation and copy.
                    let (mut resp, info) = routes::handle(app, req, rid, peer).await;
                    cors.apply(origin, resp.headers_mut());
                    (resp, info)
                })
                .await;
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = conn::serve(
            stream,
            svc,
            settings.clone(),
            shutdown.clone(),
            shed.clone(),
        );
        tokio::spawn(async move {
            conn.await;
            drop(permit);
        });
    }
    drop(listener);
    // Every connection holds a slot until it is closed: having them all back means drained.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(grace, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            grace_secs = grace.as_secs(),
            "shutdown grace period over; closing remaining connections"
        );
    }
    // Upgraded connections left the accept loop's count: their relays close them (1001)
    // when told to stop, within their close timeout; wait for that, within the grace.
    let deadline = tokio::time::Instant::now() + grace;
    while app.ws_connections.open() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Resolves once shutdown was requested (the watch guard is not held across awaits).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Resolves when SIGINT or SIGTERM arrives.
pub async fn signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// `serve`: binds from the config, runs until a signal, drains, returns.
pub async fn serve(cfg: Config) -> Result<(), String> {
    let public = TcpListener::bind((cfg.server.host, cfg.server.port))
        .await
        .map_err(|e| {
            format!(
                "cannot listen on {}:{}: {e}",
                cfg.server.host, cfg.server.port
            )
        })?;
    let admin = TcpListener::bind((cfg.admin.host, cfg.admin.port))
        .await
        .map_err(|e| {
            format!(
                "cannot listen on {}:{} (admin): {e}",
                cfg.admin.host, cfg.admin.port
            )
        })?;
    let running = start(cfg, public, admin).await?;
    tracing::info!(addr = %running.addr, admin = %running.admin_addr, "gateway listening");
    signal().await;
    tracing::info!("shutdown signal received; draining in-flight requests");
    running.shutdown().await;
    tracing::info!("gateway stopped");
    Ok(())
}
