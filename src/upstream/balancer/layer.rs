//! The balancer's part of an attempt (`upstream/attempt.rs`): each attempt picks an instance
//! of the upstream (`p2c.rs`), moves the request to it, sends it on that instance's own
//! pooled client, and reports how the attempt went so the instance's load (`peak_ewma.rs`)
//! and health (`instances/health.rs`) follow.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use reqwest::{Request, Response};
use tokio::time::Instant;

use super::p2c::Picker;
use crate::config::BalancerKind;
use crate::upstream::call::{Call, NoInstance, Outcome};
use crate::upstream::concurrency::Sample;
use crate::upstream::instances::{Instance, InstanceSet};
use crate::upstream::timeout::within_attempt_limit;

/// Set by the retry layer on the attempt that lost a hedge race, just before it is dropped:
/// the instance did not answer in time, and its health must say so. Any other cancellation
/// (the client went away, the call's deadline) teaches nothing about the instance.
#[derive(Clone, Debug, Default)]
pub(crate) struct Abandoned(pub(crate) Arc<AtomicBool>);

impl Abandoned {
    pub(crate) fn mark(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Reports a finished attempt to its instance; dropped unfinished (cancelled), it reports a
/// lost hedge as a timeout and anything else not at all.
struct AttemptReport<'a> {
    instances: &'a InstanceSet,
    instance: Arc<Instance>,
    started: Instant,
    abandoned: Option<&'a Abandoned>,
    done: bool,
}

impl AttemptReport<'_> {
    fn finish(mut self, outcome: Outcome) {
        self.done = true;
        // Only a success's latency is the instance's speed: a refused connection is fast.
        if outcome.breaker_failure() == Some(false) {
            self.instance
                .load
                .sample(self.started.elapsed(), Instant::now());
        }
        self.instances.finish(&self.instance, outcome);
    }
}

impl Drop for AttemptReport<'_> {
    fn drop(&mut self) {
        if !self.done
            && self
                .abandoned
                .as_ref()
                .is_some_and(|a| a.0.load(Ordering::Acquire))
        {
            self.instances.finish(&self.instance, Outcome::Timeout);
        }
    }
}

/// The balancer layer of one upstream.
pub(crate) struct Balancer {
    instances: Arc<InstanceSet>,
    picker: Picker,
}

impl Balancer {
    pub(crate) fn new(instances: Arc<InstanceSet>, kind: BalancerKind) -> Balancer {
        Balancer {
            instances,
            picker: Picker::new(kind),
        }
    }
}

impl Balancer {
    /// Sends one attempt of `call`: picks the instance (untried first), moves the request to
    /// it, sends it on the instance's pooled client within the attempt timeout, and feeds the
    /// instance's load, health (ejection) and limit with how it went, timeouts included. The
    /// instance comes back with the result, for the attempt's record; `None` when there was
    /// none to pick.
    pub(crate) async fn send(
        &self,
        mut req: Request,
        call: &Call,
        abandoned: Option<&Abandoned>,
    ) -> (reqwest_middleware::Result<Response>, Option<Arc<Instance>>) {
        if !self.instances.is_resolved() {
            // The first resolution is under way (startup); the call's deadline bounds this.
            self.instances.wait_resolved().await;
        }
        let limited = call.state().limited;
        let Some(instance) =
            call.with_tried(|tried| self.picker.pick(&self.instances, tried, limited.is_some()))
        else {
            return (Err(reqwest_middleware::Error::middleware(NoInstance)), None);
        };
        call.tried_instance(instance.id);
        move_to(&mut req, &instance);
        let _in_flight = instance.start();
        // A slot under the instance's own limit, for the calls under the upstream's.
        let slot = limited.and(instance.limit.as_ref()).map(|l| l.take());
        let report = AttemptReport {
            instances: &self.instances,
            abandoned,
            instance: instance.clone(),
            started: Instant::now(),
            done: false,
        };
        let result = within_attempt_limit(call, async {
            instance
                .client
                .execute(req)
                .await
                .map_err(reqwest_middleware::Error::Reqwest)
        })
        .await;
        let outcome = Outcome::of(&result);
        if let (Some(slot), Some(class)) = (&slot, limited) {
            // The attempt's round trip teaches its instance's limit: an answer (a 5xx may
            // be a fast refusal: no sample), or a timeout (the worst sample). A cancelled
            // attempt (a lost hedge) never gets here and teaches nothing.
            let sample = match &result {
                Ok(response) if !response.status().is_server_error() => {
                    Some(Sample::Answered(report.started.elapsed()))
                }
                Ok(_) => None,
                Err(_) => (outcome == Outcome::Timeout).then_some(Sample::TimedOut),
            };
            if let Some(sample) = sample {
                slot.record(class, sample);
            }
        }
        drop(slot);
        report.finish(outcome);
        (result, Some(instance))
    }
}

/// Points the request at `instance`: the scheme, host and port of its configured URL (a list
/// of URLs has several). The path and query stay; an instance found by resolving a name
/// keeps that name in the URL (`Host`, TLS SNI) and its client connects to the address.
fn move_to(req: &mut Request, instance: &Instance) {
    point_at(req.url_mut(), &instance.endpoint);
}

/// `url` with the scheme, host and port of `e`. An IP literal host is set as an address:
/// `set_host` would parse it as a name first (through IDNA), ~2.5k instructions on every
/// request that goes to another instance than the URL's.
fn point_at(url: &mut reqwest::Url, e: &crate::upstream::instances::Endpoint) {
    if url.host_str() == Some(e.host.as_str())
        && url.port_or_known_default() == Some(e.port)
        && url.scheme() == e.scheme
    {
        return;
    }
    let _ = url.set_scheme(&e.scheme);
    match e.host.parse::<std::net::IpAddr>() {
        Ok(ip) => {
            let _ = url.set_ip_host(ip);
        }
        Err(_) => {
            let _ = url.set_host(Some(&e.host));
        }
    }
    let _ = url.set_port(Some(e.port));
}

#[cfg(test)]
mod tests {
    use super::point_at;
    use crate::upstream::instances::Endpoint;

    #[test]
    fn a_request_is_pointed_at_the_instance_by_address_or_name() {
        let endpoint = |scheme: &str, host: &str, port| Endpoint {
            scheme: scheme.into(),
            host: host.into(),
            port,
            pinned: None,
        };
        let mut url = reqwest::Url::parse("http://127.0.0.1:8001/a/b?x=1&y").unwrap();
        point_at(&mut url, &endpoint("http", "127.0.0.2", 8002));
        assert_eq!(url.as_str(), "http://127.0.0.2:8002/a/b?x=1&y");
        point_at(&mut url, &endpoint("https", "storage.internal", 443));
        assert_eq!(url.as_str(), "https://storage.internal/a/b?x=1&y");
        point_at(&mut url, &endpoint("http", "::1", 8003));
        assert_eq!(url.as_str(), "http://[::1]:8003/a/b?x=1&y");
        point_at(&mut url, &endpoint("http", "10.0.0.7", 80));
        assert_eq!(url.as_str(), "http://10.0.0.7/a/b?x=1&y");
    }
}
