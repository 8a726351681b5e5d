//! An upstream is a set of instances: every address its configured URLs name (a list of
//! hosts, or a name that resolves to several addresses, re-resolved by `discovery.rs`).
//!
//! Each [`Instance`] has its own pooled client (pinned to its address, so `Host` and TLS SNI
//! still carry the configured name), its load (peak-EWMA latency and calls in flight, which
//! the balancer compares) and its passive health: after `consecutive_failures` failed
//! attempts in a row, or a failure rate over a window, it is ejected for a time that doubles
//! with each re-ejection, never more than `max_ejected_percent` of the set at once. An
//! instance whose attempt failed (503 and other 5xx, refused, reset, timed out) or that
//! answered 429 is also passed over for `bias_duration` while others can serve (linkerd's
//! load biaser idea): a fast error must not look like a fast instance.
//!
//! The service-level breaker (`breaker.rs`) sees calls, not instances: one bad instance of
//! three is ejected here and retried around, so the service's calls keep succeeding and its
//! breaker stays closed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use rand::Rng;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use super::call::{instant_after, Outcome};
use super::window::SlidingWindow;
use crate::config::{BalancerKind, EjectionConfig, UpstreamConfig};

/// How long a latency sample counts: the estimate decays toward zero over this, so an
/// instance that was slow gets tried again (tower's and linkerd's default decay).
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// The latency assumed for an instance with no samples yet, so a new instance is neither
/// flooded (zero) nor starved (large).
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// A latency estimate without a new sample for this long no longer steers the balancer.
const STALE_AFTER: Duration = Duration::from_secs(1);

/// Where an instance is: the scheme, host and port a request URL must carry for it, and the
/// address its client connects to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Endpoint {
    pub(crate) scheme: String,
    /// The configured host (a name or an IP literal): what `Host` and SNI say.
    pub(crate) host: String,
    pub(crate) port: u16,
    /// The address connected to; `None` when `host` is an IP literal (nothing to pin).
    pub(crate) pinned: Option<std::net::SocketAddr>,
}

impl Endpoint {
    /// `10.0.0.5:8003` for a resolved name, `host:port` otherwise: the name of the instance in
    /// `/admin`, logs and the attempt log.
    fn display(&self) -> String {
        match self.pinned {
            Some(addr) => addr.to_string(),
            None => format!("{}:{}", self.host, self.port),
        }
    }
}

/// Peak-EWMA latency: a slower sample replaces the estimate at once, a faster one pulls it
/// down gradually; with no samples it decays toward zero (see [`EWMA_DECAY`]).
#[derive(Debug)]
struct Ewma {
    rtt_ns: f64,
    at: Instant,
    /// No sample yet: the balancer then assumes the other candidate's latency, so a new
    /// instance neither waits for the others' estimates to decay (starved) nor takes
    /// everything (flooded: calls in flight still count).
    sampled: bool,
}

impl Ewma {
    fn decayed(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_nanos() as f64;
        self.rtt_ns * (-elapsed / EWMA_DECAY.as_nanos() as f64).exp()
    }

    fn sample(&mut self, rtt: Duration, now: Instant) {
        self.sampled = true;
        let rtt = rtt.as_nanos() as f64;
        let current = self.decayed(now);
        self.rtt_ns = if rtt > current {
            rtt
        } else {
            let elapsed = now.saturating_duration_since(self.at).as_nanos() as f64;
            let weight = (-elapsed / EWMA_DECAY.as_nanos() as f64).exp();
            current * weight + rtt * (1.0 - weight)
        };
        self.at = now;
    }
}

/// An instance's health and history, behind one short lock.
#[derive(Debug)]
struct Health {
    ewma: Ewma,
    consecutive_failures: u32,
    /// (attempts, failures) over the ejection window.
    window: SlidingWindow,
    /// Out of rotation until then.
    ejected_until: Option<Instant>,
    /// Ejections in a row: the next one lasts `base_time * 2^(ejections)`.
    ejections: u32,
    /// When the last ejection ended, to start the doubling afresh after a long healthy spell.
    returned_at: Option<Instant>,
    /// Passed over (429/503) until then.
    biased_until: Option<Instant>,
    successes: u64,
    failures: u64,
}

impl Health {
    /// Back in rotation with a clean slate (its time ran out, or its probe passed); the
    /// doubling of the next ejection counts from `now`.
    fn end_ejection(&mut self, now: Instant) {
        self.ejected_until = None;
        self.consecutive_failures = 0;
        self.biased_until = None;
        self.window.clear();
        self.returned_at = Some(now);
    }
}

