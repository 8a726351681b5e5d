//! Serving: the listeners, their connection guards, graceful shutdown, and the live
//! configuration a reload swaps.
//!
//! Where to start reading: [`serve`] (what the binary runs: bind from the config, run until
//! SIGTERM/SIGINT, drain, return) and [`start_with_source`] (everything built from a
//! [`Config`]: [`build_state`] makes the shared state, then each listener gets its accept
//! loop). [`check`] is everything `serve` refuses a configuration for, without binding
//! anything; `check-config` prints it.
//!
//! Every listener runs the same accept loop on hyper rather than `axum::serve`, because the
//! protections live at the connection level: a header-read timeout (slowloris), a cap on the
//! request-head size (431), a bound on concurrent connections with idle ones shed while a
//! client waits, idle and send timeouts, a minimum send rate, and a close that does not wait
//! for what is not in flight. Stopping has one deadline, `shutdown_grace`, whatever is still
//! open.
//!
//! - `listener`: the one accept loop (public, redirect and admin listeners alike): the
//!   connection cap and shedding, the drain at shutdown.
//! - `conn`: one connection from the first byte to the close: protocol sniffing under the
//!   header-read deadline, HTTP/1 and HTTP/2 limits, idleness, the send timeout and minimum
//!   send rate, HTTP/2 control-frame floods.
//! - [`tls`]: the certificate and key files, checked by field, served through a resolver a
//!   reload swaps.
//! - `redirect`: `[server.redirect_http]`, the plain listener that answers 308 to https.
//! - [`admin`]: the admin listener's routes: readiness, `/metrics`, breakers, cache,
//!   configuration and reload.
//! - [`reload`]: [`Gateway`], the live configuration every request reads first, and the
//!   reload that swaps it whole ([`ConfigSource`], [`ReloadReport`]).
//! - [`fds`]: the open-file limit, raised to the hard one at start, and the connection caps
//!   fitted under it.
//! - [`memory`]: the cgroup memory limit, at start and re-read every 2 s (connection caps
//!   fitted under it), and giving freed heap back to the kernel.
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::StatusCode;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::TokenVerifier;
use crate::config::{parse_cidr, Config, ConfigErrors};
use crate::observability::access::{access_since, RouteInfo};
use crate::routes::table::RouteTable;
use crate::routes::{self, AppState, UpstreamRuntime};
use crate::upstream::Pipeline;

pub mod admin;
mod conn;
pub mod fds;
mod listener;
pub mod memory;
mod redirect;
pub mod reload;
pub mod tls;

pub use reload::{ConfigSource, Gateway, ReloadError, ReloadReport};

/// Everything `serve` refuses a configuration for, all at once and without binding or
/// connecting anything: the config's own validation, the route templates and the TLS files.
pub fn check(cfg: &Config) -> Result<(), ConfigErrors> {
    check_with_warnings(cfg).map(|_| ())
}

