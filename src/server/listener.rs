//! One accept loop for every listener: the public one (plain or TLS), the http->https
//! redirect and the admin listener get the same connection guards (`conn`): a cap on
//! concurrent connections, with idle ones shed while a client waits at it; the header-read,
//! idle and send timeouts; and a drain that ends at a deadline when the gateway stops.
//!
//! Each listener has its OWN cap, not a share of one: idle connections to one listener (the
//! redirect port costs an attacker least and protects nothing) must not take another's slots,
//! and the operator's `/metrics` and `/ready` must get through while the public listener is
//! full. What the listeners do share is the process's descriptor limit, so their caps are
//! fitted under it at start (`fds::fit_caps`): no listener's connections can make another's
//! accept fail with EMFILE.
//!
//! A cap can change while the listener runs ([`ConnCap::set`]): the cgroup memory limit it is
//! derived from can be lowered or raised at run time (`docker update`, Kubernetes' in-place
//! resize). Connections over a lowered cap are not cut; new ones wait until the count is under
//! it, and idle ones are shed for them as at any cap.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::conn::{self, ConnSettings};

/// A bound listener and its guards.
pub(crate) struct Listener {
    pub(crate) socket: TcpListener,
    /// `public`, `redirect` or `admin`: named in the log.
    pub(crate) name: &'static str,
    /// Connections served at once; more wait in the kernel's accept queue.
    pub(crate) cap: Arc<ConnCap>,
    /// Terminate TLS on every connection (the public listener with `[server.tls]`).
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
}

/// A listener's connection cap and the connections it holds now.
#[derive(Debug)]
pub(crate) struct ConnCap {
    max: AtomicUsize,
    open: AtomicUsize,
    /// A connection closed or the cap changed: a waiting accept looks again.
    changed: Notify,
}

/// One connection's place under its listener's cap, given back when dropped.
pub(crate) struct ConnSlot(Arc<ConnCap>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

impl ConnCap {
    pub(crate) fn new(max: usize) -> Arc<ConnCap> {
        Arc::new(ConnCap {
            max: AtomicUsize::new(max),
            open: AtomicUsize::new(0),
            changed: Notify::new(),
        })
    }

    pub(crate) fn max(&self) -> usize {
        self.max.load(Ordering::Acquire)
    }

    /// A new cap; connections already over it stay, new ones wait until the count is under it.
    pub(crate) fn set(&self, max: usize) {
        self.max.store(max, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// A place for one more connection, if the count is under the cap.
    fn try_take(self: &Arc<Self>) -> Option<ConnSlot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < self.max()).then_some(open + 1)
            })
            .ok()
            .map(|_| ConnSlot(self.clone()))
    }

    /// Waits for a place.
    async fn take(self: &Arc<Self>) -> ConnSlot {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before looking, so a close in between is not missed.
            changed.as_mut().enable();
            if let Some(slot) = self.try_take() {
                return slot;
            }
            changed.await;
        }
    }

    /// Waits until every connection has closed.
    async fn drained(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.open.load(Ordering::Acquire) == 0 {
                return;
            }
            changed.await;
        }
    }
}

