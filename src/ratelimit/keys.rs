//! Turning a request into counter identities and Redis keys.
//!
//! Every subject (an address, a user id, a header value, a route) is hashed with SHA-256 and
//! kept as 128 bits: arbitrary-length or binary header values cannot blow up the key space,
//! clients cannot craft keys that collide with another kind of subject (the kind is hashed in),
//! and no personal data (addresses, user ids, API keys) is stored in Redis in clear.
//!
//! Key layout: `{prefix}:{policy}:{<subject hash>}` — one Redis hash per (policy, subject),
//! holding both fixed windows (see `redis.rs`).
//!
//! Hash tag (Redis Cluster): a script may only touch keys of one slot. On a single node every
//! key is tagged with its own subject, so each (policy, subject) has exactly one counter. In a
//! cluster, a request checked against several policies keyed on *different* subjects (say
//! `user` and `ip`) must still land in one slot, so the tag is the subject of the request's
//! first policy (the anchor): `{prefix}:{policy}:{<anchor>}:<subject>`; a policy whose subject
//! is the anchor keeps the plain layout. Consequence, documented on purpose: in a cluster, a
//! secondary policy with a different key source counts per (anchor subject, own subject).
//! Single-policy checks (every default route) and policies sharing a key source are exact.

use std::fmt::Write as _;
use std::net::IpAddr;

use sha2::{Digest, Sha256};

use super::Subject;
use crate::client::ClientKey;
use crate::config::KeySource;

/// 128 bits of SHA-256 of (kind, value): collision-free in practice, half the key length.
pub type SubjectHash = [u8; 16];

fn digest(kind: &[u8], parts: &[&[u8]]) -> SubjectHash {
    let mut h = Sha256::new();
    h.update(kind);
    for p in parts {
        // Length-prefixed so ("ab","c") and ("a","bc") differ.
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    let full = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&full[..16]);
    out
}

/// An IPv4 address or a whole IPv6 address hashes as it always did (existing counters stay
/// valid); an IPv6 network has its prefix length hashed in, so the /64 `2001:db8::/64` and
/// the single address `2001:db8::` are different subjects.
///
/// The last client's hash is kept per thread: consecutive requests mostly come from the same
/// client (a keep-alive connection), and the digest was ~3.7k instructions of every limited
/// request. It is a pure function of the key, so the memo changes no answer.
fn ip_hash(client: ClientKey) -> SubjectHash {
    thread_local! {
        static LAST: std::cell::Cell<Option<(ClientKey, SubjectHash)>> =
            const { std::cell::Cell::new(None) };
    }
    if let Some((key, hash)) = LAST.get() {
        if key == client {
            return hash;
        }
    }
    let hash = ip_digest(client);
    LAST.set(Some((client, hash)));
    hash
}

fn ip_digest(client: ClientKey) -> SubjectHash {
    match client.network() {
        IpAddr::V4(v4) => digest(b"ip", &[&v4.octets()]),
        IpAddr::V6(v6) if client.prefix_len() == 128 => digest(b"ip", &[&v6.octets()]),
        IpAddr::V6(v6) => digest(b"ip", &[&v6.octets(), &[client.prefix_len()]]),
    }
}

/// The subject of `source` in this request. Sources that are absent (anonymous user, missing
/// header) fall back to the client address so such requests are still limited.
pub fn subject_hash(source: &KeySource, subject: &Subject<'_>) -> SubjectHash {
    match source {
        KeySource::Ip => ip_hash(subject.client),
        KeySource::User => match subject.user_id {
            Some(user) => digest(b"user", &[user.as_bytes()]),
            None => ip_hash(subject.client),
        },
        KeySource::Header(name) => {
            let mut values = subject.headers.get_all(name.as_str()).iter().peekable();
            if values.peek().is_none() {
                return ip_hash(subject.client);
            }
            let parts: Vec<&[u8]> = values.map(|v| v.as_bytes()).collect();
            let mut kind = b"header:".to_vec();
            kind.extend_from_slice(name.as_bytes());
            digest(&kind, &parts)
        }
        KeySource::Route => digest(b"route", &[subject.route.as_bytes()]),
    }
}

