//! The adaptive concurrency limit of one upstream, learnt per instance, and the short wait
//! for a slot under it.
//!
//! Overload is not failure. When demand exceeds what an upstream can serve, a queue forms
//! somewhere: in the upstream's backlog, or in the gateway waiting for a connection. Either
//! queue holds requests for seconds (every client waits, clients retry, deadlines fire, and
//! a healthy service is marked down). So:
//!
//! - each instance learns its own limit from the round trips of the attempts sent to it
//!   ([`controller`], one per instance, in `instance.rs`): attempts in flight beyond what the
//!   instance serves at once only queue there, and show as round trips above its no-load
//!   latency. A slower instance, or one with fewer workers, learns a smaller limit. Each
//!   stays under the static bulkhead (`max_connections`), the hard ceiling;
//! - the upstream admits calls against the SUM of the limits of its instances in rotation
//!   (ejected and draining ones do not count; before the first resolution, `initial_limit`),
//!   capped by `max_connections`. The instances share `initial_limit`, and so do the
//!   gateway replicas ([`Fleet`]): each starts at, and while idle falls back to,
//!   `initial_limit / (instances x replicas)`, so that an upstream of three instances behind
//!   two replicas meets a spike with the limit it was configured to start at, not six times
//!   it (its capacity is unknown until round trips show it; slow start doubles a limit
//!   per round trip where nothing queues). The
//!   balancer then sends each attempt to an instance under its own limit (P2C among those
//!   with room). One queue per upstream, not one per instance: a shared queue in front of
//!   all instances is join-the-shortest-queue (a freed slot anywhere serves the oldest, or
//!   under overload the newest, waiter), where a queue per instance strands a waiter behind
//!   a slow instance while another has room. The wait stays out of the balancer: the
//!   instance is chosen when the call has a slot, with the freshest loads;
//! - a call without a slot waits only briefly, CoDel-style ("Fail at Scale"): up to
//!   `queue_interval` while the queue has been empty within the last interval (a burst),
//!   up to `queue_target` once a queue stands, or a waiter was refused and calls have kept
//!   finding the limit full since, at least once per interval, for up to ten intervals
//!   (overloaded), and the newest waiter is served first then (adaptive LIFO: the
//!   oldest have waited longest and are likeliest to be given up on).
//!   Then it is refused: [`Refused`], `503 overloaded` with `Retry-After`. It is refused at
//!   once when no answer can end its wait: slots free (and the limit grows) only as calls
//!   answer, and no call is expected back before the upstream's no-load round trip, so if
//!   fewer of the calls holding slots were admitted that long ago (less the wait) than
//!   there are waiters to serve before it, the wait could only end in the refusal. At the
//!   start of a spike on an upstream slower than `queue_interval`, that is every call that
//!   finds the limit full before the first answers (they waited the whole interval for
//!   nothing: issue 24's refusals of ~100 ms in the first second); a burst to a healthy
//!   upstream meets the same answers, so it loses nothing it had. Such a refusal counts as
//!   one for the overloaded state. Only for the burst's wait: once overloaded, the wait is
//!   `queue_target`, and judging it against the no-load round trip (an average, some
//!   answers come sooner) refused calls that a slot freed within it would have served. A
//!   refusal is not a failure of the upstream: the breaker, ejection and retries never see
//!   it;
//! - priorities: critical calls are served first and wait two no-load round trips (at least
//!   `queue_interval`, at most a second) even when overloaded; sheddable calls are served last, wait `queue_target` at most, and not
//!   at all when overloaded.
//!
//! Under the limit a call costs two atomics (a load and a compare-and-swap) to enter the
//! upstream, a clock read, two loads and an increment to count it in its cohort of
//! admission (a compare-and-swap once per cohort, an eighth of a round trip), one to take
//! its instance's slot and a load per candidate instance to see room,
//! the same to leave, and a `try_lock` of its instance's controller to feed it the round
//! trip; the queue's lock is taken only when there are waiters, the capacity's lock only
//! when an instance's limit or the set of instances in rotation changes.
//!
//! - `ages.rs`: when the calls holding slots were admitted (cohorts of atomic counters), for
//!   the refusal of a wait that no answer can end.
//! - `controller.rs`: the arithmetic of one instance's limit, on a paused clock in the tests.
//! - `fleet.rs`: [`Fleet`], how many gateway replicas share the upstreams (announced in
//!   the rate limiter's Redis).
//! - `instance.rs`: [`InstanceLimit`], one instance's controller, limit and slots, and its
//!   share of the upstream's admission limit.
//! - `spike.rs`: demand steps (the 4x spike, a step up to capacity after a quiet
//!   spell) through whole replicas to simulated worker pools, on a paused clock.
//! - `tests.rs`: the arithmetic and the waits, on a paused clock.

