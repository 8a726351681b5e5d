//! Demand steps through gateway replicas to simulated worker pools, on tokio's paused clock:
//! what the spike (and a step up to at most capacity) does to the first seconds.
//!
//! Each replica is what the gateway builds for an upstream (its admission limit, its
//! instances with their own limits, the P2C picker), and each instance of the upstream is a
//! FIFO backlog in front of `workers` workers of `service` each (gunicorn sync workers), as
//! the simulators' capacity fault is. Arrivals are an open model (a fixed rate, alternating
//! between the replicas that take traffic).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::tests::limited_set;
use super::*;
use crate::config::{BalancerKind, ConcurrencyConfig};
use crate::upstream::balancer::Picker;
use crate::upstream::instances::InstanceSet;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// One call, as its client saw it.
#[derive(Clone, Copy, Debug)]
struct Call {
    /// When it arrived, in seconds from the step (negative: before it).
    at: f64,
    took: Duration,
    served: bool,
}

/// A run: calm demand, then a step.
struct Step {
    /// Gateway replicas with their own limits (none shared).
    replicas: usize,
    /// How many of them take the traffic (the first ones).
    busy_replicas: usize,
    /// Workers per instance of the upstream.
    workers: Vec<usize>,
    service: Duration,
    /// Calls per second before the step, for 5 s...
    calm: u32,
    /// ...and after it, for `step_secs`.
    step: u32,
    step_secs: u64,
    /// Each call's service time is `service` times a factor drawn evenly from
    /// `[1, 1 + jitter]` (a real service is never exactly as fast twice).
    jitter: f64,
    /// Whether the replicas know how many they are (a [`Fleet`] announced in Redis), and
    /// share each upstream's `initial_limit`; if not, each takes the whole of it.
    counted: bool,
}

/// What a [`Step`] saw.
struct Run {
    calls: Vec<Call>,
    /// The replicas' admission limits summed, every 50 ms from the step.
    limits: Vec<usize>,
}

impl Run {
    fn of(&self, served: bool, from: f64, to: f64) -> impl Iterator<Item = &Call> {
        self.calls
            .iter()
            .filter(move |c| c.served == served && c.at >= from && c.at < to)
    }

    fn count(&self, served: bool, from: f64, to: f64) -> usize {
        self.of(served, from, to).count()
    }

    /// The `q` quantile of the time taken by the calls served (or refused) that arrived in
    /// `[from, to)` seconds from the step.
    fn quantile(&self, served: bool, from: f64, to: f64, q: f64) -> Duration {
        let mut took: Vec<_> = self.of(served, from, to).map(|c| c.took).collect();
        took.sort();
        let at = ((took.len() as f64 - 1.0) * q).round().max(0.0) as usize;
        took.get(at).copied().unwrap_or_default()
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "calm: refused {}; first second: served {} (p99 {:?}, max {:?}), refused {} (p99 \
             {:?}); then: served {} (p99 {:?}), refused {} (p99 {:?}); limits every 50 ms {:?}",
            self.count(false, -99.0, 0.0),
            self.count(true, 0.0, 1.0),
            self.quantile(true, 0.0, 1.0, 0.99),
            self.quantile(true, 0.0, 1.0, 1.0),
            self.count(false, 0.0, 1.0),
            self.quantile(false, 0.0, 1.0, 0.99),
            self.count(true, 1.0, 99.0),
            self.quantile(true, 1.0, 99.0, 0.99),
            self.count(false, 1.0, 99.0),
            self.quantile(false, 1.0, 99.0, 0.99),
            self.limits.iter().take(30).collect::<Vec<_>>(),
        )
    }
}

/// One replica: its admission limit, its instances, its picker.
type Replica = (Arc<ConcurrencyLimit>, Arc<InstanceSet>, Arc<Picker>);

/// One call through `replica` to the worker pools, as the balancer layer makes it; whether
/// it was served.
async fn through(
    (limit, set, picker): &Replica,
    pools: &[tokio::sync::Semaphore],
    service: Duration,
) -> bool {
    let Ok(_permit) = limit.acquire(Priority::Default).await else {
        return false;
    };
    let instance = picker.pick(set, &[], true).expect("an instance");
    let _load = instance.start();
    let slot = instance.limit.as_ref().unwrap().take();
    let sent = Instant::now();
    let worker = pools[instance.id as usize].acquire().await.unwrap();
    tokio::time::sleep(service).await;
    drop(worker);
    let rtt = sent.elapsed();
    instance.load.sample(rtt, Instant::now());
    slot.record(1, Sample::Answered(rtt));
    true
}

