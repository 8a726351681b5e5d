//! Finding an upstream's instances: each configured URL whose host is a name is resolved to
//! all its addresses (docker compose `--scale`, a Kubernetes headless service), again every
//! `discovery_interval`. A failed resolution (a timeout, a DNS server that cannot answer)
//! keeps the last known set; an authoritative "this name has no addresses" (NXDOMAIN, as
//! Docker's DNS answers once every container of a service is gone) empties it, so calls fail
//! fast instead of waiting out connect timeouts to addresses that are gone. The same task
//! probes ejected instances whose time is over, when the upstream has a `probe_path`.
//!
//! Resolution goes through [`Resolve`], so tests can say which addresses a name has. The
//! system resolver is the one reqwest itself uses (`getaddrinfo` on tokio's blocking pool):
//! it reads `/etc/hosts` and Docker's embedded DNS alike and needs no extra dependency.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;

use super::instances::{Endpoint, InstanceSet};

/// Turns a host name into its addresses: `Ok(empty)` when the name authoritatively has none
/// (the set empties), `Err` when the answer is unknown (the last known set is kept).
pub trait Resolve: Send + Sync + 'static {
    fn resolve(&self, host: &str, port: u16) -> BoxFuture<'static, std::io::Result<Vec<IpAddr>>>;
}

/// The operating system's resolver.
#[derive(Debug, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, host: &str, port: u16) -> BoxFuture<'static, std::io::Result<Vec<IpAddr>>> {
        let target = format!("{host}:{port}");
        Box::pin(async move {
            let found = match tokio::net::lookup_host(target).await {
                Ok(found) => found,
                Err(e) if name_does_not_exist(&e) => return Ok(Vec::new()),
                Err(e) => return Err(e),
            };
            let mut ips: Vec<IpAddr> = found.map(|a| a.ip()).collect();
            ips.sort();
            ips.dedup();
            Ok(ips)
        })
    }
}

/// Whether getaddrinfo's error says the name has no addresses (EAI_NONAME, EAI_NODATA)
/// rather than that it could not find out (EAI_AGAIN, EAI_FAIL, ...). std reports these
/// only as text (`failed to lookup address information: <gai_strerror>`), so the text is
/// what can be matched; glibc and musl spell them as below.
fn name_does_not_exist(e: &std::io::Error) -> bool {
    let text = e.to_string();
    [
        "Name or service not known",
        "No address associated with hostname",
        "Name does not resolve",
        "nodename nor servname provided",
    ]
    .iter()
    .any(|m| text.contains(m))
}

/// One configured URL: its scheme, host and port, and whether the host must be resolved.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    scheme: String,
    host: String,
    port: u16,
    /// `None`: the host is an IP literal, one instance as it is.
    name: Option<String>,
}

impl Target {
    /// The targets of the configured URLs (validation has checked they parse).
    pub(crate) fn parse_all(urls: &[&str]) -> Vec<Target> {
        urls.iter()
            .filter_map(|u| reqwest::Url::parse(u).ok())
            .filter_map(|u| {
                let port = u.port_or_known_default()?;
                let host = u.host_str()?.to_string();
                let literal = host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>()
                    .is_ok();
                let name = (!literal).then(|| host.clone());
                Some(Target {
                    scheme: u.scheme().to_string(),
                    host,
                    port,
                    name,
                })
            })
            .collect()
    }

    fn literal(&self) -> Endpoint {
        Endpoint {
            scheme: self.scheme.clone(),
            host: self.host.clone(),
            port: self.port,
            pinned: None,
        }
    }
}