pub fn hex(hash: &SubjectHash) -> String {
    let mut s = String::with_capacity(32);
    for b in hash {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The Redis key of (policy, subject); `anchor` is `Some` in cluster mode (see module docs).
pub fn redis_key(
    prefix: &str,
    policy: &str,
    subject: &SubjectHash,
    anchor: Option<&SubjectHash>,
) -> String {
    match anchor {
        Some(a) if a != subject => format!("{prefix}:{policy}:{{{}}}:{}", hex(a), hex(subject)),
        _ => format!("{prefix}:{policy}:{{{}}}", hex(subject)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue};

    fn subject<'a>(headers: &'a HeaderMap, user: Option<&'a str>) -> Subject<'a> {
        Subject {
            client: "10.0.0.1".parse().unwrap(),
            user_id: user,
            headers,
            route: "/api/data/products",
        }
    }

    #[test]
    fn sources_are_distinct_and_fall_back_to_ip() {
        let empty = HeaderMap::new();
        let s = subject(&empty, None);
        let ip = subject_hash(&KeySource::Ip, &s);
        assert_eq!(subject_hash(&KeySource::User, &s), ip);
        assert_eq!(subject_hash(&KeySource::Header("x-api-key".into()), &s), ip);
        assert_ne!(subject_hash(&KeySource::Route, &s), ip);
        let s = subject(&empty, Some("alice"));
        assert_ne!(subject_hash(&KeySource::User, &s), ip);

        let mapped = ClientKey::new("::ffff:10.0.0.1".parse().unwrap(), 64);
        assert_eq!(ip_hash(mapped), ip);
        // One /64, one subject; the /64 is not the single address it starts with.
        let a = ClientKey::new("2001:db8::1".parse().unwrap(), 64);
        let b = ClientKey::new("2001:db8::ffff:2".parse().unwrap(), 64);
        assert_eq!(ip_hash(a), ip_hash(b));
        let whole = ClientKey::new("2001:db8::".parse().unwrap(), 128);
        assert_ne!(ip_hash(a), ip_hash(whole));
    }

    #[test]
    fn the_memo_answers_what_the_digest_does() {
        let a = ClientKey::new("10.0.0.1".parse().unwrap(), 64);
        let b = ClientKey::new("10.0.0.2".parse().unwrap(), 64);
        for k in [a, a, b, a, b, b] {
            assert_eq!(ip_hash(k), ip_digest(k));
        }
        assert_ne!(ip_hash(a), ip_hash(b));
    }

    #[test]
    fn binary_and_huge_header_values() {
        let mut h = HeaderMap::new();
        let big = vec![b'a'; 10 * 1024];
        h.insert("x-api-key", HeaderValue::from_bytes(&big).unwrap());
        let a = subject_hash(&KeySource::Header("x-api-key".into()), &subject(&h, None));
        h.insert(
            "x-api-key",
            HeaderValue::from_bytes(&[0x80, 0xff, b'{', b'}', b':']).unwrap(),
        );
        let b = subject_hash(&KeySource::Header("x-api-key".into()), &subject(&h, None));
        assert_ne!(a, b);
        let key = redis_key("dsgw:rl", "default", &b, None);
        assert_eq!(key.len(), "dsgw:rl:default:{}".len() + 32);
        assert!(key.is_ascii());
    }

    #[test]
    fn layout_and_anchor() {
        let a = [1u8; 16];
        let b = [2u8; 16];
        assert_eq!(
            redis_key("p", "auth", &a, None),
            format!("p:auth:{{{}}}", "01".repeat(16))
        );
        assert_eq!(
            redis_key("p", "auth", &a, Some(&a)),
            redis_key("p", "auth", &a, None)
        );
        assert_eq!(
            redis_key("p", "user", &b, Some(&a)),
            format!("p:user:{{{}}}:{}", "01".repeat(16), "02".repeat(16))
        );
    }
}
