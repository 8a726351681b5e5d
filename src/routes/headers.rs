//! Which request headers cross the gateway, and in what spelling.
//!
//! Upstreams disagree about what a header name is: CGI/WSGI read `-` and `_` as the same
//! character (`X-User_Id` becomes `HTTP_X_USER_ID`), PHP also reads `.` as `_`, and some
//! frameworks drop separators and case altogether (`X-UserId`). So every header the gateway
//! asserts, replaces, strips or counts is matched by its letters and digits only, ignoring
//! case ([`with_name_letters`]): a client cannot slip `X_User.Id` or `X-Forwarded.For` past a
//! strip that only knows `x-user-id`. Framing headers in another spelling (`Transfer_Encoding`,
//! `Content.Length`) are refused outright (400): no honest client sends them, and an upstream
//! that folds them would frame the body differently from the gateway. The `Expect` header is
//! answered here and never forwarded (see [`check_request_head`]).

use std::collections::HashMap;
use std::net::IpAddr;

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Version};

use crate::auth::{is_identity_letters, letters_are, with_name_letters};
use crate::config::DEFAULT_STRIP_FROM_UNTRUSTED;
use crate::error::GatewayError;
use crate::observability::access::X_REQUEST_ID;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// A header name and its letters (see [`with_name_letters`]), written out so the request path
/// compares slices (a unit test checks that they agree).
type Spelled = (&'static str, &'static [u8]);

/// Names whose other spellings would let a client override how the gateway framed the body.
const FRAMING: &[Spelled] = &[
    ("transfer-encoding", b"transferencoding"),
    ("content-length", b"contentlength"),
    ("host", b"host"),
];

/// Names the gateway itself sets on the upstream request: another spelling from the client
/// must not arrive beside them.
const GATEWAY_SET: &[Spelled] = &[
    ("x-forwarded-for", b"xforwardedfor"),
    ("x-forwarded-proto", b"xforwardedproto"),
    ("x-request-id", b"xrequestid"),
];

/// Answered at the edge, never forwarded in any spelling.
const EXPECT: Spelled = ("expect", b"expect");

/// One `Authorization` is all a request may carry, in any spelling.
const AUTHORIZATION: Spelled = ("authorization", b"authorization");

/// The name in `list` whose letters are `letters`, if any.
fn spelled_as(list: &[Spelled], letters: &[u8]) -> Option<&'static str> {
    list.iter()
        .find(|(_, l)| *l == letters)
        .map(|(name, _)| *name)
}

/// How many values `headers` has for `name` in all its spellings (`Authorization` and
/// `Authori_zation` are one name to an upstream that folds them).
pub fn count_spellings(headers: &HeaderMap, name: &str) -> usize {
    headers
        .keys()
        .filter(|k| with_name_letters(k.as_str(), |l| letters_are(l, name)))
        .map(|k| headers.get_all(k).iter().count())
        .sum()
}

/// The configured strip list (`[headers] strip_from_untrusted`), by letters.
#[derive(Clone, Debug)]
pub struct HeaderPolicy {
    /// Letters of each listed name -> the name as configured (lowercase): from a trusted
    /// peer that exact name crosses, other spellings of it do not.
    strip_from_untrusted: HashMap<Box<[u8]>, String, foldhash::fast::FixedState>,
}

impl HeaderPolicy {
    pub fn new(strip_from_untrusted: &[String]) -> HeaderPolicy {
        HeaderPolicy {
            strip_from_untrusted: strip_from_untrusted
                .iter()
                .map(|n| {
                    let canonical = n.to_ascii_lowercase().replace('_', "-");
                    let letters = with_name_letters(&canonical, |l| Box::<[u8]>::from(l));
                    (letters, canonical)
                })
                .collect(),
        }
    }

    /// The configured name `letters` spell, if they spell one.
    fn untrusted_claim(&self, letters: &[u8]) -> Option<&str> {
        self.strip_from_untrusted.get(letters).map(String::as_str)
    }
}

