//! The HTTP caching rules (RFC 9111, simplified for a shared gateway cache): which requests may
//! use the cache, which responses may be stored, and for how long.

use std::time::Duration;

use http::header::{
    AUTHORIZATION, CACHE_CONTROL, COOKIE, IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE,
    IF_UNMODIFIED_SINCE, PRAGMA, RANGE, SET_COOKIE,
};
use http::{HeaderMap, Method, StatusCode};

use super::key::Vary;
use crate::config::RouteCachePolicy;

/// Whether a request may use the cache at all.
///
/// Only GET and HEAD. Requests with `Authorization` or `Cookie` are personal: they are never
/// answered from, nor stored into, the shared cache. A request `Cache-Control: no-cache` or
/// `no-store` (or `Pragma: no-cache`) asks for an answer from the origin, so it bypasses too.
/// So does one whose answer depends on what the cache key does not hold and the gateway does
/// not evaluate: `Range` / `If-Range` (a 206) and `If-Match` / `If-Unmodified-Since` (a 412);
/// shared through a single flight, such an answer would reach clients that did not ask for
/// it. (`If-None-Match` / `If-Modified-Since` are stripped from the fetch instead, see
/// [`strip_validators`].)
pub fn request_is_cacheable(method: &Method, headers: &HeaderMap) -> bool {
    if method != Method::GET && method != Method::HEAD {
        return false;
    }
    // One pass over the (few) request headers instead of four hashed lookups: this runs on
    // every cache hit.
    let mut cache_control = false;
    for (name, value) in headers {
        if name == AUTHORIZATION
            || name == COOKIE
            || name == RANGE
            || name == IF_RANGE
            || name == IF_MATCH
            || name == IF_UNMODIFIED_SINCE
        {
            return false;
        }
        if name == PRAGMA && value.to_str().is_ok_and(|v| has_token(v, "no-cache")) {
            return false;
        }
        cache_control |= name == CACHE_CONTROL;
    }
    if cache_control {
        let cc = CacheControl::parse(headers);
        return !(cc.no_cache || cc.no_store);
    }
    true
}

/// Removes the client's validators from a request whose answer fills the shared cache: with
/// them the upstream may answer 304, which is no entry, and which a single flight would hand
/// to clients that sent no validator. The client gets the full answer instead (as nginx's
/// `proxy_cache` does); the gateway does not revalidate entries.
pub fn strip_validators(headers: &mut HeaderMap) {
    headers.remove(IF_NONE_MATCH);
    headers.remove(IF_MODIFIED_SINCE);
}

fn has_token(list: &str, token: &str) -> bool {
    list.split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The `Cache-Control` directives the gateway acts on; others are ignored.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct CacheControl {
    pub(super) no_store: bool,
    pub(super) no_cache: bool,
    pub(super) private: bool,
    /// `must-revalidate` or `proxy-revalidate`: the origin forbids serving the entry stale.
    pub(super) must_revalidate: bool,
    pub(super) max_age: Option<u64>,
    pub(super) s_maxage: Option<u64>,
}

impl CacheControl {
    pub(super) fn parse(headers: &HeaderMap) -> CacheControl {
        let mut cc = CacheControl::default();
        for value in headers.get_all(CACHE_CONTROL) {
            let Ok(value) = value.to_str() else {
                // A header we cannot read could say anything, `no-store` included.
                cc.no_store = true;
                continue;
            };
            for directive in value.split(',') {
                let (name, arg) = match directive.split_once('=') {
                    Some((name, arg)) => (name.trim(), Some(arg.trim().trim_matches('"'))),
                    None => (directive.trim(), None),
                };
                // `private="set-cookie"` and `no-cache="x"` (field-name forms) are treated like
                // the bare directives: stricter, and simpler than storing a filtered response.
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => cc.no_store = true,
                    "no-cache" => cc.no_cache = true,
                    "private" => cc.private = true,
                    "must-revalidate" | "proxy-revalidate" => cc.must_revalidate = true,
                    "max-age" => cc.max_age = Some(min_seconds(cc.max_age, arg)),
                    "s-maxage" => cc.s_maxage = Some(min_seconds(cc.s_maxage, arg)),
                    _ => {}
                }
            }
        }
        cc
    }
}

