//! The public surface: built-in endpoints (health, docs), the route table and the generic
//! proxy handler, and the shared state they run on.

pub mod admin;
pub mod docs;
pub mod headers;
pub mod proxy;
pub mod table;
pub mod template;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, StatusCode};

use crate::auth::{strip_identity_headers, TokenVerifier};
use crate::config::{Config, RouteKind};
use crate::error::GatewayError;
use crate::observability::access::RouteInfo;
use crate::ratelimit::{client_ip, Subject};
use crate::upstream::pipeline::Pipeline;
use table::{RouteMatch, RouteTable};

/// One upstream at run time.
pub struct UpstreamRuntime {
    pub name: Arc<str>,
    /// Base URL without a trailing slash; the rewritten path is appended.
    pub base_url: String,
    /// `base_url` parsed once, when it has no path prefix: the proxy then parses only each
    /// request's path and query against it instead of the whole URL (host and IDNA included).
    pub base: Option<reqwest::Url>,
    /// The `error` text clients see when it is down ("Storage service unavailable").
    pub message: Arc<str>,
    pub pipeline: Pipeline,
}

/// Everything a request needs, built once at startup and shared.
pub struct AppState {
    pub config: Config,
    pub table: RouteTable,
    pub upstreams: Vec<UpstreamRuntime>,
    pub verifier: TokenVerifier,
    /// Counts failed verifications per client and refuses clients over the policy.
    pub auth_guard: crate::auth::guard::FailureGuard,
    pub limiter: crate::ratelimit::RateLimiter,
    /// The shared response cache (routes opt in).
    pub cache: crate::upstream::cache::ResponseCache,
    pub timeout_status: StatusCode,
    pub max_body: u64,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Client headers never forwarded from untrusted peers (`[headers]`).
    pub header_policy: headers::HeaderPolicy,
    /// The OpenAPI document, rendered once from the route table.
    pub openapi: Bytes,
    pub health: Bytes,
}

impl AppState {
    pub fn upstream_index(&self, name: &str) -> Option<usize> {
        self.upstreams.iter().position(|u| &*u.name == name)
    }
}

fn json_response(status: StatusCode, body: Bytes) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// The single entry point for every public request: `rid` is its request id, `peer_addr` the
/// TCP peer. Returns the response and, for the access log, the route and upstream it took.
pub async fn handle(
    app: Arc<AppState>,
    req: Request,
    rid: HeaderValue,
    peer_addr: SocketAddr,
) -> (Response, RouteInfo) {
    let mut info = RouteInfo::default();
    let result = dispatch(&app, req, &rid, peer_addr, &mut info).await;
    let resp = match result {
        Ok(r) => r,
        Err(e) => e.to_response(rid.to_str().unwrap_or(""), app.timeout_status),
    };
    (resp, info)
}

