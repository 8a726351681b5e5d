//! WebSocket routes (`kind = "websocket"`): the handshake is where the edge's policies run,
//! then the connection is handed to the relay (`crate::websocket`).
//!
//! Phases, around the common ones (`mod.rs`):
//! - [`prepare`] (before identity): the handshake is checked (GET, `Upgrade: websocket`,
//!   `Connection: upgrade`, a 16-byte `Sec-WebSocket-Key`, version 13, none of key, version
//!   and `Origin` repeated in any spelling: else a JSON 400, or 426 with
//!   `Sec-WebSocket-Version: 13`); the `Origin` must be one CORS allows (`AppState::cors`); a
//!   browser's token (`Sec-WebSocket-Protocol: bearer, <token>` or `?access_token=`) becomes
//!   the `Authorization` the identity phase reads, and leaves the protocol list and the query.
//! - identity and rate limit (policy `ws`) as for any route.
//! - [`connect`]: the connection limits (total and per client IP: 429), then the upstream
//!   handshake (built by `outgoing`, like every request sent for a client) through the
//!   upstream's pipeline (`[websocket] handshake_timeout` or the route's deadline when
//!   shorter, retries elsewhere, breaker: a JSON 503 before any upgrade
//!   while it is open), then the 101 and the relay task.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use axum::body::Body;
use axum::response::Response;
use base64::Engine;
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, StatusCode};

use super::outgoing::{Outgoing, Target};
use super::table::Route;
use super::{AppState, RequestCtx};
use crate::client::ClientKey;
use crate::error::GatewayError;
use crate::websocket::{relay, RelayCounters, RelaySettings, UpstreamPing};

static SEC_WEBSOCKET_KEY: HeaderName = HeaderName::from_static("sec-websocket-key");
static SEC_WEBSOCKET_VERSION: HeaderName = HeaderName::from_static("sec-websocket-version");
static SEC_WEBSOCKET_PROTOCOL: HeaderName = HeaderName::from_static("sec-websocket-protocol");
static SEC_WEBSOCKET_ACCEPT: HeaderName = HeaderName::from_static("sec-websocket-accept");
static SEC_WEBSOCKET_EXTENSIONS: HeaderName = HeaderName::from_static("sec-websocket-extensions");

/// What the handshake phase learned for the upstream handshake.
pub(super) struct Handshake {
    /// The client's query without `access_token` (never forwarded, never logged).
    query: Option<String>,
    /// The client offered its token as `Sec-WebSocket-Protocol: bearer, <token>`: the 101
    /// must select `bearer` (browsers fail a connection whose offered protocols all went
    /// unanswered) unless the upstream selected another of the client's.
    bearer_protocol: bool,
}

/// Open WebSocket connections, in total and per client (`[websocket]` limits; IPv6 by
/// prefix, see [`ClientKey`]).
#[derive(Default)]
pub struct WsConnections {
    per_ip: Mutex<HashMap<ClientKey, usize>>,
    total: std::sync::atomic::AtomicUsize,
}

/// One open connection, counted until dropped.
pub(crate) struct WsSlot {
    conns: Arc<WsConnections>,
    ip: ClientKey,
}

