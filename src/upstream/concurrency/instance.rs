//! One instance's learnt limit: its own controller fed by the round trips of the attempts
//! sent to it, its slots, and its part of the upstream's admission limit.
//!
//! The balancer takes a slot ([`InstanceLimit::take`]) for each attempt of a limited call,
//! after choosing among the instances with room ([`InstanceLimit::has_room`]); the slot feeds
//! the attempt's round trip to the controller and is given back when the attempt ends.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

use super::controller::{Controller, Sample};
use super::{Capacity, Shared};

/// One instance's adaptive limit.
pub struct InstanceLimit {
    /// The upstream's admission limit, which this instance's limit is part of.
    upstream: Arc<Shared>,
    /// The learnt limit (whole slots), written by the controller.
    limit: AtomicUsize,
    /// Attempts of limited calls on this instance now.
    in_flight: AtomicUsize,
    controller: Mutex<Controller>,
    /// Whether the instance is in rotation (its limit counts toward the upstream's); changed
    /// only under the upstream's capacity lock.
    counted: AtomicBool,
    /// What it adds to the upstream's sum now; changed only under the capacity lock.
    contributed: AtomicUsize,
    /// The instances in rotation it is one of (its share of `initial_limit` is that many
    /// times the gateway replicas).
    instances: AtomicUsize,
    /// `gateway_upstream_instance_concurrency_limit{upstream,address}`.
    limit_gauge: metrics::Gauge,
    /// `gateway_upstream_instance_in_flight{upstream,address}`, set at each scrape
    /// ([`InstanceLimit::publish`]) rather than per call.
    in_flight_gauge: metrics::Gauge,
}

impl InstanceLimit {
    pub(super) fn new(upstream: Arc<Shared>, address: &str, instances: usize) -> InstanceLimit {
        let controller = Controller::with_share(
            &upstream.cfg,
            upstream.max_connections,
            Instant::now(),
            instances.max(1) * upstream.fleet.replicas(),
        );
        let limit = controller.limit();
        let labels = [
            ("upstream", upstream.upstream.to_string()),
            ("address", address.to_string()),
        ];
        let limit_gauge = metrics::gauge!("gateway_upstream_instance_concurrency_limit", &labels);
        limit_gauge.set(limit as f64);
        let in_flight_gauge = metrics::gauge!("gateway_upstream_instance_in_flight", &labels);
        in_flight_gauge.set(0.0);
        InstanceLimit {
            upstream,
            limit: AtomicUsize::new(limit),
            in_flight: AtomicUsize::new(0),
            controller: Mutex::new(controller),
            counted: AtomicBool::new(false),
            contributed: AtomicUsize::new(0),
            instances: AtomicUsize::new(instances.max(1)),
            limit_gauge,
            in_flight_gauge,
        }
    }

    /// The learnt limit now.
    pub fn limit(&self) -> usize {
        self.limit.load(SeqCst)
    }

