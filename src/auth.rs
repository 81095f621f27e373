//! Gateway-key authentication for the data plane.
//!
//! Keys live in SQLite; the proxy checks them against an in-memory map of
//! `sha256(secret) -> key` that [`KeyCache::refresh`] rebuilds whenever the
//! database changes (another process such as the CLI wrote to it). The request
//! path never touches the database.

use crate::store::{
    self,
    keys::{GatewayKey, hash_secret},
};
use arc_swap::ArcSwap;
use http::HeaderMap;
use parking_lot::Mutex;
use rusqlite::Connection;
use std::{collections::HashMap, sync::Arc};

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing gateway key: send it as `Authorization: Bearer`, `x-api-key`, `x-goog-api-key` or `?key=`")]
    Missing,
    #[error("invalid gateway key")]
    Invalid,
    #[error("this gateway key is revoked, disabled or expired")]
    Inactive,
    #[error("this gateway key may not use route {0:?}")]
    RouteNotAllowed(String),
    #[error("this gateway key may not use model {0:?}")]
    ModelNotAllowed(String),
    #[error("this gateway key lacks a permission this route requires (one of: {0})")]
    MissingPermission(String),
}

impl AuthError {
    pub fn status(&self) -> u16 {
        match self {
            Self::Missing | Self::Invalid | Self::Inactive => 401,
            _ => 403,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Missing => "missing_api_key",
            Self::Invalid | Self::Inactive => "invalid_api_key",
            _ => "permission_denied",
        }
    }
}

/// Where a credential came from, so it can be stripped before forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialSource {
    Bearer,
    XApiKey,
    XGoogApiKey,
    QueryKey,
}

/// The credential a client presented, whichever way its SDK sends it.
pub fn extract_credential<'a>(
    headers: &'a HeaderMap,
    query: Option<&'a str>,
) -> Option<(CredentialSource, std::borrow::Cow<'a, str>)> {
    if let Some(v) = headers.get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") {
            return Some((CredentialSource::Bearer, v[7..].trim().into()));
        }
    }
    if let Some(v) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some((CredentialSource::XApiKey, v.trim().into()));
    }
    if let Some(v) = headers.get("x-goog-api-key").and_then(|v| v.to_str().ok()) {
        return Some((CredentialSource::XGoogApiKey, v.trim().into()));
    }
    query.and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "key")
            .map(|(_, v)| (CredentialSource::QueryKey, std::borrow::Cow::Owned(v.into_owned())))
    })
}

/// Whether `text` holds something shaped like a gateway key (`fg_` and 32
/// base62 characters), wherever in the text and however it is spelt: such a
/// value never goes upstream. Spellings found: as is; percent-encoded, in
/// part or whole, up to three layers deep (`fg%5F…`, `%66%67%5f…`,
/// `fg%255F…`); the prefix in any case (`FG_`, `Fg_`). The 32 characters
/// after it are base62, where case is part of the key, so they are matched
/// as written (an ASCII letter or digit each). A false positive only drops
/// one parameter or header, so the test leans toward finding.
pub fn holds_gateway_key(text: &[u8]) -> bool {
    if raw_holds_key(text) {
        return true;
    }
    // Percent-decoding only when there is something to decode.
    let mut layer = std::borrow::Cow::Borrowed(text);
    for _ in 0..3 {
        if memchr::memchr(b'%', &layer).is_none() {
            return false;
        }
        let decoded: Vec<u8> = percent_encoding::percent_decode(&layer).collect();
        if decoded.len() == layer.len() {
            return false; // nothing was a valid escape
        }
        if raw_holds_key(&decoded) {
            return true;
        }
        layer = std::borrow::Cow::Owned(decoded);
    }
    false
}

