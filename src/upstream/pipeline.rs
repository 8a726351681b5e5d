//! The pipeline for one upstream, composed in ONE function, [`Pipeline::new`]: the pooled
//! client, the layers around it, the bulkhead and the breaker's health probe. Every call to an
//! upstream goes through its pipeline's [`Pipeline::send`]: proxied requests and token
//! verification alike, so every call is bounded, retried, counted by the breaker and measured
//! the same way.

use std::sync::Arc;

use http::Extensions;
use reqwest::Request;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use tokio::time::Instant;

use super::attempt::{Attempt, RecordAttempt, SpanSink};
use super::balancer::Balancer;
use super::breaker::{any_instance_healthy, Breaker, CallPermit};
use super::bulkhead::Bulkhead;
use super::call::{
    error_chain, instant_after, Call, CallOptions, Caller, Delivered, Outcome, UpstreamError,
    UpstreamRequest,
};
use super::client::{build_client, unused_base};
use super::concurrency::{ConcurrencyLimit, Fleet};
use super::discovery::{self, Resolve, SystemResolver, Target};
use super::instances::InstanceSet;
use super::retry::{backoff_policy, RetryBudget, RetryLayer};
use crate::config::UpstreamConfig;
use crate::observability::alive::AliveGauge;
use crate::observability::otlp::Exporter;

/// One upstream's resilience stack around its pooled client.
pub struct Pipeline {
    /// The upstream's name: the label of its metrics, logs and `/admin` entries.
    upstream: Arc<str>,
    /// The layers around the pooled client, composed in [`Pipeline::new`].
    client: ClientWithMiddleware,
    /// Shared with the breaker layer; `/admin` and the metrics read its state.
    breaker: Arc<Breaker>,
    /// Every call deposits, every retry withdraws (shared with the retry layer).
    budget: Arc<RetryBudget>,
    /// Used when the route sets no `max_retries` of its own.
    max_retries: u32,
    /// The instances the balancer chooses from, kept current by discovery.
    instances: Arc<InstanceSet>,
    /// The bulkhead: calls in flight, hence pooled connections, to this upstream at most
    /// `max_connections`; more wait, within their deadline, for a free slot. Without it, 1,000
    /// concurrent clients meant 1,000 upstream connections (and their buffers and tasks). No
    /// client holds more than `max_client_share` of them.
    bulkhead: Bulkhead,
    /// The limit learnt from latency under the bulkhead (`[upstreams.X.concurrency]`), the
    /// sum of the instances' own limits: a call beyond it waits only briefly, then is refused
    /// as `Overloaded`, so that a spike queues neither here nor in the upstream's backlog.
    /// `None` when disabled.
    limit: Option<ConcurrencyLimit>,
    /// Where the attempt layer sends its spans.
    spans: SpanSink,
    /// Counts this pipeline in `gateway_upstream_pipelines_alive{upstream}`: one a reload
    /// replaced must go once its calls are done.
    _alive: AliveGauge,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// Everything an upstream has, composed here and nowhere else, with the system resolver
    /// for host names (see [`Pipeline::with_resolver`]).
    pub fn new(name: &str, cfg: &UpstreamConfig) -> Result<Pipeline, String> {
        Pipeline::in_fleet(name, cfg, Fleet::single())
    }

    /// [`Pipeline::new`] on one of `fleet`'s gateway replicas, which share the upstream's
    /// `initial_limit` (see `concurrency/fleet.rs`).
    pub fn in_fleet(
        name: &str,
        cfg: &UpstreamConfig,
        fleet: Arc<Fleet>,
    ) -> Result<Pipeline, String> {
        Pipeline::with_resolver(name, cfg, Arc::new(SystemResolver), fleet)
    }

