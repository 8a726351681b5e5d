//! The breaker's behaviour through its public face: `try_acquire` / `admit_attempt`, a
//! permit's `record`, the health probe and the snapshot, on a paused clock. The trip rule and
//! the backoff have their own tests beside them (`trip.rs`, `backoff.rs`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

use super::{Breaker, BreakerState};
use crate::config::{BreakerConfig, Dur};

fn fail(b: &Arc<Breaker>) {
    b.try_acquire().expect("admitted").record(true);
}
fn succeed(b: &Arc<Breaker>) {
    b.try_acquire().expect("admitted").record(false);
}
fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}
/// Open time just chosen (the clock is paused, so none of it has elapsed yet).
fn open_for(b: &Arc<Breaker>) -> Duration {
    b.try_acquire().expect_err("open").retry_after
}
fn in_jitter_bounds(d: Duration, planned: f64) -> bool {
    d >= secs(planned * 0.8) && d <= secs(planned)
}

#[tokio::test(start_paused = true)]
async fn opens_after_consecutive_failures_and_a_success_resets_the_count() {
    let b = Arc::new(Breaker::new("t", &BreakerConfig::default()));
    for _ in 0..4 {
        fail(&b);
    }
    succeed(&b);
    for _ in 0..4 {
        fail(&b);
    }
    assert_eq!(b.state(), BreakerState::Closed);
    assert_eq!(b.snapshot().consecutive_failures, 4);
    fail(&b);
    assert_eq!(b.state(), BreakerState::Open);
    let open = open_for(&b);
    assert!(in_jitter_bounds(open, 5.0), "{open:?}");
    let snap = b.snapshot();
    assert_eq!(snap.opened_count, 1);
    assert!(snap.seconds_until_probe.is_some_and(|s| s > 0.0));
}