/// [`check`], and what is worth a warning but does not stop the gateway (an expired
/// certificate: clients refuse it, but an operator may be replacing it).
pub fn check_with_warnings(cfg: &Config) -> Result<Vec<String>, ConfigErrors> {
    let mut errors = cfg.validate().err().map(|e| e.0).unwrap_or_default();
    if let Err(mut e) = RouteTable::check(cfg) {
        errors.append(&mut e.0);
    }
    let mut warnings = Vec::new();
    if let Some(t) = &cfg.server.tls {
        match tls::load(t) {
            Ok(cert) => warnings.extend(cert.expiry_warning()),
            Err(mut e) => errors.append(&mut e),
        }
    }
    if errors.is_empty() {
        Ok(warnings)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Whether two settings of one upstream name the same addresses (in any order).
fn same_addresses(a: &crate::config::UpstreamConfig, b: &crate::config::UpstreamConfig) -> bool {
    let set = |c: &crate::config::UpstreamConfig| {
        c.targets()
            .into_iter()
            .map(str::to_string)
            .collect::<std::collections::BTreeSet<String>>()
    };
    set(a) == set(b)
}

/// Builds the shared state from a validated config; `shutdown` turns `true` when the
/// gateway stops (WebSocket relays watch it). With the `previous` state (a reload), what did
/// not change is kept: the pipelines of unchanged upstreams (breaker state, pools,
/// instances), the limiter, the verifier and the cache when their sections are the same,
/// and the open WebSocket count.
pub async fn build_state(
    cfg: Config,
    shutdown: watch::Receiver<bool>,
    previous: Option<&AppState>,
) -> Result<Arc<AppState>, String> {
    // Every family shows in the first scrape, at zero until it counts.
    crate::observability::catalog::register_zeroes(&cfg);
    for name in cfg.upstreams.keys() {
        crate::upstream::register_zeroes(name);
    }
    let spans = crate::observability::otlp::Exporter::keep_or_start(
        previous.and_then(|p| p.spans.as_ref()),
        &cfg.tracing,
        &cfg.service_name,
    );
    let timeout_status =
        StatusCode::from_u16(cfg.errors.timeout_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    // How many replicas share the upstreams' initial limits: kept across reloads (pipelines
    // that a reload keeps hold it), counted by the limiter below.
    let fleet = match previous {
        Some(p) => p.fleet.clone(),
        None => crate::upstream::concurrency::Fleet::new(cfg.rate_limit.expected_replicas as usize),
    };
    let mut upstreams = Vec::with_capacity(cfg.upstreams.len());
    for (name, u) in &cfg.upstreams {
        let before = previous.and_then(|p| {
            let i = p.upstream_index(name)?;
            Some((p.config.upstreams.get(name)?, &p.upstreams[i].pipeline))
        });
        let pipeline = match before {
            Some((old, p)) if old == u => p.clone(),
            Some((old, p)) => {
                // New settings: a new pipeline, which keeps the breaker and ejection state
                // unless the addresses changed (then it is another service as far as we know).
                let fresh = Arc::new(Pipeline::in_fleet(name, u, fleet.clone())?);
                if same_addresses(old, u) {
                    fresh.inherit_health(p);
                }
                fresh
            }
            None => Arc::new(Pipeline::in_fleet(name, u, fleet.clone())?),
        };
        pipeline.export_spans_to(spans.clone());
        upstreams.push(UpstreamRuntime {
            name: Arc::from(name.as_str()),
            base_url: u.primary_url().trim_end_matches('/').to_string(),
            base: crate::routes::proxy::parse_base(u.primary_url()),
            message: Arc::from(u.unavailable_message(name)),
            timeout_status,
            pipeline,
        });
    }
    // Token verification is a call to the auth upstream like any other: its pipeline.
    let auth_upstream = upstreams
        .iter()
        .find(|u| *u.name == *cfg.auth.upstream)
        .map(|u| (u.pipeline.clone(), u.base_url.as_str()));
    let same_auth_pipeline = |p: &AppState| {
        let old = p
            .upstreams
            .iter()
            .find(|u| *u.name == *p.config.auth.upstream)
            .map(|u| &u.pipeline);
        match (old, &auth_upstream) {
            (Some(a), Some((b, _))) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    };
    let verifier = match previous.filter(|p| p.config.auth == cfg.auth && same_auth_pipeline(p)) {
        Some(p) => p.verifier.clone(),
        None => Arc::new(TokenVerifier::new(&cfg.auth, auth_upstream)?),
    };
    let failure_policy = Some(cfg.auth.failure_policy.as_str()).filter(|p| !p.is_empty());
    // Built-in policies (`ws`, `auth_failures`) join the configured ones when something uses
    // them and the config does not define its own.
    let wanted = cfg
        .routes
        .iter()
        .flat_map(|r| r.rate_limit.iter().map(String::as_str))
        .chain(failure_policy);
    let effective = cfg.rate_limit.with_builtins(wanted);
    let (limiter, auth_guard) =
        match previous.filter(|p| p.rate_limit == effective && p.config.auth == cfg.auth) {
            Some(p) => (p.limiter.clone(), p.auth_guard.clone()),
            None => {
                let limiter = crate::ratelimit::RateLimiter::new(&effective).await;
                limiter.keep_fleet(&fleet, effective.expected_replicas as usize);
                let policy = failure_policy.and_then(|name| {
                    let cfg = effective.policies.iter().find(|p| p.name == name)?;
                    Some(crate::auth::guard::FailurePolicy {
                        id: limiter.policy(name)?,
                        limit: u32::try_from(cfg.limit).unwrap_or(u32::MAX),
                        window: cfg.window.0,
                    })
                });
                let guard = Arc::new(crate::auth::guard::FailureGuard::new(
                    policy,
                    crate::config::ratelimit::MAX_WINDOW,
                ));
                (limiter, guard)
            }
        };
    let cache = match previous.filter(|p| p.config.cache == cfg.cache) {
        Some(p) => p.cache.clone(),
        None => crate::upstream::cache::ResponseCache::new(&cfg.cache),
    };
    let table = RouteTable::build(
        &cfg,
        |n| upstreams.iter().position(|u| &*u.name == n),
        |p| limiter.policy(p),
    )
    .map_err(|e| format!("invalid configuration:\n{e}"))?;
    // The document is rendered from a few settings only ([`routes::docs::DocsSource`]): a
    // reload that changes none of them (an upstream's timeout) keeps it. Rendering it is
    // ~19,000 small allocations, freed at once, which malloc keeps around the new state built
    // meanwhile: resident memory rose with each reload under traffic (README "Soak").
    let (openapi, openapi_etag) = match previous
        .filter(|p| routes::docs::DocsSource::of(&p.config) == routes::docs::DocsSource::of(&cfg))
    {
        Some(p) => (p.openapi.clone(), p.openapi_etag.clone()),
        None => {
            let doc =
                serde_json::to_vec(&routes::docs::openapi(&cfg)).map_err(|e| e.to_string())?;
            let etag = crate::upstream::cache::strong_etag(&doc);
            (Bytes::from(doc), etag)
        }
    };
    let in_flight_cap =
        memory::request_budget(cfg.server.saturation.max_in_flight, cfg.cache.max_bytes.0);
    let saturation = match previous {
        Some(p) => {
            p.saturation
                .configure(&cfg.server.saturation, in_flight_cap);
            p.saturation.clone()
        }
        None => routes::admission::Saturation::start(&cfg.server.saturation, in_flight_cap),
    };
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
        cache,
        rate_limit: effective,
        max_body: cfg.limits.max_body.0,
        response_budget: match previous
            .filter(|p| p.config.limits.response_buffer_total == cfg.limits.response_buffer_total)
        {
            Some(p) => p.response_budget.clone(),
            None => routes::BufferBudget::new(cfg.limits.response_buffer_total.0),
        },
        trusted_proxies: cfg
            .trusted_proxies
            .iter()
            .filter_map(|c| parse_cidr(c))
            .collect(),
        header_policy: crate::routes::headers::HeaderPolicy::new(&cfg.headers.strip_from_untrusted),
        cors: routes::cors::Cors::new(&cfg.cors),
        compressor: routes::compress::Compressor::new(&cfg.compression),
        openapi_etag,
        openapi,
        ws_connections: previous
            .map(|p| p.ws_connections.clone())
            .unwrap_or_default(),
        shutdown,
        spans,
        health: Bytes::from(health),
        saturation,
        fleet,
        config: cfg,
        _alive: crate::observability::alive::AliveGauge::config_state(),
    }))
}

/// A running gateway (public + admin listeners).
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The plain listener that redirects to https, with `[server.redirect_http]`.
    pub redirect_addr: Option<SocketAddr>,
    /// The live configuration: the current state, and reloads.
    pub gateway: Arc<Gateway>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish within the grace period, and waits.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }

    /// `http://` or `https://` address of the public listener.
    pub fn url(&self) -> String {
        let scheme = if self.gateway.certs.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// The state requests use now.
    pub fn state(&self) -> Arc<AppState> {
        self.gateway.current()
    }
}

