//! Runtime behaviour of `ResponseCache`. Time-dependent tests pause tokio's clock: the cache
//! judges freshness with `tokio::time::Instant`, so `advance` moves entries through their life.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use tokio::time::advance;

use super::*;
use crate::config::{ByteSize, Dur};

/// The fetch error used by the tests: what a pipeline error would be, cheap to clone.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Unavailable;

fn fetched(status: u16, body: &'static str, headers: &[(&'static str, &'static str)]) -> Fetched {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.append(*name, HeaderValue::from_static(value));
    }
    Fetched::buffered(
        StatusCode::from_u16(status).expect("valid status"),
        map,
        Bytes::from_static(body.as_bytes()),
    )
}

fn ok(body: &'static str) -> Result<Fetched, Unavailable> {
    Ok(fetched(200, body, &[]))
}

fn request(headers: &[(&'static str, &'static str)]) -> HeaderMap {
    fetched(200, "", headers).headers
}

fn policy(ttl_secs: u64) -> RouteCachePolicy {
    RouteCachePolicy::new(Duration::from_secs(ttl_secs))
}

fn products() -> CacheKey {
    ResponseCache::key("storage", "/products", None).with_route("/api/data/products")
}

/// One upstream whose calls are counted.
#[derive(Default)]
struct Upstream {
    calls: AtomicUsize,
}

impl Upstream {
    async fn call(
        &self,
        cache: &ResponseCache,
        key: &CacheKey,
        req: &HeaderMap,
        policy: &RouteCachePolicy,
        reply: Result<Fetched, Unavailable>,
    ) -> Result<CacheHit, Unavailable> {
        cache
            .get_or_fetch(key.clone(), req, policy, || async {
                self.calls.fetch_add(1, Ordering::SeqCst);
                reply
            })
            .await
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// Shorthand for a plain GET with no request headers.
async fn get(
    cache: &ResponseCache,
    upstream: &Upstream,
    policy: &RouteCachePolicy,
    reply: Result<Fetched, Unavailable>,
) -> Result<CacheHit, Unavailable> {
    upstream
        .call(cache, &products(), &HeaderMap::new(), policy, reply)
        .await
}

fn outcome(result: &Result<CacheHit, Unavailable>) -> Option<CacheOutcome> {
    result.as_ref().ok().map(|hit| hit.outcome)
}

async fn concurrent_gets(
    cache: &ResponseCache,
    upstream: &Arc<Upstream>,
    n: usize,
    reply: fn() -> Result<Fetched, Unavailable>,
) -> Vec<Result<CacheHit, Unavailable>> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (cache, upstream) = (cache.clone(), upstream.clone());
            tokio::spawn(async move {
                cache
                    .get_or_fetch(products(), &HeaderMap::new(), &policy(60), || async {
                        upstream.calls.fetch_add(1, Ordering::SeqCst);
                        // Slow enough that every request arrives while the fetch is under way.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        reply()
                    })
                    .await
            })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.expect("task completes"));
    }
    results
}

