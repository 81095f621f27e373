//! Admin-service users: username, argon2id password hash, role.

use super::{
    StoreError,
    keys::{GatewayKey, LimitsMut, QuotaPeriod, UserQuota},
};
use crate::clock::now_unix;
use argon2::{
    Argon2,
    password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString, rand_core::OsRng},
};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Admin,
    User,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
        }
    }

    fn parse(s: &str) -> Role {
        if s == "admin" { Role::Admin } else { Role::User }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub username: String,
    pub role: Role,
    pub created_at: i64,
    /// A disabled user cannot log in, and none of their keys work.
    pub disabled: bool,
    /// What the user's own keys may at most be and do (set by admins).
    pub ceilings: Option<Ceilings>,
    /// Bumped when the password, role or status changes: older tokens die.
    #[serde(skip)]
    pub token_version: i64,
}

/// Per-user limits an admin sets: a user's keys are created and changed
/// within them, and the data plane clamps every key to them (so lowering a
/// ceiling applies to existing keys at once). `None` = no ceiling.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Ceilings {
    /// Permission tags the user's keys may hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<Vec<String>>,
    /// Routes the user's keys may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<Vec<String>>,
    /// Model globs the user's keys may use (a key's globs must be among them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rpm: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tpm: Option<u64>,
    /// Tokens per period shared by all of the user's keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_quota: Option<u64>,
    #[serde(default)]
    pub quota_period: QuotaPeriod,
    /// Money per period shared by all of the user's keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<crate::budget::Budget>,
}

/// A list limit: `[]` on a key means "no restriction", so a key with no list
/// gets the ceiling's, and a list outside the ceiling is refused.
fn fit_list(
    field: &str,
    key: &mut Vec<String>,
    ceiling: Option<&Vec<String>>,
    empty_is_all: bool,
) -> Result<(), String> {
    let Some(allowed) = ceiling else {
        return Ok(());
    };
    if key.is_empty() && empty_is_all {
        key.clone_from(allowed);
        return Ok(());
    }
    match key.iter().find(|v| !allowed.contains(v)) {
        Some(v) => Err(format!(
            "{field}: {v:?} is outside your limits (allowed: {})",
            allowed.join(", ")
        )),
        None => Ok(()),
    }
}

fn fit_max(field: &str, key: &mut Option<u64>, max: Option<u64>) -> Result<(), String> {
    match (max, *key) {
        (None, _) => Ok(()),
        (Some(m), None) => {
            *key = Some(m);
            Ok(())
        }
        (Some(m), Some(v)) if v <= m => Ok(()),
        (Some(m), Some(v)) => Err(format!("{field}: {v} is above your limit of {m}")),
    }
}

impl Ceilings {
    /// Check a key a user creates or changes against the ceilings, filling
    /// limits the key leaves open with the ceiling's.
    ///
    /// Permission tags are bounded by the ceiling's, and a ceiling that names
    /// none allows none: tags gate routes, and only an admin opens routes.
    /// `permissions` says whether to check them (a change that leaves them
    /// alone keeps the tags an admin put on the key).
    pub fn fit(&self, key: LimitsMut<'_>, permissions: bool) -> Result<(), String> {
        if permissions {
            fit_list("permissions", key.permissions, Some(&self.tags().to_vec()), false)?;
        }
        fit_list("allowed_routes", key.allowed_routes, self.routes.as_ref(), true)?;
        fit_list("allowed_models", key.allowed_models, self.models.as_ref(), true)?;
        fit_max("rpm", key.rpm, self.max_rpm)?;
        fit_max("tpm", key.tpm, self.max_tpm)
    }

    /// Permission tags the user's keys may carry: the ceiling's, and none
    /// when the admin named none.
    pub fn tags(&self) -> &[String] {
        self.permissions.as_deref().unwrap_or_default()
    }