/// The endpoints the targets stand for now: IP literals as they are, names resolved; for a
/// name that cannot be resolved, its last known addresses (`last`, per target).
async fn resolve_all(
    targets: &[Target],
    resolver: &dyn Resolve,
    last: &mut [Option<Vec<Endpoint>>],
    timeout: Duration,
) -> Vec<Endpoint> {
    let mut out = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        let Some(name) = &t.name else {
            out.push(t.literal());
            continue;
        };
        let resolved = tokio::time::timeout(timeout, resolver.resolve(name, t.port)).await;
        match resolved {
            Ok(Ok(ips)) => {
                if ips.is_empty() && last[i].as_ref().is_some_and(|l| !l.is_empty()) {
                    tracing::warn!(host = %name, "upstream host no longer resolves; its instances drain");
                }
                let endpoints: Vec<Endpoint> = ips
                    .into_iter()
                    .map(|ip| Endpoint {
                        scheme: t.scheme.clone(),
                        host: t.host.clone(),
                        port: t.port,
                        pinned: Some(SocketAddr::new(ip, t.port)),
                    })
                    .collect();
                last[i] = Some(endpoints);
            }
            other => {
                let why = match other {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_string(),
                };
                tracing::warn!(host = %name, error = %why, known = last[i].as_ref().map_or(0, Vec::len),
                    "cannot resolve upstream host; keeping the last known instances");
            }
        }
        if let Some(known) = &last[i] {
            out.extend(known.iter().cloned());
        }
    }
    out
}

/// Resolves the targets once now (IP literals need nothing), then keeps the set current in
/// a background task for as long as `set` lives: names every `interval`, ejected instances'
/// probes every `probe_interval`.
pub(crate) fn start(
    set: &Arc<InstanceSet>,
    targets: Vec<Target>,
    resolver: Arc<dyn Resolve>,
    interval: Duration,
    probe_interval: Option<Duration>,
) {
    let names = targets.iter().any(|t| t.name.is_some());
    if !names {
        let endpoints: Vec<Endpoint> = targets.iter().map(Target::literal).collect();
        set.update(&endpoints);
        if probe_interval.is_none() {
            return;
        }
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::error!(
            upstream = set.upstream(),
            "no runtime: instances are not discovered"
        );
        set.resolution_failed();
        return;
    };
    let weak: Weak<InstanceSet> = Arc::downgrade(set);
    runtime.spawn(async move {
        let mut last: Vec<Option<Vec<Endpoint>>> = vec![None; targets.len()];
        let mut next_resolve = Instant::now();
        let tick = probe_interval.map_or(interval, |p| p.min(interval));
        loop {
            let Some(set) = weak.upgrade() else { return };
            if names && Instant::now() >= next_resolve {
                let endpoints = resolve_all(&targets, &*resolver, &mut last, interval).await;
                if last.iter().all(Option::is_none) {
                    // Nothing ever resolved: calls waiting for the first resolution stop.
                    set.resolution_failed();
                } else {
                    set.update(&endpoints);
                }
                next_resolve = Instant::now() + interval;
            }
            if let Some(probe_interval) = probe_interval {
                probe_ejected(&set, probe_interval).await;
            }
            drop(set);
            tokio::time::sleep(tick).await;
        }
    });
}

