//! Token verification at the edge and the identity headers it produces.
//!
//! Remote mode asks the auth service (`POST {auth}/verify {"token"}`); local mode checks the
//! JWT signature in-process. Either way a verified identity is cached briefly, keyed by a
//! SHA-256 of the token (the token itself is never stored or logged), never past the
//! token's own `exp`, so a burst of requests with one token makes one verify call.
//!
//! Where to start reading: [`TokenVerifier`], then [`strip_identity_headers`] (run in the
//! identity phase of every request, on every route: a client cannot claim to be a user, in
//! any spelling of the header names).
//!
//! - this file: bearer parsing, remote and local verification, the identity cache, and the
//!   identity headers (`X-User-Id`, `X-User-Email`) set from a verified token only.
//! - [`guard`]: failed verifications per client: a client that keeps sending rejected
//!   tokens is refused (429) without another verify call.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName, HeaderValue};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use moka::future::Cache;
use serde::Deserialize;
use sha2::{Digest, Sha256};

pub mod guard;

use crate::config::{AuthConfig, AuthMode, JwtAlgorithm};
use crate::error::GatewayError;
use crate::upstream::{CallLimits, CallOptions, Pipeline, UpstreamRequest};

pub static X_USER_ID: HeaderName = HeaderName::from_static("x-user-id");
pub static X_USER_EMAIL: HeaderName = HeaderName::from_static("x-user-email");

/// Tokens longer than this are refused without a verify call: no real JWT is that big,
/// and forwarding megabytes to the auth service would make it the victim.
const MAX_TOKEN_LEN: usize = 8 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    pub email: String,
}

#[derive(Clone)]
struct Cached {
    identity: Arc<Identity>,
    /// How long this entry may live: min(cache_ttl, time left until the token's exp).
    ttl: Duration,
}

struct PerEntryTtl;

impl moka::Expiry<[u8; 32], Cached> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _: &[u8; 32],
        v: &Cached,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(v.ttl)
    }
}

enum Backend {
    Remote {
        /// The auth upstream's pipeline: verify calls get its deadline, breaker, bulkhead and
        /// attempt metrics like every other call to it.
        pipeline: Arc<Pipeline>,
        url: reqwest::Url,
        timeout: Duration,
    },
    Local {
        key: Box<DecodingKey>,
        validation: Box<Validation>,
    },
    /// Remote mode without an auth upstream: only possible when no route needs a token
    /// (validation requires the upstream otherwise), so nothing is ever verified.
    Unconfigured,
}

pub struct TokenVerifier {
    backend: Backend,
    cache: Cache<[u8; 32], Cached>,
    /// Hashes of tokens the verifier just rejected: a token replayed N times costs one verify
    /// call, not N (verification amplification). `None` when `negative_cache_ttl` is 0.
    rejected: Option<moka::sync::Cache<[u8; 32], ()>>,
    max_ttl: Duration,
}

/// Most rejected tokens remembered at once (about 100 bytes each); a flood of distinct bad
/// tokens evicts older ones rather than growing memory.
const REJECTED_CAPACITY: u64 = 100_000;

/// Calls `f` with a header name as an upstream that ignores punctuation and case reads it:
/// its ASCII letters and digits, lowercase. CGI/WSGI read `_` as `-`, PHP reads `.` as `_`,
/// and some frameworks drop separators altogether, so `X-User-Id`, `X_User.Id` and `XUserId`
/// are one name to some upstream; every name the gateway asserts, strips or refuses is
/// compared in this form. No allocation for names up to 64 letters.
pub fn with_name_letters<R>(name: &str, f: impl FnOnce(&[u8]) -> R) -> R {
    let bytes = name.as_bytes();
    let mut buf = [0u8; 64];
    if bytes.len() > buf.len() {
        let long: Vec<u8> = bytes
            .iter()
            .filter(|b| b.is_ascii_alphanumeric())
            .map(u8::to_ascii_lowercase)
            .collect();
        return f(&long);
    }
    // Every byte is written, only letters and digits advance: no branch per byte.
    let mut len = 0;
    for &b in bytes {
        buf[len] = b.to_ascii_lowercase();
        len += usize::from(b.is_ascii_alphanumeric());
    }
    f(&buf[..len])
}