    /// [`Pipeline::new`] with the resolver that turns host names into instances. The
    /// deadline and the bulkhead are not middleware: they wrap the whole stack in
    /// [`Pipeline::send`], where the call's options are known. Then, outermost first:
    pub fn with_resolver(
        name: &str,
        cfg: &UpstreamConfig,
        resolver: Arc<dyn Resolve>,
        fleet: Arc<Fleet>,
    ) -> Result<Pipeline, String> {
        let upstream: Arc<str> = Arc::from(name);
        let client_cfg = cfg.clone();
        let limit = cfg.concurrency.enabled.then(|| {
            ConcurrencyLimit::in_fleet(name, &cfg.concurrency, cfg.max_connections, fleet)
        });
        // Each instance learns its own limit; the upstream admits calls against their sum.
        let instances = Arc::new(
            InstanceSet::new(
                name,
                cfg,
                Box::new(move |endpoint| build_client(&client_cfg, endpoint)),
            )
            .limited_by(limit.clone()),
        );
        let breaker = Arc::new(Breaker::new(name, &cfg.breaker));
        let budget = Arc::new(RetryBudget::new(&cfg.retry));
        let spans: SpanSink = Arc::default();
        let client = ClientBuilder::new(unused_base())
            // Retry is outside the breaker so that each attempt asks the breaker again (an
            // outage stops retries at once) and a refusal is not retried. It checks the
            // deadline and the budget before every wait, sends retries and hedges to another
            // instance when there is one, and hedges the first attempt of routes that ask.
            .with(RetryLayer {
                backoff: backoff_policy(&cfg.retry),
                budget: budget.clone(),
                upstream: upstream.clone(),
                retry_after_cap: cfg.retry.retry_after_cap.0,
                instances: instances.clone(),
            })
            // Everything one attempt does, in one layer (`attempt.rs`): its record, the
            // service breaker's admission, the balancer's choice, the attempt timeout and the
            // send on the chosen instance's client. Below retry, so that each attempt, not
            // each call, is one record and asks the breaker again.
            .with(Attempt {
                record: RecordAttempt {
                    upstream: upstream.clone(),
                    spans: spans.clone(),
                },
                breaker: breaker.clone(),
                balancer: Balancer::new(instances.clone(), cfg.balancer),
            })
            .build();
        let probe_interval = cfg
            .breaker
            .probe_path
            .as_ref()
            .map(|_| cfg.breaker.probe_interval.0);
        discovery::start(
            &instances,
            Target::parse_all(&cfg.targets()),
            resolver,
            cfg.discovery_interval.0,
            probe_interval,
        );
        // While the breaker is open, its health probe asks the instances whether any is back
        // (only with `breaker.probe_path`).
        if probe_interval.is_some() {
            breaker.set_health_probe(any_instance_healthy(
                Arc::downgrade(&instances),
                cfg.breaker.probe_interval.0,
            ));
        }
        Ok(Pipeline {
            upstream,
            client,
            breaker,
            budget,
            max_retries: cfg.retry.max_retries,
            instances,
            bulkhead: Bulkhead::new(name, cfg.max_connections, cfg.max_client_share),
            limit,
            spans,
            _alive: AliveGauge::pipeline(name),
        })
    }

    /// Takes over the breaker state and the instances' health of `old`, the pipeline this one
    /// replaces in a reload that changed the upstream's settings but not its addresses (the
    /// caller checks that): an outage in progress stays an outage, an ejected instance stays
    /// out, until the same moment.
    pub fn inherit_health(&self, old: &Pipeline) {
        self.breaker.inherit(&old.breaker);
        self.instances.inherit(&old.instances);
    }

    /// The upstream's instances, for `/admin/upstreams`.
    pub fn instances(&self) -> &InstanceSet {
        &self.instances
    }

    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    /// Sends this upstream's attempt spans to `exporter` (none: no spans).
    pub fn export_spans_to(&self, exporter: Option<Arc<Exporter>>) {
        self.spans.store(exporter);
    }

    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// The slots, for `/admin/upstreams` (`in_flight`).
    pub fn bulkhead(&self) -> &Bulkhead {
        &self.bulkhead
    }

    /// The adaptive limit, for `/admin/upstreams` (`None`: disabled).
    pub fn concurrency(&self) -> Option<&ConcurrencyLimit> {
        self.limit.as_ref()
    }

    /// Sends `req` (its body must be buffered, so that retries can clone it) through the stack.
    ///
    /// Any upstream answer, 5xx included, is `Ok` (the client gets it untouched); `Err` means
    /// there is no answer to give: [`UpstreamError::CircuitOpen`] without contacting the
    /// upstream, [`UpstreamError::Timeout`] when an attempt or the deadline ran out,
    /// [`UpstreamError::Unavailable`] when the connection failed on the last attempt.
    ///
    /// Bounded by the slots only, not by the adaptive limit: a WebSocket handshake (bounded
    /// by the `[websocket]` connection caps; a reconnect storm after a socket restart must
    /// not be shed by a limit learnt from HTTP calls), or a caller of the pipeline alone. A
    /// proxied request or a token verification is sent `limited` ([`UpstreamRequest`]).
    pub async fn send(
        &self,
        req: Request,
        options: CallOptions,
    ) -> Result<Delivered, UpstreamError> {
        self.send_request(UpstreamRequest {
            request: req,
            options,
            caller: Caller::default(),
            limited: false,
            trace: None,
        })
        .await
    }

