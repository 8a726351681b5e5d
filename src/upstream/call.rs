//! What one call through an upstream's pipeline is: what the caller sends and asks for
//! ([`UpstreamRequest`], [`CallOptions`]), what it gets back ([`Delivered`] or
//! [`UpstreamError`]), how each attempt ended ([`Outcome`]), and the state the layers of one
//! call share ([`Call`]).
//!
//! The shared state travels in the request's `Extensions`, which reqwest-middleware hands to
//! every layer of every attempt: no task-local, and a layer can never run "outside a call"
//! (a missing [`Call`] is a bug, reported as [`NoCall`]). It is behind an `Arc`, so a hedged
//! attempt running on a copy of the extensions shares it.
//!
//! This module imports nothing from its siblings: the layers import it.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Extensions, HeaderMap, Method, StatusCode};
use reqwest::Response;
use tokio::time::Instant;

use crate::client::ClientKey;
use crate::observability::trace::TraceContext;

/// How one call may use the upstream: made by [`CallOptions::for_method`] (or
/// [`CallOptions::for_upgrade`]) from the caller's [`CallLimits`].
#[derive(Clone, Copy, Debug)]
pub struct CallOptions {
    /// The whole call, retries and backoff included, never takes longer than this.
    pub deadline: Duration,
    /// One attempt, until response headers (the body is streamed by the caller).
    pub attempt_timeout: Duration,
    /// Safe to send twice (GET, HEAD, PUT, DELETE...): may be retried after a reset or a 503.
    pub idempotent: bool,
    /// The route opts a non-idempotent request into the same retries as an idempotent one.
    pub retry_non_idempotent: bool,
    /// The route's own retry count, replacing the upstream's `max_retries`.
    pub max_retries: Option<u32>,
    /// When the first attempt has not answered after this long, a second goes to another
    /// instance and the first answer wins. Only honoured for idempotent calls.
    pub hedge_after: Option<Duration>,
}

/// What a caller allows its calls (a route's settings, the verifier's timeout), whatever the
/// method: [`CallOptions`] adds what the method decides.
#[derive(Clone, Copy, Debug)]
pub struct CallLimits {
    /// The whole call, retries included.
    pub deadline: Duration,
    /// One attempt, until response headers.
    pub attempt_timeout: Duration,
    /// Replaces the upstream's `max_retries` (`None`: the upstream's).
    pub max_retries: Option<u32>,
    /// Retry a non-idempotent request that may have reached the upstream.
    pub retry_non_idempotent: bool,
    /// Hedge a GET/HEAD whose first attempt has not answered after this long.
    pub hedge_after: Option<Duration>,
}

impl CallLimits {
    /// One attempt's worth of time for the whole call, the upstream's retries, no hedging:
    /// the gateway's own calls (token verification).
    pub fn within(timeout: Duration) -> CallLimits {
        CallLimits {
            deadline: timeout,
            attempt_timeout: timeout,
            max_retries: None,
            retry_non_idempotent: false,
            hedge_after: None,
        }
    }
}

/// RFC 9110 section 9.2.2: the methods whose repeat has the effect of one request.
fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

impl CallOptions {
    /// The options of a `method` request under `limits`: retried after it may have reached
    /// the upstream only when idempotent (or the limits opt in), hedged only for GET and HEAD
    /// (a hedge sends the request twice).
    pub fn for_method(method: &Method, limits: CallLimits) -> CallOptions {
        CallOptions {
            deadline: limits.deadline,
            attempt_timeout: limits.attempt_timeout,
            idempotent: is_idempotent(method),
            retry_non_idempotent: limits.retry_non_idempotent,
            max_retries: limits.max_retries,
            hedge_after: limits
                .hedge_after
                .filter(|_| matches!(*method, Method::GET | Method::HEAD)),
        }
    }

    /// A WebSocket handshake (a GET): retried like any GET, never hedged (two upstream
    /// connections for one client connection).
    pub fn for_upgrade(limits: CallLimits) -> CallOptions {
        CallOptions {
            hedge_after: None,
            ..CallOptions::for_method(&Method::GET, limits)
        }
    }
}