async fn dispatch(
    app: &AppState,
    req: Request,
    rid: &HeaderValue,
    peer_addr: SocketAddr,
    info: &mut RouteInfo,
) -> Result<Response, GatewayError> {
    let method = req.method().clone();
    if let Some(resp) = builtin(app, &method, req.uri().path(), info)? {
        return Ok(resp);
    }
    // A `Uri` clone shares its bytes: the path outlives `req` without a copy.
    let uri = req.uri().clone();
    let path = uri.path();
    let (route, params) = match app.table.find(&method, path) {
        RouteMatch::Found { route, params } => (route, params),
        RouteMatch::MethodNotAllowed(route) => {
            info.route = Some(route.label.clone());
            return Err(GatewayError::MethodNotAllowed {
                allow: route.allow.clone(),
            });
        }
        RouteMatch::NotFound => return Err(GatewayError::NotFound),
    };
    info.route = Some(route.label.clone());
    info.upstream = route
        .upstream
        .and_then(|i| app.upstreams.get(i))
        .map(|u| u.name.clone());
    for p in &params {
        template::check_param(p).map_err(|e| GatewayError::BadRequest(e.0.into()))?;
    }
    // Canonical form, so an IPv4 client on a dual-stack listener matches IPv4 trusted proxies.
    let peer = peer_addr.ip().to_canonical();
    let (mut parts, body) = req.into_parts();
    headers::check_request_head(parts.version, &parts.headers)?;
    // Identity headers are the gateway's to assert, on every route, authenticated or not.
    strip_identity_headers(&mut parts.headers);
    let client = client_ip(peer_addr, &parts.headers, &app.trusted_proxies);
    let identity = if route.auth {
        // Boxed like the upstream call (proxy::call_upstream): verification may call the auth service,
        // a large future that every other request's handler future would otherwise carry.
        Some(Box::pin(verify_token(app, &parts.headers, client, &route.label)).await?)
    } else {
        None
    };
    // Rate limiting after identity, so a policy can key on the verified user.
    let limit = if route.policies.is_empty() {
        None
    } else {
        let subject = Subject {
            client_ip: client,
            user_id: identity.as_deref().map(|i| i.user_id.as_str()),
            headers: &parts.headers,
            route: &route.label,
        };
        let decision = app.limiter.check(&route.policies, &subject).await;
        if decision.unavailable || !decision.allowed {
            let mut headers = http::HeaderMap::new();
            decision.apply_headers(&mut headers);
            return Err(if decision.unavailable {
                GatewayError::RateLimiterUnavailable { headers }
            } else {
                GatewayError::RateLimited { headers }
            });
        }
        Some(decision)
    };
    let result = match route.kind {
        RouteKind::UserMe => user_me(identity.as_deref()),
        RouteKind::Proxy => {
            let ctx = proxy::RequestCtx {
                peer,
                request_id: rid,
                identity: identity.as_deref(),
                header_policy: &app.header_policy,
            };
            proxy::forward(app, route, &params, parts, body, &ctx).await
        }
    };
    // Every response on a limited route carries the RateLimit headers, errors included.
    let mut resp =
        result.unwrap_or_else(|e| e.to_response(rid.to_str().unwrap_or(""), app.timeout_status));
    if let Some(decision) = limit {
        decision.apply_headers(resp.headers_mut());
    }
    Ok(resp)
}

/// The request's bearer token, verified: a recently verified token at once; otherwise, unless
/// this client is blocked for failed verifications, by the verifier, counting a rejection
/// against the client (`auth.failure_policy`).
async fn verify_token(
    app: &AppState,
    headers: &http::HeaderMap,
    client: std::net::IpAddr,
    route: &str,
) -> Result<Arc<crate::auth::Identity>, GatewayError> {
    let token = crate::auth::bearer_token(headers)?;
    if let Some(identity) = app.verifier.cached(token).await {
        return Ok(identity);
    }
    app.auth_guard.check(client)?;
    match app.verifier.verify(token).await {
        Err(GatewayError::InvalidToken) => {
            app.auth_guard
                .failed(&app.limiter, client, headers, route)
                .await?;
            Err(GatewayError::InvalidToken)
        }
        other => other,
    }
}

/// `/api/user/me`: the verified identity, no upstream call.
fn user_me(identity: Option<&crate::auth::Identity>) -> Result<Response, GatewayError> {
    let id = identity.ok_or(GatewayError::Internal)?;
    let body = serde_json::to_vec(&serde_json::json!({
        "user_id": id.user_id,
        "email": id.email,
    }))
    .map_err(|_| GatewayError::Internal)?;
    Ok(json_response(StatusCode::OK, Bytes::from(body)))
}

/// `/health` and the docs: answered by the gateway itself, on any version prefix.
fn builtin(
    app: &AppState,
    method: &Method,
    path: &str,
    info: &mut RouteInfo,
) -> Result<Option<Response>, GatewayError> {
    let path = table::unversioned(path);
    let (label, resp): (&'static str, fn(&AppState) -> Response) = match &*path {
        "/health" => ("/health", |a| {
            json_response(StatusCode::OK, a.health.clone())
        }),
        "/api/docs" => ("/api/docs", |a| {
            json_response(StatusCode::OK, a.openapi.clone())
        }),
        "/api/docs/ui" | "/api/docs/ui/" => ("/api/docs/ui", |_| docs::ui_page()),
        "/api/docs/ui/swagger-ui.css" => ("/api/docs/ui/*", |_| docs::ui_css()),
        "/api/docs/ui/swagger-ui-bundle.js" => ("/api/docs/ui/*", |_| docs::ui_js()),
        _ => return Ok(None),
    };
    info.route = Some(Arc::from(label));
    if *method != Method::GET && *method != Method::HEAD {
        return Err(GatewayError::MethodNotAllowed {
            allow: HeaderValue::from_static("GET, HEAD"),
        });
    }
    Ok(Some(resp(app)))
}
