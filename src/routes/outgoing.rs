//! The request the gateway sends upstream for a client, built in ONE place (like pingora's
//! `upstream_request_filter`): the proxy (and its cache fills) and the WebSocket handshake
//! both call [`Outgoing`], which owns
//!
//! - the target URL: the upstream's base, the route's rewritten path, the query forwarded;
//! - the forwarded headers: the client's, minus hop-by-hop and anything the gateway asserts,
//!   plus `X-Forwarded-For` / `-Proto` and `X-Request-Id` ([`super::headers::upstream_headers`]);
//! - the identity headers of the verified caller (`X-User-Id`, `X-User-Email`);
//! - the trace context, from the value the access layer parsed (`traceparent` here, the same
//!   value for the pipeline's attempt spans);
//! - the call's [`CallOptions`], from the route's limits and the method.
//!
//! The result is an [`UpstreamRequest`] for the upstream's pipeline. The gateway's own calls
//! (token verification) carry none of the client's headers and build theirs with
//! `UpstreamRequest::new` and the same `CallOptions` constructors (`auth`).

use bytes::Bytes;
use http::header;
use http::{HeaderMap, HeaderValue, Method};

use super::headers::upstream_headers;
use super::table::Route;
use super::{AppState, RequestCtx, UpstreamRuntime};
use crate::error::GatewayError;
use crate::upstream::{CallLimits, CallOptions, Caller, UpstreamRequest};

/// The upstream path, rewritten from the route's upstream template.
pub fn upstream_path(route: &Route, params: &[&str]) -> String {
    let mut path = String::with_capacity(64);
    if let Some(t) = &route.upstream_template {
        t.render(&route.template, params, &mut path);
    }
    path
}

/// base + path + the client's raw query string (repeated keys and encoding untouched).
pub fn upstream_url(base: &str, path: &str, query: Option<&str>) -> String {
    let mut url = String::with_capacity(base.len() + path.len() + 1 + query.map_or(0, str::len));
    url.push_str(base);
    url.push_str(path);
    if let Some(q) = query.filter(|q| !q.is_empty()) {
        url.push('?');
        url.push_str(q);
    }
    url
}

/// The upstream's base URL, parsed, if it is plain `scheme://host[:port][/]` (no path
/// prefix, user info, query or fragment): only then is a path relative to it the same URL as
/// `base + path` (a prefix would be replaced, not extended).
pub fn parse_base(base: &str) -> Option<reqwest::Url> {
    reqwest::Url::parse(base).ok().filter(|u| {
        u.path() == "/"
            && u.username().is_empty()
            && u.password().is_none()
            && u.query().is_none()
            && u.fragment().is_none()
    })
}

/// Parses `base_url + path + ?query` (see [`upstream_url`]); `None` if it is no URL. With a parsed `base` and a
/// path that starts with exactly one `/`, only the path and query are parsed, relative to
/// it: the same URL without re-parsing the host per request (it showed in profiles). A path
/// starting `//` or `/\` would read as a new authority when relative, so it takes the long way.
pub fn parse_upstream_url(
    base: Option<&reqwest::Url>,
    base_url: &str,
    path: &str,
    query: Option<&str>,
) -> Option<reqwest::Url> {
    let plain_path = path.starts_with('/') && !matches!(path.as_bytes().get(1), Some(b'/' | b'\\'));
    match base {
        Some(base) if plain_path => {
            let options = reqwest::Url::options().base_url(Some(base));
            match query.filter(|q| !q.is_empty()) {
                // No query: the path as it is, no copy.
                None => options.parse(path).ok(),
                Some(_) => options.parse(&upstream_url("", path, query)).ok(),
            }
        }
        _ => reqwest::Url::parse(&upstream_url(base_url, path, query)).ok(),
    }
}

/// What the upstream is asked for: the rewritten path and the query, exactly the bytes
/// forwarded (and, on cached routes, the cache key's).
pub(super) struct Target<'q> {
    pub(super) path: String,
    pub(super) query: Option<&'q str>,
}