/// Whether `letters` (see [`with_name_letters`]) are the letters of `name`.
pub fn letters_are(letters: &[u8], name: &str) -> bool {
    name.bytes()
        .filter(u8::is_ascii_alphanumeric)
        .map(|b| b.to_ascii_lowercase())
        .eq(letters.iter().copied())
}

/// `X-User-*` in any spelling (see [`with_name_letters`]): a name whose letters start with
/// `xuser` and go on. Only the gateway may assert identity. `X-Username` is in the class: to
/// an upstream that compares letters it is `X-User-Name`.
pub fn is_identity_header(name: &str) -> bool {
    with_name_letters(name, is_identity_letters)
}

/// [`is_identity_header`] for a name already folded by [`with_name_letters`].
pub fn is_identity_letters(letters: &[u8]) -> bool {
    letters.len() > 5 && letters.starts_with(b"xuser")
}

/// Removes every client-supplied `X-User-*` header, in any spelling (see
/// [`is_identity_header`]): only the gateway may assert identity.
pub fn strip_identity_headers(headers: &mut HeaderMap) {
    let spoofed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| is_identity_header(k.as_str()))
        .cloned()
        .collect();
    for k in spoofed {
        headers.remove(&k);
    }
}

/// The token from `Authorization: Bearer <token>`; a missing or malformed header is
/// "Missing Authorization header" (as the original service said).
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, GatewayError> {
    let value = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or(GatewayError::MissingToken)?;
    let (scheme, token) = value
        .trim()
        .split_once(' ')
        .ok_or(GatewayError::MissingToken)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(GatewayError::MissingToken);
    }
    Ok(token)
}

#[derive(Deserialize)]
struct VerifyResponse {
    #[serde(default)]
    valid: Option<bool>,
    user_id: serde_json::Value,
    #[serde(default)]
    email: String,
}

#[derive(Deserialize)]
struct Claims {
    sub: serde_json::Value,
    #[serde(default)]
    email: String,
}

fn id_string(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Seconds until the token's `exp`, read WITHOUT checking the signature: used only to
/// bound how long a result the verifier vouched for is reused.
fn seconds_until_exp(token: &str) -> Option<i64> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = v.get("exp")?.as_i64()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs() as i64;
    Some(exp - now)
}

impl TokenVerifier {
    /// `auth` is the auth upstream's pipeline and base URL (remote mode; a config without
    /// routes that need a token may have none).
    pub fn new(
        cfg: &AuthConfig,
        auth: Option<(Arc<Pipeline>, &str)>,
    ) -> Result<TokenVerifier, String> {
        let backend = match (cfg.mode, auth) {
            (AuthMode::Remote, Some((pipeline, base_url))) => {
                let url = format!("{}{}", base_url.trim_end_matches('/'), cfg.verify_path);
                Backend::Remote {
                    pipeline,
                    url: reqwest::Url::parse(&url)
                        .map_err(|e| format!("auth.verify_path: {url}: {e}"))?,
                    timeout: cfg.verify_timeout.0,
                }
            }
            (AuthMode::Remote, None) => Backend::Unconfigured,
            (AuthMode::Local, _) => {
                let (key, alg) = match cfg.jwt_algorithm {
                    JwtAlgorithm::HS256 => (
                        DecodingKey::from_secret(
                            cfg.jwt_secret.as_deref().unwrap_or("").as_bytes(),
                        ),
                        Algorithm::HS256,
                    ),
                    JwtAlgorithm::RS256 => {
                        let path = cfg.jwt_public_key_file.as_deref().unwrap_or("");
                        let pem = std::fs::read(path).map_err(|e| {
                            format!("auth.jwt_public_key_file: cannot read {path:?}: {e}")
                        })?;
                        (
                            DecodingKey::from_rsa_pem(&pem).map_err(|e| {
                                format!("auth.jwt_public_key_file: invalid RSA key: {e}")
                            })?,
                            Algorithm::RS256,
                        )
                    }
                };
                // Exactly one algorithm: `alg: none` or an HS/RS confusion is rejected.
                let mut validation = Validation::new(alg);
                validation.set_required_spec_claims(&["exp", "sub"]);
                validation.leeway = 5;
                Backend::Local {
                    key: Box::new(key),
                    validation: Box::new(validation),
                }
            }
        };
        Ok(TokenVerifier {
            backend,
            cache: Cache::builder()
                .max_capacity(100_000)
                .expire_after(PerEntryTtl)
                .build(),
            rejected: (!cfg.negative_cache_ttl.0.is_zero()).then(|| {
                moka::sync::Cache::builder()
                    .max_capacity(REJECTED_CAPACITY)
                    .time_to_live(cfg.negative_cache_ttl.0)
                    .build()
            }),
            max_ttl: cfg.cache_ttl.0,
        })
    }

