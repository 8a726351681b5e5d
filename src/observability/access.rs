//! The outermost middleware: request id, panic -> 500, one JSON access-log line and the
//! request metrics. Doing all four in one place costs one clock read and one pass.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use http::{HeaderName, HeaderValue};

use super::metrics::{method_label, record_error, record_request, status_class};
use super::otlp::{Exporter, Kind, SpanRecord, Value};
use super::trace::TraceContext;
use crate::error::{ErrorReply, GatewayError};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What the handler learned that the access log needs: returned beside the response.
#[derive(Clone, Debug, Default)]
pub struct RouteInfo {
    pub route: Option<Arc<str>>,
    pub upstream: Option<Arc<str>>,
}

/// Accepts a client id only if short and made of safe characters: it is echoed in
/// headers and logs, so anything else is replaced rather than trusted.
fn client_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'))
}

pub(crate) fn new_request_id() -> HeaderValue {
    let n: u128 = rand::random();
    let mut buf = [0u8; 32];
    hex::encode_to_slice(n.to_be_bytes(), &mut buf).expect("32 hex chars for 16 bytes");
    // The bytes live inside their owner: one allocation, and the clones (the log line, the
    // upstream request, `X-Request-Id`) only count references. From a copied slice it was a
    // copy, then a second allocation when the first clone made it shared.
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(buf))
        .expect("hex is a valid header value")
}

/// Request id, panic guard, metrics and the access line around `inner` (the rest of the stack),
/// which gets the request, its id and its trace context and answers with the response and
/// what it routed to. Passed as arguments rather than request/response extensions: the first
/// insert into an extension map allocates a hash map, and three of them cost ~1,500
/// instructions per request. The trace travels as a value from here to the request sent
/// upstream (which gets its `traceparent` from it) and to the pipeline's attempt spans: the
/// client's header is parsed once, here.
pub async fn access<F, Fut>(
    remote: Option<SocketAddr>,
    req: Request,
    spans: Option<Arc<Exporter>>,
    inner: F,
) -> Response
where
    F: FnOnce(Request, HeaderValue, TraceContext) -> Fut,
    Fut: std::future::Future<Output = (Response, RouteInfo)>,
{
    access_since(Instant::now(), remote, req, spans, inner).await
}

/// [`access`] for a request that began to arrive at `start` (the gateway's server passes when
/// its first byte was read, or the connection's accept: `server::conn::Arrival`), which the
/// duration in the metrics and the log line counts from.
///
/// A plain fn returning an `async move` block: an `async fn` would keep `req` twice in the
/// future (see `routes::handle`).
#[allow(clippy::manual_async_fn)] // an `async fn` would keep its arguments twice
pub fn access_since<F, Fut>(
    start: Instant,
    remote: Option<SocketAddr>,
    req: Request,
    spans: Option<Arc<Exporter>>,
    inner: F,
) -> impl std::future::Future<Output = Response>
where
    F: FnOnce(Request, HeaderValue, TraceContext) -> Fut,
    Fut: std::future::Future<Output = (Response, RouteInfo)>,
{
    async move {
        let rid = match req.headers().get(&X_REQUEST_ID) {
            Some(v) if client_request_id(v) => v.clone(),
            _ => new_request_id(),
        };
        let method = req.method().clone();
        // A `Uri` clone shares its bytes: the path for the log line costs no copy.
        let uri = req.uri().clone();
        // W3C trace context: the client's trace continues (or one starts here), with the gateway
        // as the parent of what the upstream sees.
        let trace = TraceContext::continue_or_start(req.headers());

        // `inner` is called inside the guard too: whatever it runs before its first await is covered.
        let inner_rid = rid.clone();
        let (mut resp, info) = match AssertUnwindSafe(
            async move { inner(req, inner_rid, trace).await },
        )
        .catch_unwind()
        .await
        {
            Ok(answer) => answer,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!(request_id = rid.to_str().unwrap_or(""), panic = %what, "handler panicked");
                let resp = ErrorReply {
                    error: &GatewayError::Internal,
                    request_id: rid.to_str().unwrap_or(""),
                }
                .into_response();
                (resp, RouteInfo::default())
            }
        };
        let status = resp.status().as_u16();
        let RouteInfo { route, upstream } = info;
        let reason = resp
            .extensions()
            .get::<crate::error::ErrorReason>()
            .map_or("", |r| r.0);
        record_request(
            route.as_deref().unwrap_or("unmatched"),
            method_label(&method),
            status_class(status),
            start.elapsed().as_secs_f64(),
        );
        if !reason.is_empty() {
            record_error(route.as_deref().unwrap_or("unmatched"), reason);
        }
        let log = tracing::enabled!(target: "access", tracing::Level::INFO);
        if log || spans.is_some() {
            // The line is written (and the request's span exported) when the body is done (or
            // dropped: the client went away), so it has the whole duration of a streamed
            // response and the bytes sent.
            let pending = PendingLine {
                log,
                spans,
                start,
                method,
                uri,
                route,
                status,
                upstream,
                reason,
                remote,
                request_id: rid.clone(),
                trace,
            };
            resp = resp.map(|body| {
                Body::new(LoggedBody {
                    inner: body,
                    bytes: 0,
                    pending: Some(pending),
                })
            });
        }
        resp.headers_mut().insert(X_REQUEST_ID.clone(), rid);
        resp
    }
}

