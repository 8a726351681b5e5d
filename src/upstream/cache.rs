//! Response cache for GET/HEAD routes that opt in (`cache = { ttl = "5s" }`).
//!
//! The proxy handler asks [`request_is_cacheable`] first, builds a [`CacheKey`] and calls
//! [`ResponseCache::get_or_fetch`] with a closure that runs the upstream pipeline:
//!
//! - fresh entry: answered from memory (`X-Cache: HIT`, `Age`);
//! - missing or expired: ONE fetch per resource at a time; concurrent requests wait for it and
//!   share its result (single flight, see `flight.rs`), so a popular key expiring never sends
//!   a burst to the upstream;
//! - fetch failed or answered 5xx: an entry expired no longer than the route's
//!   `stale_if_error` ago is served instead (`X-Cache: STALE`), so a short upstream outage
//!   shows slightly old data rather than 503s.
//!
//! Storability follows RFC 9111 in a simplified form (see `rules.rs`). Entries live in moka
//! with a byte weigher (key + headers + body) under one global budget, and stay there past
//! freshness for the stale-if-error window. Freshness is judged with `tokio::time::Instant`
//! (so tests can pause the clock); moka's own expiry only reclaims memory.
//!
//! Not done, on purpose: conditional revalidation (ETag / `If-None-Match`: an expired entry is
//! simply fetched again), `Expires`, the upstream's `Age`, range requests, and the response's
//! own `stale-if-error` directive (the route's window applies).

mod flight;
mod key;
mod rules;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::observability::metrics::{with_kept, with_route_slot, RouteSlots};
use bytes::Bytes;
use http::header::{AGE, CONTENT_LENGTH};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use metrics::{counter, gauge};
use moka::notification::RemovalCause;
use moka::Expiry;
use tokio::time::Instant;

use crate::config::{CacheConfig, RouteCachePolicy};
pub use key::CacheKey;
pub use rules::request_is_cacheable;

use flight::{Flights, Role};
use key::{Resource, StoreKey, Variant, Vary};

/// Bytes charged per entry on top of key, headers and body: moka's bookkeeping and our
/// structs. Keeps a flood of tiny entries from exceeding the real memory budget.
const ENTRY_OVERHEAD: usize = 256;
/// Bytes charged per header on top of name and value (HTTP/2's HPACK accounting uses 32).
const HEADER_OVERHEAD: usize = 32;

/// Headers the gateway adds to a response after the cache answered (`X-Cache`, `Age`, the
/// request id, CORS, RateLimit, ...): room for them is made up front.
const ADDED_HEADERS: usize = 10;

/// A copy of a stored response's headers with room for [`ADDED_HEADERS`] more. A plain
/// `clone` has no spare capacity, so the first header added to every hit grew (rehashed and
/// reallocated) the map: ~2,000 of a hit's ~33,000 instructions.
fn headers_with_room(stored: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(stored.len() + ADDED_HEADERS);
    for (name, value) in stored {
        headers.append(name.clone(), value.clone());
    }
    headers
}

/// A body streamed through without being stored; `Sync` (unlike axum's `Body`) so that a
/// `&Fetched` may be held across the cache's awaits.
pub type StreamedBody =
    http_body_util::combinators::BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync + 'static>>;

/// An upstream response as the fetch closure returns it: buffered, or (too large to be
/// stored) streaming.
#[derive(Debug)]
pub struct Fetched {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The whole body, when it fits in `max_entry_bytes` (see [`ResponseCache::max_entry_bytes`]).
    pub body: Bytes,
    /// The body, when it was larger than an entry may be: `body` is then empty and this is
    /// passed to the client as it arrives, never stored nor shared, so large answers cost a
    /// buffer's worth of memory instead of their size.
    pub streamed: Option<StreamedBody>,
}

impl Fetched {
    /// A fully buffered response.
    pub fn buffered(status: StatusCode, headers: HeaderMap, body: Bytes) -> Fetched {
        Fetched {
            status,
            headers,
            body,
            streamed: None,
        }
    }
}