#[tokio::test(start_paused = true)]
async fn opens_on_failure_rate_only_with_the_minimum_volume() {
    let b = Arc::new(Breaker::new("t", &BreakerConfig::default()));
    // success, failure, ... never 5 in a row; 50% failures.
    for _ in 0..9 {
        succeed(&b);
        fail(&b);
    }
    succeed(&b);
    // 19 calls, 9 failures: under the 20-call minimum.
    assert_eq!(b.state(), BreakerState::Closed);
    fail(&b);
    // 20 calls, 10 failures = 50%.
    assert_eq!(b.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn failure_rate_forgets_calls_older_than_the_window() {
    let b = Arc::new(Breaker::new("t", &BreakerConfig::default()));
    for _ in 0..9 {
        succeed(&b);
        fail(&b);
    }
    tokio::time::advance(Duration::from_secs(11)).await;
    assert_eq!(b.snapshot().window_calls, 0);
    succeed(&b);
    fail(&b);
    succeed(&b);
    fail(&b);
    assert_eq!(b.state(), BreakerState::Closed);
    assert_eq!(
        (b.snapshot().window_calls, b.snapshot().window_failures),
        (4, 2)
    );
}

#[tokio::test(start_paused = true)]
async fn open_time_grows_with_jitter_up_to_the_cap_and_resets_after_a_close() {
    let b = Arc::new(Breaker::new("t", &BreakerConfig::default()));
    for _ in 0..5 {
        fail(&b);
    }
    for planned in [5.0, 10.0, 20.0, 40.0, 60.0, 60.0] {
        let open = open_for(&b);
        assert!(in_jitter_bounds(open, planned), "{open:?} for {planned}");
        tokio::time::advance(open).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        // The failed probe re-opens it for longer.
        fail(&b);
        assert_eq!(b.state(), BreakerState::Open);
    }
    tokio::time::advance(Duration::from_secs(60)).await;
    succeed(&b);
    assert_eq!(b.state(), BreakerState::Closed);
    for _ in 0..5 {
        fail(&b);
    }
    assert!(in_jitter_bounds(open_for(&b), 5.0));
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_one_probe_at_a_time_under_concurrency() {
    let b = Arc::new(Breaker::new("t", &BreakerConfig::default()));
    for _ in 0..5 {
        fail(&b);
    }
    tokio::time::advance(open_for(&b)).await;
    let admitted = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (b, admitted) = (b.clone(), admitted.clone());
            tokio::spawn(async move {
                match b.try_acquire() {
                    Ok(probe) => {
                        admitted.fetch_add(1, Ordering::SeqCst);
                        // A slow probe: everyone else arrives while it is in flight.
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        probe.record(false);
                    }
                    Err(open) => assert!(open.retry_after > Duration::ZERO),
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    assert_eq!(admitted.load(Ordering::SeqCst), 1);
    assert_eq!(b.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_probe_frees_its_slot() {
    let b = Arc::new(Breaker::new("t", &BreakerConfig::default()));
    for _ in 0..5 {
        fail(&b);
    }
    tokio::time::advance(open_for(&b)).await;
    let probe = b.try_acquire().expect("probe");
    assert!(b.try_acquire().is_err());
    drop(probe);
    assert_eq!(b.state(), BreakerState::HalfOpen);
    succeed(&b);
    assert_eq!(b.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn an_answer_from_before_the_opening_cannot_close_it() {
    let b = Arc::new(Breaker::new("t", &BreakerConfig::default()));
    let slow = b.try_acquire().expect("closed");
    for _ in 0..5 {
        fail(&b);
    }
    tokio::time::advance(open_for(&b)).await;
    assert_eq!(b.state(), BreakerState::HalfOpen);
    slow.record(false);
    assert_eq!(b.state(), BreakerState::HalfOpen);
}

/// One client call as the pipeline makes it: `attempts[i]` says whether attempt `i` fails;
/// the call stops at its first success (the retry layer) and the breaker records the final
/// attempt once. `None` when the breaker refused an attempt (nothing is recorded then).
fn call(b: &Arc<Breaker>, attempts: &[bool]) -> Option<bool> {
    let mut held = None;
    let mut last = None;
    for &failed in attempts {
        b.admit_attempt(&mut held).ok()?;
        last = Some(failed);
        if !failed {
            break;
        }
    }
    if let (Some(permit), Some(failed)) = (held, last) {
        permit.record(failed);
    }
    last
}

#[tokio::test(start_paused = true)]
async fn a_call_saved_by_a_retry_is_one_success() {
    let b = Arc::new(Breaker::new("t", &BreakerConfig::default()));
    for _ in 0..100 {
        assert_eq!(call(&b, &[true, true, false]), Some(false));
    }
    let snap = b.snapshot();
    assert_eq!(snap.state, BreakerState::Closed);
    // 100 calls (not 300 attempts), none failed.
    assert_eq!((snap.window_calls, snap.window_failures), (100, 0));
    assert_eq!(snap.consecutive_failures, 0);
}

#[tokio::test(start_paused = true)]
async fn thirty_percent_failed_attempts_behind_retries_do_not_trip_it() {
    use rand::{rngs::StdRng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(7);
    let per_call = Arc::new(Breaker::new("calls", &BreakerConfig::default()));
    // The same attempts, each counted as if it were a call: what the breaker did before.
    let per_attempt = Arc::new(Breaker::new("attempts", &BreakerConfig::default()));
    for max_retries in [2usize, 3] {
        for _ in 0..5_000 {
            let attempts: Vec<bool> = (0..=max_retries).map(|_| rng.random_bool(0.3)).collect();
            call(&per_call, &attempts);
            for &failed in &attempts {
                if let Ok(p) = per_attempt.try_acquire() {
                    p.record(failed);
                }
                if !failed {
                    break;
                }
            }
            // Let any open time run out, so the per-attempt breaker keeps being tested.
            tokio::time::advance(Duration::from_millis(1)).await;
        }
    }
    assert_eq!(per_call.snapshot().opened_count, 0);
    assert_eq!(per_call.state(), BreakerState::Closed);
    // A run of 5 failed attempts comes about every 1 / 0.3^5 = 412 attempts.
    assert!(per_attempt.snapshot().opened_count > 0);
}

#[tokio::test(start_paused = true)]
async fn a_hard_down_upstream_trips_it_after_n_failed_calls() {
    let b = Arc::new(Breaker::new("t", &BreakerConfig::default()));
    for n in 1..=4 {
        assert_eq!(call(&b, &[true, true, true]), Some(true));
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.snapshot().consecutive_failures, n);
    }
    assert_eq!(call(&b, &[true, true, true]), Some(true));
    assert_eq!(b.state(), BreakerState::Open);
    // Refused at the first attempt: no upstream call at all.
    assert_eq!(call(&b, &[false]), None);
    assert!(in_jitter_bounds(open_for(&b), 5.0));
}

#[tokio::test(start_paused = true)]
async fn an_opening_stops_the_retries_of_calls_in_flight() {
    let b = Arc::new(Breaker::new("t", &BreakerConfig::default()));
    let mut held = None;
    b.admit_attempt(&mut held).expect("closed");
    for _ in 0..5 {
        call(&b, &[true]);
    }
    assert_eq!(b.state(), BreakerState::Open);
    // The call's retry asks again and is refused; its old permit is gone.
    assert!(b.admit_attempt(&mut held).is_err());
    assert!(held.is_none());
}

#[tokio::test(start_paused = true)]
async fn a_half_open_probe_keeps_its_slot_for_its_retries_and_decides_once() {
    let b = Arc::new(Breaker::new("t", &BreakerConfig::default()));
    for _ in 0..5 {
        call(&b, &[true]);
    }
    tokio::time::advance(open_for(&b)).await;
    // A failed probe call (all its attempts failed) re-opens.
    let mut probe = None;
    b.admit_attempt(&mut probe).expect("probe");
    assert!(b.admit_attempt(&mut None).is_err(), "one probe at a time");
    b.admit_attempt(&mut probe).expect("the probe's own retry");
    probe.take().expect("held").record(true);
    assert_eq!(b.state(), BreakerState::Open);
    assert_eq!(b.snapshot().opened_count, 2);

    // A probe call that a retry saved closes it.
    tokio::time::advance(open_for(&b)).await;
    assert_eq!(b.state(), BreakerState::HalfOpen);
    assert_eq!(call(&b, &[true, false]), Some(false));
    assert_eq!(b.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn the_failure_rate_window_counts_calls() {
    let b = Arc::new(Breaker::new("t", &BreakerConfig::default()));
    // Alternate a call that succeeds and one whose three attempts all fail: 50% of calls.
    for _ in 0..9 {
        call(&b, &[false]);
        call(&b, &[true, true, true]);
    }
    call(&b, &[false]);
    let snap = b.snapshot();
    assert_eq!((snap.window_calls, snap.window_failures), (19, 9));
    assert_eq!(
        snap.state,
        BreakerState::Closed,
        "19 calls: under min_calls"
    );
    call(&b, &[true, true, true]);
    assert_eq!(b.state(), BreakerState::Open, "20 calls, 10 failed");
}

/// A breaker with a health probe every 100 ms (open time 5 s) whose answer the test sets;
/// the counter says how often it was asked.
fn probed() -> (
    Arc<Breaker>,
    Arc<std::sync::atomic::AtomicBool>,
    Arc<AtomicUsize>,
) {
    use std::sync::atomic::AtomicBool;
    let config = BreakerConfig {
        probe_path: Some("/health".into()),
        probe_interval: Dur::from_millis(100),
        ..BreakerConfig::default()
    };
    let b = Arc::new(Breaker::new("t", &config));
    let healthy = Arc::new(AtomicBool::new(false));
    let asked = Arc::new(AtomicUsize::new(0));
    let (h, a) = (healthy.clone(), asked.clone());
    b.set_health_probe(Arc::new(move || {
        a.fetch_add(1, Ordering::SeqCst);
        let answer = h.load(Ordering::SeqCst);
        Box::pin(async move { answer })
    }));
    (b, healthy, asked)
}

/// Lets spawned probe loops run up to `d` of (paused) time.
async fn run_for(d: Duration) {
    tokio::time::sleep(d).await;
}

#[tokio::test(start_paused = true)]
async fn while_open_the_health_probe_goes_half_open_within_one_interval_of_recovery() {
    let (b, healthy, asked) = probed();
    for _ in 0..5 {
        call(&b, &[true]);
    }
    assert_eq!(b.state(), BreakerState::Open);
    run_for(Duration::from_millis(350)).await;
    // Asked every 100 ms, the upstream is still down: open, 4 s or more to go.
    assert_eq!(asked.load(Ordering::SeqCst), 3);
    assert_eq!(b.state(), BreakerState::Open);
    healthy.store(true, Ordering::SeqCst);
    run_for(Duration::from_millis(100)).await;
    assert_eq!(b.state(), BreakerState::HalfOpen);
    assert_eq!(asked.load(Ordering::SeqCst), 4);
    // Half-open as usual: one real call probes, the others fail fast, and the probe's
    // success closes the breaker.
    let mut probe = None;
    b.admit_attempt(&mut probe).expect("the probe call");
    assert!(b.try_acquire().is_err());
    probe.take().expect("probe").record(false);
    assert_eq!(b.state(), BreakerState::Closed);
    // The loop ended with its opening: no more questions while closed.
    run_for(Duration::from_secs(1)).await;
    assert_eq!(asked.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_call_after_a_healthy_answer_reopens_and_probing_resumes() {
    let (b, healthy, asked) = probed();
    healthy.store(true, Ordering::SeqCst);
    for _ in 0..5 {
        call(&b, &[true]);
    }
    run_for(Duration::from_millis(150)).await;
    assert_eq!(b.state(), BreakerState::HalfOpen);
    // The health endpoint says yes but the API still fails: re-open, probe again.
    assert_eq!(call(&b, &[true, true]), Some(true));
    assert_eq!(b.state(), BreakerState::Open);
    assert_eq!(b.snapshot().opened_count, 2);
    let before = asked.load(Ordering::SeqCst);
    run_for(Duration::from_millis(150)).await;
    assert_eq!(asked.load(Ordering::SeqCst), before + 1);
    assert_eq!(b.state(), BreakerState::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn probing_stops_when_the_opening_ends_and_is_off_without_probe_path() {
    let (b, _healthy, asked) = probed();
    for _ in 0..5 {
        call(&b, &[true]);
    }
    run_for(Duration::from_millis(250)).await;
    assert_eq!(asked.load(Ordering::SeqCst), 2);
    b.reset();
    run_for(Duration::from_secs(2)).await;
    assert_eq!(asked.load(Ordering::SeqCst), 2, "probed after the reset");

    // Without probe_path the breaker ignores a health check and waits out its open time.
    let plain = Arc::new(Breaker::new("t", &BreakerConfig::default()));
    let asked = Arc::new(AtomicUsize::new(0));
    let a = asked.clone();
    plain.set_health_probe(Arc::new(move || {
        a.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { true })
    }));
    for _ in 0..5 {
        call(&plain, &[true]);
    }
    run_for(Duration::from_secs(3)).await;
    assert_eq!(plain.state(), BreakerState::Open);
    assert_eq!(asked.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn reset_closes_and_forgets() {
    let b = Arc::new(Breaker::new("t", &BreakerConfig::default()));
    for _ in 0..5 {
        fail(&b);
    }
    b.reset();
    let snap = b.snapshot();
    assert_eq!(snap.state, BreakerState::Closed);
    assert_eq!((snap.consecutive_failures, snap.window_calls), (0, 0));
    assert_eq!(snap.seconds_until_probe, None);
    assert_eq!(snap.opened_count, 1);
    for _ in 0..5 {
        fail(&b);
    }
    assert!(in_jitter_bounds(open_for(&b), 5.0));
}

#[tokio::test(start_paused = true)]
async fn a_disabled_breaker_never_opens() {
    let config = BreakerConfig {
        enabled: false,
        ..BreakerConfig::default()
    };
    let b = Arc::new(Breaker::new("t", &config));
    for _ in 0..100 {
        fail(&b);
    }
    assert_eq!(b.state(), BreakerState::Closed);
    assert!(!b.snapshot().enabled);
}

#[test]
fn snapshot_serializes_for_admin() {
    let b = Arc::new(Breaker::new("storage", &BreakerConfig::default()));
    let json = serde_json::to_value(b.snapshot()).expect("json");
    assert_eq!(json["upstream"], "storage");
    assert_eq!(json["state"], "closed");
    assert_eq!(json["seconds_until_probe"], serde_json::Value::Null);
}

#[tokio::test(start_paused = true)]
async fn a_rebuilt_breaker_inherits_the_opening_and_the_history() {
    let cfg = BreakerConfig::default();
    let old = Arc::new(Breaker::new("t", &cfg));
    for _ in 0..5 {
        fail(&old);
    }
    let left = open_for(&old);
    tokio::time::advance(secs(1.0)).await;
    // New settings with the same rule and open times (e.g. a reload that changed a timeout).
    let new = Arc::new(Breaker::new("t", &cfg));
    new.inherit(&old);
    assert_eq!(new.state(), BreakerState::Open);
    assert_eq!(
        open_for(&new),
        left - secs(1.0),
        "the same opening, not a new one"
    );
    assert_eq!(new.snapshot().opened_count, 1);
    // Past the opening: half-open; a failed probe re-opens for the DOUBLED time (the
    // doubling carried over), ~10 s, not the first opening's ~5 s.
    tokio::time::advance(left).await;
    fail(&new);
    let reopened = open_for(&new);
    assert!(in_jitter_bounds(reopened, 10.0), "{reopened:?}");

    // A closed breaker's failures in a row carry over too; under another trip rule they don't.
    let closed = Arc::new(Breaker::new("t", &cfg));
    for _ in 0..4 {
        fail(&closed);
    }
    let same = Arc::new(Breaker::new("t", &cfg));
    same.inherit(&closed);
    assert_eq!(same.snapshot().consecutive_failures, 4);
    fail(&same);
    assert_eq!(same.state(), BreakerState::Open);
    let stricter = BreakerConfig {
        consecutive_failures: 3,
        open_base: Dur::from_secs(7),
        ..cfg
    };
    let other = Arc::new(Breaker::new("t", &stricter));
    other.inherit(&closed);
    assert_eq!(other.state(), BreakerState::Closed);
    assert_eq!(other.snapshot().consecutive_failures, 0);
}
