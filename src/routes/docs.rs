//! `/api/docs`: an OpenAPI 3 document generated from the route table (so it cannot drift
//! from what the gateway serves), and `/api/docs/ui`: Swagger UI from vendored assets.
//!
//! Each operation lists every status its route can answer, and nothing else: the upstream's
//! own (the route's `openapi.responses`; its errors are `ServiceError`, `{"error": "..."}`)
//! and the gateway's (`Error`, decided by the route's settings: kind, auth, rate limits,
//! cache). A status both can answer is `oneOf` the two bodies, the gateway's first: they are
//! disjoint (an `Error` has `reason` and `request_id`, a `ServiceError` nothing but `error`),
//! and a generated client tries them in that order. There is no `default` response, so a
//! generated client raises on a status nobody documented instead of returning `None`.

use axum::body::Body;
use axum::response::Response;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::HeaderValue;
use serde_json::{json, Map, Value};

use crate::config::schema::hoist_titled;
use crate::config::{Config, OnRedisError, ParamLocation, ResponseDoc, RouteConfig, RouteKind};
use std::collections::BTreeMap;

use super::template::{parse_template, Segment};

/// Every `reason` the gateway's errors carry (`src/error.rs`; `overloaded` is the 503 of
/// load shedding). The tests render every error variant and check it is listed here.
pub const REASONS: &[&str] = &[
    "bad_request",
    "unauthenticated",
    "origin_not_allowed",
    "not_found",
    "method_not_allowed",
    "request_timeout",
    "payload_too_large",
    "expectation_failed",
    "upgrade_required",
    "rate_limited",
    "too_many_connections",
    "too_many_in_flight",
    "internal",
    "upstream_unavailable",
    "upstream_timeout",
    "circuit_open",
    "overloaded",
    "rate_limiter_unavailable",
    "auth_unavailable",
];

/// Everything the document is rendered from, and nothing else: [`openapi`] reads the
/// configuration only through it, so two configurations with equal sources have the same
/// document, and a reload that changes none of it (an upstream's timeout, a rate limit)
/// keeps the document it has instead of rendering it again (~19,000 short-lived
/// allocations, whose freed memory malloc kept: README "Soak").
#[derive(Debug, PartialEq)]
pub struct DocsSource<'a> {
    routes: &'a [RouteConfig],
    service_name: &'a str,
    max_body: u64,
    /// `auth.failure_policy` is set: routes with a token can answer 429 for failed tokens.
    counts_auth_failures: bool,
    timeout_status: u16,
    on_redis_error: OnRedisError,
    compression: bool,
    /// Each upstream's 503 message, by name.
    unavailable: BTreeMap<&'a str, String>,
}

impl DocsSource<'_> {
    pub fn of(cfg: &Config) -> DocsSource<'_> {
        DocsSource {
            routes: &cfg.routes,
            service_name: &cfg.service_name,
            max_body: cfg.limits.max_body.0,
            counts_auth_failures: !cfg.auth.failure_policy.is_empty(),
            timeout_status: cfg.errors.timeout_status,
            on_redis_error: cfg.rate_limit.on_redis_error,
            compression: cfg.compression.enabled,
            unavailable: cfg
                .upstreams
                .iter()
                .map(|(name, u)| (name.as_str(), u.unavailable_message(name)))
                .collect(),
        }
    }

    fn unavailable_message(&self, upstream: &str) -> String {
        self.unavailable.get(upstream).cloned().unwrap_or_default()
    }
}

const REQUEST_ID_EXAMPLE: &str = "9f0c3b6e2a1d4c58b7e6f5a4d3c2b1a0";

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn header_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/headers/{name}")})
}

/// A status the gateway itself may answer on a route, with `Error`.
struct GatewayStatus {
    status: u16,
    description: String,
    /// A representative body.
    example: Value,
    /// Carries `Retry-After` (429, and the 503s of an open breaker, shedding, a denied limiter).
    retry_after: bool,
    /// Carries `WWW-Authenticate: Bearer` (a missing or rejected token).
    www_authenticate: bool,
}

fn gateway_error(
    status: u16,
    description: impl Into<String>,
    reason: &str,
    message: &str,
    upstream: Option<&str>,
) -> GatewayStatus {
    let mut example = json!({"error": message, "reason": reason, "request_id": REQUEST_ID_EXAMPLE});
    if let Some(upstream) = upstream {
        example["upstream"] = json!(upstream);
    }
    GatewayStatus {
        status,
        description: description.into(),
        example,
        retry_after: matches!(status, 429 | 503),
        www_authenticate: status == 401,
    }
}