mod ages;
pub mod controller;
mod fleet;
mod instance;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::config::{ConcurrencyConfig, Priority};
use ages::Ages;
pub use controller::Sample;
pub use fleet::{Fleet, ANNOUNCE_EVERY, ANNOUNCE_TTL};
pub use instance::{InstanceLimit, InstancePermit};

/// The longest a critical call waits for a slot, whatever the upstream's latency.
const CRITICAL_WAIT_MAX: Duration = Duration::from_secs(1);

/// Why a call was refused a slot (the `cause` label of `gateway_shed_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShedCause {
    /// It waited as long as its priority allows.
    QueueTimeout,
    /// It could not wait at all: a sheddable call while overloaded, or
    /// `max_connections` calls already waiting.
    QueueFull,
}

impl ShedCause {
    pub const ALL: [ShedCause; 2] = [ShedCause::QueueTimeout, ShedCause::QueueFull];

    pub fn as_str(self) -> &'static str {
        match self {
            ShedCause::QueueTimeout => "queue_timeout",
            ShedCause::QueueFull => "queue_full",
        }
    }
}

/// A call got no slot under the limit in the time its priority may wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("upstream at its concurrency limit ({limit}): {}", cause.as_str())]
pub struct Refused {
    pub cause: ShedCause,
    /// The limit when it was refused.
    pub limit: usize,
}

/// One upstream's admission limit (the sum of its instances' learnt limits) and the calls
/// waiting under it. Cheap to clone: the instance set keeps one to make each instance's
/// [`InstanceLimit`].
#[derive(Clone)]
pub struct ConcurrencyLimit {
    shared: Arc<Shared>,
}

struct Shared {
    /// The admission limit (whole slots): the instances' limits summed, see [`Capacity`].
    limit: AtomicUsize,
    /// Slots held.
    in_flight: AtomicUsize,
    /// Calls in `queue`: read without the lock, so that releasing a slot takes it only when
    /// someone waits.
    waiting: AtomicUsize,
    queue: Mutex<Queue>,
    /// The instances' contributions to `limit`; locked only when one changes.
    capacity: Mutex<Capacity>,
    /// The section each instance's controller is built from.
    cfg: ConcurrencyConfig,
    /// The ceiling of the admission limit and of each instance's.
    max_connections: usize,
    /// The gateway replicas that share `initial_limit` with this one.
    fleet: Arc<Fleet>,
    /// The admission limit while no instance counts (before the first resolution).
    initial_limit: usize,
    /// Labels the instances' metrics.
    upstream: Arc<str>,
    target: Duration,
    interval: Duration,
    /// The fastest latency class's no-load round trip, in nanoseconds (0: none yet): how long
    /// a critical call may wait.
    round_trip_nanos: AtomicU64,
    /// When the calls holding slots were admitted: whether a wait can end before its budget.
    ages: Ages,
    /// Most calls waiting at once (`max_connections`): the waits are short, so this only
    /// bounds what a burst can make the queue cost.
    max_waiting: usize,
    /// `gateway_upstream_concurrency_limit{upstream}`: the admission limit.
    limit_gauge: metrics::Gauge,
    /// `gateway_upstream_queue_wait_seconds{upstream}`: calls that had to wait, served or not.
    wait_seconds: metrics::Histogram,
}

#[derive(Default)]
struct Queue {
    /// One line per priority, most important first.
    lines: [VecDeque<Waiter>; 3],
    /// When the queue was last empty: a queue not empty for `interval` is standing.
    last_empty: Option<Instant>,
    /// Until when the limit counts as overloaded because a waiter waited its whole budget
    /// ([`SHEDDING_HOLD`] intervals after the last such refusal): when arrivals are further
    /// apart than `queue_target`, the queue empties between them and never stands, yet every
    /// one of them would wait `queue_interval` for nothing. It ends sooner when an interval
    /// passes in which no call had to wait (`last_wait`): the demand fell under the limit.
    shedding_until: Option<Instant>,
    /// When a call last found the limit full: arrived to it (and waited, or was refused at
    /// once), or left the line refused.
    last_wait: Option<Instant>,
    next_id: u64,
}