#[tokio::test(start_paused = true)]
async fn concurrent_misses_make_one_fetch() {
    let cache = ResponseCache::new(&CacheConfig::default());
    let upstream = Arc::new(Upstream::default());
    let results = concurrent_gets(&cache, &upstream, 100, || ok("products")).await;

    assert_eq!(upstream.calls(), 1);
    // The leader reports MISS; the 99 that waited were served the stored entry: HIT.
    let misses = results
        .iter()
        .filter(|r| outcome(r) == Some(CacheOutcome::Miss));
    let hits = results
        .iter()
        .filter(|r| outcome(r) == Some(CacheOutcome::Hit));
    assert_eq!((misses.count(), hits.count()), (1, 99));
    for result in &results {
        assert_eq!(result.as_ref().expect("success").body, "products");
    }
    assert_eq!(cache.flights.len(), 0, "finished flights leave the table");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_make_one_fetch_across_threads() {
    let cache = ResponseCache::new(&CacheConfig::default());
    let upstream = Arc::new(Upstream::default());
    let results = concurrent_gets(&cache, &upstream, 100, || ok("products")).await;
    assert_eq!(upstream.calls(), 1);
    let misses = results
        .iter()
        .filter(|r| outcome(r) == Some(CacheOutcome::Miss))
        .count();
    assert_eq!(misses, 1);
}

#[tokio::test(start_paused = true)]
async fn waiters_share_the_leaders_error() {
    let cache = ResponseCache::new(&CacheConfig::default());
    let upstream = Arc::new(Upstream::default());
    let results = concurrent_gets(&cache, &upstream, 20, || Err(Unavailable)).await;
    assert_eq!(upstream.calls(), 1);
    assert!(results
        .iter()
        .all(|r| r.as_ref().err() == Some(&Unavailable)));
}

#[tokio::test(start_paused = true)]
async fn personal_responses_are_not_shared_with_waiters() {
    let cache = ResponseCache::new(&CacheConfig::default());
    let upstream = Arc::new(Upstream::default());
    let results = concurrent_gets(&cache, &upstream, 10, || {
        Ok(fetched(200, "yours", &[("set-cookie", "session=1")]))
    })
    .await;
    // Each request fetched its own: one client's cookie never reaches another.
    assert_eq!(upstream.calls(), 10);
    assert!(results
        .iter()
        .all(|r| outcome(r) == Some(CacheOutcome::Miss)));
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_leader_hands_over_to_a_waiter() {
    let cache = ResponseCache::new(&CacheConfig::default());
    let leader = tokio::spawn({
        let cache = cache.clone();
        async move {
            cache
                .get_or_fetch(products(), &HeaderMap::new(), &policy(60), || async {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    ok("never")
                })
                .await
        }
    });
    tokio::task::yield_now().await;
    let waiter = tokio::spawn({
        let cache = cache.clone();
        async move {
            cache
                .get_or_fetch(products(), &HeaderMap::new(), &policy(60), || async {
                    ok("waiter")
                })
                .await
        }
    });
    tokio::task::yield_now().await;
    leader.abort();
    let hit = waiter.await.expect("waiter completes").expect("success");
    assert_eq!(
        (hit.outcome, hit.body.as_ref()),
        (CacheOutcome::Miss, &b"waiter"[..])
    );
}

#[tokio::test(start_paused = true)]
async fn fresh_hit_carries_age_and_expires_after_ttl() {
    let cache = ResponseCache::new(&CacheConfig::default());
    let upstream = Upstream::default();
    let p = policy(5);

    let first = get(&cache, &upstream, &p, ok("v1")).await.expect("success");
    assert_eq!((first.outcome, first.age), (CacheOutcome::Miss, None));

    advance(Duration::from_millis(2500)).await;
    let hit = get(&cache, &upstream, &p, ok("v2")).await.expect("success");
    assert_eq!(
        (hit.outcome, hit.body.as_ref()),
        (CacheOutcome::Hit, &b"v1"[..])
    );
    assert_eq!(hit.age, Some(Duration::from_millis(2500)));
    let mut headers = hit.headers.clone();
    apply_headers(hit.outcome, hit.age, &mut headers);
    assert_eq!(headers["x-cache"], "HIT");
    assert_eq!(headers["age"], "2");

    advance(Duration::from_millis(2500)).await;
    let refetched = get(&cache, &upstream, &p, ok("v2")).await.expect("success");
    assert_eq!(
        (refetched.outcome, refetched.body.as_ref()),
        (CacheOutcome::Miss, &b"v2"[..])
    );
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn max_age_and_s_maxage_override_the_route_ttl() {
    let p = policy(5);

    let cache = ResponseCache::new(&CacheConfig::default());
    let upstream = Upstream::default();
    let longer = || {
        Ok(fetched(
            200,
            "a",
            &[("cache-control", "public, max-age=30")],
        ))
    };
    get(&cache, &upstream, &p, longer()).await.expect("success");
    advance(Duration::from_secs(20)).await;
    let hit = get(&cache, &upstream, &p, longer()).await.expect("success");
    assert_eq!(hit.outcome, CacheOutcome::Hit);

    let cache = ResponseCache::new(&CacheConfig::default());
    let shorter = || {
        Ok(fetched(
            200,
            "a",
            &[("cache-control", "max-age=30, s-maxage=2")],
        ))
    };
    get(&cache, &upstream, &p, shorter())
        .await
        .expect("success");
    advance(Duration::from_secs(3)).await;
    let miss = get(&cache, &upstream, &p, shorter())
        .await
        .expect("success");
    assert_eq!(miss.outcome, CacheOutcome::Miss);
}

#[tokio::test(start_paused = true)]
async fn personal_or_uncacheable_responses_are_never_stored() {
    let p = policy(60);
    let cases: [&[(&'static str, &'static str)]; 6] = [
        &[("cache-control", "no-store")],
        &[("cache-control", "private")],
        &[("set-cookie", "session=1")],
        &[("vary", "*")],
        &[("cache-control", "max-age=0")],
        &[("cache-control", "no-cache")],
    ];
    for headers in cases {
        let cache = ResponseCache::new(&CacheConfig::default());
        let upstream = Upstream::default();
        for _ in 0..2 {
            let hit = get(&cache, &upstream, &p, Ok(fetched(200, "x", headers)))
                .await
                .expect("success");
            assert_eq!(hit.outcome, CacheOutcome::Miss, "{headers:?}");
        }
        assert_eq!(upstream.calls(), 2, "{headers:?}");
    }
    // Statuses that are not cacheable by default: a 500 is passed through, not stored.
    let cache = ResponseCache::new(&CacheConfig::default());
    let upstream = Upstream::default();
    get(&cache, &upstream, &p, Ok(fetched(201, "", &[])))
        .await
        .expect("success");
    get(&cache, &upstream, &p, Ok(fetched(201, "", &[])))
        .await
        .expect("success");
    assert_eq!(upstream.calls(), 2);
    // ...whereas a 404 is.
    let cache = ResponseCache::new(&CacheConfig::default());
    get(&cache, &upstream, &p, Ok(fetched(404, "", &[])))
        .await
        .expect("success");
    let hit = get(&cache, &upstream, &p, ok("")).await.expect("success");
    assert_eq!(
        (hit.outcome, hit.status),
        (CacheOutcome::Hit, StatusCode::NOT_FOUND)
    );
}

#[tokio::test(start_paused = true)]
async fn vary_keeps_one_variant_per_header_value() {
    let cache = ResponseCache::new(&CacheConfig::default());
    let upstream = Upstream::default();
    let p = policy(60);
    let key = products();
    let english = request(&[("accept-language", "en")]);
    let french = request(&[("accept-language", "fr")]);
    let reply = |body| Ok(fetched(200, body, &[("vary", "Accept-Language")]));

    let en = upstream
        .call(&cache, &key, &english, &p, reply("hello"))
        .await;
    let fr = upstream
        .call(&cache, &key, &french, &p, reply("bonjour"))
        .await;
    assert_eq!(outcome(&en), Some(CacheOutcome::Miss));
    assert_eq!(outcome(&fr), Some(CacheOutcome::Miss));

    let en = upstream
        .call(&cache, &key, &english, &p, reply("x"))
        .await
        .expect("success");
    let fr = upstream
        .call(&cache, &key, &french, &p, reply("x"))
        .await
        .expect("success");
    assert_eq!(
        (en.outcome, en.body.as_ref()),
        (CacheOutcome::Hit, &b"hello"[..])
    );
    assert_eq!(
        (fr.outcome, fr.body.as_ref()),
        (CacheOutcome::Hit, &b"bonjour"[..])
    );

    let none = upstream
        .call(&cache, &key, &HeaderMap::new(), &p, reply("?"))
        .await;
    assert_eq!(outcome(&none), Some(CacheOutcome::Miss));
    assert_eq!(upstream.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn stale_entry_is_served_when_the_upstream_fails() {
    let cache = ResponseCache::new(&CacheConfig::default());
    let upstream = Upstream::default();
    let p = RouteCachePolicy {
        ttl: Dur::from_secs(5),
        stale_if_error: Dur::from_secs(60),
    };
    get(&cache, &upstream, &p, ok("last good"))
        .await
        .expect("success");

    advance(Duration::from_secs(10)).await;
    let stale = get(&cache, &upstream, &p, Err(Unavailable))
        .await
        .expect("stale");
    assert_eq!(
        (stale.outcome, stale.body.as_ref(), stale.age),
        (
            CacheOutcome::Stale,
            &b"last good"[..],
            Some(Duration::from_secs(10))
        )
    );
    let mut headers = HeaderMap::new();
    apply_headers(stale.outcome, stale.age, &mut headers);
    assert_eq!(
        (&headers["x-cache"], &headers["age"]),
        (
            &"STALE".parse::<HeaderValue>().expect("value"),
            &"10".parse::<HeaderValue>().expect("value")
        )
    );

    // A 5xx answer counts as a failure too; the 503 itself is not what the client sees.
    let stale = get(&cache, &upstream, &p, Ok(fetched(503, "down", &[])))
        .await
        .expect("stale");
    assert_eq!(
        (stale.outcome, stale.status),
        (CacheOutcome::Stale, StatusCode::OK)
    );

    // Past ttl + stale_if_error the entry is gone and the failure reaches the client.
    advance(Duration::from_secs(56)).await;
    assert_eq!(
        get(&cache, &upstream, &p, Err(Unavailable)).await.err(),
        Some(Unavailable)
    );
    let passed = get(&cache, &upstream, &p, Ok(fetched(503, "down", &[])))
        .await
        .expect("5xx is a response");
    assert_eq!(
        (passed.outcome, passed.status),
        (CacheOutcome::Miss, StatusCode::SERVICE_UNAVAILABLE)
    );
}

#[tokio::test(start_paused = true)]
async fn waiters_get_the_stale_entry_during_an_outage() {
    let cache = ResponseCache::new(&CacheConfig::default());
    let upstream = Arc::new(Upstream::default());
    get(&cache, &upstream, &policy(60), ok("cached"))
        .await
        .expect("success");
    advance(Duration::from_secs(61)).await;
    let results = concurrent_gets(&cache, &upstream, 20, || Err(Unavailable)).await;
    assert_eq!(upstream.calls(), 2);
    assert!(results
        .iter()
        .all(|r| outcome(r) == Some(CacheOutcome::Stale)));
}

#[tokio::test(start_paused = true)]
async fn must_revalidate_forbids_stale() {
    let cache = ResponseCache::new(&CacheConfig::default());
    let upstream = Upstream::default();
    let p = policy(5);
    let strict = Ok(fetched(200, "x", &[("cache-control", "must-revalidate")]));
    get(&cache, &upstream, &p, strict).await.expect("success");
    advance(Duration::from_secs(6)).await;
    assert_eq!(
        get(&cache, &upstream, &p, Err(Unavailable)).await.err(),
        Some(Unavailable)
    );
}

#[tokio::test(start_paused = true)]
async fn bodies_over_max_entry_bytes_are_not_stored() {
    let cfg = CacheConfig {
        max_bytes: ByteSize(1 << 20),
        max_entry_bytes: ByteSize(4),
    };
    let cache = ResponseCache::new(&cfg);
    let upstream = Upstream::default();
    let p = policy(60);
    for _ in 0..2 {
        let hit = get(&cache, &upstream, &p, ok("12345"))
            .await
            .expect("success");
        assert_eq!(
            (hit.outcome, hit.body.as_ref()),
            (CacheOutcome::Miss, &b"12345"[..])
        );
    }
    get(&cache, &upstream, &p, ok("1234"))
        .await
        .expect("success");
    let hit = get(&cache, &upstream, &p, ok("1234"))
        .await
        .expect("success");
    assert_eq!(hit.outcome, CacheOutcome::Hit);
}

#[tokio::test(start_paused = true)]
async fn total_size_stays_within_max_bytes() {
    let cap = 64 << 10;
    let cfg = CacheConfig {
        max_bytes: ByteSize(cap),
        max_entry_bytes: ByteSize(4 << 10),
    };
    let cache = ResponseCache::new(&cfg);
    let body = Bytes::from(vec![b'x'; 1 << 10]);
    for i in 0..500 {
        let path = format!("/option/chain/P{i}");
        let key = ResponseCache::key("storage", &path, None);
        let reply = Fetched::buffered(StatusCode::OK, HeaderMap::new(), body.clone());
        cache
            .get_or_fetch(key, &HeaderMap::new(), &policy(60), || async {
                Ok::<_, Unavailable>(reply)
            })
            .await
            .expect("success");
    }
    cache.run_pending_tasks().await;
    let stats = cache.stats();
    assert!(stats.bytes <= cap, "{stats:?}");
    assert!(stats.entries > 0 && stats.entries < 500, "{stats:?}");
}

#[tokio::test(start_paused = true)]
async fn head_is_answered_from_the_get_entry() {
    let cache = ResponseCache::new(&CacheConfig::default());
    let upstream = Upstream::default();
    let p = policy(60);
    let with_length = || Ok(fetched(200, "body", &[("content-length", "4")]));
    let head = products().for_method(&Method::HEAD);
    let none = HeaderMap::new();

    upstream
        .call(&cache, &products(), &none, &p, with_length())
        .await
        .expect("success");
    let hit = upstream
        .call(&cache, &head, &none, &p, with_length())
        .await
        .expect("success");
    assert_eq!((hit.outcome, hit.body.len()), (CacheOutcome::Hit, 0));
    assert_eq!(hit.headers["content-length"], "4");

    // A HEAD that misses fetches the GET response (the documented contract), stores it for
    // GETs and still answers itself without a body.
    let cache = ResponseCache::new(&CacheConfig::default());
    let miss = upstream
        .call(&cache, &head, &none, &p, with_length())
        .await
        .expect("success");
    assert_eq!((miss.outcome, miss.body.len()), (CacheOutcome::Miss, 0));
    let get = upstream
        .call(&cache, &products(), &none, &p, with_length())
        .await
        .expect("success");
    assert_eq!(
        (get.outcome, get.body.as_ref()),
        (CacheOutcome::Hit, &b"body"[..])
    );
}

#[tokio::test(start_paused = true)]
async fn a_body_shorter_than_its_content_length_is_not_stored() {
    let cache = ResponseCache::new(&CacheConfig::default());
    let upstream = Upstream::default();
    let p = policy(60);
    // What a real HEAD upstream call returns: the GET's length, no body.
    let head_reply = || Ok(fetched(200, "", &[("content-length", "4")]));
    get(&cache, &upstream, &p, head_reply())
        .await
        .expect("success");
    let again = get(&cache, &upstream, &p, ok("body"))
        .await
        .expect("success");
    assert_eq!(
        (again.outcome, again.body.as_ref()),
        (CacheOutcome::Miss, &b"body"[..])
    );
}

#[tokio::test(start_paused = true)]
async fn credentialed_requests_bypass_the_cache() {
    let cache = ResponseCache::new(&CacheConfig::default());
    let upstream = Upstream::default();
    let p = policy(60);
    let key = products();
    let authorized = request(&[("authorization", "Bearer secret")]);
    let hit = upstream
        .call(&cache, &key, &authorized, &p, ok("mine"))
        .await
        .expect("success");
    assert_eq!(hit.outcome, CacheOutcome::Bypass);
    // Nothing was stored from it.
    let hit = get(&cache, &upstream, &p, ok("public"))
        .await
        .expect("success");
    assert_eq!(
        (hit.outcome, hit.body.as_ref()),
        (CacheOutcome::Miss, &b"public"[..])
    );
    // And nothing stored is served to it.
    let hit = upstream
        .call(&cache, &key, &authorized, &p, ok("mine"))
        .await
        .expect("success");
    assert_eq!(
        (hit.outcome, hit.body.as_ref()),
        (CacheOutcome::Bypass, &b"mine"[..])
    );
}

#[tokio::test(start_paused = true)]
async fn purge_all_by_route_and_by_prefix() {
    let cache = ResponseCache::new(&CacheConfig::default());
    let upstream = Upstream::default();
    let p = policy(60);
    let none = HeaderMap::new();
    let pcr = ResponseCache::key("analytics", "/pcr/NIFTY", Some("expiry=2025-01-30"))
        .with_route("/api/analytics/pcr/{product}");
    let chain = ResponseCache::key("storage", "/option/chain/NIFTY", None)
        .with_route("/api/data/chain/{product}");
    let keys = [products(), pcr.clone(), chain.clone()];
    let outcomes = |cache: ResponseCache| {
        let upstream = &upstream;
        let keys = keys.clone();
        let none = none.clone();
        async move {
            let mut seen = Vec::new();
            for key in &keys {
                let hit = upstream.call(&cache, key, &none, &p, ok("x")).await;
                seen.push(outcome(&hit).expect("success"));
            }
            seen
        }
    };
    use CacheOutcome::{Hit, Miss};
    assert_eq!(outcomes(cache.clone()).await, [Miss, Miss, Miss]);
    assert_eq!(outcomes(cache.clone()).await, [Hit, Hit, Hit]);

    cache.purge_route("/api/analytics/pcr/{product}").await;
    assert_eq!(outcomes(cache.clone()).await, [Hit, Miss, Hit]);

    cache.purge_prefix("storage", "/option/").await;
    assert_eq!(outcomes(cache.clone()).await, [Hit, Hit, Miss]);

    cache.purge().await;
    assert_eq!(cache.stats().entries, 0);
    assert_eq!(outcomes(cache.clone()).await, [Miss, Miss, Miss]);
}

#[test]
fn outcome_names_and_headers() {
    let names: Vec<&str> = [
        CacheOutcome::Hit,
        CacheOutcome::Miss,
        CacheOutcome::Stale,
        CacheOutcome::Bypass,
    ]
    .iter()
    .map(CacheOutcome::as_str)
    .collect();
    assert_eq!(names, ["HIT", "MISS", "STALE", "BYPASS"]);

    let mut headers = HeaderMap::new();
    apply_headers(
        CacheOutcome::Miss,
        Some(Duration::from_secs(3)),
        &mut headers,
    );
    assert_eq!(headers["x-cache"], "MISS");
    assert!(
        !headers.contains_key("age"),
        "a fetched response has no cache age"
    );
    apply_headers(
        CacheOutcome::Hit,
        Some(Duration::from_millis(1999)),
        &mut headers,
    );
    assert_eq!(
        (&headers["x-cache"], &headers["age"]),
        (&HeaderValue::from_static("HIT"), &HeaderValue::from(1u64))
    );
}

#[tokio::test(start_paused = true)]
async fn a_waiter_wanting_another_variant_fetches_its_own() {
    let cache = ResponseCache::new(&CacheConfig::default());
    let upstream = Arc::new(Upstream::default());
    let spawn = |language: &'static str, body: &'static str| {
        let (cache, upstream) = (cache.clone(), upstream.clone());
        tokio::spawn(async move {
            let req = request(&[("accept-language", language)]);
            cache
                .get_or_fetch(products(), &req, &policy(60), || async {
                    upstream.calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok::<_, Unavailable>(fetched(200, body, &[("vary", "accept-language")]))
                })
                .await
        })
    };
    let english = spawn("en", "hello");
    let french = spawn("fr", "bonjour");
    let english = english.await.expect("completes").expect("success");
    let french = french.await.expect("completes").expect("success");
    assert_eq!(english.body, "hello");
    assert_eq!(french.body, "bonjour");
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_streamed_answer_is_passed_through_never_stored_nor_shared() {
    use http_body_util::BodyExt;
    let cache = ResponseCache::new(&CacheConfig::default());
    let upstream = Upstream::default();
    let streamed = || {
        let body = http_body_util::Full::new(Bytes::from_static(b"large"))
            .map_err(|never| match never {})
            .boxed();
        let mut fetched = fetched(200, "", &[("cache-control", "max-age=60")]);
        fetched.streamed = Some(body);
        Ok::<_, Unavailable>(fetched)
    };
    for _ in 0..2 {
        let hit = get(&cache, &upstream, &policy(60), streamed())
            .await
            .expect("answer");
        assert_eq!(hit.outcome, CacheOutcome::Miss);
        let body = hit.streamed.expect("streamed through");
        assert_eq!(body.collect().await.unwrap().to_bytes(), "large");
    }
    assert_eq!(upstream.calls(), 2, "a streamed answer was stored");
    cache.run_pending_tasks().await;
    assert_eq!(cache.stats().entries, 0);
}
