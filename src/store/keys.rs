//! Gateway keys: what clients present. Stored as SHA-256 of the secret; the
//! secret itself is shown once, at creation.

use super::StoreError;
use crate::clock::now_unix;
use rand::{Rng, distr::Alphanumeric};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// The prefix every gateway key secret starts with.
pub const KEY_PREFIX: &str = "fg_";

/// A gateway key record (never the secret).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct GatewayKey {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub masked: String,
    pub permissions: Vec<String>,
    pub allowed_routes: Vec<String>,
    pub allowed_models: Vec<String>,
    pub expires_at: Option<i64>,
    pub enabled: bool,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
    /// Requests per minute across all routes; `None` = unlimited.
    pub rpm: Option<u64>,
    /// Tokens (prompt + completion) per minute; `None` = unlimited.
    pub tpm: Option<u64>,
    /// Tokens allowed per `quota_period`; `None` = unlimited.
    pub token_quota: Option<u64>,
    pub quota_period: QuotaPeriod,
    /// Money per period (`budget`); `None` = unlimited.
    pub budget: Option<crate::budget::Budget>,
    /// The user who owns the key, by id; `None` for keys only an admin manages.
    pub owner_id: Option<String>,
    /// Fields an admin set on this key; its owner may not change them.
    pub admin_locked: Vec<String>,
    /// The owner's token quota, shared by all their keys (data plane only).
    #[serde(skip)]
    pub user_quota: Option<UserQuota>,
    /// The owner's budget, shared by all their keys (data plane only):
    /// its scope and amount.
    #[serde(skip)]
    pub user_budget: Option<(String, crate::budget::Budget)>,
    /// `allowed_models` compiled once when the data plane loads the key.
    #[serde(skip)]
    pub model_matcher: ModelMatcher,
}

/// Compiled `allowed_models` globs. Compares equal to any other: it is
/// derived from `allowed_models`, which is compared.
#[derive(Debug, Clone, Default)]
pub struct ModelMatcher(Option<std::sync::Arc<globset::GlobSet>>);

impl PartialEq for ModelMatcher {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for ModelMatcher {}

impl ModelMatcher {
    /// Compile `globs`; invalid ones match nothing, and so does the empty
    /// entry a ceiling's clamp leaves when nothing is in common (it must not
    /// match the empty name a request without a model is checked with).
    pub fn compile(globs: &[String]) -> Self {
        let mut b = globset::GlobSetBuilder::new();
        for g in globs.iter().filter(|g| !g.is_empty()) {
            if let Ok(glob) = globset::Glob::new(g) {
                b.add(glob);
            }
        }
        ModelMatcher(b.build().ok().map(std::sync::Arc::new))
    }

    /// Whether `model` matches; `None` when nothing was compiled.
    pub fn matches(&self, model: &str) -> Option<bool> {
        self.0.as_ref().map(|set| set.is_match(model))
    }
}

/// A user's token quota as the data plane counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserQuota {
    /// The quota tracker's scope for this user.
    pub scope: String,
    pub tokens: u64,
    pub period: QuotaPeriod,
}

/// The fields of a key that limit what it can do (what ceilings and admin
/// locks are about).
pub const LIMIT_FIELDS: [&str; 8] = [
    "permissions",
    "allowed_routes",
    "allowed_models",
    "rpm",
    "tpm",
    "token_quota",
    "quota_period",
    "budget",
];

/// The calendar period (UTC) a token quota covers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaPeriod {
    #[default]
    Day,
    Month,
}

impl QuotaPeriod {
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaPeriod::Day => "day",
            QuotaPeriod::Month => "month",
        }
    }

    fn parse(s: Option<String>) -> Self {
        if s.as_deref() == Some("month") {
            QuotaPeriod::Month
        } else {
            QuotaPeriod::Day
        }
    }

    /// (start, end) of the period holding `now_ms`, in Unix milliseconds:
    /// the same calendar periods (UTC) as budgets'.
    pub fn bounds(self, now_ms: i64) -> (i64, i64) {
        match self {
            QuotaPeriod::Day => crate::budget::BudgetPeriod::Day.bounds(now_ms),
            QuotaPeriod::Month => crate::budget::BudgetPeriod::Month.bounds(now_ms),
        }
    }
}

impl GatewayKey {
    /// Usable now: enabled, not revoked, not expired.
    pub fn is_active(&self, now: i64) -> bool {
        self.enabled && self.revoked_at.is_none() && self.expires_at.is_none_or(|t| t > now)
    }
}