impl<'q> Target<'q> {
    /// The route's upstream path for `params`, and `query` (the client's raw query when the
    /// route forwards it; the handshake's without its token).
    pub(super) fn new(route: &Route, params: &[&str], query: Option<&'q str>) -> Target<'q> {
        Target {
            path: upstream_path(route, params),
            query,
        }
    }
}

/// The route's limits on its upstream calls.
fn limits(route: &Route) -> CallLimits {
    CallLimits {
        deadline: route.deadline,
        attempt_timeout: route.attempt_timeout,
        max_retries: route.retries,
        retry_non_idempotent: route.retry_non_idempotent,
        hedge_after: route.hedge_after,
    }
}

/// Builds the requests one client request sends to its route's upstream.
pub(super) struct Outgoing<'a> {
    app: &'a AppState,
    ctx: &'a RequestCtx<'a>,
    route: &'a Route,
    up: &'a UpstreamRuntime,
}

impl<'a> Outgoing<'a> {
    pub(super) fn new(
        app: &'a AppState,
        ctx: &'a RequestCtx<'a>,
        route: &'a Route,
        up: &'a UpstreamRuntime,
    ) -> Outgoing<'a> {
        Outgoing {
            app,
            ctx,
            route,
            up,
        }
    }

    /// A proxied request: `method` (a cache fill asks GET for a client's HEAD) to `target`,
    /// with the client's `headers` made fit to forward and its buffered `body`, sent when
    /// there is one or the client's method may carry one.
    pub(super) fn proxied(
        &self,
        method: Method,
        client_method: &Method,
        target: &Target<'_>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<UpstreamRequest, GatewayError> {
        // Retries and hedging follow what the client asked for.
        let options = CallOptions::for_method(client_method, limits(self.route));
        let mut req = self.build(method, target, headers, options)?;
        if !body.is_empty() || !matches!(*client_method, Method::GET | Method::HEAD) {
            req.set_body(body);
        }
        req.caller = Caller {
            client: Some(self.ctx.client),
            priority: self.route.priority,
            latency_class: self.route.latency_class,
        };
        req.limited = true;
        Ok(req)
    }

    /// A WebSocket handshake: the client's headers as for any proxied request, minus its
    /// `Authorization` (which may have come from the protocol list or the query: the
    /// upstream gets the verified identity instead), and the upgrade itself again (hop-by-hop
    /// headers, stripped with the rest). Counted by the `[websocket]` limits, not the
    /// client's share of the upstream's slots.
    pub(super) fn upgrade(
        &self,
        target: &Target<'_>,
        mut headers: HeaderMap,
    ) -> Result<UpstreamRequest, GatewayError> {
        headers.remove(header::AUTHORIZATION);
        // The handshake's own short deadline (`[websocket] handshake_timeout`), not the
        // route's: a service that accepts the connection but does not answer (paused) must
        // not keep a new subscriber waiting 10 s.
        let mut limits = limits(self.route);
        limits.deadline = limits
            .deadline
            .min(self.app.config.websocket.handshake_timeout.0);
        limits.attempt_timeout = limits.attempt_timeout.min(limits.deadline);
        let options = CallOptions::for_upgrade(limits);
        let mut req = self.build(Method::GET, target, headers, options)?;
        let headers = req.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        Ok(req)
    }

    /// What every request for a client gets: the URL, the forwarded headers, the request id,
    /// the caller's identity and the trace context.
    fn build(
        &self,
        method: Method,
        target: &Target<'_>,
        client_headers: HeaderMap,
        options: CallOptions,
    ) -> Result<UpstreamRequest, GatewayError> {
        let (up, ctx) = (self.up, self.ctx);
        let url = parse_upstream_url(up.base.as_ref(), &up.base_url, &target.path, target.query)
            .ok_or_else(|| GatewayError::BadRequest("invalid request path".into()))?;
        let mut req = UpstreamRequest::new(method, url, options);
        *req.headers_mut() = upstream_headers(
            client_headers,
            ctx.forwarded_for,
            ctx.peer_trusted,
            ctx.tls,
            ctx.request_id,
            &self.app.header_policy,
        );
        if let Some(id) = &ctx.identity {
            id.insert_headers(req.headers_mut())?;
        }
        Ok(req.in_trace(&ctx.trace))
    }
}