    /// [`Pipeline::send`] on behalf of `caller`: counted against its client's share of the
    /// slots ([`UpstreamError::ClientShare`] at once when it already holds or waits for its
    /// share), and under the adaptive limit at its priority ([`UpstreamError::Overloaded`]
    /// after a short wait). Neither refusal contacts the upstream or counts for the breaker
    /// and the retry budget.
    pub async fn send_for(
        &self,
        caller: Caller,
        req: Request,
        options: CallOptions,
    ) -> Result<Delivered, UpstreamError> {
        self.send_request(UpstreamRequest {
            request: req,
            options,
            caller,
            limited: true,
            trace: None,
        })
        .await
    }

    /// Sends a request built for this upstream (see [`UpstreamRequest`]): for its caller (its
    /// client's share, and its priority under the adaptive limit when `limited`), with its
    /// attempts' spans in its trace.
    pub async fn send_request(&self, req: UpstreamRequest) -> Result<Delivered, UpstreamError> {
        let UpstreamRequest {
            request: req,
            options,
            caller,
            limited,
            trace,
        } = req;
        let entry = self
            .bulkhead
            .enter(caller.client)
            .map_err(|e| UpstreamError::ClientShare { limit: e.limit })?;
        let deadline = instant_after(Instant::now(), options.deadline);
        // Outside the deadline's timeout below: a refusal here is no timeout (the wait is
        // bounded by `queue_interval`, and counts against the deadline all the same).
        let limit_permit = match self.limit.as_ref().filter(|_| limited) {
            Some(limit) => Some(limit.acquire(caller.priority).await.map_err(|refused| {
                UpstreamError::Overloaded {
                    cause: refused.cause,
                    limit: refused.limit,
                }
            })?),
            None => None,
        };
        // Every call earns retry budget, whether or not it needs a retry.
        self.budget.deposit();
        let call = Call::in_trace(
            deadline,
            &options,
            options.max_retries.unwrap_or(self.max_retries),
            trace,
            limit_permit.as_ref().map(|_| caller.latency_class),
        );
        let permit = CallPermit::default();
        let mut extensions = Extensions::new();
        extensions.insert(call.clone());
        extensions.insert(permit.clone());
        // The deadline is the outermost bound: nothing below may outlive it, waiting for a
        // connection slot included. The attempt timeout is clamped to it too, so this rarely
        // fires during an attempt; it is the backstop.
        let result = tokio::time::timeout_at(deadline, async {
            let slot = entry.acquire().await;
            let response = self
                .client
                .execute_with_extensions(req, &mut extensions)
                .await;
            (response, slot)
        })
        .await;
        let attempts = call.attempts();
        // Each attempt fed its round trip to its instance's limit (balancer/layer.rs). The
        // upstream's slot counts calls waiting for an answer: it goes back with the response
        // headers. The body, however slowly a client reads it, holds a bulkhead slot
        // (`max_connections`), not this.
        drop(limit_permit);
        // One breaker record per call, for its final attempt (a timeout if the deadline cut
        // the call).
        permit.finish(match &result {
            Ok(_) => call.last_outcome().and_then(Outcome::breaker_failure),
            Err(_elapsed) => Outcome::Timeout.breaker_failure(),
        });
        match result {
            Ok((Ok(response), slot)) => Ok(Delivered {
                response,
                attempts,
                slot,
            }),
            Ok((Err(e), _)) => Err(match call.last_outcome() {
                Some(Outcome::CircuitOpen(retry_after)) => {
                    UpstreamError::CircuitOpen { retry_after }
                }
                Some(Outcome::Timeout) => UpstreamError::Timeout { attempts },
                Some(
                    Outcome::ConnectError
                    | Outcome::Reset
                    | Outcome::Internal
                    | Outcome::Status(_)
                    | Outcome::Abandoned,
                )
                | None => UpstreamError::Unavailable {
                    attempts,
                    detail: call.take_last_error().unwrap_or_else(|| error_chain(&e)),
                },
            }),
            Err(_elapsed) => Err(UpstreamError::Timeout { attempts }),
        }
    }
}
