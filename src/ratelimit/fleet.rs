//! The fleet count (`upstream::concurrency::Fleet`) through the limiter's Redis: every
//! replica adds itself to one sorted set, scored by Redis's clock, every
//! [`ANNOUNCE_EVERY`], drops the entries older than [`ANNOUNCE_TTL`] and reads how many are
//! left, in one script (one round trip a second per replica).
//!
//! The task lives as long as the limiter it was started for (a reload that keeps the limiter
//! keeps it; one that replaces the limiter starts another, and this one ends at its next
//! tick). A failed or slow round trip leaves the count as it was: Redis down must not turn
//! two replicas into one whose limits then double.

use std::sync::{Arc, Weak};

use crate::upstream::concurrency::{Fleet, ANNOUNCE_EVERY, ANNOUNCE_TTL};

use super::{read, Inner};

const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return redis.call('ZCARD', KEYS[1])
"#;

/// The sorted set of announcements under the limiter's key prefix.
fn key(prefix: &str) -> String {
    format!("{prefix}:fleet")
}

/// Announces `fleet`'s replica every [`ANNOUNCE_EVERY`] while `inner` lives, and sets the
/// count from each answer.
pub(super) fn announce(inner: Weak<Inner>, fleet: Arc<Fleet>) {
    let script = ::redis::Script::new(SCRIPT);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(ANNOUNCE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let Some(backend) = inner.redis.as_ref() else {
                return;
            };
            let mut conn = read(&backend.conn).clone();
            let mut invocation = script.prepare_invoke();
            invocation
                .key(key(&inner.key_prefix))
                .arg(fleet.id())
                .arg(ANNOUNCE_TTL.as_millis() as u64);
            let timeout = backend.command_timeout;
            drop(inner);
            match tokio::time::timeout(timeout, invocation.invoke_async::<usize>(&mut conn)).await {
                Ok(Ok(replicas)) => fleet.set_replicas(replicas),
                Ok(Err(e)) => tracing::debug!(error = %e, "fleet announcement failed"),
                Err(_) => tracing::debug!("fleet announcement unanswered"),
            }
        }
    });
}
