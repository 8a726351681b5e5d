//! The pipeline for one upstream, composed in [`Pipeline::new`], and the per-call state its
//! layers share.

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::time::Duration;

use http::{Extensions, StatusCode};
use reqwest::{Request, Response};
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware, Middleware, Next};
use reqwest_retry::RetryTransientMiddleware;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::breaker::{Breaker, BreakerConfig, BreakerLayer, BreakerOpen, Permit};
use super::retry::{RetryBudget, RetryConfig, RetryOn, RetryWithin};
use super::timeout::{AttemptTimedOut, AttemptTimeout};

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
}

/// An upstream response, headers received and body not yet read.
#[derive(Debug)]
pub struct Delivered {
    /// Not buffered: the gateway streams its body to the client.
    pub response: Response,
    /// Attempts that went to the upstream (the `X-Upstream-Attempts` header).
    pub attempts: u32,
    /// One of the upstream's connection slots ([`Pipeline::with_max_connections`]): the
    /// connection stays busy until the body is read, so keep this with the body.
    pub slot: Option<OwnedSemaphorePermit>,
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
}

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

impl Outcome {
    pub(crate) fn of(result: &reqwest_middleware::Result<Response>) -> Outcome {
        match result {
            Ok(response) => Outcome::Status(response.status()),
            Err(reqwest_middleware::Error::Reqwest(e)) => {
                if e.is_connect() {
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

tokio::task_local! {
    /// The call in progress: reqwest-retry's strategy and policy cannot see the request, so
    /// what they need to decide lives here, scoped around the call in [`Pipeline::send`].
    static CALL: CallState;
}

/// Per-call facts and progress, shared by the layers of one call.
#[derive(Debug)]
pub(crate) struct CallState {
    pub(crate) deadline: Instant,
    pub(crate) attempt_timeout: Duration,
    pub(crate) idempotent: bool,
    pub(crate) retry_non_idempotent: bool,
    pub(crate) max_retries: u32,
    /// Attempts that went to the upstream (circuit-open refusals excluded).
    attempts: Cell<u32>,
    /// Tries including refusals, to number the attempt events.
    tries: Cell<u32>,
    last_outcome: Cell<Option<Outcome>>,
    /// Why the last failed attempt failed, for `UpstreamError::Unavailable`.
    last_error: RefCell<Option<String>>,
    /// A `Retry-After` the strategy accepted, for the policy to wait instead of backing off.
    retry_after: Cell<Option<Duration>>,
    /// The breaker's permit for this call, taken on its first admitted attempt and recorded
    /// once, when the call ends (the breaker counts calls, not attempts).
    permit: RefCell<Option<Permit>>,
}

impl CallState {
    pub(crate) fn new(deadline: Instant, call: &CallOptions, max_retries: u32) -> Self {
        CallState {
            deadline,
            attempt_timeout: call.attempt_timeout,
            idempotent: call.idempotent,
            retry_non_idempotent: call.retry_non_idempotent,
            max_retries,
            attempts: Cell::new(0),
            tries: Cell::new(0),
            last_outcome: Cell::new(None),
            last_error: RefCell::new(None),
            retry_after: Cell::new(None),
            permit: RefCell::new(None),
        }
    }

    /// Asks `breaker` to admit the next attempt of this call (see [`Breaker::admit_attempt`]).
    pub(crate) fn admit_attempt(&self, breaker: &Arc<Breaker>) -> Result<(), BreakerOpen> {
        breaker.admit_attempt(&mut self.permit.borrow_mut())
    }

    /// Records the call's final outcome with the breaker: `failed` as for
    /// [`Outcome::breaker_failure`]; `None` records nothing (and frees a probe slot).
    fn finish(&self, failed: Option<bool>) {
        let permit = self.permit.borrow_mut().take();
        if let (Some(permit), Some(failed)) = (permit, failed) {
            permit.record(failed);
        }
    }

    /// Runs `fut` with this state as the current call's.
    pub(crate) async fn scope<F: std::future::Future>(self, fut: F) -> F::Output {
        CALL.scope(self, fut).await
    }

    /// Runs `f` on the current call's state; `None` outside [`Pipeline::send`].
    pub(crate) fn with<R>(f: impl FnOnce(&CallState) -> R) -> Option<R> {
        CALL.try_with(f).ok()
    }

    /// The attempt's time limit: its own timeout, but never past the deadline.
    pub(crate) fn attempt_limit(&self, now: Instant) -> Duration {
        self.attempt_timeout
            .min(self.deadline.saturating_duration_since(now))
    }

    pub(crate) fn last_outcome(&self) -> Option<Outcome> {
        self.last_outcome.get()
    }

    pub(crate) fn set_retry_after(&self, wait: Duration) {
        self.retry_after.set(Some(wait));
    }

    pub(crate) fn take_retry_after(&self) -> Option<Duration> {
        self.retry_after.take()
    }

    /// Records one attempt's end; returns its number (1-based, refusals included).
    pub(crate) fn record(
        &self,
        outcome: Outcome,
        result: &reqwest_middleware::Result<Response>,
    ) -> u32 {
        if !matches!(outcome, Outcome::CircuitOpen(_)) {
            self.attempts.set(self.attempts.get() + 1);
        }
        self.tries.set(self.tries.get() + 1);
        self.last_outcome.set(Some(outcome));
        if let Err(e) = result {
            *self.last_error.borrow_mut() = Some(error_chain(e));
        }
        self.tries.get()
    }
}

/// `now + d`, saturating (about a century ahead) instead of panicking on an absurd duration
/// from config.
pub(crate) fn instant_after(now: Instant, d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    now.checked_add(d.min(FAR)).unwrap_or(now)
}

/// `outer: inner: innermost`, because reqwest's own message rarely names the cause.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
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

/// Why an attempt failed, for the log: the error's causes without reqwest's outer message,
/// which names the URL, query string included (where clients put tokens).
fn failure_cause(e: &reqwest_middleware::Error) -> Option<String> {
    match e {
        reqwest_middleware::Error::Reqwest(e) => {
            use std::error::Error;
            e.source().map(error_chain)
        }
        reqwest_middleware::Error::Middleware(e) => Some(error_chain(e.as_ref())),
    }
}

/// One tracing event and one count + duration sample per attempt.
struct RecordAttempt {
    upstream: Arc<str>,
    /// The attempt series of this upstream, one per outcome label, registered on first use
    /// (after the recorder is installed) so an attempt does not rebuild and look up its key.
    series: [std::sync::OnceLock<(metrics::Counter, metrics::Histogram)>; Outcome::LABELS.len()],
}

impl RecordAttempt {
    fn new(upstream: Arc<str>) -> Self {
        RecordAttempt {
            upstream,
            series: Default::default(),
        }
    }

    fn record(&self, outcome: Outcome, seconds: f64) {
        let label = outcome.label();
        let register = || {
            (
                metrics::counter!("gateway_upstream_attempts_total",
                    "upstream" => self.upstream.clone(), "outcome" => label),
                metrics::histogram!("gateway_upstream_attempt_duration_seconds",
                    "upstream" => self.upstream.clone(), "outcome" => label),
            )
        };
        let slot = Outcome::LABELS.iter().position(|l| *l == label);
        match slot {
            // Before the recorder exists a handle would be a no-op forever: don't keep it.
            Some(i) if crate::observability::metrics::installed() => {
                let (count, duration) = self.series[i].get_or_init(register);
                count.increment(1);
                duration.record(seconds);
            }
            _ => {
                let (count, duration) = register();
                count.increment(1);
                duration.record(seconds);
            }
        }
    }
}

#[async_trait::async_trait]
impl Middleware for RecordAttempt {
    async fn handle(
        &self,
        req: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        let started = Instant::now();
        let result = next.run(req, extensions).await;
        let elapsed = started.elapsed();
        let outcome = Outcome::of(&result);
        let attempt = CallState::with(|call| call.record(outcome, &result)).unwrap_or(1);
        let label = outcome.label();
        self.record(outcome, elapsed.as_secs_f64());
        let latency_ms = elapsed.as_secs_f64() * 1000.0;
        match outcome.breaker_failure() {
            Some(true) => {
                // The cause (refused, DNS, connect timeout...) tells a restart from an outage.
                let error = result.as_ref().err().and_then(failure_cause);
                tracing::info!(upstream = %self.upstream, attempt, outcome = label, latency_ms, error, "upstream attempt")
            }
            Some(false) | None => {
                tracing::debug!(upstream = %self.upstream, attempt, outcome = label, latency_ms, "upstream attempt")
            }
        }
        result
    }
}

/// One upstream's resilience stack around its pooled client.
pub struct Pipeline {
    upstream: Arc<str>,
    client: ClientWithMiddleware,
    breaker: Arc<Breaker>,
    budget: Arc<RetryBudget>,
    /// Used when the route sets no `max_retries` of its own.
    max_retries: u32,
    /// Bounds the calls in flight, hence the pooled connections, to this upstream; `None`:
    /// unbounded (see [`Pipeline::with_max_connections`]).
    slots: Option<Arc<Semaphore>>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// Builds the stack, outermost first. The deadline is not a middleware: it wraps the whole
    /// stack in [`Pipeline::send`], where the call's options are known.
    pub fn new(
        upstream: &str,
        client: reqwest::Client,
        retry: &RetryConfig,
        breaker: &BreakerConfig,
    ) -> Pipeline {
        let upstream: Arc<str> = Arc::from(upstream);
        let breaker = Arc::new(Breaker::new(&upstream, breaker));
        let budget = Arc::new(RetryBudget::new(retry));
        // Deadline: outermost, so nothing below (attempts, backoff sleeps) can outlive it. It is
        // applied in `send`, which knows the route's deadline; every layer below reads it.
        //
        // The caller's pooled client is the end of the chain: connection reuse and TLS live there.
        let client = ClientBuilder::new(client)
            // Retry is outside the breaker so that each attempt asks the breaker again (an
            // outage stops retries at once) and a refusal is classified as not retryable. Its
            // policy checks the deadline and the budget before every wait.
            .with(RetryTransientMiddleware::new_with_policy_and_strategy(
                RetryWithin {
                    backoff: retry.backoff(),
                    budget: budget.clone(),
                    upstream: upstream.clone(),
                },
                RetryOn {
                    retry_after_cap: retry.retry_after_cap.0,
                },
            ))
            // Records every attempt, refusals included, so it sits above the breaker; it is
            // below retry so that each attempt, not each call, is one event.
            .with(RecordAttempt::new(upstream.clone()))
            // The breaker refuses fast while open, per attempt; it records one outcome per
            // CALL, in `send` once retry is done (a call a retry saved is no failure). It is
            // outside the timeout so that a call whose last attempt timed out is a failure.
            .with(BreakerLayer {
                breaker: breaker.clone(),
            })
            // Innermost: bounds one attempt until response headers, clamped to the deadline.
            .with(AttemptTimeout)
            .build();
        Pipeline {
            upstream,
            client,
            breaker,
            budget,
            max_retries: retry.max_retries,
            slots: None,
        }
    }

    /// At most `n` calls in flight to this upstream (a bulkhead); more wait, within their
    /// deadline, for a free slot. The pooled client opens a connection per concurrent call,
    /// so this also caps the upstream connections and the memory they hold (buffers and a
    /// task each): without it, 1,000 concurrent clients meant 1,000 upstream connections.
    pub fn with_max_connections(mut self, n: usize) -> Pipeline {
        self.slots = Some(Arc::new(Semaphore::new(n.clamp(1, Semaphore::MAX_PERMITS))));
        self
    }

    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// Gives the breaker its active health probe, `GET {base_url}{breaker.probe_path}` on
    /// `client` while open; a no-op unless the upstream's breaker sets `probe_path`.
    pub fn probe_health_at(&self, client: &reqwest::Client, base_url: &str) {
        let Some(path) = self.breaker.config().probe_path.as_deref() else {
            return;
        };
        let url = format!("{}{path}", base_url.trim_end_matches('/'));
        match reqwest::Url::parse(&url) {
            Ok(url) => self
                .breaker
                .set_health_probe(super::breaker::http_health_check(
                    client.clone(),
                    url,
                    self.breaker.config().probe_interval.0,
                )),
            // Config validation checked both parts; say so loudly rather than probe nothing.
            Err(e) => {
                tracing::error!(upstream = %self.upstream, %url, error = %e, "health probe URL invalid; not probing")
            }
        }
    }

    /// Sends `req` (its body must be buffered, so that retries can clone it) through the stack.
    ///
    /// Any upstream answer, 5xx included, is `Ok` (the client gets it untouched); `Err` means
    /// there is no answer to give: [`UpstreamError::CircuitOpen`] without contacting the
    /// upstream, [`UpstreamError::Timeout`] when an attempt or the deadline ran out,
    /// [`UpstreamError::Unavailable`] when the connection failed on the last attempt.
    pub async fn send(&self, req: Request, call: CallOptions) -> Result<Delivered, UpstreamError> {
        let deadline = instant_after(Instant::now(), call.deadline);
        // Every call earns retry budget, whether or not it needs a retry.
        self.budget.deposit();
        let state = CallState::new(
            deadline,
            &call,
            call.max_retries.unwrap_or(self.max_retries),
        );
        state
            .scope(async {
                // The deadline is the outermost bound: nothing below may outlive it, waiting for
                // a connection slot included. The attempt timeout is clamped to it too, so this
                // rarely fires during an attempt; it is the backstop.
                let result = tokio::time::timeout_at(deadline, async {
                    let slot = match &self.slots {
                        Some(slots) => slots.clone().acquire_owned().await.ok(),
                        None => None,
                    };
                    (self.client.execute(req).await, slot)
                })
                .await;
                CALL.with(|state| {
                    // One breaker record per call, for its final attempt (a timeout if the
                    // deadline cut the call).
                    state.finish(match &result {
                        Ok(_) => state.last_outcome().and_then(Outcome::breaker_failure),
                        Err(_elapsed) => Outcome::Timeout.breaker_failure(),
                    });
                    let attempts = state.attempts.get();
                    match result {
                        Ok((Ok(response), slot)) => Ok(Delivered {
                            response,
                            attempts,
                            slot,
                        }),
                        Ok((Err(e), _)) => Err(match state.last_outcome() {
                            Some(Outcome::CircuitOpen(retry_after)) => {
                                UpstreamError::CircuitOpen { retry_after }
                            }
                            Some(Outcome::Timeout) => UpstreamError::Timeout { attempts },
                            Some(
                                Outcome::ConnectError
                                | Outcome::Reset
                                | Outcome::Internal
                                | Outcome::Status(_),
                            )
                            | None => UpstreamError::Unavailable {
                                attempts,
                                detail: state
                                    .last_error
                                    .borrow_mut()
                                    .take()
                                    .unwrap_or_else(|| error_chain(&e)),
                            },
                        }),
                        Err(_elapsed) => Err(UpstreamError::Timeout { attempts }),
                    }
                })
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_4xx_is_a_breaker_success_and_a_5xx_a_failure() {
        let s = |code: u16| Outcome::Status(StatusCode::from_u16(code).unwrap());
        assert_eq!(s(404).breaker_failure(), Some(false));
        assert_eq!(s(200).breaker_failure(), Some(false));
        assert_eq!(s(500).breaker_failure(), Some(true));
        assert_eq!(s(503).label(), "status_5xx");
        assert_eq!(Outcome::Timeout.breaker_failure(), Some(true));
        assert_eq!(Outcome::CircuitOpen(Duration::ZERO).breaker_failure(), None);
    }

    #[test]
    fn an_absurd_duration_saturates_instead_of_panicking() {
        let now = Instant::now();
        assert!(instant_after(now, Duration::MAX) > now + Duration::from_secs(3600));
    }
}