/// Starts the gateway on already-bound listeners (tests bind 127.0.0.1:0), with no source to
/// reload from (see [`start_with_source`]).
pub async fn start(
    cfg: Config,
    public: TcpListener,
    admin: TcpListener,
) -> Result<Running, String> {
    start_inner(cfg, None, public, admin).await
}

/// [`start`], reloading from `source` on SIGHUP, `POST /admin/reload` or a file change.
pub async fn start_with_source(
    cfg: Config,
    source: ConfigSource,
    public: TcpListener,
    admin: TcpListener,
) -> Result<Running, String> {
    start_inner(cfg, Some(source), public, admin).await
}

async fn start_inner(
    mut cfg: Config,
    source: Option<ConfigSource>,
    public: TcpListener,
    admin: TcpListener,
) -> Result<Running, String> {
    fds::fit_defaults(&mut cfg);
    // What hyper allocates per connection for the request in flight (`serve_request`).
    tracing::debug!(
        bytes = request_future_size(),
        "size of a public request's future"
    );
    // The recorder first: the request path keeps metric handles, which must be real ones.
    crate::observability::metrics::handle();
    let addr = public.local_addr().map_err(|e| e.to_string())?;
    let admin_addr = admin.local_addr().map_err(|e| e.to_string())?;
    let grace = cfg.server.shutdown_grace.0;
    let watch_config = cfg.server.watch_config;
    memory::start_trimmer(cfg.server.memory_trim_interval.0);
    let memory_limit = memory::cgroup_memory_limit();
    let (caps, fd_budget) = listener_caps(&cfg, memory_limit);
    let live_caps = LiveCaps {
        public: listener::ConnCap::new(caps.public),
        redirect: listener::ConnCap::new(caps.redirect),
        admin: listener::ConnCap::new(caps.admin),
    };
    // TLS: the certificate (a reload may replace it) and the acceptor built on it.
    let (certs, acceptor) = match &cfg.server.tls {
        Some(t) => {
            let cert = tls::load(t).map_err(|e| ConfigErrors(e).to_string())?;
            if let Some(warning) = cert.expiry_warning() {
                tracing::warn!("{warning}");
            }
            let store = tls::CertStore::new(&cert);
            let config = tls::server_config(t, store.clone())?;
            (Some(store), Some(tokio_rustls::TlsAcceptor::from(config)))
        }
        None => (None, None),
    };
    let redirect = match &cfg.server.redirect_http {
        Some(r) => Some((
            TcpListener::bind((cfg.server.host, r.port))
                .await
                .map_err(|e| {
                    format!(
                        "cannot listen on {}:{} (redirect_http): {e}",
                        cfg.server.host, r.port
                    )
                })?,
            redirect::Redirect::new(r, addr.port()),
        )),
        None => None,
    };
    let redirect_addr = redirect.as_ref().and_then(|(l, _)| l.local_addr().ok());
    let (tx, rx) = watch::channel(false);
    let state = build_state(cfg, rx.clone(), None).await?;
    let gateway = Arc::new(Gateway::new(state, source, certs, rx.clone()));

    // Every listener takes the connection limits of the live configuration.
    let settings = {
        let gw = gateway.clone();
        move || gw.live_full().conn.clone()
    };
    let admin_router = admin::router(gateway.clone(), tokio::runtime::Handle::current());
    let admin_task = {
        let (cap, settings, rx) = (live_caps.admin.clone(), settings.clone(), rx.clone());
        let admin = admin
            .into_std()
            .map_err(|e| format!("admin listener: {e}"))?;
        own_thread("gateway-admin", move || {
            let socket =
                TcpListener::from_std(admin).map_err(|e| format!("admin listener: {e}"))?;
            Ok(listener::run(
                listener::Listener {
                    socket,
                    name: "admin",
                    cap,
                    tls: None,
                },
                settings,
                move |_peer, _| hyper_util::service::TowerToHyperService::new(admin_router.clone()),
                grace,
                rx,
            ))
        })?
    };
    let redirect_task = redirect.map(|(socket, answers)| {
        let answers = Arc::new(answers);
        tokio::spawn(listener::run(
            listener::Listener {
                socket,
                name: "redirect",
                cap: live_caps.redirect.clone(),
                tls: None,
            },
            settings.clone(),
            move |_peer, _| {
                let answers = answers.clone();
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    std::future::ready(Ok::<_, Infallible>(answers.answer(&req)))
                })
            },
            grace,
            rx.clone(),
        ))
    });
    let public = listener::Listener {
        socket: public,
        name: "public",
        cap: live_caps.public.clone(),
        tls: acceptor,
    };
    if watch_config {
        tokio::spawn(watch_file(gateway.clone(), rx.clone()));
    }
    {
        let (configured, gw, mut stop) = (
            listener::ListenerCaps::configured(&gateway.current().config),
            gateway.clone(),
            rx.clone(),
        );
        tokio::spawn(memory::watch_limit(
            memory_limit,
            move |limit| {
                live_caps.refit(
                    configured,
                    gw.current().config.cache.max_bytes.0,
                    limit,
                    fd_budget,
                )
            },
            async move { stopped(&mut stop).await },
        ));
    }
    let gw = gateway.clone();
    let task = tokio::spawn(async move {
        let deadline = serve_public(public, gw, settings, grace, rx).await;
        // The other listeners drained against the same moment; past it, whatever is still
        // open is dropped with the runtime (see `serve`).
        let _ = tokio::time::timeout_at(deadline, async {
            let _ = admin_task.await;
            if let Some(t) = redirect_task {
                let _ = t.await;
            }
        })
        .await;
    });
    Ok(Running {
        addr,
        admin_addr,
        redirect_addr,
        gateway,
        shutdown: tx,
        task,
    })
}

