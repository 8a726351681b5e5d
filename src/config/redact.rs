//! Secrets kept out of everything the gateway shows about its configuration: `/admin/config`,
//! the `check-config` and startup summary, validation errors, and the configuration
//! fingerprint (`sha256` in `/admin/config` and `gateway_config_info`).
//!
//! Two kinds of secret: the fields that are one outright ([`SECRET_FIELDS`]), and the user
//! information of any URL (`redis://:password@host`, `https://user:token@collector`). The
//! second kind is found by walking the serialized configuration and masking every string
//! that holds a URL with user information, so a URL-valued field added later is covered
//! without being listed anywhere (and so is a list of URLs in one string, like a Redis node
//! list).

use std::borrow::Cow;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::Config;

/// What a secret is shown as.
pub const MASK: &str = "***";

/// The fields that are secrets outright, as paths into the serialized configuration.
pub const SECRET_FIELDS: &[&[&str]] = &[&["auth", "jwt_secret"], &["admin", "fingerprint_key"]];

/// `text` with the user information of every URL in it replaced by [`MASK`]: whatever lies
/// between a `://` and the last `@` before the authority ends (at `/`, `?`, `#`, `\`, a
/// quote or whitespace), which is what a URL parser would take for user and password. A
/// comma-separated list of URLs is masked URL by URL; a host before the last `@` of a list
/// written without schemes is masked with the password (too much, never too little).
pub fn redact_userinfo(text: &str) -> Cow<'_, str> {
    let mut out: Option<String> = None;
    // Where the text not yet copied to `out` starts, and where to look for the next `://`.
    let (mut copied, mut from) = (0, 0);
    while let Some(found) = text[from..].find("://") {
        let start = from + found + 3;
        let end = text[start..]
            .find(|c: char| matches!(c, '/' | '?' | '#' | '\\' | '"' | '\'') || c.is_whitespace())
            .map_or(text.len(), |i| start + i);
        match text[start..end].rfind('@') {
            Some(at) if at > 0 => {
                let o = out.get_or_insert_with(|| String::with_capacity(text.len()));
                o.push_str(&text[copied..start]);
                o.push_str(MASK);
                copied = start + at;
                from = start + at + 1;
            }
            _ => from = start,
        }
    }
    match out {
        Some(mut o) => {
            o.push_str(&text[copied..]);
            Cow::Owned(o)
        }
        None => Cow::Borrowed(text),
    }
}

/// Masks, in place, every string of `value` that holds a URL with user information.
fn redact_strings(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::String(s) => {
            if let Cow::Owned(masked) = redact_userinfo(s) {
                *s = masked;
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact_strings),
        serde_json::Value::Object(map) => map.values_mut().for_each(redact_strings),
        serde_json::Value::Null | serde_json::Value::Bool(_) | serde_json::Value::Number(_) => {}
    }
}

/// Masks, in place, the secrets of a serialized configuration: [`SECRET_FIELDS`] that are
/// set, and the user information of every URL in every string.
pub fn redact_value(value: &mut serde_json::Value) {
    for path in SECRET_FIELDS {
        let mut at = Some(&mut *value);
        for key in *path {
            at = at.and_then(|v| v.get_mut(*key));
        }
        if let Some(secret) = at.filter(|v| !v.is_null()) {
            *secret = serde_json::Value::String(MASK.into());
        }
    }
    redact_strings(value);
}

/// The configuration as JSON with every secret masked (see [`redact_value`]).
pub fn redacted_json(cfg: &Config) -> serde_json::Value {
    let mut value = serde_json::to_value(cfg).unwrap_or_default();
    redact_value(&mut value);
    value
}

/// The configuration's fingerprint, the same for the same settings on every replica, and
/// never a function of the secrets alone (anyone who reads the admin API could test guesses
/// of a secret against it, offline, as fast as SHA-256 goes):
/// - by default, SHA-256 of [`redacted_json`]: exactly what `/admin/config` shows, so it
///   changes with every setting except a secret;
/// - with `admin.fingerprint_key` (the same on every replica, shown nowhere), HMAC-SHA256 of
///   the whole configuration under that key: it changes with the secrets too, and without
///   the key nobody can compute it.
pub fn fingerprint(cfg: &Config) -> String {
    match cfg.admin.fingerprint_key.as_deref() {
        Some(key) => {
            let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key.as_bytes()) else {
                // HMAC takes a key of any length; unreachable, but never fall back to a
                // hash of the secrets.
                return hex::encode(Sha256::digest(redacted_bytes(cfg)));
            };
            mac.update(&serde_json::to_vec(cfg).unwrap_or_default());
            hex::encode(mac.finalize().into_bytes())
        }
        None => hex::encode(Sha256::digest(redacted_bytes(cfg))),
    }
}

fn redacted_bytes(cfg: &Config) -> Vec<u8> {
    serde_json::to_vec(&redacted_json(cfg)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_masked_in_every_url_of_a_string() {
        for (text, want) in [
            ("redis://:pw@h:6379", "redis://***@h:6379"),
            ("http://user:pw@h/p?q=a@b", "http://***@h/p?q=a@b"),
            (
                "redis://:pw1@a:1,redis://u:pw2@b:2",
                "redis://***@a:1,redis://***@b:2",
            ),
            ("redis+cluster://:pw@a:1,b:2", "redis+cluster://***@a:1,b:2"),
            ("http://u:p@ss@h", "http://***@h"),
            ("http://u:pa,ss@h", "http://***@h"),
            (
                "url = \"https://tok@collector:4318/v1\" # x",
                "url = \"https://***@collector:4318/v1\" # x",
            ),
            ("http://h/a@b", "http://h/a@b"),
            ("http://h:80", "http://h:80"),
            ("no url here @ all", "no url here @ all"),
            ("http://@h", "http://@h"),
            ("", ""),
        ] {
            assert_eq!(redact_userinfo(text), want, "{text}");
        }
    }
}