    /// Attempts of limited calls on it now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(SeqCst)
    }

    /// Whether an attempt may go here without passing its limit.
    pub fn has_room(&self) -> bool {
        self.in_flight.load(SeqCst) < self.limit.load(SeqCst)
    }

    /// A slot for one attempt. Not refused at the limit: the balancer chose this instance
    /// among those with room when there was one (two calls may race for the last slot and
    /// pass it by one, for one round trip), and the upstream's admission limit bounds the
    /// total either way.
    pub fn take(self: &Arc<Self>) -> InstancePermit {
        let in_flight = self.in_flight.fetch_add(1, SeqCst) + 1;
        InstancePermit {
            limit: self.clone(),
            in_flight,
        }
    }

    /// Puts the instance in rotation (its limit counts toward the upstream's admission
    /// limit) or takes it out (ejected, draining, removed).
    pub fn set_counted(&self, counted: bool) {
        let mut capacity = self.upstream.lock_capacity();
        if self.counted.swap(counted, SeqCst) != counted {
            if counted {
                capacity.counted += 1;
            } else {
                capacity.counted -= 1;
            }
        }
        self.sync(&mut capacity);
        self.upstream.apply(&capacity);
    }

    /// One of `instances` in rotation: the limit it falls back to while idle is its share of
    /// the upstream's `initial_limit`, with the other instances on every gateway replica.
    pub fn share_of(&self, instances: usize) {
        self.instances.store(instances.max(1), Relaxed);
        let mut controller = self
            .controller
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        controller.share_floor(
            &self.upstream.cfg,
            self.upstream.max_connections,
            self.shares(),
        );
    }

    /// The instances in rotation times the gateway replicas.
    fn shares(&self) -> usize {
        self.instances.load(Relaxed) * self.upstream.fleet.replicas()
    }

    /// Whether its limit counts toward the upstream's now.
    pub fn is_counted(&self) -> bool {
        self.counted.load(SeqCst)
    }

    /// Brings its part of the sum in line with its limit and whether it counts.
    fn sync(&self, capacity: &mut Capacity) {
        let part = if self.counted.load(SeqCst) {
            self.limit.load(SeqCst)
        } else {
            0
        };
        let before = self.contributed.swap(part, SeqCst);
        capacity.sum = capacity.sum - before + part;
    }

    fn set_limit(&self, limit: usize) {
        if self.limit.swap(limit, SeqCst) == limit {
            return;
        }
        self.limit_gauge.set(limit as f64);
        if self.counted.load(SeqCst) {
            let mut capacity = self.upstream.lock_capacity();
            self.sync(&mut capacity);
            self.upstream.apply(&capacity);
        }
    }

    /// Sets its gauges (the in-flight one is not kept per call: a scrape reads it).
    pub fn publish(&self) {
        self.limit_gauge.set(self.limit() as f64);
        self.in_flight_gauge.set(self.in_flight() as f64);
    }
}

impl Drop for InstanceLimit {
    fn drop(&mut self) {
        // A forgotten instance stops counting; its series stay, at zero.
        self.set_counted(false);
        self.limit_gauge.set(0.0);
        self.in_flight_gauge.set(0.0);
    }
}

impl std::fmt::Debug for InstanceLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstanceLimit")
            .field("limit", &self.limit())
            .field("in_flight", &self.in_flight())
            .field("counted", &self.is_counted())
            .finish()
    }
}

/// One attempt's slot on its instance; given back when dropped.
pub struct InstancePermit {
    limit: Arc<InstanceLimit>,
    /// Slots held on the instance when it was taken (itself included): whether its round
    /// trip is a no-load sample, and whether the limit held it back (slow start).
    in_flight: usize,
}

impl InstancePermit {
    /// Feeds the attempt's outcome to its instance's controller (once per attempt). A sample
    /// that finds the controller busy with another is skipped rather than waited for: the
    /// limit is a statistic of many attempts, and no call ever queues behind another's
    /// bookkeeping.
    pub fn record(&self, class: u32, sample: Sample) {
        let instance = &self.limit;
        let mut controller = match instance.controller.try_lock() {
            Ok(controller) => controller,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        // The replica count changed since (a replica joined or left the fleet).
        let shares = instance.shares();
        if controller.shares() != shares {
            let upstream = &instance.upstream;
            controller.share_floor(&upstream.cfg, upstream.max_connections, shares);
        }
        let changed = controller.record(Instant::now(), class, self.in_flight, sample);
        let round_trip = controller.fastest_round_trip().unwrap_or_default();
        drop(controller);
        // The upstream's critical wait follows the instance that answered last: the
        // instances of one upstream run the same code, their no-load round trips are close.
        let nanos = u64::try_from(round_trip.as_nanos()).unwrap_or(u64::MAX);
        instance.upstream.round_trip_nanos.store(nanos, Relaxed);
        if !round_trip.is_zero() {
            instance.upstream.ages.set_round_trip(round_trip);
        }
        if let Some(limit) = changed {
            instance.set_limit(limit);
        }
    }
}

impl Drop for InstancePermit {
    fn drop(&mut self) {
        self.limit.in_flight.fetch_sub(1, SeqCst);
    }
}

impl std::fmt::Debug for InstancePermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstancePermit")
            .field("in_flight", &self.in_flight)
            .finish()
    }
}