/// What the gateway can answer on `route` by itself, from the route's settings.
fn gateway_statuses(
    cfg: &DocsSource<'_>,
    route: &RouteConfig,
    has_params: bool,
) -> Vec<GatewayStatus> {
    let needs_token = route.auth || route.kind == RouteKind::UserMe;
    let proxies = matches!(route.kind, RouteKind::Proxy | RouteKind::Websocket);
    let mut out = vec![gateway_error(
        400,
        "Refused by the gateway: a malformed path parameter (an encoded slash, a dot segment, \
         a control character), request head or body, or a body on GET",
        "bad_request",
        "a GET or HEAD request must not have a body",
        None,
    )];
    if needs_token {
        out.push(gateway_error(
            401,
            "No bearer token, or one the auth service rejected",
            "unauthenticated",
            "Invalid token",
            None,
        ));
    }
    if route.kind == RouteKind::Websocket {
        out.push(gateway_error(
            403,
            "A handshake from an Origin that is not among the CORS origins",
            "origin_not_allowed",
            "Origin not allowed",
            None,
        ));
    }
    if has_params {
        out.push(gateway_error(
            404,
            "An empty path parameter: no route matches",
            "not_found",
            "Not found",
            None,
        ));
    }
    if route.kind == RouteKind::Proxy {
        out.push(gateway_error(
            408,
            "The request body did not arrive within the route's deadline",
            "request_timeout",
            "Request body not received in time",
            None,
        ));
        out.push(gateway_error(
            413,
            format!("A request body over limits.max_body ({})", cfg.max_body),
            "payload_too_large",
            &format!("Request body larger than {} bytes", cfg.max_body),
            None,
        ));
    }
    out.push(gateway_error(
        417,
        "An Expect header other than 100-continue",
        "expectation_failed",
        "Unsupported Expect header (only 100-continue is supported)",
        None,
    ));
    if route.kind == RouteKind::Websocket {
        let mut s = gateway_error(
            426,
            "Not a WebSocket upgrade, or not Sec-WebSocket-Version 13",
            "upgrade_required",
            "This route is a WebSocket: upgrade with Sec-WebSocket-Version 13",
            None,
        );
        s.retry_after = false;
        out.push(s);
    }
    let limited = !route.rate_limit.is_empty();
    let counts_failures = needs_token && cfg.counts_auth_failures;
    // A proxied HTTP call counts against the client's share of the upstream's slots.
    let shared_slots = route.kind == RouteKind::Proxy;
    if limited || counts_failures || route.kind == RouteKind::Websocket || shared_slots {
        let mut why = Vec::new();
        if limited {
            why.push(format!(
                "over the rate limit ({}; RateLimit and Retry-After say how long to wait)",
                route.rate_limit.join(", ")
            ));
        }
        if counts_failures {
            why.push("too many rejected tokens from this client".to_string());
        }
        if route.kind == RouteKind::Websocket {
            why.push("over the WebSocket connection limits (too_many_connections)".to_string());
        }
        if shared_slots {
            why.push(
                "this client already holds its share of the upstream's slots \
                 (too_many_in_flight, with Retry-After)"
                    .to_string(),
            );
        }
        let (reason, message) = if limited || counts_failures {
            ("rate_limited", "Rate limit exceeded")
        } else if shared_slots {
            (
                "too_many_in_flight",
                "Too many requests in flight from this client",
            )
        } else {
            ("too_many_connections", "Too many WebSocket connections")
        };
        out.push(gateway_error(
            429,
            capitalised(&why.join("; or ")),
            reason,
            message,
            None,
        ));
    }
    out.push(gateway_error(
        500,
        "A bug in the gateway (details only in its log)",
        "internal",
        "Internal server error",
        None,
    ));
    let mut unavailable = Vec::new();
    let mut example = None;
    if proxies {
        let name = route.upstream.as_deref().unwrap_or_default();
        let message = cfg.unavailable_message(name);
        unavailable.push(
            "the upstream is unreachable (upstream_unavailable), its breaker is open \
             (circuit_open, with Retry-After), it is saturated and the request was shed \
             (overloaded, with Retry-After)",
        );
        if cfg.timeout_status == 503 {
            unavailable.push("or too slow (upstream_timeout)");
        }
        example = Some((
            "upstream_unavailable".to_string(),
            message,
            Some(name.to_string()),
        ));
    }
    if needs_token {
        unavailable.push("the auth service could not verify the token (auth_unavailable)");
        example.get_or_insert_with(|| {
            (
                "auth_unavailable".into(),
                "Auth service unavailable".into(),
                None,
            )
        });
    }
    if limited && cfg.on_redis_error == OnRedisError::Deny {
        unavailable.push("Redis is down and on_redis_error = \"deny\" (rate_limiter_unavailable)");
    }
    if let Some((reason, message, upstream)) = example {
        out.push(gateway_error(
            503,
            capitalised(&unavailable.join("; ")),
            &reason,
            &message,
            upstream.as_deref(),
        ));
    }
    if proxies && cfg.timeout_status == 504 {
        let name = route.upstream.as_deref().unwrap_or_default();
        let message = cfg.unavailable_message(name);
        let mut s = gateway_error(
            504,
            "The upstream was too slow (errors.timeout_status = 504)",
            "upstream_timeout",
            &message,
            Some(name),
        );
        s.retry_after = false;
        out.push(s);
    }
    out
}