/// How many `queue_interval`s a refusal keeps the limit overloaded while calls keep finding
/// it full. One interval (as at first) let the state flicker off under a steady 4x spike
/// whenever the limit grew and no waiter happened to be refused for 100 ms; each flicker
/// then gave the next arrivals the burst's 100 ms wait before refusing them (chaos 17:
/// refusals p99 50-102 ms against the 20 ms).
const SHEDDING_HOLD: u32 = 10;

struct Waiter {
    id: u64,
    grant: oneshot::Sender<()>,
}

/// What the instances in rotation add up to. Each [`InstanceLimit`] keeps its own part in
/// step under this lock (its limit changed, or it entered or left rotation), so the sum is
/// never built from two instances' stale views.
#[derive(Debug, Default)]
struct Capacity {
    /// The limits of the instances that count, summed.
    sum: usize,
    /// How many instances count: none (not resolved yet) admits `initial_limit`.
    counted: usize,
}

impl Queue {
    fn len(&self) -> usize {
        self.lines.iter().map(VecDeque::len).sum()
    }

    /// A queue has stood for `interval`; or a waiter was refused within the last
    /// [`SHEDDING_HOLD`] intervals and since then no interval passed without a call finding
    /// the limit full.
    fn overloaded(&self, now: Instant, interval: Duration) -> bool {
        let standing = self.len() > 0
            && self
                .last_empty
                .is_some_and(|at| now.duration_since(at) >= interval);
        let shedding = self.shedding_until.is_some_and(|until| now < until)
            && self
                .last_wait
                .is_some_and(|at| now.duration_since(at) < interval);
        standing || shedding
    }

    /// The next waiter: most important line first; newest first when overloaded.
    fn pop(&mut self, now: Instant, interval: Duration) -> Option<Waiter> {
        let lifo = self.overloaded(now, interval);
        let line = self.lines.iter_mut().find(|l| !l.is_empty())?;
        let waiter = if lifo {
            line.pop_back()
        } else {
            line.pop_front()
        };
        if self.len() == 0 {
            self.last_empty = Some(now);
        }
        waiter
    }

    /// Takes waiter `id` out of `line` (it gave up waiting: overloaded for a while, see
    /// [`Queue::overloaded`]); `false` if it is not there (it was granted a slot).
    fn remove(&mut self, line: usize, id: u64, now: Instant, interval: Duration) -> bool {
        let Some(at) = self.lines[line].iter().position(|w| w.id == id) else {
            return false;
        };
        self.lines[line].remove(at);
        if self.len() == 0 {
            self.last_empty = Some(now);
        }
        self.refused(now, interval);
        true
    }

    /// A waiter was refused for want of a slot: overloaded for a while.
    fn refused(&mut self, now: Instant, interval: Duration) {
        self.shedding_until = Some(now + interval * SHEDDING_HOLD);
        self.last_wait = Some(now);
    }
}

fn line_of(priority: Priority) -> usize {
    match priority {
        Priority::Critical => 0,
        Priority::Default => 1,
        Priority::Sheddable => 2,
    }
}

impl Shared {
    fn lock_queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a slot if the limit has room.
    fn try_take(&self) -> Option<usize> {
        let limit = self.limit.load(SeqCst);
        self.in_flight
            .fetch_update(SeqCst, SeqCst, |n| (n < limit).then_some(n + 1))
            .ok()
            .map(|n| n + 1)
    }

    /// Hands free slots to waiters (under the queue's lock).
    fn admit(&self, queue: &mut Queue) {
        let now = Instant::now();
        while queue.len() > 0 {
            if self.try_take().is_none() {
                return;
            }
            let Some(waiter) = queue.pop(now, self.interval) else {
                self.in_flight.fetch_sub(1, SeqCst);
                return;
            };
            self.waiting.fetch_sub(1, SeqCst);
            if waiter.grant.send(()).is_err() {
                // Its receiver is gone without leaving the line: impossible while waiters
                // leave under this lock, but never keep a slot for nobody.
                self.in_flight.fetch_sub(1, SeqCst);
            }
        }
    }

    fn release(&self) {
        self.in_flight.fetch_sub(1, SeqCst);
        // Paired with the waiter's increment of `waiting` before its last look at the slots:
        // one of the two sees the other, so a freed slot never idles while someone waits.
        if self.waiting.load(SeqCst) > 0 {
            self.admit(&mut self.lock_queue());
        }
    }

