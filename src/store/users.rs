//! Admin-service users: username, argon2id password hash, role.

use super::{StoreError, now_unix};
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
}

/// Hash a password with argon2id and a random salt (PHC string).
pub fn hash_password(password: &str) -> Result<String, StoreError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| StoreError::Invalid(format!("cannot hash password: {e}")))
}

fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
}

fn valid_username(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
}

/// Minimum password length for new passwords.
pub const MIN_PASSWORD: usize = 8;

pub fn create(conn: &Connection, username: &str, password: &str, role: Role) -> Result<User, StoreError> {
    if !valid_username(username) {
        return Err(StoreError::Invalid(
            "username must be 1-64 characters of A-Z a-z 0-9 - _ . @".into(),
        ));
    }
    if password.chars().count() < MIN_PASSWORD {
        return Err(StoreError::Invalid(format!(
            "password must be at least {MIN_PASSWORD} characters"
        )));
    }
    if find_by_name(conn, username)?.is_some() {
        return Err(StoreError::Conflict(format!("user {username:?} already exists")));
    }
    let user = User {
        id: format!("usr_{}", uuid::Uuid::now_v7().simple()),
        username: username.to_string(),
        role,
        created_at: now_unix(),
    };
    conn.execute(
        "INSERT INTO users (id, username, password_hash, role, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            user.id,
            user.username,
            hash_password(password)?,
            role.as_str(),
            user.created_at
        ],
    )?;
    Ok(user)
}

fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        id: r.get(0)?,
        username: r.get(1)?,
        role: Role::parse(&r.get::<_, String>(2)?),
        created_at: r.get(3)?,
    })
}

pub fn find_by_name(conn: &Connection, username: &str) -> Result<Option<User>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT id, username, role, created_at FROM users WHERE username = ?1",
            [username],
            from_row,
        )
        .optional()?)
}

pub fn get(conn: &Connection, id: &str) -> Result<User, StoreError> {
    conn.query_row(
        "SELECT id, username, role, created_at FROM users WHERE id = ?1",
        [id],
        from_row,
    )
    .optional()?
    .ok_or_else(|| StoreError::NotFound(format!("no user with id {id:?}")))
}

pub fn list(conn: &Connection) -> Result<Vec<User>, StoreError> {
    let mut stmt = conn.prepare("SELECT id, username, role, created_at FROM users ORDER BY created_at, username")?;
    let rows = stmt.query_map([], from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn count(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn.query_row("SELECT COUNT(*) FROM users", [], |r| r.get(0))?)
}

/// A well-formed hash verified against when the username does not exist.
const DUMMY: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$2kVh4R0KbvY6KZ1Oi7bKX7d0Jr4S4f5XQ1c2fX7WcQ0";

/// The user if `password` is right. Runs argon2 either way, so timing does
/// not tell whether the username exists.
pub fn verify(conn: &Connection, username: &str, password: &str) -> Result<Option<User>, StoreError> {
    let row: Option<(String, String)> = conn
        .query_row(
            "SELECT id, password_hash FROM users WHERE username = ?1",
            [username],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    match row {
        Some((id, hash)) if verify_password(password, &hash) => Ok(Some(get(conn, &id)?)),
        Some(_) => Ok(None),
        None => {
            let _ = verify_password(password, DUMMY);
            Ok(None)
        }
    }
}

pub fn set_password(conn: &Connection, id: &str, password: &str) -> Result<(), StoreError> {
    if password.chars().count() < MIN_PASSWORD {
        return Err(StoreError::Invalid(format!(
            "password must be at least {MIN_PASSWORD} characters"
        )));
    }
    let n = conn.execute(
        "UPDATE users SET password_hash = ?2 WHERE id = ?1",
        params![id, hash_password(password)?],
    )?;
    if n == 0 {
        return Err(StoreError::NotFound(format!("no user with id {id:?}")));
    }
    Ok(())
}

pub fn set_role(conn: &Connection, id: &str, role: Role) -> Result<(), StoreError> {
    let n = conn.execute("UPDATE users SET role = ?2 WHERE id = ?1", params![id, role.as_str()])?;
    if n == 0 {
        return Err(StoreError::NotFound(format!("no user with id {id:?}")));
    }
    Ok(())
}

pub fn delete(conn: &Connection, id: &str) -> Result<User, StoreError> {
    let user = get(conn, id)?;
    conn.execute("DELETE FROM users WHERE id = ?1", [id])?;
    Ok(user)
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
            Err(StoreError::Invalid(_))
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