/// One address of an upstream.
#[derive(Debug)]
pub struct Instance {
    /// Unique within the upstream for its lifetime: what "already tried" compares.
    pub(crate) id: u64,
    /// Shown in `/admin/upstreams` and named in the attempt log.
    pub(crate) addr: Arc<str>,
    pub(crate) endpoint: Endpoint,
    /// Its own pool, pinned to its address.
    pub(crate) client: reqwest::Client,
    /// `GET` here must answer 2xx for an ejected instance to return (`breaker.probe_path`).
    pub(crate) probe_url: Option<reqwest::Url>,
    in_flight: AtomicU32,
    /// Discovery no longer lists it: no new calls; calls in flight finish.
    draining: AtomicBool,
    health: Mutex<Health>,
}

/// What an instance is doing, for `/admin` and the endpoint gauge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    Healthy,
    Ejected,
    Draining,
}

impl InstanceState {
    const ALL: [InstanceState; 3] = [
        InstanceState::Healthy,
        InstanceState::Ejected,
        InstanceState::Draining,
    ];
    fn label(self) -> &'static str {
        match self {
            InstanceState::Healthy => "healthy",
            InstanceState::Ejected => "ejected",
            InstanceState::Draining => "draining",
        }
    }
}

/// One instance as `/admin/upstreams` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct InstanceSnapshot {
    pub address: String,
    pub state: InstanceState,
    /// Seconds until an ejected instance may return (with a probe: once the probe passes).
    pub ejected_for_seconds: Option<f64>,
    /// Passed over after a 429/503 for this many more seconds.
    pub biased_for_seconds: Option<f64>,
    pub in_flight: u32,
    pub ewma_latency_ms: f64,
    pub successes: u64,
    pub failures: u64,
}

/// Decrements the instance's in-flight count however the attempt ends (cancelled included).
pub(crate) struct InFlight(Arc<Instance>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Instance {
    fn new(
        id: u64,
        endpoint: Endpoint,
        client: reqwest::Client,
        probe_url: Option<reqwest::Url>,
        window: Duration,
    ) -> Instance {
        let now = Instant::now();
        Instance {
            id,
            addr: Arc::from(endpoint.display()),
            endpoint,
            client,
            probe_url,
            in_flight: AtomicU32::new(0),
            draining: AtomicBool::new(false),
            health: Mutex::new(Health {
                ewma: Ewma {
                    rtt_ns: DEFAULT_RTT.as_nanos() as f64,
                    at: now,
                    sampled: false,
                },
                consecutive_failures: 0,
                window: SlidingWindow::new(window),
                ejected_until: None,
                ejections: 0,
                returned_at: None,
                biased_until: None,
                successes: 0,
                failures: 0,
            }),
        }
    }

    fn health(&self) -> MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The decayed peak-EWMA latency, if the instance has answered recently. An estimate
    /// older than [`STALE_AFTER`] counts as none (the other candidate's latency is assumed):
    /// one slow answer would otherwise keep an instance out of every P2C comparison while its
    /// estimate decays for tens of seconds, and an instance that gets no traffic never gets a
    /// fresh sample (seen in chaos experiment 13: a healthy instance starved for 12 s).
    fn latency(&self, now: Instant) -> Option<f64> {
        let h = self.health();
        (h.ewma.sampled && now.saturating_duration_since(h.ewma.at) < STALE_AFTER)
            .then(|| h.ewma.decayed(now))
    }

    /// The balancer's cost: latency x (calls in flight + 1), with `assumed` as the latency of
    /// an instance that has not answered yet.
    fn cost(&self, latency: Option<f64>, assumed: f64) -> f64 {
        latency.unwrap_or(assumed) * f64::from(self.in_flight.load(Ordering::Relaxed) + 1)
    }

    /// Serves traffic now: not draining, not ejected (an ejection that ran out ends here,
    /// with the probe's consent when there is one); passed over after a failure or 429
    /// unless `biased_ok`.
    fn available(&self, now: Instant, biased_ok: bool) -> Availability {
        if self.is_draining() {
            return Availability::No;
        }
        let mut h = self.health();
        if let Some(until) = h.ejected_until {
            // With a probe, only a passing probe ends an ejection (`probed`): real requests
            // never rediscover a dead instance.
            if now < until || self.probe_url.is_some() {
                return Availability::No;
            }
            h.end_ejection(now);
            return Availability::Returned;
        }
        match h.biased_until {
            Some(until) if now < until && !biased_ok => Availability::Biased,
            _ => Availability::Yes,
        }
    }

    fn snapshot(&self, now: Instant) -> InstanceSnapshot {
        let h = self.health();
        let ejected = h
            .ejected_until
            .map(|u| u.saturating_duration_since(now).as_secs_f64());
        InstanceSnapshot {
            address: self.addr.to_string(),
            state: if self.is_draining() {
                InstanceState::Draining
            } else if ejected.is_some() {
                InstanceState::Ejected
            } else {
                InstanceState::Healthy
            },
            ejected_for_seconds: ejected,
            biased_for_seconds: h
                .biased_until
                .filter(|u| *u > now)
                .map(|u| u.saturating_duration_since(now).as_secs_f64()),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            ewma_latency_ms: h.ewma.decayed(now) / 1e6,
            successes: h.successes,
            failures: h.failures,
        }
    }
}

enum Availability {
    No,
    /// In rotation, but passed over while others can serve.
    Biased,
    Yes,
    /// Yes, and it just came back from an ejection (the gauges change).
    Returned,
}

/// How one attempt's outcome counts for its instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Success,
    Failure,
    /// Nothing to learn (our own error, a cancelled attempt).
    Neutral,
}