/// What the access line needs, kept until the response body is done.
struct PendingLine {
    /// Write the access line (`RUST_LOG` lets `access` through).
    log: bool,
    /// Export the request's span.
    spans: Option<Arc<Exporter>>,
    start: Instant,
    method: http::Method,
    uri: http::Uri,
    route: Option<Arc<str>>,
    status: u16,
    upstream: Option<Arc<str>>,
    reason: &'static str,
    remote: Option<SocketAddr>,
    request_id: HeaderValue,
    trace: TraceContext,
}

impl PendingLine {
    fn write(&self, bytes: u64) {
        if let Some(exporter) = &self.spans {
            self.export(exporter, bytes);
        }
        if !self.log {
            return;
        }
        let line = AccessLine {
            method: self.method.as_str(),
            path: self.uri.path(),
            route: self.route.as_deref().unwrap_or(""),
            status: self.status,
            latency_ms: self.start.elapsed().as_secs_f64() * 1000.0,
            bytes,
            upstream: self.upstream.as_deref().unwrap_or(""),
            reason: self.reason,
            remote: self.remote,
            request_id: self.request_id.to_str().unwrap_or(""),
            trace_id: self.trace.trace_id_hex(),
        };
        line.write(std::time::SystemTime::now());
    }

    /// The request's span: the gateway's hop in the trace (`trace.rs`).
    fn export(&self, exporter: &Exporter, bytes: u64) {
        let elapsed = self.start.elapsed();
        let end = std::time::SystemTime::now();
        let route = self.route.as_deref().unwrap_or("");
        let mut attributes = vec![
            ("http.request.method", Value::Str(self.method.to_string())),
            ("url.path", Value::Str(self.uri.path().to_string())),
            ("http.route", Value::Str(route.to_string())),
            (
                "http.response.status_code",
                Value::Int(i64::from(self.status)),
            ),
            ("http.response.body.size", Value::Int(bytes as i64)),
        ];
        if let Some(upstream) = &self.upstream {
            attributes.push(("upstream", Value::Str(upstream.to_string())));
        }
        if !self.reason.is_empty() {
            attributes.push(("error.type", Value::Str(self.reason.to_string())));
        }
        if let Some(remote) = self.remote {
            attributes.push(("client.address", Value::Str(remote.ip().to_string())));
        }
        exporter.record(SpanRecord {
            trace_id: self.trace.trace_id,
            span_id: self.trace.span_id,
            parent_id: self.trace.parent_id,
            name: if route.is_empty() {
                self.method.to_string()
            } else {
                format!("{} {route}", self.method)
            },
            kind: Kind::Server,
            start: end.checked_sub(elapsed).unwrap_or(end),
            end,
            attributes,
            error: self.status >= 500,
        });
    }
}

pin_project_lite::pin_project! {
    /// The response body, counting the bytes sent; writes the access line when it is done
    /// or dropped.
    struct LoggedBody {
        #[pin]
        inner: Body,
        bytes: u64,
        pending: Option<PendingLine>,
    }

    impl PinnedDrop for LoggedBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(pending) = this.pending.take() {
                pending.write(*this.bytes);
            }
        }
    }
}

