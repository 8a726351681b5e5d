//! The choice of one instance for one attempt, among those the instance set says may serve
//! (`InstanceSet::serving`): for a call under the adaptive limit, the ones under their own
//! limit when there are any (an instance at its limit gets nothing while another has room);
//! of those, the ones this call has not tried yet when there are any (so a retry or a hedge
//! goes elsewhere); then power of two choices by peak-EWMA cost, as linkerd2-proxy and
//! Finagle do (a slow or busy instance gets less traffic), or each in turn.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rand::Rng;
use tokio::time::Instant;

use super::peak_ewma::DEFAULT_RTT;
use crate::config::BalancerKind;
use crate::upstream::instances::{Instance, InstanceSet};

/// One upstream's choice of instance (`upstreams.X.balancer`).
#[derive(Debug)]
pub(crate) struct Picker {
    kind: BalancerKind,
    /// The next turn, for round robin.
    round_robin: AtomicUsize,
}

impl Picker {
    pub(crate) fn new(kind: BalancerKind) -> Picker {
        Picker {
            kind,
            round_robin: AtomicUsize::new(0),
        }
    }

    /// The instance for the next attempt of a call that has tried `tried`, under the
    /// adaptive limit when `limited`; `None` when the set has none.
    pub(crate) fn pick(
        &self,
        instances: &InstanceSet,
        tried: &[u64],
        limited: bool,
    ) -> Option<Arc<Instance>> {
        let now = Instant::now();
        let mut candidates = instances.serving(now);
        if limited {
            with_room_first(&mut candidates);
        }
        untried_first(&mut candidates, tried);
        let n = candidates.len();
        let chosen = match (n, self.kind) {
            (0, _) => return None,
            (1, _) => 0,
            (_, BalancerKind::RoundRobin) => self.round_robin.fetch_add(1, Ordering::Relaxed) % n,
            (_, BalancerKind::P2cEwma) => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..n);
                let mut b = rng.random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                if cheaper(&candidates[b], &candidates[a], now) {
                    b
                } else {
                    a
                }
            }
        };
        Some(candidates.swap_remove(chosen))
    }
}

/// Keeps the instances under their own limit, or all of them when none is: the upstream
/// admitted the call against the sum of the limits, so one has room unless an instance's
/// limit just shrank, or an attempt that failed on one instance goes on to another.
fn with_room_first(candidates: &mut Vec<Arc<Instance>>) {
    if candidates.iter().any(|i| i.has_room()) {
        candidates.retain(|i| i.has_room());
    }
}

/// Keeps the instances not in `tried`, or all of them when every one has been tried.
fn untried_first(candidates: &mut Vec<Arc<Instance>>, tried: &[u64]) {
    if candidates.iter().any(|i| !tried.contains(&i.id)) {
        candidates.retain(|i| !tried.contains(&i.id));
    }
}

/// `y` costs less than `x`: latency x (in flight + 1), an instance without a fresh latency
/// assumed as fast as the other (or [`DEFAULT_RTT`] when neither has one).
fn cheaper(y: &Instance, x: &Instance, now: Instant) -> bool {
    let (lx, ly) = (x.load.latency(now), y.load.latency(now));
    let default = DEFAULT_RTT.as_nanos() as f64;
    y.load.cost(ly, lx.unwrap_or(default)) < x.load.cost(lx, ly.unwrap_or(default))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::UpstreamConfig;
    use crate::upstream::instances::test_set;

    fn config() -> UpstreamConfig {
        UpstreamConfig {
            url: "http://127.0.0.1:9000".into(),
            ..UpstreamConfig::default()
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// `instance` answered in `rtt`, now.
    fn answered(instance: &Instance, rtt: Duration) {
        instance.load.sample(rtt, Instant::now());
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_prefers_the_cheaper_of_two_and_spreads_equal_ones() {
        let s = test_set(&config(), 3);
        let p = Picker::new(BalancerKind::P2cEwma);
        let all = s.active();
        // The first is slow: it never wins a comparison, so it gets nothing.
        answered(&all[0], ms(300));
        answered(&all[1], ms(5));
        answered(&all[2], ms(5));
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            let i = p.pick(&s, &[], false).unwrap();
            counts[i.id as usize] += 1;
        }
        assert_eq!(counts[0], 0, "{counts:?}");
        assert!(counts[1] > 1200 && counts[2] > 1200, "{counts:?}");
        // Calls in flight count: a busy instance loses every comparison with an idle one of
        // the same latency (and still beats the slow one): ~1/3 against ~2/3.
        let _busy: Vec<_> = (0..5).map(|_| all[1].start()).collect();
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            counts[p.pick(&s, &[], false).unwrap().id as usize] += 1;
        }
        assert!(counts[2] > 1800 && counts[1] < 1200, "{counts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn one_slow_answer_does_not_starve_an_instance_once_it_is_stale() {
        let s = test_set(&config(), 2);
        let p = Picker::new(BalancerKind::P2cEwma);
        let (slow, fast) = (s.active()[0].clone(), s.active()[1].clone());
        answered(&slow, ms(200));
        answered(&fast, ms(2));
        // Fresh: the fast one wins every comparison.
        assert!((0..200).all(|_| p.pick(&s, &[], false).unwrap().id == fast.id));
        // The fast one keeps answering; the slow one gets nothing, so its estimate ages.
        tokio::time::advance(Duration::from_millis(1500)).await;
        answered(&fast, ms(2));
        let picked_slow = (0..200)
            .filter(|_| p.pick(&s, &[], false).unwrap().id == slow.id)
            .count();
        assert!(picked_slow > 0, "starved by a 1.5 s old sample");
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_goes_to_an_instance_not_tried_yet() {
        let s = test_set(&config(), 3);
        for kind in [BalancerKind::P2cEwma, BalancerKind::RoundRobin] {
            let p = Picker::new(kind);
            let first = p.pick(&s, &[], false).unwrap();
            for _ in 0..100 {
                let second = p.pick(&s, &[first.id], false).unwrap();
                assert_ne!(second.id, first.id);
                let third = p.pick(&s, &[first.id, second.id], false).unwrap();
                assert!(third.id != first.id && third.id != second.id);
            }
            // Everything tried: any instance again, rather than none.
            assert!(p.pick(&s, &[0, 1, 2], false).is_some());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn round_robin_takes_each_in_turn() {
        let s = test_set(&config(), 3);
        let p = Picker::new(BalancerKind::RoundRobin);
        let mut counts = [0usize; 3];
        for _ in 0..300 {
            counts[p.pick(&s, &[], false).unwrap().id as usize] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_set_has_no_instance_to_pick() {
        let s = test_set(&config(), 0);
        assert!(Picker::new(BalancerKind::P2cEwma)
            .pick(&s, &[], false)
            .is_none());
    }
}
