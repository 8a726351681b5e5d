//! The limit's arithmetic and its waits, on tokio's paused clock.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::controller::{Controller, Sample};
use super::*;
use crate::config::{ConcurrencyConfig, Dur};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Drives `controller` for `secs` with a saturated upstream of `workers` workers x
/// `service` and a FIFO backlog: every call in flight is the limit, served `workers` at a
/// time, so a round trip is `service x max(1, limit / workers)`. Returns the last limit and
/// round trip.
async fn saturate(
    controller: &mut Controller,
    workers: usize,
    service: Duration,
    secs: u64,
) -> (usize, Duration) {
    let tick = ms(10);
    let mut owed = 0.0;
    let mut rtt = service;
    for _ in 0..(secs * 100) {
        tokio::time::advance(tick).await;
        let limit = controller.limit();
        rtt = service.mul_f64((limit as f64 / workers as f64).max(1.0));
        // Completions this tick: limit / rtt per second.
        owed += limit as f64 * tick.as_secs_f64() / rtt.as_secs_f64();
        while owed >= 1.0 {
            owed -= 1.0;
            controller.record(Instant::now(), 1, limit, Sample::Answered(rtt));
        }
    }
    (controller.limit(), rtt)
}

#[tokio::test(start_paused = true)]
async fn a_saturated_worker_pool_settles_the_limit_just_above_its_workers_whatever_their_number() {
    // Nothing in the defaults knows the upstream: the same settings suit each.
    for (workers, service) in [(16, ms(200)), (4, ms(50)), (64, ms(20)), (16, ms(2))] {
        let mut c = Controller::new(&ConcurrencyConfig::default(), 256, Instant::now());
        // Light demand before the spike shows the no-load latency.
        c.record(Instant::now(), 1, 1, Sample::Answered(service));
        let (limit, rtt) = saturate(&mut c, workers, service, 20).await;
        // Every worker kept busy...
        assert!(limit >= workers, "{workers} x {service:?}: limit {limit}");
        // ...and successes wait at most about as long again as the service time at the
        // upstream (plus the 5 ms slack, which dominates for a 2 ms service).
        assert!(
            rtt <= service * 2 + ms(12),
            "{workers} x {service:?}: limit {limit}, round trip {rtt:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_limit_never_leaves_its_bounds() {
    let cfg = ConcurrencyConfig {
        min_limit: 6,
        max_limit: Some(30),
        ..ConcurrencyConfig::default()
    };
    // 200 workers: the limit would grow past 30 if it could.
    let mut c = Controller::new(&cfg, 256, Instant::now());
    assert_eq!(saturate(&mut c, 200, ms(20), 10).await.0, 30);
    // Timeouts only: halves per window down to the floor (sqrt(limit) headroom would stop
    // at 4), never under it.
    for _ in 0..100 {
        tokio::time::advance(ms(50)).await;
        c.record(Instant::now(), 1, 30, Sample::TimedOut);
    }
    assert_eq!(c.limit(), 6);
    // The upstream's max_connections is the ceiling whatever the section says.
    let c = Controller::new(&ConcurrencyConfig::default(), 8, Instant::now());
    assert_eq!(c.limit(), 8);
}

#[tokio::test(start_paused = true)]
async fn timeouts_halve_the_limit_each_window() {
    let mut c = Controller::new(&ConcurrencyConfig::default(), 256, Instant::now());
    // The first answer sets the class's baseline; windows are then at least 200 ms.
    c.record(Instant::now(), 1, 10, Sample::Answered(ms(200)));
    tokio::time::advance(ms(200)).await;
    let limit = c.record(Instant::now(), 1, 20, Sample::TimedOut);
    // 20 x 0.5, and no headroom: the call made at the limit found a queue.
    assert_eq!(limit, Some(10));
}

#[tokio::test(start_paused = true)]
async fn an_idle_upstream_brings_the_limit_down_toward_twice_its_demand_and_busy_raises_it() {
    let mut c = Controller::new(&ConcurrencyConfig::default(), 256, Instant::now());
    // Busy for a while: the limit grew past the initial 20.
    for _ in 0..100 {
        tokio::time::advance(ms(10)).await;
        c.record(Instant::now(), 1, c.limit(), Sample::Answered(ms(20)));
    }
    assert!(c.limit() > 100, "{}", c.limit());
    for _ in 0..1000 {
        tokio::time::advance(ms(10)).await;
        // Then never more than 3 of the slots busy, answers at the no-load latency: down
        // toward twice the demand, but not under the initial limit.
        c.record(Instant::now(), 1, 3, Sample::Answered(ms(20)));
    }
    assert_eq!(c.limit(), 20);
    let cfg = ConcurrencyConfig {
        initial_limit: 4,
        ..ConcurrencyConfig::default()
    };
    let mut c = Controller::new(&cfg, 256, Instant::now());
    for _ in 0..1000 {
        tokio::time::advance(ms(10)).await;
        c.record(Instant::now(), 1, 3, Sample::Answered(ms(20)));
    }
    // Never full, so no call said that more slots would be served as fast: it stays.
    assert_eq!(c.limit(), 4);
    // Busy (every slot taken), nothing queueing: one more slot per answer.
    for _ in 0..5 {
        tokio::time::advance(ms(10)).await;
        c.record(Instant::now(), 1, c.limit(), Sample::Answered(ms(20)));
    }
    assert_eq!(c.limit(), 9);
    for _ in 0..50 {
        tokio::time::advance(ms(10)).await;
        c.record(Instant::now(), 1, c.limit(), Sample::Answered(ms(20)));
    }
    assert!(c.limit() > 60, "{}", c.limit());
}

#[tokio::test(start_paused = true)]
async fn each_route_is_compared_with_its_own_no_load_latency() {
    let mut c = Controller::new(&ConcurrencyConfig::default(), 256, Instant::now());
    // A product list in 5 ms and a chain in 150 ms, both unloaded, all slots in use: nothing
    // queues, so the limit must not shrink (one baseline for both read the chain as a queue
    // 30 times the list's latency).
    for _ in 0..300 {
        tokio::time::advance(ms(10)).await;
        let busy = c.limit();
        c.record(Instant::now(), 1, busy, Sample::Answered(ms(5)));
        c.record(Instant::now(), 2, busy, Sample::Answered(ms(150)));
    }
    assert!(c.limit() >= 20, "{}", c.limit());
    assert_eq!(c.baseline_of(1), Some(ms(5)));
    assert_eq!(c.baseline_of(2), Some(ms(150)));
}

#[tokio::test(start_paused = true)]
async fn the_no_load_latency_is_the_average_of_light_calls_and_queued_calls_never_move_it() {
    let mut c = Controller::new(&ConcurrencyConfig::default(), 256, Instant::now());
    // Light load on a noisy machine: 80, 100, 120 ms in turn. The average is the baseline,
    // not the luckiest call (which made every typical call look queued).
    let noisy = [ms(80), ms(100), ms(120)];
    for i in 0..300 {
        tokio::time::advance(ms(20)).await;
        c.record(Instant::now(), 1, 1, Sample::Answered(noisy[i % 3]));
    }
    let learnt = c.baseline_of(1).unwrap();
    assert!(learnt > ms(95) && learnt < ms(105), "{learnt:?}");
    // Nothing queued, so the limit did not shrink for the noise.
    assert!(c.limit() >= 4);
    // Saturated at 300 ms for a minute: queueing, not the no-load latency.
    for _ in 0..600 {
        tokio::time::advance(ms(100)).await;
        c.record(Instant::now(), 1, c.limit(), Sample::Answered(ms(300)));
    }
    assert_eq!(c.baseline_of(1), Some(learnt));
    // The upstream really became slower: 200 ms with few calls in flight. Within a few
    // baseline windows it is the new no-load latency.
    for _ in 0..1000 {
        tokio::time::advance(ms(50)).await;
        c.record(Instant::now(), 1, 1, Sample::Answered(ms(200)));
    }
    let relearnt = c.baseline_of(1).unwrap();
    assert!(relearnt > ms(190) && relearnt <= ms(200), "{relearnt:?}");
}

fn limit_of(initial: usize) -> Arc<ConcurrencyLimit> {
    let cfg = ConcurrencyConfig {
        min_limit: 1,
        initial_limit: initial,
        ..ConcurrencyConfig::default()
    };
    Arc::new(ConcurrencyLimit::new("t", &cfg, 256))
}

/// Starts `priority`'s acquire on its own task; returns how long it took and whether it got
/// a slot (the slot is kept until `hold` ends).
fn waiter(
    limit: &Arc<ConcurrencyLimit>,
    priority: Priority,
    hold: Duration,
) -> tokio::task::JoinHandle<(Duration, Result<(), ShedCause>)> {
    let limit = limit.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let result = limit.acquire(priority).await;
        let waited = started.elapsed();
        match result {
            Ok(permit) => {
                tokio::time::sleep(hold).await;
                drop(permit);
                (waited, Ok(()))
            }
            Err(refused) => (waited, Err(refused.cause)),
        }
    })
}