/// The trace an upstream call belongs to, as a value: the trace id and the span the
/// upstream's work hangs from (the gateway's span of the client request). The pipeline's
/// attempt spans take their parent from it, never from the `traceparent` header again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    /// The gateway's span id for the client request.
    pub span_id: [u8; 8],
}

impl From<&TraceContext> for TraceParent {
    fn from(t: &TraceContext) -> TraceParent {
        TraceParent {
            trace_id: t.trace_id,
            span_id: t.span_id,
        }
    }
}

/// A request ready for an upstream's pipeline (`Pipeline::send_request`): what is sent, how
/// the call may go, for whom and in which trace. The gateway builds every one in two places:
/// requests made for a client (proxied, cache fills, WebSocket handshakes) in
/// `routes::outgoing`, its own calls (token verification) with [`UpstreamRequest::new`] alone.
#[derive(Debug)]
pub struct UpstreamRequest {
    /// Method, URL, headers and the buffered body (retries clone it).
    pub request: reqwest::Request,
    pub options: CallOptions,
    /// On whose behalf: its client's share of the upstream's slots, its priority and latency
    /// class under the adaptive concurrency limit.
    pub caller: Caller,
    /// Under the upstream's adaptive concurrency limit: proxied requests and token
    /// verification. Not a WebSocket handshake (bounded by the `[websocket]` caps: a reconnect
    /// storm after a socket restart must not be shed by a limit learnt from HTTP calls), nor a
    /// caller of the pipeline alone.
    pub limited: bool,
    /// The trace its attempt spans join (`None`: no spans).
    pub trace: Option<TraceParent>,
}

impl UpstreamRequest {
    /// `method url`, no headers or body yet, for no client, outside the adaptive limit and in no
    /// trace.
    pub fn new(method: Method, url: reqwest::Url, options: CallOptions) -> UpstreamRequest {
        UpstreamRequest {
            request: reqwest::Request::new(method, url),
            options,
            caller: Caller::default(),
            limited: false,
            trace: None,
        }
    }

    /// Made for a client request in `trace`: its `traceparent` names the gateway's span (see
    /// `observability::trace`), and the attempt spans hang from the same span.
    pub fn in_trace(mut self, trace: &TraceContext) -> UpstreamRequest {
        trace.forward(self.request.headers_mut());
        self.trace = Some(TraceParent::from(trace));
        self
    }

    pub fn headers_mut(&mut self) -> &mut HeaderMap {
        self.request.headers_mut()
    }

    /// Sets the (buffered) body.
    pub fn set_body(&mut self, body: Bytes) {
        *self.request.body_mut() = Some(reqwest::Body::from(body));
    }
}

/// On whose behalf a call is made: what the bulkhead and the concurrency limit weigh it by.
#[derive(Clone, Copy, Debug, Default)]
pub struct Caller {
    /// The client it counts against (its share of the slots); `None`: no client's (token
    /// verification for a request already counted, probes).
    pub client: Option<ClientKey>,
    /// How long it may wait for a slot and who is shed first (the route's `priority`).
    pub priority: crate::config::Priority,
    /// Calls of one class share a no-load latency baseline in the concurrency limit: the
    /// proxy gives each route its own (one upstream's endpoints differ in latency).
    pub latency_class: u32,
}

/// An upstream response, headers received and body not yet read.
#[derive(Debug)]
pub struct Delivered {
    /// Not buffered: the gateway streams its body to the client.
    pub response: Response,
    /// Attempts that went to the upstream (the `X-Upstream-Attempts` header).
    pub attempts: u32,
    /// One of the upstream's connection slots (the bulkhead, `max_connections`): the
    /// connection stays busy until the body is read, so keep this with the body.
    pub slot: super::bulkhead::Slot,
}