/// What `create` takes.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub name: String,
    pub owner: String,
    pub permissions: Vec<String>,
    pub allowed_routes: Vec<String>,
    pub allowed_models: Vec<String>,
    pub expires_at: Option<i64>,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub token_quota: Option<u64>,
    pub quota_period: QuotaPeriod,
    pub budget: Option<crate::budget::Budget>,
    pub owner_id: Option<String>,
    pub admin_locked: Vec<String>,
}

/// The limit fields of a key being created or changed, to check them
/// against a user's ceilings (and fill in what the key leaves open).
pub struct LimitsMut<'a> {
    pub permissions: &'a mut Vec<String>,
    pub allowed_routes: &'a mut Vec<String>,
    pub allowed_models: &'a mut Vec<String>,
    pub rpm: &'a mut Option<u64>,
    pub tpm: &'a mut Option<u64>,
}

/// `limits_mut` for both key shapes, which name the fields alike.
macro_rules! limits_mut {
    ($($key:ty),*) => {$(
        impl $key {
            pub fn limits_mut(&mut self) -> LimitsMut<'_> {
                LimitsMut {
                    permissions: &mut self.permissions,
                    allowed_routes: &mut self.allowed_routes,
                    allowed_models: &mut self.allowed_models,
                    rpm: &mut self.rpm,
                    tpm: &mut self.tpm,
                }
            }
        }
    )*};
}
limits_mut!(GatewayKey, NewKey);

/// The [`LIMIT_FIELDS`] whose flag is set, in order.
fn fields_where(set: [bool; 8]) -> Vec<&'static str> {
    LIMIT_FIELDS
        .iter()
        .zip(set)
        .filter(|(_, s)| *s)
        .map(|(f, _)| *f)
        .collect()
}

impl NewKey {
    /// Mark every limit this key sets as an admin's: its owner cannot lift it
    /// (an expiry included: the owner may only bring it closer).
    pub fn lock_limits(&mut self) {
        self.admin_locked = fields_where([
            !self.permissions.is_empty(),
            !self.allowed_routes.is_empty(),
            !self.allowed_models.is_empty(),
            self.rpm.is_some(),
            self.tpm.is_some(),
            self.token_quota.is_some(),
            self.token_quota.is_some(), // the period goes with the quota
            self.budget.is_some(),
        ])
        .into_iter()
        .map(str::to_string)
        .collect();
        if self.expires_at.is_some() {
            self.admin_locked.push(EXPIRES_AT.into());
        }
    }
}

/// Admin decisions on a key besides its limits, kept in `admin_locked` too:
/// a key an admin disabled stays disabled for its owner, and an expiry an
/// admin set may only be brought closer by its owner.
pub const ENABLED: &str = "enabled";
pub const EXPIRES_AT: &str = "expires_at";

impl GatewayKey {
    pub fn is_locked(&self, field: &str) -> bool {
        self.admin_locked.iter().any(|f| f == field)
    }

    /// Mark (or with `on == false` unmark) `field` as an admin's decision.
    pub fn set_locked(&mut self, field: &str, on: bool) {
        self.admin_locked.retain(|f| f != field);
        if on {
            self.admin_locked.push(field.to_string());
        }
    }

    /// Whether `patch`, sent by the key's owner, would undo an admin's
    /// `enabled` or `expires_at` decision; the reason if so.
    pub fn owner_may_not(&self, patch: &KeyPatch) -> Option<String> {
        if patch.enabled == Some(true) && !self.enabled && self.is_locked(ENABLED) {
            return Some("enabled: an admin disabled this key; ask an admin to enable it".into());
        }
        if let (Some(new), true) = (patch.expires_at, self.is_locked(EXPIRES_AT)) {
            let admins = self.expires_at;
            let closer = matches!((new, admins), (Some(n), Some(a)) if n <= a) || admins.is_none();
            if !closer {
                return Some(
                    "expires_at: an admin set this key's expiry; you may bring it closer, not later or remove it"
                        .into(),
                );
            }
        }
        None
    }

    /// After an admin's `patch`: their `enabled: false` and their expiry
    /// stick; `enabled: true` or removing the expiry lifts the lock.
    pub fn lock_decisions(&mut self, patch: &KeyPatch) {
        if let Some(e) = patch.enabled {
            self.set_locked(ENABLED, !e);
        }
        if let Some(e) = patch.expires_at {
            self.set_locked(EXPIRES_AT, e.is_some());
        }
    }
}

