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
//! This file is that decision (lookup, single flight, stale-if-error); the parts:
//! - `store.rs`: the entries in moka with a byte weigher (key + headers + body) under one
//!   global budget, kept past freshness for the stale-if-error window, and the purges;
//! - `flight.rs`: the single-flight table; `key.rs`: what identifies an entry;
//! - `rules.rs`: storability and freshness, RFC 9111 in a simplified form.
//!
//! Freshness is judged with `tokio::time::Instant` (so tests can pause the clock); moka's own
//! expiry only reclaims memory.
//!
//! Clients revalidate against the gateway: a stored response carries a strong `ETag` (the
//! upstream's, or one computed from the body when it is stored, `validators.rs`), and the
//! handler answers a matching `If-None-Match` / `If-Modified-Since` with a 304 from the entry.
//!
//! Not done, on purpose: the gateway's own revalidation of the upstream (an expired entry is
//! simply fetched again, and a client's validators are stripped from the fetch that fills an
//! entry), `Expires`, the upstream's `Age`, range requests (they bypass the cache, see
//! `rules::request_is_cacheable`), and the response's own `stale-if-error` directive (the
//! route's window applies).

mod flight;
mod key;
mod rules;
mod store;
#[cfg(test)]
mod tests;
mod validators;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AGE, CONTENT_LENGTH};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use metrics::counter;
use tokio::time::Instant;

use crate::config::{CacheConfig, RouteCachePolicy};
use crate::observability::metrics::{with_kept, with_route_slot, RouteSlots};
pub use key::CacheKey;
pub use rules::{request_is_cacheable, strip_validators};
pub use validators::{not_modified, not_modified_headers, strong_etag};

use flight::{Flights, Role};
use key::{Resource, Variant, Vary};
use store::{Store, StoredResponse};

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
    /// Attempts the upstream call took (`X-Upstream-Attempts` on a miss); 0 when unknown.
    pub attempts: u32,
}

