//! Who is calling the admin API: login (argon2id check off the database
//! lock, throttled per username+IP pair and per IP with a global ceiling),
//! HS256 JWTs with a short expiry that die when the user's password, role or
//! status changes, the static admin token (failed guesses throttled per
//! address), and the [`Caller`] extractor every handler takes.
//!
//! Every password check and hash goes through [`Throttle::passwords`]: a
//! few argon2 runs at a time (19 MiB each) on the blocking pool, a bounded
//! queue behind them, and `429` past it, so parallel guesses wait or are
//! refused instead of each allocating its own 19 MiB.

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
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

/// Failed logins allowed per username+IP pair within [`WINDOW`].
const MAX_PER_PAIR: u32 = 5;
/// Failed logins allowed per client IP (any usernames) within [`WINDOW`].
const MAX_PER_IP: u32 = 20;
/// Login attempts per second from everyone together (bounds argon2 work).
const MAX_PER_SECOND: u32 = 20;
const WINDOW: Duration = Duration::from_secs(300);
/// Failed bearer tokens (neither a valid JWT nor the static token) allowed
/// per client IP within [`WINDOW`]: guesses at the static token.
const MAX_TOKEN_FAILURES: u32 = 20;
/// Subjects the throttle remembers at most; expired ones go first, then the
/// oldest. The per-second ceiling adds at most 2 × 20 a second, so within
/// [`WINDOW`] the map holds about 12,000 live subjects at worst.
const MAX_SUBJECTS: usize = 16_384;
/// Characters of a username shown in logs.
const LOGGED_NAME: usize = 64;

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
        let now = crate::clock::now_unix();
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

    /// The token's claims; else whether it was signed by us at all (an
    /// expired login token is not a guess, a forged one may be).
    fn verify(&self, token: &str) -> Result<Claims, Signed> {
        let mut v = Validation::new(Algorithm::HS256);
        v.leeway = 0;
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &v)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                // Claims are checked only once the signature holds.
                jsonwebtoken::errors::ErrorKind::ExpiredSignature
                | jsonwebtoken::errors::ErrorKind::ImmatureSignature => Signed::Yes,
                _ => Signed::No,
            })
    }

    /// Constant-time in effect: both sides are hashed before comparing.
    fn is_admin_token(&self, token: &str) -> bool {
        self.admin_token
            .is_some_and(|want| <[u8; 32]>::from(Sha256::digest(token.as_bytes())) == want)
    }
}

/// Whether a token that failed verification carried our signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signed {
    Yes,
    No,
}

/// The short hash a subject is kept under: the throttle map holds 16 bytes
/// per subject whatever the username a client sends.
fn subject(text: &str) -> [u8; 16] {
    let digest = Sha256::digest(text.as_bytes());
    let mut out = [0; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

/// A username as logs show it: as is when it could be one; else its first
/// [`LOGGED_NAME`] characters escaped, and a SHA-256 prefix to tell long
/// ones apart. A client never chooses how many bytes a log line takes.
pub struct LogName<'a>(pub &'a str);

impl std::fmt::Display for LogName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if store::users::valid_username(self.0) {
            return f.write_str(self.0);
        }
        let head: String = self.0.chars().take(LOGGED_NAME).collect();
        let digest = Sha256::digest(self.0.as_bytes());
        write!(f, "{}…#{}", head.escape_debug(), hex::encode(&digest[..6]))
    }
}

/// Argon2 work, a few at a time: the rest wait in a bounded queue.
struct PasswordGate {
    permits: Arc<tokio::sync::Semaphore>,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
}

/// One place in [`PasswordGate`]'s queue, given back however the wait ends
/// (the client may hang up).
struct Waiting(Arc<AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl PasswordGate {
    fn new(concurrency: usize, queue: usize) -> Self {
        PasswordGate {
            permits: Arc::new(tokio::sync::Semaphore::new(concurrency.max(1))),
            waiting: Arc::new(AtomicUsize::new(0)),
            max_waiting: queue,
        }
    }

    /// Run `work` on the blocking pool once a permit is free; `429` at once
    /// when the queue is full. The permit goes with the work, so a client
    /// that hangs up does not free it before argon2 is done.
    async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.max_waiting {
                    self.waiting.fetch_sub(1, Ordering::SeqCst);
                    tracing::warn!(queue = self.max_waiting, "Password check refused: the queue is full.");
                    return Err(ApiError::Throttled(1));
                }
                let _place = Waiting(self.waiting.clone());
                self.permits
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|e| ApiError::Internal(e.to_string()))?
            }
        };
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))
    }
}

