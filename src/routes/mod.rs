//! The public surface: the shared state, the per-request context, and the request's path as
//! named phases (read [`handle`] first):
//!
//! ```text
//! builtin (/health, docs) | match route -> admit (the gateway's own saturation)
//!   -> check request -> identity -> rate limit
//!   -> proxy (read body -> cache lookup -> upstream call -> response) | user/me | websocket
//!   -> respond (errors to JSON, RateLimit headers on every answer of a limited route)
//! ```
//!
//! Like pingora-proxy's `ProxyHttp` phases, but plain functions over one [`RequestCtx`].
//! [`AppState`] is everything a request needs, built once per configuration
//! (`server::build_state`) and swapped whole by a reload.
//!
//! - [`table`]: the route table compiled from the config: matchers and per-route policies,
//!   so the request path does no parsing or lookups by name.
//! - [`template`]: path templates: matching the raw path, checking a parameter, rewriting to
//!   the upstream path.
//! - [`proxy`]: the ONE generic proxy handler every proxy route uses: read the body, cache
//!   lookup, upstream call, response.
//! - [`headers`]: which request headers cross to the upstream, in every spelling an
//!   upstream might read as the same name.
//! - `buffer`: response bodies held for slow clients, so an upstream is done when it is done.
//! - `outgoing`: every request sent upstream for a client (proxied, cache fill, WebSocket
//!   handshake), built in one place (pingora's `upstream_request_filter`).
//! - [`cors`]: the one CORS policy: the listener's answers and the WebSocket `Origin` check.
//! - [`compress`]: response compression negotiated from `Accept-Encoding`, streamed.
//! - [`admission`]: refuses new requests early while the gateway itself is saturated.
//! - [`websocket`]: the WebSocket handshake and its policies; the relay after it is
//!   `crate::websocket`.
//! - [`docs`]: `/api/docs`, the OpenAPI document generated from the route table, and the
//!   vendored Swagger UI.
//!
//! The admin listener's routes are not here: they are `server::admin`, on a listener of
//! their own.

pub mod admission;
mod buffer;
pub mod compress;
pub mod cors;
pub mod docs;
pub mod headers;
pub mod outgoing;
pub mod proxy;
pub mod table;
pub mod template;
pub mod websocket;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, Method, StatusCode};

use crate::auth::guard::FailureGuard;
use crate::auth::{bearer_token, strip_identity_headers, Identity, TokenVerifier};
use crate::client::{Client, ClientKey};
use crate::config::{Config, RouteKind};
use crate::error::{ErrorReply, GatewayError};
use crate::observability::access::RouteInfo;
use crate::observability::trace::TraceContext;
use crate::ratelimit::{Decision, RateLimiter, Subject};
use crate::upstream::cache::ResponseCache;
use crate::upstream::{Pipeline, UpstreamError};
pub use buffer::BufferBudget;
use table::{Route, RouteMatch, RouteTable};

/// What an `overloaded` refusal asks the client to wait: a spike at market open lasts
/// seconds, and a client that comes back at once only adds to it.
const OVERLOADED_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// One upstream at run time.
pub struct UpstreamRuntime {
    /// Its name in the config: metric label, log field, the error body's `upstream`.
    pub name: Arc<str>,
    /// Base URL without a trailing slash; the rewritten path is appended.
    pub base_url: String,
    /// `base_url` parsed once, when it has no path prefix: the proxy then parses only each
    /// request's path and query against it instead of the whole URL (host and IDNA included).
    pub base: Option<reqwest::Url>,
    /// The `error` text clients see when it is down ("Storage service unavailable").
    pub message: Arc<str>,
    /// 503 (the original service) or 504 for a timeout, `errors.timeout_status`.
    pub timeout_status: StatusCode,
    /// Every call to this upstream goes through it; shared with the token verifier when this
    /// is the auth upstream.
    pub pipeline: Arc<Pipeline>,
}

