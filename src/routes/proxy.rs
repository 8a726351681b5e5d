//! The ONE generic proxy handler: every proxy route is served by this code, driven by the
//! route table, in phases: read the body -> cache lookup (routes that opt in) -> upstream call
//! -> response. The upstream request is built by `outgoing` (rewritten path, raw query, body
//! bytes, filtered headers); the upstream's response is streamed back untouched.

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::header::{self, HeaderName};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method};

use super::buffer::{self, BufferBudget, ReadAhead, Whole};
pub use super::headers::{strip_hop_by_hop, upstream_headers};
use super::outgoing::{Outgoing, Target};
// Where the URL helpers were first published (the server and the URL tests use them here).
pub use super::outgoing::{parse_base, parse_upstream_url, upstream_url};
use super::table::Route;
use super::{AppState, RequestCtx, UpstreamRuntime};
use crate::error::GatewayError;
use crate::upstream::bulkhead::Slot;
use crate::upstream::cache::{self, CacheOutcome, Fetched, ResponseCache};
use crate::upstream::{Delivered, UpstreamError, UpstreamRequest};

pub static X_UPSTREAM_ATTEMPTS: HeaderName = HeaderName::from_static("x-upstream-attempts");

/// `X-Upstream-Attempts`: a static value for the counts retries can reach (formatting one
/// allocated on every proxied response).
fn attempts_value(attempts: u32) -> HeaderValue {
    const DIGITS: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    match DIGITS.get(attempts as usize) {
        Some(d) => HeaderValue::from_static(d),
        None => HeaderValue::from(attempts),
    }
}

/// Reads the request body into memory, up to `limit` bytes (413 beyond). Small bodies are
/// the norm here, and a buffered body is what lets a request be retried.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: u64) -> Result<Bytes, GatewayError> {
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit {
            return Err(GatewayError::PayloadTooLarge { limit });
        }
    }
    // Most requests (GETs) have no body at all: skip the collecting machinery.
    if http_body::Body::is_end_stream(&body) {
        return Ok(Bytes::new());
    }
    match axum::body::to_bytes(body, limit as usize).await {
        Ok(b) => Ok(b),
        Err(e) => {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(err) = source {
                if err.is::<http_body_util::LengthLimitError>() {
                    return Err(GatewayError::PayloadTooLarge { limit });
                }
                source = err.source();
            }
            Err(GatewayError::BadRequest(
                "could not read the request body".into(),
            ))
        }
    }
}

/// A non-zero `Content-Length` (a chunked body is judged once read: it may be empty).
fn declares_body(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 0)
}

fn get_body_refused() -> GatewayError {
    GatewayError::BadRequest("a GET or HEAD request must not have a body".into())
}

/// Forwards one request along `route`: phases "read body", "cache lookup", "upstream call"
/// and "response".
///
/// A plain fn returning an `async move` block (see `routes::handle`): one copy of `parts`.
#[allow(clippy::manual_async_fn)] // an `async fn` would keep its arguments twice
pub fn forward<'x>(
    app: &'x AppState,
    ctx: &'x RequestCtx<'x>,
    route: &'x Route,
    params: &'x [&'x str],
    parts: Parts,
    body: Body,
) -> impl std::future::Future<Output = Result<Response, GatewayError>> + Send + 'x {
    async move {
        let up = app.upstream_of(route)?;
        // A GET or HEAD body is refused, declared (before reading it; with `Expect: 100-continue`
        // the client never sends it) or found. RFC 9110 9.3.1: it has no defined semantics, so no
        // cache key can account for it, and an upstream that ignores a GET's `Content-Length`
        // reads the body as the next request on a pooled connection.
        let bodiless = matches!(parts.method, Method::GET | Method::HEAD);
        if bodiless && declares_body(&parts.headers) {
            return Err(get_body_refused());
        }
        // Bounded like the upstream call: a client that stalls mid-body must not hold us forever.
        let body = tokio::time::timeout(
            route.deadline,
            read_body(&parts.headers, body, app.max_body),
        )
        .await
        .map_err(|_| GatewayError::RequestTimeout)??;
        if bodiless && !body.is_empty() {
            return Err(get_body_refused());
        }
        // A `Uri` clone shares its bytes: the query outlives `parts` without a copy.
        let uri = parts.uri.clone();
        let target = Target::new(route, params, uri.query().filter(|_| route.forward_query));
        let outgoing = Outgoing::new(app, ctx, route, up);
        // Shared caching only for unauthenticated GET/HEAD on routes that opt in.
        if let Some(policy) = route
            .cache
            .as_ref()
            .filter(|_| !route.auth && cache::request_is_cacheable(&parts.method, &parts.headers))
        {
            return from_cache(app, route, up, &outgoing, &target, parts, body, policy).await;
        }
        let req = outgoing.proxied(
            parts.method.clone(),
            &parts.method,
            &target,
            parts.headers,
            body,
        )?;
        let deadline = req.options.deadline;
        let started = tokio::time::Instant::now();
        let delivered = call_upstream(up, req).await?;
        let left = deadline.saturating_sub(started.elapsed());
        let limit = usize::try_from(app.config.limits.response_buffer.0).unwrap_or(usize::MAX);
        decoupled_response(route, up, delivered, limit, &app.response_budget, left).await
    }
}