/// Keys (not revoked) owned by user `user_id`.
pub fn count_owned(conn: &Connection, user_id: &str) -> Result<usize, StoreError> {
    let n: i64 = conn.query_row(
        "SELECT COUNT(*) FROM gateway_keys WHERE owner_id = ?1 AND revoked_at IS NULL",
        [user_id],
        |r| r.get(0),
    )?;
    Ok(usize::try_from(n).unwrap_or(usize::MAX))
}

/// Check a new key's name, owner and lists against their bounds.
fn validate_new(new: &NewKey) -> Result<(), StoreError> {
    super::fields::name("name", &new.name, super::fields::MAX_NAME)?;
    if !new.owner.is_empty() {
        super::fields::name("owner", &new.owner, super::fields::MAX_OWNER)?;
    }
    if let Some(b) = &new.budget {
        b.check().map_err(StoreError::Invalid)?;
    }
    super::fields::limit_lists(&new.permissions, &new.allowed_routes, &new.allowed_models)
}

/// SHA-256 of a presented secret, the lookup key of the key cache.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

fn random_base62(len: usize) -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// `fg_ab12…wx9z`.
pub fn mask_secret(secret: &str) -> String {
    let n = secret.len();
    if n < 12 {
        return "…".into();
    }
    format!("{}…{}", &secret[..7], &secret[n - 4..])
}

/// Create a key; returns the record and the secret (the only time it exists in clear).
pub fn create(conn: &Connection, new: &NewKey) -> Result<(GatewayKey, String), StoreError> {
    validate_new(new)?;
    let secret = format!("{KEY_PREFIX}{}", random_base62(32));
    let id = format!("key_{}", random_base62(12).to_ascii_lowercase());
    // An owner that names a user is that user, by id from now on.
    let owner_id = match &new.owner_id {
        Some(id) => Some(id.clone()),
        None if new.owner.is_empty() => None,
        None => super::users::find_by_name(conn, &new.owner)?.map(|u| u.id),
    };
    let key = GatewayKey {
        id,
        name: new.name.clone(),
        owner: new.owner.clone(),
        masked: mask_secret(&secret),
        permissions: new.permissions.clone(),
        allowed_routes: new.allowed_routes.clone(),
        allowed_models: new.allowed_models.clone(),
        expires_at: new.expires_at,
        enabled: true,
        created_at: now_unix(),
        revoked_at: None,
        rpm: new.rpm,
        tpm: new.tpm,
        token_quota: new.token_quota,
        quota_period: new.quota_period,
        budget: new.budget,
        owner_id,
        admin_locked: new.admin_locked.clone(),
        user_quota: None,
        user_budget: None,
        model_matcher: ModelMatcher::default(),
    };
    conn.execute(
        "INSERT INTO gateway_keys (id, name, owner, secret_sha256, masked, permissions,
            allowed_routes, allowed_models, expires_at, enabled, created_at, rpm, tpm, token_quota,
            quota_period, owner_id, admin_locked, budget)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 1, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
        params![
            key.id,
            key.name,
            key.owner,
            hash_secret(&secret).as_slice(),
            key.masked,
            json_list(&key.permissions),
            json_list(&key.allowed_routes),
            json_list(&key.allowed_models),
            key.expires_at,
            key.created_at,
            key.rpm.map(|v| v as i64),
            key.tpm.map(|v| v as i64),
            key.token_quota.map(|v| v as i64),
            key.quota_period.as_str(),
            key.owner_id,
            json_list(&key.admin_locked),
            budget_json(key.budget.as_ref()),
        ],
    )?;
    Ok((key, secret))
}

/// A string list as stored: a JSON array.
fn json_list(v: &[String]) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

fn parse_list(s: String) -> Vec<String> {
    serde_json::from_str(&s).unwrap_or_default()
}

/// A budget as stored: JSON `{"amount", "period"}`, or NULL.
fn budget_json(b: Option<&crate::budget::Budget>) -> Option<String> {
    b.and_then(|b| serde_json::to_string(b).ok())
}

/// A stored budget; one that does not read (a hand edit) is none, and so
/// is one out of bounds.
fn parse_budget(s: Option<String>) -> Option<crate::budget::Budget> {
    s.and_then(|t| serde_json::from_str::<crate::budget::Budget>(&t).ok())
        .filter(|b| b.check().is_ok())
}