/// Accepts and serves connections until `shutdown`, then waits for them to close until `grace`
/// has passed (each connection also stops by itself within its close grace). Returns the
/// deadline it drained against, for whatever else must finish by then.
pub(crate) async fn run<M, S, B>(
    listener: Listener,
    settings: impl Fn() -> ConnSettings,
    mut make_service: M,
    grace: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> Instant
where
    M: FnMut(SocketAddr, &Arc<conn::Arrival>) -> S,
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let Listener {
        socket,
        name,
        cap,
        tls,
    } = listener;
    // Asks idle connections to close when a client is waiting for a slot.
    let shed = Arc::new(Notify::new());
    loop {
        let (stream, peer) = tokio::select! {
            r = socket.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        // Request durations count from here (see `conn::Arrival`).
        let accepted = std::time::Instant::now();
        // At the cap, this one client waits (the rest queue in the kernel's backlog, costing
        // us nothing) while connections idle for a while are asked to close.
        let permit = match cap.try_take() {
            Some(p) => p,
            None => {
                let waited = loop {
                    shed.notify_waiters();
                    tokio::select! {
                        p = cap.take() => break Some(p),
                        _ = tokio::time::sleep(conn::SHED_AFTER_IDLE / 4) => {}
                        _ = stopped(&mut shutdown) => break None,
                    }
                };
                match waited {
                    Some(p) => p,
                    None => break,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let arrival = conn::Arrival::new(accepted);
        let conn = conn::serve(
            stream,
            make_service(peer, &arrival),
            settings(),
            tls.clone(),
            shutdown.clone(),
            shed.clone(),
            arrival,
        );
        tokio::spawn(async move {
            conn.await;
            drop(permit);
        });
    }
    drop(socket);
    let deadline = Instant::now() + grace;
    // Every connection holds a slot until it is closed: having them all back means drained.
    if tokio::time::timeout_at(deadline, cap.drained())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = name,
            grace_secs = grace.as_secs(),
            "shutdown grace period over; closing remaining connections"
        );
    }
    deadline
}

/// The connection cap of each listener (`redirect` is 0 without `[server.redirect_http]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ListenerCaps {
    pub(crate) public: usize,
    pub(crate) redirect: usize,
    pub(crate) admin: usize,
}

impl ListenerCaps {
    pub(crate) fn configured(cfg: &crate::config::Config) -> ListenerCaps {
        ListenerCaps {
            public: cfg.limits.max_connections,
            redirect: cfg
                .server
                .redirect_http
                .as_ref()
                .map_or(0, |r| r.max_connections),
            admin: cfg.admin.max_connections,
        }
    }

    pub(crate) fn total(&self) -> usize {
        self.public + self.redirect + self.admin
    }

    /// The caps lowered so that all listeners together hold at most `budget` connections,
    /// each keeping its own share so that none can take another's: the admin listener keeps
    /// its cap up to an eighth of the budget (it is small, and it is how an operator sees
    /// what is going on), the public and redirect listeners share the rest in proportion to
    /// their caps; every listener keeps at least one slot. `None` when they fit already.
    pub(crate) fn fit(self, budget: usize) -> Option<ListenerCaps> {
        if self.total() <= budget {
            return None;
        }
        let admin = self.admin.min(budget / 8).max(1);
        let rest = budget.saturating_sub(admin);
        let wanted = self.public + self.redirect;
        let (public, redirect) = if wanted <= rest {
            (self.public, self.redirect)
        } else {
            let share = |cap: usize| (rest as u128 * cap as u128 / wanted as u128) as usize;
            let redirect = if self.redirect == 0 {
                0
            } else {
                share(self.redirect).max(1)
            };
            (rest.saturating_sub(redirect).max(1), redirect)
        };
        Some(ListenerCaps {
            public,
            redirect,
            admin,
        })
    }

    /// The settings `fitted` lowers, for the log: `limits.max_connections 10000 -> 381, ...`.
    pub(crate) fn lowered_to(&self, fitted: &ListenerCaps) -> String {
        [
            ("limits.max_connections", self.public, fitted.public),
            (
                "server.redirect_http.max_connections",
                self.redirect,
                fitted.redirect,
            ),
            ("admin.max_connections", self.admin, fitted.admin),
        ]
        .iter()
        .filter(|(_, from, to)| from != to)
        .map(|(name, from, to)| format!("{name} {from} -> {to}"))
        .collect::<Vec<_>>()
        .join(", ")
    }
}

/// Resolves once shutdown was requested (the watch guard is not held across awaits).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_fit_a_budget_each_listener_with_its_own_share() {
        let caps = ListenerCaps {
            public: 10_000,
            redirect: 1_024,
            admin: 64,
        };
        assert_eq!(caps.fit(20_000), None);
        // 480: what a limit of 1,024 descriptors leaves the listeners.
        let fitted = caps.fit(480).unwrap();
        assert_eq!(fitted.admin, 60);
        assert_eq!(fitted.total(), 480);
        assert!(fitted.redirect >= 1 && fitted.redirect < fitted.public / 5);
        assert_eq!(
            caps.lowered_to(&fitted),
            format!(
                "limits.max_connections 10000 -> {}, server.redirect_http.max_connections \
                 1024 -> {}, admin.max_connections 64 -> 60",
                fitted.public, fitted.redirect
            )
        );
        // No redirect listener: it gets nothing, the public one the rest.
        let fitted = ListenerCaps {
            redirect: 0,
            ..caps
        }
        .fit(1_024)
        .unwrap();
        assert_eq!((fitted.public, fitted.redirect, fitted.admin), (960, 0, 64));
        // A tiny budget still leaves every listener a slot.
        let fitted = caps.fit(3).unwrap();
        assert_eq!((fitted.public, fitted.redirect, fitted.admin), (1, 1, 1));
        // Small caps that fit are never raised.
        let small = ListenerCaps {
            public: 100,
            redirect: 10,
            admin: 4,
        };
        assert_eq!(small.fit(480), None);
    }
}