/// Runs the future `make` builds on a single-threaded runtime on a thread of its own; the
/// returned receiver resolves with its output when it has finished (or with an error if the
/// thread died). `make` runs inside that runtime's context, so the sockets it registers are
/// that runtime's: a socket created on another runtime gets its readiness from that runtime's
/// driver, and would wait for it.
///
/// The admin listener runs so: when the serving runtime is saturated (a flood, a CPU quota)
/// its tasks queue behind the flood's, and `/ready` and `/metrics` answered in seconds exactly
/// when an operator or an orchestrator needs them (chaos 19). On a thread of its own the
/// kernel shares the CPU between the two, and the admin listener waits for CPU, not behind
/// thousands of requests.
fn own_thread<F>(
    name: &str,
    make: impl FnOnce() -> Result<F, String>,
) -> Result<tokio::sync::oneshot::Receiver<F::Output>, String>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (done, finished) = tokio::sync::oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the {name} runtime: {e}"))?;
    let task = {
        let _entered = runtime.enter();
        make()?
    };
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let _ = done.send(runtime.block_on(task));
        })
        .map_err(|e| format!("cannot start the {name} thread: {e}"))?;
    Ok(finished)
}

/// Each listener's connection cap: as configured, lowered (each listener keeping its own
/// share, see `ListenerCaps::fit`) so that idle connections can neither get the process
/// killed under a cgroup memory limit (issue 18: a 64 MiB replica was OOM-killed at ~2,400
/// idle connections with the cap at 10,000) nor use up its descriptors (issue 23: idle
/// connections to the redirect port made the TLS port fail with EMFILE). Also returns the
/// descriptor budget, which the caps stay under when a new memory limit refits them.
fn listener_caps(
    cfg: &Config,
    memory_limit: Option<u64>,
) -> (listener::ListenerCaps, Option<usize>) {
    let mut caps = listener::ListenerCaps::configured(cfg);
    let cache = cfg.cache.max_bytes.0;
    if let Some(fitted) = memory::connection_budget(memory_limit, cache).and_then(|b| caps.fit(b)) {
        tracing::warn!(
            "connection caps lowered to fit the memory limit of {} MiB ({} MiB base + \
             cache.max_bytes {} MiB + {} KiB per connection): {}; past a cap, connections \
             wait in the accept queue instead of killing the process",
            memory_limit.unwrap_or_default() >> 20,
            memory::BASE_BYTES >> 20,
            cache >> 20,
            memory::BYTES_PER_CONNECTION >> 10,
            caps.lowered_to(&fitted)
        );
        caps = fitted;
    }
    let fd_limit = fds::raise_limit(cfg);
    let fd_budget = fd_limit.map(fds::connection_budget);
    if let (Some(limit), Some(budget)) = (fd_limit, fd_budget) {
        if let Some(fitted) = caps.fit(budget) {
            tracing::warn!(
                "connection caps lowered to fit the open-file limit of {limit} (half of it above \
                 {} for listener connections, the other half for the upstream connections they \
                 lead to): {}; past a cap, connections wait in the accept queue instead of \
                 failing every listener with EMFILE",
                fds::RESERVED,
                caps.lowered_to(&fitted)
            );
            caps = fitted;
        }
    }
    (caps, fd_budget)
}