    /// Check the lists a ceiling holds against the bounds every key has.
    pub fn validate(&self) -> Result<(), StoreError> {
        if let Some(b) = &self.budget {
            b.check().map_err(StoreError::Invalid)?;
        }
        let none = Vec::new();
        super::fields::limit_lists(
            self.permissions.as_ref().unwrap_or(&none),
            self.routes.as_ref().unwrap_or(&none),
            self.models.as_ref().unwrap_or(&none),
        )
    }

    /// The key as the data plane applies it: never beyond the ceilings.
    pub fn clamp(&self, key: &mut GatewayKey, user_id: &str) {
        if let Some(allowed) = &self.permissions {
            key.permissions.retain(|p| allowed.contains(p));
        } else if !key.admin_locked.iter().any(|f| f == "permissions") {
            // Tags the owner put on the key themselves, before ceilings
            // bounded them: not theirs to give.
            key.permissions.clear();
        }
        for (list, allowed) in [
            (&mut key.allowed_routes, &self.routes),
            (&mut key.allowed_models, &self.models),
        ] {
            let Some(allowed) = allowed else { continue };
            if list.is_empty() {
                list.clone_from(allowed);
            } else {
                list.retain(|v| allowed.contains(v));
            }
            if list.is_empty() {
                // Nothing in common: allow nothing (an empty list means "all").
                // The empty entry matches nothing, not even a request without
                // a route or model (see `ModelMatcher::compile`).
                list.push(String::new());
            }
        }
        let min = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        };
        key.rpm = min(key.rpm, self.max_rpm);
        key.tpm = min(key.tpm, self.max_tpm);
        key.user_quota = self.token_quota.map(|tokens| UserQuota {
            scope: format!("user:{user_id}"),
            tokens,
            period: self.quota_period,
        });
        key.user_budget = self.budget.map(|b| (format!("user:{user_id}"), b));
    }
}

/// Clamp `key`, owned by `user`, to what the user may have: their ceilings,
/// or with none set, no permission tags but those an admin put on the key.
pub fn clamp_key(user: &User, key: &mut GatewayKey) {
    let none = Ceilings::default();
    user.ceilings.as_ref().unwrap_or(&none).clamp(key, &user.id);
}

/// Hash a password with argon2id and a random salt (PHC string).
pub fn hash_password(password: &str) -> Result<String, StoreError> {
    let salt = SaltString::generate(&mut OsRng);
    let hashed = Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| StoreError::Invalid(format!("cannot hash password: {e}")));
    return_argon2_memory();
    hashed
}

fn verify_password(password: &str, hash: &str) -> bool {
    let ok = PasswordHash::new(hash).is_ok_and(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok());
    return_argon2_memory();
    ok
}

/// Argon2id works in 19 MiB of memory per hash. mimalloc returns freed
/// memory to the kernel only when the freeing thread allocates again,
/// which an idle admin thread may never do: without this, one login leaves
/// the process 19 MiB larger for good.
fn return_argon2_memory() {
    // SAFETY: `mi_collect` takes no pointers; it only walks mimalloc's own
    // heaps, and is harmless when mimalloc is not the global allocator.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// Whether `name` could be a username (so a login naming anything else can
/// be refused without a lookup or a hash).
pub fn valid_username(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
}

/// Minimum password length for new passwords.
pub const MIN_PASSWORD: usize = 8;

/// Check a new user's name and password before hashing anything.
pub fn check_new(username: &str, password: &str) -> Result<(), StoreError> {
    if !valid_username(username) {
        return Err(StoreError::Field(
            "username: must be 1-64 characters of A-Z a-z 0-9 - _ . @".into(),
        ));
    }
    super::fields::password(password, MIN_PASSWORD)
}

/// Create a user (hashes the password here: CLI and bootstrap).
pub fn create(conn: &Connection, username: &str, password: &str, role: Role) -> Result<User, StoreError> {
    check_new(username, password)?;
    create_hashed(conn, username, &hash_password(password)?, role)
}

/// Create a user whose password was checked with [`check_new`] and hashed
/// already (the admin API hashes off the database lock, a few at a time).
pub fn create_hashed(conn: &Connection, username: &str, hash: &str, role: Role) -> Result<User, StoreError> {
    if !valid_username(username) {
        return Err(StoreError::Field(
            "username: must be 1-64 characters of A-Z a-z 0-9 - _ . @".into(),
        ));
    }
    if find_by_name(conn, username)?.is_some() {
        return Err(StoreError::Conflict(format!("user {username:?} already exists")));
    }
    let user = User {
        id: format!("usr_{}", uuid::Uuid::now_v7().simple()),
        username: username.to_string(),
        role,
        created_at: now_unix(),
        disabled: false,
        ceilings: None,
        token_version: 0,
    };
    conn.execute(
        "INSERT INTO users (id, username, password_hash, role, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![user.id, user.username, hash, role.as_str(), user.created_at],
    )?;
    Ok(user)
}

const COLUMNS: &str = "id, username, role, created_at, disabled, ceilings, token_version";

fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        id: r.get(0)?,
        username: r.get(1)?,
        role: Role::parse(&r.get::<_, String>(2)?),
        created_at: r.get(3)?,
        disabled: r.get::<_, i64>(4)? != 0,
        ceilings: r
            .get::<_, Option<String>>(5)?
            .and_then(|c| serde_json::from_str(&c).ok()),
        token_version: r.get(6)?,
    })
}