/// [`holds_gateway_key`] on the bytes as they are: an `fg_` in any case,
/// then 32 ASCII letters or digits.
fn raw_holds_key(text: &[u8]) -> bool {
    const BODY: usize = 32;
    let prefix = store::keys::KEY_PREFIX.as_bytes();
    let underscore = prefix.len() - 1;
    memchr::memchr_iter(b'_', text).any(|at| {
        at >= underscore
            && text[at - underscore..at].eq_ignore_ascii_case(&prefix[..underscore])
            && text
                .get(at + 1..at + 1 + BODY)
                .is_some_and(|body| body.iter().all(u8::is_ascii_alphanumeric))
    })
}

/// Whether a request header carries a gateway key anywhere: in its name, in
/// its value (every spelling of [`holds_gateway_key`]; `Cookie` values
/// included), or inside `Authorization: Basic` (base64 of `user:password`,
/// where SDKs that take a URL with credentials put a key).
pub fn header_holds_gateway_key(name: &[u8], value: &[u8]) -> bool {
    use base64::Engine as _;
    if holds_gateway_key(name) || holds_gateway_key(value) {
        return true;
    }
    let Some(basic) = value
        .get(..6)
        .filter(|p| p.eq_ignore_ascii_case(b"basic "))
        .map(|_| value[6..].trim_ascii())
    else {
        return false;
    };
    [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::STANDARD_NO_PAD,
    ]
    .iter()
    .filter_map(|engine| engine.decode(basic).ok())
    .any(|plain| holds_gateway_key(&plain))
}

/// A key, and until when this hash of it is accepted (previous secrets during
/// a rotation grace period).
type KeyMap = HashMap<[u8; 32], (Arc<GatewayKey>, Option<i64>)>;

/// The data plane's view of the gateway keys.
pub struct KeyCache {
    keys: ArcSwap<KeyMap>,
    /// The connection used for refreshes and the `data_version` it last saw.
    db: Mutex<(Connection, i64)>,
}

impl KeyCache {
    /// Load every key from the database at `conn`.
    pub fn load(conn: Connection) -> Result<Self, store::StoreError> {
        let cache = KeyCache {
            keys: ArcSwap::from_pointee(HashMap::new()),
            db: Mutex::new((conn, -1)),
        };
        cache.refresh()?;
        Ok(cache)
    }

    /// Rebuild the map if keys or users changed since the last call (a
    /// trigger-maintained counter: audit writes do not count). Blocking: call
    /// from a blocking thread. Returns whether anything was reloaded.
    pub fn refresh(&self) -> Result<bool, store::StoreError> {
        let mut db = self.db.lock();
        let version = store::keys::change_version(&db.0)?;
        if version == db.1 {
            return Ok(false);
        }
        let users: HashMap<String, store::users::User> = store::users::list(&db.0)?
            .into_iter()
            .map(|u| (u.id.clone(), u))
            .collect();
        let mut map = KeyMap::new();
        for (mut key, hashes) in store::keys::all_with_hashes(&db.0)? {
            if let Some(owner) = key.owner_id.as_deref() {
                match users.get(owner) {
                    // A deleted or disabled owner's keys stop at once.
                    None => key.enabled = false,
                    Some(u) if u.disabled => key.enabled = false,
                    Some(u) => store::users::clamp_key(u, &mut key),
                }
            }
            if !key.allowed_models.is_empty() {
                key.model_matcher = store::keys::ModelMatcher::compile(&key.allowed_models);
            }
            let key = Arc::new(key);
            if let Some((prev, until)) = hashes.previous {
                map.insert(prev, (key.clone(), Some(until)));
            }
            map.insert(hashes.current, (key, None));
        }
        self.keys.store(Arc::new(map));
        db.1 = version;
        Ok(true)
    }

    pub fn len(&self) -> usize {
        self.keys.load().len()
    }

