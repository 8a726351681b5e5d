//! Any forwarding headers from any peer: `client_ip` never panics and never lets an
//! untrusted peer choose its rate-limit key; `upstream_headers` never forwards a claim an
//! untrusted peer made, nor a hop-by-hop header, Host, Content-Length or Expect, nor an
//! identity header or a gateway-set header in another spelling (names compared by their
//! letters and digits, ignoring case).
#![no_main]
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use deltastream_gateway::client::client_ip;
use deltastream_gateway::routes::headers::{upstream_headers, ForwardedFor, HeaderPolicy};
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u8, [u8; 4], &[u8])| {
    let (kind, octets, raw) = input;
    let peer_ip = match kind % 3 {
        0 => IpAddr::V4(Ipv4Addr::from(octets)),
        1 => IpAddr::V4(Ipv4Addr::new(10, 0, octets[2], octets[3])),
        _ => IpAddr::V6(Ipv6Addr::from(u128::from(u32::from_be_bytes(octets)))),
    };
    let peer = SocketAddr::new(peer_ip, 4242);
    let trusted: Vec<ipnet::IpNet> = ["10.0.0.0/16", "::ffff:10.0.0.0/112"]
        .iter()
        .filter_map(|c| c.parse().ok())
        .collect();
    let mut headers = HeaderMap::new();
    // One header per line, "name: value", as many as the input holds.
    for line in raw.split(|b| *b == b'\n').take(64) {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let is_trusted = trusted.iter().any(|n| n.contains(&peer_ip.to_canonical()));
    let ip = client_ip(peer, &headers, &trusted);
    if !is_trusted {
        assert_eq!(ip, peer_ip.to_canonical(), "untrusted peer chose its key");
    }
    let rid = HeaderValue::from_static("fuzz");
    let tls = kind & 0x80 != 0;
    let out = upstream_headers(
        headers,
        &ForwardedFor::new(peer_ip),
        is_trusted,
        tls,
        &rid,
        &HeaderPolicy::default(),
    );
    let letters = |n: &str| -> String {
        n.chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_lowercase())
            .collect()
    };
    for name in out.keys() {
        let l = letters(name.as_str());
        assert!(!(l.starts_with("xuser") && l.len() > 5), "{name} forwarded");
        assert_ne!(l, "expect", "{name} forwarded");
        for set in ["x-forwarded-for", "x-forwarded-proto", "x-request-id"] {
            if name.as_str() != set {
                assert_ne!(l, letters(set), "{name} forwarded beside the gateway's own");
            }
        }
    }
    for h in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "host",
        "content-length",
        "expect",
    ] {
        assert!(!out.contains_key(h), "{h} forwarded");
    }
    assert_eq!(out.get_all("x-forwarded-for").iter().count(), 1);
    if !is_trusted {
        assert_eq!(out["x-forwarded-for"], peer_ip.to_string().as_str());
        let scheme = if tls { "https" } else { "http" };
        assert_eq!(out["x-forwarded-proto"], scheme, "the scheme is the connection's");
        for name in out.keys() {
            for h in deltastream_gateway::config::DEFAULT_STRIP_FROM_UNTRUSTED {
                assert_ne!(
                    letters(name.as_str()),
                    letters(h),
                    "{name} from an untrusted peer forwarded"
                );
            }
        }
    }
});