#[tokio::test(start_paused = true)]
async fn under_the_limit_no_wait_at_it_a_burst_waits_the_interval_then_is_refused() {
    let limit = limit_of(2);
    let held = [
        limit.acquire(Priority::Default).await.unwrap(),
        limit.acquire(Priority::Default).await.unwrap(),
    ];
    assert_eq!((limit.in_flight(), limit.waiting()), (2, 0));
    let (waited, result) = waiter(&limit, Priority::Default, ms(0)).await.unwrap();
    assert_eq!(result, Err(ShedCause::QueueTimeout));
    assert_eq!(
        waited,
        ms(100),
        "queue_interval, never the route's deadline"
    );
    // An interval after that refusal (a burst again), a slot freed during the wait goes to
    // the waiter at once.
    tokio::time::sleep(ms(100)).await;
    let w = waiter(&limit, Priority::Default, ms(0));
    tokio::time::sleep(ms(30)).await;
    drop(held);
    let (waited, result) = w.await.unwrap();
    assert_eq!((waited, result), (ms(30), Ok(())));
    assert_eq!((limit.in_flight(), limit.waiting()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn behind_a_standing_queue_waits_shrink_to_the_target_and_sheddable_goes_first() {
    let limit = limit_of(1);
    let _held = limit.acquire(Priority::Default).await.unwrap();
    // A critical waiter keeps the queue non-empty past the interval: it stands.
    let critical = waiter(&limit, Priority::Critical, ms(0));
    tokio::time::sleep(ms(1)).await;
    let first = waiter(&limit, Priority::Default, ms(0));
    tokio::time::sleep(ms(99)).await;
    // The critical waiter waits on even so: two no-load round trips, and with none known
    // yet a second, then is refused.
    let (waited, result) = critical.await.unwrap();
    assert_eq!((waited, result), (ms(1000), Err(ShedCause::QueueTimeout)));
    let _ = first.await;
    // Keep a queue standing: default waiters arriving every 4 ms.
    let mut line = Vec::new();
    for _ in 0..30 {
        line.push(waiter(&limit, Priority::Default, ms(0)));
        tokio::time::sleep(ms(4)).await;
    }
    // Standing now: a default call waits the 5 ms target, a sheddable one not at all.
    let (waited, result) = waiter(&limit, Priority::Default, ms(0)).await.unwrap();
    assert_eq!((waited, result), (ms(5), Err(ShedCause::QueueTimeout)));
    let (waited, result) = waiter(&limit, Priority::Sheddable, ms(0)).await.unwrap();
    assert_eq!((waited, result), (ms(0), Err(ShedCause::QueueFull)));
    for w in line {
        let _ = w.await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_freed_slot_goes_to_the_most_important_waiter() {
    let limit = limit_of(1);
    let held = limit.acquire(Priority::Default).await.unwrap();
    let sheddable = waiter(&limit, Priority::Sheddable, ms(50));
    let default = waiter(&limit, Priority::Default, ms(50));
    let critical = waiter(&limit, Priority::Critical, ms(50));
    tokio::time::sleep(ms(1)).await;
    drop(held);
    // The critical waiter came last and is served first; the default one after it.
    assert_eq!(critical.await.unwrap(), (ms(1), Ok(())));
    assert_eq!(default.await.unwrap(), (ms(51), Ok(())));
    // The sheddable one waited its 5 ms target and was refused long before.
    assert_eq!(
        sheddable.await.unwrap(),
        (ms(5), Err(ShedCause::QueueTimeout))
    );
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_gives_up_while_waiting_takes_no_slot_with_it() {
    let limit = limit_of(1);
    let held = limit.acquire(Priority::Default).await.unwrap();
    let gone = waiter(&limit, Priority::Default, ms(0));
    let next = waiter(&limit, Priority::Default, ms(10));
    tokio::time::sleep(ms(1)).await;
    assert_eq!(limit.waiting(), 2);
    gone.abort();
    let _ = gone.await;
    assert_eq!(limit.waiting(), 1);
    drop(held);
    assert_eq!(next.await.unwrap(), (ms(1), Ok(())));
    assert_eq!((limit.in_flight(), limit.waiting()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_raised_limit_lets_waiters_in_at_once() {
    let cfg = ConcurrencyConfig {
        min_limit: 1,
        initial_limit: 1,
        sample_window: Dur::from_millis(10),
        ..ConcurrencyConfig::default()
    };
    let limit = Arc::new(ConcurrencyLimit::new("t", &cfg, 256));
    let instance = limit.instance("a", 1);
    instance.set_counted(true);
    let busy = limit.acquire(Priority::Default).await.unwrap();
    let attempt = instance.take();
    let w = waiter(&limit, Priority::Default, ms(0));
    tokio::time::sleep(ms(20)).await;
    // A fast answer with every slot busy closes a window: the limit grows by sqrt(1).
    attempt.record(1, Sample::Answered(ms(1)));
    assert_eq!((instance.limit(), limit.limit()), (2, 2));
    assert_eq!(w.await.unwrap(), (ms(20), Ok(())));
    drop(busy);
}

#[tokio::test(start_paused = true)]
async fn after_a_refusal_even_sparse_arrivals_wait_only_the_target_for_an_interval() {
    let limit = limit_of(1);
    let _held = limit.acquire(Priority::Default).await.unwrap();
    // A burst: the first waits the whole interval.
    let (waited, result) = waiter(&limit, Priority::Default, ms(0)).await.unwrap();
    assert_eq!((waited, result), (ms(100), Err(ShedCause::QueueTimeout)));
    // The queue is empty again, but a call was just refused: arrivals further apart than the
    // target (which never make a queue stand) wait the target, not the interval each.
    for _ in 0..5 {
        tokio::time::sleep(ms(20)).await;
        let (waited, result) = waiter(&limit, Priority::Default, ms(0)).await.unwrap();
        assert_eq!((waited, result), (ms(5), Err(ShedCause::QueueTimeout)));
        // Sheddable calls are not even queued meanwhile.
        let (waited, result) = waiter(&limit, Priority::Sheddable, ms(0)).await.unwrap();
        assert_eq!((waited, result), (ms(0), Err(ShedCause::QueueFull)));
    }
    // An interval without a refusal: a burst again.
    tokio::time::sleep(ms(100)).await;
    let (waited, _) = waiter(&limit, Priority::Default, ms(0)).await.unwrap();
    assert_eq!(waited, ms(100));
}

#[tokio::test(start_paused = true)]
async fn a_wait_that_no_answer_can_end_is_refused_at_once_not_after_the_interval() {
    let limit = limit_of(2);
    // An upstream whose no-load round trip (learnt) is 200 ms, slower than the 100 ms burst
    // interval.
    limit.shared.round_trip_nanos.store(200_000_000, Relaxed);
    limit.shared.ages.set_round_trip(ms(200));
    let [first, second] = [
        limit.acquire(Priority::Default).await.unwrap(),
        limit.acquire(Priority::Default).await.unwrap(),
    ];
    // Both slots were just taken: neither call can be answered within the interval, so a
    // wait would end in a refusal 100 ms from now. It is refused at once.
    let (waited, result) = waiter(&limit, Priority::Default, ms(0)).await.unwrap();
    assert_eq!((waited, result), (ms(0), Err(ShedCause::QueueFull)));
    // A critical call waits two round trips: it waits, and gets the first slot freed.
    let critical = waiter(&limit, Priority::Critical, ms(500));
    tokio::time::sleep(ms(50)).await;
    drop(first);
    // 150 ms on, the second call may answer within the interval: a call waits, and gets its
    // slot when it does.
    tokio::time::sleep(ms(100)).await;
    let default = waiter(&limit, Priority::Default, ms(0));
    tokio::time::sleep(ms(50)).await;
    drop(second);
    assert_eq!(default.await.unwrap(), (ms(50), Ok(())));
    assert_eq!(critical.await.unwrap(), (ms(50), Ok(())));
    // No round trip known, or one faster than the interval: the burst's wait as before.
    let limit = limit_of(1);
    let _held = limit.acquire(Priority::Default).await.unwrap();
    let (waited, _) = waiter(&limit, Priority::Default, ms(0)).await.unwrap();
    assert_eq!(waited, ms(100));
    tokio::time::sleep(ms(100)).await;
    limit.shared.round_trip_nanos.store(50_000_000, Relaxed);
    let (waited, _) = waiter(&limit, Priority::Default, ms(0)).await.unwrap();
    assert_eq!(waited, ms(100));
}

/// Keeps one call holding the only slot of `limit` for `rounds` x 20 ms, each next call
/// arriving 2 ms before the one holding it leaves: every call finds the limit full, and
/// every one is served within the 5 ms target (none is refused).
async fn hand_over(limit: &Arc<ConcurrencyLimit>, rounds: usize) {
    let mut holder = waiter(limit, Priority::Default, ms(20));
    for _ in 0..rounds {
        tokio::time::sleep(ms(18)).await;
        let next = waiter(limit, Priority::Default, ms(20));
        let (waited, result) = holder.await.unwrap();
        assert!(result.is_ok() && waited <= ms(2), "{waited:?} {result:?}");
        holder = next;
    }
    let (waited, result) = holder.await.unwrap();
    assert!(result.is_ok() && waited <= ms(2), "{waited:?} {result:?}");
}

#[tokio::test(start_paused = true)]
async fn overloaded_lasts_while_calls_keep_finding_the_limit_full_not_one_interval() {
    let limit = limit_of(1);
    let held = limit.acquire(Priority::Default).await.unwrap();
    let (waited, result) = waiter(&limit, Priority::Default, ms(0)).await.unwrap();
    assert_eq!((waited, result), (ms(100), Err(ShedCause::QueueTimeout)));
    drop(held);
    // 300 ms without a refusal, but every call found the limit full: still overloaded (it
    // used to end an interval after the refusal, and the next arrivals each waited 100 ms
    // for nothing under a steady spike).
    hand_over(&limit, 15).await;
    let _busy = limit.acquire(Priority::Default).await.unwrap();
    let (waited, result) = waiter(&limit, Priority::Default, ms(0)).await.unwrap();
    assert_eq!((waited, result), (ms(5), Err(ShedCause::QueueTimeout)));
    // An interval in which no call found the limit full: the demand fell under it, and the
    // next call waits as in a burst.
    tokio::time::sleep(ms(100)).await;
    let (waited, result) = waiter(&limit, Priority::Default, ms(0)).await.unwrap();
    assert_eq!((waited, result), (ms(100), Err(ShedCause::QueueTimeout)));
    drop(_busy);
    // And at most ten intervals after the last refusal, however full the limit stays.
    hand_over(&limit, 55).await;
    let _busy = limit.acquire(Priority::Default).await.unwrap();
    let (waited, _) = waiter(&limit, Priority::Default, ms(0)).await.unwrap();
    assert_eq!(waited, ms(100));
}

// ---- Per instance: each learns its own limit, the upstream admits against their sum. ----

use crate::config::{BalancerKind, UpstreamConfig};
use crate::upstream::balancer::Picker;
use crate::upstream::call::Outcome;
use crate::upstream::instances::{test_endpoints, InstanceSet};

/// A set of `n` instances on 127.0.0.1:9000.., each with its own limit made by `limit`.
pub(super) fn limited_set(limit: &ConcurrencyLimit, n: u16) -> Arc<InstanceSet> {
    let cfg = UpstreamConfig {
        url: "http://127.0.0.1:9000".into(),
        ..UpstreamConfig::default()
    };
    let set = InstanceSet::new("t", &cfg, Box::new(|_| Ok(reqwest::Client::new())))
        .limited_by(Some(limit.clone()));
    set.update(&test_endpoints(0..n));
    Arc::new(set)
}

/// The learnt limit of each instance, in order.
fn limits(set: &InstanceSet) -> Vec<usize> {
    set.active()
        .iter()
        .map(|i| i.limit.as_ref().map_or(0, |l| l.limit()))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn the_admission_limit_is_the_sum_of_the_instances_in_rotation() {
    let cfg = ConcurrencyConfig {
        initial_limit: 30,
        ..ConcurrencyConfig::default()
    };
    let limit = ConcurrencyLimit::new("t", &cfg, 256);
    // Before the first resolution: the upstream's initial limit.
    assert_eq!(limit.limit(), 30);
    // Three instances share it: the upstream starts where it was configured to, whatever
    // the number of instances.
    let set = limited_set(&limit, 3);
    assert_eq!(limits(&set), [10, 10, 10]);
    assert_eq!(limit.limit(), 30);
    // An ejected instance's capacity is gone at once...
    let bad = set.active()[0].clone();
    for _ in 0..5 {
        set.finish(&bad, Outcome::ConnectError);
    }
    assert!(bad.health().ejected_until.is_some());
    assert_eq!(limit.limit(), 20);
    // ...and back when its ejection ends (noticed at the next choice).
    tokio::time::advance(Duration::from_secs(10)).await;
    let _ = set.serving(Instant::now());
    assert_eq!(limit.limit(), 30);
    // A removed instance stops counting, even with attempts still in flight on it.
    let draining = set.active()[2].clone();
    let attempt = draining.limit.as_ref().unwrap().take();
    set.update(&test_endpoints(0..2));
    assert_eq!(limit.limit(), 20);
    drop(attempt);
    drop(draining);
    set.update(&test_endpoints(0..2));
    assert_eq!(limit.limit(), 20);
    // A learnt limit counts as it changes: one instance's growth is the upstream's.
    let grown = set.active()[1].clone();
    let slots: Vec<_> = (0..10)
        .map(|_| grown.limit.as_ref().unwrap().take())
        .collect();
    slots[9].record(1, Sample::Answered(ms(20)));
    let learnt = grown.limit.as_ref().unwrap().limit();
    assert!(learnt > 10, "every slot busy, nothing queued: it grows");
    assert_eq!(limit.limit(), 10 + learnt);
    // The cap: max_connections.
    let small = ConcurrencyLimit::new("t", &cfg, 25);
    let _set = limited_set(&small, 3);
    assert_eq!(small.limit(), 25);
}

#[tokio::test(start_paused = true)]
async fn an_instance_at_its_limit_gets_no_limited_attempt_while_another_has_room() {
    let cfg = ConcurrencyConfig {
        min_limit: 1,
        initial_limit: 2,
        ..ConcurrencyConfig::default()
    };
    let limit = ConcurrencyLimit::new("t", &cfg, 256);
    let set = limited_set(&limit, 2);
    let (full, other) = (set.active()[0].clone(), set.active()[1].clone());
    let _held = [
        full.limit.as_ref().unwrap().take(),
        full.limit.as_ref().unwrap().take(),
    ];
    for kind in [BalancerKind::P2cEwma, BalancerKind::RoundRobin] {
        let picker = Picker::new(kind);
        for _ in 0..200 {
            assert_eq!(picker.pick(&set, &[], true).unwrap().id, other.id);
        }
        // A retry of a call that tried `other` still does not pass `full`'s limit while
        // `other` has room again (its attempt ended).
        assert_eq!(picker.pick(&set, &[other.id], true).unwrap().id, other.id);
        // Calls outside the limit (WebSocket handshakes) are not held to it.
        let unlimited = (0..200)
            .filter(|_| picker.pick(&set, &[], false).unwrap().id == full.id)
            .count();
        assert!(unlimited > 0);
    }
    // A hedge or a retry elsewhere needs an untried instance with room.
    assert!(!set.has_untried(&[other.id], true));
    assert!(set.has_untried(&[other.id], false));
    // Both full: the call was admitted all the same (a limit just shrank), so it goes to
    // one of them rather than nowhere.
    let _also = [
        other.limit.as_ref().unwrap().take(),
        other.limit.as_ref().unwrap().take(),
    ];
    assert!(Picker::new(BalancerKind::P2cEwma)
        .pick(&set, &[], true)
        .is_some());
}

/// One simulated instance: `workers` served at once for `service` each, the rest in a FIFO
/// backlog (gunicorn's sync workers), as tokio's fair semaphore queues them.
struct Worker {
    pool: tokio::sync::Semaphore,
    service: Duration,
}

/// What the simulated spike saw.
#[derive(Debug, Default)]
struct Seen {
    served: [usize; 2],
    refused: usize,
    /// Most attempts of limited calls at once on each instance.
    peak: [usize; 2],
    /// Slowest round trip on each instance in the second half of the spike.
    slowest: [Duration; 2],
}

#[tokio::test(start_paused = true)]
async fn two_instances_of_different_capacity_learn_their_own_limits_and_share_a_spike_by_them() {
    // 4 and 16 workers x 50 ms: 80 + 320 = 400 calls/s. Offered 800/s for 10 s.
    let limit = Arc::new(ConcurrencyLimit::new(
        "t",
        &ConcurrencyConfig::default(),
        256,
    ));
    let set = limited_set(&limit, 2);
    let workers = Arc::new([
        Worker {
            pool: tokio::sync::Semaphore::new(4),
            service: ms(50),
        },
        Worker {
            pool: tokio::sync::Semaphore::new(16),
            service: ms(50),
        },
    ]);
    let picker = Arc::new(Picker::new(BalancerKind::P2cEwma));
    let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
    let start = Instant::now();
    let spike = Duration::from_secs(10);
    let mut calls = Vec::new();
    while start.elapsed() < spike {
        let (limit, set, workers, picker, seen) = (
            limit.clone(),
            set.clone(),
            workers.clone(),
            picker.clone(),
            seen.clone(),
        );
        calls.push(tokio::spawn(async move {
            let Ok(_permit) = limit.acquire(Priority::Default).await else {
                seen.lock().unwrap().refused += 1;
                return;
            };
            // What the balancer layer does for a limited call's attempt.
            let instance = picker.pick(&set, &[], true).expect("an instance");
            let _load = instance.start();
            let slot = instance.limit.as_ref().unwrap().take();
            let i = instance.id as usize;
            let sent = Instant::now();
            {
                let mut s = seen.lock().unwrap();
                s.peak[i] = s.peak[i].max(instance.limit.as_ref().unwrap().in_flight());
            }
            let worker = workers[i].pool.acquire().await.unwrap();
            tokio::time::sleep(workers[i].service).await;
            drop(worker);
            let rtt = sent.elapsed();
            instance.load.sample(rtt, Instant::now());
            slot.record(1, Sample::Answered(rtt));
            let mut s = seen.lock().unwrap();
            s.served[i] += 1;
            if sent.duration_since(start) > spike / 2 {
                s.slowest[i] = s.slowest[i].max(rtt);
            }
        }));
        tokio::time::sleep(Duration::from_micros(1250)).await;
    }
    for call in calls {
        call.await.unwrap();
    }
    let seen = seen.lock().unwrap();
    let [small, big] = limits(&set)[..] else {
        unreachable!()
    };
    // Each learnt its own: the small one a few slots above its 4 workers, the big one a
    // few above its 16 (nothing told them the worker counts; the controller keeps about
    // sqrt(limit) queued at each, so that no worker idles while a slot travels back).
    assert!((4..=12).contains(&small), "{small} / {big}: {seen:?}");
    // The big one's limit when the spike ends varies with the order the runtime polls the
    // calls in (seen: 20-60 over runs); what matters is that it is well above the small one's.
    assert!((16..=64).contains(&big), "{small} / {big}: {seen:?}");
    assert!(big >= small * 2, "{small} / {big}: {seen:?}");
    // The spike was served at about the sum of the capacities (4,000 in 10 s)...
    let served = seen.served[0] + seen.served[1];
    assert!(served >= 3_400, "{served}: {seen:?}");
    // ...each instance about in proportion to its workers...
    assert!(seen.served[1] > seen.served[0] * 3, "{seen:?}");
    // ...and the small one never flooded: never more in flight than its initial limit, and
    // once learnt, round trips within a few service times (one limit for the upstream, 30
    // or so, sent half of it here: round trips of 4 service times and more).
    assert!(seen.peak[0] <= 21, "{seen:?}");
    assert!(seen.slowest[0] <= ms(175), "{seen:?}");
    // The big one overshoots in some poll orders (a limit near 60 for its 16 workers, round
    // trips up to 3.6 service times): a known weakness of the growth at the spike's end,
    // bounded here so that it cannot get worse unseen.
    assert!(seen.slowest[1] <= ms(200), "{seen:?}");
}
