//! Validators and conditional requests (RFC 9110 §8.8, §13): the `ETag` a stored response
//! carries, and whether a client's `If-None-Match` / `If-Modified-Since` lets the gateway
//! answer `304 Not Modified` instead of sending the body again.

use bytes::Bytes;
use http::header::{
    CACHE_CONTROL, CONTENT_LOCATION, DATE, ETAG, EXPIRES, IF_MODIFIED_SINCE, IF_NONE_MATCH,
    LAST_MODIFIED, VARY,
};
use http::{HeaderMap, HeaderValue};
use sha2::{Digest, Sha256};

/// Gives `headers` a strong `ETag` from `body` unless the upstream sent one. 128 bits of
/// SHA-256: a collision would hand a poller a stale body, so no short or weak hash.
pub(super) fn add_etag(headers: &mut HeaderMap, body: &Bytes) {
    if !headers.contains_key(ETAG) {
        headers.insert(ETAG, strong_etag(body));
    }
}

/// `"<32 hex digits>"`: the first 128 bits of the body's SHA-256.
pub fn strong_etag(body: &[u8]) -> HeaderValue {
    let digest = Sha256::digest(body);
    let tag = format!("\"{}\"", hex::encode(&digest[..16]));
    HeaderValue::from_str(&tag).unwrap_or(HeaderValue::from_static("\"\""))
}

/// The opaque part of an entity tag, without `W/` (If-None-Match compares weakly, §13.1.2).
fn opaque(tag: &str) -> &str {
    let tag = tag.trim();
    tag.strip_prefix("W/").unwrap_or(tag)
}

/// Whether the request's validators match the response's (`headers`), so a 304 may be sent
/// instead. `If-None-Match` wins over `If-Modified-Since` when both are present (§13.2.2);
/// a date that does not parse is ignored, as the RFC asks.
pub fn not_modified(request: &HeaderMap, headers: &HeaderMap) -> bool {
    let inm: Vec<&str> = request
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if !inm.is_empty() {
        let Some(etag) = headers.get(ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let ours = opaque(etag);
        return inm
            .iter()
            .flat_map(|v| v.split(','))
            .any(|tag| tag.trim() == "*" || opaque(tag) == ours);
    }
    let since = request
        .get(IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    let modified = headers
        .get(LAST_MODIFIED)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    matches!((since, modified), (Some(since), Some(modified)) if modified <= since)
}

/// The headers a 304 keeps (§15.4.5): those a 200 would carry that let a cache update its
/// stored response; the representation's own (`Content-Type`, `Content-Length`) are dropped.
pub fn not_modified_headers(headers: &HeaderMap) -> HeaderMap {
    let mut kept = HeaderMap::with_capacity(8);
    for name in [
        CACHE_CONTROL,
        CONTENT_LOCATION,
        DATE,
        ETAG,
        EXPIRES,
        LAST_MODIFIED,
        VARY,
    ] {
        for value in headers.get_all(&name) {
            kept.append(name.clone(), value.clone());
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_static(value));
        }
        h
    }

    #[test]
    fn the_computed_etag_is_strong_stable_and_follows_the_body() {
        let mut a = HeaderMap::new();
        add_etag(&mut a, &Bytes::from_static(b"{\"x\":1}"));
        let mut b = HeaderMap::new();
        add_etag(&mut b, &Bytes::from_static(b"{\"x\":1}"));
        let mut c = HeaderMap::new();
        add_etag(&mut c, &Bytes::from_static(b"{\"x\":2}"));
        let tag = a[ETAG].to_str().unwrap();
        assert!(
            tag.starts_with('"') && tag.ends_with('"') && tag.len() == 34,
            "{tag}"
        );
        assert_eq!(a[ETAG], b[ETAG]);
        assert_ne!(a[ETAG], c[ETAG]);
        // The upstream's own tag is kept.
        let mut own = map(&[("etag", "\"v7\"")]);
        add_etag(&mut own, &Bytes::from_static(b"x"));
        assert_eq!(own[ETAG], "\"v7\"");
    }

    #[test]
    fn if_none_match_compares_weakly_and_lists_and_star_match() {
        let resp = map(&[("etag", "\"abc\"")]);
        for inm in ["\"abc\"", "W/\"abc\"", "\"x\", \"abc\"", "*"] {
            assert!(
                not_modified(&map(&[("if-none-match", inm)]), &resp),
                "{inm}"
            );
        }
        for inm in ["\"abcd\"", "\"ab\"", "abc"] {
            assert!(
                !not_modified(&map(&[("if-none-match", inm)]), &resp),
                "{inm}"
            );
        }
        // No ETag on the response: nothing to match.
        assert!(!not_modified(
            &map(&[("if-none-match", "*")]),
            &HeaderMap::new()
        ));
    }

    #[test]
    fn if_modified_since_needs_last_modified_and_yields_to_if_none_match() {
        let resp = map(&[
            ("etag", "\"abc\""),
            ("last-modified", "Sun, 06 Dec 2026 10:00:00 GMT"),
        ]);
        let later = ("if-modified-since", "Sun, 06 Dec 2026 11:00:00 GMT");
        let earlier = ("if-modified-since", "Sun, 06 Dec 2026 09:00:00 GMT");
        assert!(not_modified(&map(&[later]), &resp));
        assert!(!not_modified(&map(&[earlier]), &resp));
        assert!(!not_modified(
            &map(&[("if-modified-since", "yesterday")]),
            &resp
        ));
        // A failing If-None-Match decides, whatever the date says.
        assert!(!not_modified(
            &map(&[("if-none-match", "\"old\""), later]),
            &resp
        ));
        assert!(!not_modified(&map(&[later]), &map(&[("etag", "\"abc\"")])));
    }

    #[test]
    fn a_304_keeps_the_cache_headers_and_drops_the_representation() {
        let resp = map(&[
            ("etag", "\"abc\""),
            ("cache-control", "public, max-age=2"),
            ("vary", "accept-encoding"),
            ("content-type", "application/json"),
            ("content-length", "7915"),
        ]);
        let kept = not_modified_headers(&resp);
        assert_eq!(kept.len(), 3);
        assert!(!kept.contains_key("content-length"));
    }
}