/// Why no upstream response can be delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// Refused, reset or unreachable on every attempt made.
    #[error("upstream unavailable after {attempts} attempt(s): {detail}")]
    Unavailable { attempts: u32, detail: String },
    /// An attempt outlived its timeout, or the call its deadline.
    #[error("upstream timed out after {attempts} attempt(s)")]
    Timeout { attempts: u32 },
    /// The breaker refused the call without contacting the upstream.
    #[error("circuit open; next probe in {retry_after:?}")]
    CircuitOpen { retry_after: Duration },
    /// The client already holds (or waits for) `limit` of the upstream's slots, its share:
    /// refused without contacting the upstream (see `bulkhead`).
    #[error("client holds its share of the upstream's slots ({limit})")]
    ClientShare { limit: usize },
    /// The upstream is at its learnt concurrency limit and the call waited as long as its
    /// priority allows (or could not wait): refused without contacting the upstream, and no
    /// failure of it (see `concurrency`).
    #[error("upstream overloaded ({}, limit {limit})", cause.as_str())]
    Overloaded {
        cause: super::concurrency::ShedCause,
        limit: usize,
    },
}

/// A call was refused without contacting the upstream because the circuit is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("circuit open; next probe in {retry_after:?}")]
pub struct BreakerOpen {
    /// Time until the breaker will let a probe through (the client's `Retry-After`).
    pub retry_after: Duration,
}

/// One attempt got no response headers in time (its own timeout, or what was left of the
/// deadline).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("upstream attempt timed out after {after:?}")]
pub struct AttemptTimedOut {
    pub after: Duration,
}

/// A pipeline layer found no [`Call`] in the extensions: it was run outside
/// `Pipeline::send`, which is a bug, never a request to let the attempt through unchecked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("pipeline layer used outside a call (no per-call state)")]
pub struct NoCall;

/// No instance could take the attempt: none resolved (yet), or the set is empty. The
/// request never left the gateway, like a refused connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no instance of the upstream is known (host name not resolved)")]
pub struct NoInstance;

/// How one attempt ended, as the breaker, the retry strategy, metrics and logs see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The upstream answered with this status.
    Status(StatusCode),
    /// Refused or failed to connect: the request provably never reached the upstream.
    ConnectError,
    /// The connection failed after the request may have been sent, before a response.
    Reset,
    /// No response headers before the attempt's limit.
    Timeout,
    /// The breaker refused the attempt.
    CircuitOpen(Duration),
    /// A failure of our own making (request could not be built or cloned).
    Internal,
    /// Sent, then dropped before it ended because its answer was no longer wanted: the
    /// hedge that lost its race, or an attempt cut off by the call's deadline or by a client
    /// that went away. Never a call's last outcome: it is counted, not decided on.
    Abandoned,
}

/// Whether `e` (or an error under it) is the OS refusing this process a resource: out of
/// file descriptors (EMFILE, ENFILE) or buffer space (ENOBUFS, ENOMEM).
fn out_of_local_resources(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(
                io.raw_os_error(),
                Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
            ) {
                return true;
            }
        }
        current = err.source();
    }
    false
}

impl Outcome {
    pub(crate) fn of(result: &reqwest_middleware::Result<Response>) -> Outcome {
        match result {
            Ok(response) => Outcome::Status(response.status()),
            Err(reqwest_middleware::Error::Reqwest(e)) => {
                if out_of_local_resources(e) {
                    // Our own process ran out (descriptors, buffers): no verdict on the
                    // upstream, whose breaker must not open for it.
                    Outcome::Internal
                } else if e.is_connect() {
                    Outcome::ConnectError
                } else if e.is_timeout() {
                    Outcome::Timeout
                } else if e.is_builder() || e.is_redirect() || e.is_decode() {
                    Outcome::Internal
                } else {
                    Outcome::Reset
                }
            }
            Err(reqwest_middleware::Error::Middleware(e)) => {
                if let Some(open) = e.downcast_ref::<BreakerOpen>() {
                    Outcome::CircuitOpen(open.retry_after)
                } else if e.is::<AttemptTimedOut>() {
                    Outcome::Timeout
                } else if e.is::<NoInstance>() {
                    Outcome::ConnectError
                } else {
                    Outcome::Internal
                }
            }
        }
    }

