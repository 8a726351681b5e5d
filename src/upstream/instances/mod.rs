//! An upstream is a set of instances: every address its configured URLs name (a list of
//! hosts, or a name that resolves to several addresses, re-resolved by `discovery.rs`).
//! This module keeps the set (membership) and each instance's passive health; which instance
//! takes an attempt is the balancer's choice (`upstream/balancer/`).
//!
//! - `mod.rs`: [`InstanceSet`]: the instances in rotation, swapped whole when discovery
//!   finds a change (known ones keep their state, new ones get a pooled client, vanished
//!   ones drain); which of them may serve now; ejection within `max_ejected_percent`; the
//!   ejected instances' probes; the `/admin` snapshot and endpoint gauges. Start reading here.
//! - `instance.rs`: one [`Instance`]: its endpoint, pooled client (pinned to its address, so
//!   `Host` and TLS SNI still carry the configured name), load and health.
//! - `health.rs`: one instance's passive health: its attempts against the shared trip rule,
//!   its ejection time (the shared doubling backoff), the pass-over after a failure or 429.
//! - `tests.rs`: membership and health on a paused clock.
//!
//! The service-level breaker (`upstream/breaker/`) sees calls, not instances: one bad
//! instance of three is ejected here and retried around, so the service's calls keep
//! succeeding and its breaker stays closed.

mod health;
mod instance;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::time::Instant;

use health::Availability;
pub(crate) use instance::Endpoint;
pub use instance::{Instance, InstanceConcurrency, InstanceSnapshot, InstanceState};

use crate::config::{EjectionConfig, UpstreamConfig};
use crate::upstream::call::Outcome;
use crate::upstream::concurrency::ConcurrencyLimit;

/// Builds the pooled client of a new instance (the upstream's settings, pinned to its address).
pub(crate) type MakeClient =
    Box<dyn Fn(&Endpoint) -> reqwest::Result<reqwest::Client> + Send + Sync>;

