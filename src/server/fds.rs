//! File descriptors: every client connection takes one, every relayed WebSocket two (the
//! client's and the upstream's), every pooled upstream connection one. A process that runs
//! out gets `EMFILE` on accept and on connect; the second looked like an upstream failure
//! and opened its breaker (issue 16's load test, reproduced with `ulimit -n 300`), which is
//! why `upstream::call::Outcome::of` now counts it as our own failure. Here, at start: the
//! soft limit is raised to the hard one (the usual default soft limit, 1,024, is far below
//! what the connection caps allow), and the listeners' connection caps are fitted under
//! what the limit leaves ([`connection_budget`], `ListenerCaps::fit`): the limit is one pool for the whole process, so
//! without that, idle connections to one listener (issue 23: 1,100 to the redirect port with
//! the limit at 1,024) made every other listener's accept fail with EMFILE. A hard limit below
//! what the WebSocket cap can use is logged, naming the settings.

use super::listener::ListenerCaps;
use crate::config::Config;

/// Descriptors kept out of the listeners' budget whatever the limit: the listeners
/// themselves, the runtime's, the log, Redis, the configuration file.
pub const RESERVED: u64 = 64;

/// Descriptors the configured caps can hold open at once: every listener connection and
/// every relayed WebSocket (two each), plus room for pools, listeners, Redis and log files.
pub fn needed(cfg: &Config) -> u64 {
    let caps = ListenerCaps::configured(cfg);
    (caps.total() + 2 * cfg.websocket.max_connections) as u64 + 256
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; warns when even that is below
/// [`needed`]. Returns the limit in effect (None where it cannot be read).
pub fn raise_limit(cfg: &Config) -> Option<u64> {
    let limit = raise_to_hard()?;
    let needed = needed(cfg);
    if limit < needed {
        tracing::warn!(
            fd_limit = limit,
            needed,
            "the open-file limit is below what the connection caps (limits.max_connections, \
             admin.max_connections, server.redirect_http.max_connections, and twice \
             websocket.max_connections) can use: the listeners' caps are fitted under it, but \
             past it WebSocket upgrades and upstream connections fail with EMFILE; raise the \
             hard limit (ulimit -Hn, LimitNOFILE=, docker --ulimit nofile=) or lower those caps"
        );
    }
    Some(limit)
}

/// How many listener connections `fd_limit` can hold: half of the descriptors above
/// [`RESERVED`], the other half being for what those connections lead to (the upstream
/// connection a request holds, the upstream side of a WebSocket).
pub fn connection_budget(fd_limit: u64) -> usize {
    usize::try_from(fd_limit.saturating_sub(RESERVED) / 2).unwrap_or(usize::MAX)
}

#[cfg(unix)]
fn raise_to_hard() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    Some(lim.rlim_cur)
}

#[cfg(not(unix))]
fn raise_to_hard() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_one_and_the_need_follows_the_caps() {
        let cfg = Config::default();
        let limit = raise_limit(&cfg).expect("readable on unix");
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(lim.rlim_cur, lim.rlim_max);
        assert_eq!(limit, lim.rlim_cur);
        assert_eq!(needed(&cfg), 10_000 + 64 + 2 * 10_000 + 256);
    }

    #[test]
    fn listeners_get_half_of_the_descriptors_above_the_reserve() {
        assert_eq!(connection_budget(1_024), 480);
        assert_eq!(connection_budget(256), 96);
        assert_eq!(connection_budget(10), 0);
    }
}
