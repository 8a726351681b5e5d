//! One attempt, everything below the retry layer, as ONE reqwest-middleware layer: the
//! attempt's record (one tracing event, metrics and a span), the service breaker's
//! admission, the balancer's choice of instance, the attempt timeout and the send on the
//! instance's pooled client.
//!
//! They were five layers; each reqwest-middleware layer boxes its future (`async_trait`) and
//! reaches the call's state through the request's `Extensions`. As steps of one future they
//! share the call by reference and cost one box per attempt (issue 28: what each change
//! bought is in loadtest/README.md).

use std::cell::RefCell;
use std::future::Future;
use std::sync::Arc;

use http::Extensions;
use reqwest::{Request, Response};
use reqwest_middleware::{Middleware, Next};
use tokio::time::Instant;

use super::balancer::{Abandoned, Balancer};
use super::breaker::{Breaker, CallPermit};
use super::call::{error_chain, Call, NoCall, Outcome};
use super::instances::Instance;
use crate::observability::metrics::{with_kept, with_route_slot, RouteSlots};
use crate::observability::otlp::{self, Exporter, SpanRecord};

/// The layer under the retry layer: each attempt, in this order (outermost first):
/// - its record: one tracing event and one count + duration sample per attempt, refusals
///   included, so a refusal by the breaker is recorded too;
/// - the SERVICE breaker: refuses fast while open, per attempt; it records one outcome per
///   CALL, in `Pipeline::send` once retry is done (a call a retry saved on another instance is
///   no failure: one bad instance never opens it);
/// - the balancer: picks the instance (untried first), moves the request to it, and feeds its
///   load and health (ejection) with the attempt's outcome, timeouts included;
/// - the attempt timeout (until response headers, clamped to the deadline) around the send
///   on the chosen instance's pooled client.
pub(crate) struct Attempt {
    pub(crate) record: RecordAttempt,
    pub(crate) breaker: Arc<Breaker>,
    pub(crate) balancer: Balancer,
}

#[async_trait::async_trait]
impl Middleware for Attempt {
    async fn handle(
        &self,
        req: Request,
        extensions: &mut Extensions,
        _next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        let extensions = &*extensions;
        let call = Call::of(extensions)?;
        let sent = async {
            let Some(permit) = extensions.get::<CallPermit>() else {
                return (Err(reqwest_middleware::Error::middleware(NoCall)), None);
            };
            if let Err(refused) = permit.admit(&self.breaker) {
                return (Err(refused), None);
            }
            self.balancer
                .send(req, call, extensions.get::<Abandoned>())
                .await
        };
        self.record.around(call, sent).await
    }
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

/// One upstream's attempt series, one per outcome label.
type AttemptSeries = [Option<(metrics::Counter, metrics::Histogram)>; Outcome::LABELS.len()];

thread_local! {
    /// Registered attempt series per upstream (see `observability::metrics::with_kept`).
    static ATTEMPT_SERIES: RefCell<RouteSlots<AttemptSeries>> = RefCell::default();
}

/// One tracing event and one count + duration sample per attempt.
pub(crate) struct RecordAttempt {
    pub(crate) upstream: Arc<str>,
    /// Where attempt spans go (`[tracing] otlp_endpoint`); set by the gateway's state.
    pub(crate) spans: SpanSink,
}

/// The span exporter a pipeline reports to, swapped by a reload.
pub(crate) type SpanSink = Arc<arc_swap::ArcSwapOption<Exporter>>;

impl RecordAttempt {
    fn record(&self, outcome: Outcome, seconds: f64) {
        let label = outcome.label();
        let i = Outcome::LABELS
            .iter()
            .position(|l| *l == label)
            .unwrap_or_default();
        let register = || {
            (
                metrics::counter!("gateway_upstream_attempts_total",
                    "upstream" => self.upstream.clone(), "outcome" => label),
                metrics::histogram!("gateway_upstream_attempt_duration_seconds",
                    "upstream" => self.upstream.clone(), "outcome" => label),
            )
        };
        ATTEMPT_SERIES.with(|cache| {
            with_route_slot(cache, &self.upstream, |series: &mut AttemptSeries| {
                with_kept(&mut series[i], register, |(count, duration)| {
                    count.increment(1);
                    duration.record(seconds);
                })
            })
        });
    }
}

/// Counts an attempt that is dropped before it ends (`Outcome::Abandoned`): a hedge that
/// lost its race was sent all the same, and must show in `X-Upstream-Attempts` and the
/// attempt metrics (issue 25: a hedged request reported one attempt and no loser).
struct Unfinished<'a> {
    recorder: &'a RecordAttempt,
    call: &'a Call,
    started: Instant,
    ended: bool,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let attempt = self.call.record_abandoned();
        let elapsed = self.started.elapsed();
        self.recorder
            .record(Outcome::Abandoned, elapsed.as_secs_f64());
        tracing::debug!(upstream = %self.recorder.upstream, attempt, outcome = Outcome::Abandoned.label(),
            latency_ms = elapsed.as_secs_f64() * 1000.0, "upstream attempt");
    }
}

