//! What clients get on the wire: cache directives on every response, conditional requests
//! answered from the cache, and response compression negotiated from `Accept-Encoding`.
//! Real gateway, real HTTP, fake upstreams in-process.

use crate::support;

use deltastream_gateway::config::Config;
use std::time::Duration;

use support::gateway::{client, config_with_upstreams, scrape, spawn};
use support::{refused_addr, FakeUpstream, Step};

/// A 2 KB JSON body: above the default `min_size`, compressible like a real chain.
fn chain_json() -> String {
    let rows: Vec<String> = (0..40)
        .map(|i| {
            format!(
                "{{\"strike\":{},\"call_ltp\":{}.5,\"put_ltp\":{}.25}}",
                21000 + i * 50,
                100 + i,
                90 + i
            )
        })
        .collect();
    format!("{{\"product\":\"NIFTY\",\"chain\":[{}]}}", rows.join(","))
}

/// Every upstream at `url`.
fn cfg_all(url: &str) -> Config {
    let url = url.to_string();
    config_with_upstreams(move |_| url.clone())
}

async fn get(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = client().get(format!("http://{addr}{path}"));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.send().await.expect("request")
}

/// Whether any `Vary` value names `Accept-Encoding` (CORS adds its own `Vary` line).
fn varies_on_encoding(resp: &reqwest::Response) -> bool {
    resp.headers()
        .get_all("vary")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().eq_ignore_ascii_case("accept-encoding"))
}

/// The same answer `n` times (a fake upstream answers `{"status":200}` once its steps run out).
fn repeated(step: Step, n: usize) -> Vec<Step> {
    vec![step; n]
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn gateway_made_responses_say_no_store() {
    let up = FakeUpstream::ok().await;
    let gw = spawn(cfg_all(&up.url())).await;
    for path in ["/health", "/api/v1/health", "/nowhere", "/api/user/me"] {
        let resp = get(gw.addr, path, &[]).await;
        assert_eq!(header(&resp, "cache-control"), Some("no-store"), "{path}");
    }
    // The docs change only with a reload: revalidated each time, never guessed.
    let docs = get(gw.addr, "/api/docs", &[]).await;
    assert_eq!(header(&docs, "cache-control"), Some("no-cache"));
    let etag = header(&docs, "etag")
        .expect("the docs have a validator")
        .to_string();
    let again = get(gw.addr, "/api/docs", &[("if-none-match", &etag)]).await;
    assert_eq!(again.status(), 304);
    assert_eq!(header(&again, "etag"), Some(etag.as_str()));
    // A 503 for an upstream that is down must never be kept by a cache in front.
    let mut cfg = cfg_all(&up.url());
    let dead = format!("http://{}", refused_addr().await);
    cfg.upstreams.get_mut("storage").unwrap().url = dead;
    let down = spawn(cfg).await;
    let resp = get(down.addr, "/api/data/underlying/NIFTY", &[]).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(header(&resp, "cache-control"), Some("no-store"));
    // The admin listener's answers too.
    let ready = get(gw.admin_addr, "/ready", &[]).await;
    assert_eq!(header(&ready, "cache-control"), Some("no-store"));
}

#[tokio::test]
async fn uncached_routes_get_the_route_default_only_when_the_upstream_says_nothing() {
    let up = FakeUpstream::builder()
        .steps([
            Step::body(200, "application/json", "{\"ticks\":[]}"),
            Step::body(200, "application/json", "{\"ticks\":[]}")
                .with_header("cache-control", "max-age=1"),
        ])
        .start()
        .await;
    let gw = spawn(cfg_all(&up.url())).await;
    let live = get(gw.addr, "/api/data/underlying/NIFTY", &[]).await;
    assert_eq!(header(&live, "cache-control"), Some("no-store"));
    let own = get(gw.addr, "/api/data/underlying/NIFTY", &[]).await;
    assert_eq!(header(&own, "cache-control"), Some("max-age=1"));
}

#[tokio::test]
async fn cached_routes_say_max_age_with_the_remaining_freshness() {
    let up = FakeUpstream::builder()
        .steps([Step::body(200, "application/json", chain_json())])
        .start()
        .await;
    let gw = spawn(cfg_all(&up.url())).await;
    // The embedded table caches /api/data/products for 60 s.
    let miss = get(gw.addr, "/api/data/products", &[]).await;
    assert_eq!(header(&miss, "x-cache"), Some("MISS"));
    assert_eq!(header(&miss, "cache-control"), Some("max-age=60"));
    let hit = get(gw.addr, "/api/data/products", &[]).await;
    assert_eq!(header(&hit, "x-cache"), Some("HIT"));
    let cc = header(&hit, "cache-control").unwrap();
    let max_age: u64 = cc.strip_prefix("max-age=").unwrap().parse().unwrap();
    let age: u64 = header(&hit, "age").unwrap().parse().unwrap();
    // max-age counts from Age: what is left is at most the 60 s the entry had.
    assert!(max_age - age <= 60 && max_age - age >= 58, "{cc} age {age}");
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn an_upstream_cache_control_is_kept_on_cached_routes() {
    let up = FakeUpstream::builder()
        .steps([Step::body(200, "application/json", chain_json())
            .with_header("cache-control", "private")])
        .start()
        .await;
    let gw = spawn(cfg_all(&up.url())).await;
    let resp = get(gw.addr, "/api/data/products", &[]).await;
    assert_eq!(header(&resp, "cache-control"), Some("private"));
}

#[tokio::test]
async fn if_none_match_gets_a_304_from_the_cache_without_an_upstream_call() {
    let up = FakeUpstream::builder()
        .steps([Step::body(200, "application/json", chain_json())])
        .start()
        .await;
    let gw = spawn(cfg_all(&up.url())).await;
    // The only test on this route: the counter is process-wide.
    let first = get(gw.addr, "/api/analytics/pcr/NIFTY", &[]).await;
    let etag = header(&first, "etag")
        .expect("a stored response has an ETag")
        .to_string();
    assert!(etag.starts_with('"'), "strong: {etag}");
    // The client's validator is never what fills the entry: the upstream saw none.
    for inm in [
        etag.clone(),
        format!("W/{etag}"),
        format!("\"other\", {etag}"),
    ] {
        let again = get(
            gw.addr,
            "/api/analytics/pcr/NIFTY",
            &[("if-none-match", &inm)],
        )
        .await;
        assert_eq!(again.status(), 304, "{inm}");
        assert_eq!(header(&again, "etag"), Some(etag.as_str()));
        assert!(header(&again, "cache-control")
            .unwrap()
            .starts_with("max-age="));
        assert_eq!(header(&again, "x-cache"), Some("HIT"));
        assert!(again.bytes().await.unwrap().is_empty());
    }
    let changed = get(
        gw.addr,
        "/api/analytics/pcr/NIFTY",
        &[("if-none-match", "\"stale\"")],
    )
    .await;
    assert_eq!(changed.status(), 200);
    assert_eq!(changed.text().await.unwrap(), chain_json());
    assert_eq!(up.hits(), 1, "304s and the 200 came from the cache");
    let metrics = scrape(gw.admin_addr).await;
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("gateway_not_modified_total{")
                && l.contains("/api/analytics/pcr/{product}")
        })
        .unwrap_or_else(|| panic!("no 304 counter:\n{metrics}"));
    assert!(line.ends_with(" 3"), "{line}");
}

