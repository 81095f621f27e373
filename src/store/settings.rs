//! Small named values kept in the database (the generated JWT secret).

use super::StoreError;
use rusqlite::{Connection, OptionalExtension, params};

pub fn get(conn: &Connection, name: &str) -> Result<Option<String>, StoreError> {
    Ok(conn
        .query_row("SELECT value FROM settings WHERE name = ?1", [name], |r| r.get(0))
        .optional()?)
}

/// The value of `name`, created with `make` the first time (race-free:
/// concurrent creators agree on the first one written).
pub fn get_or_create(conn: &Connection, name: &str, make: impl FnOnce() -> String) -> Result<String, StoreError> {
    conn.execute(
        "INSERT OR IGNORE INTO settings (name, value) VALUES (?1, ?2)",
        params![name, make()],
    )?;
    get(conn, name)?.ok_or_else(|| StoreError::NotFound(format!("setting {name:?}")))
}

/// Set `name` to `value`.
pub fn set(conn: &Connection, name: &str, value: &str) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO settings (name, value) VALUES (?1, ?2)
         ON CONFLICT(name) DO UPDATE SET value = excluded.value",
        params![name, value],
    )?;
    Ok(())
}

/// Remove `name`.
pub fn delete(conn: &Connection, name: &str) -> Result<(), StoreError> {
    conn.execute("DELETE FROM settings WHERE name = ?1", [name])?;
    Ok(())
}
