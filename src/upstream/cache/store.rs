//! The store: moka entries under one byte budget (key, headers, body and a fixed overhead
//! per entry), looked up by resource and `Vary` variant, kept past freshness for the
//! stale-if-error window, and purged by route or prefix. Whether to look, fetch or serve
//! stale is decided in `cache.rs`; this file only keeps responses.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, StatusCode};
use metrics::{counter, gauge};
use moka::notification::RemovalCause;
use moka::Expiry;
use tokio::time::Instant;

use super::key::{Resource, StoreKey, Variant, Vary};
use super::{answer, rules, CacheHit, CacheOutcome, CacheStats, Fetched};
use crate::config::{CacheConfig, RouteCachePolicy};

/// Bytes charged per entry on top of key, headers and body: moka's bookkeeping and our
/// structs. Keeps a flood of tiny entries from exceeding the real memory budget.
const ENTRY_OVERHEAD: usize = 256;

/// Bytes charged per header on top of name and value (HTTP/2's HPACK accounting uses 32).
const HEADER_OVERHEAD: usize = 32;

/// One stored response.
pub(super) struct StoredResponse {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
    /// The base of `Age`.
    pub(super) stored_at: Instant,
    pub(super) fresh_until: Instant,
    /// `fresh_until` plus the stale-if-error window: until then the entry is kept, for outages.
    pub(super) stale_until: Instant,
    /// The request headers the response varies on, so a waiter can tell whether a result
    /// fetched for another request selects its own variant.
    pub(super) vary: Arc<[HeaderName]>,
    /// Headers + body + overhead, computed once for the weigher.
    weight: usize,
}

impl StoredResponse {
    pub(super) fn answer(&self, outcome: CacheOutcome, now: Instant, head: bool) -> CacheHit {
        let age = Some(now.saturating_duration_since(self.stored_at));
        let fresh_for = Some(self.fresh_until.saturating_duration_since(now));
        answer(
            self.status,
            &self.headers,
            &self.body,
            (outcome, age, fresh_for),
            head,
        )
    }
}

/// Where a resource's responses vary: stored in the primary slot so that one lookup tells
/// which request headers select the variant.
struct VaryIndex {
    names: Arc<[HeaderName]>,
    keep_until: Instant,
}

#[derive(Clone)]
enum Slot {
    Response(Arc<StoredResponse>),
    VaryIndex(Arc<VaryIndex>),
}

impl Slot {
    fn keep_until(&self) -> Instant {
        match self {
            Slot::Response(response) => response.stale_until,
            Slot::VaryIndex(index) => index.keep_until,
        }
    }
}

/// Tells moka to drop each entry when its stale-if-error window ends. Freshness itself is
/// checked on lookup with tokio's clock; this only reclaims memory.
struct KeepUntil;

impl Expiry<StoreKey, Slot> for KeepUntil {
    fn expire_after_create(
        &self,
        _key: &StoreKey,
        slot: &Slot,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(slot.keep_until().saturating_duration_since(Instant::now()))
    }

    fn expire_after_update(
        &self,
        _key: &StoreKey,
        slot: &Slot,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(slot.keep_until().saturating_duration_since(Instant::now()))
    }
}