    /// Verifies the request's bearer token.
    pub async fn verify_headers(&self, headers: &HeaderMap) -> Result<Arc<Identity>, GatewayError> {
        let token = bearer_token(headers)?;
        self.verify(token).await
    }

    /// The identity of a token verified recently, without verifying anything.
    pub async fn cached(&self, token: &str) -> Option<Arc<Identity>> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.cache.get(&key).await.map(|c| c.identity)
    }

    pub async fn verify(&self, token: &str) -> Result<Arc<Identity>, GatewayError> {
        if token.len() > MAX_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(GatewayError::InvalidToken);
        }
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if self.rejected.as_ref().is_some_and(|r| r.contains_key(&key)) {
            return Err(GatewayError::InvalidToken);
        }
        // Concurrent misses for one token share ONE verification (moka coalesces them).
        let cached = self
            .cache
            .try_get_with(key, async {
                let identity = Arc::new(self.verify_uncached(token).await?);
                let left = seconds_until_exp(token).unwrap_or(i64::MAX);
                let ttl = if left <= 0 {
                    Duration::ZERO
                } else {
                    self.max_ttl.min(Duration::from_secs(left as u64))
                };
                Ok::<_, GatewayError>(Cached { identity, ttl })
            })
            .await
            .map_err(|e: Arc<GatewayError>| (*e).clone());
        match cached {
            Ok(cached) => Ok(cached.identity),
            Err(GatewayError::InvalidToken) => {
                if let Some(rejected) = &self.rejected {
                    rejected.insert(key, ());
                }
                Err(GatewayError::InvalidToken)
            }
            Err(other) => Err(other),
        }
    }

    async fn verify_uncached(&self, token: &str) -> Result<Identity, GatewayError> {
        match &self.backend {
            Backend::Local { key, validation } => {
                let data = jsonwebtoken::decode::<Claims>(token, key, validation)
                    .map_err(|_| GatewayError::InvalidToken)?;
                let user_id = id_string(&data.claims.sub).ok_or(GatewayError::InvalidToken)?;
                Ok(Identity {
                    user_id,
                    email: data.claims.email,
                })
            }
            Backend::Unconfigured => {
                tracing::error!("token verification without an auth upstream");
                Err(GatewayError::AuthUnavailable)
            }
            Backend::Remote {
                pipeline,
                url,
                timeout,
            } => verify_remote(pipeline, url, *timeout, token).await,
        }
    }
}

/// `POST {auth}/verify {"token"}` through the auth upstream's pipeline: bounded by the verify
/// timeout, refused fast while the auth breaker is open, never replayed once it reached the
/// auth service (a POST), counted by the breaker and the attempt metrics. Any failure to get
/// an answer is `AuthUnavailable` (503), never a 401.
async fn verify_remote(
    pipeline: &Pipeline,
    url: &reqwest::Url,
    timeout: Duration,
    token: &str,
) -> Result<Identity, GatewayError> {
    let started = tokio::time::Instant::now();
    let body = serde_json::to_vec(&serde_json::json!({ "token": token }))
        .map_err(|_| GatewayError::Internal)?;
    // The gateway's own call: none of a client's headers, no client's share of the slots,
    // and no client's trace (concurrent requests with one token share this one call).
    let method = http::Method::POST;
    let options = CallOptions::for_method(&method, CallLimits::within(timeout));
    let mut req = UpstreamRequest::new(method, url.clone(), options);
    req.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    req.set_body(bytes::Bytes::from(body));
    // Under the auth upstream's adaptive limit, and critical there: a request whose token
    // cannot be checked fails like a login would.
    req.caller.priority = crate::config::Priority::Critical;
    req.limited = true;
    let delivered = match pipeline.send_request(req).await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "token verification: auth service unavailable");
            return Err(GatewayError::AuthUnavailable);
        }
    };
    let resp = delivered.response;
    let status = resp.status().as_u16();
    match status {
        200 => {}
        400 | 401 | 403 | 422 => return Err(GatewayError::InvalidToken),
        _ => {
            tracing::warn!(status, "token verification: unexpected auth service status");
            return Err(GatewayError::AuthUnavailable);
        }
    }
    let left = timeout.saturating_sub(started.elapsed());
    let bytes = match tokio::time::timeout(left, resp.bytes()).await {
        Ok(Ok(b)) => b,
        _ => return Err(GatewayError::AuthUnavailable),
    };
    let v: VerifyResponse = serde_json::from_slice(&bytes).map_err(|_| {
        tracing::warn!("token verification: auth service answered malformed JSON");
        GatewayError::AuthUnavailable
    })?;
    if v.valid == Some(false) {
        return Err(GatewayError::InvalidToken);
    }
    let user_id = id_string(&v.user_id).ok_or(GatewayError::InvalidToken)?;
    Ok(Identity {
        user_id,
        email: v.email,
    })
}

