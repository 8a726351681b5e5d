//! The bulkhead of one upstream: at most `max_connections` calls hold a slot (so a pooled
//! connection) at once, and no single client holds or waits for more than its share of them
//! (`max_client_share`).
//!
//! Without the share, slots go first come, first served: three clients that each kept 90
//! responses unread held all 256 slots of an upstream, and everyone else waited out the
//! route's deadline (`503 upstream_timeout` after 10 s). A client at its share is refused at
//! once (`429 too_many_in_flight`), before it joins the wait: tokio's semaphore is FIFO, so a
//! client allowed to queue without bound would also push everyone else to the back. Calls
//! without a client (token verification on behalf of a request already counted, probes) are
//! bounded by the slots alone.
//!
//! A slot is held from the start of the call until the upstream has delivered the whole
//! response body (`routes::proxy` buffers bodies up to `limits.response_buffer`, so a slow
//! client does not keep it), and it is visible: `/admin/upstreams` `in_flight` and the
//! `gateway_upstream_in_flight{upstream}` gauge count held slots.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::client::ClientKey;

/// A client already holds or waits for its whole share of an upstream's slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("client holds its share of the upstream's slots ({limit})")]
pub struct ShareExceeded {
    /// Slots one client may hold or wait for on this upstream.
    pub limit: usize,
}

/// One upstream's slots and who holds them.
pub struct Bulkhead {
    shared: Arc<Shared>,
}

struct Shared {
    slots: Arc<Semaphore>,
    /// `max_connections`: the number of slots.
    capacity: usize,
    /// Slots one client may hold or wait for at once.
    per_client: usize,
    /// Slots held or waited for, per client with at least one (entries go at zero, so the
    /// map is as large as the set of clients with calls in flight, never more). foldhash,
    /// randomly seeded: cheaper than SipHash for a lookup per call, and clients who choose
    /// their addresses still cannot aim for collisions.
    clients: Mutex<HashMap<ClientKey, usize, foldhash::fast::RandomState>>,
    /// `gateway_upstream_in_flight{upstream}`: raised and lowered by each slot, so pipelines
    /// replaced by a reload and their successors add up in the one series.
    in_flight: metrics::Gauge,
}

/// A call counted against its client's share (or not, without a client), before it has a
/// slot: dropping it (the deadline ran out while waiting) gives the share back.
pub struct Entry {
    shared: Arc<Shared>,
    client: Option<ClientKey>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        let Some(client) = self.client else {
            return;
        };
        let mut clients = self
            .shared
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = clients.get_mut(&client) {
            *n -= 1;
            if *n == 0 {
                clients.remove(&client);
            }
        }
    }
}

impl Entry {
    /// Waits for a free slot (cancel-safe: dropping the future gives the share back).
    pub async fn acquire(self) -> Slot {
        let permit = self.shared.slots.clone().acquire_owned().await.ok();
        self.shared.in_flight.increment(1.0);
        Slot {
            _permit: permit,
            entry: self,
        }
    }
}

/// One held slot of an upstream; released (and the client's share given back) when dropped.
pub struct Slot {
    /// `None` only if the semaphore were closed, which nothing does.
    _permit: Option<OwnedSemaphorePermit>,
    /// Declared after the permit, so it is dropped after it: a share is never free while the
    /// slot it stands for is still taken.
    entry: Entry,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.entry.shared.in_flight.decrement(1.0);
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("client", &self.entry.client)
            .finish()
    }
}

impl Bulkhead {
    /// `capacity` slots (at least 1); each client may hold `share` of them (a fraction in
    /// (0, 1], at least one slot).
    pub fn new(upstream: &str, capacity: usize, share: f64) -> Bulkhead {
        let capacity = capacity.clamp(1, Semaphore::MAX_PERMITS);
        Bulkhead {
            shared: Arc::new(Shared {
                slots: Arc::new(Semaphore::new(capacity)),
                capacity,
                per_client: per_client(capacity, share),
                clients: Mutex::default(),
                in_flight: metrics::gauge!("gateway_upstream_in_flight",
                    "upstream" => upstream.to_string()),
            }),
        }
    }

    /// [`Bulkhead::enter`], then [`Entry::acquire`].
    pub async fn acquire(&self, client: Option<ClientKey>) -> Result<Slot, ShareExceeded> {
        Ok(self.enter(client)?.acquire().await)
    }