/// The caps of the running listeners, refitted when the memory limit changes at run time.
struct LiveCaps {
    public: Arc<listener::ConnCap>,
    redirect: Arc<listener::ConnCap>,
    admin: Arc<listener::ConnCap>,
}

impl LiveCaps {
    /// Fits the `configured` caps to a new memory `limit` (and the descriptor budget, as at
    /// start) and applies them; logs the change once: a warning when a cap went down.
    fn refit(
        &self,
        configured: listener::ListenerCaps,
        cache: u64,
        limit: Option<u64>,
        fd_budget: Option<usize>,
    ) {
        let mut caps = configured;
        for budget in [memory::connection_budget(limit, cache), fd_budget] {
            if let Some(fitted) = budget.and_then(|b| caps.fit(b)) {
                caps = fitted;
            }
        }
        let before = listener::ListenerCaps {
            public: self.public.max(),
            redirect: self.redirect.max(),
            admin: self.admin.max(),
        };
        self.public.set(caps.public);
        self.redirect.set(caps.redirect);
        self.admin.set(caps.admin);
        let limit_mib = limit.map_or_else(|| "none".to_string(), |l| format!("{} MiB", l >> 20));
        let now = match configured.lowered_to(&caps) {
            s if s.is_empty() => "as configured".to_string(),
            s => s,
        };
        if caps.public < before.public
            || caps.redirect < before.redirect
            || caps.admin < before.admin
        {
            tracing::warn!(
                "memory limit changed at run time to {limit_mib}: connection caps lowered to fit \
                 it ({} MiB base + cache.max_bytes {} MiB + {} KiB per connection): {now}; \
                 connections over a cap stay, new ones wait for room",
                memory::BASE_BYTES >> 20,
                cache >> 20,
                memory::BYTES_PER_CONNECTION >> 10,
            );
        } else if caps != before {
            tracing::info!(
                "memory limit changed at run time to {limit_mib}: connection caps raised: {now}"
            );
        } else {
            tracing::info!(
                "memory limit changed at run time to {limit_mib}: connection caps unchanged: {now}"
            );
        }
    }
}