const COLUMNS: &str = "id, name, owner, masked, permissions, allowed_routes, allowed_models,
    expires_at, enabled, created_at, revoked_at, secret_sha256, prev_secret_sha256, prev_valid_until, rpm, tpm, token_quota, quota_period,
    owner_id, admin_locked, budget";

/// A secret hash the key answers to; the previous one only until a time.
pub struct KeyHashes {
    pub current: [u8; 32],
    pub previous: Option<([u8; 32], i64)>,
}

/// A key row: the record, its secret hash, and the previous hash with its deadline.
type KeyRow = (GatewayKey, Vec<u8>, Option<(Vec<u8>, i64)>);

fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRow> {
    let prev: Option<Vec<u8>> = row.get(12)?;
    let until: Option<i64> = row.get(13)?;
    Ok((
        GatewayKey {
            id: row.get(0)?,
            name: row.get(1)?,
            owner: row.get(2)?,
            masked: row.get(3)?,
            permissions: parse_list(row.get(4)?),
            allowed_routes: parse_list(row.get(5)?),
            allowed_models: parse_list(row.get(6)?),
            expires_at: row.get(7)?,
            enabled: row.get::<_, i64>(8)? != 0,
            created_at: row.get(9)?,
            revoked_at: row.get(10)?,
            rpm: row.get::<_, Option<i64>>(14)?.map(|v| v as u64),
            tpm: row.get::<_, Option<i64>>(15)?.map(|v| v as u64),
            token_quota: row.get::<_, Option<i64>>(16)?.map(|v| v as u64),
            quota_period: QuotaPeriod::parse(row.get(17)?),
            owner_id: row.get(18)?,
            admin_locked: parse_list(row.get(19)?),
            budget: parse_budget(row.get(20)?),
            user_quota: None,
            user_budget: None,
            model_matcher: ModelMatcher::default(),
        },
        row.get(11)?,
        prev.zip(until),
    ))
}

/// Every key with its secret hashes, for the data plane's cache.
pub fn all_with_hashes(conn: &Connection) -> Result<Vec<(GatewayKey, KeyHashes)>, StoreError> {
    let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM gateway_keys"))?;
    let rows = stmt.query_map([], from_row)?;
    let mut out = Vec::new();
    for row in rows {
        let (key, hash, prev) = row?;
        if let Ok(current) = <[u8; 32]>::try_from(hash.as_slice()) {
            let previous = prev.and_then(|(h, until)| <[u8; 32]>::try_from(h.as_slice()).ok().map(|h| (h, until)));
            out.push((key, KeyHashes { current, previous }));
        }
    }
    Ok(out)
}

/// Every key, oldest first.
pub fn list(conn: &Connection) -> Result<Vec<GatewayKey>, StoreError> {
    let mut keys: Vec<GatewayKey> = all_with_hashes(conn)?.into_iter().map(|(k, _)| k).collect();
    keys.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    Ok(keys)
}

/// One key by id.
pub fn get(conn: &Connection, id: &str) -> Result<GatewayKey, StoreError> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM gateway_keys WHERE id = ?1"),
        [id],
        from_row,
    )
    .optional()?
    .map(|(k, _, _)| k)
    .ok_or_else(|| StoreError::NotFound(format!("no gateway key with id {id:?}")))
}

/// Revoke a key: it stops working at the data plane's next refresh.
pub fn revoke(conn: &Connection, id: &str) -> Result<GatewayKey, StoreError> {
    let n = conn.execute(
        "UPDATE gateway_keys SET enabled = 0, revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
        params![id, now_unix()],
    )?;
    if n == 0 {
        get(conn, id)?; // NotFound if missing
        return Err(StoreError::Invalid(format!("key {id:?} is already revoked")));
    }
    get(conn, id)
}

/// What `update` may change; `None` leaves a field alone.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPatch {
    pub name: Option<String>,
    pub permissions: Option<Vec<String>>,
    pub allowed_routes: Option<Vec<String>>,
    pub allowed_models: Option<Vec<String>>,
    /// `Some(None)` (JSON `null`) removes the expiry.
    #[serde(default, deserialize_with = "present")]
    pub expires_at: Option<Option<i64>>,
    pub enabled: Option<bool>,
    /// `null` removes the limit.
    #[serde(default, deserialize_with = "present_u64")]
    pub rpm: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present_u64")]
    pub tpm: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present_u64")]
    pub token_quota: Option<Option<u64>>,
    pub quota_period: Option<QuotaPeriod>,
    /// `{amount, period}`; `null` removes it.
    #[serde(default, deserialize_with = "present_budget")]
    pub budget: Option<Option<crate::budget::Budget>>,
}

