//! Micro-benchmarks of the per-request decisions: route matching, the in-process rate-limit
//! decision, cache-key construction, the access line and the headers a request forwards.
//! `cargo bench --bench hot_path`.

use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use deltastream_gateway::client::ClientKey;
use deltastream_gateway::config::Config;
use deltastream_gateway::observability::access::AccessLine;
use deltastream_gateway::ratelimit::{RateLimiter, Subject};
use deltastream_gateway::routes::table::RouteTable;
use deltastream_gateway::upstream::cache::ResponseCache;
use http::{HeaderMap, Method};

fn route_matching(c: &mut Criterion) {
    let cfg = Config::embedded();
    let names: Vec<String> = cfg.upstreams.keys().cloned().collect();
    let table = RouteTable::build(&cfg, |n| names.iter().position(|x| x == n), |_| None)
        .expect("the embedded route table builds");
    let mut g = c.benchmark_group("route_find");
    for (name, method, path) in [
        ("literal", Method::GET, "/api/data/products"),
        ("param", Method::GET, "/api/data/underlying/NIFTY"),
        (
            "versioned_param",
            Method::GET,
            "/api/v1/analytics/pcr/BANKNIFTY",
        ),
        ("not_found", Method::GET, "/api/nothing/here"),
        ("wrong_method", Method::DELETE, "/api/data/products"),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| std::hint::black_box(table.find(&method, std::hint::black_box(path))))
        });
    }
    g.finish();
}

fn rate_limit_decisions(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // The embedded policies without redis_url: the in-process sliding window.
    let mut cfg = Config::embedded().rate_limit;
    cfg.redis_url = None;
    for p in &mut cfg.policies {
        p.limit = 1_000_000_000; // never deny: measure the allowed path
    }
    let limiter = rt.block_on(RateLimiter::new(&cfg));
    let policies = vec![limiter.policy("default").expect("default policy")];
    let headers = HeaderMap::new();
    let mut g = c.benchmark_group("ratelimit_check_local");
    g.bench_function("one_client", |b| {
        let subject = Subject {
            client: ClientKey::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 64),
            user_id: None,
            headers: &headers,
            route: "/api/data/products",
        };
        b.iter(|| rt.block_on(limiter.check(&policies, &subject)))
    });
    g.bench_function("many_clients", |b| {
        let mut n: u32 = 0;
        b.iter(|| {
            n = n.wrapping_add(1) % 10_000;
            let subject = Subject {
                client: ClientKey::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)), 64),
                user_id: None,
                headers: &headers,
                route: "/api/data/products",
            };
            rt.block_on(limiter.check(&policies, &subject))
        })
    });
    g.finish();
}

fn cache_keys(c: &mut Criterion) {
    let mut g = c.benchmark_group("cache_key");
    g.bench_function("no_query", |b| {
        b.iter(|| {
            ResponseCache::key("storage", std::hint::black_box("/products"), None)
                .with_route("/api/data/products")
                .for_method(&Method::GET)
        })
    });
    g.bench_function("query_to_normalize", |b| {
        b.iter(|| {
            ResponseCache::key(
                "storage",
                "/option/chain/NIFTY",
                std::hint::black_box(Some("expiry=2025-01-09&b=2&a=1")),
            )
            .with_route("/api/data/chain/{product}")
            .for_method(&Method::GET)
        })
    });
    let (route, upstream): (std::sync::Arc<str>, std::sync::Arc<str>) =
        ("/api/data/products".into(), "storage".into());
    g.bench_function("for_route", |b| {
        b.iter(|| {
            ResponseCache::key_for_route(&route, &upstream, std::hint::black_box("/products"), None)
                .for_method(&Method::GET)
        })
    });
    g.bench_function("drop", |b| {
        b.iter_batched(
            || ResponseCache::key("storage", "/products", None),
            drop,
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn access_lines(c: &mut Criterion) {
    let line = AccessLine {
        method: "GET",
        path: "/api/data/underlying/NIFTY",
        route: "/api/data/underlying/{product}",
        status: 200,
        latency_ms: 0.412_345,
        bytes: 1_234,
        upstream: "storage",
        reason: "",
        remote: Some("127.0.0.1:52144".parse().unwrap()),
        request_id: "4f3c2b1a09f8e7d6c5b4a3928170f6e5",
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736",
    };
    let mut out = Vec::with_capacity(512);
    c.bench_function("access_line/render", |b| {
        b.iter(|| {
            out.clear();
            std::hint::black_box(&line).render(std::time::SystemTime::now(), &mut out);
            out.len()
        })
    });
}

/// The request headers of a typical browser or SDK call, made fit to forward (every name
/// matched against the identity, gateway-set, framing and strip lists).
fn forwarded_headers(c: &mut Criterion) {
    use deltastream_gateway::routes::headers::{
        check_request_head, upstream_headers, ForwardedFor, HeaderPolicy,
    };
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("host", "api.example.com"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/120.0",
        ),
        ("accept", "application/json"),
        ("accept-language", "en-GB,en;q=0.5"),
        ("accept-encoding", "gzip, deflate, br"),
        ("referer", "https://app.example.com/dashboard"),
        ("origin", "https://app.example.com"),
        ("connection", "keep-alive"),
        ("sec-fetch-mode", "cors"),
        ("x-request-id", "4bf92f3577b34da6a3ce929d0e0e4736"),
    ] {
        headers.insert(
            http::HeaderName::from_static(name),
            http::HeaderValue::from_static(value),
        );
    }
    let policy = HeaderPolicy::default();
    let rid = http::HeaderValue::from_static("rid");
    let peer = ForwardedFor::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)));
    c.bench_function("forwarded_headers/typical", |b| {
        b.iter_batched(
            || headers.clone(),
            |h| {
                let checked = check_request_head(http::Version::HTTP_11, &h).is_ok();
                (
                    checked,
                    upstream_headers(h, &peer, false, false, &rid, &policy),
                )
            },
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(
    benches,
    route_matching,
    rate_limit_decisions,
    cache_keys,
    access_lines,
    forwarded_headers
);
criterion_main!(benches);