impl Step {
    async fn run(&self) -> Run {
        let fleet = Fleet::new(if self.counted { self.replicas } else { 1 });
        let replicas: Vec<Replica> = (0..self.replicas)
            .map(|_| {
                let limit = Arc::new(ConcurrencyLimit::in_fleet(
                    "t",
                    &ConcurrencyConfig::default(),
                    256,
                    fleet.clone(),
                ));
                let set = limited_set(&limit, self.workers.len() as u16);
                (limit, set, Arc::new(Picker::new(BalancerKind::P2cEwma)))
            })
            .collect();
        let pools: Arc<Vec<_>> = Arc::new(
            self.workers
                .iter()
                .map(|&w| tokio::sync::Semaphore::new(w))
                .collect(),
        );
        let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
        let step_at = Instant::now() + Duration::from_secs(5);
        let end = step_at + Duration::from_secs(self.step_secs);
        let mut tasks = Vec::new();
        let mut limits = Vec::new();
        let mut next_sample = step_at;
        let mut i = 0usize;
        let service = self.service;
        let mut owed = 0.0;
        // xorshift64: the same draws every run.
        let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
        let mut draw = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f64 / (1u64 << 53) as f64
        };
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            while now >= next_sample {
                limits.push(replicas.iter().map(|(l, _, _)| l.limit()).sum());
                next_sample += ms(50);
            }
            // Arrivals per millisecond (the paused clock's timers have that resolution).
            owed += f64::from(if now >= step_at { self.step } else { self.calm }) / 1000.0;
            while owed >= 1.0 {
                owed -= 1.0;
                let replica = replicas[i % self.busy_replicas].clone();
                i += 1;
                let (pools, calls) = (pools.clone(), calls.clone());
                let service = service.mul_f64(1.0 + self.jitter * draw());
                let at = if now >= step_at {
                    now.duration_since(step_at).as_secs_f64()
                } else {
                    -step_at.duration_since(now).as_secs_f64()
                };
                tasks.push(tokio::spawn(async move {
                    let arrived = Instant::now();
                    let served = through(&replica, &pools, service).await;
                    let took = arrived.elapsed();
                    calls.lock().unwrap().push(Call { at, took, served });
                }));
            }
            tokio::time::sleep(ms(1)).await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        let calls = std::mem::take(&mut *calls.lock().unwrap());
        Run { calls, limits }
    }
}

impl Step {
    /// The spike on an upstream of `workers` x 200 ms: 40 calls/s (half its
    /// capacity) for 5 s, then 320/s (4x) for 3 s.
    fn spike(replicas: usize, workers: Vec<usize>) -> Step {
        Step {
            replicas,
            busy_replicas: replicas,
            workers,
            service: ms(200),
            calm: 40,
            step: 320,
            step_secs: 3,
            jitter: 0.0,
            counted: true,
        }
    }

    /// 5 calls/s on one replica for 5 s, then `step` per second for 3 s, to an upstream of
    /// 16 workers x `service`.
    fn after_a_quiet_spell(service: Duration, step: u32) -> Step {
        Step {
            replicas: 1,
            busy_replicas: 1,
            workers: vec![16],
            service,
            calm: 5,
            step,
            step_secs: 3,
            jitter: 0.0,
            counted: true,
        }
    }
}

/// What the issue asks of a 4x spike, from its first second: no refusal before it; the
/// successes within 2.5 service times (500 ms), but for a few in the first second and a
/// tail after it (the balancer's random choices make each run differ: over 20 runs of two
/// replicas at 6 + 5 + 5 workers, at most 2 of ~90 first-second successes passed 500 ms and
/// the p99 of the whole spike was 385-434 ms, once 543 ms); at least 90% of the capacity
/// served after the first second (144 of 160 in 2 s); refusals in the target (5 ms) once
/// overloaded.
fn assert_spike_served(run: &Run) {
    assert_eq!(
        run.count(false, -99.0, 0.0),
        0,
        "refused below capacity: {run}"
    );
    let late = run.of(true, 0.0, 1.0).filter(|c| c.took > ms(500)).count();
    assert!(
        late * 20 <= run.count(true, 0.0, 1.0),
        "{late} over 500 ms: {run}"
    );
    assert!(run.quantile(true, 0.0, 99.0, 0.95) <= ms(500), "{run}");
    assert!(run.quantile(true, 0.0, 99.0, 0.99) <= ms(600), "{run}");
    assert!(run.count(true, 1.0, 99.0) >= 144, "{run}");
    assert!(run.quantile(false, 1.0, 99.0, 0.99) <= ms(5), "{run}");
}

#[tokio::test(start_paused = true)]
async fn a_4x_spike_through_one_replica_is_served_within_500_ms_from_its_first_second() {
    // The benchmark's scenario (loadtest/overload: one replica, one instance).
    let run = Step::spike(1, vec![16]).run().await;
    eprintln!("{run}");
    assert_spike_served(&run);
}