#[tokio::test]
async fn a_first_request_with_validators_fetches_and_may_get_a_304_from_what_it_fetched() {
    let up = FakeUpstream::builder()
        .steps([Step::body(200, "application/json", chain_json())
            .with_header("etag", "\"v1\"")
            .with_header("last-modified", "Sun, 06 Dec 2026 10:00:00 GMT")])
        .start()
        .await;
    let gw = spawn(cfg_all(&up.url())).await;
    let resp = get(
        gw.addr,
        "/api/data/products",
        &[("if-none-match", "\"v1\"")],
    )
    .await;
    assert_eq!(resp.status(), 304);
    assert_eq!(header(&resp, "x-cache"), Some("MISS"));
    let seen = up.last_request().unwrap();
    assert!(
        !seen.headers.contains_key("if-none-match"),
        "validators stay at the gateway"
    );
    // The upstream's own validators are kept, and If-Modified-Since is answered from them.
    let ims = get(
        gw.addr,
        "/api/data/products",
        &[("if-modified-since", "Sun, 06 Dec 2026 10:00:00 GMT")],
    )
    .await;
    assert_eq!(ims.status(), 304);
    assert_eq!(
        header(&ims, "last-modified"),
        Some("Sun, 06 Dec 2026 10:00:00 GMT")
    );
    let older = get(
        gw.addr,
        "/api/data/products",
        &[("if-modified-since", "Sun, 06 Dec 2026 09:00:00 GMT")],
    )
    .await;
    assert_eq!(older.status(), 200);
    assert_eq!(header(&older, "etag"), Some("\"v1\""));
    assert_eq!(up.hits(), 1);
}

/// Decodes `coding` with the same codecs the gateway uses, fed piece by piece as a client
/// would: the decoded text so far after each piece.
struct Decoder(DecoderInner);

