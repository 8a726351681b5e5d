//! One call to an upstream, as every layer of the pipeline sees it: what the caller asks for
//! ([`CallOptions`]), what it gets back ([`Delivered`] or [`UpstreamError`]), how each
//! attempt ended ([`Outcome`]), and the state the layers of one call share ([`Call`]).
//!
//! The shared state travels in the request's `Extensions`, which reqwest-middleware hands to
//! every layer of every attempt: no task-local, and a layer can never run "outside a call"
//! (a missing [`Call`] is a bug, reported as [`NoCall`]). It is behind an `Arc`, so a hedged
//! attempt running on a copy of the extensions shares it.
//!
//! This module imports nothing from its siblings: the layers import it.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use http::{Extensions, StatusCode};
use reqwest::Response;
use tokio::time::Instant;

/// How one call may use the upstream; set per route by the proxy handler.
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

/// On whose behalf a call is made: what the bulkhead and the concurrency limit weigh it by.
#[derive(Clone, Copy, Debug, Default)]
pub struct Caller {
    /// The client it counts against (its share of the slots); `None`: no client's (token
    /// verification for a request already counted, probes).
    pub client: Option<crate::client::ClientKey>,
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
    pub(crate) const LABELS: [&'static str; 8] = [
        "status_5xx",
        "status_4xx",
        "ok",
        "connect_error",
        "reset",
        "timeout",
        "circuit_open",
        "internal",
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
        }
    }

    /// `Some(true)` if this is a failure for the breaker (connection errors, timeouts, 5xx),
    /// `Some(false)` for a success (any other status, 4xx included: the upstream is healthy
    /// enough to judge the request), `None` if it says nothing about the upstream.
    pub(crate) fn breaker_failure(self) -> Option<bool> {
        match self {
            Outcome::Status(s) => Some(s.is_server_error()),
            Outcome::ConnectError | Outcome::Reset | Outcome::Timeout => Some(true),
            Outcome::CircuitOpen(_) | Outcome::Internal => None,
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
    progress: Mutex<Progress>,
}

/// What the attempts so far did.
#[derive(Debug, Default)]
struct Progress {
    /// Attempts that went to the upstream (circuit-open refusals excluded).
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
    pub(crate) fn new(deadline: Instant, options: &CallOptions, max_retries: u32) -> Call {
        Call(Arc::new(CallState {
            deadline,
            attempt_timeout: options.attempt_timeout,
            idempotent: options.idempotent,
            retry_non_idempotent: options.retry_non_idempotent,
            max_retries,
            hedge_after: options.hedge_after.filter(|_| options.idempotent),
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
    fn a_layer_outside_a_call_is_an_error_not_a_pass() {
        let e = Call::of(&Extensions::new()).expect_err("no call");
        assert!(e.to_string().contains("outside a call"), "{e}");
    }
}
