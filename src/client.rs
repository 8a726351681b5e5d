//! Who a request is counted against: [`ClientKey`], the one key every per-client policy uses
//! (rate limits, the failed-verification guard, the WebSocket per-client cap, the share of an
//! upstream's slots).
//!
//! An IPv4 address is one client. An IPv6 address is not: a single host, home router or
//! cloud VM is routinely given a whole /64 (RFC 6177 recommends at least a /56 per site) and
//! can pick a fresh source address from it for every request, so keying on the full /128
//! hands it 2^64 identities (an audit walked 149 addresses of one /64 past a limit of 100).
//! IPv6 clients are therefore grouped by `server.ipv6_client_prefix` (default /64, as
//! Cloudflare and most rate limiters do). IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, what
//! a dual-stack listener reports for IPv4 peers) are the IPv4 client they stand for.
//!
//! Which address that is: the TCP peer, unless the peer is a configured trusted proxy, whose
//! `Forwarded` / `X-Forwarded-For` then names the client ([`forwarded`]). [`Client::resolve`]
//! does both once per request, for the request's context (`routes::RequestCtx`); every
//! policy takes the key from there, never re-deriving it.
//!
//! - this file: [`ClientKey`] and [`Client`], the resolved request origin.
//! - [`forwarded`]: reading the client address out of a trusted proxy's forwarding headers.

pub mod forwarded;

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use http::HeaderMap;
use ipnet::IpNet;

pub use forwarded::client_ip;

/// Where a request comes from, resolved once when it arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Client {
    /// The TCP peer is a trusted proxy: its forwarding headers are kept and believed.
    pub peer_trusted: bool,
    /// Who the request is counted against (see [`ClientKey`]).
    pub key: ClientKey,
}

impl Client {
    /// The client of a request from `peer` with these headers: the peer itself, or, when the
    /// peer is one of `trusted_proxies`, the address they forwarded for; IPv6 grouped by
    /// `ipv6_prefix`.
    pub fn resolve(
        peer: SocketAddr,
        headers: &HeaderMap,
        trusted_proxies: &[IpNet],
        ipv6_prefix: u8,
    ) -> Client {
        // Canonical form, so an IPv4 client on a dual-stack listener matches IPv4 proxies.
        let peer_ip = peer.ip().to_canonical();
        let peer_trusted = forwarded::trusted(peer_ip, trusted_proxies);
        let ip = if peer_trusted {
            forwarded::behind_proxy(peer_ip, headers, trusted_proxies)
        } else {
            peer_ip
        };
        Client {
            peer_trusted,
            key: ClientKey::new(ip, ipv6_prefix),
        }
    }
}

/// The client a request is counted against: an IPv4 address, or an IPv6 network of the
/// configured prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientKey {
    /// The address with every bit past the prefix cleared (IPv4: the address itself).
    network: IpAddr,
    /// 32 for IPv4; the grouping prefix for IPv6.
    prefix_len: u8,
}

impl ClientKey {
    /// The key of `ip`, grouping IPv6 addresses by their first `ipv6_prefix` bits (clamped to
    /// 1..=128; configuration validation refuses anything else).
    pub fn new(ip: IpAddr, ipv6_prefix: u8) -> ClientKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => ClientKey {
                network: IpAddr::V4(v4),
                prefix_len: 32,
            },
            IpAddr::V6(v6) => {
                let prefix_len = ipv6_prefix.clamp(1, 128);
                let mask = u128::MAX << (128 - u32::from(prefix_len));
                ClientKey {
                    network: IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask)),
                    prefix_len,
                }
            }
        }
    }

    /// The network address (the IPv4 address itself).
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// 32 for IPv4, the grouping prefix for IPv6.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }
}

impl fmt::Display for ClientKey {
    /// `192.0.2.7`, `2001:db8::7` (a /128) or `2001:db8:1:2::/64`: what logs name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.network {
            IpAddr::V6(_) if self.prefix_len < 128 => {
                write!(f, "{}/{}", self.network, self.prefix_len)
            }
            _ => write!(f, "{}", self.network),
        }
    }
}