/// What the handler sends back: from the cache or from the fetch, with how it was obtained.
#[derive(Debug)]
pub struct CacheHit {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// Empty for a HEAD request even when answered from a GET entry.
    pub body: Bytes,
    /// A body too large to store, streaming from the upstream (see [`Fetched::streamed`]).
    pub streamed: Option<StreamedBody>,
    pub outcome: CacheOutcome,
    /// Time since the gateway stored the response; `None` when it was fetched for this request.
    pub age: Option<Duration>,
}

/// How a response was obtained, reported to clients in `X-Cache`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheOutcome {
    /// From a fresh entry, or from a concurrent request's fetch that was stored.
    Hit,
    /// Fetched from the upstream (by this request, or by a concurrent one whose response could
    /// be shared but was not storable).
    Miss,
    /// An expired entry served because the upstream failed or answered 5xx.
    Stale,
    /// The request may not use the cache (method, credentials, `no-cache`).
    Bypass,
}

impl CacheOutcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            CacheOutcome::Hit => "HIT",
            CacheOutcome::Miss => "MISS",
            CacheOutcome::Stale => "STALE",
            CacheOutcome::Bypass => "BYPASS",
        }
    }
}

/// Adds `X-Cache` and, for answers from the cache, `Age` in whole seconds.
pub fn apply_headers(outcome: CacheOutcome, age: Option<Duration>, headers: &mut HeaderMap) {
    headers.insert(
        HeaderName::from_static("x-cache"),
        HeaderValue::from_static(outcome.as_str()),
    );
    if let (CacheOutcome::Hit | CacheOutcome::Stale, Some(age)) = (outcome, age) {
        headers.insert(AGE, HeaderValue::from(age.as_secs()));
    }
}

/// Snapshot for `/admin` and the gauges. moka updates its counts lazily, so these may lag by
/// the writes of the last moment; [`ResponseCache::run_pending_tasks`] settles them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheStats {
    /// moka entries: stored responses plus one index per resource whose responses carry `Vary`.
    pub entries: u64,
    /// Weighted size: keys, headers, bodies and a fixed overhead per entry.
    pub bytes: u64,
}

/// One stored response.
struct StoredResponse {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    /// The base of `Age`.
    stored_at: Instant,
    fresh_until: Instant,
    /// `fresh_until` plus the stale-if-error window: until then the entry is kept, for outages.
    stale_until: Instant,
    /// The request headers the response varies on, so a waiter can tell whether a result
    /// fetched for another request selects its own variant.
    vary: Arc<[HeaderName]>,
    /// Headers + body + overhead, computed once for the weigher.
    weight: usize,
}

