//! The shared backend: one Lua script decides a whole request in one round trip.
//!
//! Script contract
//! - `KEYS[i]`: the hash of policy i for this request's subject (fields `w` = fixed-window
//!   index, `c` = count in window `w`, `p` = count in window `w - 1`). All keys share one
//!   Cluster slot (see `keys.rs`).
//! - `ARGV[1]`: `1` to count denied requests, else `0`; then per policy i:
//!   `ARGV[2i] = limit`, `ARGV[2i+1] = window in ms`.
//! - Clock: Redis `TIME` inside the script, so replicas never disagree about time.
//! - Effect: if every policy admits the request, each counter is incremented; if any denies,
//!   none is (unless count_denied, then all are). Keys expire two windows after their last
//!   write, when they can no longer influence a decision.
//! - Returns `{all_allowed, then per policy: allowed, remaining, reset_ms, retry_ms}`:
//!   `remaining` after this request, `reset_ms` until the fixed window rolls, `retry_ms`
//!   until one more request would fit (0 when the request was allowed).
//!
//! The arithmetic is `sliding.rs` transcribed; Lua numbers are doubles, exact for the
//! validated ranges (limit * window_ms < 2^53), and `math.ceil` only ever rounds later.

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Script, Value};

use crate::config::ratelimit::RedisTarget;

pub(crate) const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local count_denied = ARGV[1] == '1'
local n = #KEYS
local st = {}
local all = true
for i = 1, n do
  local limit = tonumber(ARGV[2 * i])
  local win = tonumber(ARGV[2 * i + 1])
  local idx = math.floor(now / win)
  local elapsed = now - idx * win
  local h = redis.call('HMGET', KEYS[i], 'w', 'c', 'p')
  local w = tonumber(h[1])
  local cur, prev = 0, 0
  if w == idx then
    cur, prev = tonumber(h[2]) or 0, tonumber(h[3]) or 0
  elseif w == idx - 1 then
    prev = tonumber(h[2]) or 0
  end
  local ok = prev * (win - elapsed) + cur * win + win <= limit * win
  if not ok then all = false end
  st[i] = { limit, win, idx, elapsed, cur, prev, ok }
end
local out = { all and 1 or 0 }
for i = 1, n do
  local limit, win, idx, elapsed, cur, prev, ok = unpack(st[i])
  if all or count_denied then
    cur = cur + 1
    redis.call('HSET', KEYS[i], 'w', idx, 'c', cur, 'p', prev)
    redis.call('PEXPIRE', KEYS[i], 2 * win)
  end
  local used = prev * (win - elapsed) + cur * win
  local remaining = math.floor((limit * win - used) / win)
  if remaining < 0 then remaining = 0 end
  local retry = 0
  if not all and used + win > limit * win then
    if cur < limit then
      retry = math.ceil((prev * (win - elapsed) - (limit - cur - 1) * win) / prev)
    else
      retry = (win - elapsed) + math.ceil((cur - limit + 1) * win / cur)
    end
  end
  out[#out + 1] = ok and 1 or 0
  out[#out + 1] = remaining
  out[#out + 1] = win - elapsed
  out[#out + 1] = retry
end
return out
"#;

/// A single node (through the self-reconnecting `ConnectionManager`) or a cluster.
#[derive(Clone)]
pub(crate) enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl RedisConn {
    /// Builds the client without touching the network; connections are made on first use, so
    /// a dead Redis at startup costs nothing here.
    pub fn open(
        target: &RedisTarget,
        connect_timeout: std::time::Duration,
        command_timeout: std::time::Duration,
    ) -> redis::RedisResult<RedisConn> {
        match target {
            RedisTarget::Single(url) => {
                let client = redis::Client::open(url.as_str())?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    .set_response_timeout(Some(command_timeout))
                    // Few, quick reconnect attempts per outage: the breaker in `mod.rs`
                    // decides when to look again, not an ever-growing internal backoff.
                    .set_number_of_retries(2)
                    .set_min_delay(std::time::Duration::from_millis(50))
                    .set_max_delay(std::time::Duration::from_millis(500));
                let manager = ConnectionManager::new_lazy_with_config(client, config)?;
                Ok(RedisConn::Single(manager))
            }
            RedisTarget::Cluster(nodes) => {
                let client = ClusterClient::builder(nodes.iter().map(String::as_str))
                    .connection_timeout(connect_timeout)
                    .response_timeout(command_timeout)
                    .retries(2)
                    .build()?;
                let config = redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(connect_timeout)
                    .set_response_timeout(command_timeout);
                Ok(RedisConn::Cluster(
                    client.get_pending_async_connection_with_config(config),
                ))
            }
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(_))
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

/// The script object; its SHA1 is computed once and `invoke_async` uses EVALSHA, falling back
/// to loading the script on NOSCRIPT (a restarted or failed-over Redis).
pub(crate) fn script() -> Script {
    Script::new(SCRIPT)
}

/// One policy's slice of the script's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ScriptOutcome {
    pub allowed: bool,
    pub remaining: u64,
    pub reset_ms: u64,
    pub retry_ms: u64,
}

/// Parses the flat integer array; `None` when it is not what the script returns (a foreign
/// script under our SHA, a proxy mangling replies): treated like any Redis failure.
pub(crate) fn parse_reply(reply: &[i64], policies: usize) -> Option<(bool, Vec<ScriptOutcome>)> {
    if reply.len() != 1 + 4 * policies {
        return None;
    }
    let non_neg = |v: i64| u64::try_from(v).ok();
    let mut out = Vec::with_capacity(policies);
    for chunk in reply[1..].chunks_exact(4) {
        out.push(ScriptOutcome {
            allowed: chunk[0] == 1,
            remaining: non_neg(chunk[1])?,
            reset_ms: non_neg(chunk[2])?,
            retry_ms: non_neg(chunk[3])?,
        });
    }
    Some((reply[0] == 1, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_shape_is_checked() {
        let (all, o) = parse_reply(&[0, 1, 5, 100, 0, 0, 0, 100, 1500], 2).unwrap();
        assert!(!all);
        assert!(o[0].allowed && !o[1].allowed);
        assert_eq!(o[1].retry_ms, 1500);
        assert!(parse_reply(&[1, 1, 2], 1).is_none());
        assert!(parse_reply(&[1, 1, -2, 0, 0], 1).is_none());
    }
}
