//! Every error the gateway itself produces, and the ONE place that turns each into a response.
//!
//! The match in [`GatewayError::status_reason_message`] has no `_ =>` arm on purpose: a new
//! error variant does not compile until someone decides its status, reason and message.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use http::header::{ALLOW, CONTENT_TYPE, RETRY_AFTER};
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
    /// The client did not send its whole body within the route's deadline (slow-body
    /// attacks would otherwise hold a connection and a handler forever).
    RequestTimeout,
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

impl GatewayError {
    /// Status, machine reason and human message, decided in one exhaustive match.
    fn status_reason_message(
        &self,
        timeout_status: StatusCode,
    ) -> (StatusCode, &'static str, Cow<'_, str>) {
        use GatewayError as E;
        match self {
            E::UpstreamUnavailable { message, .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_unavailable",
                Cow::Borrowed(&**message),
            ),
            E::UpstreamTimeout { message, .. } => (
                timeout_status,
                "upstream_timeout",
                Cow::Borrowed(&**message),
            ),
            E::CircuitOpen { message, .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "circuit_open",
                Cow::Borrowed(&**message),
            ),
            E::RateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                Cow::Borrowed("Rate limit exceeded"),
            ),
            E::RateLimiterUnavailable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "rate_limiter_unavailable",
                Cow::Borrowed("Rate limiter unavailable"),
            ),
            E::MissingToken => (
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                Cow::Borrowed("Missing Authorization header"),
            ),
            E::InvalidToken => (
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                Cow::Borrowed("Invalid token"),
            ),
            E::AuthUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "auth_unavailable",
                Cow::Borrowed("Auth service unavailable"),
            ),
            E::NotFound => (
                StatusCode::NOT_FOUND,
                "not_found",
                Cow::Borrowed("Not found"),
            ),
            E::MethodNotAllowed { .. } => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                Cow::Borrowed("Method not allowed"),
            ),
            E::PayloadTooLarge { limit } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                Cow::Owned(format!("Request body larger than {limit} bytes")),
            ),
            E::BadRequest(msg) => (
                StatusCode::BAD_REQUEST,
                "bad_request",
                Cow::Borrowed(&**msg),
            ),
            E::RequestTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                Cow::Borrowed("Request body not received in time"),
            ),
            E::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                Cow::Borrowed("Internal server error"),
            ),
        }
    }

    pub fn upstream(&self) -> Option<&str> {
        match self {
            GatewayError::UpstreamUnavailable { upstream, .. }
            | GatewayError::UpstreamTimeout { upstream, .. }
            | GatewayError::CircuitOpen { upstream, .. } => Some(upstream),
            _ => None,
        }
    }

    /// The JSON error response (`{"error","reason","request_id"[,"upstream"]}`) with the
    /// headers the condition calls for.
    pub fn to_response(&self, request_id: &str, timeout_status: StatusCode) -> Response {
        let (status, reason, message) = self.status_reason_message(timeout_status);
        let body = ErrorBody {
            error: &message,
            reason,
            request_id,
            upstream: self.upstream(),
        };
        let json = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
        let mut resp = Response::new(Body::from(json));
        *resp.status_mut() = status;
        resp.extensions_mut().insert(ErrorReason(reason));
        let headers = resp.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        match self {
            GatewayError::CircuitOpen { retry_after, .. } => {
                headers.insert(RETRY_AFTER, retry_after_value(*retry_after));
            }
            GatewayError::RateLimited { headers: extra }
            | GatewayError::RateLimiterUnavailable { headers: extra } => {
                for (k, v) in extra {
                    headers.insert(k.clone(), v.clone());
                }
            }
            GatewayError::MethodNotAllowed { allow } => {
                headers.insert(ALLOW, allow.clone());
            }
            GatewayError::MissingToken | GatewayError::InvalidToken => {
                headers.insert(
                    http::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer"),
                );
            }
            _ => {}
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
        let (status, reason, message) = self.status_reason_message(StatusCode::SERVICE_UNAVAILABLE);
        write!(f, "{status} {reason}: {message}")
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