/// `a.b.c.d`, an IPv6 address (taken whole, as a /128) or `addr/len`.
impl FromStr for ClientKey {
    type Err = String;

    fn from_str(s: &str) -> Result<ClientKey, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let ip: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("not an IP address: {s:?}"))?;
        let prefix = match len {
            Some(l) => l
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| (1..=128).contains(p))
                .ok_or_else(|| format!("invalid prefix length in {s:?}"))?,
            None => 128,
        };
        Ok(ClientKey::new(ip, prefix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ip: &str, prefix: u8) -> ClientKey {
        ClientKey::new(ip.parse().unwrap(), prefix)
    }

    #[test]
    fn addresses_of_one_ipv6_prefix_are_one_client() {
        let a = key("2001:db8:1:2::1", 64);
        let b = key("2001:db8:1:2:ffff:ffff:ffff:fffe", 64);
        let other = key("2001:db8:1:3::1", 64);
        assert_eq!(a, b);
        assert_ne!(a, other);
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
        assert_eq!(a.prefix_len(), 64);
        // A /56 groups the /64s of one site as well.
        assert_eq!(key("2001:db8:1:2::1", 56), key("2001:db8:1:3::1", 56));
        assert_ne!(key("2001:db8:1:2::1", 56), key("2001:db8:1:102::1", 56));
        // /128 keeps every address apart; odd prefixes mask mid-group.
        assert_ne!(key("2001:db8::1", 128), key("2001:db8::2", 128));
        assert_eq!(key("2001:db8::1", 128).to_string(), "2001:db8::1");
        assert_eq!(key("2001:db8::ffff", 113), key("2001:db8::8000", 113));
        assert_ne!(key("2001:db8::ffff", 113), key("2001:db8::7fff", 113));
        // Out-of-range prefixes are clamped, never a panic on the shift.
        assert_eq!(key("2001:db8::1", 0).prefix_len(), 1);
        assert_eq!(key("2001:db8::1", 200).prefix_len(), 128);
    }

    #[test]
    fn ipv4_and_mapped_ipv4_are_the_same_single_client() {
        let v4 = key("192.0.2.7", 64);
        assert_eq!(key("::ffff:192.0.2.7", 64), v4);
        assert_eq!(key("::ffff:192.0.2.7", 96), v4);
        assert_ne!(key("192.0.2.8", 64), v4);
        assert_eq!(v4.to_string(), "192.0.2.7");
        assert_eq!(v4.prefix_len(), 32);
    }

    #[test]
    fn forwarding_headers_name_the_client_only_behind_a_trusted_proxy() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
        let proxies: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let via_proxy = Client::resolve("10.0.0.5:4000".parse().unwrap(), &h, &proxies, 64);
        assert!(via_proxy.peer_trusted);
        assert_eq!(via_proxy.key, key("203.0.113.9", 64));
        let direct = Client::resolve("198.51.100.1:4000".parse().unwrap(), &h, &proxies, 64);
        assert!(!direct.peer_trusted);
        assert_eq!(direct.key, key("198.51.100.1", 64));
        // A mapped IPv4 peer is the IPv4 proxy it stands for; an IPv6 client is its /64.
        h.insert("x-forwarded-for", "2001:db8:1:2::77".parse().unwrap());
        let mapped = Client::resolve("[::ffff:10.0.0.5]:4000".parse().unwrap(), &h, &proxies, 64);
        assert!(mapped.peer_trusted);
        assert_eq!(mapped.key, key("2001:db8:1:2::1", 64));
    }

    #[test]
    fn parses_addresses_and_networks() {
        assert_eq!(
            "192.0.2.7".parse::<ClientKey>().unwrap(),
            key("192.0.2.7", 64)
        );
        assert_eq!(
            "2001:db8::5".parse::<ClientKey>().unwrap(),
            key("2001:db8::5", 128)
        );
        assert_eq!(
            "2001:db8:0:0:1::/64".parse::<ClientKey>().unwrap(),
            key("2001:db8::", 64)
        );
        assert!("nonsense".parse::<ClientKey>().is_err());
        assert!("2001:db8::/0".parse::<ClientKey>().is_err());
    }
}