impl Drop for WsSlot {
    fn drop(&mut self) {
        self.conns
            .total
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let mut per_ip = self
            .conns
            .per_ip
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

impl WsConnections {
    /// Open connections now.
    pub fn open(&self) -> usize {
        self.total.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn take(self: &Arc<Self>, ip: ClientKey, total: usize, per_ip: usize) -> Option<WsSlot> {
        let mut counts = self.per_ip.lock().unwrap_or_else(PoisonError::into_inner);
        let mine = counts.get(&ip).copied().unwrap_or(0);
        if mine >= per_ip || self.open() >= total {
            return None;
        }
        *counts.entry(ip).or_default() = mine + 1;
        self.total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(WsSlot {
            conns: self.clone(),
            ip,
        })
    }
}

fn header_has_token(parts: &Parts, name: &HeaderName, token: &str) -> bool {
    parts.headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

fn bad(why: &'static str) -> GatewayError {
    GatewayError::BadRequest(why.into())
}

/// Phase "websocket handshake" (before identity): checks the handshake and the origin, and
/// moves a browser's token to `Authorization`.
pub(super) fn prepare(app: &AppState, parts: &mut Parts) -> Result<Handshake, GatewayError> {
    if parts.method != Method::GET {
        return Err(GatewayError::MethodNotAllowed {
            allow: HeaderValue::from_static("GET"),
        });
    }
    if parts.version != http::Version::HTTP_11 {
        return Err(bad("WebSocket upgrades need HTTP/1.1"));
    }
    if !header_has_token(parts, &header::UPGRADE, "websocket") {
        return Err(GatewayError::UpgradeRequired);
    }
    if !header_has_token(parts, &header::CONNECTION, "upgrade") {
        return Err(bad("WebSocket handshake without Connection: upgrade"));
    }
    // The checks below read one value; the upstream must not be handed another (RFC 6455
    // 4.2.1 allows each once). Counted in every spelling, like every header we check.
    for name in ["sec-websocket-key", "sec-websocket-version", "origin"] {
        if super::headers::count_spellings(&parts.headers, name) > 1 {
            return Err(bad(
                "WebSocket handshake with a repeated Sec-WebSocket-Key, Sec-WebSocket-Version or Origin",
            ));
        }
    }
    let version = parts.headers.get(&SEC_WEBSOCKET_VERSION);
    if version.is_none_or(|v| v.as_bytes() != b"13") {
        return Err(GatewayError::UpgradeRequired);
    }
    let key_ok = parts
        .headers
        .get(&SEC_WEBSOCKET_KEY)
        .and_then(|k| {
            base64::engine::general_purpose::STANDARD
                .decode(k.as_bytes())
                .ok()
        })
        .is_some_and(|k| k.len() == 16);
    if !key_ok {
        return Err(bad("WebSocket handshake without a valid Sec-WebSocket-Key"));
    }
    if let Some(origin) = parts.headers.get(header::ORIGIN) {
        if !app.cors.allows(origin) {
            return Err(GatewayError::OriginNotAllowed);
        }
    }
    // A browser cannot set Authorization on a WebSocket: it offers the token as a protocol
    // (`bearer, <token>`) or in the query. Either becomes the Authorization header the
    // identity phase reads, and leaves what is forwarded (and the query, which is logged
    // nowhere, but travels in upstream logs).
    let mut bearer_protocol = false;
    let offered: Vec<String> = parts
        .headers
        .get_all(&SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    let mut token_from_protocol = None;
    if let Some(i) = offered
        .iter()
        .position(|p| p.eq_ignore_ascii_case("bearer"))
    {
        let token = offered
            .get(i + 1)
            .cloned()
            .ok_or_else(|| bad("bearer protocol without a token"))?;
        bearer_protocol = true;
        token_from_protocol = Some(token.clone());
        let rest: Vec<&str> = offered
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i && *j != i + 1)
            .map(|(_, p)| p.as_str())
            .collect();
        parts.headers.remove(&SEC_WEBSOCKET_PROTOCOL);
        if !rest.is_empty() {
            let joined = HeaderValue::from_str(&rest.join(", "))
                .map_err(|_| bad("invalid Sec-WebSocket-Protocol"))?;
            parts.headers.insert(SEC_WEBSOCKET_PROTOCOL.clone(), joined);
        }
    }
    let mut token_from_query = None;
    let query = parts.uri.query().map(|q| {
        let kept: Vec<&str> = q
            .split('&')
            .filter(|pair| {
                let name = pair.split_once('=').map_or(*pair, |(n, _)| n);
                if name == "access_token" {
                    token_from_query = pair.split_once('=').map(|(_, v)| v.to_string());
                    false
                } else {
                    true
                }
            })
            .collect();
        kept.join("&")
    });
    if !parts.headers.contains_key(header::AUTHORIZATION) {
        if let Some(token) = token_from_protocol.or(token_from_query) {
            let value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| GatewayError::InvalidToken)?;
            parts.headers.insert(header::AUTHORIZATION, value);
        }
    }
    Ok(Handshake {
        query: query.filter(|q| !q.is_empty()),
        bearer_protocol,
    })
}

/// Phase "websocket connect": limits, the upstream handshake, the 101, and the relay.
pub(super) async fn connect(
    app: &AppState,
    ctx: &RequestCtx<'_>,
    route: &Route,
    params: &[&str],
    mut parts: Parts,
    handshake: Handshake,
) -> Result<Response, GatewayError> {
    let up = app.upstream_of(route)?;
    let ws = &app.config.websocket;
    let slot = app
        .ws_connections
        .take(ctx.client, ws.max_connections, ws.max_connections_per_ip)
        .ok_or(GatewayError::TooManyConnections)?;
    let on_client_upgrade = parts
        .extensions
        .remove::<hyper::upgrade::OnUpgrade>()
        .ok_or_else(|| bad("the connection cannot be upgraded (HTTP/1.1 only)"))?;
    let target = Target::new(route, params, handshake.query.as_deref());
    let req = Outgoing::new(app, ctx, route, up).upgrade(&target, parts.headers)?;
    let delivered = Box::pin(up.pipeline.send_request(req))
        .await
        .map_err(|e| up.error(e))?;
    if delivered.response.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The upstream refused the upgrade (404, 426, 401...): its answer, as for any route.
        let answer: http::Response<reqwest::Body> = delivered.response.into();
        let (mut resp_parts, body) = answer.into_parts();
        super::headers::strip_hop_by_hop(&mut resp_parts.headers);
        return Ok(Response::from_parts(resp_parts, Body::new(body)));
    }
    // A WebSocket is no bulkhead call: its slot is the `[websocket]` limits'.
    drop(delivered.slot);
    let upstream_headers = delivered.response.headers().clone();
    let upstream_io = delivered.response.upgrade().await.map_err(|e| {
        tracing::warn!(upstream = %up.name, error = %e, "websocket: upstream upgrade failed");
        up.error(crate::upstream::UpstreamError::Unavailable {
            attempts: 1,
            detail: e.to_string(),
        })
    })?;
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    for name in [
        &SEC_WEBSOCKET_ACCEPT,
        &SEC_WEBSOCKET_EXTENSIONS,
        &SEC_WEBSOCKET_PROTOCOL,
    ] {
        if let Some(v) = upstream_headers.get(name) {
            h.insert(name.clone(), v.clone());
        }
    }
    if handshake.bearer_protocol && !h.contains_key(&SEC_WEBSOCKET_PROTOCOL) {
        h.insert(
            SEC_WEBSOCKET_PROTOCOL.clone(),
            HeaderValue::from_static("bearer"),
        );
    }
    spawn_relay(
        app,
        ctx,
        route,
        up.name.clone(),
        on_client_upgrade,
        upstream_io,
        slot,
    );
    Ok(resp)
}

fn spawn_relay(
    app: &AppState,
    ctx: &RequestCtx<'_>,
    route: &Route,
    upstream: Arc<str>,
    on_client_upgrade: hyper::upgrade::OnUpgrade,
    upstream_io: reqwest::Upgraded,
    slot: WsSlot,
) {
    let label = route.label.clone();
    let ws = &app.config.websocket;
    let settings = RelaySettings {
        idle_timeout: ws.idle_timeout.0,
        max_lifetime: ws.max_lifetime.map(|d| d.0),
        close_timeout: ws.close_timeout.0,
        send_timeout: app.config.limits.send_timeout.0,
        upstream_ping: ws.upstream_ping.then_some(UpstreamPing {
            interval: ws.upstream_ping_interval.0,
            timeout: ws.upstream_pong_timeout.0,
        }),
    };
    let counter = |name: &'static str, direction: &'static str| metrics::counter!(name, "route" => label.to_string(), "direction" => direction);
    let counters = RelayCounters {
        bytes_in: counter("gateway_websocket_bytes_total", "in"),
        bytes_out: counter("gateway_websocket_bytes_total", "out"),
        messages_in: counter("gateway_websocket_messages_total", "in"),
        messages_out: counter("gateway_websocket_messages_total", "out"),
    };
    let gauge = metrics::gauge!("gateway_websocket_connections", "route" => label.to_string());
    let shutdown = app.shutdown.clone();
    let request_id = ctx.request_id.to_str().unwrap_or("").to_string();
    let remote = ctx.peer;
    tokio::spawn(async move {
        let _slot = slot;
        let client_io = match on_client_upgrade.await {
            Ok(upgraded) => hyper_util::rt::TokioIo::new(upgraded),
            Err(e) => {
                tracing::info!(route = %label, error = %e, "websocket: client gone before the upgrade");
                return;
            }
        };
        gauge.increment(1.0);
        let started = std::time::Instant::now();
        let stats = relay(client_io, upstream_io, settings, shutdown, counters).await;
        gauge.decrement(1.0);
        metrics::counter!("gateway_websocket_closed_total", "route" => label.to_string(), "reason" => stats.ended_by).increment(1);
        tracing::info!(
            target: "access",
            event = "websocket_close",
            route = %label,
            upstream = %upstream,
            remote = %remote,
            request_id = %request_id,
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            bytes_in = stats.bytes_in,
            bytes_out = stats.bytes_out,
            messages_in = stats.messages_in,
            messages_out = stats.messages_out,
            close_code = stats.close_code,
            ended_by = stats.ended_by,
            "websocket closed"
        );
    });
}