impl UpstreamRuntime {
    /// A pipeline failure as the gateway's error for this upstream.
    pub fn error(&self, e: UpstreamError) -> GatewayError {
        match e {
            UpstreamError::Unavailable { .. } => GatewayError::UpstreamUnavailable {
                upstream: self.name.clone(),
                message: self.message.clone(),
            },
            UpstreamError::Timeout { .. } => GatewayError::UpstreamTimeout {
                upstream: self.name.clone(),
                message: self.message.clone(),
                status: self.timeout_status,
            },
            UpstreamError::CircuitOpen { retry_after } => GatewayError::CircuitOpen {
                upstream: self.name.clone(),
                message: self.message.clone(),
                retry_after,
            },
            UpstreamError::ClientShare { .. } => GatewayError::TooManyInFlight {
                upstream: self.name.clone(),
            },
            UpstreamError::Overloaded { cause, .. } => GatewayError::Overloaded {
                upstream: self.name.clone(),
                cause: cause.as_str(),
                retry_after: OVERLOADED_RETRY_AFTER,
            },
        }
    }
}

/// Everything a request needs, built once at startup and shared.
pub struct AppState {
    /// The configuration this state was built from (the admin listener, limits).
    pub config: Config,
    /// Public routes, most specific first.
    pub table: RouteTable,
    /// One per configured upstream; routes refer to them by index.
    pub upstreams: Vec<UpstreamRuntime>,
    /// Verifies bearer tokens: remotely through the auth upstream's pipeline, or local JWTs
    /// (kept across reloads that do not change `[auth]` or the auth upstream).
    pub verifier: Arc<TokenVerifier>,
    /// Counts failed verifications per client and refuses clients over the policy.
    pub auth_guard: Arc<FailureGuard>,
    /// Rate limits shared through Redis, with an in-process fallback.
    pub limiter: RateLimiter,
    /// The limiter's settings, built-in policies included (a reload keeps the limiter when
    /// they are the same).
    pub rate_limit: crate::config::RateLimitConfig,
    /// The shared response cache (routes opt in).
    pub cache: ResponseCache,
    /// Request bodies larger than this are refused (413) before any upstream call.
    pub max_body: u64,
    /// Bytes of response bodies held for clients, all responses together
    /// (`limits.response_buffer_total`; kept across reloads that do not change it).
    pub response_budget: buffer::BufferBudget,
    /// Peers whose forwarding headers are believed (`trusted_proxies`).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Which client headers may cross to the upstreams (`[headers]`).
    pub header_policy: headers::HeaderPolicy,
    /// `[cors]`, every header value computed once: the listener's CORS answers and the
    /// WebSocket handshake's `Origin` check.
    pub cors: cors::Cors,
    /// `[compression]`: how responses are compressed on the way out.
    pub compressor: compress::Compressor,
    /// The OpenAPI document, rendered once from the route table.
    pub openapi: Bytes,
    /// Its validator: clients revalidate it (`no-cache`) and get a 304 until a reload.
    pub openapi_etag: HeaderValue,
    /// `/health`'s body, rendered once.
    pub health: Bytes,
    /// Open WebSocket connections, counted against the `[websocket]` limits.
    pub ws_connections: Arc<websocket::WsConnections>,
    /// Becomes `true` at shutdown: WebSocket relays close their connections with 1001.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// OTLP span export (`[tracing]`), when configured.
    pub spans: Option<Arc<crate::observability::otlp::Exporter>>,
    /// The process's own saturation: admits or refuses each routed request
    /// (`[server.saturation]`; kept across reloads, which change only its rules).
    pub saturation: Arc<admission::Saturation>,
    /// How many gateway replicas share the upstreams (the divisor of their initial limits);
    /// kept across reloads.
    pub fleet: Arc<crate::upstream::concurrency::Fleet>,
    /// Counts this state in `gateway_config_states_alive`: a replaced state that stays
    /// alive after its requests are done is memory a reload never gives back.
    pub(crate) _alive: crate::observability::alive::AliveGauge,
}