/// A malformed delta-seconds counts as 0 (RFC 9111 §1.2.2: treat as stale); when a directive
/// repeats, the most restrictive (smallest) value wins.
fn min_seconds(previous: Option<u64>, arg: Option<&str>) -> u64 {
    let this = arg.and_then(|a| a.parse::<u64>().ok()).unwrap_or(0);
    previous.map_or(this, |p| p.min(this))
}

/// Statuses a cache may store without explicit freshness (RFC 9110 §15.1 "heuristically
/// cacheable"), minus 206: the gateway does not handle ranges.
fn status_is_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// How long a stored response is fresh, and how long after that it may still be served when
/// the upstream fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Freshness {
    pub(super) ttl: Duration,
    pub(super) stale_if_error: Duration,
}

/// Why a response is not stored; logged at debug level so "why is this never a HIT?" has an
/// answer without reading this file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum NotStored {
    Status,
    NoStore,
    Private,
    /// `no-cache`, `max-age=0` or `s-maxage=0`: the response may only be reused after
    /// revalidation, which the gateway does not do, so storing it would be useless.
    MustRevalidateEveryTime,
    SetCookie,
    VaryAny,
}

/// RFC 9111 §3 storability plus §4.2.1 freshness lifetime: `s-maxage`, then `max-age`, then the
/// route's TTL. `Expires` is ignored: the DeltaStream upstreams do not send it, and a clock
/// skewed between hosts makes it less reliable than the route's TTL.
pub(super) fn freshness(
    status: StatusCode,
    headers: &HeaderMap,
    policy: &RouteCachePolicy,
) -> Result<Freshness, NotStored> {
    if !status_is_cacheable(status) {
        return Err(NotStored::Status);
    }
    let cc = CacheControl::parse(headers);
    if cc.no_store {
        return Err(NotStored::NoStore);
    }
    if cc.private {
        return Err(NotStored::Private);
    }
    if headers.contains_key(SET_COOKIE) {
        return Err(NotStored::SetCookie);
    }
    if Vary::of(headers) == Vary::Any {
        return Err(NotStored::VaryAny);
    }
    let ttl = match cc.s_maxage.or(cc.max_age) {
        Some(seconds) => Duration::from_secs(seconds),
        None => policy.ttl.0,
    };
    if cc.no_cache || ttl.is_zero() {
        return Err(NotStored::MustRevalidateEveryTime);
    }
    // `s-maxage` implies `proxy-revalidate` (RFC 9111 §5.2.2.10): the origin took charge of
    // shared-cache freshness, so the gateway does not stretch it on errors.
    let stale_if_error = if cc.must_revalidate || cc.s_maxage.is_some() {
        Duration::ZERO
    } else {
        policy.stale_if_error.0
    };
    Ok(Freshness {
        ttl,
        stale_if_error,
    })
}

