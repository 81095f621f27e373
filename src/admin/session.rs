//! Who is calling the admin API: login (argon2id check, throttled per
//! username and per client IP), HS256 JWTs with a short expiry, the static
//! admin token, and the [`Caller`] extractor every handler takes.

use super::{AdminState, error::ApiError};
use crate::store::{
    self,
    users::{Role, User},
};
use axum::{
    Json,
    extract::{ConnectInfo, FromRequestParts, State},
    http::{header, request::Parts},
};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

/// Failed logins allowed per username or IP within [`WINDOW`].
const MAX_FAILURES: u32 = 5;
const WINDOW: Duration = Duration::from_secs(300);

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    name: String,
    role: Role,
    iat: i64,
    exp: i64,
}

pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    ttl: Duration,
    /// SHA-256 of the static admin token, if one is configured.
    admin_token: Option<[u8; 32]>,
}

impl Tokens {
    pub fn new(secret: &[u8], ttl: Duration, admin_token: &str) -> Self {
        Tokens {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            ttl,
            admin_token: (!admin_token.is_empty()).then(|| Sha256::digest(admin_token.as_bytes()).into()),
        }
    }

    fn issue(&self, user: &User) -> Result<(String, i64), ApiError> {
        let now = store::now_unix();
        let exp = now + self.ttl.as_secs() as i64;
        let claims = Claims {
            sub: user.id.clone(),
            name: user.username.clone(),
            role: user.role,
            iat: now,
            exp,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map(|t| (t, exp))
            .map_err(|e| ApiError::Internal(format!("signing token: {e}")))
    }

    fn verify(&self, token: &str) -> Option<Claims> {
        let mut v = Validation::new(Algorithm::HS256);
        v.leeway = 0;
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &v)
            .ok()
            .map(|d| d.claims)
    }

    /// Constant-time in effect: both sides are hashed before comparing.
    fn is_admin_token(&self, token: &str) -> bool {
        self.admin_token
            .is_some_and(|want| <[u8; 32]>::from(Sha256::digest(token.as_bytes())) == want)
    }
}

/// Failed-login bookkeeping, in memory.
#[derive(Default)]
pub struct Throttle {
    failures: parking_lot::Mutex<HashMap<String, (u32, Instant)>>,
}

impl Throttle {
    /// Seconds to wait if `subject` is locked out.
    fn locked(&self, subject: &str) -> Option<u64> {
        let map = self.failures.lock();
        let (n, first) = map.get(subject)?;
        let elapsed = first.elapsed();
        (*n >= MAX_FAILURES && elapsed < WINDOW).then(|| (WINDOW - elapsed).as_secs().max(1))
    }

    fn fail(&self, subject: &str) {
        let mut map = self.failures.lock();
        let entry = map.entry(subject.to_string()).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
        if map.len() > 100_000 {
            map.retain(|_, (_, first)| first.elapsed() < WINDOW);
        }
    }

    fn clear(&self, subject: &str) {
        self.failures.lock().remove(subject);
    }
}

/// The authenticated caller of an admin request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user_id: String,
    pub username: String,
    pub role: Role,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::Forbidden)
        }
    }
}

impl FromRequestParts<Arc<AdminState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AdminState>) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .ok_or(ApiError::Unauthenticated)?;
        if state.tokens.is_admin_token(token) {
            return Ok(Caller {
                user_id: "admin-token".into(),
                username: "admin-token".into(),
                role: Role::Admin,
            });
        }
        let claims = state.tokens.verify(token).ok_or(ApiError::BadToken)?;
        // The account may have been deleted or demoted since the token was issued.
        let user = state
            .db(move |c| store::users::get(c, &claims.sub))
            .await
            .map_err(|_| ApiError::BadToken)?;
        Ok(Caller {
            user_id: user.id,
            username: user.username,
            role: user.role,
        })
    }
}

#[derive(Deserialize)]
pub struct Login {
    username: String,
    password: String,
}

/// `POST /api/auth/login`
pub async fn login(
    State(state): State<Arc<AdminState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Json(body): Json<Login>,
) -> Result<Json<Value>, ApiError> {
    let (user_key, ip_key) = (format!("user:{}", body.username), format!("ip:{}", peer.ip()));
    if let Some(wait) = state.throttle.locked(&user_key).max(state.throttle.locked(&ip_key)) {
        return Err(ApiError::Throttled(wait));
    }
    let (name, password) = (body.username.clone(), body.password);
    let user = state.db(move |c| store::users::verify(c, &name, &password)).await?;
    let Some(user) = user else {
        state.throttle.fail(&user_key);
        state.throttle.fail(&ip_key);
        tracing::warn!(username = %body.username, ip = %peer.ip(), "Failed admin login.");
        return Err(ApiError::BadLogin);
    };
    state.throttle.clear(&user_key);
    let (token, expires_at) = state.tokens.issue(&user)?;
    Ok(Json(json!({"token": token, "expires_at": expires_at, "user": user})))
}

/// `GET /api/me`
pub async fn me(caller: Caller) -> Json<Value> {
    Json(json!({"id": caller.user_id, "username": caller.username, "role": caller.role}))
}