impl Fetched {
    /// A fully buffered response.
    pub fn buffered(status: StatusCode, headers: HeaderMap, body: Bytes) -> Fetched {
        Fetched {
            status,
            headers,
            body,
            streamed: None,
            attempts: 0,
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
    /// Upstream attempts this request's own fetch took; 0 when it made none (a hit, a waiter).
    pub attempts: u32,
    pub outcome: CacheOutcome,
    /// Time since the gateway stored the response; `None` when it was fetched for this request.
    pub age: Option<Duration>,
    /// How long a cache in front may keep the answer (`Cache-Control: max-age`): the
    /// entry's remaining freshness; `None` when the response is not storable.
    pub fresh_for: Option<Duration>,
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

/// `Cache-Control` for an answer the upstream gave no directives for: caches in front may keep
/// it for what is left of its freshness. `max-age` counts from the response's age (RFC 9111
/// §4.2.3), so it is the whole-second `Age` sent plus the remaining freshness. No `public`:
/// it only lifts the rule against storing answers to requests with `Authorization`, and the
/// cache never answers those (REDbot flags it as unnecessary).
pub fn max_age(fresh_for: Duration, age: Option<Duration>) -> HeaderValue {
    let seconds = age.map_or(0, |a| a.as_secs()) + fresh_for.as_secs();
    HeaderValue::from_str(&format!("max-age={seconds}"))
        .unwrap_or(HeaderValue::from_static("no-cache"))
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

/// A response fetched by a flight's leader, as the waiters receive it.
struct SharedResponse {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    /// What waiters report: HIT when the response was stored, otherwise the leader's outcome.
    outcome: CacheOutcome,
    stored_at: Option<Instant>,
    /// Until when the stored response is fresh; `None` when it was not stored.
    fresh_until: Option<Instant>,
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
        let age = self.stored_at.map(|t| now.saturating_duration_since(t));
        let fresh_for = self.fresh_until.map(|t| t.saturating_duration_since(now));
        answer(
            self.status,
            &self.headers,
            &self.body,
            (self.outcome, age, fresh_for),
            head,
        )
    }
}

/// A response answered from memory (an entry, or a flight leader's result): the headers with
/// room for the gateway's own, no body for a HEAD.
fn answer(
    status: StatusCode,
    headers: &HeaderMap,
    body: &Bytes,
    (outcome, age, fresh_for): (CacheOutcome, Option<Duration>, Option<Duration>),
    head: bool,
) -> CacheHit {
    CacheHit {
        status,
        headers: headers_with_room(headers),
        body: if head { Bytes::new() } else { body.clone() },
        streamed: None,
        attempts: 0,
        outcome,
        age,
        fresh_for,
    }
}

/// What a leader publishes to its waiters; `E` is the caller's fetch error.
type SharedResult<E> = Result<Arc<SharedResponse>, E>;

/// The response cache. Cloning is cheap and clones share entries and flights.
#[derive(Clone)]
pub struct ResponseCache {
    /// The stored responses (`store.rs`).
    store: Store,
    /// The fetches under way, one per resource (`flight.rs`).
    flights: Arc<Flights>,
}

impl ResponseCache {
    pub fn new(cfg: &CacheConfig) -> ResponseCache {
        ResponseCache {
            store: Store::new(cfg),
            flights: Arc::default(),
        }
    }

    /// Drops every entry (admin `DELETE /admin/cache`). A fetch under way stores its response
    /// afterwards, which is as fresh as anything a client could get.
    pub async fn purge(&self) {
        self.store.purge().await;
    }

    /// Drops the entries of one route, by the id given to [`CacheKey::with_route`]
    /// (admin `DELETE /admin/cache?route=...`).
    pub async fn purge_route(&self, route: &str) {
        self.store.purge_route(route).await;
    }

    /// Drops the entries of `upstream` whose upstream path starts with `path_prefix`, for when
    /// the data behind several routes changed at once.
    pub async fn purge_prefix(&self, upstream: &str, path_prefix: &str) {
        self.store.purge_prefix(upstream, path_prefix).await;
    }

    /// Current size; also refreshes the `gateway_cache_bytes` / `gateway_cache_entries`
    /// gauges, so a metrics scrape that calls it reports the same numbers as `/admin`.
    pub fn stats(&self) -> CacheStats {
        self.store.stats()
    }

    /// Runs moka's deferred housekeeping now (evictions, expirations, purges, counts), so
    /// that [`ResponseCache::stats`] is exact. Normally it runs piecemeal on cache accesses.
    pub async fn run_pending_tasks(&self) {
        self.store.run_pending_tasks().await;
    }

    /// The largest body stored; a fetch must stream anything larger instead of buffering it.
    pub fn max_entry_bytes(&self) -> u64 {
        self.store.max_entry_bytes()
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
        // One async block, so that every way out of it is counted below.
        let key = &key;
        let result = async {
            let method = if key.head { Method::HEAD } else { Method::GET };
            if !request_is_cacheable(&method, req_headers) {
                let fetched = fetch().await?;
                let fresh_for = rules::freshness(fetched.status, &fetched.headers, policy)
                    .ok()
                    .map(|f| f.ttl);
                return Ok(fetched_answer(
                    fetched,
                    (CacheOutcome::Bypass, fresh_for),
                    key.head,
                ));
            }
            loop {
                let cached = self.store.lookup(&key.resource, req_headers).await;
                if let Some(hit) = fresh_answer(cached.as_deref(), key.head) {
                    return Ok(hit);
                }
                match self.flights.join(&key.resource) {
                    Role::Leader(leader) => {
                        // A flight that ended between our lookup and join may just have stored it.
                        let cached = self.store.lookup(&key.resource, req_headers).await;
                        if let Some(hit) = fresh_answer(cached.as_deref(), key.head) {
                            return Ok(hit);
                        }
                        // Boxed, like the fill below: only a miss pays for its future
                        // (the store's insert, ~1.6 KB), not every request's (a hit's).
                        let (result, shared) =
                            Box::pin(self.fetch_and_store(key, req_headers, policy, fetch, cached))
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
                                let cached = self.store.lookup(&key.resource, req_headers).await;
                                let (result, _) = Box::pin(self.fetch_and_store(
                                    key,
                                    req_headers,
                                    policy,
                                    fetch,
                                    cached,
                                ))
                                .await;
                                return result;
                            }
                        }
                    }
                }
            }
        }
        .await;
        let outcome = match &result {
            Ok(hit) => hit.outcome,
            Err(_) => CacheOutcome::Miss,
        };
        record(&key.resource, outcome);
        result
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
                        fresh_until: Some(stale.fresh_until),
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
                fresh_until: None,
                shareable: false,
                vary: Arc::from([]),
                leader_variant: Variant::Primary,
            };
            return (
                Ok(fetched_answer(
                    fetched,
                    (CacheOutcome::Miss, None),
                    key.head,
                )),
                Ok(Arc::new(shared)),
            );
        }
        let mut fetched = fetched;
        let complete = body_is_complete(&fetched);
        let ttl = rules::freshness(fetched.status, &fetched.headers, policy)
            .ok()
            .map(|f| f.ttl);
        if complete && ttl.is_some() {
            // Computed once per store, so every answer from the entry can be revalidated.
            validators::add_etag(&mut fetched.headers, &fetched.body);
        }
        let stored_at = if complete {
            self.store
                .store(&key.resource, req_headers, policy, &fetched)
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
            fresh_until: stored_at.zip(ttl).and_then(|(at, ttl)| at.checked_add(ttl)),
            shareable: complete && rules::shareable(&fetched.headers),
            leader_variant: Variant::of(&vary, req_headers),
            vary,
        };
        (
            Ok(fetched_answer(fetched, (CacheOutcome::Miss, ttl), key.head)),
            Ok(Arc::new(shared)),
        )
    }
}

fn fresh_answer(cached: Option<&StoredResponse>, head: bool) -> Option<CacheHit> {
    let now = Instant::now();
    cached
        .filter(|entry| now < entry.fresh_until)
        .map(|entry| entry.answer(CacheOutcome::Hit, now, head))
}

fn fetched_answer(
    fetched: Fetched,
    (outcome, fresh_for): (CacheOutcome, Option<Duration>),
    head: bool,
) -> CacheHit {
    CacheHit {
        status: fetched.status,
        headers: fetched.headers,
        body: if head { Bytes::new() } else { fetched.body },
        streamed: if head { None } else { fetched.streamed },
        attempts: fetched.attempts,
        outcome,
        age: None,
        fresh_for,
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