fn weigh(key: &StoreKey, slot: &Slot) -> u32 {
    let value = match slot {
        Slot::Response(response) => response.weight,
        Slot::VaryIndex(index) => index.names.iter().map(|n| n.as_str().len()).sum(),
    };
    let bytes = ENTRY_OVERHEAD + key.resource.weight() + key.variant.weight() + value;
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// The moka entries and the size limit of one entry.
#[derive(Clone)]
pub(super) struct Store {
    entries: moka::future::Cache<StoreKey, Slot>,
    /// Larger bodies are passed through but not stored.
    max_entry_bytes: u64,
}

impl Store {
    pub(super) fn new(cfg: &CacheConfig) -> Store {
        let entries = moka::future::Cache::builder()
            .max_capacity(cfg.max_bytes.0)
            .weigher(weigh)
            .expire_after(KeepUntil)
            .eviction_listener(|_key, _slot, cause| {
                let cause = match cause {
                    RemovalCause::Size => "size",
                    RemovalCause::Expired => "expired",
                    // Purges and replacements are not evictions.
                    RemovalCause::Explicit | RemovalCause::Replaced => return,
                };
                counter!("gateway_cache_evictions_total", "cause" => cause).increment(1);
            })
            // Needed by purge_route / purge_prefix.
            .support_invalidation_closures()
            .build();
        Store {
            entries,
            max_entry_bytes: cfg.max_entry_bytes.0,
        }
    }

    /// The largest body stored.
    pub(super) fn max_entry_bytes(&self) -> u64 {
        self.max_entry_bytes
    }

    /// The stored response for the request's variant, if it is still fresh or may still be
    /// served stale.
    pub(super) async fn lookup(
        &self,
        resource: &Arc<Resource>,
        req_headers: &HeaderMap,
    ) -> Option<Arc<StoredResponse>> {
        let primary = StoreKey {
            resource: resource.clone(),
            variant: Variant::Primary,
        };
        let response = match self.entries.get(&primary).await? {
            Slot::Response(response) => response,
            Slot::VaryIndex(index) => {
                let variant = StoreKey {
                    resource: resource.clone(),
                    variant: Variant::of(&index.names, req_headers),
                };
                match self.entries.get(&variant).await? {
                    Slot::Response(response) => response,
                    Slot::VaryIndex(_) => return None,
                }
            }
        };
        (Instant::now() < response.stale_until).then_some(response)
    }

    /// Stores `fetched` when RFC 9111 and the size limit allow; returns when it was stored.
    pub(super) async fn store(
        &self,
        resource: &Arc<Resource>,
        req_headers: &HeaderMap,
        policy: &RouteCachePolicy,
        fetched: &Fetched,
    ) -> Option<Instant> {
        let freshness = match rules::freshness(fetched.status, &fetched.headers, policy) {
            Ok(freshness) => freshness,
            Err(why) => {
                tracing::debug!(upstream = %resource.upstream, route = %resource.route, ?why, "cache: response not stored");
                return None;
            }
        };
        if fetched.body.len() as u64 > self.max_entry_bytes {
            tracing::debug!(upstream = %resource.upstream, route = %resource.route, bytes = fetched.body.len(), "cache: body over max_entry_bytes, not stored");
            return None;
        }
        // `rules::freshness` already refused `Vary: *`.
        let Vary::Names(vary) = Vary::of(&fetched.headers) else {
            return None;
        };
        let now = Instant::now();
        // An absurd max-age or stale window would overflow the clock: not worth storing.
        let fresh_until = now.checked_add(freshness.ttl)?;
        let stale_until = fresh_until.checked_add(freshness.stale_if_error)?;
        let header_bytes: usize = fetched
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + HEADER_OVERHEAD)
            .sum();
        let response = Arc::new(StoredResponse {
            status: fetched.status,
            headers: fetched.headers.clone(),
            body: fetched.body.clone(),
            stored_at: now,
            fresh_until,
            stale_until,
            vary: vary.clone(),
            weight: header_bytes + fetched.body.len(),
        });
        let primary = StoreKey {
            resource: resource.clone(),
            variant: Variant::Primary,
        };
        if vary.is_empty() {
            self.entries.insert(primary, Slot::Response(response)).await;
        } else {
            let variant = StoreKey {
                resource: resource.clone(),
                variant: Variant::of(&vary, req_headers),
            };
            // The variant goes in before the index, so whoever finds the index finds it too.
            self.entries.insert(variant, Slot::Response(response)).await;
            // The index must outlive every variant it leads to, not just the newest.
            let keep_until = match self.entries.get(&primary).await {
                Some(Slot::VaryIndex(index)) if index.names == vary => {
                    index.keep_until.max(stale_until)
                }
                _ => stale_until,
            };
            let index = VaryIndex {
                names: vary,
                keep_until,
            };
            self.entries
                .insert(primary, Slot::VaryIndex(Arc::new(index)))
                .await;
        }
        gauge!("gateway_cache_bytes").set(self.entries.weighted_size() as f64);
        Some(now)
    }

    /// Drops every entry (admin `DELETE /admin/cache`). A fetch under way stores its response
    /// afterwards, which is as fresh as anything a client could get.
    pub(super) async fn purge(&self) {
        self.entries.invalidate_all();
        self.settle().await;
    }

    /// Drops the entries of one route, by the id given to [`CacheKey::with_route`]
    /// (admin `DELETE /admin/cache?route=...`).
    pub(super) async fn purge_route(&self, route: &str) {
        let route: Arc<str> = Arc::from(route);
        self.purge_where(move |key| key.resource.route == route)
            .await;
    }

    /// Drops the entries of `upstream` whose upstream path starts with `path_prefix`, for when
    /// the data behind several routes changed at once.
    pub(super) async fn purge_prefix(&self, upstream: &str, path_prefix: &str) {
        let upstream: Arc<str> = Arc::from(upstream);
        let prefix: Box<str> = path_prefix.into();
        self.purge_where(move |key| {
            key.resource.upstream == upstream && key.resource.path.starts_with(&*prefix)
        })
        .await;
    }

    async fn purge_where(&self, doomed: impl Fn(&StoreKey) -> bool + Send + Sync + 'static) {
        if let Err(error) = self
            .entries
            .invalidate_entries_if(move |key, _| doomed(key))
        {
            // Only possible if `new` stopped enabling invalidation closures. Purging all is
            // the safe superset of a partial purge.
            tracing::error!(%error, "cache: selective purge unavailable, purging everything");
            self.entries.invalidate_all();
        }
        self.settle().await;
    }

    /// Current size; also refreshes the `gateway_cache_bytes` / `gateway_cache_entries`
    /// gauges, so a metrics scrape that calls it reports the same numbers as `/admin`.
    pub(super) fn stats(&self) -> CacheStats {
        let stats = CacheStats {
            entries: self.entries.entry_count(),
            bytes: self.entries.weighted_size(),
        };
        gauge!("gateway_cache_bytes").set(stats.bytes as f64);
        gauge!("gateway_cache_entries").set(stats.entries as f64);
        stats
    }

    /// Runs moka's deferred housekeeping now (evictions, expirations, purges, counts), so
    /// that [`ResponseCache::stats`] is exact. Normally it runs piecemeal on cache accesses.
    pub(super) async fn run_pending_tasks(&self) {
        self.entries.run_pending_tasks().await;
    }

    async fn settle(&self) {
        self.run_pending_tasks().await;
        self.stats();
    }
}