impl RecordAttempt {
    /// Runs `attempt` of `call` and records it: its result, and the instance it went to
    /// (`None`: it went nowhere, refused before the balancer or with no instance to pick).
    async fn around(
        &self,
        call: &Call,
        attempt: impl Future<Output = (reqwest_middleware::Result<Response>, Option<Arc<Instance>>)>,
    ) -> reqwest_middleware::Result<Response> {
        // Spans only when exporting and the call is in a trace: no wall-clock read otherwise.
        let exporter = self.spans.load_full();
        let traced = exporter.as_ref().and(call.state().trace).map(|parent| {
            (
                (parent.trace_id, parent.span_id),
                std::time::SystemTime::now(),
            )
        });
        let started = Instant::now();
        let mut unfinished = Unfinished {
            recorder: self,
            call,
            started,
            ended: false,
        };
        let (result, instance) = attempt.await;
        unfinished.ended = true;
        drop(unfinished);
        let elapsed = started.elapsed();
        let outcome = Outcome::of(&result);
        let attempt = call.record(outcome, &result);
        let label = outcome.label();
        self.record(outcome, elapsed.as_secs_f64());
        let latency_ms = elapsed.as_secs_f64() * 1000.0;
        let instance = instance.map_or_else(|| Arc::from(""), |i| i.addr.clone());
        if let (Some(exporter), Some(((trace_id, parent), wall_start))) = (exporter, traced) {
            let mut attributes = vec![
                ("upstream", otlp::Value::Str(self.upstream.to_string())),
                ("server.address", otlp::Value::Str(instance.to_string())),
                ("gateway.attempt", otlp::Value::Int(i64::from(attempt))),
                ("gateway.outcome", otlp::Value::Str(label.to_string())),
            ];
            if let Ok(r) = &result {
                attributes.push((
                    "http.response.status_code",
                    otlp::Value::Int(i64::from(r.status().as_u16())),
                ));
            }
            exporter.record(SpanRecord {
                trace_id,
                span_id: rand::random(),
                parent_id: Some(parent),
                name: format!("upstream {}", self.upstream),
                kind: otlp::Kind::Client,
                start: wall_start,
                end: wall_start + elapsed,
                attributes,
                error: outcome.breaker_failure() == Some(true),
            });
        }
        match outcome.breaker_failure() {
            Some(true) => {
                // The cause (refused, DNS, connect timeout...) tells a restart from an outage.
                let error = result.as_ref().err().and_then(failure_cause);
                tracing::info!(upstream = %self.upstream, %instance, attempt, outcome = label, latency_ms, error, "upstream attempt")
            }
            Some(false) | None => {
                tracing::debug!(upstream = %self.upstream, %instance, attempt, outcome = label, latency_ms, "upstream attempt")
            }
        }
        result
    }
}