impl AppState {
    pub fn upstream_index(&self, name: &str) -> Option<usize> {
        self.upstreams.iter().position(|u| &*u.name == name)
    }

    /// The upstream a proxy route forwards to.
    fn upstream_of(&self, route: &Route) -> Result<&UpstreamRuntime, GatewayError> {
        route
            .upstream
            .and_then(|i| self.upstreams.get(i))
            .ok_or_else(|| {
                tracing::error!(route = %route.label, "proxy route without an upstream");
                GatewayError::Internal
            })
    }
}

/// A client connection's TCP peer, with what every request on it needs formatted once per
/// connection.
#[derive(Clone, Debug)]
pub struct Peer {
    /// The address.
    pub addr: SocketAddr,
    /// Its `X-Forwarded-For` value.
    pub forwarded_for: headers::ForwardedFor,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Peer {
        Peer {
            addr,
            forwarded_for: headers::ForwardedFor::new(addr.ip()),
        }
    }
}

/// What the gateway knows about one request, filled in phase by phase.
pub struct RequestCtx<'a> {
    /// Echoed in `X-Request-Id`, error bodies and the log line; forwarded upstream.
    pub request_id: &'a HeaderValue,
    /// The TCP peer.
    pub peer: SocketAddr,
    /// The peer as `X-Forwarded-For` states it (formatted once per connection).
    pub forwarded_for: &'a headers::ForwardedFor,
    /// The peer is a trusted proxy: its forwarding headers are kept and believed.
    pub peer_trusted: bool,
    /// The request arrived over TLS (`X-Forwarded-Proto: https`).
    pub tls: bool,
    /// Its place in the W3C trace (parsed once by the access layer): the upstream's
    /// `traceparent` and the parent of the pipeline's attempt spans.
    pub trace: TraceContext,
    /// The client as far as trusted proxies let us tell, IPv6 grouped by prefix: the key of
    /// every per-client policy (rate limits, failed verifications, WebSocket and slot caps).
    pub client: ClientKey,
    /// The route's label for logs and metrics (the template, never the raw path).
    pub label: Option<Arc<str>>,
    /// The matched route (phase "match route").
    pub route: Option<&'a Route>,
    /// The verified caller, on routes that need a token (phase "identity").
    pub identity: Option<Arc<Identity>>,
    /// The decision that let the request through, whose headers every response on the route
    /// carries, errors included (phase "rate limit").
    pub limit: Option<Decision>,
}

impl<'a> RequestCtx<'a> {
    fn new(
        app: &AppState,
        request_id: &'a HeaderValue,
        trace: TraceContext,
        peer: &'a Peer,
        tls: bool,
        headers: &HeaderMap,
    ) -> Self {
        let client = Client::resolve(
            peer.addr,
            headers,
            &app.trusted_proxies,
            app.config.server.ipv6_client_prefix,
        );
        RequestCtx {
            request_id,
            peer: peer.addr,
            forwarded_for: &peer.forwarded_for,
            peer_trusted: client.peer_trusted,
            tls,
            trace,
            client: client.key,
            label: None,
            route: None,
            identity: None,
            limit: None,
        }
    }

    /// What the access log reports about the request.
    fn route_info(&self, app: &AppState) -> RouteInfo {
        RouteInfo {
            route: self.label.clone(),
            upstream: self
                .route
                .and_then(|r| r.upstream)
                .and_then(|i| app.upstreams.get(i))
                .map(|u| u.name.clone()),
        }
    }
}

/// A JSON answer the gateway makes itself, with the `Cache-Control` it decides: a response
/// without one lets any cache in front assign it a heuristic lifetime.
fn json_response(status: StatusCode, body: Bytes, cache_control: &'static str) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static(cache_control),
    );
    resp
}