/// Phase "cache lookup": a fresh entry answers at once; otherwise ONE upstream call per
/// resource fills it (see `ResponseCache::get_or_fetch`). The upstream request is built only
/// on a miss: a hit costs no URL parse and no header copy. A HEAD that may fill the cache is
/// sent as GET, so the stored entry has a body for GETs.
#[allow(clippy::too_many_arguments)]
async fn from_cache(
    app: &AppState,
    route: &Route,
    up: &UpstreamRuntime,
    outgoing: &Outgoing<'_>,
    target: &Target<'_>,
    parts: Parts,
    body: Bytes,
    policy: &crate::config::RouteCachePolicy,
) -> Result<Response, GatewayError> {
    let key = ResponseCache::key_for_route(&route.label, &up.name, &target.path, target.query)
        .for_method(&parts.method);
    // Boxed: the fill (an upstream call and a body read) is the rare part, and inline it would
    // size every request's future, and so every connection, for it; hits allocate nothing.
    let fetch = || {
        Box::pin(async {
            let upstream_method = match parts.method {
                Method::HEAD => Method::GET,
                ref m => m.clone(),
            };
            // The response fills an entry every client shares: its own validators must not
            // turn it into a 304 (the rest of the request's conditions bypass the cache).
            let mut headers = parts.headers.clone();
            cache::strip_validators(&mut headers);
            let req = outgoing.proxied(upstream_method, &parts.method, target, headers, body)?;
            // A leader refused for its share hands that 429 to whoever joined its flight in the
            // microseconds before the refusal: the refusal comes before any await on the upstream.
            fetch_buffered(up, req, app.cache.max_entry_bytes()).await
        })
    };
    let hit = app
        .cache
        .get_or_fetch(key, &parts.headers, policy, fetch)
        .await?;
    let mut headers = hit.headers;
    if let Some(fresh_for) = hit.fresh_for {
        // The upstream's own directives (`private`, `no-store`, `max-age`...) stand.
        if !headers.contains_key(header::CACHE_CONTROL) {
            headers.insert(header::CACHE_CONTROL, cache::max_age(fresh_for, hit.age));
        }
    }
    // A poller that already holds this body gets a 304 from memory: no upstream call on a
    // hit, and no body on the wire either way.
    if hit.streamed.is_none()
        && hit.status == http::StatusCode::OK
        && cache::not_modified(&parts.headers, &headers)
    {
        metrics::counter!("gateway_not_modified_total", "route" => route.label.clone())
            .increment(1);
        let mut resp = Response::new(Body::empty());
        *resp.status_mut() = http::StatusCode::NOT_MODIFIED;
        *resp.headers_mut() = cache::not_modified_headers(&headers);
        let size = hit.body.len() as u64;
        resp.extensions_mut()
            .insert(super::compress::Selected { headers, size });
        cache::apply_headers(hit.outcome, hit.age, resp.headers_mut());
        return Ok(resp);
    }
    let body = match hit.streamed {
        Some(streamed) => Body::new(streamed),
        None => Body::from(hit.body),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = hit.status;
    *resp.headers_mut() = headers;
    cache::apply_headers(hit.outcome, hit.age, resp.headers_mut());
    if hit.attempts > 0 {
        resp.headers_mut()
            .insert(X_UPSTREAM_ATTEMPTS.clone(), attempts_value(hit.attempts));
    }
    Ok(resp)
}

/// Phase "response": the upstream's status and headers (minus hop-by-hop), and its body
/// decoupled from the client's reading speed, as nginx's proxy buffering does:
///
/// - a body whose size is known and at most `limits.response_buffer` (`limit`) is read
///   whole now, at the upstream's speed, within what is left of the deadline (`left`): the
///   slot and the pooled connection are free before the first byte goes to the client;
/// - a body of unknown size (chunked, Server-Sent Events) is read by a task into a buffer of
///   at most `limit` bytes and passed on chunk by chunk as it arrives: when the upstream ends
///   within the buffer, so does the call, however slowly the client reads;
/// - a larger body is streamed: its slot stays held until the client has it, bounded by
///   `limits.min_send_rate` and `send_timeout` on the client's side.
///
/// Held bytes are charged to `budget` (`limits.response_buffer_total`); with it spent, bodies
/// stream. `limit` 0 streams every body (the slot held until the client has read it).
async fn decoupled_response(
    route: &Route,
    up: &UpstreamRuntime,
    delivered: Delivered,
    limit: usize,
    budget: &BufferBudget,
    left: std::time::Duration,
) -> Result<Response, GatewayError> {
    let attempts = delivered.attempts;
    let slot = delivered.slot;
    let upstream_resp: http::Response<reqwest::Body> = delivered.response.into();
    let (mut parts, body) = upstream_resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts
        .headers
        .insert(X_UPSTREAM_ATTEMPTS.clone(), attempts_value(attempts));
    if route.cache.is_some() {
        cache::apply_headers(CacheOutcome::Bypass, None, &mut parts.headers);
    }
    if let Some(default) = &route.cache_control {
        if !parts.headers.contains_key(header::CACHE_CONTROL) {
            parts.headers.insert(header::CACHE_CONTROL, default.clone());
        }
    }
    let known = http_body::Body::size_hint(&body).upper();
    let stream = |body, slot| {
        Body::new(SlotBody {
            inner: body,
            slot: Some(slot),
        })
    };
    let body = match known {
        Some(len) if len <= limit as u64 => {
            // A small body usually came with the headers: no deadline timer for it then.
            let mut read = std::pin::pin!(buffer::read_whole(body, len, budget));
            let read = match futures_util::poll!(read.as_mut()) {
                std::task::Poll::Ready(whole) => Ok(whole),
                std::task::Poll::Pending => tokio::time::timeout(left, read).await,
            };
            match read {
                Ok(Ok(Whole::Read(whole))) => {
                    // The upstream is done: its slot and connection go back before the
                    // client reads.
                    drop(slot);
                    Body::from(whole)
                }
                Ok(Ok(Whole::NoRoom(body))) => stream(body, slot),
                Ok(Err(e)) => {
                    let detail = crate::upstream::call::error_chain(&e);
                    return Err(up.error(UpstreamError::Unavailable { attempts, detail }));
                }
                Err(_) => return Err(up.error(UpstreamError::Timeout { attempts })),
            }
        }
        None if limit > 0 => Body::new(ReadAhead::spawn(body, slot, limit, budget.clone())),
        Some(_) | None => stream(body, slot),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = parts.status;
    *resp.headers_mut() = parts.headers;
    Ok(resp)
}

pin_project_lite::pin_project! {
    /// The upstream's response body, holding its connection slot until the body has ended
    /// (or the client went away): the connection is busy until then.
    struct SlotBody {
        #[pin]
        inner: reqwest::Body,
        slot: Option<Slot>,
    }
}

impl http_body::Body for SlotBody {
    type Data = Bytes;
    type Error = reqwest::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, reqwest::Error>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        if matches!(frame, std::task::Poll::Ready(None | Some(Err(_)))) {
            // Ended: the connection is back in the pool (or gone), free the slot now rather
            // than when hyper drops the body.
            this.slot.take();
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

/// One call through the upstream's pipeline, its failure as the gateway's error. Boxed: the
/// call's future (~3 KB: reqwest, its middleware, retry and breaker) would otherwise be part of
/// every request's handler future, cache hits included.
async fn call_upstream(
    up: &UpstreamRuntime,
    req: UpstreamRequest,
) -> Result<Delivered, GatewayError> {
    Box::pin(up.pipeline.send_request(req))
        .await
        .map_err(|e| up.error(e))
}

/// One upstream call with the body read into memory, for the cache to store and share.
/// Reading the body counts against the same deadline as the call. Never buffers more than
/// `max_entry` bytes (what the cache may store): a larger body, declared or found while
/// reading, is handed on as a stream with what was read so far in front, so several large
/// answers in parallel cost buffers, not their size.
async fn fetch_buffered(
    up: &UpstreamRuntime,
    req: UpstreamRequest,
    max_entry: u64,
) -> Result<Fetched, GatewayError> {
    let deadline = req.options.deadline;
    let started = tokio::time::Instant::now();
    let delivered = call_upstream(up, req).await?;
    let left = deadline.saturating_sub(started.elapsed());
    let attempts = delivered.attempts;
    let upstream_resp: http::Response<reqwest::Body> = delivered.response.into();
    let (mut parts, body) = upstream_resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // The connection slot goes with the body, read here or streamed to the client.
    let mut body = SlotBody {
        inner: body,
        slot: Some(delivered.slot),
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let streamed = |front: Vec<Bytes>, body: SlotBody| Fetched {
        attempts,
        status: parts.status,
        headers: parts.headers.clone(),
        body: Bytes::new(),
        streamed: Some(http_body_util::BodyExt::boxed(
            http_body_util::BodyExt::map_err(Prefixed { front, inner: body }, |e| {
                Box::new(e) as Box<dyn std::error::Error + Send + Sync>
            }),
        )),
    };
    if declared.is_some_and(|n| n > max_entry) {
        return Ok(streamed(Vec::new(), body));
    }
    let read = async {
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut len: u64 = 0;
        while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
            // Trailers are not stored; only data counts.
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            len += data.len() as u64;
            chunks.push(data);
            if len > max_entry {
                return Ok::<_, reqwest::Error>(Err(chunks));
            }
        }
        Ok(Ok(concat(chunks)))
    };
    match tokio::time::timeout(left, read).await {
        Ok(Ok(Ok(whole))) => Ok(Fetched {
            attempts,
            ..Fetched::buffered(parts.status, parts.headers, whole)
        }),
        Ok(Ok(Err(front))) => Ok(streamed(front, body)),
        Ok(Err(e)) => {
            let detail = e.to_string();
            Err(up.error(UpstreamError::Unavailable { attempts, detail }))
        }
        Err(_) => Err(up.error(UpstreamError::Timeout { attempts })),
    }
}

/// The chunks as one `Bytes`, copying only when there is more than one.
fn concat(mut chunks: Vec<Bytes>) -> Bytes {
    match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => {
            let mut all = bytes::BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
            for c in chunks {
                all.extend_from_slice(&c);
            }
            all.freeze()
        }
    }
}

pin_project_lite::pin_project! {
    /// A body whose first chunks were already read (while deciding whether it fits the
    /// cache): those, then the rest as it arrives.
    struct Prefixed {
        front: Vec<Bytes>,
        #[pin]
        inner: SlotBody,
    }
}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = reqwest::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, reqwest::Error>>> {
        let this = self.project();
        if !this.front.is_empty() {
            let first = this.front.remove(0);
            return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(first))));
        }
        this.inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.front.is_empty() && self.inner.is_end_stream()
    }
}

/// The size of the future [`forward`] returns (see `server::request_future_size`).
pub fn forward_future_size() -> usize {
    fn size_of_output<A, B, C, D, E, F, R>(_: fn(A, B, C, D, E, F) -> R) -> usize {
        std::mem::size_of::<R>()
    }
    size_of_output(forward as fn(_, _, _, _, _, _) -> _)
}

#[cfg(test)]
mod tests {
    #[test]
    fn attempts_values() {
        for n in [0u32, 1, 3, 9, 10, 12345] {
            assert_eq!(super::attempts_value(n), n.to_string().as_str());
        }
    }
}