/// `[server] watch_config`: reloads when the configuration file's modification time or size
/// changes (polled every second: no inotify dependency, and it works on bind mounts).
async fn watch_file(gateway: Arc<Gateway>, mut shutdown: watch::Receiver<bool>) {
    let Some(path) = gateway.source_file().cloned() else {
        tracing::warn!("watch_config is set but there is no --config file to watch");
        return;
    };
    let stamp = |p: &std::path::Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    let mut last = stamp(&path);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stopped(&mut shutdown) => return,
        }
        let now = stamp(&path);
        if now != last && now.is_some() {
            last = now;
            tracing::info!(file = %path.display(), "configuration file changed; reloading");
            let _ = gateway.reload().await;
        }
    }
}

/// The public listener: the application on every connection, then, at shutdown, the drain
/// and the WebSocket relays' closes, all by one deadline (returned).
async fn serve_public(
    public: listener::Listener,
    gateway: Arc<Gateway>,
    settings: impl Fn() -> conn::ConnSettings,
    grace: Duration,
    shutdown: watch::Receiver<bool>,
) -> tokio::time::Instant {
    // The public application, outermost first: the access layer (request id, panic guard,
    // metrics, the log line: outermost so even CORS preflights and panics get a request id
    // and a log line) -> CORS (header values computed once per configuration) -> the
    // generic handler. Composed by hand, not with axum's `Router` + `from_fn`: with one
    // fallback handler those only added a route lookup, a boxed service and boxed futures per
    // request. Each request takes the live configuration once and finishes on it.
    let tls = public.tls.is_some();
    let gw = gateway.clone();
    let make_service = move |peer: SocketAddr, arrival: &Arc<conn::Arrival>| {
        let gw = gw.clone();
        let arrival = arrival.clone();
        // The peer's address as a header value, formatted once per connection rather than
        // once per request (`X-Forwarded-For`).
        let peer = Arc::new(routes::Peer::new(peer));
        hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            // The request's duration counts from its arrival on the connection, not from now.
            let arrived = arrival.take();
            serve_request(
                gw.live_full(),
                arrived,
                peer.clone(),
                tls,
                req.map(Body::new),
            )
        })
    };
    let deadline = listener::run(public, settings, make_service, grace, shutdown).await;
    // Upgraded connections left the listener's count: their relays close them (1001) when
    // told to stop, within their close timeout; wait for that, by the same deadline.
    let app = gateway.current();
    while app.ws_connections.open() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    deadline
}