fn present_budget<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<crate::budget::Budget>>, D::Error> {
    <Option<crate::budget::Budget> as serde::Deserialize>::deserialize(d).map(Some)
}

fn present_u64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
    <Option<u64> as serde::Deserialize>::deserialize(d).map(Some)
}

/// A field that is present (even as `null`) becomes `Some(value)`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<i64>>, D::Error> {
    <Option<i64> as serde::Deserialize>::deserialize(d).map(Some)
}

/// Apply `patch` to key `id`.
pub fn update(conn: &Connection, id: &str, patch: &KeyPatch) -> Result<GatewayKey, StoreError> {
    let mut key = get(conn, id)?;
    apply(&mut key, patch)?;
    save(conn, &key)?;
    Ok(key)
}

/// Apply `patch` to `key` in memory (to check the result before saving).
pub fn apply(key: &mut GatewayKey, patch: &KeyPatch) -> Result<(), StoreError> {
    use super::fields;
    if let Some(n) = &patch.name {
        fields::name("name", n, fields::MAX_NAME)?;
        key.name = n.clone();
    }
    if let Some(p) = &patch.permissions {
        fields::list("permissions", p, fields::MAX_TAGS, fields::MAX_TAG)?;
        key.permissions = p.clone();
    }
    if let Some(r) = &patch.allowed_routes {
        fields::list("allowed_routes", r, fields::MAX_LIST, fields::MAX_ENTRY)?;
        key.allowed_routes = r.clone();
    }
    if let Some(m) = &patch.allowed_models {
        fields::list("allowed_models", m, fields::MAX_LIST, fields::MAX_ENTRY)?;
        for g in m {
            globset::Glob::new(g).map_err(|e| StoreError::Invalid(format!("allowed_models: {e}")))?;
        }
        key.allowed_models = m.clone();
    }
    if let Some(e) = patch.expires_at {
        key.expires_at = e;
    }
    if let Some(e) = patch.enabled {
        key.enabled = e;
    }
    if let Some(v) = patch.rpm {
        key.rpm = v;
    }
    if let Some(v) = patch.tpm {
        key.tpm = v;
    }
    if let Some(v) = patch.token_quota {
        key.token_quota = v;
    }
    if let Some(v) = patch.quota_period {
        key.quota_period = v;
    }
    if let Some(b) = patch.budget {
        if let Some(b) = &b {
            b.check().map_err(StoreError::Invalid)?;
        }
        key.budget = b;
    }
    Ok(())
}

/// The fields `patch` changes that limit the key (see [`LIMIT_FIELDS`]).
pub fn limit_fields(patch: &KeyPatch) -> Vec<&'static str> {
    fields_where([
        patch.permissions.is_some(),
        patch.allowed_routes.is_some(),
        patch.allowed_models.is_some(),
        patch.rpm.is_some(),
        patch.tpm.is_some(),
        patch.token_quota.is_some(),
        patch.quota_period.is_some(),
        patch.budget.is_some(),
    ])
}

/// Write every mutable field of `key` back.
pub fn save(conn: &Connection, key: &GatewayKey) -> Result<(), StoreError> {
    let id = &key.id;
    conn.execute(
        "UPDATE gateway_keys SET name = ?2, permissions = ?3, allowed_routes = ?4, allowed_models = ?5,
            expires_at = ?6, enabled = ?7, rpm = ?8, tpm = ?9, token_quota = ?10, quota_period = ?11,
            admin_locked = ?12, budget = ?13
         WHERE id = ?1",
        params![
            id,
            key.name,
            json_list(&key.permissions),
            json_list(&key.allowed_routes),
            json_list(&key.allowed_models),
            key.expires_at,
            key.enabled,
            key.rpm.map(|v| v as i64),
            key.tpm.map(|v| v as i64),
            key.token_quota.map(|v| v as i64),
            key.quota_period.as_str(),
            json_list(&key.admin_locked),
            budget_json(key.budget.as_ref()),
        ],
    )?;
    Ok(())
}

/// Revoke every key a user owns (the user is being deleted); how many.
pub fn revoke_owned(conn: &Connection, user_id: &str) -> Result<usize, StoreError> {
    Ok(conn.execute(
        "UPDATE gateway_keys SET enabled = 0, revoked_at = ?2 WHERE owner_id = ?1 AND revoked_at IS NULL",
        params![user_id, now_unix()],
    )?)
}