/// Asks each ejected instance whose time is over whether it is back (2xx within `timeout`).
async fn probe_ejected(set: &InstanceSet, timeout: Duration) {
    for instance in set.awaiting_probe() {
        let Some(url) = instance.probe_url.clone() else {
            continue;
        };
        let answer = instance.client.get(url).timeout(timeout).send().await;
        let healthy = matches!(answer, Ok(r) if r.status().is_success());
        metrics::counter!("gateway_upstream_instance_probes_total",
            "upstream" => set.upstream().to_string(),
            "result" => if healthy { "healthy" } else { "unhealthy" })
        .increment(1);
        set.probed(&instance, healthy);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;
    use crate::config::UpstreamConfig;

    /// A resolver whose answers the test sets.
    #[derive(Default)]
    struct Scripted(Mutex<HashMap<String, std::io::Result<Vec<IpAddr>>>>);

    impl Scripted {
        fn set(&self, host: &str, ips: &[&str]) {
            let ips = ips.iter().map(|i| i.parse().unwrap()).collect();
            self.0.lock().unwrap().insert(host.into(), Ok(ips));
        }
        fn fail(&self, host: &str) {
            self.0
                .lock()
                .unwrap()
                .insert(host.into(), Err(std::io::Error::other("NXDOMAIN")));
        }
    }

    impl Resolve for Scripted {
        fn resolve(
            &self,
            host: &str,
            _port: u16,
        ) -> BoxFuture<'static, std::io::Result<Vec<IpAddr>>> {
            let answer = match self.0.lock().unwrap().get(host) {
                Some(Ok(ips)) => Ok(ips.clone()),
                _ => Err(std::io::Error::other("NXDOMAIN")),
            };
            Box::pin(async move { answer })
        }
    }

    fn addresses(set: &InstanceSet) -> Vec<String> {
        let mut a: Vec<String> = set.active().iter().map(|i| i.addr.to_string()).collect();
        a.sort();
        a
    }

    #[tokio::test(start_paused = true)]
    async fn a_name_becomes_one_instance_per_address_and_follows_its_changes() {
        let cfg = UpstreamConfig {
            url: "http://storage:8003".into(),
            ..UpstreamConfig::default()
        };
        let resolver = Arc::new(Scripted::default());
        resolver.set("storage", &["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        let set = Arc::new(InstanceSet::new(
            "storage",
            &cfg,
            Box::new(|_| Ok(reqwest::Client::new())),
        ));
        let targets = Target::parse_all(&cfg.targets());
        start(
            &set,
            targets,
            resolver.clone(),
            Duration::from_secs(5),
            None,
        );
        set.wait_resolved().await;
        assert_eq!(
            addresses(&set),
            ["10.0.0.1:8003", "10.0.0.2:8003", "10.0.0.3:8003"]
        );
        let first = set.active();
        // One removed, one added: seen at the next resolution.
        resolver.set("storage", &["10.0.0.2", "10.0.0.3", "10.0.0.4"]);
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(
            addresses(&set),
            ["10.0.0.2:8003", "10.0.0.3:8003", "10.0.0.4:8003"]
        );
        let kept = set
            .active()
            .iter()
            .find(|i| &*i.addr == "10.0.0.2:8003")
            .unwrap()
            .clone();
        assert!(
            first.iter().any(|i| Arc::ptr_eq(i, &kept)),
            "a known address keeps its instance"
        );
        // A failed resolution keeps the last known set.
        resolver.fail("storage");
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(addresses(&set).len(), 3);
        // The request URL keeps the name; the instance is pinned to its address.
        assert!(set.active().iter().all(|i| i.endpoint.host == "storage"));
        // A name that authoritatively has no addresses any more empties the set (every
        // instance of the service is gone: calls fail fast instead of connecting to ghosts).
        resolver.set("storage", &[]);
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(addresses(&set).is_empty());
        assert!(set.serving(tokio::time::Instant::now()).is_empty());
        // And fills again when it comes back.
        resolver.set("storage", &["10.0.0.5"]);
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(addresses(&set), ["10.0.0.5:8003"]);
    }

    #[tokio::test]
    async fn the_system_resolver_answers_empty_for_a_name_that_does_not_exist() {
        // `.invalid` never resolves (RFC 2606): NXDOMAIN from any resolver, offline too.
        let ips = SystemResolver
            .resolve("no-such-host.invalid", 80)
            .await
            .expect("an authoritative no, not an error");
        assert!(ips.is_empty());
        let ips = SystemResolver.resolve("localhost", 80).await.unwrap();
        assert!(!ips.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_list_of_urls_and_literals_need_no_resolution() {
        let cfg = UpstreamConfig {
            urls: vec!["http://127.0.0.1:1".into(), "http://127.0.0.1:2".into()],
            ..UpstreamConfig::default()
        };
        let set = Arc::new(InstanceSet::new(
            "s",
            &cfg,
            Box::new(|_| Ok(reqwest::Client::new())),
        ));
        start(
            &set,
            Target::parse_all(&cfg.targets()),
            Arc::new(Scripted::default()),
            Duration::from_secs(5),
            None,
        );
        assert!(set.is_resolved());
        assert_eq!(addresses(&set), ["127.0.0.1:1", "127.0.0.1:2"]);
    }
}
