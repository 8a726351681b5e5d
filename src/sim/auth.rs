//! The auth service: in-memory users, Argon2id password hashes, HS256 JWTs.
//!
//! `POST /register`, `POST /login`, `POST /verify`. Users live only as long as the process:
//! the simulator exists to give the gateway something real to authenticate against, not to
//! keep accounts.
//!
//! ```text
//! POST /register {"email","password","name"}
//!   201 {"message":"User registered successfully","token":"<JWT>",
//!        "user":{"id":"<uuid>","email":"ada@example.com","name":"Ada"}}
//!   400 bad JSON / invalid email / password < 8 chars / missing name; 409 email taken
//! POST /login {"email","password"}
//!   200 same shape, "message":"Login successful"; 401 {"error":"Invalid credentials"}
//! POST /verify {"token"}
//!   200 {"valid":true,"user_id":"<uuid>","email":"..."}; 401 {"valid":false,"error":"Invalid token"}
//!   400 when `token` is missing or empty
//! ```
//!
//! Emails are trimmed and lower-cased, so accounts are case-insensitive. Tokens are HS256 with
//! `sub` (user id), `email`, `iat`, `exp` (24 h) and are checked statelessly: any token signed
//! with the configured secret verifies, which lets tests and the gateway mint their own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{parse_json_body, ApiError, SimOptions};

/// How long an issued token stays valid.
pub const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

const MIN_PASSWORD_CHARS: usize = 8;

/// An Argon2id PHC string with default parameters (m=19456, t=2, p=1) and a random output, so no
/// password is known to match it. Logins for unknown emails verify against it so they cost the same as a wrong password and
/// response time does not reveal which emails are registered.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c2ltLWR1bW15LXNhbHQtMDE$ZWZV2h8U7Kkn3s+6pq03fgDaqE5Bm8wiMoq6Y80J4Xc";

/// JWT claims. `sub` is the user id, as the gateway's `/api/user/me` expects.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub email: String,
    /// Unix seconds.
    pub exp: i64,
    /// Unix seconds.
    pub iat: i64,
}

/// Signs an HS256 token for `user_id` valid for `ttl` from now.
pub fn issue_token(
    secret: &[u8],
    user_id: &str,
    email: &str,
    ttl: Duration,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = chrono::Utc::now().timestamp();
    let ttl_seconds = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
    let claims = Claims {
        sub: user_id.to_owned(),
        email: email.to_owned(),
        exp: now.saturating_add(ttl_seconds),
        iat: now,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
}

/// Checks signature, algorithm and expiry; returns the claims of a valid token.
pub fn verify_token(secret: &[u8], token: &str) -> Result<Claims, jsonwebtoken::errors::Error> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_required_spec_claims(&["exp", "sub"]);
    jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(secret), &validation)
        .map(|data| data.claims)
}

pub fn router(opts: &SimOptions) -> Router {
    let secret = match opts.jwt_secret.as_deref() {
        Some(secret) if !secret.is_empty() => secret.as_bytes().to_vec(),
        _ => {
            tracing::warn!(
                "JWT_SECRET not set: using a random per-process secret; tokens will not verify \
                 anywhere else and become invalid on restart"
            );
            rand::random::<[u8; 32]>().to_vec()
        }
    };
    let state = Arc::new(AuthState {
        secret,
        users: Mutex::new(HashMap::new()),
    });
    Router::new()
        .route("/register", post(register))
        .route("/login", post(login))
        .route("/verify", post(verify))
        .with_state(state)
}

struct AuthState {
    secret: Vec<u8>,
    /// Keyed by lower-cased email, so "A@x.io" and "a@x.io" are one account. A std mutex is
    /// enough: it is never held across an await or while hashing.
    users: Mutex<HashMap<String, User>>,
}

impl AuthState {
    fn find(&self, email: &str) -> Result<Option<User>, ApiError> {
        let users = self.users.lock().map_err(ApiError::internal)?;
        Ok(users.get(email).cloned())
    }

    fn session(&self, user: &User, message: &str) -> Result<Json<serde_json::Value>, ApiError> {
        let token = issue_token(&self.secret, &user.id, &user.email, TOKEN_TTL)
            .map_err(ApiError::internal)?;
        Ok(Json(json!({
            "message": message,
            "token": token,
            "user": {"id": user.id, "email": user.email, "name": user.name},
        })))
    }
}

#[derive(Clone, Debug)]
struct User {
    id: String,
    email: String,
    name: String,
    /// PHC string; the password itself is never stored.
    password_hash: String,
}

/// Fields are optional so a missing one gets our message naming it, not a serde error.
#[derive(Deserialize)]
struct RegisterRequest {
    email: Option<String>,
    password: Option<String>,
    name: Option<String>,
}

#[derive(Deserialize)]
struct LoginRequest {
    email: Option<String>,
    password: Option<String>,
}

#[derive(Deserialize)]
struct VerifyRequest {
    token: Option<String>,
}