/// The data plane's change counter: bumped by triggers on every write to
/// keys or users, and nothing else (audit rows do not move it).
pub fn change_version(conn: &Connection) -> Result<i64, StoreError> {
    Ok(
        conn.query_row("SELECT version FROM change_counter WHERE name = 'keys'", [], |r| {
            r.get(0)
        })?,
    )
}

/// The longest a rotated-out secret may keep working: a grace period is
/// for clients to pick up the new secret, not a second key.
pub const MAX_ROTATE_GRACE_SECS: i64 = 30 * 24 * 3600;

/// Give key `id` a new secret. The old one keeps working for `grace_secs`
/// (0: stops at once; at most [`MAX_ROTATE_GRACE_SECS`]). Returns the
/// record and the new secret.
pub fn rotate(conn: &Connection, id: &str, grace_secs: i64) -> Result<(GatewayKey, String), StoreError> {
    if !(0..=MAX_ROTATE_GRACE_SECS).contains(&grace_secs) {
        return Err(StoreError::Field(format!(
            "grace_period: at most {} days",
            MAX_ROTATE_GRACE_SECS / 86_400
        )));
    }
    get(conn, id)?;
    let secret = format!("{KEY_PREFIX}{}", random_base62(32));
    let until = (grace_secs > 0).then(|| now_unix() + grace_secs);
    conn.execute(
        "UPDATE gateway_keys SET prev_secret_sha256 = CASE WHEN ?4 IS NULL THEN NULL ELSE secret_sha256 END,
            prev_valid_until = ?4, secret_sha256 = ?2, masked = ?3 WHERE id = ?1",
        params![id, hash_secret(&secret).as_slice(), mask_secret(&secret), until],
    )?;
    Ok((get(conn, id)?, secret))
}

/// Delete key `id` for good.
pub fn delete(conn: &Connection, id: &str) -> Result<GatewayKey, StoreError> {
    let key = get(conn, id)?;
    conn.execute("DELETE FROM gateway_keys WHERE id = ?1", [id])?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_list_revoke_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let conn = super::super::open(&dir.path().join("t.db")).unwrap();
        let (key, secret) = create(
            &conn,
            &NewKey {
                name: "ci".into(),
                permissions: vec!["chat".into()],
                ..Default::default()
            },
        )
        .unwrap();
        assert!(secret.starts_with("fg_") && secret.len() == 35);
        assert!(secret[3..].bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_eq!(key.masked, format!("{}…{}", &secret[..7], &secret[31..]));
        let all = all_with_hashes(&conn).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].1.current, hash_secret(&secret));
        assert!(all[0].0.is_active(now_unix()));
        let revoked = revoke(&conn, &key.id).unwrap();
        assert!(!revoked.is_active(now_unix()));
        assert!(revoke(&conn, &key.id).is_err());
        assert!(matches!(get(&conn, "nope"), Err(StoreError::NotFound(_))));
    }

    #[test]
    fn owners_cannot_undo_an_admins_enabled_or_expiry() {
        let mut key = GatewayKey {
            enabled: true,
            expires_at: Some(1000),
            ..Default::default()
        };
        let patch = |enabled: Option<bool>, expires_at: Option<Option<i64>>| KeyPatch {
            enabled,
            expires_at,
            ..Default::default()
        };
        // Nothing locked: the owner's to change.
        assert!(key.owner_may_not(&patch(Some(true), Some(None))).is_none());
        key.lock_decisions(&patch(Some(false), Some(Some(1000))));
        key.enabled = false;
        assert!(key.owner_may_not(&patch(Some(true), None)).is_some());
        assert!(key.owner_may_not(&patch(Some(false), None)).is_none());
        assert!(key.owner_may_not(&patch(None, Some(None))).is_some());
        assert!(key.owner_may_not(&patch(None, Some(Some(1001)))).is_some());
        assert!(key.owner_may_not(&patch(None, Some(Some(999)))).is_none());
        key.lock_decisions(&patch(Some(true), Some(None)));
        assert!(key.admin_locked.is_empty(), "{:?}", key.admin_locked);
    }

    #[test]
    fn the_empty_placeholder_matches_no_model() {
        let m = ModelMatcher::compile(&[String::new()]);
        assert_eq!(m.matches(""), Some(false));
        assert_eq!(m.matches("gpt-4o"), Some(false));
    }
}