fn capitalised(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// The success a route answers when its table entry documents none.
fn default_success(route: &RouteConfig) -> (String, ResponseDoc) {
    match route.kind {
        RouteKind::Websocket => (
            "101".into(),
            ResponseDoc {
                description: "Switching Protocols: the WebSocket is relayed to the upstream".into(),
                ..ResponseDoc::default()
            },
        ),
        RouteKind::UserMe => ("200".into(), {
            let mut doc = crate::config::responses::user_me()
                .remove("200")
                .unwrap_or_default();
            doc.schema.get_or_insert_with(|| schema_ref("User"));
            doc
        }),
        RouteKind::Proxy => (
            "200".into(),
            ResponseDoc {
                description: "The upstream's response, passed through (not documented in the \
                              route table)"
                    .into(),
                schema: Some(json!({})),
                ..ResponseDoc::default()
            },
        ),
    }
}

/// The `responses` of `route`'s operations; titled schemas are moved into `schemas`.
fn responses(
    cfg: &DocsSource<'_>,
    route: &RouteConfig,
    has_params: bool,
    schemas: &mut Map<String, Value>,
) -> Value {
    let mut upstream = route.openapi.responses.clone();
    if !upstream
        .keys()
        .any(|s| s.starts_with('1') || s.starts_with('2'))
    {
        let (status, doc) = default_success(route);
        upstream.insert(status, doc);
    }
    let gateway = gateway_statuses(cfg, route, has_params);
    let mut statuses: Vec<String> = upstream.keys().cloned().collect();
    statuses.extend(gateway.iter().map(|g| g.status.to_string()));
    statuses.sort();
    statuses.dedup();
    let limited = !route.rate_limit.is_empty();
    let mut out = Map::new();
    for status in statuses {
        let up = upstream.get(&status);
        let gw = gateway.iter().find(|g| g.status.to_string() == status);
        let mut response = Map::new();
        let description = match (up, gw) {
            (Some(u), Some(g)) => format!(
                "The service's: {}; or the gateway's (Error): {}",
                non_empty(&u.description, "The upstream's answer"),
                g.description
            ),
            (Some(u), None) => non_empty(&u.description, "The upstream's answer").to_string(),
            (None, Some(g)) => g.description.clone(),
            (None, None) => continue,
        };
        response.insert("description".into(), json!(description));

        let up_schema = up.and_then(|u| {
            let schema = match &u.schema {
                Some(schema) => schema.clone(),
                None if !status.starts_with(['1', '2', '3']) => schema_ref("ServiceError"),
                None => return None,
            };
            // Validation rejects a title naming two schemas; should one slip through, the
            // schema stays inline rather than replacing another route's.
            Some(hoist_titled(&schema, schemas).unwrap_or(schema))
        });
        let schema = match (&up_schema, gw) {
            (Some(u), Some(_)) => Some(json!({"oneOf": [schema_ref("Error"), u]})),
            (Some(u), None) => Some(u.clone()),
            (None, Some(_)) => Some(schema_ref("Error")),
            (None, None) => None,
        };
        if let Some(schema) = schema {
            let mut media = json!({"schema": schema});
            let up_example = up.and_then(|u| u.example.clone());
            match (up_example, gw) {
                (Some(u), Some(g)) => {
                    media["examples"] = json!({
                        "service": {"summary": "The service's own answer", "value": u},
                        "gateway": {"summary": "The gateway's", "value": g.example},
                    });
                }
                (Some(u), None) => media["example"] = u,
                (None, Some(g)) => media["example"] = g.example.clone(),
                (None, None) => {}
            }
            response.insert("content".into(), json!({"application/json": media}));
        }

        let code: u16 = status.parse().unwrap_or(0);
        let mut headers = Map::new();
        headers.insert("X-Request-Id".into(), header_ref("X-Request-Id"));
        // The limiter's decision is stamped on every response after it: the upstream's
        // answers and the errors of the later phases, not the refusals before it.
        if limited && (up.is_some() || matches!(code, 400 | 408 | 413 | 429 | 503 | 504)) {
            headers.insert("RateLimit".into(), header_ref("RateLimit"));
            headers.insert("RateLimit-Policy".into(), header_ref("RateLimit-Policy"));
        }
        if gw.is_some_and(|g| g.retry_after) || (up.is_some() && code == 503) {
            let name = if up.is_some() {
                "Retry-After-Passthrough"
            } else {
                "Retry-After"
            };
            headers.insert("Retry-After".into(), header_ref(name));
        }
        if up.is_some() && route.kind == RouteKind::Proxy {
            headers.insert(
                "X-Upstream-Attempts".into(),
                header_ref("X-Upstream-Attempts"),
            );
            if route.cache.is_some() {
                headers.insert("X-Cache".into(), header_ref("X-Cache"));
                headers.insert("Age".into(), header_ref("Age"));
            }
        }
        if gw.is_some_and(|g| g.www_authenticate) {
            headers.insert("WWW-Authenticate".into(), header_ref("WWW-Authenticate"));
        }
        headers.insert("Cache-Control".into(), header_ref("Cache-Control"));
        if up.is_some() && route.kind == RouteKind::Proxy {
            if route.compression.unwrap_or(cfg.compression) {
                headers.insert("Content-Encoding".into(), header_ref("Content-Encoding"));
                headers.insert("Vary".into(), header_ref("Vary"));
            }
            if route.cache.is_some() && code == 200 {
                headers.insert("ETag".into(), header_ref("ETag"));
            }
        }
        response.insert("headers".into(), Value::Object(headers));
        out.insert(status, Value::Object(response));
    }
    if route.cache.is_some() && route.kind == RouteKind::Proxy {
        out.insert(
            "304".into(),
            json!({
                "description": "Not Modified: the request's If-None-Match (or If-Modified-Since) matches the cached answer; no body, and no upstream call",
                "headers": {
                    "X-Request-Id": header_ref("X-Request-Id"),
                    "ETag": header_ref("ETag"),
                    "Cache-Control": header_ref("Cache-Control"),
                    "X-Cache": header_ref("X-Cache"),
                    "Age": header_ref("Age"),
                }
            }),
        );
    }
    Value::Object(out)
}

fn non_empty<'a>(text: &'a str, otherwise: &'a str) -> &'a str {
    if text.is_empty() {
        otherwise
    } else {
        text
    }
}

fn request_body(name: &str) -> Value {
    let (schema, example) = match name {
        "register" => (
            json!({
                "type": "object",
                "required": ["email", "password", "name"],
                "properties": {
                    "email": {"type": "string", "format": "email"},
                    "password": {"type": "string", "minLength": 8},
                    "name": {"type": "string", "minLength": 1}
                }
            }),
            json!({"email": "ada@example.com", "password": "correct-horse", "name": "Ada"}),
        ),
        "login" => (
            json!({
                "type": "object",
                "required": ["email", "password"],
                "properties": {
                    "email": {"type": "string", "format": "email"},
                    "password": {"type": "string"}
                }
            }),
            json!({"email": "ada@example.com", "password": "correct-horse"}),
        ),
        _ => (json!({"type": "object"}), Value::Null),
    };
    let mut media = json!({"schema": schema});
    if !example.is_null() {
        media["example"] = example;
    }
    json!({"required": true, "content": {"application/json": media}})
}

/// The components every document has: the gateway's error, the services' error, the
/// gateway's `/api/user/me` body.
fn builtin_schemas() -> Map<String, Value> {
    let schemas = json!({
        "Error": {
            "description": "An error the gateway itself produced",
            "type": "object",
            "required": ["error", "reason", "request_id"],
            "properties": {
                "error": {"type": "string", "description": "For people"},
                "reason": schema_ref("ErrorReason"),
                "request_id": {"type": "string", "description": "Also in X-Request-Id and the gateway's log"},
                "upstream": {"type": "string", "description": "The upstream involved, if any"}
            },
            "additionalProperties": false
        },
        "ErrorReason": {
            "description": "The machine-readable condition of a gateway error",
            "type": "string",
            "enum": REASONS
        },
        "ServiceError": {
            "description": "An error a DeltaStream service answered, passed through untouched",
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "string"}},
            "additionalProperties": false
        },
        "User": {
            "description": "The caller, from the verified token",
            "type": "object",
            "required": ["user_id", "email"],
            "properties": {"user_id": {"type": "string"}, "email": {"type": "string"}},
            "additionalProperties": false
        }
    });
    match schemas {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

fn headers() -> Value {
    json!({
        "X-Request-Id": {
            "description": "The request's id (the client's, when it sent a sane one): in the gateway's log and error bodies",
            "schema": {"type": "string"}
        },
        "RateLimit": {
            "description": "Remaining quota per policy, e.g. \"default\";r=42;t=17 (draft-ietf-httpapi-ratelimit-headers)",
            "schema": {"type": "string"}
        },
        "RateLimit-Policy": {
            "description": "The policies, e.g. \"default\";q=100;w=60 (quota per window in seconds)",
            "schema": {"type": "string"}
        },
        "Retry-After": {
            "description": "Seconds to wait before trying again",
            "schema": {"type": "integer", "minimum": 1}
        },
        "Retry-After-Passthrough": {
            "description": "Seconds to wait; the gateway sends seconds, an upstream's own Retry-After is passed through as it sent it (seconds or an HTTP date)",
            "schema": {"type": "string"}
        },
        "X-Upstream-Attempts": {
            "description": "Attempts the gateway made to the upstream (retries and hedges included)",
            "schema": {"type": "integer", "minimum": 1}
        },
        "X-Cache": {
            "description": "How the shared cache answered: HIT (fresh entry), MISS (fetched), STALE (an expired entry, because the upstream failed), BYPASS (the request may not use the cache)",
            "schema": {"type": "string", "enum": ["HIT", "MISS", "STALE", "BYPASS"]}
        },
        "Age": {
            "description": "Seconds since the cached answer was stored (on HIT and STALE)",
            "schema": {"type": "integer", "minimum": 0}
        },
        "WWW-Authenticate": {
            "description": "Bearer",
            "schema": {"type": "string"}
        },
        "Cache-Control": {
            "description": "no-store on the gateway's own answers (errors, 429, 503); on cached routes max-age=<seconds> (counted from Age) unless the upstream sent its own directives; otherwise the upstream's, or the route's default (no-store for live data)",
            "schema": {"type": "string"}
        },
        "ETag": {
            "description": "Strong validator of the cached answer (the upstream's, or computed when stored); weak (W/) when the body was compressed. Send it back in If-None-Match to get a 304",
            "schema": {"type": "string"}
        },
        "Content-Encoding": {
            "description": "gzip, br or zstd when the body was compressed for the request's Accept-Encoding",
            "schema": {"type": "string", "enum": ["gzip", "br", "zstd"]}
        },
        "Vary": {
            "description": "Includes Accept-Encoding on answers that may be compressed",
            "schema": {"type": "string"}
        }
    })
}

/// Renders the document for `cfg`'s routes.
pub fn openapi(cfg: &Config) -> Value {
    render(&DocsSource::of(cfg))
}

fn render(cfg: &DocsSource<'_>) -> Value {
    let mut schemas = builtin_schemas();
    let mut paths = Map::new();
    for route in cfg.routes {
        let Ok(template) = parse_template(&route.path) else {
            continue;
        };
        let names = template.param_names();
        let mut parameters: Vec<Value> = template
            .segments
            .iter()
            .filter_map(|s| match s {
                Segment::Param(i) => {
                    let mut p = json!({
                        "name": names[*i],
                        "in": "path",
                        "required": true,
                        "schema": {"type": "string"},
                        "description": format!("The {}", names[*i]),
                    });
                    // A value that exists, so clients (and API fuzzers) can reach the 200s.
                    if names[*i] == "product" {
                        p["example"] = json!("NIFTY");
                    }
                    Some(p)
                }
                Segment::Literal(_) => None,
            })
            .collect();
        let has_params = !parameters.is_empty();
        for p in &route.openapi.params {
            if p.location == ParamLocation::Path {
                continue;
            }
            let mut schema = json!({"type": p.schema_type});
            if let Some(format) = &p.format {
                schema["format"] = json!(format);
            }
            parameters.push(json!({
                "name": p.name,
                "in": "query",
                "required": p.required,
                "schema": schema,
                "description": p.description,
            }));
        }
        let responses = responses(cfg, route, has_params, &mut schemas);
        let tags = if route.openapi.tags.is_empty() {
            vec!["Gateway".to_string()]
        } else {
            route.openapi.tags.clone()
        };
        let mut ops = Map::new();
        for m in &route.methods {
            let mut op = json!({
                "summary": route.openapi.summary,
                "tags": tags,
                "operationId": route.operation_id(m),
                "parameters": parameters,
                "responses": responses,
            });
            if !route.openapi.description.is_empty() {
                op["description"] = json!(route.openapi.description);
            }
            if route.auth || route.kind == RouteKind::UserMe {
                op["security"] = json!([{"bearerAuth": []}]);
            }
            if let Some(body) = &route.openapi.request_body {
                op["requestBody"] = request_body(body);
            }
            ops.insert(m.to_ascii_lowercase(), op);
        }
        paths.insert(route.path.clone(), Value::Object(ops));
    }
    paths.insert(
        "/health".into(),
        json!({"get": {
            "summary": "Liveness of the gateway",
            "tags": ["Gateway"],
            "operationId": "get_health",
            "responses": {"200": {
                "description": "The gateway is up",
                "headers": {"X-Request-Id": header_ref("X-Request-Id")},
                "content": {"application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["status", "service"],
                        "properties": {"status": {"type": "string"}, "service": {"type": "string"}},
                        "additionalProperties": false
                    },
                    "example": {"status": "healthy", "service": cfg.service_name}
                }}
            }}
        }}),
    );
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "DeltaStream API Gateway",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Public API of the DeltaStream option-market-data platform. Every path is \
                also served under /api/v1, and every GET also answers HEAD. Each operation lists \
                every status it can answer: the service's own errors (ServiceError) and the \
                gateway's (Error, with a machine-readable reason). Outside any operation: a method \
                a path does not serve gets 405 (Error, method_not_allowed, with Allow), an unknown \
                path 404 (not_found), a request head over limits.max_header_bytes 431 without a body."
        },
        "servers": [{
            "url": "/",
            "description": "This gateway: relative to where this document was fetched from"
        }],
        "tags": [
            {"name": "Authentication"}, {"name": "Data"}, {"name": "Analytics"},
            {"name": "User"}, {"name": "Real-time"}, {"name": "Gateway"}
        ],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": schemas,
            "headers": headers(),
        }
    })
}