/// Login-attempt bookkeeping, in memory. An attempt is counted when it
/// starts, so parallel guesses cannot all slip in before the first failure
/// is recorded; a success gives its count back. Limits apply per
/// username+IP pair and per IP, never per username alone: failing on purpose
/// from one address cannot lock `admin` out everywhere.
///
/// The same bookkeeping guards every other password check (`current_password`,
/// per user and per IP) and static-token guesses (per IP), and it owns the
/// [`PasswordGate`] every argon2 run goes through.
#[derive(Default)]
pub struct Throttle {
    state: parking_lot::Mutex<ThrottleState>,
    /// Built from the config on first use.
    gate: OnceLock<PasswordGate>,
}

#[derive(Default)]
struct ThrottleState {
    counts: HashMap<[u8; 16], (u32, Instant)>,
    /// Attempts in the current second, from everyone.
    second: Option<(Instant, u32)>,
}

impl ThrottleState {
    /// Seconds until `subject` may try again, if it reached `max`.
    fn wait(&self, subject: &[u8; 16], max: u32) -> Option<u64> {
        let (n, first) = self.counts.get(subject)?;
        let elapsed = first.elapsed();
        (*n >= max && elapsed < WINDOW).then(|| (WINDOW - elapsed).as_secs().max(1))
    }

    fn add(&mut self, subject: &[u8; 16], delta: i32) {
        if !self.counts.contains_key(subject) {
            if delta <= 0 {
                return;
            }
            self.make_room();
        }
        let entry = self.counts.entry(*subject).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 = entry.0.saturating_add_signed(delta);
    }

    /// Keep the map under [`MAX_SUBJECTS`]: expired subjects first, then
    /// the oldest eighth at once (so a full map is not scanned per insert).
    fn make_room(&mut self) {
        if self.counts.len() < MAX_SUBJECTS {
            return;
        }
        self.counts.retain(|_, (_, first)| first.elapsed() < WINDOW);
        if self.counts.len() >= MAX_SUBJECTS {
            let mut by_age: Vec<([u8; 16], Instant)> = self.counts.iter().map(|(k, (_, first))| (*k, *first)).collect();
            by_age.sort_unstable_by_key(|(_, first)| *first);
            for (k, _) in by_age.iter().take(MAX_SUBJECTS / 8) {
                self.counts.remove(k);
            }
        }
    }
}

impl Throttle {
    /// Start an attempt: refused (with the seconds to wait) if the pair, the
    /// IP or everyone together is over the limit; else counted.
    fn begin(&self, pair: &str, ip: &str) -> Result<(), u64> {
        let (pair, ip) = (&subject(pair), &subject(ip));
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
        Ok(())
    }

    /// The attempt succeeded: it does not count against anyone.
    fn succeeded(&self, pair: &str, ip: &str) {
        let mut st = self.state.lock();
        st.counts.remove(&subject(pair));
        st.add(&subject(ip), -1);
    }

    /// Seconds until `client` may present a bearer token other than a valid
    /// login token again, if its failures reached the limit.
    fn token_wait(&self, client: &str) -> Option<u64> {
        self.state
            .lock()
            .wait(&subject(&format!("token|{client}")), MAX_TOKEN_FAILURES)
    }

    /// `client` presented a token that is neither ours nor the static one.
    fn token_failed(&self, client: &str) {
        self.state.lock().add(&subject(&format!("token|{client}")), 1);
    }

    fn gate(&self, cfg: &crate::config::AdminConfig) -> &PasswordGate {
        self.gate
            .get_or_init(|| PasswordGate::new(cfg.password_concurrency, cfg.password_queue))
    }

    /// Check `password` against the user `user_id`'s hash as the user
    /// `user_id` from `client`: counted (per user and per address) before
    /// it is checked, refused with `429` past the limits, and given back
    /// when right.
    pub async fn check_password(
        &self,
        state: &AdminState,
        user_id: &str,
        client: &str,
        password: String,
    ) -> Result<bool, ApiError> {
        let (pair, ip) = (format!("password|{user_id}"), format!("ip:{client}"));
        self.begin(&pair, &ip).map_err(ApiError::Throttled)?;
        if password.len() > store::fields::MAX_PASSWORD {
            return Ok(false);
        }
        let id = user_id.to_string();
        let hash = state.db(move |c| store::users::hash_of(c, &id)).await?;
        let ok = self.passwords(state).verify(password, hash).await?;
        if ok {
            self.succeeded(&pair, &ip);
        }
        Ok(ok)
    }

    /// The gate argon2 work goes through (sized by `admin.password_*`).
    pub fn passwords(&self, state: &AdminState) -> Passwords<'_> {
        Passwords(self.gate(&state.app.config.file.admin))
    }
}

/// Argon2 through the [`PasswordGate`].
pub struct Passwords<'a>(&'a PasswordGate);

impl Passwords<'_> {
    /// Whether `password` matches `hash`.
    pub async fn verify(&self, password: String, hash: String) -> Result<bool, ApiError> {
        self.0.run(move || store::users::check_password(&password, &hash)).await
    }

    /// Hash a new password (checked for length already).
    pub async fn hash(&self, password: String) -> Result<String, ApiError> {
        self.0
            .run(move || store::users::hash_password(&password))
            .await?
            .map_err(ApiError::from)
    }
}