    /// Every value [`Outcome::label`] can return.
    pub(crate) const LABELS: [&'static str; 9] = [
        "status_5xx",
        "status_4xx",
        "ok",
        "connect_error",
        "reset",
        "timeout",
        "circuit_open",
        "internal",
        "abandoned",
    ];

    /// The `outcome` label of the attempt metrics.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Outcome::Status(s) if s.is_server_error() => "status_5xx",
            Outcome::Status(s) if s.is_client_error() => "status_4xx",
            Outcome::Status(_) => "ok",
            Outcome::ConnectError => "connect_error",
            Outcome::Reset => "reset",
            Outcome::Timeout => "timeout",
            Outcome::CircuitOpen(_) => "circuit_open",
            Outcome::Internal => "internal",
            Outcome::Abandoned => "abandoned",
        }
    }

    /// `Some(true)` if this is a failure for the breaker (connection errors, timeouts, 5xx),
    /// `Some(false)` for a success (any other status, 4xx included: the upstream is healthy
    /// enough to judge the request), `None` if it says nothing about the upstream (an
    /// abandoned attempt's instance is judged by the balancer, which knows why it was dropped).
    pub(crate) fn breaker_failure(self) -> Option<bool> {
        match self {
            Outcome::Status(s) => Some(s.is_server_error()),
            Outcome::ConnectError | Outcome::Reset | Outcome::Timeout => Some(true),
            Outcome::CircuitOpen(_) | Outcome::Internal | Outcome::Abandoned => None,
        }
    }
}

/// The state of one call, shared by its layers through the request's `Extensions`.
#[derive(Clone, Debug)]
pub(crate) struct Call(Arc<CallState>);

/// Per-call facts (fixed when the call starts) and progress (updated by the attempts).
#[derive(Debug)]
pub(crate) struct CallState {
    /// No attempt, wait or retry may run past it.
    pub(crate) deadline: Instant,
    /// One attempt's own limit, clamped to what is left of the deadline.
    pub(crate) attempt_timeout: Duration,
    /// Whether a retry after the request may have reached the upstream is safe.
    pub(crate) idempotent: bool,
    /// The route lets a non-idempotent request be retried like an idempotent one.
    pub(crate) retry_non_idempotent: bool,
    /// Retries allowed after the first attempt (route or upstream setting).
    pub(crate) max_retries: u32,
    /// Hedge the first attempt after this long (idempotent calls only).
    pub(crate) hedge_after: Option<Duration>,
    /// Where the attempts' spans hang in the client request's trace.
    pub(crate) trace: Option<TraceParent>,
    /// The call holds a slot of the adaptive limit, in this latency class: each attempt then
    /// takes a slot of its instance, goes to one with room, and feeds its round trip to that
    /// instance's limit. `None`: an unlimited call (a WebSocket handshake, a limit turned off).
    pub(crate) limited: Option<u32>,
    progress: Mutex<Progress>,
}

/// What the attempts so far did.
#[derive(Debug, Default)]
struct Progress {
    /// Attempts that went to the upstream (circuit-open refusals excluded, abandoned ones
    /// such as a losing hedge included).
    attempts: u32,
    /// Tries including refusals, to number the attempt events.
    tries: u32,
    last_outcome: Option<Outcome>,
    /// Why the last failed attempt failed, for `UpstreamError::Unavailable`.
    last_error: Option<String>,
    /// The instances this call's attempts went to, so a retry or hedge goes elsewhere.
    tried: Vec<u64>,
}

impl Call {
    /// A call outside any trace.
    #[cfg(test)]
    pub(crate) fn new(deadline: Instant, options: &CallOptions, max_retries: u32) -> Call {
        Call::in_trace(deadline, options, max_retries, None, None)
    }