async fn register(State(state): State<Arc<AuthState>>, body: Bytes) -> Result<Response, ApiError> {
    let request: RegisterRequest = parse_json_body(&body)?;
    let email = normalize_email(request.email.as_deref().unwrap_or(""))
        .ok_or_else(|| ApiError::bad_request("A valid email address is required"))?;
    let password = request.password.unwrap_or_default();
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(ApiError::bad_request(format!(
            "Password must be at least {MIN_PASSWORD_CHARS} characters"
        )));
    }
    let name = request.name.as_deref().map(str::trim).unwrap_or("");
    if name.is_empty() {
        return Err(ApiError::bad_request("Name is required"));
    }

    // Checked before hashing so a duplicate costs nothing, and again under the lock below
    // because two registrations may race through the hash.
    if state.find(&email)?.is_some() {
        return Err(conflict());
    }
    let password_hash = hash_password(password).await?;
    let user = User {
        id: new_user_id(),
        email: email.clone(),
        name: name.to_owned(),
        password_hash,
    };
    {
        let mut users = state.users.lock().map_err(ApiError::internal)?;
        if users.contains_key(&email) {
            return Err(conflict());
        }
        users.insert(email, user.clone());
    }
    tracing::info!(user_id = %user.id, "user registered");
    let body = state.session(&user, "User registered successfully")?;
    Ok((StatusCode::CREATED, body).into_response())
}

async fn login(State(state): State<Arc<AuthState>>, body: Bytes) -> Result<Response, ApiError> {
    let request: LoginRequest = parse_json_body(&body)?;
    let (Some(email), Some(password)) = (request.email, request.password) else {
        return Err(ApiError::bad_request("Email and password are required"));
    };
    let user = state.find(&email.trim().to_lowercase())?;
    let stored_hash = user
        .as_ref()
        .map_or(DUMMY_HASH.to_owned(), |user| user.password_hash.clone());
    let password_ok = verify_password(password, stored_hash).await?;
    match user {
        Some(user) if password_ok => Ok(state.session(&user, "Login successful")?.into_response()),
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "Invalid credentials",
        )),
    }
}

async fn verify(State(state): State<Arc<AuthState>>, body: Bytes) -> Result<Response, ApiError> {
    let request: VerifyRequest = parse_json_body(&body)?;
    let token = request.token.unwrap_or_default();
    if token.is_empty() {
        return Err(ApiError::bad_request("Token is required"));
    }
    let response = match verify_token(&state.secret, &token) {
        Ok(claims) => Json(json!({"valid": true, "user_id": claims.sub, "email": claims.email}))
            .into_response(),
        // The reason (expired, bad signature, garbage) is not the client's business.
        Err(_) => (
            StatusCode::UNAUTHORIZED,
            Json(json!({"valid": false, "error": "Invalid token"})),
        )
            .into_response(),
    };
    Ok(response)
}

fn conflict() -> ApiError {
    ApiError::new(StatusCode::CONFLICT, "User already exists")
}

/// Trims and lower-cases an email, or `None` if it is not plausibly an address: one `@`, a
/// non-empty local part, a dotted domain without empty labels, no whitespace.
fn normalize_email(raw: &str) -> Option<String> {
    let email = raw.trim().to_lowercase();
    if email.len() > 254 || email.chars().any(char::is_whitespace) {
        return None;
    }
    let (local, domain) = email.split_once('@')?;
    let domain_ok = domain.contains('.')
        && !domain.contains('@')
        && domain.split('.').all(|label| !label.is_empty());
    (!local.is_empty() && domain_ok).then_some(email)
}

fn new_user_id() -> String {
    // 128 random bits in UUID layout, without pulling in the uuid crate for one call.
    let hex = hex::encode(rand::random::<[u8; 16]>());
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Argon2 is deliberately slow (tens of ms), so it runs on the blocking pool instead of
/// stalling the async workers that serve every other request.
async fn hash_password(password: String) -> Result<String, ApiError> {
    tokio::task::spawn_blocking(move || {
        let salt =
            SaltString::encode_b64(&rand::random::<[u8; 16]>()).map_err(ApiError::internal)?;
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|hash| hash.to_string())
            .map_err(ApiError::internal)
    })
    .await
    .map_err(ApiError::internal)?
}

async fn verify_password(password: String, stored_hash: String) -> Result<bool, ApiError> {
    tokio::task::spawn_blocking(move || {
        let parsed = PasswordHash::new(&stored_hash).map_err(ApiError::internal)?;
        Ok(Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok())
    })
    .await
    .map_err(ApiError::internal)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_validation() {
        assert_eq!(
            normalize_email(" Ada@Example.COM "),
            Some("ada@example.com".into())
        );
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "a b@x.io",
            "a@x..io",
            "a@b@c.io",
        ] {
            assert_eq!(normalize_email(bad), None, "{bad:?} should be rejected");
        }
    }

    #[test]
    fn dummy_hash_uses_default_params() {
        // If argon2's defaults ever change, the dummy verify would cost a different amount of
        // time than a real one and leak which emails exist.
        let dummy = PasswordHash::new(DUMMY_HASH).expect("dummy hash parses");
        let salt = SaltString::encode_b64(b"0123456789abcdef").expect("salt");
        let real = Argon2::default()
            .hash_password(b"password", &salt)
            .expect("hash");
        assert_eq!(dummy.algorithm, real.algorithm);
        assert_eq!(dummy.version, real.version);
        assert_eq!(dummy.params, real.params);
        assert_eq!(dummy.hash.map(|h| h.len()), real.hash.map(|h| h.len()));
    }

    #[test]
    fn token_round_trip_and_rejections() {
        let token = issue_token(b"secret", "u1", "a@b.io", TOKEN_TTL).expect("sign");
        let claims = verify_token(b"secret", &token).expect("valid");
        assert_eq!(
            (claims.sub.as_str(), claims.email.as_str()),
            ("u1", "a@b.io")
        );
        assert_eq!(claims.exp - claims.iat, 24 * 3600);
        assert!(verify_token(b"other", &token).is_err());
        assert!(verify_token(b"secret", "not.a.token").is_err());
    }
}