/// The verdict, and whether to pass the instance over for a while: after a failure (a fast
/// error must not look like a fast instance, and the next calls should not all land on it
/// while it collects the failures that eject it) and after a 429 (overloaded, not broken).
fn verdict(outcome: Outcome) -> (Verdict, bool) {
    let v = match outcome.breaker_failure() {
        Some(true) => Verdict::Failure,
        Some(false) => Verdict::Success,
        None => Verdict::Neutral,
    };
    let overloaded = matches!(outcome, Outcome::Status(s) if s.as_u16() == 429);
    (v, v == Verdict::Failure || overloaded)
}

/// Builds the pooled client of a new instance (the upstream's settings, pinned to its address).
pub(crate) type MakeClient =
    Box<dyn Fn(&Endpoint) -> reqwest::Result<reqwest::Client> + Send + Sync>;

/// The instances of `list` not in `tried`, or all of `list` when it has been tried whole.
fn untried_first<'a>(list: Vec<&'a Arc<Instance>>, tried: &[u64]) -> Vec<&'a Arc<Instance>> {
    let untried: Vec<&Arc<Instance>> = list
        .iter()
        .copied()
        .filter(|i| !tried.contains(&i.id))
        .collect();
    if untried.is_empty() {
        list
    } else {
        untried
    }
}

/// The instances of one upstream and the rules for choosing and ejecting them.
pub struct InstanceSet {
    upstream: Arc<str>,
    /// The instances in rotation (draining ones are not listed), swapped whole by discovery.
    active: ArcSwap<Vec<Arc<Instance>>>,
    /// Removed from rotation with calls still in flight: shown until they finish.
    draining: Mutex<Vec<Arc<Instance>>>,
    kind: BalancerKind,
    ejection: EjectionConfig,
    bias: Duration,
    next_id: AtomicU64,
    round_robin: AtomicUsize,
    /// Bumped whenever the set changes; a call that found no instance before the first
    /// resolution waits for it.
    version: watch::Sender<u64>,
    /// The names have been resolved at least once (successfully or not).
    resolved: AtomicBool,
    /// Builds the pooled client of a new instance.
    make_client: MakeClient,
    /// `scheme://host:port{prefix}{probe_path}` of an endpoint, for the ejected-instance probe.
    probe_path: Option<String>,
    path_prefix: String,
}

impl std::fmt::Debug for InstanceSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstanceSet")
            .field("upstream", &self.upstream)
            .field("instances", &self.active.load().len())
            .finish_non_exhaustive()
    }
}