/// The single entry point for every public request: `rid` is its request id, `trace` its
/// trace context (both from the access layer), `peer` the connection's peer, `tls` whether it came
/// over TLS. Returns the response and, for the access log, the route and upstream it took.
///
/// A plain fn returning an `async move` block, here and in `phases` and `proxy::forward`: an
/// `async fn` keeps each by-value argument twice in its future (the argument and the local it
/// is rebound to, rust-lang/rust#62958), and this future lives in every connection.
#[allow(clippy::manual_async_fn)] // an `async fn` would keep its arguments twice
pub fn handle(
    app: Arc<AppState>,
    req: Request,
    rid: HeaderValue,
    trace: TraceContext,
    peer: &Peer,
    tls: bool,
) -> impl std::future::Future<Output = (Response, RouteInfo)> + Send + '_ {
    async move {
        let app = &*app;
        let mut ctx = RequestCtx::new(app, &rid, trace, peer, tls, req.headers());
        let accepted = app.compressor.accepted(req.headers());
        let result = phases(app, req, &mut ctx).await;
        let mut resp = respond(result, &ctx);
        // Last, after the cache: entries hold the identity body, each answer gets its coding.
        if ctx
            .route
            .map_or(app.config.compression.enabled, |r| r.compress)
        {
            resp = app.compressor.apply(accepted, resp);
        }
        let info = ctx.route_info(app);
        (resp, info)
    }
}

/// The request phases, in order; any of them may end the request with an error.
#[allow(clippy::manual_async_fn)] // an `async fn` would keep its arguments twice
fn phases<'a, 'c>(
    app: &'a AppState,
    req: Request,
    ctx: &'c mut RequestCtx<'a>,
) -> impl std::future::Future<Output = Result<Response, GatewayError>> + Send + use<'a, 'c> {
    async move {
        if let Some(resp) = builtin(app, req.method(), req.uri().path(), req.headers(), ctx)? {
            return Ok(resp);
        }
        // A `Uri` clone shares its bytes: the path outlives `req` without a copy.
        let uri = req.uri().clone();
        let (mut parts, body) = req.into_parts();
        let (route, params) = match_route(app, &parts.method, uri.path(), ctx)?;
        // Before anything that costs (the body, a token check, Redis): a saturated gateway
        // refuses at once. Held until the handler returns.
        let _admitted = app.saturation.admit(&route.label)?;
        check_request(&parts, &params)?;
        // The handshake's own checks come before identity: a browser's token may be in the
        // WebSocket protocol list or the query.
        let handshake = match route.kind {
            RouteKind::Websocket => Some(websocket::prepare(app, &mut parts)?),
            RouteKind::Proxy | RouteKind::UserMe => None,
        };
        identity(app, &mut parts.headers, ctx).await?;
        rate_limit(app, &parts.headers, ctx).await?;
        match (route.kind, handshake) {
            (RouteKind::UserMe, _) => user_me(ctx),
            (RouteKind::Proxy, _) => proxy::forward(app, ctx, route, &params, parts, body).await,
            // Boxed: a handshake is once per WebSocket connection, and its future inline would
            // size every request's future (and so every connection's memory) for it.
            (RouteKind::Websocket, Some(handshake)) => {
                Box::pin(websocket::connect(
                    app, ctx, route, &params, parts, handshake,
                ))
                .await
            }
            (RouteKind::Websocket, None) => Err(GatewayError::Internal),
        }
    }
}

/// Phase "respond": an error becomes its JSON answer, and every response on a rate-limited
/// route carries the RateLimit headers, errors included.
fn respond(result: Result<Response, GatewayError>, ctx: &RequestCtx<'_>) -> Response {
    let mut resp = result.unwrap_or_else(|error| {
        if let GatewayError::Overloaded { cause, .. } = &error {
            count_shed(ctx, cause);
        }
        ErrorReply {
            error: &error,
            request_id: ctx.request_id.to_str().unwrap_or(""),
        }
        .into_response()
    });
    if let Some(decision) = &ctx.limit {
        decision.apply_headers(resp.headers_mut());
    }
    resp
}

