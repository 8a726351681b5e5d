//! Every error the gateway itself produces, and the ONE place that turns each into a response.
//!
//! The match in [`GatewayError::render`] has no `_ =>` arm on purpose: a new error variant
//! does not compile until someone decides its status, reason, message, upstream and headers.
//! [`ErrorReply`] (the error plus the request id its body names) is the one `IntoResponse`.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, StatusCode};
use serde::Serialize;

#[derive(Clone, Debug)]
pub enum GatewayError {
    /// Refused, reset or unreachable (after any retries).
    UpstreamUnavailable {
        upstream: Arc<str>,
        message: Arc<str>,
    },
    /// An attempt or the overall deadline ran out.
    UpstreamTimeout {
        upstream: Arc<str>,
        message: Arc<str>,
        /// 503 (the original service's answer) or 504, as `errors.timeout_status` says;
        /// decided where the error is made, so rendering needs no settings.
        status: StatusCode,
    },
    /// The upstream's breaker is open: no call was made.
    CircuitOpen {
        upstream: Arc<str>,
        message: Arc<str>,
        retry_after: Duration,
    },
    /// Over a rate-limit policy; `headers` carry RateLimit / Retry-After.
    RateLimited {
        headers: HeaderMap,
    },
    /// Redis is down and `on_redis_error = "deny"`; `headers` carry Retry-After.
    RateLimiterUnavailable {
        headers: HeaderMap,
    },
    MissingToken,
    InvalidToken,
    /// The auth service could not answer a verification: never a 401, or clients would
    /// log their users out during an auth outage.
    AuthUnavailable,
    NotFound,
    MethodNotAllowed {
        allow: HeaderValue,
    },
    PayloadTooLarge {
        limit: u64,
    },
    BadRequest(Cow<'static, str>),
    /// An `Expect` the gateway cannot meet (anything but `100-continue`, RFC 9110 10.1.1).
    ExpectationFailed,
    /// The client did not send its whole body within the route's deadline (slow-body
    /// attacks would otherwise hold a connection and a handler forever).
    RequestTimeout,
    /// A WebSocket route asked for without a WebSocket upgrade (or another version than 13).
    UpgradeRequired,
    /// A WebSocket handshake from an `Origin` that is not one of the CORS origins.
    OriginNotAllowed,
    /// Over the `[websocket]` connection limits (in total or for this client).
    TooManyConnections,
    /// This client already holds its share of the upstream's slots
    /// (`max_client_share`): a limit on the client, like a rate limit, so 4xx (429), not
    /// the upstream's 503; never counted by the breaker, never retried.
    TooManyInFlight {
        upstream: Arc<str>,
    },
    /// The gateway process itself is saturated (its runtime late, or too many requests in
    /// flight for its memory): refused before anything is read or called, so a retry after
    /// `retry_after` (or at another replica) costs nothing (`server::saturation`).
    GatewaySaturated {
        retry_after: Duration,
    },
    /// The upstream is at its learnt concurrency limit and the request waited as long as its
    /// priority allows (`cause`: `queue_timeout`, `queue_full`): overload, not failure, so
    /// never counted by the breaker or an ejection, never retried; the client may come back
    /// after `retry_after`.
    Overloaded {
        upstream: Arc<str>,
        cause: &'static str,
        retry_after: Duration,
    },
    /// A gateway bug; details are logged where it happened, never sent.
    Internal,
}

/// The `reason` of a gateway-made error response, kept on the response for the access log
/// (which never reads bodies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorReason(pub &'static str);

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    reason: &'a str,
    request_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<&'a str>,
}

/// The headers an error response carries besides `Content-Type`.
enum ExtraHeaders<'a> {
    None,
    RetryAfter(Duration),
    /// RateLimit / RateLimit-Policy / Retry-After, as the limiter computed them.
    Copied(&'a HeaderMap),
    Allow(&'a HeaderValue),
    WwwAuthenticate,
    /// `Sec-WebSocket-Version: 13`, the version the gateway speaks (RFC 6455 4.4).
    WebSocketVersion,
}

/// Everything an error response is made of.
struct Rendered<'a> {
    status: StatusCode,
    reason: &'static str,
    message: Cow<'a, str>,
    upstream: Option<&'a str>,
    headers: ExtraHeaders<'a>,
}