    /// How long a critical call may wait: two no-load round trips of the upstream (time for
    /// the calls in flight to answer and slow start to add slots: a burst of logins to a
    /// healthy auth service is served, not shed), at least `queue_interval`, at most
    /// [`CRITICAL_WAIT_MAX`]; that maximum before any round trip is known.
    fn critical_wait(&self) -> Duration {
        match self.round_trip_nanos.load(Relaxed) {
            0 => CRITICAL_WAIT_MAX,
            nanos => (Duration::from_nanos(nanos) * 2).clamp(self.interval, CRITICAL_WAIT_MAX),
        }
    }

    /// Whether a wait of `budget` from `now` can end only in a refusal: slots free as calls
    /// answer (and the limit grows only on answers), and no call is expected back before the
    /// upstream's no-load round trip; fewer than `ahead + 1` calls holding slots were
    /// admitted long enough ago to answer within the budget. Never for an upstream faster
    /// than the budget, nor before a round trip is known; only asked for the burst's wait
    /// (see the module docs).
    fn hopeless(&self, now: Instant, budget: Duration, ahead: usize) -> bool {
        let round_trip = Duration::from_nanos(self.round_trip_nanos.load(Relaxed));
        match round_trip.checked_sub(budget) {
            Some(age) if !age.is_zero() => self.ages.older_than(now, age) <= ahead,
            _ => false,
        }
    }

    fn lock_capacity(&self) -> MutexGuard<'_, Capacity> {
        self.capacity.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the admission limit from the instances' capacity (under its lock, so two
    /// changes never store their sums out of order).
    fn apply(&self, capacity: &Capacity) {
        let limit = match capacity.counted {
            0 => self.initial_limit,
            _ => capacity.sum.clamp(1, self.max_connections.max(1)),
        };
        self.set_limit(limit);
    }

    fn set_limit(&self, limit: usize) {
        let old = self.limit.swap(limit, SeqCst);
        if old != limit {
            self.limit_gauge.set(limit as f64);
        }
        if limit > old && self.waiting.load(SeqCst) > 0 {
            self.admit(&mut self.lock_queue());
        }
    }
}

/// A slot under the upstream's admission limit; given back when dropped. The attempts of
/// its call each take a slot of their instance besides ([`InstancePermit`]).
pub struct Permit {
    shared: Arc<Shared>,
    /// Slots held when it was granted (itself included), for the tests and `Debug`.
    in_flight: usize,
    /// Its cohort in the upstream's [`Ages`].
    cohort: usize,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.shared.ages.leave(self.cohort);
        self.shared.release();
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

/// A waiter's place in line; leaving it (a timeout, or the caller gave up) takes it out, and
/// gives back a slot granted in the meantime.
struct Place<'a> {
    shared: &'a Arc<Shared>,
    line: usize,
    id: u64,
    grant: Option<oneshot::Receiver<()>>,
}

impl Place<'_> {
    /// Leaves the line; `true` if a slot was granted before it could.
    fn leave(&mut self) -> bool {
        let removed = self.shared.lock_queue().remove(
            self.line,
            self.id,
            Instant::now(),
            self.shared.interval,
        );
        if removed {
            self.shared.waiting.fetch_sub(1, SeqCst);
        }
        let granted = !removed
            && self
                .grant
                .take()
                .is_some_and(|mut rx| rx.try_recv().is_ok());
        self.grant = None;
        granted
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        if self.grant.is_some() && self.leave() {
            // Granted as the caller gave up: the slot goes to the next in line.
            self.shared.release();
        }
    }
}

impl ConcurrencyLimit {
    /// `upstream` labels the metrics; the limit starts at `initial_limit`, and follows the
    /// instances once [`ConcurrencyLimit::instance`] made some.
    pub fn new(upstream: &str, cfg: &ConcurrencyConfig, max_connections: usize) -> Self {
        ConcurrencyLimit::in_fleet(upstream, cfg, max_connections, Fleet::single())
    }

    /// [`ConcurrencyLimit::new`] on one of `fleet`'s replicas: its instances' shares of
    /// `initial_limit` are divided among the replicas too.
    pub fn in_fleet(
        upstream: &str,
        cfg: &ConcurrencyConfig,
        max_connections: usize,
        fleet: Arc<Fleet>,
    ) -> Self {
        let (min, max) = cfg.bounds(max_connections);
        let limit = cfg.initial_limit.clamp(min, max);
        let limit_gauge = metrics::gauge!("gateway_upstream_concurrency_limit",
            "upstream" => upstream.to_string());
        limit_gauge.set(limit as f64);
        ConcurrencyLimit {
            shared: Arc::new(Shared {
                limit: AtomicUsize::new(limit),
                in_flight: AtomicUsize::new(0),
                waiting: AtomicUsize::new(0),
                queue: Mutex::default(),
                capacity: Mutex::default(),
                cfg: cfg.clone(),
                max_connections,
                fleet,
                initial_limit: limit,
                upstream: Arc::from(upstream),
                target: cfg.queue_target.0,
                interval: cfg.queue_interval.0,
                max_waiting: max_connections.max(1),
                round_trip_nanos: AtomicU64::new(0),
                ages: Ages::new(Instant::now()),
                limit_gauge,
                wait_seconds: metrics::histogram!("gateway_upstream_queue_wait_seconds",
                    "upstream" => upstream.to_string()),
            }),
        }
    }