/// Whether a response fetched for one waiting request may be handed to the others waiting on
/// the same resource. Personal responses never are, even when they are not stored: one
/// client's `Set-Cookie` must not reach another client.
pub(super) fn shareable(headers: &HeaderMap) -> bool {
    let cc = CacheControl::parse(headers);
    !(cc.private || cc.no_store || headers.contains_key(SET_COOKIE))
        && Vary::of(headers) != Vary::Any
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;
    use crate::config::Dur;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_static(value));
        }
        h
    }

    fn policy() -> RouteCachePolicy {
        RouteCachePolicy {
            ttl: Dur::from_secs(5),
            stale_if_error: Dur::from_secs(60),
        }
    }

    #[test]
    fn only_plain_get_and_head_are_cacheable() {
        let none = HeaderMap::new();
        assert!(request_is_cacheable(&Method::GET, &none));
        assert!(request_is_cacheable(&Method::HEAD, &none));
        assert!(!request_is_cacheable(&Method::POST, &none));
        assert!(!request_is_cacheable(&Method::DELETE, &none));
        let auth = headers(&[("authorization", "Bearer x")]);
        assert!(!request_is_cacheable(&Method::GET, &auth));
        assert!(!request_is_cacheable(
            &Method::GET,
            &headers(&[("cookie", "s=1")])
        ));
        assert!(!request_is_cacheable(
            &Method::GET,
            &headers(&[("cache-control", "max-age=10, No-Cache")])
        ));
        assert!(!request_is_cacheable(
            &Method::GET,
            &headers(&[("cache-control", "no-store")])
        ));
        assert!(!request_is_cacheable(
            &Method::GET,
            &headers(&[("pragma", "no-cache")])
        ));
        for conditional in [
            ("range", "bytes=0-1"),
            ("if-range", "\"v1\""),
            ("if-match", "\"v1\""),
            ("if-unmodified-since", "Sat, 01 Jan 2000 00:00:00 GMT"),
        ] {
            assert!(
                !request_is_cacheable(&Method::GET, &headers(&[conditional])),
                "{conditional:?}"
            );
        }
        // Validators are stripped from the fill instead: the request still uses the cache.
        assert!(request_is_cacheable(
            &Method::GET,
            &headers(&[("if-none-match", "\"v1\"")])
        ));
        assert!(request_is_cacheable(
            &Method::GET,
            &headers(&[("cache-control", "max-age=10")])
        ));
        // Found among other headers, whatever their order; other pragmas do not bypass.
        let browser = [
            ("accept", "application/json"),
            ("user-agent", "k6"),
            ("pragma", "x-other"),
        ];
        assert!(request_is_cacheable(&Method::GET, &headers(&browser)));
        for personal in [("cookie", "s=1"), ("pragma", "foo, no-cache")] {
            let mut with = browser.to_vec();
            with.insert(1, personal);
            assert!(!request_is_cacheable(&Method::GET, &headers(&with)));
        }
    }

    #[test]
    fn cache_control_parsing() {
        let cc = CacheControl::parse(&headers(&[
            ("cache-control", "public, max-age=\"30\""),
            ("cache-control", "S-MAXAGE=10, max-age=20, proxy-revalidate"),
        ]));
        assert_eq!(
            cc,
            CacheControl {
                must_revalidate: true,
                max_age: Some(20),
                s_maxage: Some(10),
                ..CacheControl::default()
            }
        );
        let bad = CacheControl::parse(&headers(&[("cache-control", "max-age=soon")]));
        assert_eq!(bad.max_age, Some(0));
    }

    #[test]
    fn freshness_lifetime_precedence() {
        let p = policy();
        let ok = StatusCode::OK;
        assert_eq!(
            freshness(ok, &HeaderMap::new(), &p),
            Ok(Freshness {
                ttl: Duration::from_secs(5),
                stale_if_error: Duration::from_secs(60)
            })
        );
        let max_age = headers(&[("cache-control", "max-age=30")]);
        assert_eq!(
            freshness(ok, &max_age, &p).map(|f| f.ttl),
            Ok(Duration::from_secs(30))
        );
        let both = headers(&[("cache-control", "max-age=30, s-maxage=7")]);
        assert_eq!(
            freshness(ok, &both, &p),
            Ok(Freshness {
                ttl: Duration::from_secs(7),
                stale_if_error: Duration::ZERO
            })
        );
        let revalidate = headers(&[("cache-control", "must-revalidate")]);
        assert_eq!(
            freshness(ok, &revalidate, &p).map(|f| f.stale_if_error),
            Ok(Duration::ZERO)
        );
    }

    #[test]
    fn unstorable_responses() {
        let p = policy();
        let ok = StatusCode::OK;
        let cases = [
            ("cache-control", "no-store", NotStored::NoStore),
            ("cache-control", "private", NotStored::Private),
            (
                "cache-control",
                "private=\"set-cookie\"",
                NotStored::Private,
            ),
            (
                "cache-control",
                "no-cache",
                NotStored::MustRevalidateEveryTime,
            ),
            (
                "cache-control",
                "max-age=0",
                NotStored::MustRevalidateEveryTime,
            ),
            ("set-cookie", "s=1", NotStored::SetCookie),
            ("vary", "*", NotStored::VaryAny),
        ];
        for (name, value, why) in cases {
            assert_eq!(
                freshness(ok, &headers(&[(name, value)]), &p),
                Err(why),
                "{name}: {value}"
            );
        }
        for status in [201, 206, 302, 400, 500, 502, 503] {
            let status = StatusCode::from_u16(status).expect("valid status");
            assert_eq!(
                freshness(status, &HeaderMap::new(), &p),
                Err(NotStored::Status)
            );
        }
        assert!(freshness(StatusCode::NOT_FOUND, &HeaderMap::new(), &p).is_ok());
    }

    #[test]
    fn personal_responses_are_not_shared() {
        assert!(shareable(&HeaderMap::new()));
        assert!(shareable(&headers(&[("cache-control", "no-cache")])));
        assert!(!shareable(&headers(&[("set-cookie", "s=1")])));
        assert!(!shareable(&headers(&[("cache-control", "private")])));
        assert!(!shareable(&headers(&[("vary", "*")])));
    }
}