    /// Every key (once, even when a previous secret is still accepted).
    pub fn all(&self) -> Vec<Arc<GatewayKey>> {
        let mut out: Vec<Arc<GatewayKey>> = Vec::new();
        for (key, until) in self.keys.load().values() {
            if until.is_none() {
                out.push(key.clone());
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Look up a presented secret.
    pub fn authenticate(&self, secret: &str, now: i64) -> Result<Arc<GatewayKey>, AuthError> {
        let keys = self.keys.load();
        let (key, valid_until) = keys.get(&hash_secret(secret)).ok_or(AuthError::Invalid)?;
        if valid_until.is_some_and(|t| t <= now) {
            return Err(AuthError::Invalid); // a rotated-out secret past its grace period
        }
        if !key.is_active(now) {
            return Err(AuthError::Inactive);
        }
        Ok(key.clone())
    }
}

/// Whether `key` may use `route` (tags and allow-lists). The model is checked
/// separately by [`authorize_model`] once it is known.
pub fn authorize_route(key: &GatewayKey, route: &str, required: &[String]) -> Result<(), AuthError> {
    if !key.allowed_routes.is_empty() && !key.allowed_routes.iter().any(|r| r == route) {
        return Err(AuthError::RouteNotAllowed(route.to_string()));
    }
    if !required.is_empty() && !required.iter().any(|p| key.permissions.contains(p)) {
        return Err(AuthError::MissingPermission(required.join(", ")));
    }
    Ok(())
}

/// Whether `key` may use `model` (its `allowed_models` globs, if any).
pub fn authorize_model(key: &GatewayKey, model: Option<&str>) -> Result<(), AuthError> {
    if key.allowed_models.is_empty() {
        return Ok(());
    }
    let model = model.unwrap_or_default();
    // Keys from the cache carry their globs compiled; others (tests, tools)
    // are compiled here.
    let allowed = key
        .model_matcher
        .matches(model)
        .unwrap_or_else(|| store::keys::ModelMatcher::compile(&key.allowed_models).matches(model) == Some(true));
    if allowed {
        Ok(())
    } else {
        Err(AuthError::ModelNotAllowed(model.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_cache_compiles_model_globs_once() {
        let dir = tempfile::tempdir().unwrap();
        let conn = store::open(&dir.path().join("k.db")).unwrap();
        let new = store::keys::NewKey {
            name: "m".into(),
            allowed_models: vec!["gpt-4*".into(), "claude-?".into()],
            ..Default::default()
        };
        let (_, secret) = store::keys::create(&conn, &new).unwrap();
        let cache = KeyCache::load(store::open(&dir.path().join("k.db")).unwrap()).unwrap();
        let key = cache.authenticate(&secret, 0).unwrap();
        assert_eq!(key.model_matcher.matches("gpt-4o"), Some(true), "compiled at load");
        assert!(authorize_model(&key, Some("claude-3")).is_ok());
        assert!(authorize_model(&key, Some("o1")).is_err());
    }

    #[test]
    fn gateway_key_shapes_are_recognised_anywhere() {
        let key = format!("fg_{}", "a1B2".repeat(8));
        assert!(holds_gateway_key(key.as_bytes()));
        assert!(holds_gateway_key(format!("Bearer {key}").as_bytes()));
        assert!(holds_gateway_key(format!("x=1&token={key}").as_bytes()));
        assert!(!holds_gateway_key(b"fg_short"));
        assert!(!holds_gateway_key(b"sk-proj-fg_notakey"));
        assert!(!holds_gateway_key(b""));
        // Other spellings of the same key.
        let body = "a1B2".repeat(8);
        for spelt in [
            format!("fg%5F{body}"),
            format!("%66%67%5f{body}"),
            format!("fg%255F{body}"),
            format!("FG_{body}"),
            format!("Fg%5f{body}"),
            format!("fg_%61{}", &body[1..]),
        ] {
            assert!(holds_gateway_key(spelt.as_bytes()), "{spelt}");
        }
        assert!(!holds_gateway_key(format!("fg%5G{body}").as_bytes()));
        assert!(!holds_gateway_key(b"%%%%"));
    }

    #[test]
    fn gateway_keys_are_found_in_header_names_and_basic_credentials() {
        use base64::Engine as _;
        let key = format!("fg_{}", "a1B2".repeat(8));
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("user:{key}"));
        assert!(header_holds_gateway_key(
            b"authorization",
            format!("Basic {basic}").as_bytes()
        ));
        assert!(header_holds_gateway_key(b"cookie", format!("a=1; fg={key}").as_bytes()));
        assert!(header_holds_gateway_key(key.to_ascii_lowercase().as_bytes(), b"1"));
        assert!(!header_holds_gateway_key(b"authorization", b"Basic dXNlcjpwYXNz"));
    }
    use http::HeaderValue;

    #[test]
    fn credentials_from_every_sdk_style() {
        let mut h = HeaderMap::new();
        assert!(extract_credential(&h, Some("a=1")).is_none());
        let (src, v) = extract_credential(&h, Some("a=1&key=fg_q")).unwrap();
        assert_eq!((src, v.as_ref()), (CredentialSource::QueryKey, "fg_q"));
        h.insert("x-goog-api-key", HeaderValue::from_static("fg_g"));
        assert_eq!(extract_credential(&h, None).unwrap().1, "fg_g");
        h.insert("x-api-key", HeaderValue::from_static("fg_x"));
        assert_eq!(extract_credential(&h, None).unwrap().1, "fg_x");
        h.insert("authorization", HeaderValue::from_static("Bearer fg_b"));
        let (src, v) = extract_credential(&h, None).unwrap();
        assert_eq!((src, v.as_ref()), (CredentialSource::Bearer, "fg_b"));
    }

    #[test]
    fn cache_sees_changes_from_other_connections() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        let cache = KeyCache::load(store::open(&path).unwrap()).unwrap();
        assert!(cache.is_empty());
        let writer = store::open(&path).unwrap();
        let (key, secret) = store::keys::create(
            &writer,
            &store::keys::NewKey {
                name: "a".into(),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(cache.refresh().unwrap());
        assert!(!cache.refresh().unwrap());
        let now = crate::clock::now_unix();
        assert_eq!(cache.authenticate(&secret, now).unwrap().id, key.id);
        assert_eq!(cache.authenticate("fg_wrong", now).unwrap_err(), AuthError::Invalid);
        let (_, rotated) = store::keys::rotate(&writer, &key.id, 60).unwrap();
        cache.refresh().unwrap();
        assert!(
            cache.authenticate(&secret, now).is_ok(),
            "old secret works during the grace period"
        );
        assert!(cache.authenticate(&rotated, now).is_ok());
        assert_eq!(cache.authenticate(&secret, now + 61).unwrap_err(), AuthError::Invalid);
        let (_, rotated_again) = store::keys::rotate(&writer, &key.id, 0).unwrap();
        cache.refresh().unwrap();
        assert_eq!(cache.authenticate(&rotated, now).unwrap_err(), AuthError::Invalid);
        store::keys::revoke(&writer, &key.id).unwrap();
        cache.refresh().unwrap();
        assert_eq!(
            cache.authenticate(&rotated_again, now).unwrap_err(),
            AuthError::Inactive
        );
    }

    #[test]
    fn permissions_and_allow_lists() {
        let key = GatewayKey {
            id: "k".into(),
            name: "n".into(),
            owner: String::new(),
            masked: String::new(),
            permissions: vec!["chat".into()],
            allowed_routes: vec![],
            allowed_models: vec!["gpt-4*".into()],
            enabled: true,
            ..Default::default()
        };
        assert!(authorize_route(&key, "r", &[]).is_ok());
        assert!(authorize_route(&key, "r", &["chat".into(), "embed".into()]).is_ok());
        assert_eq!(authorize_route(&key, "r", &["embed".into()]).unwrap_err().status(), 403);
        assert!(authorize_model(&key, Some("gpt-4o")).is_ok());
        assert!(authorize_model(&key, Some("claude")).is_err());
    }
}
