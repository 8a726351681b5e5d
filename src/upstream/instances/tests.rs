//! Membership and passive health on a paused clock. Which instance the balancer then
//! chooses among those serving is tested beside the choice (`balancer/p2c.rs`).

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use tokio::time::Instant;

use super::*;
use crate::upstream::call::Outcome;

fn config() -> UpstreamConfig {
    UpstreamConfig {
        url: "http://127.0.0.1:9000".into(),
        ..UpstreamConfig::default()
    }
}

/// The ids of the instances that may take the next attempt.
fn serving(s: &InstanceSet) -> Vec<u64> {
    s.serving(Instant::now()).iter().map(|i| i.id).collect()
}

#[tokio::test(start_paused = true)]
async fn consecutive_failures_eject_and_the_time_doubles() {
    let s = test_set(&config(), 3);
    let bad = s.active()[0].clone();
    for _ in 0..4 {
        s.finish(&bad, Outcome::ConnectError);
    }
    assert!(bad.health().ejected_until.is_none());
    s.finish(&bad, Outcome::ConnectError);
    assert!(bad.health().ejected_until.is_some(), "ejected after 5");
    assert!(!serving(&s).contains(&bad.id));
    // Back after 10 s, then ejected again for 20 s.
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(s.has_untried(&[1, 2], false), "returned after its time");
    for _ in 0..5 {
        s.finish(&bad, Outcome::Timeout);
    }
    tokio::time::advance(Duration::from_secs(19)).await;
    assert!(!s.has_untried(&[1, 2], false), "second ejection lasts 20 s");
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(s.has_untried(&[1, 2], false));
}

#[tokio::test(start_paused = true)]
async fn a_long_healthy_spell_starts_the_doubling_afresh() {
    let s = test_set(&config(), 3);
    let bad = s.active()[0].clone();
    let eject = |s: &InstanceSet| {
        for _ in 0..5 {
            s.finish(&bad, Outcome::ConnectError);
        }
    };
    eject(&s);
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(s.has_untried(&[1, 2], false), "back after 10 s");
    // Healthy for longer than max_time (300 s): the next ejection is 10 s again, not 20 s.
    tokio::time::advance(Duration::from_secs(301)).await;
    eject(&s);
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(s.has_untried(&[1, 2], false), "the first length again");
}

#[tokio::test(start_paused = true)]
async fn a_failure_rate_over_the_window_ejects_too() {
    let s = test_set(&config(), 4);
    let flaky = s.active()[0].clone();
    // Never 5 in a row, but half of 20 calls.
    for _ in 0..10 {
        s.finish(&flaky, Outcome::Status(StatusCode::OK));
        s.finish(&flaky, Outcome::Status(StatusCode::INTERNAL_SERVER_ERROR));
    }
    assert!(flaky.health().ejected_until.is_some());
}

#[tokio::test(start_paused = true)]
async fn at_most_half_the_instances_are_ejected_and_past_that_all_serve() {
    let s = test_set(&config(), 3);
    let all = s.active();
    for i in 0..3 {
        for _ in 0..5 {
            s.finish(&all[i], Outcome::ConnectError);
        }
    }
    let ejected = all
        .iter()
        .filter(|i| i.health().ejected_until.is_some())
        .count();
    assert_eq!(ejected, 1, "3 instances x 50%: one ejected at most");
    // The two failing ones still in rotation serve; the ejected one does not.
    assert!(!serving(&s).contains(&0));
    // Passed over after their failures, they still serve before the ejected one does.
    for i in 1..3 {
        s.finish(&all[i], Outcome::Status(StatusCode::SERVICE_UNAVAILABLE));
    }
    assert_eq!(serving(&s), [1, 2]);
}

#[tokio::test(start_paused = true)]
async fn a_503_passes_the_instance_over_for_the_bias_duration() {
    let s = test_set(&config(), 2);
    let all = s.active();
    s.finish(&all[0], Outcome::Status(StatusCode::SERVICE_UNAVAILABLE));
    assert_eq!(serving(&s), [all[1].id]);
    tokio::time::advance(Duration::from_millis(100)).await;
    assert_eq!(serving(&s).len(), 2, "back in rotation after the bias");
}

#[tokio::test(start_paused = true)]
async fn with_a_probe_an_ejected_instance_returns_only_once_it_passes() {
    let mut cfg = config();
    cfg.breaker.probe_path = Some("/health".into());
    let s = test_set(&cfg, 3);
    let bad = s.active()[0].clone();
    for _ in 0..5 {
        s.finish(&bad, Outcome::ConnectError);
    }
    tokio::time::advance(Duration::from_secs(11)).await;
    assert!(
        !s.has_untried(&[1, 2], false),
        "time is over, but no probe has passed"
    );
    assert_eq!(s.awaiting_probe().len(), 1);
    s.probed(&bad, false);
    assert!(
        !s.has_untried(&[1, 2], false),
        "a failed probe keeps it out"
    );
    s.probed(&bad, true);
    // Back at once: /admin and the gauges say so before any request picks it.
    let state = |s: &InstanceSet| s.snapshot()[0].state;
    assert_eq!(state(&s), InstanceState::Healthy);
    assert!(s.awaiting_probe().is_empty());
    assert!(s.has_untried(&[1, 2], false));
    // Its failures were forgotten: one more does not eject it again.
    s.finish(&bad, Outcome::ConnectError);
    assert_eq!(state(&s), InstanceState::Healthy);
}

#[tokio::test(start_paused = true)]
async fn with_a_probe_an_instance_found_after_the_start_waits_for_it() {
    let mut cfg = config();
    cfg.breaker.probe_path = Some("/health".into());
    let s = test_set(&cfg, 2);
    // Scaled up: the new container is in DNS before it listens.
    s.update(&test_endpoints(0..3));
    let new = s.active()[2].clone();
    assert_eq!(
        s.awaiting_probe().len(),
        1,
        "probed before it takes traffic"
    );
    assert!(!serving(&s).contains(&new.id));
    s.probed(&new, true);
    assert!(serving(&s).contains(&new.id));
    // Without a probe a new instance serves at once (nothing could let it in later).
    let s = test_set(&config(), 2);
    s.update(&test_endpoints(0..3));
    assert!(s.awaiting_probe().is_empty());
    assert!(serving(&s).contains(&s.active()[2].id));
}

#[tokio::test(start_paused = true)]
async fn discovery_keeps_known_instances_adds_new_ones_and_drains_vanished_ones() {
    let s = test_set(&config(), 3);
    let before = s.active();
    let busy = before[0].start();
    s.update(&test_endpoints(1..4));
    let after = s.active();
    assert_eq!(after.len(), 3);
    assert!(
        Arc::ptr_eq(&after[0], &before[1]),
        "a known instance keeps its state"
    );
    assert_eq!(after[2].endpoint.port, 9003);
    let snapshot = s.snapshot();
    let draining: Vec<_> = snapshot
        .iter()
        .filter(|i| i.state == InstanceState::Draining)
        .collect();
    assert_eq!(
        draining.len(),
        1,
        "the removed one drains while a call is in flight"
    );
    assert!(!serving(&s).contains(&before[0].id), "no new calls to it");
    drop(busy);
    assert!(s
        .snapshot()
        .iter()
        .all(|i| i.state != InstanceState::Draining));
}