enum DecoderInner {
    Gzip(async_compression::tokio::write::GzipDecoder<Vec<u8>>),
    Br(async_compression::tokio::write::BrotliDecoder<Vec<u8>>),
    Zstd(async_compression::tokio::write::ZstdDecoder<Vec<u8>>),
}

impl Decoder {
    fn new(coding: &str) -> Decoder {
        use async_compression::tokio::write as w;
        Decoder(match coding {
            "gzip" => DecoderInner::Gzip(w::GzipDecoder::new(Vec::new())),
            "br" => DecoderInner::Br(w::BrotliDecoder::new(Vec::new())),
            "zstd" => DecoderInner::Zstd(w::ZstdDecoder::new(Vec::new())),
            other => panic!("unexpected coding {other}"),
        })
    }

    async fn feed(&mut self, piece: &[u8]) -> String {
        async fn push<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, piece: &[u8]) {
            use tokio::io::AsyncWriteExt;
            w.write_all(piece).await.unwrap();
            w.flush().await.unwrap();
        }
        let decoded = match &mut self.0 {
            DecoderInner::Gzip(d) => {
                push(d, piece).await;
                d.get_ref()
            }
            DecoderInner::Br(d) => {
                push(d, piece).await;
                d.get_ref()
            }
            DecoderInner::Zstd(d) => {
                push(d, piece).await;
                d.get_ref()
            }
        };
        String::from_utf8(decoded.clone()).unwrap()
    }
}

async fn decode(coding: &str, body: &[u8]) -> String {
    Decoder::new(coding).feed(body).await
}

#[tokio::test]
async fn each_coding_is_negotiated_and_decodes_to_the_identity_body() {
    let body = chain_json();
    let up = FakeUpstream::builder()
        .steps(repeated(
            Step::body(200, "application/json", body.clone()),
            8,
        ))
        .start()
        .await;
    let gw = spawn(cfg_all(&up.url())).await;
    let path = "/api/data/underlying/NIFTY";
    for (accept, coding) in [
        ("gzip", "gzip"),
        ("br", "br"),
        ("zstd", "zstd"),
        ("gzip;q=0.2, br;q=0.8", "br"),
        ("deflate, zstd", "zstd"),
    ] {
        let resp = get(gw.addr, path, &[("accept-encoding", accept)]).await;
        assert_eq!(header(&resp, "content-encoding"), Some(coding), "{accept}");
        assert!(varies_on_encoding(&resp));
        assert_eq!(header(&resp, "content-length"), None);
        let wire = resp.bytes().await.unwrap();
        assert!(
            wire.len() * 4 <= body.len(),
            "{coding}: {} of {}",
            wire.len(),
            body.len()
        );
        assert_eq!(decode(coding, &wire).await, body, "{accept}");
    }
    // Nothing acceptable, no header, identity preferred: the body as the upstream sent it,
    // still marked as varying.
    for accept in [Some("compress, lz4"), None, Some("gzip;q=0.1, identity")] {
        let headers: Vec<(&str, &str)> =
            accept.map(|a| ("accept-encoding", a)).into_iter().collect();
        let resp = get(gw.addr, path, &headers).await;
        assert_eq!(header(&resp, "content-encoding"), None, "{accept:?}");
        assert!(varies_on_encoding(&resp));
        assert_eq!(resp.text().await.unwrap(), body);
    }
}

#[tokio::test]
async fn small_encoded_no_transform_and_other_types_pass_untouched() {
    let big = chain_json();
    let up = FakeUpstream::builder()
        .steps([
            // Under min_size (1 KB).
            Step::body(200, "application/json", "{\"ticks\":[]}"),
            // Already compressed by the upstream: never twice.
            Step::body(200, "application/json", big.clone()).with_header("content-encoding", "br"),
            Step::body(200, "application/json", big.clone())
                .with_header("cache-control", "no-transform"),
            Step::body(200, "image/png", big.clone()),
            // Identity refused: compressed however small.
            Step::body(200, "application/json", "{\"ticks\":[]}"),
        ])
        .start()
        .await;
    let gw = spawn(cfg_all(&up.url())).await;
    let path = "/api/data/underlying/NIFTY";
    let small = get(gw.addr, path, &[("accept-encoding", "gzip")]).await;
    assert_eq!(header(&small, "content-encoding"), None);
    assert_eq!(small.text().await.unwrap(), "{\"ticks\":[]}");
    let encoded = get(gw.addr, path, &[("accept-encoding", "gzip")]).await;
    assert_eq!(header(&encoded, "content-encoding"), Some("br"));
    assert_eq!(
        encoded.text().await.unwrap(),
        big,
        "passed through byte for byte"
    );
    let kept = get(gw.addr, path, &[("accept-encoding", "gzip")]).await;
    assert_eq!(header(&kept, "content-encoding"), None);
    assert!(!varies_on_encoding(&kept));
    assert_eq!(kept.text().await.unwrap(), big);
    let image = get(gw.addr, path, &[("accept-encoding", "gzip")]).await;
    assert_eq!(header(&image, "content-encoding"), None);
    assert!(!varies_on_encoding(&image));
    let refused = get(gw.addr, path, &[("accept-encoding", "gzip, identity;q=0")]).await;
    assert_eq!(header(&refused, "content-encoding"), Some("gzip"));
    let wire = refused.bytes().await.unwrap();
    assert_eq!(decode("gzip", &wire).await, "{\"ticks\":[]}");
}