impl InstanceSet {
    pub(crate) fn new(
        upstream: &str,
        cfg: &UpstreamConfig,
        make_client: MakeClient,
    ) -> InstanceSet {
        let path_prefix = reqwest::Url::parse(cfg.primary_url())
            .map(|u| u.path().trim_end_matches('/').to_string())
            .unwrap_or_default();
        InstanceSet {
            upstream: Arc::from(upstream),
            active: ArcSwap::from_pointee(Vec::new()),
            draining: Mutex::new(Vec::new()),
            kind: cfg.balancer,
            ejection: cfg.ejection.clone(),
            bias: cfg.bias_duration.0,
            next_id: AtomicU64::new(0),
            round_robin: AtomicUsize::new(0),
            version: watch::channel(0).0,
            resolved: AtomicBool::new(false),
            make_client,
            probe_path: cfg.breaker.probe_path.clone(),
            path_prefix,
        }
    }

    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    /// The instances in rotation now.
    pub(crate) fn active(&self) -> Arc<Vec<Arc<Instance>>> {
        self.active.load_full()
    }

    /// Replaces the set with `endpoints`: known ones keep their instance (load, health, pool),
    /// new ones get one, vanished ones drain. Marks the set resolved.
    pub(crate) fn update(&self, endpoints: &[Endpoint]) {
        let current = self.active.load_full();
        let mut by_endpoint: HashMap<&Endpoint, &Arc<Instance>> =
            current.iter().map(|i| (&i.endpoint, i)).collect();
        let mut next = Vec::with_capacity(endpoints.len());
        let mut added = Vec::new();
        for e in endpoints {
            if let Some(known) = by_endpoint.remove(e) {
                next.push(known.clone());
                continue;
            }
            match (self.make_client)(e) {
                Ok(client) => {
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    let probe_url = self.probe_path.as_ref().and_then(|p| {
                        reqwest::Url::parse(&format!(
                            "{}://{}:{}{}{p}",
                            e.scheme, e.host, e.port, self.path_prefix
                        ))
                        .ok()
                    });
                    let instance = Arc::new(Instance::new(
                        id,
                        e.clone(),
                        client,
                        probe_url,
                        self.ejection.window.0,
                    ));
                    if self.is_resolved() && instance.probe_url.is_some() {
                        // Found after the start (scaled up, restarted): a container is in
                        // DNS before it listens, so with a probe it takes traffic once the
                        // probe answers (the discovery task probes it at once), never
                        // collecting failures (and an ejection) while it starts.
                        instance.health().ejected_until = Some(Instant::now());
                    }
                    added.push(instance.addr.clone());
                    next.push(instance);
                }
                Err(err) => {
                    tracing::error!(upstream = %self.upstream, instance = %e.display(), error = %err, "cannot build a client for the instance; left out")
                }
            }
        }
        let removed: Vec<Arc<Instance>> = by_endpoint.into_values().cloned().collect();
        for r in &removed {
            r.draining.store(true, Ordering::Relaxed);
        }
        let changed = !added.is_empty() || !removed.is_empty();
        if changed {
            tracing::info!(
                upstream = %self.upstream,
                added = ?added,
                removed = ?removed.iter().map(|i| i.addr.to_string()).collect::<Vec<_>>(),
                instances = next.len(),
                "upstream instances changed"
            );
            self.active.store(Arc::new(next));
            let mut draining = self.lock_draining();
            draining.extend(removed);
        }
        self.prune_draining();
        self.resolved.store(true, Ordering::Release);
        self.version.send_modify(|v| *v += 1);
        self.report();
    }

    /// Marks the set resolved even though nothing could be resolved (callers stop waiting).
    pub(crate) fn resolution_failed(&self) {
        if !self.resolved.swap(true, Ordering::AcqRel) {
            self.version.send_modify(|v| *v += 1);
        }
    }

    fn lock_draining(&self) -> MutexGuard<'_, Vec<Arc<Instance>>> {
        self.draining.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets drained instances once their last call has finished.
    fn prune_draining(&self) {
        self.lock_draining()
            .retain(|i| i.in_flight.load(Ordering::Relaxed) > 0);
    }