/// One public request, outermost first: the access layer (request id, panic guard, metrics,
/// the log line) -> CORS -> the generic handler, on the configuration `live` the request took
/// when it arrived (`arrived`).
///
/// Not boxed: hyper keeps each connection's in-flight future in one box of its own, allocated
/// when the connection opens and kept until it closes, so this future's size is memory per
/// connection, idle keep-alive ones included (a test bounds it: [`REQUEST_FUTURE_MAX`]). The
/// large, rare parts (the upstream call, token verification, a cache fill, a WebSocket
/// handshake) are boxed where they are awaited, so only the requests that take them pay.
#[allow(clippy::manual_async_fn)] // an `async fn` would keep its arguments twice
fn serve_request(
    live: Arc<reload::Live>,
    arrived: std::time::Instant,
    peer: Arc<routes::Peer>,
    tls: bool,
    req: http::Request<Body>,
) -> impl std::future::Future<Output = Result<http::Response<Body>, Infallible>> {
    // An `async move` block, not an `async fn`: see `routes::handle`.
    async move {
        let spans = live.app.spans.clone();
        // HSTS means something over TLS only (RFC 6797 section 8.1).
        let hsts = live.hsts.clone().filter(|_| tls);
        let remote = peer.addr;
        // Lent, not moved: each future it were moved into would keep a copy of its own.
        let peer = &*peer;
        let mut resp = access_since(
            arrived,
            Some(remote),
            req,
            spans,
            |req, rid, trace| async move {
                // Any OPTIONS is a preflight, answered here (as tower-http's CORS did).
                if req.method() == http::Method::OPTIONS {
                    return (live.app.cors.preflight(req.headers()), RouteInfo::default());
                }
                let origin = live.app.cors.allowed_origin(req.headers());
                let (mut resp, info) =
                    routes::handle(live.app.clone(), req, rid, trace, peer, tls).await;
                live.app.cors.apply(origin, resp.headers_mut());
                (resp, info)
            },
        )
        .await;
        if let Some(v) = hsts {
            resp.headers_mut()
                .insert(http::header::STRICT_TRANSPORT_SECURITY, v);
        }
        Ok(resp)
    }
}