    /// A slot under the limit, at once or after a wait bounded by `priority` (see the
    /// module docs); cancel-safe.
    pub async fn acquire(&self, priority: Priority) -> Result<Permit, Refused> {
        let shared = &self.shared;
        let permit = |in_flight| Permit {
            shared: shared.clone(),
            in_flight,
            cohort: shared.ages.enter(Instant::now()),
        };
        if shared.waiting.load(SeqCst) == 0 {
            if let Some(n) = shared.try_take() {
                return Ok(permit(n));
            }
        }
        let started = Instant::now();
        let (tx, rx) = oneshot::channel();
        let (line, id, budget) = {
            let mut queue = shared.lock_queue();
            if queue.len() == 0 {
                if let Some(n) = shared.try_take() {
                    return Ok(permit(n));
                }
            }
            // Whether overloaded, as the calls before this one left it; then this one found
            // the limit full too.
            let overloaded = queue.overloaded(started, shared.interval);
            queue.last_wait = Some(started);
            let budget = match (priority, overloaded) {
                (Priority::Critical, _) => shared.critical_wait(),
                (Priority::Default, false) => shared.interval,
                (Priority::Default, true) | (Priority::Sheddable, false) => shared.target,
                (Priority::Sheddable, true) => Duration::ZERO,
            };
            let limit = shared.limit.load(SeqCst);
            let line = line_of(priority);
            // Served before it: the more important lines, and its own unless the newest is
            // served first (overloaded).
            let ahead: usize = queue.lines[..line + usize::from(!overloaded)]
                .iter()
                .map(VecDeque::len)
                .sum();
            let hopeless =
                !overloaded && !budget.is_zero() && shared.hopeless(started, budget, ahead);
            if hopeless {
                // Refused as if it had waited: the calls after it wait the target, not the
                // burst's interval.
                queue.refused(started, shared.interval);
            }
            if budget.is_zero() || queue.len() >= shared.max_waiting || hopeless {
                return Err(Refused {
                    cause: ShedCause::QueueFull,
                    limit,
                });
            }
            if queue.len() == 0 {
                queue.last_empty = Some(started);
            }
            let id = queue.next_id;
            queue.next_id += 1;
            queue.lines[line].push_back(Waiter { id, grant: tx });
            shared.waiting.fetch_add(1, SeqCst);
            // A slot freed since the look above went unclaimed: claim it for the line.
            shared.admit(&mut queue);
            (line, id, budget)
        };
        let mut place = Place {
            shared,
            line,
            id,
            grant: Some(rx),
        };
        let granted = match place.grant.as_mut() {
            Some(rx) => matches!(tokio::time::timeout(budget, rx).await, Ok(Ok(()))),
            None => false,
        };
        let granted = if granted {
            place.grant = None;
            true
        } else {
            place.leave()
        };
        shared.wait_seconds.record(started.elapsed().as_secs_f64());
        if granted {
            Ok(permit(shared.in_flight.load(SeqCst)))
        } else {
            Err(Refused {
                cause: ShedCause::QueueTimeout,
                limit: shared.limit.load(SeqCst),
            })
        }
    }

    /// The limit of a new instance of this upstream, one of `instances`: it starts at its
    /// share of `initial_limit` (the upstream's limit at start is `initial_limit`, however
    /// many instances it has), and does not count toward the admission limit until
    /// [`InstanceLimit::set_counted`] says so. `address` labels its metrics.
    pub fn instance(&self, address: &str, instances: usize) -> Arc<InstanceLimit> {
        Arc::new(InstanceLimit::new(self.shared.clone(), address, instances))
    }

    /// The admission limit now: the limits of the instances in rotation, summed.
    pub fn limit(&self) -> usize {
        self.shared.limit.load(SeqCst)
    }

    /// Slots held now.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(SeqCst)
    }

    /// Calls waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.shared.waiting.load(SeqCst)
    }
}

#[cfg(test)]
mod spike;
#[cfg(test)]
mod tests;