#[tokio::test]
async fn compression_is_configurable_globally_and_per_route() {
    let up = FakeUpstream::builder()
        .steps(repeated(
            Step::body(200, "application/json", chain_json()),
            3,
        ))
        .start()
        .await;
    let mut cfg = cfg_all(&up.url());
    cfg.compression.enabled = false;
    cfg.compression.codings = vec!["zstd".into()];
    let chain = cfg
        .routes
        .iter_mut()
        .find(|r| r.path == "/api/data/chain/{product}")
        .unwrap();
    chain.compression = Some(true);
    let gw = spawn(cfg).await;
    let off = get(
        gw.addr,
        "/api/data/underlying/NIFTY",
        &[("accept-encoding", "gzip, zstd")],
    )
    .await;
    assert_eq!(header(&off, "content-encoding"), None);
    let on = get(
        gw.addr,
        "/api/data/chain/NIFTY",
        &[("accept-encoding", "gzip, zstd")],
    )
    .await;
    assert_eq!(header(&on, "content-encoding"), Some("zstd"));
    let gzip_only = get(
        gw.addr,
        "/api/data/chain/NIFTY",
        &[("accept-encoding", "gzip")],
    )
    .await;
    assert_eq!(
        header(&gzip_only, "content-encoding"),
        None,
        "gzip is not offered"
    );
}

#[tokio::test]
async fn the_cache_stores_identity_and_each_answer_gets_its_coding() {
    let body = chain_json();
    let up = FakeUpstream::builder()
        .steps([Step::body(200, "application/json", body.clone())])
        .start()
        .await;
    let gw = spawn(cfg_all(&up.url())).await;
    let path = "/api/data/products";
    let gz = get(gw.addr, path, &[("accept-encoding", "gzip")]).await;
    assert_eq!(header(&gz, "x-cache"), Some("MISS"));
    assert_eq!(header(&gz, "content-encoding"), Some("gzip"));
    let weak = header(&gz, "etag").unwrap().to_string();
    assert!(
        weak.starts_with("W/\""),
        "a compressed body is another representation: {weak}"
    );
    assert_eq!(decode("gzip", &gz.bytes().await.unwrap()).await, body);
    // The upstream never saw the client's Accept-Encoding decide the entry: one entry, every
    // coding served from it.
    let plain = get(gw.addr, path, &[]).await;
    assert_eq!(header(&plain, "x-cache"), Some("HIT"));
    let strong = header(&plain, "etag").unwrap().to_string();
    assert_eq!(weak, format!("W/{strong}"));
    assert_eq!(plain.text().await.unwrap(), body);
    let br = get(gw.addr, path, &[("accept-encoding", "br")]).await;
    assert_eq!(header(&br, "x-cache"), Some("HIT"));
    assert_eq!(header(&br, "content-encoding"), Some("br"));
    assert_eq!(decode("br", &br.bytes().await.unwrap()).await, body);
    // Revalidation works with the tag of either representation.
    for tag in [weak.as_str(), strong.as_str()] {
        let resp = get(
            gw.addr,
            path,
            &[("accept-encoding", "gzip"), ("if-none-match", tag)],
        )
        .await;
        assert_eq!(resp.status(), 304, "{tag}");
        assert_eq!(header(&resp, "content-encoding"), None);
        // The 304 says what the 200 would have: this client's tag, and Vary.
        assert_eq!(header(&resp, "etag"), Some(weak.as_str()));
        assert!(varies_on_encoding(&resp));
        let plain = get(gw.addr, path, &[("if-none-match", tag)]).await;
        assert_eq!(plain.status(), 304, "{tag}");
        assert_eq!(header(&plain, "etag"), Some(strong.as_str()));
        assert!(varies_on_encoding(&plain));
    }
    assert_eq!(up.hits(), 1);
}