/// The most a public request's future may take (bytes), checked by a unit test in a debug
/// build (a release build's is smaller): hyper allocates this much for every connection.
#[cfg(test)]
const REQUEST_FUTURE_MAX: usize = 6 << 10;

/// The size of the future [`serve_request`] returns, from its type alone.
pub fn request_future_size() -> usize {
    fn size_of_output<A, B, C, D, E, F>(_: fn(A, B, C, D, E) -> F) -> usize {
        std::mem::size_of::<F>()
    }
    size_of_output(serve_request as fn(_, _, _, _, _) -> _)
}

/// Resolves once shutdown was requested (the watch guard is not held across awaits).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Resolves when SIGINT or SIGTERM arrives. The handlers are installed when this is CALLED,
/// not when it is first polled: a process that announces it is up and only then starts
/// waiting would die of a SIGTERM sent in between (the default action), with no drain.
pub fn signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let (int, term) = {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::interrupt()).ok(),
            signal(SignalKind::terminate()).ok(),
        )
    };
    async move {
        #[cfg(unix)]
        {
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = wait(int) => {}
                _ = wait(term) => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Reloads `gateway` on every SIGHUP (`serve`, `demo`). The handler is in place when this
/// returns.
pub fn reload_on_sighup(gateway: Arc<Gateway>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot handle SIGHUP: reload with POST /admin/reload");
            return;
        };
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the configuration");
                let _ = gateway.reload().await;
            }
        });
    }
    #[cfg(not(unix))]
    let _ = gateway;
}

/// How long after `shutdown_grace` `serve` returns whatever has not finished.
pub const HARD_STOP_AFTER_GRACE: Duration = Duration::from_secs(1);

/// `serve`: binds from the config, runs until SIGTERM/SIGINT, drains, returns; SIGHUP
/// reloads the configuration from `source`.
pub async fn serve(cfg: Config, source: ConfigSource) -> Result<(), String> {
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
    let running = start_with_source(cfg, source, public, admin).await?;
    // Before the line that says we are up: a SIGTERM from then on drains.
    let stop = signal();
    tracing::info!(addr = %running.addr, admin = %running.admin_addr,
        redirect = running.redirect_addr.map(|a| a.to_string()),
        tls = running.gateway.certs.is_some(), "gateway listening");
    reload_on_sighup(running.gateway.clone());
    stop.await;
    tracing::info!("shutdown signal received; draining in-flight requests");
    // One hard deadline whatever is open: the listeners drain within the grace, and this
    // bounds anything else (the runtime then drops what is left; see main's `run`).
    let grace = running.gateway.current().config.server.shutdown_grace.0;
    if tokio::time::timeout(grace + HARD_STOP_AFTER_GRACE, running.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period over; stopping with connections still open");
    }
    tracing::info!("gateway stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// hyper boxes one request future per connection for the connection's whole life: its
    /// size is memory per idle keep-alive connection (issue 28: <= 12 KiB per connection in
    /// all). A regression guard: what grows it should be boxed where it is awaited.
    #[test]
    fn the_request_future_stays_small() {
        let size = request_future_size();
        eprintln!(
            "request future {size} bytes; handle {}, proxy {}",
            routes::handle_future_size(),
            routes::proxy::forward_future_size()
        );
        assert!(
            size <= REQUEST_FUTURE_MAX,
            "the request future is {size} bytes (at most {REQUEST_FUTURE_MAX}): box the large, rare part"
        );
    }
}