    /// Counts a call against `client`'s share, refusing it at once when the client already
    /// holds or waits for its share.
    pub fn enter(&self, client: Option<ClientKey>) -> Result<Entry, ShareExceeded> {
        // A share of every slot is no share: nobody is counted (and so nobody is refused
        // rather than queued when the slots run out).
        let client = client.filter(|_| self.shared.per_client < self.shared.capacity);
        if let Some(key) = client {
            let mut clients = self
                .shared
                .clients
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let held = clients.entry(key).or_default();
            if *held >= self.shared.per_client {
                if *held == 0 {
                    clients.remove(&key);
                }
                return Err(ShareExceeded {
                    limit: self.shared.per_client,
                });
            }
            *held += 1;
        }
        Ok(Entry {
            shared: self.shared.clone(),
            client,
        })
    }

    /// Slots held now (calls between their start and the end of the upstream's body).
    pub fn in_flight(&self) -> usize {
        self.shared.capacity - self.shared.slots.available_permits()
    }

    /// `max_connections`.
    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// Slots one client may hold or wait for.
    pub fn per_client(&self) -> usize {
        self.shared.per_client
    }
}

/// `share` of `capacity`, rounded down, at least 1.
fn per_client(capacity: usize, share: f64) -> usize {
    let share = if share.is_finite() {
        share.clamp(0.0, 1.0)
    } else {
        1.0
    };
    ((capacity as f64 * share).floor() as usize).clamp(1, capacity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn client(s: &str) -> Option<ClientKey> {
        Some(ClientKey::new(s.parse().unwrap(), 64))
    }

    #[test]
    fn the_share_is_a_floor_of_the_fraction_and_at_least_one() {
        assert_eq!(per_client(256, 0.25), 64);
        assert_eq!(per_client(8, 0.25), 2);
        assert_eq!(per_client(3, 0.25), 1);
        assert_eq!(per_client(10, 1.0), 10);
        assert_eq!(per_client(10, f64::NAN), 10);
        assert_eq!(per_client(10, 0.0), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_at_its_share_is_refused_at_once_others_are_not() {
        let b = Bulkhead::new("t", 8, 0.25);
        let mine = [
            b.acquire(client("192.0.2.1")).await.unwrap(),
            b.acquire(client("192.0.2.1")).await.unwrap(),
        ];
        assert_eq!(
            b.acquire(client("192.0.2.1")).await.unwrap_err(),
            ShareExceeded { limit: 2 }
        );
        // Two addresses of one /64 are one client.
        let v6 = [
            b.acquire(client("2001:db8::1")).await.unwrap(),
            b.acquire(client("2001:db8::2")).await.unwrap(),
        ];
        assert!(b.acquire(client("2001:db8::3")).await.is_err());
        // Another client, and calls without one, still get slots.
        let other = b.acquire(client("192.0.2.2")).await.unwrap();
        let anonymous = b.acquire(None).await.unwrap();
        assert_eq!(b.in_flight(), 6);
        // A released slot gives the share back.
        drop(mine);
        assert!(b.acquire(client("192.0.2.1")).await.is_ok());
        assert_eq!(b.in_flight(), 4);
        drop((v6, other, anonymous));
        assert_eq!(b.in_flight(), 0);
        assert!(b.shared.clients.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_counts_against_the_share_and_a_cancelled_wait_gives_it_back() {
        let b = Arc::new(Bulkhead::new("t", 4, 0.5));
        let held = [
            b.acquire(client("192.0.2.9")).await.unwrap(),
            b.acquire(client("192.0.2.9")).await.unwrap(),
            b.acquire(client("192.0.2.8")).await.unwrap(),
            b.acquire(client("192.0.2.8")).await.unwrap(),
        ];
        // Every slot is taken; each client holds its share of 2, so a third call is refused
        // rather than queued.
        assert!(b.acquire(client("192.0.2.9")).await.is_err());
        let b2 = b.clone();
        let waiting =
            tokio::spawn(async move { b2.acquire(client("192.0.2.10")).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(b.shared.clients.lock().unwrap().len(), 3);
        // Waiting counts: the waiter's second call would be its share of 2, a third not.
        let b3 = b.clone();
        let second =
            tokio::spawn(async move { b3.acquire(client("192.0.2.10")).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(b.acquire(client("192.0.2.10")).await.is_err());
        waiting.abort();
        second.abort();
        let _ = (waiting.await, second.await);
        assert_eq!(b.shared.clients.lock().unwrap().len(), 2);
        drop(held);
        assert!(b.shared.clients.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_share_of_one_counts_nobody_and_queues_like_a_plain_semaphore() {
        let b = Arc::new(Bulkhead::new("t", 1, 1.0));
        let held = b.acquire(client("192.0.2.9")).await.unwrap();
        let b2 = b.clone();
        let queued = tokio::spawn(async move { b2.acquire(client("192.0.2.9")).await.is_ok() });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!queued.is_finished(), "refused instead of queued");
        drop(held);
        assert!(queued.await.unwrap());
        assert!(b.shared.clients.lock().unwrap().is_empty());
    }
}
