//! How many gateway replicas share the upstreams, counted through a real Redis (the rate
//! limiter's): replicas that share it count each other, one that stops leaves the count
//! after the announcement's 3 s, Redis gone leaves the count as it was, and the count
//! reaches the upstream limits (each replica's idle share of `initial_limit`).

use crate::support;

use std::time::Duration;

use deltastream_gateway::config::{Dur, RateLimitConfig};
use deltastream_gateway::ratelimit::RateLimiter;
use deltastream_gateway::upstream::concurrency::{Fleet, ANNOUNCE_TTL};
use support::gateway::{admin_upstreams, client, config_with_instances, spawn, upstream_view};
use support::redis::RedisServer;
use support::FakeUpstream;

fn config(url: &str) -> RateLimitConfig {
    RateLimitConfig {
        redis_url: Some(url.to_string()),
        // Generous: a stall on a busy 2-core machine must not read as Redis gone.
        command_timeout: Dur::from_secs(1),
        connect_timeout: Dur::from_secs(1),
        ..RateLimitConfig::default()
    }
}

/// Polls `done` every 50 ms for up to `within`; whether it became true.
async fn eventually(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done()
}

#[tokio::test]
async fn replicas_sharing_a_redis_count_each_other_and_one_that_stops_leaves_the_count() {
    let mut redis = RedisServer::start();
    let cfg = config(&redis.url());
    let (a, b) = (RateLimiter::new(&cfg).await, RateLimiter::new(&cfg).await);
    let (fa, fb) = (Fleet::new(1), Fleet::new(1));
    a.keep_fleet(&fa, 1);
    b.keep_fleet(&fb, 1);
    // Announced every second: both see two within a few.
    let both = eventually(Duration::from_secs(10), || {
        fa.replicas() == 2 && fb.replicas() == 2
    })
    .await;
    assert!(both, "{fa:?} {fb:?}");
    // B's limiter goes (its replica stopped, or a reload replaced it with one that does not
    // announce): its last announcement expires, and A counts itself alone.
    drop(b);
    let alone = eventually(ANNOUNCE_TTL + Duration::from_secs(7), || fa.replicas() == 1).await;
    assert!(alone, "{fa:?}");
    // A third joins: two again. Then Redis goes away: the count stays as last seen (two
    // replicas must not each take the whole initial limit because Redis is down).
    let c = RateLimiter::new(&cfg).await;
    let fc = Fleet::new(1);
    c.keep_fleet(&fc, 1);
    let joined = eventually(Duration::from_secs(10), || fa.replicas() == 2).await;
    assert!(joined, "{fa:?}");
    redis.kill();
    tokio::time::sleep(ANNOUNCE_TTL + Duration::from_secs(2)).await;
    assert_eq!((fa.replicas(), fc.replicas()), (2, 2));
}

#[tokio::test]
async fn without_redis_the_count_is_the_expected_replicas() {
    let limiter = RateLimiter::new(&RateLimitConfig::default()).await;
    let fleet = Fleet::new(1);
    limiter.keep_fleet(&fleet, 3);
    assert_eq!(fleet.replicas(), 3);
}

#[tokio::test]
async fn two_gateways_sharing_a_redis_each_fall_back_to_half_the_initial_limit() {
    let redis = RedisServer::start();
    let storage = FakeUpstream::ok().await;
    let gateway = || {
        let mut cfg = config_with_instances("storage", &[storage.url()]);
        cfg.rate_limit.redis_url = Some(redis.url());
        cfg.rate_limit.command_timeout = Dur::from_secs(1);
        cfg.rate_limit.connect_timeout = Dur::from_secs(1);
        spawn(cfg)
    };
    let (one, two) = (gateway().await, gateway().await);
    let fleet = |gw: &deltastream_gateway::server::Running| gw.gateway.current().fleet.replicas();
    let counted = eventually(Duration::from_secs(10), || {
        fleet(&one) == 2 && fleet(&two) == 2
    })
    .await;
    assert!(counted, "{} / {}", fleet(&one), fleet(&two));
    let view = admin_upstreams(one.admin_addr).await;
    assert_eq!(view["fleet_replicas"], 2, "{view}");
    // Light traffic through one of them: its storage limit, 20 at start (the replica's count
    // was 1 then), falls window by window to its share, 20 / 2, and no lower.
    let c = client();
    let url = format!("{}/api/data/underlying/NIFTY", one.url());
    let mut limit = 0;
    for _ in 0..300 {
        let r = c.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        limit = upstream_view(one.admin_addr, "storage").await["instances"][0]["concurrency"]
            ["limit"]
            .as_u64()
            .unwrap();
        if limit == 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(limit, 10);
    for _ in 0..20 {
        c.get(&url).send().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let view = upstream_view(one.admin_addr, "storage").await;
    assert_eq!(view["instances"][0]["concurrency"]["limit"], 10, "{view}");
}
