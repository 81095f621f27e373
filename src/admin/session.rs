//! Who is calling the admin API: login (argon2id check off the database
//! lock, throttled per username+IP pair and per IP with a global ceiling),
//! HS256 JWTs with a short expiry that die when the user's password, role or
//! status changes, the static admin token, and the [`Caller`] extractor
//! every handler takes.

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

/// Failed logins allowed per username+IP pair within [`WINDOW`].
const MAX_PER_PAIR: u32 = 5;
/// Failed logins allowed per client IP (any usernames) within [`WINDOW`].
const MAX_PER_IP: u32 = 20;
/// Login attempts per second from everyone together (bounds argon2 work).
const MAX_PER_SECOND: u32 = 20;
const WINDOW: Duration = Duration::from_secs(300);

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    name: String,
    role: Role,
    /// The user's token version when issued; a later one voids the token.
    #[serde(default)]
    tv: i64,
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
            tv: user.token_version,
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

/// Login-attempt bookkeeping, in memory. An attempt is counted when it
/// starts, so parallel guesses cannot all slip in before the first failure
/// is recorded; a success gives its count back. Limits apply per
/// username+IP pair and per IP, never per username alone: failing on purpose
/// from one address cannot lock `admin` out everywhere.
#[derive(Default)]
pub struct Throttle {
    state: parking_lot::Mutex<ThrottleState>,
}

#[derive(Default)]
struct ThrottleState {
    counts: HashMap<String, (u32, Instant)>,
    /// Attempts in the current second, from everyone.
    second: Option<(Instant, u32)>,
}

impl ThrottleState {
    /// Seconds until `subject` may try again, if it reached `max`.
    fn wait(&self, subject: &str, max: u32) -> Option<u64> {
        let (n, first) = self.counts.get(subject)?;
        let elapsed = first.elapsed();
        (*n >= max && elapsed < WINDOW).then(|| (WINDOW - elapsed).as_secs().max(1))
    }

    fn add(&mut self, subject: &str, delta: i32) {
        let entry = self.counts.entry(subject.to_string()).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 = entry.0.saturating_add_signed(delta);
    }
}

impl Throttle {
    /// Start an attempt: refused (with the seconds to wait) if the pair, the
    /// IP or everyone together is over the limit; else counted.
    fn begin(&self, pair: &str, ip: &str) -> Result<(), u64> {
        let mut st = self.state.lock();
        if let Some(wait) = st.wait(pair, MAX_PER_PAIR).max(st.wait(ip, MAX_PER_IP)) {
            return Err(wait);
        }
        let now = Instant::now();
        match &mut st.second {
            Some((start, n)) if now.duration_since(*start) < Duration::from_secs(1) => {
                if *n >= MAX_PER_SECOND {
                    return Err(1);
                }
                *n += 1;
            }
            other => *other = Some((now, 1)),
        }
        st.add(pair, 1);
        st.add(ip, 1);
        if st.counts.len() > 100_000 {
            st.counts.retain(|_, (_, first)| first.elapsed() < WINDOW);
        }
        Ok(())
    }

    /// The attempt succeeded: it does not count against anyone.
    fn succeeded(&self, pair: &str, ip: &str) {
        let mut st = self.state.lock();
        st.counts.remove(pair);
        st.add(ip, -1);
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
        // The account may have been deleted, disabled, demoted or given a new
        // password since the token was issued.
        let user = state
            .db(move |c| store::users::get(c, &claims.sub).map(|u| (u, claims.tv)))
            .await
            .ok()
            .filter(|(u, tv)| !u.disabled && u.token_version == *tv)
            .map(|(u, _)| u)
            .ok_or(ApiError::BadToken)?;
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
    headers: axum::http::HeaderMap,
    Json(body): Json<Login>,
) -> Result<Json<Value>, ApiError> {
    // Behind a trusted reverse proxy, throttle the client, not the proxy.
    let client = state.app.trusted_proxies.client_ip(peer.ip(), &headers);
    let (pair, ip) = (format!("{}|{client}", body.username), format!("ip:{client}"));
    state.throttle.begin(&pair, &ip).map_err(ApiError::Throttled)?;
    // The hash is read under the database lock; argon2 runs without it.
    let name = body.username.clone();
    let (id, hash) = state.db(move |c| store::users::login_hash(c, &name)).await?;
    let password = body.password;
    let matches = tokio::task::spawn_blocking(move || store::users::check_password(&password, &hash))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let user = match id.filter(|_| matches) {
        Some(id) => Some(state.db(move |c| store::users::get(c, &id)).await?),
        None => None,
    };
    let Some(user) = user.filter(|u| !u.disabled) else {
        tracing::warn!(username = %body.username, ip = %client, "Failed admin login.");
        return Err(ApiError::BadLogin);
    };
    state.throttle.succeeded(&pair, &ip);
    let (token, expires_at) = state.tokens.issue(&user)?;
    Ok(Json(json!({"token": token, "expires_at": expires_at, "user": user})))
}

/// `GET /api/me`
pub async fn me(caller: Caller) -> Json<Value> {
    Json(json!({"id": caller.user_id, "username": caller.username, "role": caller.role}))
}