/// `gateway_shed_total{route,priority,cause}`: one request refused for overload.
fn count_shed(ctx: &RequestCtx<'_>, cause: &'static str) {
    let priority = ctx.route.map(|r| r.priority).unwrap_or_default();
    metrics::counter!("gateway_shed_total",
        "route" => ctx.label.clone().unwrap_or_else(|| Arc::from("")),
        "priority" => priority.as_str(),
        "cause" => cause)
    .increment(1);
}

/// Phase "match route": the route and its raw (still percent-encoded) parameters.
fn match_route<'a, 'p>(
    app: &'a AppState,
    method: &Method,
    path: &'p str,
    ctx: &mut RequestCtx<'a>,
) -> Result<(&'a Route, Vec<&'p str>), GatewayError> {
    match app.table.find(method, path) {
        RouteMatch::Found { route, params } => {
            ctx.label = Some(route.label.clone());
            ctx.route = Some(route);
            Ok((route, params))
        }
        RouteMatch::MethodNotAllowed(route) => {
            ctx.label = Some(route.label.clone());
            Err(GatewayError::MethodNotAllowed {
                allow: route.allow.clone(),
            })
        }
        RouteMatch::NotFound => Err(GatewayError::NotFound),
    }
}

/// Phase "check request": head rules the HTTP parser leaves to us, and path parameters that
/// must stay one segment.
fn check_request(parts: &http::request::Parts, params: &[&str]) -> Result<(), GatewayError> {
    headers::check_request_head(parts.version, &parts.headers)?;
    for p in params {
        template::check_param(p).map_err(|e| GatewayError::BadRequest(e.0.into()))?;
    }
    Ok(())
}

/// Phase "identity": client-supplied identity headers go (on every route: only the gateway
/// asserts identity); on routes that need a token, the verified caller.
async fn identity(
    app: &AppState,
    headers: &mut HeaderMap,
    ctx: &mut RequestCtx<'_>,
) -> Result<(), GatewayError> {
    strip_identity_headers(headers);
    if ctx.route.is_some_and(|r| r.auth) {
        // Boxed like the upstream call (proxy::call_upstream): verification may call the auth
        // service, a large future that every other request's future would otherwise carry.
        ctx.identity = Some(Box::pin(verify_token(app, headers, ctx)).await?);
    }
    Ok(())
}

/// The request's bearer token, verified: a recently verified token at once; otherwise, unless
/// this client is blocked for failed verifications, by the verifier under a permit of the
/// client's failure budget (so concurrent requests cannot start more verifications than the
/// failures it has left), counting a rejection against the client (`auth.failure_policy`).
async fn verify_token(
    app: &AppState,
    headers: &HeaderMap,
    ctx: &RequestCtx<'_>,
) -> Result<Arc<Identity>, GatewayError> {
    let token = bearer_token(headers)?;
    if let Some(identity) = app.verifier.cached(token).await {
        return Ok(identity);
    }
    app.auth_guard.check(ctx.client)?;
    let verification = app
        .auth_guard
        .admit(ctx.client, app.config.auth.verify_timeout.0)
        .await?;
    // Blocked by the shared count while this one waited for its permit.
    app.auth_guard.check(ctx.client)?;
    match app.verifier.verify(token).await {
        Err(GatewayError::InvalidToken) => {
            app.auth_guard.rejected(ctx.client, verification);
            let route = ctx.label.as_deref().unwrap_or("");
            app.auth_guard
                .failed(&app.limiter, ctx.client, headers, route)
                .await?;
            Err(GatewayError::InvalidToken)
        }
        other => other,
    }
}