impl http_body::Body for LoggedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, axum::Error>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        match &frame {
            std::task::Poll::Ready(Some(Ok(f))) => {
                if let Some(data) = f.data_ref() {
                    *this.bytes += data.len() as u64;
                }
            }
            std::task::Poll::Ready(None | Some(Err(_))) => {
                if let Some(pending) = this.pending.take() {
                    pending.write(*this.bytes);
                }
            }
            std::task::Poll::Pending => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// One access-log line. Written by hand rather than through `tracing::info!` and the JSON
/// formatter (which formatted each field through `fmt::Write` and re-checked UTF-8 per
/// chunk: ~10% of a cache hit's user CPU), in exactly the formatter's shape:
/// `{"timestamp":..,"level":"INFO",<fields>,"target":"access"}`. Whether it is written still
/// follows `RUST_LOG` (`tracing::enabled!`), and it goes to the same buffered stdout.
pub struct AccessLine<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub route: &'a str,
    pub status: u16,
    /// From the request's arrival (its first byte read, or the accept: `server::conn::Arrival`)
    /// until the response's last byte was handed to the connection (a 5 s stream logs ~5 s).
    pub latency_ms: f64,
    /// Response body bytes sent.
    pub bytes: u64,
    pub upstream: &'a str,
    /// The error contract's `reason` when the gateway made the response itself
    /// (`circuit_open`, `upstream_unavailable`, `rate_limited`, ...); empty otherwise.
    pub reason: &'a str,
    pub remote: Option<SocketAddr>,
    pub request_id: &'a str,
    /// The W3C trace id the request carries (given by the client or made here).
    pub trace_id: &'a str,
}

thread_local! {
    /// The line being built, reused: no allocation per request.
    static LINE: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(512));
}

impl AccessLine<'_> {
    /// Appends the JSON line (with its newline) to `out`.
    pub fn render(&self, now: std::time::SystemTime, out: &mut Vec<u8>) {
        use std::io::Write;
        out.extend_from_slice(b"{\"timestamp\":\"");
        write_rfc3339_micros(now, out);
        out.extend_from_slice(b"\",\"level\":\"INFO\",\"method\":");
        json_str(self.method, out);
        out.extend_from_slice(b",\"path\":");
        json_str(self.path, out);
        out.extend_from_slice(b",\"route\":");
        json_str(self.route, out);
        out.extend_from_slice(b",\"status\":");
        push_uint(u64::from(self.status), 1, out);
        out.extend_from_slice(b",\"latency_ms\":");
        // serde_json's float format, as the tracing formatter wrote it.
        if serde_json::to_writer(&mut *out, &self.latency_ms).is_err() {
            out.extend_from_slice(b"null");
        }
        out.extend_from_slice(b",\"bytes\":");
        push_uint(self.bytes, 1, out);
        out.extend_from_slice(b",\"upstream\":");
        json_str(self.upstream, out);
        out.extend_from_slice(b",\"reason\":");
        json_str(self.reason, out);
        out.extend_from_slice(b",\"remote\":\"");
        match self.remote {
            // An address has no character that needs escaping.
            Some(SocketAddr::V4(v4)) => {
                for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                    if i > 0 {
                        out.push(b'.');
                    }
                    push_uint(u64::from(octet), 1, out);
                }
                out.push(b':');
                push_uint(u64::from(v4.port()), 1, out);
            }
            Some(remote) => {
                let _ = write!(out, "{remote}");
            }
            None => {}
        }
        out.extend_from_slice(b"\",\"request_id\":");
        json_str(self.request_id, out);
        out.extend_from_slice(b",\"trace_id\":");
        json_str(self.trace_id, out);
        out.extend_from_slice(b",\"target\":\"access\"}\n");
    }

    fn write(&self, now: std::time::SystemTime) {
        use std::io::Write;
        LINE.with(|line| {
            let mut line = line.borrow_mut();
            line.clear();
            self.render(now, &mut line);
            let _ = super::BufferedStdout.write_all(&line);
        });
    }
}

