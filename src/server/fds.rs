//! File descriptors: every client connection takes one, every relayed WebSocket two (the
//! client's and the upstream's), every pooled upstream connection one. A process that runs
//! out gets `EMFILE` on accept and on connect; the second looked like an upstream failure
//! and opened its breaker (issue 16's load test, reproduced with `ulimit -n 300`), which is
//! why `upstream::call::Outcome::of` now counts it as our own failure. Here, at start: the
//! soft limit is raised to the hard one (the usual default soft limit, 1,024, is far below
//! what the connection caps allow), and the listeners' connection caps are fitted under
//! what the limit leaves ([`connection_budget`], `ListenerCaps::fit`): the limit is one pool for the whole process, so
//! without that, idle connections to one listener (issue 23: 1,100 to the redirect port with
//! the limit at 1,024) made every other listener's accept fail with EMFILE. Default caps are
//! derived from a limit lower than they need ([`fit_defaults`], said once at info level: a
//! stock machine is no misconfiguration); a hard limit below what caps that were SET can use
//! is warned about, naming the settings.

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
/// [`needed`] (caps that were set: default ones were fitted, [`fit_defaults`]). Returns the
/// limit in effect (None where it cannot be read).
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

/// A lowered default cap: the setting, the default, what the limit leaves.
pub type Derived = (&'static str, usize, usize);

/// The default connection caps (`limits.max_connections`, `websocket.max_connections`: both
/// 10,000, which need ~30,000 descriptors) derived from the open-file limit when it is lower
/// than they need, so that the defaults fit the machine they start on (a stock limit of
/// 20,000 here, 1,024 on many systems) instead of warning about it. Caps that were set
/// keep their value (past the limit that is still warned about, see [`raise_limit`]). Said
/// once, at info level; a reload derives the same values again.
pub fn fit_defaults(cfg: &mut Config) -> Vec<Derived> {
    let Some(limit) = raise_to_hard() else {
        return Vec::new();
    };
    let derived = fit_defaults_to(cfg, limit);
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !derived.is_empty() && !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::info!(
            fd_limit = limit,
            "default connection caps derived from the open-file limit: {} (set them, or raise \
             the limit, to choose others)",
            derived
                .iter()
                .map(|(name, from, to)| format!("{name} {from} -> {to}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    derived
}

/// [`fit_defaults`] for a given limit. What the defaults may use (the limit less the
/// listeners they do not cover and a reserve for pools, Redis, logs) is shared in the
/// defaults' proportion, one public connection for each relayed WebSocket (which takes two
/// descriptors); the public cap also stays within the listeners' half ([`connection_budget`]).
pub fn fit_defaults_to(cfg: &mut Config, limit: u64) -> Vec<Derived> {
    if limit >= needed(cfg) {
        return Vec::new();
    }
    let public_default = crate::config::LimitsConfig::default().max_connections;
    let ws_default = crate::config::WebSocketConfig::default().max_connections;
    let public_is_default = cfg.limits.max_connections == public_default;
    let ws_is_default = cfg.websocket.max_connections == ws_default;
    let caps = ListenerCaps::configured(cfg);
    let others = caps.redirect + caps.admin;
    let free = usize::try_from(limit.saturating_sub(256)).unwrap_or(usize::MAX);
    let free = free.saturating_sub(others);
    let (public, ws) = match (public_is_default, ws_is_default) {
        (true, true) => (free / 3, free / 3),
        (true, false) => (
            free.saturating_sub(2 * cfg.websocket.max_connections),
            cfg.websocket.max_connections,
        ),
        (false, true) => (
            cfg.limits.max_connections,
            free.saturating_sub(cfg.limits.max_connections) / 2,
        ),
        (false, false) => return Vec::new(),
    };
    let public = public
        .min(connection_budget(limit).saturating_sub(others))
        .clamp(1, public_default);
    let ws = ws.clamp(1, ws_default);
    let mut derived = Vec::new();
    if public_is_default && public < public_default {
        cfg.limits.max_connections = public;
        derived.push(("limits.max_connections", public_default, public));
    }
    if ws_is_default && ws < ws_default {
        cfg.websocket.max_connections = ws;
        derived.push(("websocket.max_connections", ws_default, ws));
    }
    derived
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
    fn default_caps_are_derived_from_a_lower_limit_and_set_ones_kept() {
        let mut cfg = Config::default();
        assert_eq!(fit_defaults_to(&mut cfg, 1_000_000), Vec::<Derived>::new());
        // 20,000: (20,000 - 256 - 64 admin) / 3 each, and then everything fits.
        let derived = fit_defaults_to(&mut cfg, 20_000);
        assert_eq!(
            derived,
            [
                ("limits.max_connections", 10_000, 6_560),
                ("websocket.max_connections", 10_000, 6_560)
            ]
        );
        assert!(needed(&cfg) <= 20_000);
        assert_eq!(
            ListenerCaps::configured(&cfg).fit(connection_budget(20_000)),
            None
        );
        // 1,024: the listeners' half bounds the public cap.
        let mut cfg = Config::default();
        fit_defaults_to(&mut cfg, 1_024);
        assert_eq!(cfg.websocket.max_connections, (1_024 - 256 - 64) / 3);
        assert!(needed(&cfg) <= 1_024, "{}", needed(&cfg));
        // A cap that was set stays; the default one takes what is left.
        let mut cfg = Config::default();
        cfg.websocket.max_connections = 5_000;
        let derived = fit_defaults_to(&mut cfg, 20_000);
        assert_eq!(
            derived,
            [("limits.max_connections", 10_000, 20_000 - 256 - 64 - 10_000)]
        );
        assert_eq!(cfg.websocket.max_connections, 5_000);
        let mut cfg = Config::default();
        cfg.websocket.max_connections = 9_000;
        cfg.limits.max_connections = 9_000;
        assert_eq!(fit_defaults_to(&mut cfg, 20_000), Vec::<Derived>::new());
        assert_eq!(cfg.limits.max_connections, 9_000);
    }

    #[test]
    fn listeners_get_half_of_the_descriptors_above_the_reserve() {
        assert_eq!(connection_budget(1_024), 480);
        assert_eq!(connection_budget(256), 96);
        assert_eq!(connection_budget(10), 0);
    }
}
