//! Which address a request comes from, when a trusted proxy stands in between.
//!
//! `X-Forwarded-For` and `Forwarded` are written by whoever sends the request, so trusting them
//! from anyone lets a client pick a fresh identity per request and bypass every limit. They
//! are read only when the socket peer is a configured trusted proxy, and then walked from the
//! right (the hop our proxy appended) leftwards, skipping further trusted proxies: the first
//! untrusted hop is the client. Anything unparsable on that walk yields the peer itself,
//! which is safe (the proxy's own bucket) rather than attacker-chosen.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;

pub(super) fn trusted(ip: IpAddr, proxies: &[IpNet]) -> bool {
    proxies.iter().any(|n| n.contains(&ip))
}

/// The client address (what [`super::ClientKey`] is made from): the peer itself unless it is
/// a trusted proxy.
pub fn client_ip(peer: SocketAddr, headers: &HeaderMap, trusted_proxies: &[IpNet]) -> IpAddr {
    let peer_ip = peer.ip().to_canonical();
    if !trusted(peer_ip, trusted_proxies) {
        return peer_ip;
    }
    behind_proxy(peer_ip, headers, trusted_proxies)
}

/// The client a trusted proxy at `peer_ip` forwarded for (the walk in the module docs).
pub(super) fn behind_proxy(
    peer_ip: IpAddr,
    headers: &HeaderMap,
    trusted_proxies: &[IpNet],
) -> IpAddr {
    // `Forwarded` (RFC 7239) is the standard; a proxy that writes it is preferred.
    let hops = if headers.contains_key(http::header::FORWARDED) {
        forwarded_hops(headers)
    } else {
        xff_hops(headers)
    };
    let Some(hops) = hops else {
        return peer_ip;
    };
    let mut leftmost = peer_ip;
    for hop in hops.iter().rev() {
        let Some(ip) = hop else {
            return peer_ip;
        };
        let ip = ip.to_canonical();
        if !trusted(ip, trusted_proxies) {
            return ip;
        }
        leftmost = ip;
    }
    // Every hop is one of ours: the request originated inside the trusted network.
    leftmost
}

/// All `X-Forwarded-For` entries in order; `None` entries are unparsable.
fn xff_hops(headers: &HeaderMap) -> Option<Vec<Option<IpAddr>>> {
    let mut hops = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        let text = value.to_str().ok()?;
        for part in text.split(',') {
            hops.push(parse_node(part.trim()));
        }
    }
    Some(hops)
}

/// Every element's `for=` node of all `Forwarded` fields, in order.
fn forwarded_hops(headers: &HeaderMap) -> Option<Vec<Option<IpAddr>>> {
    let mut hops = Vec::new();
    for value in headers.get_all(http::header::FORWARDED) {
        let text = value.to_str().ok()?;
        for element in split_unquoted(text, ',') {
            let mut node = None;
            for pair in split_unquoted(element, ';') {
                let Some((k, v)) = pair.split_once('=') else {
                    continue;
                };
                if k.trim().eq_ignore_ascii_case("for") {
                    node = Some(unquote(v.trim()));
                }
            }
            // An element without `for=`, or with `unknown`/an obfuscated name, identifies no
            // address: it ends the walk with the peer (see module docs).
            hops.push(node.and_then(|n| parse_node(&n)));
        }
    }
    Some(hops)
}

/// Splits on `sep` outside double quotes.
fn split_unquoted(text: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in text.char_indices() {
        if escaped {
            escaped = false;
        } else if quoted && c == '\\' {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
        } else if c == sep && !quoted {
            parts.push(text[start..i].trim());
            start = i + 1;
        }
    }
    parts.push(text[start..].trim());
    parts
}

fn unquote(v: &str) -> String {
    match v.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        Some(inner) => inner.replace("\\\"", "\"").replace("\\\\", "\\"),
        None => v.to_string(),
    }
}

/// `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]`, `[2001:db8::1]:80`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = node.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    node.strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .and_then(|s| s.parse::<IpAddr>().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    const PROXY: &str = "10.0.0.5:4000";

    #[test]
    fn nodes() {
        assert_eq!(parse_node("1.2.3.4:80"), "1.2.3.4".parse().ok());
        assert_eq!(parse_node("[2001:db8::1]:80"), "2001:db8::1".parse().ok());
        assert_eq!(parse_node("[2001:db8::1]"), "2001:db8::1".parse().ok());
        assert_eq!(parse_node("unknown"), None);
        assert_eq!(parse_node("_hidden"), None);
    }

    #[test]
    fn xff_walk_skips_trusted_hops() {
        let t = nets(&["10.0.0.0/8"]);
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 1.1.1.1, 10.0.0.9")]);
        assert_eq!(
            client_ip(PROXY.parse().unwrap(), &h, &t),
            "1.1.1.1".parse::<IpAddr>().unwrap()
        );
        // Split over several lines.
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "2.2.2.2"),
        ]);
        assert_eq!(
            client_ip(PROXY.parse().unwrap(), &h, &t),
            "2.2.2.2".parse::<IpAddr>().unwrap()
        );
        // Garbage on the walk: the peer.
        let h = headers(&[("x-forwarded-for", "1.1.1.1, nonsense")]);
        assert_eq!(
            client_ip(PROXY.parse().unwrap(), &h, &t),
            "10.0.0.5".parse::<IpAddr>().unwrap()
        );
        // All hops trusted: the leftmost.
        let h = headers(&[("x-forwarded-for", "10.1.1.1, 10.2.2.2")]);
        assert_eq!(
            client_ip(PROXY.parse().unwrap(), &h, &t),
            "10.1.1.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn forwarded_quoting() {
        let t = nets(&["10.0.0.0/8"]);
        let h = headers(&[(
            "forwarded",
            r#"for=6.6.6.6;proto=http, for="[2001:db8:cafe::17]:4711";by="a,b", for=10.0.0.7"#,
        )]);
        assert_eq!(
            client_ip(PROXY.parse().unwrap(), &h, &t),
            "2001:db8:cafe::17".parse::<IpAddr>().unwrap()
        );
        let h = headers(&[("forwarded", "for=unknown")]);
        assert_eq!(
            client_ip(PROXY.parse().unwrap(), &h, &t),
            "10.0.0.5".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn mapped_peer_is_canonical() {
        let peer: SocketAddr = "[::ffff:192.0.2.1]:5000".parse().unwrap();
        let h = headers(&[("x-forwarded-for", "1.1.1.1")]);
        assert_eq!(
            client_ip(peer, &h, &[]),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
    }
}