impl Default for HeaderPolicy {
    fn default() -> Self {
        let names: Vec<String> = DEFAULT_STRIP_FROM_UNTRUSTED
            .iter()
            .map(|s| s.to_string())
            .collect();
        HeaderPolicy::new(&names)
    }
}

/// Request-head rules the HTTP parser leaves to us, checked before routing (400 each):
/// - RFC 9112 section 3.2: an HTTP/1.1 request without `Host`, or any request with two;
/// - two `Authorization` headers, in any spelling (which one would the upstream believe?);
/// - a `Transfer-Encoding` other than exactly `chunked` (hyper decodes `gzip, chunked` as
///   chunked; an upstream that honours the other coding would read another body);
/// - a framing header in another spelling (see the module docs);
/// - an `Expect` other than `100-continue` (417): RFC 9110 section 10.1.1 lets a server refuse
///   an expectation it cannot meet. `100-continue` itself is answered at the edge: hyper
///   sends `100 Continue` when the gateway starts reading the body, and not at all when the
///   request is refused from its head (413, 401, 429), so the client never sends that body;
///   the header is never forwarded (the upstream gets the whole body at once).
pub fn check_request_head(version: Version, headers: &HeaderMap) -> Result<(), GatewayError> {
    let bad = |why: &'static str| Err(GatewayError::BadRequest(why.into()));
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (_, Some(_)) => return bad("more than one Host header"),
        (None, None) if version == Version::HTTP_11 => return bad("missing Host header"),
        _ => {}
    }
    let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(first) = codings.next() {
        let chunked = first
            .to_str()
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
        if !chunked || codings.next().is_some() {
            return bad("unsupported Transfer-Encoding (only \"chunked\" is accepted)");
        }
    }
    // One pass, one fold per name: framing twins, and Authorization in every spelling.
    let mut authorizations = 0;
    for name in headers.keys() {
        let raw = name.as_str();
        let (twin, authorization) = with_name_letters(raw, |l| {
            (
                spelled_as(FRAMING, l).is_some_and(|c| c != raw),
                l == AUTHORIZATION.1,
            )
        });
        if twin {
            return bad("framing header in another spelling");
        }
        if authorization {
            authorizations += headers.get_all(name).iter().count();
        }
    }
    if authorizations > 1 {
        return bad("more than one Authorization header");
    }
    for expect in headers.get_all(header::EXPECT) {
        if !expect
            .to_str()
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("100-continue"))
        {
            return Err(GatewayError::ExpectationFailed);
        }
    }
    Ok(())
}

/// The hop-by-hop headers of RFC 9110 7.6.1 (and the obsolete ones still seen).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ]
    .contains(&name)
}

/// Hop-by-hop headers (RFC 9110 7.6.1) plus those named in `Connection`: they describe one
/// connection, not the message, so they must not cross the proxy in either direction.
///
/// Names listed in `Connection` go first (looked up as they are written, no copy), then one
/// pass over the names finds the fixed ones: a message without any (most requests) costs one
/// lookup and one pass, and nothing is allocated (it was a `HeaderName` per `Connection`
/// token, a `Vec`, and nine removals by hash).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut connection = headers.get_all(header::CONNECTION).iter();
    match (connection.next().cloned(), connection.next()) {
        (None, _) => {}
        // The usual case: one value (`keep-alive`, `close`, `upgrade`); a clone shares its bytes.
        (Some(only), None) => remove_listed(headers, &only),
        (Some(_), Some(_)) => {
            let all: Vec<HeaderValue> = headers
                .get_all(header::CONNECTION)
                .iter()
                .cloned()
                .collect();
            for v in &all {
                remove_listed(headers, v);
            }
        }
    }
    // Each removal changes the map, so the pass starts again after one; there are few.
    while let Some(name) = headers.keys().find(|n| is_hop_by_hop(n)).cloned() {
        headers.remove(name);
    }
}

