//! `[auth]`: how bearer tokens are verified (remote or local), cached and rate-limited.
//! Whether `upstream` and `failure_policy` name something that exists is checked where every
//! section is visible (`Config::validate_references`).

use serde::{Deserialize, Serialize};

use super::types::{join, Dur, FieldError};

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// `POST {auth}/verify` (the original behaviour).
    Remote,
    /// Verify JWTs in-process: no auth round trip, but revocation is not seen until expiry.
    Local,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub enum JwtAlgorithm {
    HS256,
    RS256,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// The upstream that answers `POST /verify`.
    pub upstream: String,
    pub verify_path: String,
    pub verify_timeout: Dur,
    /// Upper bound on how long a verification result is reused; never past the token's `exp`.
    pub cache_ttl: Dur,
    /// How long a token the verifier rejected is answered 401 without asking again, so one
    /// bad token sent N times is one verify call, not N. `0s` turns it off.
    pub negative_cache_ttl: Dur,
    /// Rate-limit policy that counts failed verifications per client (`auth_failures`, a
    /// built-in 20 per minute per IP unless `rate_limit.policies` defines one of that name);
    /// over it, that client's unverified tokens get 429 without a verify call. `""`: off.
    pub failure_policy: String,
    pub jwt_algorithm: JwtAlgorithm,
    /// HS256 secret for local mode (`JWT_SECRET` overrides).
    pub jwt_secret: Option<String>,
    /// RS256 public key (PEM file path) for local mode.
    pub jwt_public_key_file: Option<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::Remote,
            upstream: "auth".into(),
            verify_path: "/verify".into(),
            verify_timeout: Dur::from_secs(5),
            cache_ttl: Dur::from_secs(30),
            negative_cache_ttl: Dur::from_secs(5),
            failure_policy: "auth_failures".into(),
            jwt_algorithm: JwtAlgorithm::HS256,
            jwt_secret: None,
            jwt_public_key_file: None,
        }
    }
}

impl AuthConfig {
    pub fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        match self.mode {
            AuthMode::Remote => {
                if !self.verify_path.starts_with('/') {
                    errors.push(FieldError::new(
                        join(path, "verify_path"),
                        "must start with '/'",
                    ));
                }
            }
            AuthMode::Local => match self.jwt_algorithm {
                JwtAlgorithm::HS256 if self.jwt_secret.as_deref().unwrap_or("").is_empty() => {
                    errors.push(FieldError::new(
                        join(path, "jwt_secret"),
                        "required for mode = \"local\" with HS256 (or set JWT_SECRET)",
                    ))
                }
                JwtAlgorithm::RS256 if self.jwt_public_key_file.is_none() => errors.push(
                    FieldError::new(join(path, "jwt_public_key_file"), "required for RS256"),
                ),
                JwtAlgorithm::HS256 | JwtAlgorithm::RS256 => {}
            },
        }
        if self.verify_timeout.0.is_zero() {
            errors.push(FieldError::new(
                join(path, "verify_timeout"),
                "must be greater than 0",
            ));
        }
    }
}
