//! How many gateway replicas share the upstreams: the divisor of `initial_limit`.
//!
//! Each replica learns its limits from its own calls, and none of them knows the others'.
//! An upstream's `initial_limit` is what the whole fleet should send it before round trips
//! show its capacity, so each replica starts at, and while idle falls back to, its share:
//! `initial_limit / (instances x replicas)`. Two replicas that each kept the whole of it met
//! a spike with twice the limit (chaos 17: 40 calls at once for 16 workers, successes of the
//! first second up to 600-720 ms, queued at the upstream behind the calls of the other).
//!
//! The count is live where the replicas share a Redis (the rate limiter's): each one
//! announces itself there every [`ANNOUNCE_EVERY`] and reads how many did within
//! [`ANNOUNCE_TTL`] (`ratelimit::fleet`). Until the first answer, and without Redis, it is
//! `rate_limit.expected_replicas`; while Redis is unreachable it stays as last seen.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// How often a replica announces itself.
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(1);
/// How long an announcement counts: a replica that stopped (killed, partitioned) leaves the
/// count after this long.
pub const ANNOUNCE_TTL: Duration = Duration::from_secs(3);

/// The replica count every upstream limit of this process divides `initial_limit` by.
pub struct Fleet {
    replicas: AtomicUsize,
    /// This process's name in the announcements.
    id: String,
    gauge: metrics::Gauge,
}

impl Fleet {
    /// A fleet of `expected` replicas until an announcement says otherwise.
    pub fn new(expected: usize) -> Arc<Fleet> {
        let host = std::env::var("HOSTNAME").unwrap_or_default();
        let id = format!(
            "{host}:{}:{:016x}",
            std::process::id(),
            rand::random::<u64>()
        );
        let fleet = Fleet {
            replicas: AtomicUsize::new(expected.max(1)),
            id,
            gauge: metrics::gauge!("gateway_fleet_replicas"),
        };
        fleet.gauge.set(fleet.replicas() as f64);
        Arc::new(fleet)
    }

    /// One replica alone (the tests, and upstreams built outside a gateway).
    pub fn single() -> Arc<Fleet> {
        Fleet::new(1)
    }

    /// Replicas sharing the upstreams now (at least 1).
    pub fn replicas(&self) -> usize {
        self.replicas.load(Relaxed).max(1)
    }

    /// Sets the count (an announcement's answer, or the configured expectation).
    pub fn set_replicas(&self, replicas: usize) {
        let replicas = replicas.max(1);
        let before = self.replicas.swap(replicas, Relaxed);
        if before != replicas {
            self.gauge.set(replicas as f64);
            tracing::info!(
                replicas,
                before,
                "gateway replicas sharing the upstreams changed: each limit's share of initial_limit follows"
            );
        }
    }

    /// This process's name in the announcements.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("replicas", &self.replicas())
            .field("id", &self.id)
            .finish()
    }
}