impl GatewayError {
    /// Status, machine reason, human message, upstream and headers, decided in one
    /// exhaustive match.
    fn render(&self) -> Rendered<'_> {
        use ExtraHeaders as H;
        use GatewayError as E;
        let (status, reason, message, upstream, headers) = match self {
            E::UpstreamUnavailable { upstream, message } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_unavailable",
                Cow::Borrowed(&**message),
                Some(&**upstream),
                H::None,
            ),
            E::UpstreamTimeout {
                upstream,
                message,
                status,
            } => (
                *status,
                "upstream_timeout",
                Cow::Borrowed(&**message),
                Some(&**upstream),
                H::None,
            ),
            E::CircuitOpen {
                upstream,
                message,
                retry_after,
            } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "circuit_open",
                Cow::Borrowed(&**message),
                Some(&**upstream),
                H::RetryAfter(*retry_after),
            ),
            E::RateLimited { headers } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                Cow::Borrowed("Rate limit exceeded"),
                None,
                H::Copied(headers),
            ),
            E::RateLimiterUnavailable { headers } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "rate_limiter_unavailable",
                Cow::Borrowed("Rate limiter unavailable"),
                None,
                H::Copied(headers),
            ),
            E::MissingToken => (
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                Cow::Borrowed("Missing Authorization header"),
                None,
                H::WwwAuthenticate,
            ),
            E::InvalidToken => (
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                Cow::Borrowed("Invalid token"),
                None,
                H::WwwAuthenticate,
            ),
            E::AuthUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "auth_unavailable",
                Cow::Borrowed("Auth service unavailable"),
                None,
                H::None,
            ),
            E::NotFound => (
                StatusCode::NOT_FOUND,
                "not_found",
                Cow::Borrowed("Not found"),
                None,
                H::None,
            ),
            E::MethodNotAllowed { allow } => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                Cow::Borrowed("Method not allowed"),
                None,
                H::Allow(allow),
            ),
            E::PayloadTooLarge { limit } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                Cow::Owned(format!("Request body larger than {limit} bytes")),
                None,
                H::None,
            ),
            E::BadRequest(msg) => (
                StatusCode::BAD_REQUEST,
                "bad_request",
                Cow::Borrowed(&**msg),
                None,
                H::None,
            ),
            E::ExpectationFailed => (
                StatusCode::EXPECTATION_FAILED,
                "expectation_failed",
                Cow::Borrowed("Unsupported Expect header (only 100-continue is supported)"),
                None,
                H::None,
            ),
            E::RequestTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                Cow::Borrowed("Request body not received in time"),
                None,
                H::None,
            ),
            E::UpgradeRequired => (
                StatusCode::UPGRADE_REQUIRED,
                "upgrade_required",
                Cow::Borrowed("This route is a WebSocket: upgrade with Sec-WebSocket-Version 13"),
                None,
                H::WebSocketVersion,
            ),
            E::OriginNotAllowed => (
                StatusCode::FORBIDDEN,
                "origin_not_allowed",
                Cow::Borrowed("Origin not allowed"),
                None,
                H::None,
            ),
            E::TooManyConnections => (
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_connections",
                Cow::Borrowed("Too many WebSocket connections"),
                None,
                H::RetryAfter(Duration::from_secs(1)),
            ),
            E::TooManyInFlight { upstream } => (
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_in_flight",
                Cow::Borrowed("Too many requests in flight from this client"),
                Some(&**upstream),
                H::RetryAfter(Duration::from_secs(1)),
            ),
            E::GatewaySaturated { retry_after } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                Cow::Borrowed("Gateway overloaded"),
                None,
                H::RetryAfter(*retry_after),
            ),
            E::Overloaded {
                upstream,
                retry_after,
                cause: _,
            } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                Cow::Borrowed("Service overloaded, retry later"),
                Some(&**upstream),
                H::RetryAfter(*retry_after),
            ),
            E::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                Cow::Borrowed("Internal server error"),
                None,
                H::None,
            ),
        };
        Rendered {
            status,
            reason,
            message,
            upstream,
            headers,
        }
    }

    /// The upstream the error is about, if any.
    pub fn upstream(&self) -> Option<&str> {
        self.render().upstream
    }

    /// The status the error is answered with.
    pub fn status(&self) -> StatusCode {
        self.render().status
    }
}

/// An error as the client receives it: `GatewayError` plus the request id its body names.
pub struct ErrorReply<'a> {
    pub error: &'a GatewayError,
    pub request_id: &'a str,
}

impl IntoResponse for ErrorReply<'_> {
    /// The JSON error response (`{"error","reason","request_id"[,"upstream"]}`) with the
    /// headers the condition calls for.
    fn into_response(self) -> Response {
        let r = self.error.render();
        let body = ErrorBody {
            error: &r.message,
            reason: r.reason,
            request_id: self.request_id,
            upstream: r.upstream,
        };
        let json = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
        let mut resp = Response::new(Body::from(json));
        *resp.status_mut() = r.status;
        resp.extensions_mut().insert(ErrorReason(r.reason));
        let headers = resp.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        // A CDN or corporate proxy in front must never keep (heuristically) a 503 or a 429.
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match r.headers {
            ExtraHeaders::None => {}
            ExtraHeaders::RetryAfter(wait) => {
                headers.insert(RETRY_AFTER, retry_after_value(wait));
            }
            ExtraHeaders::Copied(extra) => {
                for (k, v) in extra {
                    headers.insert(k.clone(), v.clone());
                }
            }
            ExtraHeaders::Allow(allow) => {
                headers.insert(ALLOW, allow.clone());
            }
            ExtraHeaders::WebSocketVersion => {
                headers.insert(
                    http::HeaderName::from_static("sec-websocket-version"),
                    HeaderValue::from_static("13"),
                );
            }
            ExtraHeaders::WwwAuthenticate => {
                headers.insert(
                    http::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer"),
                );
            }
        }
        resp
    }
}

/// Whole seconds, rounded up and at least 1, so a client never comes back too early.
pub fn retry_after_value(d: Duration) -> HeaderValue {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    HeaderValue::from(secs.max(1))
}

impl std::fmt::Display for GatewayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self.render();
        write!(f, "{} {}: {}", r.status, r.reason, r.message)
    }
}

impl std::error::Error for GatewayError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_value(Duration::from_millis(1)), "1");
        assert_eq!(retry_after_value(Duration::from_millis(4001)), "5");
        assert_eq!(retry_after_value(Duration::from_secs(3)), "3");
        assert_eq!(retry_after_value(Duration::ZERO), "1");
    }
}