/// The client of an admin request: the peer, or behind a trusted reverse
/// proxy the address it names.
pub fn client_of(state: &AdminState, peer: Option<SocketAddr>, headers: &axum::http::HeaderMap) -> String {
    match peer {
        Some(p) => state.app.trusted_proxies.client_ip(p.ip(), headers).to_string(),
        None => "unknown".into(),
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
        let claims = match state.tokens.verify(token) {
            Ok(claims) => claims,
            Err(Signed::Yes) => return Err(ApiError::BadToken),
            Err(Signed::No) => {
                // Possibly a guess at the static token: throttled per
                // address like logins, counted before it is compared.
                let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
                let client = client_of(state, peer, &parts.headers);
                if let Some(wait) = state.throttle.token_wait(&client) {
                    return Err(ApiError::Throttled(wait));
                }
                if state.tokens.is_admin_token(token) {
                    return Ok(Caller {
                        user_id: "admin-token".into(),
                        username: "admin-token".into(),
                        role: Role::Admin,
                    });
                }
                state.throttle.token_failed(&client);
                tracing::warn!(ip = %client, "Admin API: a bearer token that is neither a login token nor the admin token.");
                return Err(ApiError::BadToken);
            }
        };
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
    // The throttle keeps a hash of the pair, never the name itself.
    let (pair, ip) = (format!("login|{}|{client}", body.username), format!("ip:{client}"));
    state.throttle.begin(&pair, &ip).map_err(ApiError::Throttled)?;
    let fail = || {
        tracing::warn!(username = %LogName(&body.username), ip = %client, "Failed admin login.");
        ApiError::BadLogin
    };
    // No user has such a name, and no password is that long: refused
    // without a lookup or argon2 (it tells nothing about real accounts).
    if !store::users::valid_username(&body.username) || body.password.len() > store::fields::MAX_PASSWORD {
        return Err(fail());
    }
    // The hash is read under the database lock; argon2 runs without it.
    let name = body.username.clone();
    let (id, hash) = state.db(move |c| store::users::login_hash(c, &name)).await?;
    let matches = state
        .throttle
        .passwords(&state)
        .verify(body.password.clone(), hash)
        .await?;
    let user = match id.filter(|_| matches) {
        Some(id) => Some(state.db(move |c| store::users::get(c, &id)).await?),
        None => None,
    };
    let Some(user) = user.filter(|u| !u.disabled) else {
        return Err(fail());
    };
    state.throttle.succeeded(&pair, &ip);
    let (token, expires_at) = state.tokens.issue(&user)?;
    Ok(Json(json!({"token": token, "expires_at": expires_at, "user": user})))
}

/// `GET /api/me`
pub async fn me(caller: Caller) -> Json<Value> {
    Json(json!({"id": caller.user_id, "username": caller.username, "role": caller.role}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throttle_map_stays_bounded_and_keeps_hashes() {
        let mut st = ThrottleState::default();
        for i in 0..MAX_SUBJECTS + 500 {
            st.add(&subject(&format!("login|{}|10.0.0.{i}", "x".repeat(100))), 1);
        }
        assert!(st.counts.len() <= MAX_SUBJECTS, "{}", st.counts.len());
        // A give-back for a subject never seen adds nothing.
        let n = st.counts.len();
        st.add(&subject("ip:1.2.3.4"), -1);
        assert_eq!(st.counts.len(), n);
    }

    #[test]
    fn log_names_are_cut_escaped_and_hashed() {
        assert_eq!(LogName("alice").to_string(), "alice");
        let shown = LogName(&format!("{}\n", "z".repeat(100_000))).to_string();
        assert!(shown.len() < 100, "{shown}");
        assert!(shown.starts_with(&"z".repeat(64)) && !shown.contains('\n'), "{shown}");
        assert_ne!(
            shown,
            LogName(&"z".repeat(100_000)).to_string(),
            "told apart by the hash"
        );
    }

    #[tokio::test]
    async fn the_password_gate_refuses_past_its_queue() {
        let gate = Arc::new(PasswordGate::new(1, 1));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let running = tokio::spawn({
            let gate = gate.clone();
            async move { gate.run(move || rx.recv().is_ok()).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let waiting = tokio::spawn({
            let gate = gate.clone();
            async move { gate.run(|| true).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(matches!(gate.run(|| true).await, Err(ApiError::Throttled(1))));
        tx.send(()).unwrap();
        assert!(running.await.unwrap().unwrap());
        assert!(waiting.await.unwrap().unwrap());
        assert_eq!(gate.waiting.load(Ordering::SeqCst), 0);
    }
}