impl Identity {
    /// Adds `X-User-Id` / `X-User-Email` for the upstream (values that cannot be header
    /// values are refused rather than mangled).
    pub fn insert_headers(&self, headers: &mut HeaderMap) -> Result<(), GatewayError> {
        let id = HeaderValue::from_str(&self.user_id).map_err(|_| GatewayError::InvalidToken)?;
        let email = HeaderValue::from_str(&self.email).map_err(|_| GatewayError::InvalidToken)?;
        headers.insert(X_USER_ID.clone(), id);
        headers.insert(X_USER_EMAIL.clone(), email);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        h
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer_token(&headers("Bearer abc")).unwrap(), "abc");
        assert_eq!(bearer_token(&headers("bearer  abc ")).unwrap(), "abc");
        assert!(matches!(
            bearer_token(&headers("Basic abc")),
            Err(GatewayError::MissingToken)
        ));
        assert!(matches!(
            bearer_token(&headers("Bearer")),
            Err(GatewayError::MissingToken)
        ));
        assert!(matches!(
            bearer_token(&HeaderMap::new()),
            Err(GatewayError::MissingToken)
        ));
    }

    #[test]
    fn strips_spoofed_identity() {
        let mut h = HeaderMap::new();
        h.insert("x-user-id", HeaderValue::from_static("1"));
        h.insert("x-user-email", HeaderValue::from_static("a@b"));
        h.insert("x-user-role", HeaderValue::from_static("admin"));
        h.insert("x_user_id", HeaderValue::from_static("2"));
        h.insert("x-user_email", HeaderValue::from_static("c@d"));
        h.insert("x-user.id", HeaderValue::from_static("3"));
        h.insert("x-userid", HeaderValue::from_static("4"));
        h.insert("xuserid", HeaderValue::from_static("5"));
        h.insert("x-other", HeaderValue::from_static("keep"));
        strip_identity_headers(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-other"));
    }

    #[test]
    fn identity_headers_are_recognised_in_every_spelling() {
        for n in [
            "x-user-id",
            "x-user_id",
            "x_user_id",
            "x_user-email",
            "x-user-role",
            "x-user.id",
            "x.user.id",
            "x-userid",
            "xuserid",
            "x-user--id",
            "x-use-rid-",
            "x-user.email",
            // Letters only: `X-Username` is `X-User-Name`, `X-Users-Id` is `X-User-SId`.
            "x-username",
            "x-users-id",
        ] {
            assert!(is_identity_header(n), "{n}");
        }
        for n in [
            "x-user",
            "y-user-id",
            "x-user-",
            "x-use",
            "user-id",
            "x-usr-id",
        ] {
            assert!(!is_identity_header(n), "{n}");
        }
    }

    #[test]
    fn exp_is_read_for_cache_bounds() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("{{\"exp\":{}}}", now + 100));
        let left = seconds_until_exp(&format!("h.{payload}.s")).unwrap();
        assert!((95..=100).contains(&left));
        assert_eq!(seconds_until_exp("garbage"), None);
    }
}