impl StoredResponse {
    fn answer(&self, outcome: CacheOutcome, now: Instant, head: bool) -> CacheHit {
        CacheHit {
            status: self.status,
            headers: headers_with_room(&self.headers),
            body: if head {
                Bytes::new()
            } else {
                self.body.clone()
            },
            streamed: None,
            outcome,
            age: Some(now.saturating_duration_since(self.stored_at)),
        }
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

/// A response fetched by a flight's leader, as the waiters receive it.
struct SharedResponse {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    /// What waiters report: HIT when the response was stored, otherwise the leader's outcome.
    outcome: CacheOutcome,
    stored_at: Option<Instant>,
    /// False for personal responses (`private`, `Set-Cookie`, ...) and bodies that disagree
    /// with their `Content-Length`: waiters then fetch on their own.
    shareable: bool,
    vary: Arc<[HeaderName]>,
    /// The leader's values of the `vary` headers; a waiter with other values wants another
    /// variant.
    leader_variant: Variant,
}

impl SharedResponse {
    fn serves(&self, request_headers: &HeaderMap) -> bool {
        self.shareable && Variant::of(&self.vary, request_headers) == self.leader_variant
    }

    fn answer(&self, now: Instant, head: bool) -> CacheHit {
        CacheHit {
            status: self.status,
            headers: headers_with_room(&self.headers),
            body: if head {
                Bytes::new()
            } else {
                self.body.clone()
            },
            streamed: None,
            outcome: self.outcome,
            age: self.stored_at.map(|t| now.saturating_duration_since(t)),
        }
    }
}

/// What a leader publishes to its waiters; `E` is the caller's fetch error.
type SharedResult<E> = Result<Arc<SharedResponse>, E>;

/// The response cache. Cloning is cheap and clones share entries and flights.
#[derive(Clone)]
pub struct ResponseCache {
    entries: moka::future::Cache<StoreKey, Slot>,
    flights: Arc<Flights>,
    /// Larger bodies are passed through but not stored (nor buffered: see
    /// [`Fetched::streamed`]).
    max_entry_bytes: u64,
}

impl ResponseCache {
    pub fn new(cfg: &CacheConfig) -> ResponseCache {
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
        ResponseCache {
            entries,
            flights: Arc::default(),
            max_entry_bytes: cfg.max_entry_bytes.0,
        }
    }

    /// The largest body stored; a fetch must stream anything larger instead of buffering it.
    pub fn max_entry_bytes(&self) -> u64 {
        self.max_entry_bytes
    }

    /// Key for a request to `upstream` at `path?query`. Add the route id with
    /// [`CacheKey::with_route`] (for purges and metrics) and the method with
    /// [`CacheKey::for_method`] (a HEAD gets no body).
    pub fn key(upstream: &str, path: &str, query: Option<&str>) -> CacheKey {
        CacheKey::new(upstream, path, query)
    }

    /// The same key as `key(upstream, path, query).with_route(route)`, built without copying
    /// the route and upstream names (the request path's form).
    pub fn key_for_route(
        route: &Arc<str>,
        upstream: &Arc<str>,
        path: &str,
        query: Option<&str>,
    ) -> CacheKey {
        CacheKey::for_route(route, upstream, path, query)
    }

    /// Answers from the cache, or runs `fetch` and stores its response when cacheable.
    ///
    /// - Fresh entry for the request's variant: HIT, `fetch` is not called.
    /// - Otherwise ONE `fetch` per resource runs at a time. Concurrent callers wait for it and
    ///   receive its result: HIT when it was stored, MISS when it could be shared but not
    ///   stored, the same error when it failed. A personal response (`private`,
    ///   `Set-Cookie`), one for another `Vary` variant, or a waiter whose error type differs
    ///   from the leader's, makes the waiter fetch on its own instead.
    /// - `fetch` returned `Err` or a 5xx: an entry expired less than its stale-if-error window
    ///   ago is served as STALE; without one the error (or the 5xx response) is returned.
    /// - Requests that [`request_is_cacheable`] refuses run `fetch` directly: BYPASS.
    ///
    /// `E: Clone` because waiters receive a copy of the leader's error (wrap it in `Arc` if it
    /// is not cheap to clone). For a HEAD key, `fetch` must GET the upstream (as nginx's
    /// `proxy_cache_convert_head` does) so the response can fill the entry GETs share; the
    /// body is dropped from what a HEAD receives. A response whose body disagrees with its
    /// `Content-Length` (a HEAD's, or truncated) is neither stored nor shared.
    pub async fn get_or_fetch<F, Fut, E>(
        &self,
        key: CacheKey,
        req_headers: &HeaderMap,
        policy: &RouteCachePolicy,
        fetch: F,
    ) -> Result<CacheHit, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Fetched, E>>,
        E: Clone + Send + Sync + 'static,
    {
        let result = self.answer(&key, req_headers, policy, fetch).await;
        let outcome = match &result {
            Ok(hit) => hit.outcome,
            Err(_) => CacheOutcome::Miss,
        };
        record(&key.resource, outcome);
        result
    }

    async fn answer<F, Fut, E>(
        &self,
        key: &CacheKey,
        req_headers: &HeaderMap,
        policy: &RouteCachePolicy,
        fetch: F,
    ) -> Result<CacheHit, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Fetched, E>>,
        E: Clone + Send + Sync + 'static,
    {
        let method = if key.head { Method::HEAD } else { Method::GET };
        if !request_is_cacheable(&method, req_headers) {
            let fetched = fetch().await?;
            return Ok(fetched_answer(fetched, CacheOutcome::Bypass, key.head));
        }
        loop {
            let cached = self.lookup(&key.resource, req_headers).await;
            if let Some(hit) = fresh_answer(cached.as_deref(), key.head) {
                return Ok(hit);
            }
            match self.flights.join(&key.resource) {
                Role::Leader(leader) => {
                    // A flight that ended between our lookup and join may just have stored it.
                    let cached = self.lookup(&key.resource, req_headers).await;
                    if let Some(hit) = fresh_answer(cached.as_deref(), key.head) {
                        return Ok(hit);
                    }
                    let (result, shared) = self
                        .fetch_and_store(key, req_headers, policy, fetch, cached)
                        .await;
                    leader.publish(Arc::new(shared));
                    return result;
                }
                Role::Waiter(waiter) => {
                    // `None`: the leader was cancelled; try again, maybe as the new leader.
                    let Some(published) = waiter.wait().await else {
                        continue;
                    };
                    match published.downcast_ref::<SharedResult<E>>() {
                        Some(Err(error)) => return Err(error.clone()),
                        Some(Ok(shared)) if shared.serves(req_headers) => {
                            return Ok(shared.answer(Instant::now(), key.head));
                        }
                        // Not ours to take. Fetching alone (not through a new flight) keeps a
                        // crowd of waiters from being served one upstream call at a time.
                        Some(Ok(_)) | None => {
                            let cached = self.lookup(&key.resource, req_headers).await;
                            let (result, _) = self
                                .fetch_and_store(key, req_headers, policy, fetch, cached)
                                .await;
                            return result;
                        }
                    }
                }
            }
        }
    }

    /// Runs `fetch`, stores a cacheable response, falls back to `cached` while it may be
    /// served stale. Returns the caller's answer and what waiters receive.
    async fn fetch_and_store<F, Fut, E>(
        &self,
        key: &CacheKey,
        req_headers: &HeaderMap,
        policy: &RouteCachePolicy,
        fetch: F,
        cached: Option<Arc<StoredResponse>>,
    ) -> (Result<CacheHit, E>, SharedResult<E>)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Fetched, E>>,
        E: Clone,
    {
        let fetched = match fetch().await {
            Ok(fetched) if !fetched.status.is_server_error() => fetched,
            failed => {
                // Judged after the fetch: a slow failure may have outlasted the window.
                let now = Instant::now();
                if let Some(stale) = cached.filter(|entry| now < entry.stale_until) {
                    tracing::debug!(
                        upstream = %key.resource.upstream,
                        route = %key.resource.route,
                        "cache: upstream failed, serving stale entry"
                    );
                    let shared = SharedResponse {
                        status: stale.status,
                        headers: stale.headers.clone(),
                        body: stale.body.clone(),
                        outcome: CacheOutcome::Stale,
                        stored_at: Some(stale.stored_at),
                        shareable: true,
                        vary: stale.vary.clone(),
                        leader_variant: Variant::of(&stale.vary, req_headers),
                    };
                    return (
                        Ok(stale.answer(CacheOutcome::Stale, now, key.head)),
                        Ok(Arc::new(shared)),
                    );
                }
                match failed {
                    Ok(server_error) => server_error,
                    Err(error) => return (Err(error.clone()), Err(error)),
                }
            }
        };
        if fetched.streamed.is_some() {
            // Too large to store or share: waiters fetch (and stream) on their own.
            let shared = SharedResponse {
                status: fetched.status,
                headers: HeaderMap::new(),
                body: Bytes::new(),
                outcome: CacheOutcome::Miss,
                stored_at: None,
                shareable: false,
                vary: Arc::from([]),
                leader_variant: Variant::Primary,
            };
            return (
                Ok(fetched_answer(fetched, CacheOutcome::Miss, key.head)),
                Ok(Arc::new(shared)),
            );
        }
        let complete = body_is_complete(&fetched);
        let stored_at = if complete {
            self.store(&key.resource, req_headers, policy, &fetched)
                .await
        } else {
            None
        };
        let vary: Arc<[HeaderName]> = match Vary::of(&fetched.headers) {
            Vary::Names(names) => names,
            Vary::Any => Arc::from([]),
        };
        let shared = SharedResponse {
            status: fetched.status,
            headers: fetched.headers.clone(),
            body: fetched.body.clone(),
            outcome: if stored_at.is_some() {
                CacheOutcome::Hit
            } else {
                CacheOutcome::Miss
            },
            stored_at,
            shareable: complete && rules::shareable(&fetched.headers),
            leader_variant: Variant::of(&vary, req_headers),
            vary,
        };
        (
            Ok(fetched_answer(fetched, CacheOutcome::Miss, key.head)),
            Ok(Arc::new(shared)),
        )
    }

    /// The stored response for the request's variant, if it is still fresh or may still be
    /// served stale.
    async fn lookup(
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
    async fn store(
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
    pub async fn purge(&self) {
        self.entries.invalidate_all();
        self.settle().await;
    }

    /// Drops the entries of one route, by the id given to [`CacheKey::with_route`]
    /// (admin `DELETE /admin/cache?route=...`).
    pub async fn purge_route(&self, route: &str) {
        let route: Arc<str> = Arc::from(route);
        self.purge_where(move |key| key.resource.route == route)
            .await;
    }

    /// Drops the entries of `upstream` whose upstream path starts with `path_prefix`, for when
    /// the data behind several routes changed at once.
    pub async fn purge_prefix(&self, upstream: &str, path_prefix: &str) {
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
    pub fn stats(&self) -> CacheStats {
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
    pub async fn run_pending_tasks(&self) {
        self.entries.run_pending_tasks().await;
    }

    async fn settle(&self) {
        self.run_pending_tasks().await;
        self.stats();
    }
}

fn fresh_answer(cached: Option<&StoredResponse>, head: bool) -> Option<CacheHit> {
    let now = Instant::now();
    cached
        .filter(|entry| now < entry.fresh_until)
        .map(|entry| entry.answer(CacheOutcome::Hit, now, head))
}

fn fetched_answer(fetched: Fetched, outcome: CacheOutcome, head: bool) -> CacheHit {
    CacheHit {
        status: fetched.status,
        headers: fetched.headers,
        body: if head { Bytes::new() } else { fetched.body },
        streamed: if head { None } else { fetched.streamed },
        outcome,
        age: None,
    }
}

/// A body shorter or longer than its `Content-Length` is a HEAD's or a truncated one: storing
/// it would hand GETs a broken body.
fn body_is_complete(fetched: &Fetched) -> bool {
    match fetched.headers.get(CONTENT_LENGTH) {
        None => true,
        Some(length) => length
            .to_str()
            .ok()
            .and_then(|l| l.trim().parse::<u64>().ok())
            .is_some_and(|l| l == fetched.body.len() as u64),
    }
}

/// One route's outcome counters for one upstream, indexed by [`outcome_slot`].
type OutcomeCounters = [Option<metrics::Counter>; 4];

/// Per route label: the counters of each upstream it was cached from (one, in practice).
type RouteCounters = RouteSlots<Vec<(Arc<str>, OutcomeCounters)>>;

thread_local! {
    /// Registered counter handles per route (then upstream), so a cache answer costs one
    /// atomic add (see `observability::metrics::with_kept`). Per thread: no lock; every
    /// handle points at the same series.
    static OUTCOME_COUNTERS: std::cell::RefCell<RouteCounters> =
        std::cell::RefCell::default();
}

fn outcome_slot(outcome: CacheOutcome) -> (usize, &'static str) {
    match outcome {
        CacheOutcome::Hit => (0, "gateway_cache_hits_total"),
        CacheOutcome::Miss => (1, "gateway_cache_misses_total"),
        CacheOutcome::Stale => (2, "gateway_cache_stale_total"),
        CacheOutcome::Bypass => (3, "gateway_cache_bypass_total"),
    }
}

fn record(resource: &Resource, outcome: CacheOutcome) {
    let (slot, name) = outcome_slot(outcome);
    // Route template and upstream name only: raw paths would explode the series count.
    let register = || counter!(name, "upstream" => resource.upstream.clone(), "route" => resource.route.clone());
    OUTCOME_COUNTERS.with(|cache| {
        with_route_slot(cache, &resource.route, |upstreams: &mut Vec<_>| {
            let i = match upstreams.iter().position(|(u, _)| *u == resource.upstream) {
                Some(i) => i,
                None => {
                    upstreams.push((resource.upstream.clone(), OutcomeCounters::default()));
                    upstreams.len() - 1
                }
            };
            with_kept(&mut upstreams[i].1[slot], register, |c| c.increment(1));
        })
    });
}