    /// A call whose attempts' spans hang from `trace`.
    pub(crate) fn in_trace(
        deadline: Instant,
        options: &CallOptions,
        max_retries: u32,
        trace: Option<TraceParent>,
        limited: Option<u32>,
    ) -> Call {
        Call(Arc::new(CallState {
            deadline,
            attempt_timeout: options.attempt_timeout,
            idempotent: options.idempotent,
            retry_non_idempotent: options.retry_non_idempotent,
            max_retries,
            hedge_after: options.hedge_after.filter(|_| options.idempotent),
            trace,
            limited,
            progress: Mutex::new(Progress::default()),
        }))
    }

    /// The call the layer is part of: [`NoCall`] if it runs outside `Pipeline::send`.
    pub(crate) fn of(extensions: &Extensions) -> Result<&Call, reqwest_middleware::Error> {
        extensions
            .get::<Call>()
            .ok_or_else(|| reqwest_middleware::Error::middleware(NoCall))
    }

    pub(crate) fn state(&self) -> &CallState {
        &self.0
    }

    // Only short, non-panicking sections hold the lock, so a poisoned one is still consistent.
    fn progress(&self) -> MutexGuard<'_, Progress> {
        self.0
            .progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The attempt's time limit: its own timeout, but never past the deadline.
    pub(crate) fn attempt_limit(&self, now: Instant) -> Duration {
        self.0
            .attempt_timeout
            .min(self.0.deadline.saturating_duration_since(now))
    }

    /// Whether a replay of a request that may have reached the upstream is safe.
    pub(crate) fn replay_safe(&self) -> bool {
        self.0.idempotent || self.0.retry_non_idempotent
    }

    pub(crate) fn last_outcome(&self) -> Option<Outcome> {
        self.progress().last_outcome
    }

    pub(crate) fn attempts(&self) -> u32 {
        self.progress().attempts
    }

    /// Runs `f` on the instances tried so far.
    pub(crate) fn with_tried<R>(&self, f: impl FnOnce(&[u64]) -> R) -> R {
        f(&self.progress().tried)
    }

    pub(crate) fn tried_instance(&self, id: u64) {
        self.progress().tried.push(id);
    }

    pub(crate) fn take_last_error(&self) -> Option<String> {
        self.progress().last_error.take()
    }

    /// Records one attempt's end; returns its number (1-based, refusals included).
    pub(crate) fn record(
        &self,
        outcome: Outcome,
        result: &reqwest_middleware::Result<Response>,
    ) -> u32 {
        let mut p = self.progress();
        if !matches!(outcome, Outcome::CircuitOpen(_)) {
            p.attempts += 1;
        }
        p.tries += 1;
        p.last_outcome = Some(outcome);
        if let Err(e) = result {
            p.last_error = Some(error_chain(e));
        }
        p.tries
    }

    /// Records an attempt that was sent and then dropped unfinished (see
    /// [`Outcome::Abandoned`]): it counts as sent (`X-Upstream-Attempts`) but leaves the last
    /// outcome, which the breaker and the error mapping read, to the attempt that did end.
    pub(crate) fn record_abandoned(&self) -> u32 {
        let mut p = self.progress();
        p.attempts += 1;
        p.tries += 1;
        p.tries
    }
}

/// `now + d`, saturating (about a century ahead) instead of panicking on an absurd duration
/// from config.
pub(crate) fn instant_after(now: Instant, d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    now.checked_add(d.min(FAR)).unwrap_or(now)
}