pub fn find_by_name(conn: &Connection, username: &str) -> Result<Option<User>, StoreError> {
    Ok(conn
        .query_row(
            &format!("SELECT {COLUMNS} FROM users WHERE username = ?1"),
            [username],
            from_row,
        )
        .optional()?)
}

pub fn get(conn: &Connection, id: &str) -> Result<User, StoreError> {
    conn.query_row(&format!("SELECT {COLUMNS} FROM users WHERE id = ?1"), [id], from_row)
        .optional()?
        .ok_or_else(|| StoreError::NotFound(format!("no user with id {id:?}")))
}

pub fn list(conn: &Connection) -> Result<Vec<User>, StoreError> {
    let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM users ORDER BY created_at, username"))?;
    let rows = stmt.query_map([], from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn count(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn.query_row("SELECT COUNT(*) FROM users", [], |r| r.get(0))?)
}

/// A well-formed hash verified against when the username does not exist.
const DUMMY: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$2kVh4R0KbvY6KZ1Oi7bKX7d0Jr4S4f5XQ1c2fX7WcQ0";

/// The id and password hash to check a login against: the user's, or (for
/// an unknown username) a dummy that fails, so timing does not tell whether
/// the username exists. Cheap: the slow check is [`check_password`].
pub fn login_hash(conn: &Connection, username: &str) -> Result<(Option<String>, String), StoreError> {
    let row: Option<(String, String)> = conn
        .query_row(
            "SELECT id, password_hash FROM users WHERE username = ?1",
            [username],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    Ok(match row {
        Some((id, hash)) => (Some(id), hash),
        None => (None, DUMMY.to_string()),
    })
}

/// The password hash of user `id` (to check `current_password`).
pub fn hash_of(conn: &Connection, id: &str) -> Result<String, StoreError> {
    conn.query_row("SELECT password_hash FROM users WHERE id = ?1", [id], |r| r.get(0))
        .optional()?
        .ok_or_else(|| StoreError::NotFound(format!("no user with id {id:?}")))
}

/// Argon2id verification: deliberately slow, run it on a blocking thread
/// without holding the database.
pub fn check_password(password: &str, hash: &str) -> bool {
    verify_password(password, hash)
}

/// The user if `password` is right (CLI and tests; holds `conn` throughout).
pub fn verify(conn: &Connection, username: &str, password: &str) -> Result<Option<User>, StoreError> {
    let (id, hash) = login_hash(conn, username)?;
    match id {
        Some(id) if check_password(password, &hash) => Ok(Some(get(conn, &id)?)),
        _ => Ok(None),
    }
}

/// Set a password (hashes it here: CLI).
pub fn set_password(conn: &Connection, id: &str, password: &str) -> Result<(), StoreError> {
    super::fields::password(password, MIN_PASSWORD)?;
    set_password_hash(conn, id, &hash_password(password)?)
}

/// Set a password checked with [`fields::password`](super::fields::password)
/// and hashed already; the user's sessions end.
pub fn set_password_hash(conn: &Connection, id: &str, hash: &str) -> Result<(), StoreError> {
    let n = conn.execute(
        "UPDATE users SET password_hash = ?2, token_version = token_version + 1 WHERE id = ?1",
        params![id, hash],
    )?;
    if n == 0 {
        return Err(StoreError::NotFound(format!("no user with id {id:?}")));
    }
    Ok(())
}

pub fn set_role(conn: &Connection, id: &str, role: Role) -> Result<(), StoreError> {
    let n = conn.execute(
        "UPDATE users SET role = ?2, token_version = token_version + 1 WHERE id = ?1 AND role != ?2",
        params![id, role.as_str()],
    )?;
    if n == 0 {
        get(conn, id)?; // NotFound, or the role was already that
        return Ok(());
    }
    if n == 0 {
        return Err(StoreError::NotFound(format!("no user with id {id:?}")));
    }
    Ok(())
}

/// Disable or re-enable a user: their keys and sessions stop (or work
/// again) at once.
pub fn set_disabled(conn: &Connection, id: &str, disabled: bool) -> Result<(), StoreError> {
    let n = conn.execute(
        "UPDATE users SET disabled = ?2, token_version = token_version + 1 WHERE id = ?1",
        params![id, disabled],
    )?;
    if n == 0 {
        return Err(StoreError::NotFound(format!("no user with id {id:?}")));
    }
    Ok(())
}

/// Set (or with `None` remove) a user's ceilings.
pub fn set_ceilings(conn: &Connection, id: &str, ceilings: Option<&Ceilings>) -> Result<(), StoreError> {
    if let Some(c) = ceilings {
        c.validate()?;
    }
    let text = ceilings.map(|c| serde_json::to_string(c).unwrap_or_default());
    let n = conn.execute("UPDATE users SET ceilings = ?2 WHERE id = ?1", params![id, text])?;
    if n == 0 {
        return Err(StoreError::NotFound(format!("no user with id {id:?}")));
    }
    Ok(())
}

/// Delete a user and revoke every key they own; returns the user and how
/// many keys were revoked.
pub fn delete(conn: &Connection, id: &str) -> Result<(User, usize), StoreError> {
    let user = get(conn, id)?;
    let revoked = super::keys::revoke_owned(conn, id)?;
    conn.execute("DELETE FROM users WHERE id = ?1", [id])?;
    Ok((user, revoked))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_verify_and_change_password() {
        let dir = tempfile::tempdir().unwrap();
        let conn = super::super::open(&dir.path().join("u.db")).unwrap();
        let u = create(&conn, "alice", "correct horse", Role::User).unwrap();
        assert!(matches!(
            create(&conn, "alice", "whatever12", Role::User),
            Err(StoreError::Conflict(_))
        ));
        assert!(matches!(
            create(&conn, "bob", "short", Role::User),
            Err(StoreError::Field(_))
        ));
        assert_eq!(verify(&conn, "alice", "correct horse").unwrap().unwrap().id, u.id);
        assert!(verify(&conn, "alice", "wrong password").unwrap().is_none());
        assert!(verify(&conn, "nobody", "correct horse").unwrap().is_none());
        set_password(&conn, &u.id, "battery staple").unwrap();
        assert!(verify(&conn, "alice", "correct horse").unwrap().is_none());
        assert!(verify(&conn, "alice", "battery staple").unwrap().is_some());
        let hash: String = conn
            .query_row("SELECT password_hash FROM users", [], |r| r.get(0))
            .unwrap();
        assert!(hash.starts_with("$argon2id$"));
    }
}
