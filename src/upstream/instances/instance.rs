//! One address of an upstream: where it is ([`Endpoint`]), its own pooled client, its load
//! (for the balancer) and its passive health (for ejection), and how `/admin` shows it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::Serialize;
use tokio::time::Instant;

use super::health::{Availability, Health};
use crate::config::EjectionConfig;
use crate::upstream::balancer::PeakEwma;
use crate::upstream::concurrency::InstanceLimit;

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
    pub(crate) fn display(&self) -> String {
        match self.pinned {
            Some(addr) => addr.to_string(),
            None => format!("{}:{}", self.host, self.port),
        }
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
    /// Latency and calls in flight: what the balancer compares.
    pub(crate) load: PeakEwma,
    /// Discovery no longer lists it: no new calls; calls in flight finish.
    pub(crate) draining: AtomicBool,
    /// Its own adaptive limit, learnt from its attempts' round trips (`None`: the upstream's
    /// `concurrency` is off).
    pub(crate) limit: Option<Arc<InstanceLimit>>,
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
    pub(crate) const ALL: [InstanceState; 3] = [
        InstanceState::Healthy,
        InstanceState::Ejected,
        InstanceState::Draining,
    ];
    pub(crate) fn label(self) -> &'static str {
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
    /// `null` until the instance answered a call: there is nothing measured to show.
    pub ewma_latency_ms: Option<f64>,
    pub successes: u64,
    pub failures: u64,
    /// Its learnt limit and the attempts of limited calls on it (`null`: `concurrency` off).
    pub concurrency: Option<InstanceConcurrency>,
}

/// One instance's adaptive limit as `/admin/upstreams` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct InstanceConcurrency {
    pub limit: usize,
    pub in_flight: usize,
    /// Whether its limit counts toward the upstream's (it is in rotation).
    pub counted: bool,
}

/// Ends the instance's in-flight count however the attempt ends (cancelled included).
pub(crate) struct InFlight(Arc<Instance>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.load.end();
    }
}

impl Instance {
    pub(crate) fn new(
        id: u64,
        endpoint: Endpoint,
        client: reqwest::Client,
        probe_url: Option<reqwest::Url>,
        ejection: &EjectionConfig,
        limit: Option<Arc<InstanceLimit>>,
    ) -> Instance {
        Instance {
            id,
            addr: Arc::from(endpoint.display()),
            endpoint,
            client,
            probe_url,
            load: PeakEwma::new(),
            draining: AtomicBool::new(false),
            limit,
            health: Mutex::new(Health::new(ejection)),
        }
    }

    pub(crate) fn health(&self) -> MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An attempt goes to this instance until the guard drops.
    pub(crate) fn start(self: &Arc<Self>) -> InFlight {
        self.load.start();
        InFlight(self.clone())
    }

    /// Whether an attempt of a limited call may go here without passing its limit.
    pub(crate) fn has_room(&self) -> bool {
        self.limit.as_ref().is_none_or(|l| l.has_room())
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Whether it may take an attempt at `now`: never while draining; otherwise as its
    /// health says (passed over after a failure or 429 unless `biased_ok`).
    pub(crate) fn available(&self, now: Instant, biased_ok: bool) -> Availability {
        if self.is_draining() {
            return Availability::No;
        }
        self.health()
            .availability(now, self.probe_url.is_some(), biased_ok)
    }

    pub(crate) fn snapshot(&self, now: Instant) -> InstanceSnapshot {
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
            in_flight: self.load.in_flight(),
            ewma_latency_ms: self.load.estimate_ns(now).map(|ns| ns / 1e6),
            successes: h.successes,
            failures: h.failures,
            concurrency: self.limit.as_ref().map(|l| InstanceConcurrency {
                limit: l.limit(),
                in_flight: l.in_flight(),
                counted: l.is_counted(),
            }),
        }
    }
}
