//! Single flight: while one request fetches a resource, later requests for it wait for that
//! fetch instead of calling the upstream themselves.
//!
//! moka's `get_with` coalesces only inserts of absent keys; the gateway also has to coalesce
//! refreshes of an expired entry it keeps for stale-if-error, and to share results it does
//! not store (errors, 5xx), so the table is ours. It is a plain map from resource to a watch
//! channel: the leader publishes its result, waiters read it.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

use super::key::Resource;

/// A published result, type-erased because the error type belongs to the caller of
/// `get_or_fetch`, not to the cache.
pub(super) type Published = Arc<dyn Any + Send + Sync>;

type Slot = watch::Receiver<Option<Published>>;

#[derive(Default)]
pub(super) struct Flights {
    in_flight: Mutex<HashMap<Arc<Resource>, (u64, Slot)>>,
    /// Tells a leader's own map entry from a successor's, so a leader that finishes late never
    /// removes the entry of the flight that replaced it.
    next_id: AtomicU64,
}

pub(super) enum Role<'a> {
    Leader(Leader<'a>),
    Waiter(Waiter),
}

impl Flights {
    /// Joins the flight for `resource`, or starts one when none is under way.
    pub(super) fn join(&self, resource: &Arc<Resource>) -> Role<'_> {
        let mut in_flight = self.lock();
        if let Some((_, slot)) = in_flight.get(resource) {
            return Role::Waiter(Waiter { slot: slot.clone() });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        in_flight.insert(resource.clone(), (id, rx));
        Role::Leader(Leader {
            flights: self,
            resource: resource.clone(),
            id,
            tx,
        })
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }

    // The map is only touched by short non-panicking sections, so a poisoned lock still
    // guards a consistent map.
    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<Resource>, (u64, Slot)>> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The one request fetching a resource. Dropping it without publishing (the client went away
/// mid-fetch) wakes the waiters empty-handed and one of them becomes the next leader.
pub(super) struct Leader<'a> {
    flights: &'a Flights,
    resource: Arc<Resource>,
    id: u64,
    tx: watch::Sender<Option<Published>>,
}

impl Leader<'_> {
    pub(super) fn publish(self, result: Published) {
        self.tx.send_replace(Some(result));
        // Drop removes the flight; anyone joining in between reads the published result.
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        let mut in_flight = self.flights.lock();
        if in_flight
            .get(&self.resource)
            .is_some_and(|(id, _)| *id == self.id)
        {
            in_flight.remove(&self.resource);
        }
    }
}

pub(super) struct Waiter {
    slot: Slot,
}

impl Waiter {
    /// The leader's result, or `None` when the leader was dropped before publishing.
    pub(super) async fn wait(mut self) -> Option<Published> {
        match self.slot.wait_for(Option::is_some).await {
            Ok(published) => published.clone(),
            Err(_) => None,
        }
    }
}