#[tokio::test(start_paused = true)]
async fn a_step_up_to_capacity_after_a_quiet_spell_is_never_refused() {
    // 0.75x and 1x of 16 x 200 ms (80 calls/s), and 1x of 16 x 10 ms (1,600/s): the limit
    // met at the step (initial_limit) serves it, and grows where it must without a refusal.
    for (service, step) in [(ms(200), 60), (ms(200), 80), (ms(10), 1600)] {
        let run = Step::after_a_quiet_spell(service, step).run().await;
        eprintln!("{service:?} x {step}/s: {run}");
        assert_eq!(run.count(false, -99.0, 99.0), 0, "{run}");
        assert!(run.quantile(true, -99.0, 99.0, 1.0) <= service * 2, "{run}");
    }
}

#[tokio::test(start_paused = true)]
async fn spikes_of_3x_to_5x_after_calm_demand_are_served_within_500_ms_through_one_replica() {
    // The controller's dynamics, not one lucky run: three upstreams of 16 workers x 200 ms
    // (one instance, three of 6 + 5 + 5, two of 8), calm demand of a quarter and three
    // quarters of capacity, spikes of 3x and 5x. Before (the limit grew by half on a window
    // of the first answers): first seconds up to 696 ms and p99 after them up to 568 ms in
    // this matrix (3 x 3 x 3 runs); now at most 405 and 465.
    for workers in [vec![16], vec![6, 5, 5], vec![8, 8]] {
        for calm in [20, 60] {
            for step in [240, 400] {
                let mut spike = Step::spike(1, workers.clone());
                spike.calm = calm;
                spike.step = step;
                let run = spike.run().await;
                eprintln!("{workers:?}, {calm} then {step}/s: {run}");
                assert_spike_served(&run);
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn replicas_that_share_the_initial_limit_serve_a_4x_spike_within_500_ms() {
    // Chaos 17's layout: two replicas, the upstream one instance of 16 workers or three of
    // 6 + 5 + 5. Each replica meets the spike with its share of initial_limit (10, or 4 per
    // instance), the two together about what the upstream serves at once.
    for workers in [vec![16], vec![6, 5, 5]] {
        let run = Step::spike(2, workers.clone()).run().await;
        eprintln!("{workers:?}: {run}");
        assert_spike_served(&run);
    }
    // Each replica taking the whole of it (the fleet unknown): 40 or 42 calls at once for
    // 16 workers, and successes of the first second queued at the upstream past 500 ms.
    for workers in [vec![16], vec![6, 5, 5]] {
        let mut spike = Step::spike(2, workers.clone());
        spike.counted = false;
        let run = spike.run().await;
        eprintln!("{workers:?}, each replica the whole initial limit: {run}");
        assert!(run.quantile(true, 0.0, 1.0, 1.0) > ms(500), "{run}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_step_to_capacity_through_both_replicas_is_never_refused() {
    // 5 calls/s, then 80/s (1x of 16 x 200 ms) over both replicas: each has half of the
    // initial limit (10), and half of the demand (8 in flight).
    let mut step = Step::after_a_quiet_spell(ms(200), 80);
    step.replicas = 2;
    step.busy_replicas = 2;
    let run = step.run().await;
    eprintln!("{run}");
    assert_eq!(run.count(false, -99.0, 99.0), 0, "{run}");
    // The whole step on one of the two (a balancer that sends everything to one replica):
    // its half (10) is below the 16 in flight needed, and the calls that find it full before
    // the first answers can only be refused; the limit grows on those answers. Bounded here
    // so that it cannot get worse unseen: 11 refusals in the first second, none after.
    step.busy_replicas = 1;
    let run = step.run().await;
    eprintln!("all on one replica: {run}");
    assert!(run.count(false, 0.0, 1.0) <= 16, "{run}");
    assert_eq!(run.count(false, 1.0, 99.0), 0, "{run}");
}

#[tokio::test(start_paused = true)]
async fn demand_just_under_the_capacity_of_a_service_that_varies_is_not_refused() {
    // 16 workers of 200-260 ms each call (mean 230 ms: 69.6 calls/s), offered 64 and 68 per
    // second (0.92x and 0.98x) for 20 s: the slow spells queue a little at the upstream,
    // and the limit never falls under the calls in flight for long enough to refuse one.
    for rate in [64, 68] {
        let mut step = Step::after_a_quiet_spell(ms(200), rate);
        step.jitter = 0.3;
        step.step_secs = 20;
        let run = step.run().await;
        eprintln!("{rate}/s: {run}");
        assert_eq!(run.count(false, -99.0, 99.0), 0, "{run}");
        assert!(run.quantile(true, -99.0, 99.0, 0.99) <= ms(500), "{run}");
    }
    // 200-320 ms (mean 260 ms: 61.5 calls/s) offered 64/s (1.04x): overload, shed, and the
    // successes still within 500 ms.
    let mut step = Step::after_a_quiet_spell(ms(200), 64);
    step.jitter = 0.6;
    step.step_secs = 20;
    let run = step.run().await;
    eprintln!("1.04x: {run}");
    assert!(run.count(false, 0.0, 99.0) > 0, "{run}");
    assert!(run.quantile(true, -99.0, 99.0, 0.99) <= ms(500), "{run}");
}