/// Removes the headers a `Connection` value names (a token that is no header name names none).
fn remove_listed(headers: &mut HeaderMap, connection: &HeaderValue) {
    let Ok(v) = connection.to_str() else {
        return;
    };
    for token in v.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        headers.remove(token);
    }
}

/// Request headers for the upstream: the client's minus hop-by-hop, `Host` (set from the
/// upstream URL by the client), `Content-Length` (set from the body) and `Expect` (answered
/// at the edge), minus other spellings of anything the gateway sets or strips and, from
/// untrusted peers, minus the claims in `policy` in every spelling; with forwarding headers
/// that cannot be spoofed by an untrusted peer (`X-Forwarded-Proto` is the scheme the request
/// arrived with: `https` when `tls`).
pub fn upstream_headers(
    mut headers: HeaderMap,
    peer: &ForwardedFor,
    peer_trusted: bool,
    tls: bool,
    request_id: &HeaderValue,
    policy: &HeaderPolicy,
) -> HeaderMap {
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::EXPECT);
    // One pass over the names; nothing is allocated unless something must go.
    let mut doomed: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        let raw = name.as_str();
        let remove = with_name_letters(raw, |letters| {
            let twin = |canonical: &str| canonical != raw;
            is_identity_letters(letters)
                || letters == EXPECT.1
                || spelled_as(GATEWAY_SET, letters).is_some_and(twin)
                || spelled_as(FRAMING, letters).is_some_and(twin)
                || policy
                    .untrusted_claim(letters)
                    .is_some_and(|canonical| !peer_trusted || twin(canonical))
        });
        if remove {
            doomed.push(name.clone());
        }
    }
    for name in doomed {
        headers.remove(name);
    }
    let peer_value = peer.value.clone();
    let scheme = HeaderValue::from_static(if tls { "https" } else { "http" });
    if peer_trusted {
        // A trusted proxy's chain is kept and our peer appended (what nginx's
        // $proxy_add_x_forwarded_for does).
        let chain = headers
            .get(&X_FORWARDED_FOR)
            .and_then(|v| v.to_str().ok())
            .map(|prev| format!("{prev}, {}", peer.ip));
        match chain.and_then(|c| HeaderValue::from_str(&c).ok()) {
            Some(v) => headers.insert(X_FORWARDED_FOR.clone(), v),
            None => headers.insert(X_FORWARDED_FOR.clone(), peer_value),
        };
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO.clone(), scheme);
        }
    } else {
        // From anyone else these headers are claims we cannot check: replace them.
        headers.insert(X_FORWARDED_FOR.clone(), peer_value);
        headers.insert(X_FORWARDED_PROTO.clone(), scheme);
    }
    headers.insert(X_REQUEST_ID.clone(), request_id.clone());
    headers
}

/// A client connection's address as `X-Forwarded-For` states it: formatted once per
/// connection, not once per request (it showed at ~2.9k instructions per request).
#[derive(Clone, Debug)]
pub struct ForwardedFor {
    /// The address (an IPv4-mapped IPv6 one as IPv4): a trusted proxy's chain gets it appended.
    ip: IpAddr,
    /// `ip` as a header value; a clone shares its bytes.
    value: HeaderValue,
}

impl ForwardedFor {
    pub fn new(ip: IpAddr) -> ForwardedFor {
        let ip = ip.to_canonical();
        ForwardedFor {
            ip,
            value: ip_header_value(ip),
        }
    }
}