/// `outer: inner: innermost`, because reqwest's own message rarely names the cause.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_descriptors_is_ours_not_the_upstreams() {
        #[derive(Debug, thiserror::Error)]
        #[error("connect failed")]
        struct Wrapped(#[source] std::io::Error);
        let emfile = Wrapped(std::io::Error::from_raw_os_error(libc::EMFILE));
        assert!(out_of_local_resources(&emfile));
        let refused = Wrapped(std::io::Error::from_raw_os_error(libc::ECONNREFUSED));
        assert!(!out_of_local_resources(&refused));
    }

    #[test]
    fn a_4xx_is_a_breaker_success_and_a_5xx_a_failure() {
        let s = |code: u16| Outcome::Status(StatusCode::from_u16(code).unwrap());
        assert_eq!(s(404).breaker_failure(), Some(false));
        assert_eq!(s(200).breaker_failure(), Some(false));
        assert_eq!(s(500).breaker_failure(), Some(true));
        assert_eq!(s(503).label(), "status_5xx");
        assert_eq!(Outcome::Timeout.breaker_failure(), Some(true));
        assert_eq!(Outcome::Internal.breaker_failure(), None);
        assert_eq!(Outcome::CircuitOpen(Duration::ZERO).breaker_failure(), None);
    }

    #[test]
    fn an_absurd_duration_saturates_instead_of_panicking() {
        let now = Instant::now();
        assert!(instant_after(now, Duration::MAX) > now + Duration::from_secs(3600));
    }

    #[test]
    fn the_method_decides_retries_and_hedging_within_the_callers_limits() {
        let limits = CallLimits {
            deadline: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(2),
            max_retries: Some(1),
            retry_non_idempotent: false,
            hedge_after: Some(Duration::from_millis(50)),
        };
        let get = CallOptions::for_method(&Method::GET, limits);
        assert!(get.idempotent);
        assert_eq!(get.hedge_after, Some(Duration::from_millis(50)));
        assert_eq!(get.max_retries, Some(1));
        assert_eq!(get.deadline, Duration::from_secs(10));
        assert_eq!(get.attempt_timeout, Duration::from_secs(2));
        assert!(CallOptions::for_method(&Method::HEAD, limits)
            .hedge_after
            .is_some());
        // A PUT may be replayed, but never sent twice at once; a POST neither.
        let put = CallOptions::for_method(&Method::PUT, limits);
        assert!(put.idempotent);
        assert_eq!(put.hedge_after, None);
        let post = CallOptions::for_method(&Method::POST, limits);
        assert!(!post.idempotent && !post.retry_non_idempotent);
        assert_eq!(post.hedge_after, None);
        // An upgrade is a GET that is never hedged: one client, one upstream connection.
        let upgrade = CallOptions::for_upgrade(limits);
        assert!(upgrade.idempotent);
        assert_eq!(upgrade.hedge_after, None);
        // The gateway's own call: the whole call within one attempt's time.
        let own =
            CallOptions::for_method(&Method::POST, CallLimits::within(Duration::from_secs(5)));
        assert_eq!(own.deadline, own.attempt_timeout);
        assert_eq!((own.max_retries, own.hedge_after), (None, None));
    }

    #[test]
    fn a_request_in_a_trace_names_the_gateways_span_in_its_header_and_its_value() {
        let mut client = HeaderMap::new();
        client.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let trace = TraceContext::continue_or_start(&client);
        let url: reqwest::Url = "http://storage:8003/products".parse().unwrap();
        let options =
            CallOptions::for_method(&Method::GET, CallLimits::within(Duration::from_secs(1)));
        let plain = UpstreamRequest::new(Method::GET, url.clone(), options);
        assert!(plain.trace.is_none() && plain.caller.client.is_none() && !plain.limited);
        assert!(plain.request.headers().is_empty());
        let traced = UpstreamRequest::new(Method::GET, url, options).in_trace(&trace);
        let parent = traced.trace.expect("in a trace");
        assert_eq!(parent.trace_id, trace.trace_id);
        assert_eq!(parent.span_id, trace.span_id);
        let header = traced.request.headers()["traceparent"].to_str().unwrap();
        assert_eq!(
            header,
            format!(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01",
                hex::encode(trace.span_id)
            )
        );
        // The attempt spans hang from the span the header names: one value, one source.
        let call = Call::in_trace(Instant::now(), &options, 0, traced.trace, None);
        assert_eq!(call.state().trace, Some(parent));
    }

    #[test]
    fn a_layer_outside_a_call_is_an_error_not_a_pass() {
        let e = Call::of(&Extensions::new()).expect_err("no call");
        assert!(e.to_string().contains("outside a call"), "{e}");
    }
}