/// Phase "rate limit": after identity, so a policy can key on the verified user.
async fn rate_limit(
    app: &AppState,
    headers: &HeaderMap,
    ctx: &mut RequestCtx<'_>,
) -> Result<(), GatewayError> {
    let Some(route) = ctx.route.filter(|r| !r.policies.is_empty()) else {
        return Ok(());
    };
    let subject = Subject {
        client: ctx.client,
        user_id: ctx.identity.as_deref().map(|i| i.user_id.as_str()),
        headers,
        route: &route.label,
    };
    let decision = app.limiter.check(&route.policies, &subject).await;
    if decision.unavailable || !decision.allowed {
        let mut headers = HeaderMap::new();
        decision.apply_headers(&mut headers);
        return Err(if decision.unavailable {
            GatewayError::RateLimiterUnavailable { headers }
        } else {
            GatewayError::RateLimited { headers }
        });
    }
    ctx.limit = Some(decision);
    Ok(())
}

/// `/api/user/me`: the verified identity, no upstream call.
fn user_me(ctx: &RequestCtx<'_>) -> Result<Response, GatewayError> {
    let id = ctx.identity.as_deref().ok_or(GatewayError::Internal)?;
    let body = serde_json::to_vec(&serde_json::json!({
        "user_id": id.user_id,
        "email": id.email,
    }))
    .map_err(|_| GatewayError::Internal)?;
    Ok(json_response(StatusCode::OK, Bytes::from(body), "no-store"))
}

/// `/health` and the docs: answered by the gateway itself, on any version prefix.
fn builtin(
    app: &AppState,
    method: &Method,
    path: &str,
    request: &HeaderMap,
    ctx: &mut RequestCtx<'_>,
) -> Result<Option<Response>, GatewayError> {
    let path = table::unversioned(path);
    let (label, resp): (&'static str, fn(&AppState) -> Response) = match &*path {
        "/health" => ("/health", |a| {
            json_response(StatusCode::OK, a.health.clone(), "no-store")
        }),
        "/api/docs" => ("/api/docs", |a| {
            // Changes only with a reload: may be kept, but revalidated each time.
            let mut resp = json_response(StatusCode::OK, a.openapi.clone(), "no-cache");
            resp.headers_mut()
                .insert(http::header::ETAG, a.openapi_etag.clone());
            resp
        }),
        "/api/docs/ui" | "/api/docs/ui/" => ("/api/docs/ui", |_| docs::ui_page()),
        "/api/docs/ui/swagger-ui.css" => ("/api/docs/ui/*", |_| docs::ui_css()),
        "/api/docs/ui/swagger-ui-bundle.js" => ("/api/docs/ui/*", |_| docs::ui_js()),
        _ => return Ok(None),
    };
    ctx.label = Some(Arc::from(label));
    if *method != Method::GET && *method != Method::HEAD {
        return Err(GatewayError::MethodNotAllowed {
            allow: HeaderValue::from_static("GET, HEAD"),
        });
    }
    let resp = resp(app);
    if resp.headers().contains_key(http::header::ETAG)
        && crate::upstream::cache::not_modified(request, resp.headers())
    {
        let mut not_modified = Response::new(Body::empty());
        *not_modified.status_mut() = StatusCode::NOT_MODIFIED;
        *not_modified.headers_mut() = crate::upstream::cache::not_modified_headers(resp.headers());
        let size = http_body::Body::size_hint(resp.body()).exact().unwrap_or(0);
        let (parts, _) = resp.into_parts();
        not_modified.extensions_mut().insert(compress::Selected {
            headers: parts.headers,
            size,
        });
        return Ok(Some(not_modified));
    }
    Ok(Some(resp))
}

/// The size of the future [`handle`] returns (see `server::request_future_size`).
pub fn handle_future_size() -> usize {
    fn size_of_output<A, B, C, D, E, F, R>(_: fn(A, B, C, D, E, F) -> R) -> usize {
        std::mem::size_of::<R>()
    }
    size_of_output(handle as fn(_, _, _, _, _, _) -> _)
}
