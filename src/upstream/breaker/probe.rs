//! The breaker's active health probe: while the breaker is open, ask the upstream every
//! `probe_interval` whether it is back, so a route reopens within one interval of the
//! upstream's return instead of after the whole open time (only with `breaker.probe_path`).
//!
//! This file knows how to ask ([`HealthCheck`]) and how often ([`watch`]); what an answer
//! does to the breaker is the state machine's (`state.rs` hands [`watch`] two callbacks).

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::upstream::instances::InstanceSet;

/// Asks the upstream whether it is back: `true` for a healthy answer. Boxed so that tests can
/// stand in for the network (see `Breaker::set_health_probe`).
pub type HealthCheck = Arc<dyn Fn() -> BoxFuture<'static, bool> + Send + Sync>;

/// A [`HealthCheck`] on one URL: `GET url` on the upstream's pooled client, healthy on a 2xx
/// within `timeout`.
pub fn http_health_check(
    client: reqwest::Client,
    url: reqwest::Url,
    timeout: Duration,
) -> HealthCheck {
    Arc::new(move || {
        let request = client.get(url.clone()).timeout(timeout).send();
        Box::pin(async move { matches!(request.await, Ok(r) if r.status().is_success()) })
    })
}

/// The pipeline's [`HealthCheck`]: healthy when any instance answers its probe URL with a 2xx
/// within `timeout`. Holds the set weakly, so a probe loop never keeps a replaced pipeline's
/// instances alive.
pub(crate) fn any_instance_healthy(instances: Weak<InstanceSet>, timeout: Duration) -> HealthCheck {
    Arc::new(move || {
        let instances = instances.clone();
        Box::pin(async move {
            let Some(set) = instances.upgrade() else {
                return false;
            };
            for instance in set.active().iter() {
                let Some(url) = instance.probe_url.clone() else {
                    continue;
                };
                let answer = instance.client.get(url).timeout(timeout).send().await;
                if matches!(answer, Ok(r) if r.status().is_success()) {
                    return true;
                }
            }
            false
        })
    })
}

/// Spawns one probe loop: every `interval`, while `still_open()`, ask `check` (bounded by
/// `interval` too); the first healthy answer calls `passed()` and ends the loop. It also
/// ends once the opening it was started for is over, whatever ended it (open time over,
/// reset). Outside a runtime (never in the gateway) there is nothing to run it on.
pub(crate) fn watch(
    upstream: Arc<str>,
    check: HealthCheck,
    interval: Duration,
    still_open: impl Fn() -> bool + Send + 'static,
    passed: impl FnOnce() + Send + 'static,
) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            if !still_open() {
                return;
            }
            let healthy = tokio::time::timeout(interval, check())
                .await
                .unwrap_or(false);
            metrics::counter!("gateway_circuit_breaker_health_probes_total",
                "upstream" => upstream.clone(),
                "result" => if healthy { "healthy" } else { "unhealthy" })
            .increment(1);
            if healthy {
                passed();
                return;
            }
        }
    });
}
