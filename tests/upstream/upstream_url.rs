//! The proxy's fast upstream-URL parse (path and query relative to a pre-parsed base) must
//! give exactly the URL that parsing `base + path + ?query` in full gives.

use deltastream_gateway::routes::proxy::{parse_base, parse_upstream_url, upstream_url};

#[test]
fn relative_parse_equals_full_parse() {
    let bases = [
        "http://storage:8003",
        "http://127.0.0.1:8003/",
        "https://auth.deltastream.internal",
        "http://[::1]:9000",
    ];
    let paths = [
        "/products",
        "/",
        "/option/chain/NIFTY",
        "/underlying/BANK%20NIFTY",
        "/a/./b/../c",
        "/caf%C3%A9/x~y",
        "//evil.example/x",
        "/\\evil.example/x",
        "/a//b",
        "/a b",
        "/%2e%2e/x",
        "",
        "relative",
    ];
    let queries = [
        None,
        Some(""),
        Some("expiry=2025-01-09"),
        Some("a=1&a=2&b=%20x"),
        Some("q=a b"),
        Some("x=1#frag"),
        Some("u=%ZZ"),
    ];
    for base_url in bases {
        let trimmed = base_url.trim_end_matches('/');
        let base = parse_base(base_url);
        assert!(base.is_some(), "{base_url} should be a plain base");
        for path in paths {
            for query in queries {
                let full = reqwest::Url::parse(&upstream_url(trimmed, path, query)).ok();
                let fast = parse_upstream_url(base.as_ref(), trimmed, path, query);
                assert_eq!(
                    fast.as_ref().map(|u| u.as_str()),
                    full.as_ref().map(|u| u.as_str()),
                    "base {base_url:?} path {path:?} query {query:?}"
                );
            }
        }
    }
}

#[test]
fn a_base_with_a_prefix_takes_the_long_way() {
    assert!(parse_base("http://gw.internal/storage").is_none());
    assert!(parse_base("http://user:pw@storage:8003").is_none());
    let url = parse_upstream_url(None, "http://gw.internal/storage", "/products", Some("a=1"));
    assert_eq!(
        url.map(|u| u.to_string()).as_deref(),
        Some("http://gw.internal/storage/products?a=1")
    );
}