/// An upstream that sends Server-Sent Events one at a time: the next only once the test says
/// the client has decoded the previous one.
async fn sse_upstream(
    events: Vec<&'static str>,
) -> (String, tokio::sync::mpsc::UnboundedSender<()>) {
    use http_body_util::StreamBody;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (next_tx, next_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let next_rx = std::sync::Arc::new(tokio::sync::Mutex::new(Some(next_rx)));
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let service = hyper::service::service_fn(move |_req| {
            let events = events.clone();
            let next_rx = next_rx.clone();
            async move {
                let mut next_rx = next_rx.lock().await.take().expect("one request");
                let (tx, rx) = tokio::sync::mpsc::channel::<
                    Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
                >(1);
                tokio::spawn(async move {
                    for (i, event) in events.iter().enumerate() {
                        if i > 0 && next_rx.recv().await.is_none() {
                            return;
                        }
                        let frame = hyper::body::Frame::data(bytes::Bytes::from(*event));
                        if tx.send(Ok(frame)).await.is_err() {
                            return;
                        }
                    }
                });
                let body = StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|item| (item, rx))
                }));
                let resp = http::Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(body)
                    .unwrap();
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
            .await;
    });
    (format!("http://{addr}"), next_tx)
}

#[tokio::test]
async fn server_sent_events_arrive_compressed_event_by_event() {
    let events = vec![
        "data: {\"tick\":1,\"price\":21500.25}\n\n",
        "data: {\"tick\":2,\"price\":21501.75}\n\n",
        "data: {\"tick\":3,\"price\":21499.50}\n\n",
    ];
    let (url, next) = sse_upstream(events.clone()).await;
    let gw = spawn(cfg_all(&url)).await;
    let mut resp = get(
        gw.addr,
        "/api/data/underlying/NIFTY",
        &[("accept-encoding", "gzip")],
    )
    .await;
    assert_eq!(header(&resp, "content-encoding"), Some("gzip"));
    let mut decoder = Decoder::new("gzip");
    let mut expected = String::new();
    for (i, event) in events.iter().enumerate() {
        expected.push_str(event);
        // The upstream holds event i+1 until this one is decoded: a gateway that waited for
        // more input (or the whole body) before compressing would never get there.
        let mut decoded = String::new();
        while decoded != expected {
            let piece = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
                .await
                .unwrap_or_else(|_| panic!("event {i} never arrived; decoded so far {decoded:?}"))
                .unwrap()
                .expect("the stream is still open");
            decoded = decoder.feed(&piece).await;
            assert!(expected.starts_with(&decoded), "{decoded:?}");
        }
        let _ = next.send(());
    }
    // The rest of the stream is the gzip trailer, then the end.
    while let Some(piece) = resp.chunk().await.unwrap() {
        assert_eq!(decoder.feed(&piece).await, expected);
    }
}

#[test]
fn invalid_wire_settings_name_their_field() {
    let mut cfg = Config::embedded();
    let chain = cfg
        .routes
        .iter()
        .position(|r| r.path == "/api/data/chain/{product}")
        .unwrap();
    let live = cfg
        .routes
        .iter()
        .position(|r| r.path == "/api/data/underlying/{product}")
        .unwrap();
    let ws = cfg.routes.iter().position(|r| r.path == "/ws").unwrap();
    cfg.routes[chain].cache_control = Some("no-store".into());
    cfg.routes[live].cache_control = Some("no-store\n".into());
    cfg.routes[ws].cache_control = Some("no-store".into());
    cfg.compression.codings = vec!["gzip".into(), "lzma".into()];
    let shown = cfg.validate().unwrap_err().to_string();
    for field in [
        format!("routes[{chain}].cache_control: a cached route sends"),
        format!("routes[{live}].cache_control: \"no-store\\n\" is not a header value"),
        format!("routes[{ws}].cache_control: only proxy routes"),
        "compression.codings[1]: unknown coding \"lzma\"".to_string(),
    ] {
        assert!(shown.contains(&field), "{field} in:\n{shown}");
    }
    // The embedded table says no-store for live data, nothing for cached routes.
    let embedded = Config::embedded();
    let by_path = |p: &str| embedded.routes.iter().find(|r| r.path == p).unwrap();
    assert_eq!(
        by_path("/api/data/underlying/{product}")
            .cache_control
            .as_deref(),
        Some("no-store")
    );
    assert_eq!(by_path("/api/data/chain/{product}").cache_control, None);
}