/// The address as a header value, formatted on the stack (no intermediate `String`).
fn ip_header_value(ip: IpAddr) -> HeaderValue {
    use std::io::Write;
    let mut buf = [0u8; 64];
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    match write!(cursor, "{ip}") {
        Ok(()) => {
            let len = cursor.position() as usize;
            HeaderValue::from_bytes(&buf[..len]).unwrap_or(HeaderValue::from_static("unknown"))
        }
        Err(_) => HeaderValue::from_static("unknown"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn folded_twins_and_untrusted_claims_are_stripped() {
        let h = map(&[
            ("x_user_id", "1"),
            ("x-user_email", "a@b"),
            ("x_forwarded_for", "6.6.6.6"),
            ("x_real_ip", "6.6.6.6"),
            ("true-client-ip", "6.6.6.6"),
            ("x-original-url", "/admin"),
            ("x-http-method-override", "DELETE"),
            ("x_request_id", "forged"),
            ("x-keep", "yes"),
            ("x_custom", "kept: not a name we control"),
        ]);
        let rid = HeaderValue::from_static("rid");
        let out = upstream_headers(
            h.clone(),
            &ForwardedFor::new("1.2.3.4".parse().unwrap()),
            false,
            false,
            &rid,
            &HeaderPolicy::default(),
        );
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        for gone in [
            "x_user_id",
            "x-user_email",
            "x_forwarded_for",
            "x_real_ip",
            "true-client-ip",
            "x-original-url",
            "x-http-method-override",
            "x_request_id",
        ] {
            assert!(!names.contains(&gone), "{gone} forwarded: {names:?}");
        }
        assert_eq!(out["x-forwarded-for"], "1.2.3.4");
        assert_eq!(out["x-request-id"], "rid");
        assert_eq!(out["x-keep"], "yes");
        assert!(out.contains_key("x_custom"));
        // A trusted proxy may state the client's address, in the canonical spelling only.
        let out = upstream_headers(
            h,
            &ForwardedFor::new("1.2.3.4".parse().unwrap()),
            true,
            false,
            &rid,
            &HeaderPolicy::default(),
        );
        assert!(out.contains_key("true-client-ip"));
        assert!(!out.contains_key("x_real_ip"));
        assert!(!out.contains_key("x_user_id"));
    }

    #[test]
    fn the_written_out_letters_are_the_names_letters() {
        let all = FRAMING
            .iter()
            .chain(GATEWAY_SET)
            .chain([&EXPECT, &AUTHORIZATION]);
        for (name, letters) in all {
            assert!(with_name_letters(name, |l| l == *letters), "{name}");
        }
    }

    #[test]
    fn every_spelling_with_the_same_letters_is_one_name() {
        let h = map(&[
            ("x-user.id", "1"),
            ("x-userid", "2"),
            ("xuseremail", "3"),
            ("x-forwarded.for", "6.6.6.6"),
            ("xforwardedproto", "https"),
            ("x.request.id", "forged"),
            ("x.real.ip", "6.6.6.6"),
            ("xoriginalurl", "/admin"),
            ("ex_pect", "100-continue"),
            ("expect", "100-continue"),
            ("x-keep", "yes"),
        ]);
        let rid = HeaderValue::from_static("rid");
        let policy = HeaderPolicy::default();
        let out = upstream_headers(
            h.clone(),
            &ForwardedFor::new("1.2.3.4".parse().unwrap()),
            false,
            false,
            &rid,
            &policy,
        );
        let mut names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "x-forwarded-for",
                "x-forwarded-proto",
                "x-keep",
                "x-request-id"
            ],
            "{out:?}"
        );
        // From a trusted proxy the listed claims cross in their own spelling only.
        let trusted = map(&[("x-real-ip", "10.0.0.1"), ("x_real.ip", "6.6.6.6")]);
        let out = upstream_headers(
            trusted,
            &ForwardedFor::new("1.2.3.4".parse().unwrap()),
            true,
            false,
            &rid,
            &policy,
        );
        assert_eq!(out.get_all("x-real-ip").iter().count(), 1);
        assert!(!out.contains_key("x_real.ip"));
        // Two Authorization headers in different spellings, framing headers in another
        // spelling, and expectations other than 100-continue are refused.
        for refused in [
            map(&[
                ("host", "a"),
                ("authorization", "x"),
                ("authori_zation", "y"),
            ]),
            map(&[
                ("host", "a"),
                ("authorization", "x"),
                ("Authorization.", "y"),
            ]),
            map(&[("host", "a"), ("content.length", "5")]),
            map(&[("host", "a"), ("contentlength", "5")]),
            map(&[("host", "a"), ("transfer.encoding", "chunked")]),
            map(&[("host", "a"), ("ho-st", "b")]),
        ] {
            assert!(matches!(
                check_request_head(Version::HTTP_11, &refused),
                Err(GatewayError::BadRequest(_))
            ));
        }
        assert!(matches!(
            check_request_head(
                Version::HTTP_11,
                &map(&[("host", "a"), ("expect", "x-other")])
            ),
            Err(GatewayError::ExpectationFailed)
        ));
        let continue_ok = map(&[("host", "a"), ("expect", "100-Continue")]);
        assert!(check_request_head(Version::HTTP_11, &continue_ok).is_ok());
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_stripped() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Session ,,bad name"),
            ("connection", "x-other"),
            ("keep-alive", "timeout=5"),
            ("x-session", "1"),
            ("x-other", "2"),
            ("te", "trailers"),
            ("trailer", "x"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic x"),
            ("proxy-authenticate", "Basic"),
            ("content-type", "application/json"),
            ("x-keep", "yes"),
        ]);
        strip_hop_by_hop(&mut h);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-type", "x-keep"]);
        // One value, the usual case; and nothing to strip at all.
        let mut h = map(&[("connection", "close"), ("x-keep", "yes")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        strip_hop_by_hop(&mut h);
        assert_eq!(h["x-keep"], "yes");
    }

    #[test]
    fn the_strip_list_is_configurable_and_folded() {
        let policy = HeaderPolicy::new(&["X_Tenant".to_string()]);
        let rid = HeaderValue::from_static("rid");
        let h = map(&[("x-tenant", "a"), ("x_tenant", "b"), ("x-real-ip", "kept")]);
        let out = upstream_headers(
            h,
            &ForwardedFor::new("1.2.3.4".parse().unwrap()),
            false,
            false,
            &rid,
            &policy,
        );
        assert!(!out.contains_key("x-tenant") && !out.contains_key("x_tenant"));
        assert!(out.contains_key("x-real-ip"));
    }

    #[test]
    fn request_head_rules() {
        let ok = map(&[("host", "gw"), ("authorization", "Bearer a")]);
        assert!(check_request_head(Version::HTTP_11, &ok).is_ok());
        let refused = [
            (Version::HTTP_11, map(&[])),
            (Version::HTTP_11, map(&[("host", "a"), ("host", "b")])),
            (Version::HTTP_10, map(&[("host", "a"), ("host", "b")])),
            (
                Version::HTTP_11,
                map(&[
                    ("host", "a"),
                    ("authorization", "x"),
                    ("authorization", "y"),
                ]),
            ),
            (
                Version::HTTP_11,
                map(&[("host", "a"), ("transfer-encoding", "gzip, chunked")]),
            ),
            (
                Version::HTTP_11,
                map(&[("host", "a"), ("transfer-encoding", "identity")]),
            ),
            (
                Version::HTTP_11,
                map(&[("host", "a"), ("transfer_encoding", "chunked")]),
            ),
            (
                Version::HTTP_11,
                map(&[("host", "a"), ("content_length", "5")]),
            ),
        ];
        for (version, headers) in refused {
            assert!(
                check_request_head(version, &headers).is_err(),
                "{version:?} {headers:?}"
            );
        }
        // HTTP/1.0 and HTTP/2 (authority in the URI) need no Host header.
        assert!(check_request_head(Version::HTTP_10, &map(&[])).is_ok());
        assert!(check_request_head(Version::HTTP_2, &map(&[])).is_ok());
        let chunked = map(&[("host", "a"), ("transfer-encoding", "Chunked")]);
        assert!(check_request_head(Version::HTTP_11, &chunked).is_ok());
    }
}