/// `s` as a JSON string, escaped exactly as serde_json does; most values (methods, paths,
/// route templates, ids) need no escaping and are copied as they are.
fn json_str(s: &str, out: &mut Vec<u8>) {
    if !needs_escape(s.as_bytes()) {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else if serde_json::to_writer(&mut *out, s).is_err() {
        out.extend_from_slice(b"\"\"");
    }
}

/// Whether `s` has a byte JSON escapes (a control character, `"` or `\`). Eight bytes at a
/// time (the has-less-than / has-zero-byte bit tricks; exact for "any byte"): a byte-by-byte
/// scan of the line's five strings was ~600 instructions per request.
fn needs_escape(s: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // Some byte of `v` is below `n` (n <= 0x80); bytes >= 0x80 never count.
    let has_less = |v: u64, n: u8| v.wrapping_sub(ONES * u64::from(n)) & !v & HIGH != 0;
    let has_byte = |v: u64, b: u8| has_less(v ^ (ONES * u64::from(b)), 1);
    let mut chunks = s.chunks_exact(8);
    for chunk in &mut chunks {
        let v = u64::from_ne_bytes(chunk.try_into().expect("chunks of 8"));
        if has_less(v, 0x20) || has_byte(v, b'"') || has_byte(v, b'\\') {
            return true;
        }
    }
    chunks
        .remainder()
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

/// `n` in decimal, left-padded with zeros to at least `width` digits (the line is written
/// per request: `write!` and its formatting machinery showed in instruction counts).
fn push_uint(mut n: u64, width: usize, out: &mut Vec<u8>) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    while n > 0 || digits.len() - i < width.max(1) {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend_from_slice(&digits[i..]);
}

/// `2026-11-26T13:46:40.266239Z`, the tracing formatter's UTC timestamp with microseconds.
fn write_rfc3339_micros(now: std::time::SystemTime, out: &mut Vec<u8>) {
    let since = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    push_uint(u64::try_from(year).unwrap_or(0), 4, out);
    for (sep, value, width) in [
        (b'-', u64::from(month), 2),
        (b'-', u64::from(day), 2),
        (b'T', rem / 3600, 2),
        (b':', rem % 3600 / 60, 2),
        (b':', rem % 60, 2),
        (b'.', u64::from(since.subsec_micros()), 6),
    ] {
        out.push(sep);
        push_uint(value, width, out);
    }
    out.push(b'Z');
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn needs_escape_finds_every_escaped_byte_at_every_offset() {
        for len in 0..20 {
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut s = vec![b'a'; len];
                    s[at] = b;
                    let want = b < 0x20 || b == b'"' || b == b'\\';
                    assert_eq!(needs_escape(&s), want, "byte {b:#x} at {at} of {len}");
                }
            }
            assert!(!needs_escape(&vec![b'z'; len]));
        }
        // Mixed words (carries between bytes must not invent a match): against the plain scan.
        let edge = [
            0x00, 0x1f, 0x20, 0x21, 0x22, 0x23, 0x5b, 0x5c, 0x5d, 0x7f, 0x80, 0xa2, 0xff,
        ];
        for _ in 0..20_000 {
            let len = rand::random_range(0..40);
            let s: Vec<u8> = (0..len)
                .map(|_| edge[rand::random_range(0..edge.len())])
                .collect();
            let want = s.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\');
            assert_eq!(needs_escape(&s), want, "{s:x?}");
        }
    }

    #[test]
    fn the_access_line_has_the_json_formatters_shape() {
        let line = AccessLine {
            method: "GET",
            path: "/api/data/\"x\\",
            route: "/api/data/{product}",
            status: 200,
            latency_ms: 0.25,
            bytes: 1234,
            upstream: "storage",
            reason: "circuit_open",
            remote: Some("127.0.0.1:5000".parse().unwrap()),
            request_id: "abc",
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736",
        };
        let mut out = Vec::new();
        line.render(
            UNIX_EPOCH + Duration::from_micros(1_795_095_200_266_239),
            &mut out,
        );
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            concat!(
                r#"{"timestamp":"2026-11-19T13:33:20.266239Z","level":"INFO","method":"GET","#,
                r#""path":"/api/data/\"x\\","route":"/api/data/{product}","status":200,"#,
                r#""latency_ms":0.25,"bytes":1234,"upstream":"storage","reason":"circuit_open","#,
                r#""remote":"127.0.0.1:5000","#,
                r#""request_id":"abc","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","#,
                r#""target":"access"}"#,
                "\n"
            )
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["path"], "/api/data/\"x\\");
    }

    #[test]
    fn numbers_and_strings_are_written_as_the_formatter_would() {
        let mut out = Vec::new();
        push_uint(0, 1, &mut out);
        out.push(b' ');
        push_uint(7, 2, &mut out);
        out.push(b' ');
        push_uint(65_535, 1, &mut out);
        out.push(b' ');
        push_uint(42, 6, &mut out);
        assert_eq!(out, b"0 07 65535 000042");
        for s in [
            "/plain/path",
            "tab\there",
            "quote\"",
            "back\\slash",
            "caf\u{e9}",
            "\u{7f}",
        ] {
            let mut ours = Vec::new();
            json_str(s, &mut ours);
            assert_eq!(ours, serde_json::to_vec(s).unwrap(), "{s:?}");
        }
        let v6 = AccessLine {
            method: "GET",
            path: "/",
            route: "",
            status: 503,
            latency_ms: 1.0,
            bytes: 0,
            upstream: "",
            reason: "",
            remote: Some("[::1]:8080".parse().unwrap()),
            request_id: "",
            trace_id: "",
        };
        let mut out = Vec::new();
        v6.render(UNIX_EPOCH, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(r#""status":503,"#), "{text}");
        assert!(text.contains(r#""remote":"[::1]:8080""#), "{text}");
        assert!(
            text.starts_with(r#"{"timestamp":"1970-01-01T00:00:00.000000Z""#),
            "{text}"
        );
    }

    #[test]
    fn civil_dates_match_known_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_783), (2026, 11, 26));
    }
}