    /// Waits (the caller bounds it) until the names have been resolved once.
    pub(crate) async fn wait_resolved(&self) {
        let mut rx = self.version.subscribe();
        while !self.resolved.load(Ordering::Acquire) {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    pub(crate) fn is_resolved(&self) -> bool {
        self.resolved.load(Ordering::Acquire)
    }

    /// Whether an instance not in `tried` could take an attempt now.
    pub(crate) fn has_untried(&self, tried: &[u64]) -> bool {
        let now = Instant::now();
        self.active.load().iter().any(|i| {
            !tried.contains(&i.id)
                && matches!(
                    i.available(now, true),
                    Availability::Yes | Availability::Returned
                )
        })
    }

    /// The instance for the next attempt: among those in rotation and not passed over, the
    /// ones this call has not tried yet when there are any (a retry goes elsewhere); by
    /// power of two choices on cost, or in turn. With none healthy (every one ejected or
    /// passed over, past the ejection cap) the whole set is used: a panic, as Envoy calls it.
    pub(crate) fn pick(&self, tried: &[u64]) -> Option<Arc<Instance>> {
        let all = self.active.load();
        let now = Instant::now();
        if all.len() == 1 {
            // One instance: nothing to choose, and an ejected one is better than none.
            let only = &all[0];
            if matches!(only.available(now, true), Availability::Returned) {
                self.report();
            }
            return Some(only.clone());
        }
        let mut returned = false;
        let mut healthy: Vec<&Arc<Instance>> = Vec::with_capacity(all.len());
        let mut biased: Vec<&Arc<Instance>> = Vec::new();
        for i in all.iter() {
            match i.available(now, false) {
                Availability::No => {}
                Availability::Biased => biased.push(i),
                Availability::Yes => healthy.push(i),
                Availability::Returned => {
                    returned = true;
                    healthy.push(i);
                }
            }
        }
        if returned {
            self.report();
        }
        // Untried first, then any; healthy first, then passed-over ones, then (a panic,
        // as Envoy calls it) everything not draining, ejected ones included.
        let candidates = if !healthy.is_empty() {
            untried_first(healthy, tried)
        } else if !biased.is_empty() {
            untried_first(biased, tried)
        } else {
            untried_first(all.iter().filter(|i| !i.is_draining()).collect(), tried)
        };
        match candidates.len() {
            0 => None,
            1 => Some(candidates[0].clone()),
            n => Some(match self.kind {
                BalancerKind::RoundRobin => {
                    candidates[self.round_robin.fetch_add(1, Ordering::Relaxed) % n].clone()
                }
                BalancerKind::P2cEwma => {
                    let mut rng = rand::rng();
                    let a = rng.random_range(0..n);
                    let mut b = rng.random_range(0..n - 1);
                    if b >= a {
                        b += 1;
                    }
                    let (x, y) = (candidates[a], candidates[b]);
                    let (lx, ly) = (x.latency(now), y.latency(now));
                    let default = DEFAULT_RTT.as_nanos() as f64;
                    let (cx, cy) = (
                        x.cost(lx, ly.unwrap_or(default)),
                        y.cost(ly, lx.unwrap_or(default)),
                    );
                    if cy < cx {
                        y.clone()
                    } else {
                        x.clone()
                    }
                }
            }),
        }
    }

    /// Learns from one finished attempt on `instance`: its latency, its health, and whether
    /// to eject it or pass it over for a while.
    pub(crate) fn finish(&self, instance: &Instance, outcome: Outcome, rtt: Duration) {
        let (verdict, biased) = verdict(outcome);
        let now = Instant::now();
        let eject = {
            let mut h = instance.health();
            match verdict {
                Verdict::Neutral => return,
                Verdict::Success => {
                    h.ewma.sample(rtt, now);
                    h.consecutive_failures = 0;
                    h.window.add(now, 1, 0);
                    h.successes += 1;
                }
                Verdict::Failure => {
                    // A failure's latency says nothing about the instance's speed (a refused
                    // connection is fast); its health does the steering.
                    h.consecutive_failures = h.consecutive_failures.saturating_add(1);
                    h.window.add(now, 1, 1);
                    h.failures += 1;
                }
            }
            if biased {
                h.biased_until = Some(instant_after(now, self.bias));
            }
            let (calls, failures) = h.window.totals(now);
            verdict == Verdict::Failure
                && self.ejection.enabled
                && h.ejected_until.is_none()
                && (h.consecutive_failures >= self.ejection.consecutive_failures
                    || (calls >= u64::from(self.ejection.min_calls)
                        && failures as f64 >= self.ejection.failure_rate * calls as f64))
        };
        if eject {
            self.eject(instance, now);
        }
    }

    /// Ejects `instance` unless that would put more than `max_ejected_percent` of the set out.
    fn eject(&self, instance: &Instance, now: Instant) {
        let all = self.active.load();
        let ejected = all
            .iter()
            .filter(|i| i.health().ejected_until.is_some_and(|u| u > now))
            .count();
        let allowed = all.len() * self.ejection.max_ejected_percent as usize / 100;
        if ejected + 1 > allowed {
            tracing::warn!(upstream = %self.upstream, instance = %instance.addr, ejected, instances = all.len(),
                "instance failing but not ejected: max_ejected_percent reached");
            return;
        }
        let time = {
            let mut h = instance.health();
            // A long healthy spell since the last return starts the doubling afresh.
            if h.returned_at
                .is_some_and(|r| now.saturating_duration_since(r) > self.ejection.max_time.0)
            {
                h.ejections = 0;
            }
            let doublings = h.ejections.min(31);
            let time = self
                .ejection
                .base_time
                .0
                .checked_mul(1u32 << doublings)
                .map_or(self.ejection.max_time.0, |t| {
                    t.min(self.ejection.max_time.0)
                });
            h.ejections = h.ejections.saturating_add(1);
            h.ejected_until = Some(instant_after(now, time));
            time
        };
        metrics::counter!("gateway_upstream_ejections_total", "upstream" => self.upstream.clone())
            .increment(1);
        tracing::warn!(upstream = %self.upstream, instance = %instance.addr, eject_ms = time.as_millis() as u64,
            "instance ejected");
        self.report();
    }

    /// Ejected instances whose time is over and that wait for the probe's consent.
    pub(crate) fn awaiting_probe(&self) -> Vec<Arc<Instance>> {
        let now = Instant::now();
        self.active
            .load()
            .iter()
            .filter(|i| i.probe_url.is_some() && i.health().ejected_until.is_some_and(|u| u <= now))
            .cloned()
            .collect()
    }

    /// The probe answered for `instance`: with 2xx it is back in rotation now (not at the
    /// next pick, so `/admin` and the gauges say so at once).
    pub(crate) fn probed(&self, instance: &Instance, healthy: bool) {
        if !healthy {
            return;
        }
        {
            let mut h = instance.health();
            if h.ejected_until.is_none() {
                return;
            }
            h.end_ejection(Instant::now());
        }
        tracing::info!(upstream = %self.upstream, instance = %instance.addr, "instance passed its probe; back in rotation");
        self.report();
    }

    /// Every instance, draining ones included, for `/admin/upstreams`.
    pub fn snapshot(&self) -> Vec<InstanceSnapshot> {
        let now = Instant::now();
        self.prune_draining();
        let mut list: Vec<InstanceSnapshot> =
            self.active.load().iter().map(|i| i.snapshot(now)).collect();
        list.extend(self.lock_draining().iter().map(|i| i.snapshot(now)));
        list
    }

    /// Sets `gateway_upstream_endpoints{upstream,state}` from the current set.
    pub(crate) fn report(&self) {
        let snapshot = self.snapshot();
        for state in InstanceState::ALL {
            let n = snapshot.iter().filter(|s| s.state == state).count();
            metrics::gauge!("gateway_upstream_endpoints",
                "upstream" => self.upstream.clone(), "state" => state.label())
            .set(n as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn set(cfg: &UpstreamConfig, n: u16) -> InstanceSet {
        let s = InstanceSet::new("t", cfg, Box::new(|_| Ok(reqwest::Client::new())));
        s.update(&endpoints(0..n));
        s
    }

    fn endpoints(ports: std::ops::Range<u16>) -> Vec<Endpoint> {
        ports
            .map(|p| Endpoint {
                scheme: "http".into(),
                host: "127.0.0.1".into(),
                port: 9000 + p,
                pinned: None,
            })
            .collect()
    }

    fn config() -> UpstreamConfig {
        UpstreamConfig {
            url: "http://127.0.0.1:9000".into(),
            ..UpstreamConfig::default()
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    const OK: Outcome = Outcome::Status(StatusCode::OK);

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_takes_a_slow_sample_at_once_and_forgets_it_gradually() {
        let mut e = Ewma {
            rtt_ns: DEFAULT_RTT.as_nanos() as f64,
            at: Instant::now(),
            sampled: false,
        };
        e.sample(ms(300), Instant::now());
        assert!(
            (e.decayed(Instant::now()) - 300e6).abs() < 1.0,
            "the peak is taken at once"
        );
        // A fast sample right after moves it little (the slow one is recent)...
        tokio::time::advance(ms(10)).await;
        e.sample(ms(1), Instant::now());
        assert!(e.decayed(Instant::now()) > 250e6);
        // ...and with time the estimate decays toward zero (e^-1 after one decay period).
        tokio::time::advance(EWMA_DECAY).await;
        let later = e.decayed(Instant::now());
        assert!(later < 120e6 && later > 80e6, "{later}");
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_prefers_the_cheaper_of_two_and_spreads_equal_ones() {
        let s = set(&config(), 3);
        let all = s.active();
        // The first is slow: it never wins a comparison, so it gets nothing.
        s.finish(&all[0], OK, ms(300));
        s.finish(&all[1], OK, ms(5));
        s.finish(&all[2], OK, ms(5));
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            let i = s.pick(&[]).unwrap();
            counts[i.id as usize] += 1;
        }
        assert_eq!(counts[0], 0, "{counts:?}");
        assert!(counts[1] > 1200 && counts[2] > 1200, "{counts:?}");
        // Calls in flight count: a busy instance loses every comparison with an idle one of
        // the same latency (and still beats the slow one): ~1/3 against ~2/3.
        let _busy: Vec<InFlight> = (0..5).map(|_| all[1].start()).collect();
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            counts[s.pick(&[]).unwrap().id as usize] += 1;
        }
        assert!(counts[2] > 1800 && counts[1] < 1200, "{counts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn one_slow_answer_does_not_starve_an_instance_once_it_is_stale() {
        let s = set(&config(), 2);
        let (slow, fast) = (s.active()[0].clone(), s.active()[1].clone());
        s.finish(&slow, OK, ms(200));
        s.finish(&fast, OK, ms(2));
        // Fresh: the fast one wins every comparison.
        assert!((0..200).all(|_| s.pick(&[]).unwrap().id == fast.id));
        // The fast one keeps answering; the slow one gets nothing, so its estimate ages.
        tokio::time::advance(Duration::from_millis(1500)).await;
        s.finish(&fast, OK, ms(2));
        let picked_slow = (0..200)
            .filter(|_| s.pick(&[]).unwrap().id == slow.id)
            .count();
        assert!(picked_slow > 0, "starved by a 1.5 s old sample");
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_goes_to_an_instance_not_tried_yet() {
        let s = set(&config(), 3);
        let first = s.pick(&[]).unwrap();
        for _ in 0..100 {
            let second = s.pick(&[first.id]).unwrap();
            assert_ne!(second.id, first.id);
            let third = s.pick(&[first.id, second.id]).unwrap();
            assert!(third.id != first.id && third.id != second.id);
        }
        // Everything tried: any instance again, rather than none.
        assert!(s.pick(&[0, 1, 2]).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_and_the_time_doubles() {
        let s = set(&config(), 3);
        let bad = s.active()[0].clone();
        for _ in 0..4 {
            s.finish(&bad, Outcome::ConnectError, ms(1));
        }
        assert!(bad.health().ejected_until.is_none());
        s.finish(&bad, Outcome::ConnectError, ms(1));
        assert!(bad.health().ejected_until.is_some(), "ejected after 5");
        for _ in 0..200 {
            assert_ne!(s.pick(&[]).unwrap().id, bad.id);
        }
        // Back after 10 s, then ejected again for 20 s.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(s.has_untried(&[1, 2]), "returned after its time");
        for _ in 0..5 {
            s.finish(&bad, Outcome::Timeout, ms(1));
        }
        tokio::time::advance(Duration::from_secs(19)).await;
        assert!(!s.has_untried(&[1, 2]), "second ejection lasts 20 s");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(s.has_untried(&[1, 2]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_rate_over_the_window_ejects_too() {
        let s = set(&config(), 4);
        let flaky = s.active()[0].clone();
        // Never 5 in a row, but half of 20 calls.
        for _ in 0..10 {
            s.finish(&flaky, OK, ms(1));
            s.finish(
                &flaky,
                Outcome::Status(StatusCode::INTERNAL_SERVER_ERROR),
                ms(1),
            );
        }
        assert!(flaky.health().ejected_until.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_half_the_instances_are_ejected_and_past_that_all_serve() {
        let s = set(&config(), 3);
        let all = s.active();
        for i in 0..3 {
            for _ in 0..5 {
                s.finish(&all[i], Outcome::ConnectError, ms(1));
            }
        }
        let ejected = all
            .iter()
            .filter(|i| i.health().ejected_until.is_some())
            .count();
        assert_eq!(ejected, 1, "3 instances x 50%: one ejected at most");
        // The two failing ones still in rotation are used; the ejected one is not.
        for _ in 0..100 {
            assert_ne!(s.pick(&[]).unwrap().id, 0);
        }
        // Passed over after their failures, they still serve before the ejected one does.
        for i in 1..3 {
            s.finish(
                &all[i],
                Outcome::Status(StatusCode::SERVICE_UNAVAILABLE),
                ms(1),
            );
        }
        for _ in 0..100 {
            assert_ne!(s.pick(&[]).unwrap().id, 0);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_503_passes_the_instance_over_for_the_bias_duration() {
        let s = set(&config(), 2);
        let all = s.active();
        s.finish(
            &all[0],
            Outcome::Status(StatusCode::SERVICE_UNAVAILABLE),
            ms(1),
        );
        for _ in 0..50 {
            assert_eq!(s.pick(&[]).unwrap().id, all[1].id);
        }
        tokio::time::advance(ms(100)).await;
        let picked: std::collections::HashSet<u64> =
            (0..200).map(|_| s.pick(&[]).unwrap().id).collect();
        assert_eq!(picked.len(), 2, "back in rotation after the bias");
    }

    #[tokio::test(start_paused = true)]
    async fn with_a_probe_an_ejected_instance_returns_only_once_it_passes() {
        let mut cfg = config();
        cfg.breaker.probe_path = Some("/health".into());
        let s = set(&cfg, 3);
        let bad = s.active()[0].clone();
        for _ in 0..5 {
            s.finish(&bad, Outcome::ConnectError, ms(1));
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(
            !s.has_untried(&[1, 2]),
            "time is over, but no probe has passed"
        );
        assert_eq!(s.awaiting_probe().len(), 1);
        s.probed(&bad, false);
        assert!(!s.has_untried(&[1, 2]), "a failed probe keeps it out");
        s.probed(&bad, true);
        // Back at once: /admin and the gauges say so before any request picks it.
        let state = |s: &InstanceSet| s.snapshot()[0].state;
        assert_eq!(state(&s), InstanceState::Healthy);
        assert!(s.awaiting_probe().is_empty());
        assert!(s.has_untried(&[1, 2]));
        // Its failures were forgotten: one more does not eject it again.
        s.finish(&bad, Outcome::ConnectError, ms(1));
        assert_eq!(state(&s), InstanceState::Healthy);
    }

    #[tokio::test(start_paused = true)]
    async fn with_a_probe_an_instance_found_after_the_start_waits_for_it() {
        let mut cfg = config();
        cfg.breaker.probe_path = Some("/health".into());
        let s = set(&cfg, 2);
        // Scaled up: the new container is in DNS before it listens.
        s.update(&endpoints(0..3));
        let new = s.active()[2].clone();
        assert_eq!(
            s.awaiting_probe().len(),
            1,
            "probed before it takes traffic"
        );
        for _ in 0..100 {
            assert_ne!(s.pick(&[]).unwrap().id, new.id);
        }
        s.probed(&new, true);
        assert!((0..100).any(|_| s.pick(&[]).unwrap().id == new.id));
        // Without a probe a new instance serves at once (nothing could let it in later).
        let s = set(&config(), 2);
        s.update(&endpoints(0..3));
        assert!(s.awaiting_probe().is_empty());
        assert!((0..100).any(|_| s.pick(&[]).unwrap().id == s.active()[2].id));
    }

    #[tokio::test(start_paused = true)]
    async fn discovery_keeps_known_instances_adds_new_ones_and_drains_vanished_ones() {
        let s = set(&config(), 3);
        let before = s.active();
        let busy = before[0].start();
        s.update(&endpoints(1..4));
        let after = s.active();
        assert_eq!(after.len(), 3);
        assert!(
            Arc::ptr_eq(&after[0], &before[1]),
            "a known instance keeps its state"
        );
        assert_eq!(after[2].endpoint.port, 9003);
        let snapshot = s.snapshot();
        let draining: Vec<_> = snapshot
            .iter()
            .filter(|i| i.state == InstanceState::Draining)
            .collect();
        assert_eq!(
            draining.len(),
            1,
            "the removed one drains while a call is in flight"
        );
        for _ in 0..100 {
            assert_ne!(s.pick(&[]).unwrap().id, before[0].id, "no new calls to it");
        }
        drop(busy);
        assert!(s
            .snapshot()
            .iter()
            .all(|i| i.state != InstanceState::Draining));
    }
}