/// The instances of one upstream: who is in rotation, and who may serve now.
pub struct InstanceSet {
    upstream: Arc<str>,
    /// The instances in rotation (draining ones are not listed), swapped whole by discovery.
    active: ArcSwap<Vec<Arc<Instance>>>,
    /// Removed from rotation with calls still in flight: shown until they finish.
    draining: Mutex<Vec<Arc<Instance>>>,
    /// When an instance is ejected, and for how long (each instance counts for itself).
    ejection: EjectionConfig,
    /// How long an instance is passed over after a failure or 429.
    bias: Duration,
    /// The id of the next new instance: ids are never reused, so "already tried" stays true.
    next_id: AtomicU64,
    /// Bumped whenever the set changes; a call that found no instance before the first
    /// resolution waits for it.
    version: watch::Sender<u64>,
    /// The names have been resolved at least once (successfully or not).
    resolved: AtomicBool,
    /// Builds the pooled client of a new instance.
    make_client: MakeClient,
    /// `scheme://host:port{prefix}{probe_path}` of an endpoint, for the ejected-instance probe.
    probe_path: Option<String>,
    /// The configured URL's path, which every probe URL starts with.
    path_prefix: String,
    /// Makes each new instance's adaptive limit; the instances in rotation add up to its
    /// admission limit (`None`: `concurrency` off).
    concurrency: Option<ConcurrencyLimit>,
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
            ejection: cfg.ejection.clone(),
            bias: cfg.bias_duration.0,
            next_id: AtomicU64::new(0),
            version: watch::channel(0).0,
            resolved: AtomicBool::new(false),
            make_client,
            probe_path: cfg.breaker.probe_path.clone(),
            path_prefix,
            concurrency: None,
        }
    }

    /// Gives each instance its own adaptive limit, made by `limit`, and keeps `limit`'s
    /// admission limit at the sum of the limits of the instances in rotation.
    pub(crate) fn limited_by(mut self, limit: Option<ConcurrencyLimit>) -> InstanceSet {
        self.concurrency = limit;
        self
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
                    let limit = self
                        .concurrency
                        .as_ref()
                        .map(|c| c.instance(&e.display(), endpoints.len()));
                    let instance = Arc::new(Instance::new(
                        id,
                        e.clone(),
                        client,
                        probe_url,
                        &self.ejection,
                        limit,
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
            // Its calls in flight finish, but its capacity is gone at once.
            if let Some(limit) = &r.limit {
                limit.set_counted(false);
            }
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

    /// Takes over the health (ejections, pass-overs, trip counts) of `old`'s instances, by
    /// endpoint: a reload rebuilt this set with new settings for the same addresses. A set
    /// still waiting for its first resolution starts from `old`'s instances (discovery
    /// corrects it if the names now resolve elsewhere).
    pub(crate) fn inherit(&self, old: &InstanceSet) {
        let previous = old.active();
        if !self.is_resolved() {
            let endpoints: Vec<Endpoint> = previous.iter().map(|i| i.endpoint.clone()).collect();
            self.update(&endpoints);
        }
        let same_rules = self.ejection == old.ejection && self.bias == old.bias;
        for instance in self.active().iter() {
            if let Some(before) = previous.iter().find(|i| i.endpoint == instance.endpoint) {
                let before = before.health().clone();
                instance.health().inherit(&before, same_rules);
            }
        }
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
        self.lock_draining().retain(|i| i.load.in_flight() > 0);
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

    /// Whether an instance not in `tried` could take an attempt now; with `need_room` (a
    /// call under the adaptive limit), only one under its own limit counts.
    pub(crate) fn has_untried(&self, tried: &[u64], need_room: bool) -> bool {
        let now = Instant::now();
        let mut returned = false;
        let found = self.active.load().iter().any(|i| {
            if tried.contains(&i.id) || (need_room && !i.has_room()) {
                return false;
            }
            match i.available(now, true) {
                Availability::Yes => true,
                Availability::Returned => {
                    returned = true;
                    true
                }
                Availability::No | Availability::Biased => false,
            }
        });
        if returned {
            self.report();
        }
        found
    }

    /// The instances that should take the next attempt, the best group that has any: the
    /// healthy ones; else the ones passed over after a failure or 429; else (a panic, as
    /// Envoy calls it: every one ejected or passed over, past the ejection cap) every one in
    /// rotation, ejected ones included. A lone instance always serves: an ejected one is
    /// better than none. The balancer chooses among them.
    pub(crate) fn serving(&self, now: Instant) -> Vec<Arc<Instance>> {
        let all = self.active.load();
        if all.len() == 1 {
            if matches!(all[0].available(now, true), Availability::Returned) {
                self.report();
            }
            return vec![all[0].clone()];
        }
        let mut returned = false;
        let mut healthy = Vec::with_capacity(all.len());
        let mut biased = Vec::new();
        for i in all.iter() {
            match i.available(now, false) {
                Availability::No => {}
                Availability::Biased => biased.push(i.clone()),
                Availability::Yes => healthy.push(i.clone()),
                Availability::Returned => {
                    returned = true;
                    healthy.push(i.clone());
                }
            }
        }
        if returned {
            self.report();
        }
        if !healthy.is_empty() {
            healthy
        } else if !biased.is_empty() {
            biased
        } else {
            all.iter().filter(|i| !i.is_draining()).cloned().collect()
        }
    }

    /// Learns from one finished attempt on `instance`: whether to eject it or pass it over
    /// for a while (its latency is the balancer's to learn).
    pub(crate) fn finish(&self, instance: &Instance, outcome: Outcome) {
        let now = Instant::now();
        let trip = instance.health().record(now, outcome, self.bias);
        if trip && self.ejection.enabled {
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
        let time = instance.health().eject(now);
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

    /// Counts toward the upstream's admission limit the instances in rotation: the ones not
    /// ejected, or every one when all are out (they all serve then, see
    /// [`InstanceSet::serving`]). Draining ones were taken out by [`InstanceSet::update`].
    fn recount(&self) {
        if self.concurrency.is_none() {
            return;
        }
        let all = self.active.load();
        let in_rotation: Vec<bool> = all
            .iter()
            .map(|i| i.health().ejected_until.is_none())
            .collect();
        let counted = match in_rotation.iter().filter(|r| **r).count() {
            0 => all.len(),
            n => n,
        };
        for (instance, in_rotation) in all.iter().zip(in_rotation) {
            if let Some(limit) = &instance.limit {
                limit.set_counted(in_rotation || counted == all.len());
                limit.share_of(counted);
            }
        }
    }

    /// Sets each instance's concurrency gauges (`gateway_upstream_instance_*`): read at each
    /// scrape, so that no call pays for a gauge.
    pub fn publish_limits(&self) {
        for instance in self.active.load().iter() {
            if let Some(limit) = &instance.limit {
                limit.publish();
            }
        }
        for instance in self.lock_draining().iter() {
            if let Some(limit) = &instance.limit {
                limit.publish();
            }
        }
    }

    /// Sets `gateway_upstream_endpoints{upstream,state}` from the current set, and which
    /// instances count toward the admission limit (every change of the set comes here).
    pub(crate) fn report(&self) {
        self.recount();
        let snapshot = self.snapshot();
        for state in InstanceState::ALL {
            let n = snapshot.iter().filter(|s| s.state == state).count();
            metrics::gauge!("gateway_upstream_endpoints",
                "upstream" => self.upstream.clone(), "state" => state.label())
            .set(n as f64);
        }
    }
}

/// A set of `n` instances on 127.0.0.1:9000.., for the tests of this module and the
/// balancer's.
#[cfg(test)]
pub(crate) fn test_set(cfg: &UpstreamConfig, n: u16) -> InstanceSet {
    let s = InstanceSet::new("t", cfg, Box::new(|_| Ok(reqwest::Client::new())));
    s.update(&test_endpoints(0..n));
    s
}

/// Endpoints on 127.0.0.1 at 9000 + each port offset.
#[cfg(test)]
pub(crate) fn test_endpoints(ports: std::ops::Range<u16>) -> Vec<Endpoint> {
    ports
        .map(|p| Endpoint {
            scheme: "http".into(),
            host: "127.0.0.1".into(),
            port: 9000 + p,
            pinned: None,
        })
        .collect()
}