const UI_PAGE: &str = r##"<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>DeltaStream API Gateway - docs</title>
  <link rel="stylesheet" href="/api/docs/ui/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/api/docs/ui/swagger-ui-bundle.js"></script>
  <script>window.ui = SwaggerUIBundle({url: "/api/docs", dom_id: "#swagger-ui"});</script>
</body>
</html>
"##;

fn asset(content_type: &'static str, body: &'static [u8]) -> Response {
    let mut resp = Response::new(Body::from(body));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("max-age=86400"));
    resp
}

pub fn ui_page() -> Response {
    asset("text/html; charset=utf-8", UI_PAGE.as_bytes())
}

pub fn ui_css() -> Response {
    asset(
        "text/css; charset=utf-8",
        include_bytes!("../../assets/swagger-ui/swagger-ui.css"),
    )
}

pub fn ui_js() -> Response {
    asset(
        "application/javascript; charset=utf-8",
        include_bytes!("../../assets/swagger-ui/swagger-ui-bundle.js"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::schema::BUILTIN_SCHEMAS;
    use crate::error::{ErrorReply, GatewayError};
    use axum::response::IntoResponse;

    #[test]
    fn every_route_is_documented() {
        let cfg = Config::embedded();
        let doc = openapi(&cfg);
        for r in &cfg.routes {
            for m in &r.methods {
                assert!(
                    doc["paths"][&r.path][m.to_ascii_lowercase()].is_object(),
                    "{m} {} missing",
                    r.path
                );
            }
        }
        assert_eq!(
            doc["paths"]["/api/user/me"]["get"]["security"][0]["bearerAuth"],
            json!([])
        );
        assert_eq!(
            doc["paths"]["/api/data/underlying/{product}"]["get"]["operationId"],
            "get_data_underlying_product"
        );
    }

    /// The contract a generated client relies on: a typed body for every success of the
    /// embedded table, and no `default` that would swallow undocumented statuses.
    #[test]
    fn every_embedded_route_has_a_typed_success_and_no_default_response() {
        let cfg = Config::embedded();
        let doc = openapi(&cfg);
        for r in &cfg.routes {
            for m in &r.methods {
                let op = &doc["paths"][&r.path][m.to_ascii_lowercase()];
                let responses = op["responses"].as_object().expect("responses");
                assert!(
                    !responses.contains_key("default"),
                    "{m} {} has a default response",
                    r.path
                );
                let successes: Vec<_> = responses
                    .iter()
                    .filter(|(s, _)| s.starts_with('2'))
                    .collect();
                if r.kind == RouteKind::Websocket {
                    assert!(responses.contains_key("101"), "{}", r.path);
                    continue;
                }
                assert!(!successes.is_empty(), "{m} {} has no 2xx", r.path);
                for (status, resp) in successes {
                    let schema = &resp["content"]["application/json"]["schema"];
                    assert!(
                        schema.get("$ref").is_some() || schema.get("type").is_some(),
                        "{m} {} {status}: untyped schema {schema}",
                        r.path
                    );
                    assert!(
                        resp["content"]["application/json"]["example"].is_object(),
                        "{m} {} {status}: no example",
                        r.path
                    );
                }
                for (status, resp) in responses {
                    if let Some(schema) = resp["content"]["application/json"]["schema"].as_object()
                    {
                        assert!(!schema.is_empty(), "{m} {} {status}: schema {{}}", r.path);
                    }
                }
            }
        }
    }

    #[test]
    fn statuses_both_sides_answer_are_one_of_the_two_bodies() {
        let doc = openapi(&Config::embedded());
        let login = &doc["paths"]["/api/auth/login"]["post"]["responses"];
        // The service's 401 only: login needs no token.
        assert_eq!(
            login["401"]["content"]["application/json"]["schema"],
            schema_ref("ServiceError")
        );
        assert_eq!(
            login["400"]["content"]["application/json"]["schema"],
            json!({"oneOf": [schema_ref("Error"), schema_ref("ServiceError")]})
        );
        let me = &doc["paths"]["/api/user/me"]["get"]["responses"];
        assert_eq!(
            me["401"]["content"]["application/json"]["schema"],
            schema_ref("Error")
        );
        assert!(me["401"]["headers"]["WWW-Authenticate"].is_object());
        let chain = &doc["paths"]["/api/data/chain/{product}"]["get"]["responses"];
        assert_eq!(
            chain["404"]["content"]["application/json"]["schema"]["oneOf"][1],
            schema_ref("ServiceError")
        );
        assert_eq!(
            chain["200"]["content"]["application/json"]["schema"],
            schema_ref("OptionChain")
        );
        for header in [
            "X-Cache",
            "X-Upstream-Attempts",
            "RateLimit",
            "RateLimit-Policy",
            "X-Request-Id",
        ] {
            assert!(chain["200"]["headers"][header].is_object(), "{header}");
        }
        for header in ["Retry-After", "RateLimit", "RateLimit-Policy"] {
            assert!(chain["429"]["headers"][header].is_object(), "{header}");
        }
        assert!(chain["429"]["headers"]["X-Cache"].is_null());
        assert!(chain["503"]["headers"]["Retry-After"].is_object());
        // Nested titled objects are named components, shared where the title is shared.
        let schemas = &doc["components"]["schemas"];
        for name in [
            "Session",
            "SessionUser",
            "Tick",
            "OptionQuote",
            "ChainRow",
            "Product",
            "PutCallRatio",
            "AtmVolatility",
        ] {
            assert!(schemas[name].is_object(), "{name} missing");
        }
        assert_eq!(
            schemas["ChainRow"]["properties"]["put"],
            schema_ref("OptionQuote")
        );
        assert_eq!(doc["servers"][0]["url"], "/");
    }

    #[test]
    fn a_504_is_documented_only_when_timeouts_answer_504() {
        let mut cfg = Config::embedded();
        let doc = openapi(&cfg);
        assert!(doc["paths"]["/api/data/products"]["get"]["responses"]["504"].is_null());
        cfg.errors.timeout_status = 504;
        let doc = openapi(&cfg);
        let r = &doc["paths"]["/api/data/products"]["get"]["responses"];
        assert_eq!(
            r["504"]["content"]["application/json"]["example"]["reason"],
            "upstream_timeout"
        );
        assert!(!r["503"]["description"]
            .as_str()
            .unwrap_or("")
            .contains("upstream_timeout"));
    }

    /// Every error variant, by an exhaustive match: a new variant does not compile here
    /// until its reason is considered for the document's enum.
    fn one_of_each() -> Vec<GatewayError> {
        let up = || std::sync::Arc::<str>::from("storage");
        let all = vec![
            GatewayError::UpstreamUnavailable {
                upstream: up(),
                message: up(),
            },
            GatewayError::UpstreamTimeout {
                upstream: up(),
                message: up(),
                status: http::StatusCode::SERVICE_UNAVAILABLE,
            },
            GatewayError::CircuitOpen {
                upstream: up(),
                message: up(),
                retry_after: std::time::Duration::from_secs(1),
            },
            GatewayError::RateLimited {
                headers: http::HeaderMap::new(),
            },
            GatewayError::RateLimiterUnavailable {
                headers: http::HeaderMap::new(),
            },
            GatewayError::MissingToken,
            GatewayError::InvalidToken,
            GatewayError::AuthUnavailable,
            GatewayError::NotFound,
            GatewayError::MethodNotAllowed {
                allow: HeaderValue::from_static("GET"),
            },
            GatewayError::PayloadTooLarge { limit: 1 },
            GatewayError::BadRequest("x".into()),
            GatewayError::ExpectationFailed,
            GatewayError::RequestTimeout,
            GatewayError::UpgradeRequired,
            GatewayError::OriginNotAllowed,
            GatewayError::TooManyConnections,
            GatewayError::TooManyInFlight {
                upstream: "storage".into(),
            },
            GatewayError::GatewaySaturated {
                retry_after: std::time::Duration::from_secs(1),
            },
            GatewayError::Overloaded {
                upstream: up(),
                cause: "queue_timeout",
                retry_after: std::time::Duration::from_secs(1),
            },
            GatewayError::Internal,
        ];
        for e in &all {
            match e {
                GatewayError::UpstreamUnavailable { .. }
                | GatewayError::UpstreamTimeout { .. }
                | GatewayError::CircuitOpen { .. }
                | GatewayError::RateLimited { .. }
                | GatewayError::RateLimiterUnavailable { .. }
                | GatewayError::MissingToken
                | GatewayError::InvalidToken
                | GatewayError::AuthUnavailable
                | GatewayError::NotFound
                | GatewayError::MethodNotAllowed { .. }
                | GatewayError::PayloadTooLarge { .. }
                | GatewayError::BadRequest(_)
                | GatewayError::ExpectationFailed
                | GatewayError::RequestTimeout
                | GatewayError::UpgradeRequired
                | GatewayError::OriginNotAllowed
                | GatewayError::TooManyConnections
                | GatewayError::TooManyInFlight { .. }
                | GatewayError::GatewaySaturated { .. }
                | GatewayError::Overloaded { .. }
                | GatewayError::Internal => {}
            }
        }
        all
    }

    #[tokio::test]
    async fn every_reason_the_gateway_answers_is_in_the_documented_enum() {
        let doc = openapi(&Config::embedded());
        let documented = &doc["components"]["schemas"]["ErrorReason"]["enum"];
        for error in one_of_each() {
            let resp = ErrorReply {
                error: &error,
                request_id: "r",
            }
            .into_response();
            let body = axum::body::to_bytes(resp.into_body(), 4096)
                .await
                .expect("body");
            let body: Value = serde_json::from_slice(&body).expect("json");
            assert!(
                documented
                    .as_array()
                    .is_some_and(|r| r.contains(&body["reason"])),
                "reason {} of {error:?} is not in the ErrorReason enum",
                body["reason"]
            );
        }
    }

    #[test]
    fn the_builtin_component_names_are_the_ones_validation_reserves() {
        let mut names: Vec<String> = builtin_schemas().keys().cloned().collect();
        names.sort();
        assert_eq!(names, BUILTIN_SCHEMAS);
    }
}
